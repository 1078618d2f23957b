"""`certify_dataset`: certify a whole data set, resumably, in one process or many, for any defense.

The data set is cut into fixed steps of `batch_size` consecutive images (`0..b-1`, `b..2b-1`, ...)
that do not depend on what was already done or on how many processes share the work. Each step
is one `certify` call of the defended model, so an image's record (its views count included)
comes out the same in a straight run, a resumed run and a many-process run:

- resume: every kept record is checked against its image (a content hash, see `image_hash`)
  and its label; a last line cut off by the interruption is dropped (with a warning); a step
  with any image missing from the results file is certified again and only the missing records
  are written; finished steps are not certified again;
- `torch.distributed`: rank `r` takes the unfinished steps `r, r + W, r + 2W, ...`, writes its own
  results file (`<results>.rank<r>`), and the records of all ranks are gathered into one report.

Certification runs at the defended model's own precision (`wrap(..., precision=...)`), the
same computation as its `forward` and `predict`: see the Concepts page,
docs/concepts.md#precision; results files and their verification: docs/concepts.md#results.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import re
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, SequentialSampler, default_collate

from ._args import positive_int, refuses_amp
from ._dist import barrier, rank_and_world
from .defenses import RobustPatchClassifier
from .report import CertificationReport, ImageRecord
from .views import eval_mode, model_device_dtype, observe_forward

__all__ = ["ResultsFileError", "certify_dataset", "image_hash", "model_fingerprint", "view_grid"]

DEFAULT_BATCH_SIZE = 32
RESULTS_FORMAT = "robustwrap.results"
RESULTS_VERSION = 2
HASH_SCHEME = "sha256/float32-le/shape"
# The fields every CertifyResult has; the others are the defense's own (see `_record_fields`).
_COMMON_RESULT_FIELDS = ("prediction", "certified", "num_views")


@refuses_amp(
    "precision is a setting of the defended model, used by forward, predict, certify and certify_dataset alike "
    "(a certificate computed in bfloat16 says nothing about a float32 prediction); build the model with "
    "robustwrap.wrap(..., precision='bfloat16') (or 'float16') instead"
)
def certify_dataset(
    model: RobustPatchClassifier,
    data: Dataset | DataLoader,
    *,
    batch_size: int | None = None,
    limit: int | None = None,
    results_path: str | Path | None = None,
    resume: bool = True,
    progress: bool = True,
    device: str | torch.device | None = None,
    guarantee: str = "prediction",
) -> CertificationReport:
    """Certify every image of a data set; return clean, certified and vanilla accuracy and records.

    ```python
    report = robustwrap.certify_dataset(model, val_dataset, results_path="val.jsonl")
    print(report.summary())
    ```

    Works for every defense. The model certifies at its own precision and margin (set with
    `robustwrap.wrap(..., precision=...)`), so the report is about the function the model
    computes in `forward` and `predict`.

    Args:
        model: the defended model.
        data: a map-style `Dataset` of `(image, label)`, or a `DataLoader` over one without
            shuffling (its `batch_size`, workers and `collate_fn` are kept). Images must be
            tensors, normalised as the model expects (a data set of PIL images needs a
            `transform`).
        batch_size: images per `certify` call (default: the DataLoader's, else 32). The views
            of these images share forward passes of `model.batch_size` views.
        limit: certify only the first `limit` images.
        results_path: a JSON-lines file that gets one record per image, flushed as it is
            written, after a header line that fingerprints the model and its settings.
        resume: continue the results file: finished images are skipped, a last line cut off
            mid-write by the interruption is dropped with a warning (its image is certified
            again), and the report equals an uninterrupted run's (with the same `batch_size`:
            how many views an image needs can depend on the images that share its step).
            Every kept record is verified first: its image and label are read again from
            `data`, and the image's content hash and the label compared (all of them, not a
            sample: reading images costs a small fraction of certifying them, which took many
            forward passes each, and a sample would miss a data set in which only a few images
            were replaced or re-transformed). With `resume=False` an existing results file is
            overwritten.
        progress: show a tqdm bar with the running clean and certified accuracy, updated after
            every forward pass of the model (its ETA counts an image as done in proportion to
            the views it needed so far, by the mean views per image measured in this run).
            `False`: print nothing.
        device: move the model to this device first (`model.to(device)`); by default it runs
            where its parameters are.
        guarantee: what is certified: `"prediction"` (default: no patch changes the
            prediction, `certify`), `"detection"` (under any patch the output is the label or
            an alert, `certify_detection` at the model's `tau`; records get an `alert`), or
            `"top<k>"` such as `"top5"` (no patch pushes the label out of the `k` best classes,
            `certify(..., k=k)`). Recorded in the report's settings and the results
            fingerprint, so results of different guarantees are never mixed.

    Returns:
        The `CertificationReport`, records sorted by index. Under `torch.distributed` every
        rank returns the same merged report, equal to a single-process run's (with NCCL, call
        `torch.cuda.set_device(local_rank)` first: the records are gathered as objects).

    Raises:
        TypeError: for a `model` that is not a robustwrap defended model, `data` that is not a
            Dataset or DataLoader or gives PIL images (with a hint about the transform), or the
            removed `amp=` keyword (use `robustwrap.wrap(..., precision=...)`).
        ValueError: for an empty data set, a bad `batch_size`, `limit` or `guarantee` (one the
            defense does not have, with the reason), or a DataLoader that
            shuffles or has no fixed batch size (an image's index must be stable for resume and
            sharding).
        ResultsFileError: (a ValueError) for a results file that cannot be continued: written
            for another model, settings or data set size (the error names the settings that
            differ), damaged before its last line, or with a kept record whose image or label
            is not the one in `data` now (the error names the index and both hashes or both
            labels). Mixing it in would report numbers that belong to neither run; it is raised
            before any forward pass.
    """
    if not isinstance(model, RobustPatchClassifier):
        raise TypeError(f"model must be a robustwrap defended model (a RobustPatchClassifier, see robustwrap.wrap), got {type(model).__name__}")
    dataset, batch_size, loader_options = _dataset_and_loader_options(data, batch_size)
    size = len(dataset)
    n = size if limit is None else min(size, positive_int(limit, "limit"))
    if n == 0:
        raise ValueError("data is empty: there are no images to certify")
    rank, world = rank_and_world()
    if device is not None:
        model.to(device)
    guarantee, top_k = _as_guarantee(guarantee, model)
    settings = model.settings()
    fingerprint = model_fingerprint(model)
    if guarantee != "prediction":  # prediction results keep the fingerprint they always had
        settings = {**settings, "guarantee": guarantee}
        fingerprint = hashlib.sha256(f"{fingerprint}:{guarantee}".encode()).hexdigest()[:32]

    store = None
    done: dict[int, ImageRecord] = {}
    if results_path is not None:
        store = _ResultsStore(Path(results_path), fingerprint, size, settings)
        if not resume and rank == 0:
            store.clear()
        barrier(world)
        kept, torn = store.read()
        done = {i: r for i, r in kept.items() if i < n}
        for cut in torn if rank == 0 else ():
            warnings.warn(cut, stacklevel=3)  # the caller of certify_dataset, through refuses_amp
        # Every rank must read the files before any rank appends to them, or ranks would
        # disagree about which steps are left and certify some twice.
        barrier(world)

    steps = [list(range(s, min(s + batch_size, n))) for s in range(0, n, batch_size)]
    mine = [step for step in steps if any(i not in done for i in step)][rank::world]
    _check_items(dataset, loader_options, mine[0][0] if mine else 0)
    if store is not None:
        _verify_kept(store.path, dataset, loader_options, done, batch_size, rank, world, progress and rank == 0)
    loader = DataLoader(dataset, batch_sampler=mine, **loader_options)

    new: list[ImageRecord] = []
    bar = _Progress(progress and rank == 0, total=sum(i not in done for step in mine for i in step), done=done.values(), full_views=_full_views(model, guarantee))
    writer = store.writer(rank, world) if store is not None else contextlib.nullcontext()
    with writer as out, eval_mode(model._inner_model), bar.counting_views(), contextlib.closing(bar):
        start = time.perf_counter()
        for step, (x, y) in zip(mine, loader):
            bar.start_step(len(step), sum(i not in done for i in step))
            records = _certify_step(model, x, y, step, bar, guarantee, top_k)
            # Wall time of the step, loading included: images/s is what a user waits for.
            now = time.perf_counter()
            share, start = (now - start) / len(step), now
            for record in records:
                if record.index in done:
                    continue  # finished before an interruption; recomputed only to redo its step
                record = dataclasses.replace(record, seconds=share)
                new.append(record)
                if out is not None:
                    out.write(record)
                bar.add(record)
            bar.end_step()

    if world > 1:
        gathered: list[list[ImageRecord]] = [[] for _ in range(world)]
        torch.distributed.all_gather_object(gathered, new)
        new = [r for part in gathered for r in part]
    records = {**done, **{r.index: r for r in new}}
    if len(records) != n:
        raise RuntimeError(f"internal error: {len(records)} records for {n} images")
    return CertificationReport(
        model=_describe_model(model),
        data=_describe_data(dataset),
        defense=str(model.defense),
        settings=settings,
        num_classes=model.num_classes,
        records=tuple(records[i] for i in range(n)),
        fingerprint=fingerprint,
        full_views=_full_views(model, guarantee),
    )


def _as_guarantee(guarantee, model: RobustPatchClassifier) -> tuple[str, int]:
    """`(guarantee, k)`: `"prediction"` (k = 1), `"detection"` or `"top<k>"`, checked against the defense before any forward pass."""
    if not isinstance(guarantee, str):
        raise TypeError(f"guarantee must be a str ('prediction', 'detection' or 'top<k>' such as 'top5'), got {type(guarantee).__name__}")
    if guarantee == "detection":
        if model._no_detection is not None:
            raise ValueError(f"guarantee='detection': {type(model).__name__} cannot certify detection: {model._no_detection}")
        return guarantee, 1
    match = re.fullmatch(r"top([1-9][0-9]*)", guarantee)
    if guarantee != "prediction" and match is None:
        raise ValueError(f"guarantee must be 'prediction', 'detection' or 'top<k>' such as 'top5', got {guarantee!r}")
    k = model._check_top_k(int(match.group(1))) if match else 1
    return ("prediction", 1) if k == 1 else (guarantee, k)  # top1 is the prediction certificate


def _certify_step(
    model: RobustPatchClassifier, x, y, indices: list[int], bar: _Progress | None = None, guarantee: str = "prediction", top_k: int = 1
) -> list[ImageRecord]:
    if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
        raise TypeError(f"data must give (image tensor, integer label) pairs; a batch collated to ({type(x).__name__}, {type(y).__name__})")
    if x.shape[0] != len(indices):
        raise ValueError(f"a batch of {len(indices)} images collated to {x.shape[0]}; data must give one (image, label) per index")
    hashes = [image_hash(image) for image in x]
    if guarantee == "detection":
        result = model.certify_detection(x, y)
    else:
        result = model.certify(x, y, k=top_k) if top_k > 1 else model.certify(x, y)
    with _paused(bar):
        vanilla = _vanilla_prediction(model, x)
    extras = _record_fields(result, len(indices))
    rows = zip(indices, y.tolist(), result.prediction.tolist(), result.certified.tolist(), vanilla.tolist(), result.num_views.tolist(), hashes, extras)
    return [
        ImageRecord(index=i, label=label, prediction=p, certified=cert, vanilla_prediction=v, num_views=views, image_hash=h, extras=fields)
        for i, label, p, cert, v, views, h, fields in rows
    ]


def _vanilla_prediction(model: RobustPatchClassifier, x: torch.Tensor) -> torch.Tensor:
    """The undefended base model's labels on the unmasked images, at the model's precision."""
    predict_vanilla = getattr(model, "predict_vanilla", None)
    if callable(predict_vanilla):  # the defense knows its base model's input and output (e.g. local logits)
        labels = predict_vanilla(x)
    else:
        device, dtype = model_device_dtype(model._inner_model)
        with torch.no_grad(), model.autocast():
            labels = model._local_model(x.to(device=device, dtype=dtype)).argmax(1)
    if tuple(labels.shape) != (x.shape[0],):
        raise RuntimeError(f"the {model.defense!r} model's vanilla prediction has shape {tuple(labels.shape)}, expected ({x.shape[0]},): one label per image")
    return labels.cpu()


def _record_fields(result: Any, batch: int) -> list[dict]:
    """The defense's own per-image fields of a `CertifyResult`, one dict per image.

    A result class may say which fields go into records with a `record_fields()` method. Without
    one they are read generically from the dataclass: every field other than `prediction`,
    `certified` and `num_views` that is a tensor with leading dimension `batch` and at most two
    dimensions (a per-image value or vector, e.g. PatchCleanser's `case` and `one_mask`,
    smoothing's `counts`), or a plain number or 0-d tensor (the same value in every record,
    e.g. a `delta` shared by the batch). Per-image matrices (PatchCleanser's `(B, K, K)` `grid`)
    are diagnostics, not records.
    """
    method = getattr(result, "record_fields", None)
    if callable(method):
        rows = list(method())
        if len(rows) != batch or not all(isinstance(row, dict) for row in rows):
            raise RuntimeError(f"internal error: {type(result).__name__}.record_fields() must give one dict per image ({batch})")
        return rows
    if not dataclasses.is_dataclass(result):
        raise TypeError(f"certify must return a dataclass result, got {type(result).__name__}")
    columns: dict[str, list] = {}
    for f in dataclasses.fields(result):
        if f.name in _COMMON_RESULT_FIELDS:
            continue
        value = getattr(result, f.name)
        if isinstance(value, torch.Tensor):
            if value.ndim == 0:
                columns[f.name] = [value.item()] * batch
            elif value.shape[0] == batch and value.ndim <= 2:
                columns[f.name] = value.detach().cpu().tolist()
        elif isinstance(value, (bool, int, float)):
            columns[f.name] = [value] * batch
    return [{name: column[b] for name, column in columns.items()} for b in range(batch)]


def _full_views(model: RobustPatchClassifier, guarantee: str = "prediction") -> int | None:
    """Views of a full evaluation of one image, when the defense states it (PatchCleanser: from its mask set;
    detection: the one-mask views and the unmasked image)."""
    if guarantee == "detection":
        mask_set = getattr(model, "mask_set", None)
        return len(mask_set) + 1 if mask_set is not None else 1
    full = getattr(model, "full_views", None)
    if isinstance(full, int) and not isinstance(full, bool):
        return full
    mask_set = getattr(model, "mask_set", None)
    if mask_set is not None:
        return len(mask_set) * (len(mask_set) + 1) // 2
    return None


def view_grid(model: RobustPatchClassifier, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Every view of one image, with no early exit: for pictures (`plots.plot_views`) and debugging.

    PatchCleanser (views of its `mask_set`) and PatchCURE (views of its `feature_mask_set`).

    Args:
        model: the defended model (PatchCleanser or PatchCURE).
        image: `(C, H, W)` image, normalised as the model expects.

    Returns:
        `(one_mask (K,), grid (K, K))`: the one-mask labels `P_i` and the symmetric two-mask
        labels `P_ij` (diagonal `P_ii = P_i`), on the CPU.

    Raises:
        TypeError: for a model of another defense.
        ValueError: for an image the model cannot take.
    """
    if getattr(model, "defense", None) not in ("patchcleanser", "patchcure"):
        raise TypeError(
            "view_grid draws the two-mask grid of PatchCleanser or PatchCURE; "
            f"model is a {getattr(model, 'defense', type(model).__name__)!r} model"
        )
    if not isinstance(image, torch.Tensor) or image.ndim != 3:
        raise ValueError(f"image must be one (C, H, W) tensor, got {tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__}")
    # The label only decides `certified`, which is not returned: any class gives the full grid.
    grid = model.certify(image[None], torch.zeros(1, dtype=torch.long), early_exit=False).grid[0].cpu()
    return grid.diagonal().clone(), grid


def model_fingerprint(model: RobustPatchClassifier) -> str:
    """A hash of what decides the results: the base model's class and weights, and `model.settings()`.

    `settings()` holds every setting that defines the defended function (defense, threat model,
    fill, precision, margin and the defense's own), so results files of another model, another
    threat model or another precision are never mixed in. `batch_size` is not part of it: it
    changes speed, not results.

    Args:
        model: the defended model.

    Returns:
        32 hex digits (the first 128 bits of a SHA-256).
    """
    digest = hashlib.sha256()
    digest.update(type(model._inner_model).__qualname__.encode())
    for name, tensor in sorted(model._inner_model.state_dict().items()):
        tensor = tensor.detach()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    digest.update(json.dumps(model.settings(), sort_keys=True).encode())
    return digest.hexdigest()[:32]


def image_hash(image: torch.Tensor) -> str:
    """The content hash a record keeps of its image: SHA-256 of its shape and float32 values.

    The image is hashed as certified (after the data set's transform), in a canonical form:
    C-contiguous little-endian float32 on the CPU, after its shape, so the hash does not depend
    on the device, the memory layout or the dtype the loader produced (float16 and float64
    images hash as their float32 values).

    Args:
        image: one `(C, H, W)` image tensor.

    Returns:
        32 hex digits (the first 128 bits of the SHA-256).
    """
    values = image.detach().to("cpu", torch.float32).contiguous()
    digest = hashlib.sha256(repr(tuple(values.shape)).encode())
    digest.update(values.numpy().astype("<f4", copy=False).tobytes())
    return digest.hexdigest()[:32]


# --------------------------------------------------------------------------------------- data
def _dataset_and_loader_options(data, batch_size) -> tuple[Dataset, int, dict]:
    if isinstance(data, DataLoader):
        if isinstance(data.dataset, IterableDataset) or not isinstance(data.sampler, SequentialSampler) or data.batch_size is None:
            raise ValueError(
                "data must be a DataLoader with shuffle=False, a batch_size and a map-style dataset (or pass the Dataset itself): "
                "images are identified by their index, which must not change between runs"
            )
        if batch_size is None:
            batch_size = data.batch_size
        options = {
            "num_workers": data.num_workers,
            "collate_fn": data.collate_fn,
            "pin_memory": data.pin_memory,
            "worker_init_fn": data.worker_init_fn,
            "multiprocessing_context": data.multiprocessing_context,
        }
        return data.dataset, positive_int(batch_size, "batch_size"), options
    if isinstance(data, IterableDataset) or not isinstance(data, Dataset) or not hasattr(data, "__len__"):
        raise TypeError(f"data must be a map-style torch Dataset (with __len__) or a DataLoader, got {type(data).__name__}")
    return data, positive_int(DEFAULT_BATCH_SIZE if batch_size is None else batch_size, "batch_size"), {}


def _check_items(dataset: Dataset, loader_options: dict, index: int) -> None:
    """Refuse PIL images up front with a hint about the transform, instead of torch's collate error.

    Only with the default collate function: a custom `collate_fn` may turn PIL images into tensors.
    """
    if loader_options.get("collate_fn", default_collate) is not default_collate or len(dataset) == 0:
        return
    item = dataset[index]
    image = item[0] if isinstance(item, (tuple, list)) and item else item
    if type(image).__module__.split(".")[0] == "PIL":
        raise TypeError(
            f"data gives PIL images (item {index} is a {type(image).__name__}), but the model takes normalised image tensors: "
            "give the data set a transform, e.g. torchvision.transforms.Compose([Resize(...), CenterCrop(...), ToTensor(), "
            "Normalize(mean, std)]) with the size and mean/std the model was trained with (for a timm model: "
            "timm.data.create_transform(**timm.data.resolve_data_config({}, model=base_model)))"
        )


def _verify_kept(path: Path, dataset: Dataset, loader_options: dict, done: dict[int, ImageRecord], batch_size: int, rank: int, world: int, progress: bool) -> None:
    """Read every kept record's image and label again and compare them; raise on the first mismatch.

    Under `torch.distributed` each rank checks its share and all ranks raise the same error.
    """
    kept = sorted(done)[rank::world]
    mismatch = None
    if kept:
        chunks = [kept[s : s + batch_size] for s in range(0, len(kept), batch_size)]
        loader = DataLoader(dataset, batch_sampler=chunks, **loader_options)
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(kept), desc="verify kept results", unit="img", dynamic_ncols=True, leave=False)
        try:
            for chunk, (x, y) in zip(chunks, loader):
                if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
                    raise TypeError(f"data must give (image tensor, integer label) pairs; a batch collated to ({type(x).__name__}, {type(y).__name__})")
                for index, image, label in zip(chunk, x, y.tolist()):
                    mismatch = mismatch or _kept_mismatch(done[index], image, label)
                if bar is not None:
                    bar.update(len(chunk))
                if mismatch is not None:
                    break
        finally:
            if bar is not None:
                bar.close()
    if world > 1:
        found: list = [None] * world
        torch.distributed.all_gather_object(found, mismatch)
        mismatch = min((m for m in found if m is not None), default=None)
    if mismatch is not None:
        index, problem = mismatch
        raise ResultsFileError(path, problem, index=index)


