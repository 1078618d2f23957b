"""certify_dataset: exact counts, precision, progress, resume after a kill, refusal of foreign results, images or labels, two processes."""

from __future__ import annotations

import dataclasses
import io
import json
import pickle
import re
import signal
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import PeakNet, ViewCounter, brute_force_grid
from torch.utils.data import DataLoader, TensorDataset

import robustwrap
from robustwrap.dataset import ResultsFileError, _record_fields, certify_dataset, image_hash, model_fingerprint, view_grid
from robustwrap.report import CertificationReport

TESTS = Path(__file__).resolve().parent
N = 30


def make_model(seed: int = 0, **kwargs) -> robustwrap.RobustPatchClassifier:
    kwargs = {"patch": 3, "num_masks": 3, "image_size": 16, "batch_size": 13, **kwargs}
    return robustwrap.wrap(PeakNet(seed=seed), **kwargs).eval()


def make_data(n: int = N) -> TensorDataset:
    """Random images labelled mostly as the base model sees them, so every outcome occurs."""
    x = torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        y = PeakNet(seed=0)(x).argmax(1)
    y[::3] = (y[::3] + 1) % 4
    return TensorDataset(x, y)


def straight(batch_size: int = 4, n: int = N) -> CertificationReport:
    return certify_dataset(make_model(), make_data(n), batch_size=batch_size, progress=False)


def record_lines(path: Path) -> list[dict]:
    """The records of a results file: its complete lines after the header (a torn tail left out)."""
    return [json.loads(line) for line in path.read_text().split("\n")[1:-1]]


# ------------------------------------------------------------------------------------- counts
def test_report_matches_certify_and_base_model_exactly():
    model, data = make_model(), make_data()
    report = certify_dataset(model, data, batch_size=4, progress=False)
    x, y = data.tensors
    assert [r.index for r in report.records] == list(range(N))
    for start in range(0, N, 4):  # each step is one certify call: same results, same views
        expected = model.certify(x[start : start + 4], y[start : start + 4])
        got = report.records[start : start + 4]
        assert [r.prediction for r in got] == expected.prediction.tolist()
        assert [r.certified for r in got] == expected.certified.tolist()
        assert [r.case for r in got] == expected.case.tolist()
        assert [r.num_views for r in got] == expected.num_views.tolist()
        assert [list(r.one_mask) for r in got] == expected.one_mask.tolist()
    vanilla = model.model(x).argmax(1)
    assert [r.vanilla_prediction for r in report.records] == vanilla.tolist()
    assert report.vanilla_correct == int((vanilla == y).sum())
    full = model.certify(x, y)
    assert report.certified == int(full.certified.sum()) > 0
    assert report.clean_correct == int((full.prediction == y).sum())
    assert report.case_counts == {c: int((full.case == c).sum()) for c in (1, 2, 3)}
    assert all(report.case_counts.values())  # the data exercises every case
    assert report.full_views == 9 * 10 // 2
    assert report.num_classes == 4 and report.mask_set == model.mask_set
    assert report.fingerprint == model_fingerprint(model)


