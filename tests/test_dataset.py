"""certify_dataset: exact counts, resume after a kill, refusal of foreign results, two processes."""

from __future__ import annotations

import dataclasses
import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import PeakNet, ViewCounter, brute_force_grid
from torch.utils.data import DataLoader, TensorDataset

import robustwrap
from robustwrap.dataset import certify_dataset, model_fingerprint, view_grid
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


def test_amp_runs_and_is_part_of_the_fingerprint(tmp_path):
    report = certify_dataset(make_model(), make_data(8), batch_size=4, amp=True, progress=False, results_path=tmp_path / "r.jsonl")
    assert report.amp and report.num_images == 8
    assert report.fingerprint != model_fingerprint(make_model())
    with pytest.raises(ValueError, match="another model or threat model"):
        certify_dataset(make_model(), make_data(8), batch_size=4, progress=False, results_path=tmp_path / "r.jsonl")


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
    resumed = certify_dataset(model, make_data(), batch_size=4, results_path=path, progress=False)
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
    ("other", "match"),
    [
        (lambda: make_model(seed=1), "another model or threat model"),
        (lambda: make_model(patch=2), "another model or threat model"),
        (lambda: make_model(fill=0.5), "another model or threat model"),
        (lambda: make_model(num_masks=4), "another model or threat model"),
    ],
)
def test_results_of_another_model_or_threat_model_are_refused(tmp_path, other, match):
    path = tmp_path / "results.jsonl"
    certify_dataset(make_model(), make_data(8), batch_size=4, results_path=path, progress=False)
    before = path.read_bytes()
    with pytest.raises(ValueError, match=match):
        certify_dataset(other(), make_data(8), batch_size=4, results_path=path, progress=False)
    assert path.read_bytes() == before


def test_results_of_another_data_set_size_or_damaged_file_are_refused(tmp_path):
    path = tmp_path / "results.jsonl"
    certify_dataset(make_model(), make_data(8), batch_size=4, results_path=path, progress=False)
    with pytest.raises(ValueError, match="data set of 8 images"):
        certify_dataset(make_model(), make_data(9), batch_size=4, results_path=path, progress=False)
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:3]) + "{not json\n" + "".join(lines[3:]))
    with pytest.raises(ValueError, match="line 4"):
        certify_dataset(make_model(), make_data(8), batch_size=4, results_path=path, progress=False)
    other = tmp_path / "other.jsonl"
    other.write_text('{"hello": 1}\n')
    with pytest.raises(ValueError, match="not a robustwrap results file"):
        certify_dataset(make_model(), make_data(8), batch_size=4, results_path=other, progress=False)


def test_seconds_are_not_compared_but_kept():
    report = straight(n=8)
    slower = dataclasses.replace(report, records=tuple(dataclasses.replace(r, seconds=r.seconds + 1) for r in report.records))
    assert slower == report and slower.seconds == pytest.approx(report.seconds + 8)
    assert report.seconds > 0 and report.images_per_second > 0


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
