"""PatchCleanser: the double-masking rule, its view scheduling, and the defended classifier."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from huggingface_hub import PyTorchModelHubMixin
from torch import nn

from .._args import DefaultFloat, DefaultInt, as_fill, as_image_size, as_labels, check_label_range, is_default, positive_int
from ..views import ViewEngine, eval_mode, row_pairs, triangle_pairs
from ..geometry import DEFAULT_NUM_MASKS, MaskSet

__all__ = ["RobustPatchClassifier", "CertifyResult", "wrap"]

# ----------------------------------------------------------------------------------- rule
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

# ----------------------------------------------------------------------------- classifier

DEFAULT_PATCH = DefaultFloat(0.02)
DEFAULT_BATCH_SIZE = DefaultInt(64)


@dataclass(frozen=True)
class CertifyResult:
    """Per-image outcome of `RobustPatchClassifier.certify` (DESIGN.md section 3).

    Attributes:
        prediction: `(B,)` the robust (double-masking) prediction.
        certified: `(B,)` bool: no patch of the threat model can change the prediction, and it
            equals the label.
        case: `(B,)` 1, 2 or 3: the double-masking case that gave the prediction.
        one_mask: `(B, K)` the one-mask labels `P_i`.
        num_views: `(B,)` masked views run through the model for each image.
        grid: `(B, K, K)` the two-mask labels `P_ij` (symmetric, diagonal `P_ii = P_i`), `-1`
            where early exit skipped a view; with `early_exit=False` it is complete.
    """

    prediction: torch.Tensor
    certified: torch.Tensor
    case: torch.Tensor
    one_mask: torch.Tensor
    num_views: torch.Tensor
    grid: torch.Tensor

    @property
    def total_views(self) -> int:
        """Masked views run through the model for the whole batch."""
        return int(self.num_views.sum())


def _first_conv_channels(model: nn.Module) -> int | None:
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            return module.in_channels
    return None


def _timm_input_size(model: nn.Module) -> tuple[int, int, int] | None:
    cfg = getattr(model, "pretrained_cfg", None)
    if isinstance(cfg, dict) and cfg.get("input_size") is not None:
        c, h, w = cfg["input_size"]
        return int(c), int(h), int(w)
    return None


class RobustPatchClassifier(
    nn.Module,
    PyTorchModelHubMixin,
    library_name="robustwrap",
    tags=["robustwrap", "certified-robustness", "adversarial-patch"],
    repo_url="https://github.com/robustwrap/robustwrap",
    paper_url="https://arxiv.org/abs/2108.09135",
):
    """A classifier defended by PatchCleanser double masking.

    In eval mode `forward` returns robust logits; in train mode it is the base model's forward,
    so a wrapped model trains like the original. Build one with `robustwrap.wrap`.

    `save_pretrained(folder)`, `push_to_hub(repo_id)` and `from_pretrained(repo_or_folder)` come
    from `huggingface_hub.PyTorchModelHubMixin` and write timm's Hub format plus a `"robustwrap"`
    section (DESIGN.md section 5). `pretrained_info` (strategy, dataset, measured metrics) goes
    into that section and into the model card.

    Args:
        model: the base classifier, `(B, C, H, W) -> (B, num_classes)` logits.
        mask_set: the R-covering mask set (its `image_size` is the input size).
        fill: value of masked pixels in the model's input space (after normalisation): a scalar
            or one value per channel. Train and certify with the same fill.
        batch_size: masked views per forward pass.
        num_classes: classes of the base model; read from `model.num_classes` when it has one,
            else found with one forward pass of a blank image the first time it is needed.

    Raises:
        TypeError: if `model` is not an `nn.Module` or is already a `RobustPatchClassifier`.
        ValueError: for a bad `fill` or `batch_size`.
    """

    def __init__(
        self,
        model: nn.Module,
        mask_set: MaskSet,
        *,
        fill: float | Sequence[float] = 0.0,
        batch_size: int = DEFAULT_BATCH_SIZE,
        num_classes: int | None = None,
    ):
        super().__init__()
        if isinstance(model, RobustPatchClassifier):
            raise TypeError("model is already a RobustPatchClassifier; wrap its .model to change the defense")
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not isinstance(mask_set, MaskSet):
            raise TypeError(f"mask_set must be a robustwrap.MaskSet, got {type(mask_set).__name__}")
        self.model = model
        self.mask_set = mask_set
        self.fill = as_fill(fill)
        self.batch_size = positive_int(batch_size, "batch_size")
        self.in_chans = _infer_channels(model, self.fill)
        self.engine = ViewEngine(model, mask_set, self.fill, self.batch_size)
        if num_classes is None and isinstance(getattr(model, "num_classes", None), int):
            num_classes = model.num_classes
        if num_classes is not None:
            self.engine.num_classes = positive_int(num_classes, "num_classes")
        self.pretrained_info: dict = {}

    # ---------------------------------------------------------------------------------- hub
    def _save_pretrained(self, save_directory) -> None:
        from .hub import save_folder

        save_folder(self, save_directory)

    @classmethod
    def _from_pretrained(cls, *, model_id: str, revision, cache_dir, force_download, local_files_only, token, **kwargs):
        from .hub import load_repo

        kwargs.pop("num_classes", None)  # the mixin passes config.json's top-level num_classes; the robustwrap section has it
        return load_repo(
            model_id,
            revision=revision,
            cache_dir=cache_dir,
            force_download=force_download,
            local_files_only=local_files_only,
            token=token,
            **kwargs,
        )

    # --------------------------------------------------------------------------- properties
    @property
    def image_size(self) -> tuple[int, int]:
        """`(H, W)` of the inputs, from the mask set."""
        return self.mask_set.image_size

    @property
    def num_classes(self) -> int:
        """Number of classes of the base model (one blank forward pass the first time, if unknown)."""
        if self.engine.num_classes is None:
            c = self.in_chans or 3
            with eval_mode(self.model), torch.inference_mode():
                x = self.engine.prepare(torch.zeros(1, c, *self.image_size))
                self.engine.run(x, torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.long))
        return self.engine.num_classes

    def extra_repr(self) -> str:
        return f"mask_set={self.mask_set.describe()}, fill={self.fill}, batch_size={self.batch_size}"

    # ------------------------------------------------------------------------------- inputs
    def _check_images(self, x) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"images must be a torch.Tensor of shape (B, C, H, W), got {type(x).__name__}")
        if x.ndim != 4:
            raise ValueError(f"images must have shape (B, C, H, W), got shape {tuple(x.shape)}")
        if x.shape[0] == 0:
            raise ValueError("images is an empty batch (B = 0)")
        if not x.is_floating_point():
            raise TypeError(f"images must be a floating tensor, normalised as the model expects; got dtype {x.dtype}")
        h, w = self.image_size
        if tuple(x.shape[2:]) != (h, w):
            raise ValueError(f"images must be {h}x{w} for this mask set, got {x.shape[2]}x{x.shape[3]} (shape {tuple(x.shape)})")
        if self.in_chans is not None and x.shape[1] != self.in_chans:
            raise ValueError(f"images must have {self.in_chans} channels for this model, got {x.shape[1]} (shape {tuple(x.shape)})")
        if not torch.isfinite(x).all():
            raise ValueError("images contain NaN or Inf values")
        return self.engine.prepare(x)

    def _check_labels(self, y, batch: int) -> torch.Tensor:
        y = as_labels(y, batch)
        check_label_range(y, self.num_classes)
        return y

    # ----------------------------------------------------------------------------- inference
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Robust logits `(B, num_classes)` in eval mode; the base model's forward in train mode.

        The robust logits are the mean of the logits of the masked views that voted for the
        robust label (DESIGN.md section 2), so `forward(x).argmax(1) == predict(x)`. They are
        float32 (or wider) whatever the model's dtype.
        """
        if self.training:
            return self.model(x)
        return self._infer(x, need_logits=True)[1]

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Robust labels `(B,)` by double masking (in either mode; the base model runs in eval mode)."""
        return self._infer(x, need_logits=False)[0].label

    def _infer(self, x: torch.Tensor, need_logits: bool) -> tuple[Decision, torch.Tensor | None]:
        x = self._check_images(x)
        k = len(self.mask_set)
        with eval_mode(self.model), torch.inference_mode():
            one_mask, one_logits = self.engine.one_mask(x)
            row_image, row_mask = disagreers(one_mask).nonzero(as_tuple=True)
            pairs, owners = row_pairs(row_image, row_mask, k)
            outcome = self.engine.evaluate_pairs(
                x,
                pairs,
                owners,
                one_mask[row_image, row_mask],
                on_step=lambda done, failed: rows_to_cancel(row_image, row_mask, done, failed),
                need_logits=need_logits,
            )
            decision = decide(one_mask, _grid(one_mask, pairs, outcome.labels))
            if not need_logits:
                return decision, None
            return decision, _robust_logits(decision, one_mask, one_logits, row_image, row_mask, outcome.logit_sum)

    def certify(self, x: torch.Tensor, y: torch.Tensor, early_exit: bool = True) -> CertifyResult:
        """Certify a batch against every patch of the threat model (DESIGN.md section 3).

        An image is certified iff all `K(K+1)/2` views `P_ij`, `i <= j`, show its label `y`.
        With `early_exit` an image stops being evaluated at its first disagreeing view; the
        result is identical, only `num_views` is smaller.

        Args:
            x: `(B, C, H, W)` images, floating, as the model expects them.
            y: `(B,)` integer labels in `[0, num_classes)`.
            early_exit: skip views that cannot change the result (default True).

        Returns:
            A `CertifyResult` with the robust prediction, certification, case, one-mask labels
            and the views evaluated per image.

        Raises:
            TypeError, ValueError: for bad images or labels, before any forward pass.
        """
        x = self._check_images(x)
        y = self._check_labels(y, x.shape[0]).to(x.device)
        b, k = x.shape[0], len(self.mask_set)
        with eval_mode(self.model), torch.inference_mode():
            one_mask, _ = self.engine.one_mask(x)
            if early_exit:
                # Only images whose every one-mask label is y can be certified: check their
                # off-diagonal views. Others need the rows of their disagreeing masks to predict.
                candidate = (one_mask == y[:, None]).all(1)
                cert_pairs, cert_owners = triangle_pairs(candidate.nonzero()[:, 0], k)
                row_image, row_mask = (disagreers(one_mask) & ~candidate[:, None]).nonzero(as_tuple=True)
                rpairs, rowners = row_pairs(row_image, row_mask, k)
                n_cert = int(candidate.sum())
                pairs = torch.cat([cert_pairs, rpairs])
                owners = torch.cat([cert_owners, torch.where(rowners >= 0, rowners + n_cert, -1)])
                expect = torch.cat([y[candidate], one_mask[row_image, row_mask]])

                def on_step(done, failed):
                    cancel = torch.zeros_like(done)
                    cancel[n_cert:] = rows_to_cancel(row_image, row_mask, done[n_cert:], failed[n_cert:])
                    return cancel

                outcome = self.engine.evaluate_pairs(x, pairs, owners, expect, on_step=on_step)
            else:
                pairs, owners = triangle_pairs(torch.arange(b, device=x.device), k)
                outcome = self.engine.evaluate_pairs(x, pairs, owners, y, early_exit=False)
        grid = _grid(one_mask, pairs, outcome.labels)
        decision = decide(one_mask, grid)
        evaluated = pairs[outcome.labels >= 0, 0]
        num_views = torch.full((b,), k, dtype=torch.long, device=x.device) + torch.bincount(evaluated, minlength=b)
        return CertifyResult(
            prediction=decision.label,
            certified=certified(grid, y),
            case=decision.case,
            one_mask=one_mask,
            num_views=num_views,
            grid=grid,
        )


def _grid(one_mask: torch.Tensor, pairs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The symmetric `(B, K, K)` label grid: one-mask labels on the diagonal, `-1` where not evaluated."""
    b, k = one_mask.shape
    grid = torch.full((b, k, k), -1, dtype=torch.long, device=one_mask.device)
    grid[pairs[:, 0], pairs[:, 1], pairs[:, 2]] = labels
    grid[pairs[:, 0], pairs[:, 2], pairs[:, 1]] = labels
    idx = torch.arange(k, device=one_mask.device)
    grid[:, idx, idx] = one_mask
    return grid