def test_dataloader_batch_size_and_limit():
    data = make_data()
    by_loader = certify_dataset(make_model(), DataLoader(data, batch_size=5), progress=False)
    assert by_loader == certify_dataset(make_model(), data, batch_size=5, progress=False)
    limited = certify_dataset(make_model(), data, batch_size=5, limit=10, progress=False)
    assert limited.records == by_loader.records[:10]
    cut = certify_dataset(make_model(), data, batch_size=5, limit=7, progress=False)
    # Images 5 and 6 form a shorter step: same results, only the views count may differ.
    assert [dataclasses.replace(r, num_views=0) for r in cut.records] == [dataclasses.replace(r, num_views=0) for r in by_loader.records[:7]]


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"data": DataLoader(make_data(), batch_size=4, shuffle=True)}, ValueError, "shuffle=False"),
        ({"data": [1, 2, 3]}, TypeError, "Dataset"),
        ({"data": make_data(0)}, ValueError, "empty"),
        ({"limit": 0}, ValueError, "limit"),
        ({"batch_size": 0}, ValueError, "batch_size"),
        ({"model": PeakNet()}, TypeError, "RobustPatchClassifier"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    arguments = {"model": make_model(), "data": make_data(), **kwargs}
    with pytest.raises(error, match=match):
        certify_dataset(arguments.pop("model"), arguments.pop("data"), progress=False, **arguments)


def test_progress_bar_shows_running_accuracy(capsys):
    certify_dataset(make_model(), make_data(8), batch_size=4, progress=True)
    err = capsys.readouterr().err
    assert "8/8" in err and "clean" in err and "certified" in err


def test_amp_is_refused_with_a_pointer_to_precision():
    with pytest.raises(TypeError, match=r"no longer takes amp=.*wrap\(\.\.\., precision='bfloat16'\)"):
        certify_dataset(make_model(), make_data(8), amp=True, progress=False)


def test_certification_runs_at_the_models_precision_which_is_in_the_fingerprint(tmp_path):
    model, data = make_model(precision="bfloat16"), make_data(8)
    report = certify_dataset(model, data, batch_size=4, progress=False, results_path=tmp_path / "r.jsonl")
    x, y = data.tensors
    for start in (0, 4):  # the same computation as the model's own certify, at its precision
        expected = model.certify(x[start : start + 4], y[start : start + 4])
        assert [r.prediction for r in report.records[start : start + 4]] == expected.prediction.tolist()
        assert [r.num_views for r in report.records[start : start + 4]] == expected.num_views.tolist()
    with torch.no_grad(), model.autocast():
        assert [r.vanilla_prediction for r in report.records] == model.model(x).argmax(1).tolist()
    assert report.precision == "bfloat16" and report.settings == json.loads(json.dumps(model.settings()))
    assert report.fingerprint == model_fingerprint(model) != model_fingerprint(make_model())
    with pytest.raises(ValueError, match=r"another model or threat model \(precision bfloat16 there, float32 now\); use another"):
        certify_dataset(make_model(), data, batch_size=4, progress=False, results_path=tmp_path / "r.jsonl")


def test_fingerprint_is_settings_and_weights_only():
    model = make_model()
    assert model_fingerprint(model) == model_fingerprint(make_model(batch_size=7))  # speed only
    assert model_fingerprint(model) != model_fingerprint(make_model(margin=0.5))
    assert model_fingerprint(model) != model_fingerprint(make_model(seed=1))
    # the same weights in a class with another forward are another function
    assert model_fingerprint(model) != model_fingerprint(robustwrap.wrap(_MeanNet(seed=0), patch=3, num_masks=3, image_size=16).eval())


class _MeanNet(PeakNet):
    """PeakNet's weights (same keys and values), spatial mean instead of max."""

    def forward(self, x):
        return self.conv(x).mean(dim=(2, 3))


def test_view_grid_is_the_full_brute_force_grid():
    model = make_model()
    x = make_data(3).tensors[0]
    for b in range(3):
        one_mask, grid = view_grid(model, x[b])
        expected = brute_force_grid(model.model, x[b : b + 1], model.mask_set.boxes)[0]
        assert torch.equal(grid, expected)
        assert torch.equal(one_mask, expected.diagonal())


# ------------------------------------------------------------------------------------- resume
def test_results_file_has_a_header_and_one_line_per_image(tmp_path):
    path = tmp_path / "results.jsonl"
    report = certify_dataset(make_model(), make_data(), batch_size=4, results_path=path, progress=False)
    header = json.loads(path.read_text().splitlines()[0])
    assert header["format"] == "robustwrap.results" and header["fingerprint"] == report.fingerprint
    assert [r["index"] for r in record_lines(path)] == list(range(N))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a complete file is resumed without a word
        again = certify_dataset(make_model(), make_data(), batch_size=4, results_path=path, progress=False)
    assert again == report and len(record_lines(path)) == N  # nothing recomputed, nothing appended


def test_resume_after_torn_line_and_half_finished_step(tmp_path):
    path = tmp_path / "results.jsonl"
    certify_dataset(make_model(), make_data(), batch_size=4, results_path=path, progress=False)
    lines = path.read_text().splitlines(keepends=True)
    # Header, images 0-5 (step 1 done, step 2 half done) and half of image 6's line: a kill mid-write.
    path.write_text("".join(lines[:7]) + lines[7][:25])
    model = make_model()
    assert model.num_classes == 4  # found by a blank forward pass, before counting
    counter = ViewCounter(model.model)
    cut = rf"results file {re.escape(str(path))}: its last line \(line 8, the record of image 6\) was cut off mid-write by an interruption; it is dropped and image 6 is certified again$"
    with pytest.warns(UserWarning, match=cut) as caught:
        resumed = certify_dataset(model, make_data(), batch_size=4, results_path=path, progress=False)
    assert len(caught) == 1 and caught[0].filename == __file__  # said once, at the caller's line
    assert resumed == straight()
    indices = [r["index"] for r in record_lines(path)]
    assert sorted(indices) == list(range(N)) and len(indices) == N  # nothing lost, nothing twice
    # Step 0-3 was not touched; steps 4-7 onward were certified again (views + one vanilla pass each).
    redone = [r for r in resumed.records if r.index >= 4]
    assert counter.images == sum(r.num_views for r in redone) + len(redone)


def test_resume_after_kill_9_equals_straight_run(tmp_path):
    path = tmp_path / "results.jsonl"
    script = (
        "import sys, time\n"
        f"sys.path.insert(0, {str(TESTS)!r})\n"
        "from test_dataset import make_model, make_data\n"
        "from robustwrap.dataset import certify_dataset\n"
        "model = make_model()\n"
        "model.model.register_forward_hook(lambda *args: time.sleep(0.03))\n"
        "certify_dataset(model, make_data(), batch_size=4, results_path=sys.argv[1], progress=False)\n"
    )
    child = subprocess.Popen([sys.executable, "-c", script, str(path)])
    try:
        deadline = time.monotonic() + 120
        while not (path.exists() and path.read_text().count("\n") >= 6) and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        child.send_signal(signal.SIGKILL)
    finally:
        child.wait()
    assert child.returncode == -signal.SIGKILL, "the child finished before it could be killed"
    written = len(record_lines(path))
    assert 5 <= written < N
    resumed = certify_dataset(make_model(), make_data(), batch_size=4, results_path=path, progress=False)
    assert resumed == straight()
    assert sorted(r["index"] for r in record_lines(path)) == list(range(N))


def test_resume_false_overwrites(tmp_path):
    path = tmp_path / "results.jsonl"
    certify_dataset(make_model(), make_data(), batch_size=4, results_path=path, progress=False)
    again = certify_dataset(make_model(), make_data(8), batch_size=4, results_path=path, resume=False, progress=False)
    assert again.num_images == 8 and len(record_lines(path)) == 8


@pytest.mark.parametrize(
    ("other", "differ"),
    [
        (lambda: make_model(seed=1), r"same settings, other base model weights or class: fingerprint [0-9a-f]{32} there, [0-9a-f]{32} now"),
        (lambda: make_model(fill=0.5), r"fill 0.0 there, 0.5 now"),
        # a mask set is one clause: the keys that read as a change, then the others named
        (lambda: make_model(patch=2), r"patch 3x3 there, 2x2 now; mask_set \(patch_sizes \[3x3\] there, \[2x2\] now; mask_size 7x7 there, 6x6 now; also boxes\)"),
        (lambda: make_model(num_masks=4), r"mask_set \(mask_size 7x7 there, 6x6 now; stride 5x5 there, 4x4 now; grid 3x3 there, 4x4 now; also boxes, num_masks\)"),
        (lambda: make_model(patch=2, fill=1.0, margin=0.5, precision="bfloat16"), r"fill 0.0 there, 1.0 now; precision float32 there, bfloat16 now; margin 0.001 there, 0.5 now; also patch, mask_set"),
    ],
)
def test_results_of_another_model_or_threat_model_are_refused_naming_what_differs(tmp_path, other, differ):
    path = tmp_path / "results.jsonl"
    certify_dataset(make_model(), make_data(8), batch_size=4, results_path=path, progress=False)
    before = path.read_bytes()
    with pytest.raises(ResultsFileError) as error:
        certify_dataset(other(), make_data(8), batch_size=4, results_path=path, progress=False)
    assert re.fullmatch(rf"holds results of another model or threat model \({differ}\)", error.value.problem)
    assert str(error.value) == f"results_path {path} {error.value.problem}; use another results file, or resume=False to overwrite it"
    assert path.read_bytes() == before


def test_results_of_another_data_set_size_or_damaged_file_are_refused(tmp_path):
    path = tmp_path / "results.jsonl"
    certify_dataset(make_model(), make_data(8), batch_size=4, results_path=path, progress=False)
    with pytest.raises(ValueError, match="data set of 8 images"):
        certify_dataset(make_model(), make_data(9), batch_size=4, results_path=path, progress=False)
    lines = path.read_text().splitlines(keepends=True)
    damaged = "".join(lines[:3]) + "{not json\n" + "".join(lines[3:])
    path.write_text(damaged)
    with pytest.raises(ResultsFileError) as error:  # said once, not wrapped in its own prefix again
        certify_dataset(make_model(), make_data(8), batch_size=4, results_path=path, progress=False)
    assert str(error.value) == (
        f"results_path {path} has a damaged line 4 (not valid JSON); an interruption cuts off only the last line, so something "
        "else changed the file; use another results file, or resume=False to overwrite it"
    )
    assert error.value.line == 4 and error.value.path == path and path.read_text() == damaged
    # A last line that kept its newline was not cut off by a kill: damage as well.
    path.write_text("".join(lines[:-1]) + lines[-1][:20] + "\n")
    with pytest.raises(ResultsFileError, match="has a damaged line 9 \\(not valid JSON\\)"):
        certify_dataset(make_model(), make_data(8), batch_size=4, results_path=path, progress=False)
    other = tmp_path / "other.jsonl"
    other.write_text('{"hello": 1}\n')
    with pytest.raises(ValueError, match="not a robustwrap results file"):
        certify_dataset(make_model(), make_data(8), batch_size=4, results_path=other, progress=False)
    # One line without a newline is not taken for a header cut off mid-write: the file is left alone.
    other.write_text("my notes")
    with pytest.raises(ValueError, match="not a robustwrap results file"):
        certify_dataset(make_model(), make_data(8), batch_size=4, results_path=other, progress=False)
    assert other.read_text() == "my notes"


def test_a_line_cut_before_its_index_or_a_cut_header_is_dropped_and_redone(tmp_path):
    path = tmp_path / "results.jsonl"
    certify_dataset(make_model(), make_data(8), batch_size=4, results_path=path, progress=False)
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:6]) + lines[6][:5])
    with pytest.warns(UserWarning, match=r"its last line \(line 7\) was cut off mid-write by an interruption; it is dropped and its image is"):
        assert certify_dataset(make_model(), make_data(8), batch_size=4, results_path=path, progress=False) == straight(n=8)
    path.write_text(lines[0][:40])  # killed while writing the header: nothing was certified yet
    with pytest.warns(UserWarning, match=r"its header line was cut off mid-write by an interruption; it is written again"):
        assert certify_dataset(make_model(), make_data(8), batch_size=4, results_path=path, progress=False) == straight(n=8)
    assert path.read_text().splitlines(keepends=True)[0] == lines[0] and [r["index"] for r in record_lines(path)] == list(range(8))


