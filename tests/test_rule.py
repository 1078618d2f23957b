"""The double-masking rule and certification rule against a literal reading of DESIGN.md."""

from __future__ import annotations

import torch
from conftest import brute_force_certified, brute_force_decide

from robustwrap.defenses import patchcleanser as rule


def random_grids(seed: int, batch: int = 400, k: int = 5, classes: int = 3):
    """Symmetric label grids where some rows agree with their one-mask label, so that all three
    cases occur (uniform random grids almost never give Case II)."""
    g = torch.Generator().manual_seed(seed)
    one = torch.randint(0, classes, (batch, k), generator=g)
    # bias towards a majority so that Case I occurs too
    lucky = torch.rand(batch, generator=g) < 0.3
    one[lucky] = one[lucky, :1]
    grid = torch.randint(0, classes, (batch, k, k), generator=g)
    grid = torch.triu(grid) + torch.triu(grid, 1).transpose(1, 2)
    for b in range(batch):
        for i in range(k):
            if torch.rand(1, generator=g).item() < 0.5:
                grid[b, i, :] = one[b, i]
                grid[b, :, i] = one[b, i]
        grid[b].fill_diagonal_(0)
        grid[b] += torch.diag(one[b])
    return one, grid


def test_decide_matches_brute_force_in_all_cases():
    seen = set()
    for seed in range(3):
        one, grid = random_grids(seed)
        decision = rule.decide(one, grid)
        for b in range(one.shape[0]):
            label, case = brute_force_decide(one[b].tolist(), grid[b].tolist())
            assert (int(decision.label[b]), int(decision.case[b])) == (label, case)
            seen.add(case)
            if case == 2:
                i = int(decision.winner[b])
                assert one[b, i] == label and (grid[b, i] == label).all()
                assert all(not (grid[b, j] == one[b, j]).all() or one[b, j] == decision.majority[b] for j in range(i))
            else:
                assert decision.winner[b] == -1
    assert seen == {1, 2, 3}


def test_majority_ties_go_to_smallest_class():
    one = torch.tensor([[2, 2, 1, 1], [3, 0, 3, 0], [5, 4, 4, 5], [1, 2, 3, 0]])
    assert rule.majority(one).tolist() == [1, 0, 4, 0]


def test_case_two_first_agreeing_disagreer_wins():
    # majority 0; masks 1 and 3 disagree (labels 1 and 2) and both rows agree: mask 1 wins.
    one = torch.tensor([[0, 1, 0, 2, 0]])
    grid = torch.zeros(1, 5, 5, dtype=torch.long)
    grid[0, 1, :] = grid[0, :, 1] = 1
    grid[0, 3, :] = grid[0, :, 3] = 2
    grid[0, 1, 3] = grid[0, 3, 1] = 1  # the shared view agrees with row 1 only
    grid[0] += torch.diag(one[0] - grid[0].diagonal())
    d = rule.decide(one, grid)
    assert (d.label.item(), d.case.item(), d.winner.item()) == (1, 2, 1)


def test_unevaluated_views_never_count_as_agreement():
    one = torch.tensor([[0, 1, 0]])
    grid = torch.full((1, 3, 3), -1)
    grid[0, 1, 1] = 1
    d = rule.decide(one, grid)
    assert (d.label.item(), d.case.item()) == (0, 3)
    full = torch.full((1, 3, 3), 2)
    assert rule.certified(full, torch.tensor([2])).item()
    full[0, 0, 2] = -1
    assert not rule.certified(full, torch.tensor([2])).item()


def test_certified_matches_brute_force():
    for seed in range(3):
        one, grid = random_grids(seed, k=4, classes=2)
        target = one[:, 0]
        got = rule.certified(grid, target)
        expected = [brute_force_certified(grid[b].tolist(), int(target[b])) for b in range(one.shape[0])]
        assert got.tolist() == expected
        assert any(expected) and not all(expected)


def test_certified_reads_upper_triangle_and_diagonal_only():
    grid = torch.full((1, 3, 3), 7)
    grid[0, 2, 0] = 1  # lower triangle: the same view as (0, 2) in a symmetric grid, never read
    assert rule.certified(grid, torch.tensor([7])).item()
    grid[0, 1, 1] = 1
    assert not rule.certified(grid, torch.tensor([7])).item()


def brute_force_cancel(row_image, row_mask, done, failed):
    cancel = []
    for g in range(len(row_image)):
        mine = [h for h in range(len(row_image)) if row_image[h] == row_image[g]]
        open_rows = sorted((row_mask[h], h) for h in mine if not failed[h])
        winner = open_rows[0][1] if open_rows and done[open_rows[0][1]] else None
        cancel.append(winner is not None and row_mask[g] > row_mask[winner])
    return cancel


def test_rows_to_cancel_matches_brute_force():
    gen = torch.Generator().manual_seed(0)
    for _ in range(50):
        n = int(torch.randint(1, 12, (1,), generator=gen))
        row_image = torch.randint(0, 3, (n,), generator=gen)
        row_mask = torch.randperm(n, generator=gen)
        state = torch.randint(0, 3, (n,), generator=gen)  # 0 pending, 1 done, 2 failed
        done, failed = state == 1, state == 2
        got = rule.rows_to_cancel(row_image, row_mask, done, failed).tolist()
        assert got == brute_force_cancel(row_image.tolist(), row_mask.tolist(), done.tolist(), failed.tolist())