def _robust_logits(decision, one_mask, one_logits, row_image, row_mask, row_logit_sum) -> torch.Tensor:
    """Mean logits of the views that voted for the robust label (DESIGN.md section 2)."""
    b, k = one_mask.shape
    voters = one_mask == decision.label[:, None]  # Case I: all K; Case III: the majority
    logits = (one_logits * voters[..., None]).sum(1) / voters.sum(1, keepdim=True)
    case2 = decision.case == CASE_DISAGREER
    if case2.any():
        row_of = torch.full((b, k), -1, dtype=torch.long, device=one_mask.device)
        row_of[row_image, row_mask] = torch.arange(row_image.numel(), device=one_mask.device)
        images = case2.nonzero()[:, 0]
        winner = decision.winner[images]
        row_sum = row_logit_sum[row_of[images, winner]] + one_logits[images, winner]
        logits[images] = row_sum / k
    # A mean of vectors that each have their maximum at `label` has its maximum there too, but
    # rounding can make a near-tie come out as a smaller class id; bump the label just above.
    top = logits.max(1).values
    wrong = logits.argmax(1) != decision.label
    if wrong.any():
        logits[wrong, decision.label[wrong]] = torch.nextafter(top[wrong], torch.full_like(top[wrong], math.inf))
    return logits