def _kept_mismatch(record: ImageRecord, image: torch.Tensor, label) -> tuple[int, str] | None:
    """`(index, what differs)` when `record` was not certified on this image and label, else None."""
    index, now = record.index, image_hash(image)
    if record.image_hash != now:
        return index, (
            f"holds a record for image {index} of other content: hash {record.image_hash} in the results file, {now} for "
            f"image {index} of data now; the data set (its files, order or transform) changed since those results were written"
        )
    if record.label != label:
        return index, (
            f"holds a record for image {index} with label {record.label}, and data now gives image {index} label {label}; the "
            "labels (a target_transform, the class order of an image folder) changed since those results were written"
        )
    return None


def _describe_model(model: RobustPatchClassifier) -> str:
    cfg = getattr(model._inner_model, "pretrained_cfg", None)
    if isinstance(cfg, dict) and cfg.get("architecture"):
        return str(cfg["architecture"])
    return type(model._inner_model).__name__


def _describe_data(dataset: Dataset) -> str:
    """A data set's name (built-in data sets carry one), folder, or class name."""
    name = getattr(dataset, "name", None) or getattr(dataset, "root", None)
    return str(name) if name else type(dataset).__name__


# ----------------------------------------------------------------------------------- progress
class _Progress:
    """A tqdm bar over this process's images with the running clean and certified accuracy.

    It moves after every forward pass of the base model (`robustwrap.views.observe_forward` counts
    the views, so the model keeps running through its inference copy): within
    a step, an image counts as done in proportion to the views run so far over the views a step
    needs on average (the mean views per image of the records seen, resumed ones included, else
    the defense's full evaluation), capped below the step's end so the bar never runs ahead; the
    step's records then set it exactly.
    """

    def __init__(self, enabled: bool, total: int, done, full_views: int | None) -> None:
        done = list(done)
        self.seen = len(done)
        self.correct = sum(r.correct for r in done)
        self.certified = sum(r.certified for r in done)
        self.views = sum(r.num_views for r in done)
        self.full_views = full_views
        self.step_images = self.step_new = 0
        self.step_views = 0
        self.shown = 0.0  # fraction of the current step already shown on the bar, in images
        self.counting = False
        self.images = 0  # this run's images finished, as shown on the bar at the end of a step
        self.bar = None
        if enabled:
            self.bar = _bar_class()(total=total, desc="certify", unit="img", dynamic_ncols=True, bar_format=_BAR_FORMAT)
            if done:
                self.bar.set_postfix_str(self._postfix() + f" (resumed {len(done)})")

    def _postfix(self) -> str:
        if not self.seen:
            return "first step"
        return f"clean {100 * self.correct / self.seen:.1f}% certified {100 * self.certified / self.seen:.1f}%"

    @contextlib.contextmanager
    def counting_views(self) -> Iterator[None]:
        """Count the views of every forward pass of the base model while certifying (only with a bar)."""
        if self.bar is None:
            yield
            return
        with observe_forward(self._on_forward):
            yield

    def _on_forward(self, views: int) -> None:
        if not self.counting:
            return
        self.step_views += views
        per_image = self.views / self.seen if self.seen else self.full_views
        step = 0.0
        if per_image:
            target = min(0.95, self.step_views / (per_image * self.step_images)) * self.step_new
            step, self.shown = max(0.0, target - self.shown), max(target, self.shown)
        self.bar.set_postfix_str(self._postfix() + f", views {self.step_views} this step", refresh=False)
        self.bar.update(step)  # one update per forward pass; tqdm redraws at most every `mininterval` seconds

    def start_step(self, images: int, new: int) -> None:
        self.step_images, self.step_new, self.step_views, self.shown = images, new, 0, 0.0
        self.counting = True

    def add(self, record: ImageRecord) -> None:
        self.seen += 1
        self.correct += record.correct
        self.certified += record.certified
        self.views += record.num_views

    def end_step(self) -> None:
        self.counting = False
        self.images += self.step_new
        if self.bar is not None:
            self.bar.set_postfix_str(self._postfix(), refresh=False)
            self.bar.update(self.images - self.bar.n)
            self.bar.n = self.images  # exact, whatever the fractions of the step added up to
        self.shown = 0.0

    def close(self) -> None:
        if self.bar is not None:
            self.bar.refresh()
            self.bar.close()


