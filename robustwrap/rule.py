"""PatchCleanser's double-masking decision and certification rule, on label grids (DESIGN.md 2-3).

Pure functions of labels: nothing here runs a model. A two-mask grid is `(B, K, K)` long with
`grid[b, i, j] = P_ij` (symmetric, diagonal `P_ii = P_i`) and `-1` where a view was not evaluated.
The engine only leaves a view out when the answer cannot depend on it (a row that already failed,
an image already known not to be certified), so these functions give the same answer on such a
sparse grid as on the full one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["Decision", "CASE_UNANIMOUS", "CASE_DISAGREER", "CASE_MAJORITY", "majority", "decide", "certified", "rows_to_cancel"]

CASE_UNANIMOUS = 1  # Case I: every one-mask label agrees
CASE_DISAGREER = 2  # Case II: a disagreeing mask whose whole two-mask row agrees with it
CASE_MAJORITY = 3  # Case III: fall back to the majority one-mask label


@dataclass(frozen=True)
class Decision:
    """The double-masking decision for a batch.

    Attributes:
        label: `(B,)` the robust prediction.
        case: `(B,)` 1, 2 or 3 (Case I, II, III of DESIGN.md section 2).
        winner: `(B,)` the mask `i` whose row decided a Case II image, `-1` otherwise.
        majority: `(B,)` the majority one-mask label (smallest class id on ties).
    """

    label: torch.Tensor
    case: torch.Tensor
    winner: torch.Tensor
    majority: torch.Tensor


def majority(one_mask: torch.Tensor) -> torch.Tensor:
    """The most frequent label of each row of `(B, K)` one-mask labels; ties go to the smallest id."""
    num_classes = int(one_mask.max()) + 1
    counts = torch.zeros(one_mask.shape[0], num_classes, dtype=torch.long, device=one_mask.device)
    counts.scatter_add_(1, one_mask, torch.ones_like(one_mask))
    return counts.argmax(1)  # argmax returns the first maximum: the smallest class id


def disagreers(one_mask: torch.Tensor) -> torch.Tensor:
    """`(B, K)` bool: the masks whose one-mask label differs from the majority."""
    return one_mask != majority(one_mask)[:, None]


def _rows_agree(one_mask: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """`(B, K)` bool: row `i` is complete and every `P_ij` equals `P_i` (diagonal included)."""
    return (grid == one_mask[:, :, None]).all(dim=2)


def decide(one_mask: torch.Tensor, grid: torch.Tensor) -> Decision:
    """Apply the double-masking rule of DESIGN.md section 2.

    Args:
        one_mask: `(B, K)` long, `P_i`.
        grid: `(B, K, K)` long, `P_ij`; only the rows of disagreeing masks are read, and `-1`
            marks a view that was not evaluated (its row then counts as not agreeing).

    Returns:
        The `Decision`: Case I if all `P_i` agree; else Case II with the first (smallest `i`)
        disagreer whose whole row equals `P_i`; else Case III with the majority label.
    """
    y_maj = majority(one_mask)
    disagree = one_mask != y_maj[:, None]
    wins = disagree & _rows_agree(one_mask, grid)
    has_winner = wins.any(1)
    winner = torch.where(has_winner, wins.int().argmax(1), torch.full_like(y_maj, -1))
    unanimous = ~disagree.any(1)
    label = torch.where(has_winner, one_mask.gather(1, winner.clamp(min=0)[:, None])[:, 0], y_maj)
    case = torch.full_like(y_maj, CASE_MAJORITY)
    case[has_winner] = CASE_DISAGREER
    case[unanimous] = CASE_UNANIMOUS
    return Decision(label=label, case=case, winner=winner, majority=y_maj)


def certified(grid: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """DESIGN.md section 3: `(B,)` bool, True iff `P_ij == y` for every `i <= j`.

    A view left at `-1` (not evaluated) never equals a label, so an image is only certified when
    its whole upper triangle, diagonal included, was evaluated and agrees with `target`.
    """
    k = grid.shape[1]
    upper = torch.triu(torch.ones(k, k, dtype=torch.bool, device=grid.device))
    return ((grid == target[:, None, None]) | ~upper).all(dim=2).all(dim=1)


def rows_to_cancel(row_image: torch.Tensor, row_mask: torch.Tensor, done: torch.Tensor, failed: torch.Tensor) -> torch.Tensor:
    """Which pending two-mask rows can no longer change a Case II decision.

    In Case II the first (smallest `i`) agreeing disagreer row wins. Once every row of an image
    below some row has failed and that row has agreed completely, the rows after it are moot.

    Args:
        row_image: `(G,)` the image of each row.
        row_mask: `(G,)` the mask index `i` of each row.
        done: `(G,)` the row was fully evaluated and agreed.
        failed: `(G,)` some view of the row disagreed.

    Returns:
        `(G,)` bool: rows to stop evaluating.
    """
    if row_image.numel() == 0:
        return torch.zeros_like(done)
    big = torch.iinfo(torch.long).max
    first_open = torch.full((int(row_image.max()) + 1,), big, dtype=torch.long, device=row_image.device)
    first_open.scatter_reduce_(0, row_image, torch.where(failed, big, row_mask), reduce="amin")
    # The first row that has not failed is the only candidate winner; if it is done, it won.
    first = first_open[row_image]
    winner_done = torch.zeros_like(first_open, dtype=torch.bool)
    winner_done.scatter_reduce_(0, row_image, done & (row_mask == first), reduce="amax")
    return winner_done[row_image] & (row_mask > first)