def _infer_channels(model: nn.Module, fill) -> int | None:
    """Input channels: the first conv (what the weights take), else `in_chans`, else timm's pretrained_cfg.

    timm keeps `pretrained_cfg["input_size"]` of the pretrained source (3 channels) when a model
    is created with `in_chans=1`, so the weights are asked first.
    """
    channels = _first_conv_channels(model)
    if channels is None and isinstance(getattr(model, "in_chans", None), int):
        channels = model.in_chans
    if channels is None and _timm_input_size(model) is not None:
        channels = _timm_input_size(model)[0]
    if isinstance(fill, tuple):
        if channels is not None and len(fill) != channels:
            raise ValueError(f"fill has {len(fill)} values but the model takes {channels} channels")
        channels = len(fill)
    return channels


def wrap(
    model: nn.Module,
    patch: int | float | Sequence[int] = DEFAULT_PATCH,
    num_masks: int | Sequence[int] | None = DEFAULT_NUM_MASKS,
    stride: int | Sequence[int] | None = None,
    mask_set: MaskSet | None = None,
    fill: float | Sequence[float] = 0.0,
    image_size: int | Sequence[int] | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    num_classes: int | None = None,
) -> RobustPatchClassifier:
    """Wrap any image classifier into a certifiably patch-robust `RobustPatchClassifier`.

    ```python
    model = robustwrap.wrap(timm.create_model("resnet18"), patch=0.02)   # 2% of 224x224 = 32 px
    ```

    Args:
        model: a timm or torchvision model, or any `nn.Module` mapping `(B, C, H, W)` to
            `(B, num_classes)` logits.
        patch: the patch: side in pixels (int), fraction of the image area (float in (0, 1),
            default 0.02), or `(ph, pw)` in pixels for a rectangle.
        num_masks: masks per axis (default 6, i.e. 36 masks), or `(kh, kw)`.
        stride: mask stride in pixels, instead of `num_masks`.
        mask_set: a ready `MaskSet`, instead of `patch`/`num_masks`/`stride`.
        fill: masked pixel value in the model's input space (default 0.0: the dataset mean
            colour after normalisation), a scalar or one value per channel.
        image_size: `H` or `(H, W)`; defaults to a timm model's `pretrained_cfg["input_size"]`.
        batch_size: masked views per forward pass (default 64).
        num_classes: classes of the base model, if it has no `num_classes` attribute.

    Returns:
        The wrapped model, in the same train/eval mode as `model`.

    Raises:
        ValueError: for an impossible threat model (a patch <= 0 or larger than the image,
            `num_masks < 1`), both `mask_set` and patch settings, or no `image_size` where the
            model does not carry one.
    """
    timm_size = _timm_input_size(model) if isinstance(model, nn.Module) else None
    if mask_set is not None:
        given = [n for n, v in (("patch", patch), ("num_masks", num_masks)) if not is_default(v)]
        given += ["stride"] if stride is not None else []
        if given:
            raise ValueError(f"pass either mask_set or patch/num_masks/stride, not both (got mask_set and {', '.join(given)})")
        if image_size is not None and as_image_size(image_size) != mask_set.image_size:
            raise ValueError(f"image_size={image_size!r} does not match the mask set's image size {mask_set.image_size}")
    else:
        if image_size is None:
            if timm_size is None:
                raise ValueError(
                    "image_size is required: the model has no timm pretrained_cfg['input_size'] to read it from "
                    "(pass e.g. image_size=224 or image_size=(H, W))"
                )
            image_size = timm_size[1:]
        if isinstance(patch, (tuple, list)):
            mask_set = MaskSet.rect(image_size, patch, num_masks=num_masks, stride=stride)
        else:
            mask_set = MaskSet.square(image_size, patch, num_masks=num_masks, stride=stride)
    wrapped = RobustPatchClassifier(model, mask_set, fill=fill, batch_size=batch_size, num_classes=num_classes)
    wrapped.train(model.training)
    return wrapped