_BAR_FORMAT = "{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}{postfix}]"


@functools.cache
def _bar_class():
    """tqdm (the notebook one in notebooks) whose count is of whole images, with one decimal on a terminal.

    On a terminal the bar is redrawn in place and `3.4/100` shows a step under way; written to a
    log or a pipe every redraw is kept, and a count is a number of finished images.
    """
    from tqdm.auto import tqdm

    class Bar(tqdm):
        @property
        def format_dict(self):
            d = super().format_dict
            n = d["n"]
            d["n_fmt"] = f"{n:.1f}" if _is_terminal(self.fp) and not float(n).is_integer() else str(int(n))
            return d

    return Bar


def _is_terminal(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):  # no isatty, or a closed file
        return False


@contextlib.contextmanager
def _paused(bar: _Progress | None) -> Iterator[None]:
    """Stop counting views (the vanilla pass runs the base model but is not a view)."""
    if bar is None:
        yield
        return
    counting, bar.counting = bar.counting, False
    try:
        yield
    finally:
        bar.counting = counting


# ------------------------------------------------------------------------------------ results
class ResultsFileError(ValueError):
    """A results file that this run cannot continue; resuming from it would mix two runs into one report.

    The message speaks Python (`results_path`, `resume=False`); a front end such as the
    `robustwrap` command builds its own from the fields with `message`.

    Attributes:
        path: the results file.
        problem: what is wrong with it, as a clause that follows the file's name and names no
            argument ("holds results of another model or threat model (patch 3x3 there, 2x2 now)").
        index: the image a kept record disagrees about (other image content or label), else None.
        line: the damaged line's number (the header is line 1), else None.
    """

    def __init__(self, path: Path, problem: str, *, index: int | None = None, line: int | None = None) -> None:
        self.path, self.problem, self.index, self.line = path, problem, index, line
        super().__init__(self.message("results_path", "use another results file, or resume=False to overwrite it"))

    def __reduce__(self):  # pickled with its fields (across processes), not rebuilt from the message
        return type(self), (self.path, self.problem), {"index": self.index, "line": self.line}

    def message(self, name: str, remedy: str) -> str:
        """The error in a caller's words: `"<name> <path> <problem>; <remedy>"`.

        Args:
            name: what the caller calls the results file (`results_path`, `--results`).
            remedy: what the caller can do about it.

        Returns:
            One line.
        """
        return f"{name} {self.path} {self.problem}; {remedy}"


