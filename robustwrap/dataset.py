"""`certify_dataset`: certify a whole data set, resumably, in one process or many.

The data set is cut into fixed steps of `batch_size` consecutive images (`0..b-1`, `b..2b-1`, ...)
that do not depend on what was already done or on how many processes share the work. Each step
is one `RobustPatchClassifier.certify` call, so an image's record (its views count included)
comes out the same in a straight run, a resumed run and a many-process run:

- resume: a step with any image missing from the results file is certified again and only the
  missing records are written; finished steps are not loaded at all;
- `torch.distributed`: rank `r` takes the unfinished steps `r, r + W, r + 2W, ...`, writes its own
  results file (`<results>.rank<r>`), and the records of all ranks are gathered into one report.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, SequentialSampler

from ._args import DefaultInt, is_default, positive_int
from .defenses.patchcleanser import RobustPatchClassifier
from .views import eval_mode, model_device_dtype
from .report import CertificationReport, ImageRecord

__all__ = ["certify_dataset", "model_fingerprint", "view_grid"]

DEFAULT_BATCH_SIZE = DefaultInt(32)
RESULTS_FORMAT = "robustwrap.results"
RESULTS_VERSION = 1


def certify_dataset(
    model: RobustPatchClassifier,
    data: Dataset | DataLoader,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    limit: int | None = None,
    results_path: str | Path | None = None,
    resume: bool = True,
    progress: bool = True,
    device: str | torch.device | None = None,
    amp: bool = False,
) -> CertificationReport:
    """Certify every image of a data set; return clean, certified and vanilla accuracy and records.

    ```python
    report = robustwrap.certify_dataset(model, val_dataset, results_path="val.jsonl")
    print(report.summary())
    ```

    Args:
        model: the defended model.
        data: a map-style `Dataset` of `(image, label)`, or a `DataLoader` over one without
            shuffling (its `batch_size`, workers and `collate_fn` are kept). Images must be
            tensors, normalised as the model expects.
        batch_size: images per `certify` call (default 32, or the DataLoader's). The masked
            views of these images share forward passes of `model.batch_size` views.
        limit: certify only the first `limit` images.
        results_path: a JSON-lines file that gets one record per image, flushed as it is
            written, after a header line that fingerprints the model and threat model.
        resume: continue the results file: finished images are skipped, a torn last line is
            dropped, and the report equals an uninterrupted run's (with the same `batch_size`:
            how many views an image needs can depend on the images that share its step).
            With `resume=False` an existing results file is overwritten.
        progress: show a tqdm bar with the running clean and certified accuracy.
        device: move the model to this device first (`model.to(device)`); by default it runs
            where its parameters are.
        amp: run the model under `torch.autocast` (float16 on CUDA, bfloat16 on CPU). Labels
            can differ from float32 near ties, so this is part of the results fingerprint.

    Returns:
        The `CertificationReport`, records sorted by index. Under `torch.distributed` every
        rank returns the same merged report, equal to a single-process run's (with NCCL, call
        `torch.cuda.set_device(local_rank)` first: the records are gathered as objects).

    Raises:
        TypeError: for a `model` that is not a `RobustPatchClassifier`, or `data` that is not a
            Dataset or DataLoader.
        ValueError: for an empty data set, a bad `batch_size` or `limit`, a DataLoader that
            shuffles or has no fixed batch size (an image's index must be stable for resume and
            sharding), or a results file written for another model, threat model or data set
            (mixing it in would report numbers that belong to neither).
    """
    if not isinstance(model, RobustPatchClassifier):
        raise TypeError(f"model must be a robustwrap.RobustPatchClassifier (see robustwrap.wrap), got {type(model).__name__}")
    dataset, batch_size, loader_options = _dataset_and_loader_options(data, batch_size)
    size = len(dataset)
    n = size if limit is None else min(size, positive_int(limit, "limit"))
    if n == 0:
        raise ValueError("data is empty: there are no images to certify")
    rank, world = _distributed()
    if device is not None:
        model.to(device)
    device_, _ = model_device_dtype(model.model)
    fingerprint = model_fingerprint(model, amp=amp)

    store = None
    done: dict[int, ImageRecord] = {}
    if results_path is not None:
        store = _ResultsStore(Path(results_path), fingerprint, size, model, amp)
        if not resume and rank == 0:
            store.clear()
        _barrier(world)
        done = {i: r for i, r in store.read().items() if i < n}
        # Every rank must read the files before any rank appends to them, or ranks would
        # disagree about which steps are left and certify some twice.
        _barrier(world)

    steps = [list(range(s, min(s + batch_size, n))) for s in range(0, n, batch_size)]
    mine = [step for step in steps if any(i not in done for i in step)][rank::world]
    loader = DataLoader(dataset, batch_sampler=mine, **loader_options)

    new: list[ImageRecord] = []
    bar = _Progress(progress and rank == 0, total=sum(i not in done for step in mine for i in step), done=done.values())
    writer = store.writer(rank, world) if store is not None else contextlib.nullcontext()
    with writer as out, eval_mode(model.model), _autocast(device_, amp), contextlib.closing(bar):
        start = time.perf_counter()
        for step, (x, y) in zip(mine, loader):
            records = _certify_step(model, x, y, step)
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
        mask_set=model.mask_set,
        fill=model.fill,
        num_classes=model.num_classes,
        records=tuple(records[i] for i in range(n)),
        amp=bool(amp),
        fingerprint=fingerprint,
    )


def _certify_step(model: RobustPatchClassifier, x, y, indices: list[int]) -> list[ImageRecord]:
    if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
        raise TypeError(f"data must give (image tensor, integer label) pairs; a batch collated to ({type(x).__name__}, {type(y).__name__})")
    if x.shape[0] != len(indices):
        raise ValueError(f"a batch of {len(indices)} images collated to {x.shape[0]}; data must give one (image, label) per index")
    result = model.certify(x, y)
    with torch.inference_mode():
        vanilla = model.model(model.engine.prepare(x)).argmax(1)
    rows = zip(
        indices,
        y.tolist(),
        result.prediction.tolist(),
        result.certified.tolist(),
        result.case.tolist(),
        vanilla.tolist(),
        result.num_views.tolist(),
        result.one_mask.tolist(),
    )
    return [ImageRecord(i, label, p, cert, case, v, views, tuple(one)) for i, label, p, cert, case, v, views, one in rows]


def view_grid(model: RobustPatchClassifier, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Every view of one image, with no early exit: for pictures (`report.plot_views`) and debugging.

    Args:
        model: the defended model.
        image: `(C, H, W)` image, normalised as the model expects.

    Returns:
        `(one_mask (K,), grid (K, K))`: the one-mask labels `P_i` and the symmetric two-mask
        labels `P_ij` (diagonal `P_ii = P_i`), on the CPU.

    Raises:
        TypeError, ValueError: for an image the model cannot take.
    """
    if not isinstance(image, torch.Tensor) or image.ndim != 3:
        raise ValueError(f"image must be one (C, H, W) tensor, got {tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__}")
    # The label only decides `certified`, which is not returned: any class gives the full grid.
    grid = model.certify(image[None], torch.zeros(1, dtype=torch.long), early_exit=False).grid[0].cpu()
    return grid.diagonal().clone(), grid


