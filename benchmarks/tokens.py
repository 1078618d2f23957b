"""Token dropping for (De)Randomized Smoothing on ViTs: this tree against a commit of main, and against all tokens.

For each model (timm `vit_tiny_patch16_224`, `vit_small_patch16_224` at 224x224, random weights:
speed does not depend on them) and each ablation (19 px columns at stride 1: 224 views, Salman
et al.'s ImageNet setting; 32 px blocks at stride 8: 28 x 28 = 784 views; `block75`: 75 px blocks
at stride 10, 529 views), certifies the same images with every view evaluated
(`certify(early_exit=False)`) three ways, each in a fresh subprocess, interleaved (main, tree,
all tokens, main, ...) so that load drift on a shared machine hits all alike:

- `main`: `drop_tokens=True` in the tree of `--commit` (unpacked with `git archive`; before
  issue 26 a view was built full size and all its tokens embedded);
- `tree`: `drop_tokens=True` in this tree (each image embedded once, a view re-embeds only the
  tokens it keeps partly; in the last block, the patch tokens give only their keys and values to
  the class token the head reads);
- `all_tokens`: `drop_tokens=False` in this tree (pixel ablation, every token);
- `blocks_whole`: timm's blocks, final norm and head alone on random tokens of the shapes and
  passes the defense runs (each view's kept tokens and the prefix; no embedding, no gathering, no
  vote): the floor of any implementation that runs the model's blocks whole on the kept tokens,
  so `ceiling_blocks_whole_vs_main` is the most any change to how views are embedded could gain;
- `art` (with `--art`, where IBM's adversarial-robustness-toolbox is installed): ART's
  `PyTorchDeRandomizedSmoothing` on the same weights, tokens dropped (column and row ablations
  at stride 1 only: ART's blocks take every position).

Prints one JSON line per setting: the best seconds per image of each (CPU time of the one-thread
process by default, `--clock wall` for wall time; both are printed per run), the ratios, and
whether the vote counts of `main` and `tree` are identical:

    OMP_WAIT_POLICY=PASSIVE python benchmarks/tokens.py [--commit 290696d] [--models vit_tiny_patch16_224,vit_small_patch16_224]
        [--ablations column,block] [--images 1] [--repeats 3] [--threads 1] [--clock cpu|wall] [--art]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

from speed_vs_main import unpack_commit  # the same tree of --commit as the embedded model's benchmark

ROOT = Path(__file__).resolve().parents[1]
ABLATIONS = {
    "column": {"ablation": "column", "size": 19, "stride": 1},
    "block": {"ablation": "block", "size": 32, "stride": 8},
    "block75": {"ablation": "block", "size": 75, "stride": 10},
}

CHILD = r"""
import hashlib, json, sys, time
import timm, torch
torch.set_num_threads(int(sys.argv[4]))
import robustwrap
name, settings, images, drop = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]), sys.argv[5] == "1"
torch.manual_seed(0)
base = timm.create_model(name).eval()  # 1000 classes: ART rebuilds the architecture with its default head
x = torch.randn(images, 3, 224, 224)
y = torch.zeros(images, dtype=torch.long)
model = robustwrap.wrap(base, patch=0.02, defense="smoothing", drop_tokens=drop, **settings).eval()
model.predict(x[:1, :, :, :])  # warm-up
start, cpu = time.perf_counter(), time.process_time()
result = model.certify(x, y, early_exit=False)
seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
counts = result.counts.cpu().numpy().tobytes()
print(json.dumps({"wall": seconds, "cpu": cpu, "views": int(result.num_views.sum()), "counts": hashlib.sha256(counts).hexdigest()[:16]}))
"""

# The floor of any implementation that runs the model's blocks whole on the kept tokens: timm's
# blocks, final norm and head alone, on random tokens of the shapes and passes the defense runs
# (each view's kept tokens plus the prefix, views grouped by count, the defense's views per pass).
# Nothing else: no embedding, no gathering, no vote. main / this is the most that any change to
# how views are embedded could have gained over main.
BLOCKS_CHILD = r"""
import json, sys, time
import timm, torch
torch.set_num_threads(int(sys.argv[4]))
import robustwrap
from robustwrap.defenses.smoothing import ViewTokens
from robustwrap.tokens import views_per_pass
name, settings, images = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
torch.manual_seed(0)
base = timm.create_model(name).eval()
model = robustwrap.wrap(base, patch=0.02, defense="smoothing", drop_tokens=True, **settings).eval()
grid = model._token_grid()
tokens = ViewTokens.of(grid, model.ablation_set, torch.device("cpu"))
views = len(model.ablation_set)
counts = tokens.keep(torch.arange(views)).reshape(views, -1).sum(1).repeat(images)
per_pass = views_per_pass(model.batch_size, grid, tokens.most_kept())
passes = []
for count in counts.unique().tolist():
    members = int((counts == count).sum())
    passes += [torch.randn(min(per_pass, members - s), count + grid.num_prefix_tokens, base.embed_dim) for s in range(0, members, per_pass)]
with torch.inference_mode():
    base.forward_head(base.norm(base.blocks(passes[0])))  # warm-up
    start, cpu = time.perf_counter(), time.process_time()
    for t in passes:
        base.forward_head(base.norm(base.blocks(t)))
    print(json.dumps({"wall": time.perf_counter() - start, "cpu": time.process_time() - cpu, "views": int(counts.numel())}))
