"""Wall time of certifying the embedded default's digits: today's main (b9f47c0) vs this tree.

Both run the same certify loop on the same preprocessed digits (`mnist-heldout`, timm's data
config of the model: resize/crop to 32x32, normalise), each in a fresh subprocess with
`PYTHONPATH` pointing at its tree, `OMP_WAIT_POLICY=PASSIVE` and a fixed thread count,
interleaved (main, tree, main, tree, ...) so that load drift on a shared machine hits both
alike. Prints JSON: per-run seconds, the median ratio of the pairs, and whether both trees
certified the same images.

The main tree is unpacked with `git archive` (no change to this repository's git state):

    python benchmarks/speed_vs_main.py [--commit b9f47c0] [--images 200] [--repeats 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, sys, time, torch
torch.set_num_threads(int(sys.argv[3]))
import robustwrap
model = robustwrap.create_model("mnist_test_resnet_msgc").eval()
data = torch.load(sys.argv[1])
n, step = int(sys.argv[2]), int(sys.argv[4])
x, y = data["x"][:n], data["y"][:n]
start = time.perf_counter()
certified, views = [], 0
for s in range(0, n, step):
    result = model.certify(x[s : s + step], y[s : s + step])
    certified.append(result.certified)
    views += int(result.num_views.sum())
seconds = time.perf_counter() - start
certified = torch.cat(certified)
print(json.dumps({"seconds": seconds, "certified": int(certified.sum()), "certified_hash": hash(tuple(certified.tolist())), "views": views, "batch_size": model.batch_size}))
"""


def digits(path: Path) -> None:
    """The shipped digits, preprocessed once with the model's timm data config, saved for both trees."""
    import safetensors.torch
    import torch
    from PIL import Image
    from timm.data import create_transform, resolve_data_config

    import robustwrap

    model = robustwrap.create_model("mnist_test_resnet_msgc")
    tensors = safetensors.torch.load_file(str(ROOT / "robustwrap" / "zoo" / "data" / "mnist_heldout.safetensors"))
    transform = create_transform(**resolve_data_config({"input_size": (1, 32, 32)}, model=model.model))
    x = torch.stack([transform(Image.fromarray(a.numpy())) for a in tensors["images"]])
    torch.save({"x": x, "y": tensors["labels"]}, path)


def unpack_commit(commit: str, folder: Path) -> Path:
    """`folder/main`: the tree of `commit` of this repository (`git archive`), to run beside the working tree."""
    tree = folder / "main"
    tree.mkdir()
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", commit], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
    return tree


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--commit", default="b9f47c0", help="today's main")
    parser.add_argument("--images", type=int, default=200, help="digits certified per run (of 1000)")
    parser.add_argument("--step", type=int, default=100, help="images per certify call")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        main_tree = unpack_commit(args.commit, tmp)
        data = tmp / "digits.pt"
        digits(data)
        (tmp / "child.py").write_text(CHILD)
        trees = {"main": main_tree, "tree": ROOT}
        runs: dict[str, list[dict]] = {name: [] for name in trees}
        for _ in range(args.repeats):
            for name, tree in trees.items():
                env = dict(os.environ, PYTHONPATH=str(tree), OMP_WAIT_POLICY="PASSIVE", OMP_NUM_THREADS=str(args.threads))
                out = subprocess.run(
                    [sys.executable, str(tmp / "child.py"), str(data), str(args.images), str(args.threads), str(args.step)],
                    env=env, cwd=tmp, check=True, capture_output=True, text=True,
                ).stdout
                runs[name].append(json.loads(out.strip().splitlines()[-1]))
    ratios = [m["seconds"] / t["seconds"] for m, t in zip(runs["main"], runs["tree"])]
    print(
        json.dumps(
            {
                "model": "mnist_test_resnet_msgc (embedded default)",
                "commit_main": args.commit,
                "images": args.images,
                "threads": args.threads,
                "repeats": args.repeats,
                "seconds": {name: [round(r["seconds"], 2) for r in rs] for name, rs in runs.items()},
                "views": {name: rs[0]["views"] for name, rs in runs.items()},
                "batch_size": {name: rs[0]["batch_size"] for name, rs in runs.items()},
                "certified": {name: rs[0]["certified"] for name, rs in runs.items()},
                "same_certified_images": runs["main"][0]["certified_hash"] == runs["tree"][0]["certified_hash"],
                "speedup_per_pair": [round(r, 2) for r in ratios],
                "speedup_median": round(statistics.median(ratios), 2),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