def model_fingerprint(model: RobustPatchClassifier, *, amp: bool = False) -> str:
    """A hash of what decides the results: the base model's class and weights, the mask set, the fill and `amp`.

    Results files carry it so that results of another model or threat model are never mixed in.
    """
    digest = hashlib.sha256()
    digest.update(type(model.model).__qualname__.encode())
    for name, tensor in sorted(model.model.state_dict().items()):
        tensor = tensor.detach()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    settings = {"mask_set": model.mask_set.to_dict(), "fill": model.fill, "amp": bool(amp)}
    digest.update(json.dumps(settings, sort_keys=True).encode())
    return digest.hexdigest()[:32]


# --------------------------------------------------------------------------------------- data
def _dataset_and_loader_options(data, batch_size) -> tuple[Dataset, int, dict]:
    if isinstance(data, DataLoader):
        if isinstance(data.dataset, IterableDataset) or not isinstance(data.sampler, SequentialSampler) or data.batch_size is None:
            raise ValueError(
                "data must be a DataLoader with shuffle=False, a batch_size and a map-style dataset (or pass the Dataset itself): "
                "images are identified by their index, which must not change between runs"
            )
        if is_default(batch_size):
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
    return data, positive_int(batch_size, "batch_size"), {}


def _describe_model(model: RobustPatchClassifier) -> str:
    cfg = getattr(model.model, "pretrained_cfg", None)
    if isinstance(cfg, dict) and cfg.get("architecture"):
        return str(cfg["architecture"])
    return type(model.model).__name__


def _describe_data(dataset: Dataset) -> str:
    """A data set's name (built-in data sets carry one), folder, or class name."""
    name = getattr(dataset, "name", None) or getattr(dataset, "root", None)
    return str(name) if name else type(dataset).__name__


# --------------------------------------------------------------------------------- processes
def _distributed() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _barrier(world: int) -> None:
    if world > 1:
        torch.distributed.barrier()