def test_seconds_are_not_compared_but_kept():
    report = straight(n=8)
    slower = dataclasses.replace(report, records=tuple(dataclasses.replace(r, seconds=r.seconds + 1) for r in report.records))
    assert slower == report and slower.seconds == pytest.approx(report.seconds + 8)
    assert report.seconds > 0 and report.images_per_second > 0


# ----------------------------------------------------------------------------- image hashes
def test_records_carry_the_hash_of_the_image_as_certified():
    data = make_data(8)
    report = certify_dataset(make_model(), data, batch_size=4, progress=False)
    assert [r.image_hash for r in report.records] == [image_hash(x) for x in data.tensors[0]]
    assert len({r.image_hash for r in report.records}) == 8
    image = data.tensors[0][0]
    # Canonical: the same values hash the same in another dtype or memory layout; other values or shape do not.
    assert image_hash(image.double()) == image_hash(image) == image_hash(image.permute(1, 2, 0).contiguous().permute(2, 0, 1))
    low = image.bfloat16()  # a dtype numpy has not: hashed as its float32 values too
    assert image_hash(low) == image_hash(low.float()) and image_hash(image.half()) == image_hash(image.half().float())
    assert image_hash(image.reshape(3, 8, 32)) != image_hash(image)
    changed = image.clone()
    changed[0, 0, 0] += 1e-3
    assert image_hash(changed) != image_hash(image)