"""

# IBM ART's PyTorchDeRandomizedSmoothing on the same weights (columns and rows only: its blocks take
# every position, stride 1), one pass per view position over all the images, tokens dropped.
ART_CHILD = r"""
import json, sys, time
import timm, torch
torch.set_num_threads(int(sys.argv[4]))
from art.estimators.certification.derandomized_smoothing import PyTorchDeRandomizedSmoothing
name, settings, images = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
torch.manual_seed(0)
base = timm.create_model(name).eval()  # 1000 classes: ART rebuilds the architecture with its default head
x = torch.randn(images, 3, 224, 224)
art = PyTorchDeRandomizedSmoothing(
    model=base, loss=torch.nn.CrossEntropyLoss(), input_shape=(3, 224, 224), nb_classes=1000, ablation_type=settings["ablation"],
    ablation_size=settings["size"], replace_last_layer=False, load_pretrained=False, verbose=False, device_type="cpu",
)
art.eval_and_certify(x[:1].numpy(), torch.zeros(1, dtype=torch.long).numpy(), size_to_certify=32, batch_size=images, verbose=False)
start, cpu = time.perf_counter(), time.process_time()
art.eval_and_certify(x.numpy(), torch.zeros(images, dtype=torch.long).numpy(), size_to_certify=32, batch_size=images, verbose=False)
print(json.dumps({"wall": time.perf_counter() - start, "cpu": time.process_time() - cpu}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--commit", default="290696d", help="main before issue 26")
    parser.add_argument("--models", default="vit_tiny_patch16_224,vit_small_patch16_224")
    parser.add_argument("--ablations", default="column,block")
    parser.add_argument("--images", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--skip-all-tokens", action="store_true", help="only main against the tree")
    parser.add_argument(
        "--clock",
        choices=("cpu", "wall"),
        default="cpu",
        help="what the ratios compare: the process's CPU time (default: one thread, so it is the compute, and other jobs on a "
        "shared machine barely move it) or wall time",
    )
    parser.add_argument("--art", action="store_true", help="also IBM ART on the same weights (column and row ablations at stride 1)")
    args = parser.parse_args()
    import timm
    import torch

    print(
        json.dumps(
            {
                "machine": platform.processor() or platform.machine(),
                "threads": args.threads,
                "torch": torch.__version__,
                "timm": timm.__version__,
                "commit_main": args.commit,
            }
        )
    )
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        main_tree = unpack_commit(args.commit, tmp)
        (tmp / "child.py").write_text(CHILD)
        (tmp / "art_child.py").write_text(ART_CHILD)
        (tmp / "blocks_child.py").write_text(BLOCKS_CHILD)
        children = {"art": "art_child.py", "blocks": "blocks_child.py"}
        variants = {"main": (main_tree, "1"), "tree": (ROOT, "1"), "blocks_whole": (ROOT, "blocks")}
        if not args.skip_all_tokens:
            variants["all_tokens"] = (ROOT, "0")
        for name in args.models.split(","):
            for ablation in args.ablations.split(","):
                settings = ABLATIONS[ablation]
                run_variants = dict(variants)
                if args.art and settings["ablation"] != "block" and settings["stride"] == 1:
                    run_variants["art"] = (ROOT, "art")
                runs: dict[str, list[dict]] = {variant: [] for variant in run_variants}
                for _ in range(args.repeats):
                    for variant, (tree, drop) in run_variants.items():
                        env = dict(os.environ, PYTHONPATH=str(tree), OMP_WAIT_POLICY="PASSIVE", OMP_NUM_THREADS=str(args.threads))
                        command = [
                            sys.executable,
                            str(tmp / children.get(drop, "child.py")),
                            name,
                            json.dumps(settings),
                            str(args.images),
                            str(args.threads),
                            drop,
                        ]
                        out = subprocess.run(command, env=env, cwd=tmp, check=True, capture_output=True, text=True).stdout
                        runs[variant].append(json.loads(out.strip().splitlines()[-1]))
                best = {variant: min(r[args.clock] for r in rs) for variant, rs in runs.items()}
                row = {
                    "model": name,
                    "ablation": ABLATIONS[ablation],
                    "views_per_image": runs["tree"][0]["views"] // args.images,
                    "s_per_image": {variant: round(s / args.images, 3) for variant, s in best.items()},
                    "clock": args.clock,
                    "wall_per_run": {variant: [round(r["wall"], 3) for r in rs] for variant, rs in runs.items()},
                    "cpu_per_run": {variant: [round(r["cpu"], 3) for r in rs] for variant, rs in runs.items()},
                    "speedup_vs_main": round(best["main"] / best["tree"], 2),
                    "same_counts_as_main": runs["main"][0]["counts"] == runs["tree"][0]["counts"],
                }
                for other in ("all_tokens", "art"):
                    if other in best:
                        row[f"speedup_vs_{other}"] = round(best[other] / best["tree"], 2)
                # The most any implementation that runs the blocks whole could gain over main; the
                # tree can pass it only by running less of the blocks (the last block's patch tokens).
                row["ceiling_blocks_whole_vs_main"] = round(best["main"] / best["blocks_whole"], 2)
                print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