class _ResultsStore:
    """The JSON-lines results of one run: a header line, then one record per line.

    One process writes `path`; under `torch.distributed` rank `r` writes `path.rank<r>`. Reading
    takes all of them, so a run may be resumed with another number of processes.
    """

    def __init__(self, path: Path, fingerprint: str, dataset_size: int, settings: dict):
        self.path = path
        self.header = {
            "format": RESULTS_FORMAT,
            "version": RESULTS_VERSION,
            "fingerprint": fingerprint,
            "dataset_size": dataset_size,
            "image_hash": HASH_SCHEME,
            "settings": json.loads(json.dumps(settings)),
        }

    def files(self) -> list[Path]:
        parts = sorted(self.path.parent.glob(self.path.name + ".rank*")) if self.path.parent.is_dir() else []
        return ([self.path] if self.path.exists() else []) + parts

    def clear(self) -> None:
        for file in self.files():
            file.unlink()

    def read(self) -> tuple[dict[int, ImageRecord], list[str]]:
        """`(records by index, one sentence per file whose last line was cut off mid-write)`."""
        records: dict[int, ImageRecord] = {}
        torn = []
        for file in self.files():
            kept, end, cut = self._read_file(file)
            for record in kept:
                records.setdefault(record.index, record)
            if cut:
                torn.append(_torn_line(file, cut, number=len(kept) + 2 if end else 1))
        return records, torn

    def _read_file(self, file: Path) -> tuple[list[ImageRecord], int, bytes]:
        """`(records, byte length of the complete lines, the cut-off last line)` of `file`.

        Each line is written with its newline in one flushed write, so a kill mid-write leaves
        a last line without its newline; that line is dropped (its image is certified again).
        Any other line that does not read back is damage of another kind, and refused.
        """
        data = file.read_bytes()
        end = data.rfind(b"\n") + 1
        lines, cut = data[:end].splitlines(), data[end:]
        if not lines:
            start = json.dumps({"format": RESULTS_FORMAT})[:-1].encode()  # how every header line starts
            if cut and not (cut.startswith(start) or start.startswith(cut)):
                raise ResultsFileError(file, "is not a robustwrap results file (it is one line that is not a robustwrap results header)")
            return [], 0, cut
        try:
            header = json.loads(lines[0])
        except ValueError:  # JSONDecodeError, UnicodeDecodeError
            header = None
        if not isinstance(header, dict) or header.get("format") != RESULTS_FORMAT:
            raise ResultsFileError(file, "is not a robustwrap results file (its first line is not a robustwrap results header)")
        if header.get("version") != RESULTS_VERSION or header.get("image_hash") != HASH_SCHEME:
            raise ResultsFileError(
                file, f"was written by another robustwrap version (results format {header.get('version')!r}; this one reads {RESULTS_VERSION}, with image hashes)"
            )
        if header.get("fingerprint") != self.header["fingerprint"]:
            raise ResultsFileError(file, f"holds results of another model or threat model ({_difference(header, self.header)})")
        if header.get("dataset_size") != self.header["dataset_size"]:
            raise ResultsFileError(
                file, f"was written for a data set of {header.get('dataset_size')} images; this one has {self.header['dataset_size']}"
            )
        records = []
        for number, line in enumerate(lines[1:], start=2):
            try:
                records.append(_record(line))
            except ValueError as error:
                raise ResultsFileError(
                    file, f"has a damaged line {number} ({error}); an interruption cuts off only the last line, so something else changed the file", line=number
                ) from None
        return records, end, cut

    @contextlib.contextmanager
    def writer(self, rank: int, world: int) -> Iterator[_Writer]:
        file = self.path if world == 1 else self.path.with_name(f"{self.path.name}.rank{rank}")
        file.parent.mkdir(parents=True, exist_ok=True)
        end = self._read_file(file)[1] if file.exists() else 0
        with open(file, "ab") as handle:
            handle.truncate(end)
            handle.seek(end)
            writer = _Writer(handle)
            if end == 0:
                writer.write_json(self.header)
            yield writer