def replaced(data: TensorDataset, index: int) -> TensorDataset:
    """The same data set with image `index` replaced by another image of the same size."""
    x, y = data.tensors
    x = x.clone()
    x[index] = torch.randn(x[index].shape, generator=torch.Generator().manual_seed(99))
    return TensorDataset(x, y)


@pytest.mark.parametrize("index", [0, 5, 17])
def test_resume_with_other_images_of_the_same_size_is_refused_naming_the_index(tmp_path, index):
    path = tmp_path / "results.jsonl"
    certify_dataset(make_model(), make_data(), batch_size=4, results_path=path, progress=False)
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:21]))  # interrupted after 20 images: the rest is left to do
    before = path.read_bytes()
    other = replaced(make_data(), index)
    model = make_model()
    counter = ViewCounter(model.model)
    stored = json.loads(lines[1 + index])["image_hash"]
    with pytest.raises(ValueError, match=rf"image {index} of other content: hash {stored} in the results file, {image_hash(other[index][0])} for image {index}"):
        certify_dataset(model, other, batch_size=4, results_path=path, progress=False)
    assert counter.calls == 0 and path.read_bytes() == before  # refused before any forward pass or write
    # Images after the interruption are not kept records: replacing one of them is a plain resume.
    assert certify_dataset(make_model(), replaced(make_data(), 25), batch_size=4, results_path=path, progress=False).num_images == N