def _autocast(device: torch.device, amp: bool):
    if not amp:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.float16 if device.type == "cuda" else torch.bfloat16)


# ----------------------------------------------------------------------------------- progress
class _Progress:
    """A tqdm bar over this process's images with the running clean and certified accuracy."""

    def __init__(self, enabled: bool, total: int, done) -> None:
        done = list(done)
        self.seen = len(done)
        self.correct = sum(r.correct for r in done)
        self.certified = sum(r.certified for r in done)
        self.bar = None
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc="certify", unit="img", dynamic_ncols=True)
            if done:
                self.bar.set_postfix_str(self._postfix() + f" (resumed {len(done)})")

    def _postfix(self) -> str:
        return f"clean {100 * self.correct / self.seen:.1f}% certified {100 * self.certified / self.seen:.1f}%"

    def add(self, record: ImageRecord) -> None:
        self.seen += 1
        self.correct += record.correct
        self.certified += record.certified
        if self.bar is not None:
            self.bar.set_postfix_str(self._postfix(), refresh=False)
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ------------------------------------------------------------------------------------ results
class _ResultsStore:
    """The JSON-lines results of one run: a header line, then one record per line.

    One process writes `path`; under `torch.distributed` rank `r` writes `path.rank<r>`. Reading
    takes all of them, so a run may be resumed with another number of processes.
    """

    def __init__(self, path: Path, fingerprint: str, dataset_size: int, model: RobustPatchClassifier, amp: bool):
        self.path = path
        self.header = {
            "format": RESULTS_FORMAT,
            "version": RESULTS_VERSION,
            "fingerprint": fingerprint,
            "dataset_size": dataset_size,
            "threat_model": model.mask_set.describe(),
            "fill": model.fill,
            "amp": bool(amp),
        }

    def files(self) -> list[Path]:
        parts = sorted(self.path.parent.glob(self.path.name + ".rank*")) if self.path.parent.is_dir() else []
        return ([self.path] if self.path.exists() else []) + parts

    def clear(self) -> None:
        for file in self.files():
            file.unlink()

    def read(self) -> dict[int, ImageRecord]:
        records: dict[int, ImageRecord] = {}
        for file in self.files():
            for record in self._read_file(file)[0]:
                records.setdefault(record.index, record)
        return records

    def _read_file(self, file: Path) -> tuple[list[ImageRecord], int]:
        """The records of `file` and the byte length of its complete lines (a torn tail excluded)."""
        data = file.read_bytes()
        end = data.rfind(b"\n") + 1  # a last line without its newline was torn by a kill: drop it
        lines = data[:end].splitlines()
        if not lines:
            return [], 0
        header = self._parse(file, 1, lines[0])
        if not isinstance(header, dict) or header.get("format") != RESULTS_FORMAT:
            raise ValueError(f"results_path {file} is not a robustwrap results file (its first line is not a robustwrap results header)")
        if header.get("fingerprint") != self.header["fingerprint"] or header.get("amp") != self.header["amp"]:
            raise ValueError(
                f"results_path {file} holds results of another model or threat model "
                f"(written for {header.get('threat_model')!r}, fill {header.get('fill')!r}, amp {header.get('amp')!r}, fingerprint {header.get('fingerprint')}; "
                f"this run is {self.header['threat_model']!r}, fill {self.header['fill']!r}, amp {self.header['amp']!r}, fingerprint {self.header['fingerprint']}); "
                "use another results file, or resume=False to overwrite it"
            )
        if header.get("dataset_size") != self.header["dataset_size"]:
            raise ValueError(
                f"results_path {file} was written for a data set of {header.get('dataset_size')} images, this one has "
                f"{self.header['dataset_size']}; use another results file, or resume=False to overwrite it"
            )
        records = []
        for number, line in enumerate(lines[1:], start=2):
            try:
                records.append(ImageRecord.from_dict(self._parse(file, number, line)))
            except ValueError as error:
                raise ValueError(f"results_path {file} line {number} is damaged: {error}") from None
        return records, end

    @staticmethod
    def _parse(file: Path, number: int, line: bytes):
        try:
            return json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ValueError(f"results_path {file} line {number} is not valid JSON; the file is damaged") from None

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


class _Writer:
    def __init__(self, handle) -> None:
        self.handle = handle

    def write_json(self, obj) -> None:
        # One write per line, flushed at once: a kill can only tear the line being written.
        self.handle.write((json.dumps(obj) + "\n").encode())
        self.handle.flush()

    def write(self, record: ImageRecord) -> None:
        self.write_json(record.to_dict())