def _torn_line(file: Path, cut: bytes, number: int) -> str:
    """The warning for a last line cut off mid-write: which file, line and (when it got that far) image."""
    if number == 1:
        return f"results file {file}: its header line was cut off mid-write by an interruption; it is written again"
    index = re.match(rb'\{"index": (\d+),', cut)
    image = f"image {int(index[1])}" if index else "its image"
    where = f"line {number}, the record of image {int(index[1])}" if index else f"line {number}"
    return f"results file {file}: its last line ({where}) was cut off mid-write by an interruption; it is dropped and {image} is certified again"


def _record(line: bytes) -> ImageRecord:
    try:
        value = json.loads(line)
    except ValueError:  # JSONDecodeError, UnicodeDecodeError
        raise ValueError("not valid JSON") from None
    record = ImageRecord.from_dict(value)
    if not record.image_hash:
        raise ValueError("the record has no image_hash")
    return record


_ABSENT = object()
_SHOWN = 3  # differing settings shown with their values; the others are named


def _difference(written: dict, now: dict) -> str:
    """Why two results headers' fingerprints differ, briefly: one clause per differing setting.

    `"patch 3x3 there, 2x2 now; mask_set (mask_size 7x7 there, 6x6 now; also boxes)"`: a nested
    setting (a mask set) gets one clause that shows a few of its differing keys and names the rest.
    """
    there, here = written.get("settings"), now["settings"]
    if not isinstance(there, dict):
        return "its settings are not recorded"
    keys = [k for k in dict.fromkeys([*here, *there]) if there.get(k, _ABSENT) != here.get(k, _ABSENT)]
    keys.sort(key=lambda k: isinstance(here.get(k), dict))  # "patch" before the mask set it implies
    clauses = [
        f"{k} ({_nested_difference(there[k], here[k])})" if isinstance(there.get(k), dict) and isinstance(here.get(k), dict) else _change(k, there, here)
        for k in keys
    ]
    if not clauses:
        return f"same settings, other base model weights or class: fingerprint {written.get('fingerprint')} there, {now['fingerprint']} now"
    return "; ".join(clauses[:_SHOWN] + ([f"also {', '.join(keys[_SHOWN:])}"] if keys[_SHOWN:] else []))