def test_resume_with_reordered_images_is_refused(tmp_path):
    path = tmp_path / "results.jsonl"
    certify_dataset(make_model(), make_data(8), batch_size=4, results_path=path, progress=False)
    x, y = make_data(8).tensors
    with pytest.raises(ValueError, match="image 0 of other content"):
        certify_dataset(make_model(), TensorDataset(x.flip(0), y.flip(0)), batch_size=4, results_path=path, progress=False)


class Relabelled(torch.utils.data.Dataset):
    """`data` with a `target_transform` applied to its labels, as torchvision data sets take one."""

    def __init__(self, data, target_transform):
        self.data, self.target_transform = data, target_transform

    def __len__(self):
        return len(self.data)

    def __getitem__(self, index):
        image, label = self.data[index]
        return image, self.target_transform(label)


def relabelled_one(data: TensorDataset, index: int) -> TensorDataset:
    """The same images with label `index` moved to the next class."""
    x, y = data.tensors
    y = y.clone()
    y[index] = (y[index] + 1) % 4
    return TensorDataset(x, y)


@pytest.mark.parametrize(
    ("relabel", "index"),
    [(lambda data: Relabelled(data, lambda y: (y + 1) % 4), 0), (lambda data: relabelled_one(data, 13), 13)],
)
def test_resume_with_other_labels_is_refused_naming_the_index_and_both_labels(tmp_path, relabel, index):
    path = tmp_path / "results.jsonl"
    certify_dataset(make_model(), make_data(), batch_size=4, results_path=path, progress=False)
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:21]))  # interrupted after 20 images: the rest is left to do
    before = path.read_bytes()
    other = relabel(make_data())
    stored, now = int(make_data()[index][1]), int(other[index][1])
    assert stored != now
    model = make_model()
    counter = ViewCounter(model.model)
    with pytest.raises(ResultsFileError) as error:
        certify_dataset(model, other, batch_size=4, results_path=path, progress=False)
    assert str(error.value) == (
        f"results_path {path} holds a record for image {index} with label {stored}, and data now gives image {index} label {now}; the "
        "labels (a target_transform, the class order of an image folder) changed since those results were written; use another "
        "results file, or resume=False to overwrite it"
    )
    assert error.value.index == index and error.value.path == path
    copy = pickle.loads(pickle.dumps(error.value))  # as it crosses processes: the same fields and message
    assert (str(copy), copy.path, copy.problem, copy.index, copy.line) == (str(error.value), path, error.value.problem, index, None)
    assert counter.calls == 0 and path.read_bytes() == before  # refused before any forward pass or write
    # The same labels resume; a label after the interruption is not a kept record's: it is certified as it is now.
    same = certify_dataset(make_model(), Relabelled(make_data(), lambda y: y), batch_size=4, results_path=path, progress=False)
    assert same.records == straight().records
    path.write_text("".join(lines[:21]))
    resumed = certify_dataset(make_model(), relabelled_one(make_data(), 25), batch_size=4, results_path=path, progress=False)
    assert resumed.records[25].label == int(relabelled_one(make_data(), 25)[25][1]) != straight().records[25].label


def test_resume_with_another_class_order_of_an_image_folder_is_refused(tmp_path):
    from PIL import Image
    from torchvision.datasets import ImageFolder
    from torchvision.transforms import ToTensor

    for i, image in enumerate(make_data(8).tensors[0]):
        folder = tmp_path / "images" / "abcd"[i % 4]
        folder.mkdir(parents=True, exist_ok=True)
        pixels = (image.sigmoid() * 255).round().byte().permute(1, 2, 0).numpy()
        Image.fromarray(pixels).save(folder / f"{i}.png")

    class Reversed(ImageFolder):
        def find_classes(self, directory):
            classes, _ = super().find_classes(directory)
            return classes, {name: len(classes) - 1 - i for i, name in enumerate(classes)}

    images, path = tmp_path / "images", tmp_path / "results.jsonl"
    report = certify_dataset(make_model(), ImageFolder(images, transform=ToTensor()), batch_size=4, results_path=path, progress=False)
    assert certify_dataset(make_model(), ImageFolder(images, transform=ToTensor()), batch_size=4, results_path=path, progress=False) == report
    reversed_folder = Reversed(images, transform=ToTensor())
    assert [s for s, _ in reversed_folder.samples] == [s for s, _ in ImageFolder(images).samples]  # same images, same order
    model = make_model()
    counter = ViewCounter(model.model)
    with pytest.raises(ResultsFileError, match=r"holds a record for image 0 with label 0, and data now gives image 0 label 3; the labels"):
        certify_dataset(model, reversed_folder, batch_size=4, results_path=path, progress=False)
    assert counter.calls == 0


def test_results_of_an_older_format_are_refused(tmp_path):
    path = tmp_path / "results.jsonl"
    certify_dataset(make_model(), make_data(8), batch_size=4, results_path=path, progress=False)
    lines = path.read_text().splitlines(keepends=True)
    header = json.loads(lines[0])
    header["version"] = 1
    path.write_text(json.dumps(header) + "\n" + "".join(lines[1:]))
    with pytest.raises(ValueError, match="another robustwrap version"):
        certify_dataset(make_model(), make_data(8), batch_size=4, results_path=path, progress=False)


# ----------------------------------------------------------------------------- data and progress
class PILDigits(torch.utils.data.Dataset):
    """A data set without a transform: (PIL image, label) pairs, as torchvision gives them."""

    def __len__(self):
        return 4

    def __getitem__(self, index):
        from PIL import Image

        return Image.new("RGB", (16, 16)), 0


def test_pil_images_get_a_hint_about_the_transform():
    model = make_model()
    counter = ViewCounter(model.model)
    with pytest.raises(TypeError, match=r"PIL images .*transform.*ToTensor\(\), Normalize"):
        certify_dataset(model, PILDigits(), progress=False)
    with pytest.raises(TypeError, match="PIL images"):
        certify_dataset(model, DataLoader(PILDigits(), batch_size=2), progress=False)
    assert counter.calls == 0


def test_progress_moves_after_every_forward_pass(monkeypatch):
    import robustwrap.dataset as module

    updates: list[tuple[float, float]] = []  # (bar position after the update, views counted so far)

    class RecordingBar(module._bar_class()):
        def update(self, n=1):
            result = super().update(n)
            updates.append((self.n, counter.images))
            return result

    monkeypatch.setattr(module, "_bar_class", lambda: RecordingBar)
    model = make_model()
    assert model.num_classes == 4  # found by a blank forward pass, before counting
    counter = ViewCounter(model.model)
    report = certify_dataset(model, make_data(8), batch_size=4, progress=True)
    view_passes = counter.calls - 2  # one vanilla pass per step is not a view
    assert len(updates) == view_passes + 2  # one update per forward pass of views, one per step's end
    positions = [n for n, _ in updates]
    assert positions == sorted(positions) and positions[-1] == pytest.approx(8)
    assert 0 < positions[0] < 4  # the first step moves the bar before it ends (full-grid estimate)
    first_step_views = sum(r.num_views for r in report.records[:4])
    assert all(n < 4 for n, views in updates if views <= first_step_views)  # never ahead of a step's end
    assert list(model.model._forward_hooks.values()) == [counter._hook]  # certify_dataset left no hook of its own