def _nested_difference(there: dict, here: dict) -> str:
    keys = [k for k in dict.fromkeys([*here, *there]) if there.get(k, _ABSENT) != here.get(k, _ABSENT)]
    # Values that read as a change ("7x7 there, 6x6 now"), not lists only counted ("9 entries").
    shown = [k for k in keys if _readable(there.get(k, _ABSENT), here.get(k, _ABSENT))][:_SHOWN] or keys[:1]
    named = [k for k in keys if k not in shown]
    return "; ".join([_change(k, there, here) for k in shown] + ([f"also {', '.join(named)}"] if named else []))


def _change(key: str, there: dict, here: dict) -> str:
    return f"{key} {_brief(there.get(key, _ABSENT))} there, {_brief(here.get(key, _ABSENT))} now"


def _readable(there, here) -> bool:
    a, b = _brief(there), _brief(here)
    return a != b and not (a.endswith(" entries") or b.endswith(" entries"))


def _brief(value) -> str:
    """A setting's value in a few characters: `5x5` for a pair, `[3x3, 5x5]`, a count for long lists."""
    if value is _ABSENT:
        return "not set"
    if _is_pair(value):
        return f"{value[0]}x{value[1]}"
    if isinstance(value, list) and len(value) <= 3 and all(_is_pair(v) for v in value):
        return "[" + ", ".join(_brief(v) for v in value) + "]"
    if isinstance(value, list):
        return f"{len(value)} entries"
    text = str(value)
    return text if len(text) <= 24 else text[:21] + "..."


def _is_pair(value) -> bool:
    return isinstance(value, list) and len(value) == 2 and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)


class _Writer:
    def __init__(self, handle) -> None:
        self.handle = handle

    def write_json(self, obj) -> None:
        # One write per line, flushed at once: a kill can only tear the line being written.
        self.handle.write((json.dumps(obj) + "\n").encode())
        self.handle.flush()

    def write(self, record: ImageRecord) -> None:
        self.write_json(record.to_dict())