def test_progress_counts_whole_images_unless_on_a_terminal(monkeypatch, capsys):
    import robustwrap.dataset as module

    class EveryRedraw(module._bar_class()):  # redraw at every update, as a slow model would
        def __init__(self, *args, **kwargs):
            super().__init__(*args, mininterval=0, miniters=0, **kwargs)

    monkeypatch.setattr(module, "_bar_class", lambda: EveryRedraw)
    certify_dataset(make_model(), make_data(8), batch_size=4, progress=True)
    err = capsys.readouterr().err  # a pipe, as in a log file
    counts = re.findall(r"\| *([0-9.]+)/8 ", err)
    assert err.count("this step") >= 4  # redrawn within steps, while the bar moves by fractions of images
    assert counts and all(c.isdigit() for c in counts) and {"0", "4", "8"} <= set(counts)

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    for stream, shown in ((Terminal(), "0.4"), (io.StringIO(), "0")):
        bar = module._bar_class()(total=8, file=stream)
        bar.update(0.4)
        assert bar.format_dict["n_fmt"] == shown
        bar.close()


def test_no_progress_prints_nothing(capsys, tmp_path):
    path = tmp_path / "results.jsonl"
    certify_dataset(make_model(), make_data(8), batch_size=4, progress=False, results_path=path)
    certify_dataset(make_model(), make_data(8), batch_size=4, progress=False, results_path=path)  # resume: verify quietly
    assert capsys.readouterr() == ("", "")


# -------------------------------------------------------------------------- defense fields
@dataclasses.dataclass
class FakeSmoothingResult:
    prediction: torch.Tensor
    certified: torch.Tensor
    num_views: torch.Tensor
    counts: torch.Tensor
    delta: int
    grid: torch.Tensor


def test_record_fields_are_read_generically_from_any_result():
    result = FakeSmoothingResult(
        prediction=torch.tensor([1, 0]),
        certified=torch.tensor([True, False]),
        num_views=torch.tensor([16, 16]),
        counts=torch.tensor([[0, 12, 4], [9, 7, 0]]),
        delta=3,
        grid=torch.zeros(2, 4, 4),  # a per-image matrix: a diagnostic, not a record field
    )
    assert _record_fields(result, 2) == [{"counts": [0, 12, 4], "delta": 3}, {"counts": [9, 7, 0], "delta": 3}]
    model, data = make_model(), make_data(4)
    pc = model.certify(*data.tensors)
    assert _record_fields(pc, 4) == [{"case": c, "one_mask": o} for c, o in zip(pc.case.tolist(), pc.one_mask.tolist())]


# ------------------------------------------------------------------------------ two processes
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _distributed_worker(rank: int, world: int, port: int, folder: str) -> None:
    torch.set_num_threads(1)  # two processes on a small machine: no oversubscription
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        folder = Path(folder)
        plain = certify_dataset(make_model(), make_data(), batch_size=4, progress=False)
        (folder / f"plain{rank}.json").write_text(plain.to_json())
        resumed = certify_dataset(make_model(), make_data(), batch_size=4, results_path=folder / "results.jsonl", progress=False)
        (folder / f"resumed{rank}.json").write_text(resumed.to_json())
    finally:
        dist.destroy_process_group()


def test_two_gloo_processes_equal_one_process(tmp_path):
    expected = straight()
    # A single-process run killed after 9 images (mid-step, with a torn line) for the ranks to resume.
    path = tmp_path / "results.jsonl"
    certify_dataset(make_model(), make_data(), batch_size=4, results_path=path, progress=False)
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:10]) + lines[10][:9])

    mp.spawn(_distributed_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)

    for rank in (0, 1):
        assert CertificationReport.from_json((tmp_path / f"plain{rank}.json").read_text()) == expected
        assert CertificationReport.from_json((tmp_path / f"resumed{rank}.json").read_text()) == expected
    files = [path, tmp_path / "results.jsonl.rank0", tmp_path / "results.jsonl.rank1"]
    per_file = [[r["index"] for r in record_lines(f)] for f in files]
    assert per_file[0] == list(range(9))  # the killed run's complete lines, torn tail dropped
    assert per_file[1] and per_file[2]  # both ranks did work
    assert sorted(i for part in per_file for i in part) == list(range(N))  # each image exactly once
    # The whole resumed set reads back as one report from a single process, too.
    assert certify_dataset(make_model(), make_data(), batch_size=4, results_path=path, progress=False) == expected
