"""MkDocs hooks: the parts of the site that are generated from the code, never copied into it.

A page asks for generated content with a marker comment on a line of its own:

- `<!-- robustwrap:zoo-table -->`: the model zoo table, from `hub/manifest.json`;
- `<!-- robustwrap:zoo-default -->`: the measured figures of the zoo's default model;
- `<!-- robustwrap:cli-help COMMAND -->`: the `--help` text of `robustwrap COMMAND` (or `robustwrap`
  for `main`), from the real argument parser;
- `<!-- robustwrap:include FILE HEADING -->`: the body of the `## HEADING` section of a Markdown
  file of the repository (e.g. the papers' published figures in `hub/README.md`).

An unknown marker fails the build, so a typo can never silently drop content.

Pictures under `images/` are drawn at build time with robustwrap's own plotting functions
(`robustwrap.plots.plot_mask_set`, `plot_views`), its attack (`robustwrap.attack`) and matplotlib,
on the embedded zoo model and its held-out digits, and added to the site as generated files: no
binary is kept in `docs/`.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import re
import shlex
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # build from a checkout without `pip install -e .`
    sys.path.insert(0, str(ROOT))

MANIFEST = ROOT / "hub" / "manifest.json"
MARKER = re.compile(r"^<!-- robustwrap:(?P<name>[\w-]+)(?P<args>[^>]*?)\s*-->\s*$", re.MULTILINE)
log = logging.getLogger("mkdocs.plugins.robustwrap_docs")


# ------------------------------------------------------------------------------------- the zoo
def load_manifest(path: Path = MANIFEST) -> dict:
    """The zoo manifest (`hub/manifest.json`, a link to the copy shipped in the package)."""
    return json.loads(path.read_text())


def _pct(value) -> str:
    return f"{100 * value:.1f}%" if isinstance(value, (int, float)) else "-"


def _threat(entry: dict) -> str:
    patch, size = entry.get("patch"), entry.get("image_size")
    if isinstance(patch, list) and isinstance(size, list):
        percent = entry.get("patch_percent", 100 * patch[0] * patch[1] / (size[0] * size[1]))
        return f"{patch[0]}x{patch[1]} px ({percent:.2f}% of {size[0]}x{size[1]})"
    return str(entry.get("threat_model", "-"))


def _weights(entry: dict) -> str:
    if entry.get("embedded"):
        return "shipped in the package"
    if entry.get("repo_id"):
        revision = f"@{entry['revision']}" if entry.get("revision") else ""
        return f"[`hf-hub:{entry['repo_id']}{revision}`](https://huggingface.co/{entry['repo_id']})"
    return "-"


def zoo_table(manifest: dict) -> str:
    """The zoo as Markdown: one table of measured figures, then one section per model."""
    models = manifest.get("models", [])
    if not models:
        return '!!! warning "The zoo is empty"\n    `hub/manifest.json` lists no model yet.\n'
    default = manifest.get("default")
    papers = [e for e in models if isinstance(e.get("base"), dict)]
    models = [e for e in models if e not in papers]
    rows = [
        "| model | base | data | fine-tuning | threat model | vanilla clean | defended clean | certified |",
        "|---|---|---|---|---|---:|---:|---:|",
    ]
    for e in models:
        m = e.get("metrics", {})
        name = f"[`{e['name']}`](#{e['name']})" + ("<br>(default)" if e["name"] == default else "")
        rows.append(
            f"| {name} | {e.get('library', '')} `{e.get('architecture', '-')}` | `{e.get('dataset', '-')}` | "
            f"`{e.get('strategy', '-')}` | {_threat(e)},<br>{e.get('num_masks', '-')} masks | {_pct(m.get('vanilla_accuracy'))} | "
            f"{_pct(m.get('clean_accuracy'))} | **{_pct(m.get('certified_accuracy'))}** |"
        )
    parts = ["\n".join(rows), ""]
    for e in models:
        m = e.get("metrics", {})
        details = [
            f"### `{e['name']}` {{ #{e['name']} }}",
            "",
            f"- **Weights:** {_weights(e)}; sha256 `{e.get('sha256', '-')}` (checked on load)",
            f"- **Threat model:** {e.get('threat_model', _threat(e))}",
        ]
        if e.get("train_data"):
            epochs = e.get("epochs") or {}
            detail = f"; {epochs.get('base')} epochs of clean training, then {epochs.get('fine_tune')} of `{e.get('strategy')}`" if epochs else ""
            details.append(f"- **Trained on:** {e['train_data']}{detail}")
        if m.get("num_images"):
            details.append(f"- **Measured on:** {m['num_images']:,} images of `{e.get('dataset')}` ({m.get('split', 'held-out')} split)")
        command = e.get("measured_with") or m.get("command")
        if command:
            details.append(f"- **Command:** `{command}`")
        details += [
            "",
            "```python",
            "import robustwrap",
            f'model = robustwrap.create_model("{e["name"]}")',
            "```",
            "",
        ]
        parts += details
    if papers:
        parts += ["", _papers_table(papers)]
    return "\n".join(parts)


def _papers_table(entries: list[dict]) -> str:
    """The Hub-backed papers' models: timm's weights, the paper's settings, the paper's figures as claims."""
    rows = [
        "### The papers' models (weights from timm's Hub repos)",
        "",
        (
            "Each is timm's own Hub repo of the tag the paper's code loaded, wrapped with the paper's settings. The first "
            "load needs the network (then `HF_HUB_OFFLINE=1` reads the Hugging Face cache). Nothing here was measured by us: "
            "the figures are **the paper's claims**, and each card gives the command that measures them on your copy of the data."
        ),
        "",
        "| model | weights | threat model | reported by the paper (clean / certified) |",
        "|---|---|---|---|",
    ]
    for e in entries:
        claims = (e.get("paper") or {}).get("claims") or []
        claimed = "<br>".join(f"{_pct(c.get('clean_accuracy'))} / {_pct(c.get('certified_accuracy'))} ({c.get('model')})" for c in claims) or "not restated (see the card)"
        rows.append(f"| `{e['name']}` | [`{e.get('weights')}`](https://huggingface.co/{e['base'].get('hf_hub_id')}) | {e.get('threat_model', _threat(e))} | {claimed} |")
    for e in entries:
        rows += ["", f"#### `{e['name']}` {{ #{e['name'].replace('.', '-')} }}", "", f"- **Measure:** `{e.get('measure_with', '-')}`", ""]
    return "\n".join(rows)


def zoo_default(manifest: dict) -> str:
    """One sentence with the default model's measured figures (the home page's headline)."""
    default = manifest.get("default")
    entry = next((e for e in manifest.get("models", []) if e["name"] == default), None)
    if entry is None:
        return '!!! warning "TODO"\n    The zoo has no default model yet (`hub/manifest.json`).\n'
    m = entry.get("metrics", {})
    return (
        f"| `{entry['name']}`: {entry.get('library', '')} `{entry['architecture']}` on {m.get('num_images', 0):,} held-out images of `{entry.get('dataset')}` | |\n"
        f"|---|---:|\n"
        f"| vanilla clean accuracy (undefended) | {_pct(m.get('vanilla_accuracy'))} |\n"
        f"| defended clean accuracy (double masking) | {_pct(m.get('clean_accuracy'))} |\n"
        f"| **certified accuracy** against a {_threat(entry)} patch, {entry.get('num_masks', '?')} masks | **{_pct(m.get('certified_accuracy'))}** |\n"
    )


# ------------------------------------------------------------------------------------- the CLI
def cli_help(command: str) -> str:
    """`robustwrap [COMMAND] --help`, as the real parser prints it (80 columns)."""
    import os

    from robustwrap.cli import main

    argv = ([] if command in ("", "main", "robustwrap") else [command]) + ["--help"]
    out = io.StringIO()
    old = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "88"  # argparse wraps at $COLUMNS; pinned so the page is the same everywhere
    try:
        with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
            main(argv)
    finally:
        if old is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = old
    text = out.getvalue().rstrip()
    if not text.startswith("usage:"):
        raise ValueError(f"robustwrap {' '.join(argv)} printed no usage")
    return f'```text title="robustwrap {" ".join(argv)}"\n{text}\n```\n'


# --------------------------------------------------------------------------------- includes
def markdown_section(path: Path, heading: str) -> str:
    """The body of the `## heading` section of a Markdown file (up to the next `## ` heading)."""
    lines = path.read_text().splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith("## ") and line[3:].strip() == heading]
    if not starts:
        raise ValueError(f"{path} has no section '## {heading}'")
    body = []
    for line in lines[starts[0] + 1 :]:
        if line.startswith(("## ", "# ")):
            break
        if "PLACEHOLDER" in line:  # a figure not measured yet: say so on the page, loudly
            log.info("%s, section '%s': %s is not filled in yet", path.name, heading, line.strip())
            line = f'!!! warning "TODO: not measured yet"\n    `{path.name}` still holds `{line.strip()}` here.\n'
        body.append(line)
    return "\n".join(body).strip() + "\n"


# ------------------------------------------------------------------------------------ markers
def render_marker(name: str, args: str) -> str:
    """The Markdown that replaces `<!-- robustwrap:NAME ARGS -->`."""
    words = shlex.split(args)
    if name == "zoo-table" and not words:
        return zoo_table(load_manifest())
    if name == "zoo-default" and not words:
        return zoo_default(load_manifest())
    if name == "cli-help" and len(words) <= 1:
        return cli_help(words[0] if words else "")
    if name == "include" and len(words) == 2:
        return markdown_section(ROOT / words[0], words[1])
    raise ValueError(f"unknown docs marker <!-- robustwrap:{name}{args} -->")


def expand(markdown: str, only: tuple[str, ...] | None = None) -> str:
    """`markdown` with every marker (or those named in `only`) replaced by its generated content."""

    def render(match: re.Match) -> str:
        if only is not None and match["name"] not in only:
            return match[0]
        return render_marker(match["name"], match["args"])

    return MARKER.sub(render, markdown)


def on_page_markdown(markdown: str, page, config, files) -> str:
    from mkdocs.exceptions import PluginError

    try:
        return expand(markdown)
    except (ValueError, OSError) as error:
        raise PluginError(f"docs/{page.file.src_uri}: {error}") from error


# ------------------------------------------------------------------------------ rendered pages
# Python-Markdown prints `\|` inside a code span of a table cell as it is, backslash and all, while
# GitHub's renderer hides the backslash: neither a strict build nor a look at GitHub shows it.
LITERAL_PIPE = re.compile(r"\\\|")
CODE_BLOCK = re.compile(r"<pre\b.*?</pre>", re.DOTALL)


def literal_escapes(html: str) -> list[str]:
    """The places in a rendered page, outside code blocks, that show a backslash-escaped pipe."""
    text = CODE_BLOCK.sub("", html)
    return [text[max(m.start() - 30, 0) : m.end() + 30] for m in LITERAL_PIPE.finditer(text)]


def on_page_content(html: str, page, config, files) -> str:
    for place in literal_escapes(html):
        # a warning fails `mkdocs build --strict`
        log.warning("docs/%s shows a literal \\| in %r: in a table, say it without a pipe (`column`, `row` or `block`)", page.file.src_uri, place)
    return html


# ------------------------------------------------------------------------------------ figures
def _png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def _digits(model, count: int):
    """The first `count` held-out digits of the default model, as its own preprocessing gives them."""
    import torch
    from timm.data import create_transform, resolve_data_config

    from robustwrap import zoo

    transform = create_transform(**resolve_data_config(model=model.model))
    data = zoo.builtin_dataset(zoo.zoo_entry(zoo.DEFAULT_MODEL)["dataset"], transform=transform)
    images, labels = zip(*(data[i] for i in range(min(count, len(data)))))
    return torch.stack(images), torch.tensor(labels)


def _one_mask_labels(model, x):
    """`(B, K)` one-mask labels `P_i`, built with the training masking path (`apply_masks`)."""
    import torch

    from robustwrap.augment import apply_masks

    k = len(model.mask_set)
    views = apply_masks(x.repeat_interleave(k, 0), model.mask_set, torch.arange(k).repeat(x.shape[0]), model.fill)
    with torch.inference_mode():
        return model.model(views).argmax(1).view(x.shape[0], k)


def figure_mask_set() -> bytes:
    """The Concepts page's canonical set: 2% of 224x224 (32 px), 6x6 masks of 64 px, stride 33."""
    from robustwrap import MaskSet
    from robustwrap.plots import plot_mask_set

    return _png(plot_mask_set(MaskSet.square(224, 0.02, num_masks=6)))


def figure_views() -> dict[str, bytes]:
    """Held-out digits through the embedded model, one per story of the Concepts page.

    - certified: every one-mask and two-mask view says the label (Case I);
    - case 3: one mask changes the label but its row does not keep it, so the majority wins;
    - case 2: the majority is wrong, and a disagreeing mask whose whole row agrees wins, rightly.
    """
    from robustwrap import zoo
    from robustwrap.dataset import view_grid
    from robustwrap.defenses import patchcleanser as rule
    from robustwrap.plots import plot_views

    model = zoo.create_model(zoo.DEFAULT_MODEL).eval()
    # name: (a cheap test on the one-mask labels, the test on the full grid)
    wanted = {
        "images/views-certified.png": (lambda wrong: wrong == 0, lambda case, certified: certified),
        "images/views-case3.png": (lambda wrong: wrong == 1, lambda case, certified: case == rule.CASE_MAJORITY),
        "images/views-case2.png": (lambda wrong: wrong > 0, lambda case, certified: case == rule.CASE_DISAGREER),
    }
    pictures: dict[str, bytes] = {}
    for start in range(0, 1000, 250):  # held-out digits, a chunk at a time, until every story has one
        x, y = _digits(model, start + 250)
        x, y = x[start:], y[start:]
        right = _one_mask_labels(model, x) == y[:, None]
        for index in sorted(range(x.shape[0]), key=lambda i: int((~right[i]).sum())):
            wrong = int((~right[index]).sum())
            missing = [name for name in wanted if name not in pictures]
            if not missing:
                return pictures
            missing = [name for name in missing if wanted[name][0](wrong)]
            if not missing:
                continue
            one_mask, grid = view_grid(model, x[index])
            decision = rule.decide(one_mask[None], grid[None])
            if int(decision.label[0]) != int(y[index]):
                continue  # every story here is about a right prediction
            certified = bool((grid == y[index]).all())
            for name in missing:
                if wanted[name][1](int(decision.case[0]), certified):
                    pictures[name] = _png(plot_views(one_mask, grid, int(y[index]), model.mask_set, x[index]))
                    break
    missing = [name for name in wanted if name not in pictures]
    if missing:
        raise RuntimeError(f"no held-out digit to draw {', '.join(missing)}")
    return pictures


def figure_cutouts() -> bytes:
    """What each training strategy hides on the same digits (embedded model, its mask set)."""
    import torch
    from matplotlib.figure import Figure

    from robustwrap import zoo
    from robustwrap.augment import create_augmentation

    torch.manual_seed(0)
    model = zoo.create_model(zoo.DEFAULT_MODEL).eval()
    x, y = _digits(model, 6)
    names = ["random_cutout", "random_mask", "greedy", "multisize_greedy", "grid"]
    fig = Figure(figsize=(1.55 * x.shape[0], 1.6 * (len(names) + 1)), dpi=110, layout="constrained")
    axes = fig.subplots(len(names) + 1, x.shape[0])
    rows = [("clean", x)]
    for name in names:
        augment = create_augmentation(name, model.mask_set, model.model, fill=model.fill)
        rows.append((name, augment(x, y)))
    lo, hi = x.min(), x.max()
    for r, (name, batch) in enumerate(rows):
        for c in range(x.shape[0]):
            ax = axes[r, c]
            ax.imshow(((batch[c, 0] - lo) / (hi - lo)).numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(name, fontsize=9)
    fig.suptitle("what each strategy hides (grey = fill 0.0, the mean) on held-out digits", fontsize=10)
    return _png(fig)


# The attack guide's picture: a few seconds of attack, seeded, so every build draws the same one.
ATTACK_DIGITS = 8  # the guide's eight held-out digits
ATTACK_BASE = {"steps": 20, "locations": ("random", 8)}  # per digit, on the undefended base model
ATTACK_DEFENDED = {"steps": 10, "locations": ("guided", 1)}  # the guide's budget on the defended model


def figure_attack() -> bytes:
    """A patch that fools the undefended base model, and the defended model on the same digit.

    Of the attack guide's eight held-out digits (embedded model), the first one, in the order of
    the base model's clean margin (the easiest first), that the defended model certifies and on
    which a small seeded attack on the base model succeeds. Three panels: the clean digit; the
    base model's successful patch (red box), with what the base and the defended model predict on
    that image; and the defended model's own adaptive attack on the digit (orange box), which
    must fail, as the digit is certified.
    """
    import torch
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    import robustwrap
    from robustwrap import zoo
    from robustwrap.attack import input_bounds

    model = zoo.create_model(zoo.DEFAULT_MODEL).eval()
    x, y = _digits(model, ATTACK_DIGITS)
    with torch.inference_mode():
        logits = model.model(x).float()
    own = logits.gather(1, y[:, None])[:, 0]
    margin = own - logits.scatter(1, y[:, None], float("-inf")).amax(1)
    for i in margin.argsort().tolist():
        xi, yi = x[i : i + 1], y[i : i + 1]
        if margin[i] <= 0:
            continue  # the base model is already wrong: no patch needed
        base = robustwrap.attack(
            model.model, xi, yi, patch=model.patch, generator=torch.Generator().manual_seed(0), progress=False, **ATTACK_BASE
        )
        if not bool(base.success[0]) or not bool(model.certify(xi, yi).certified[0]):
            continue
        defended = robustwrap.attack(model, xi, yi, generator=torch.Generator().manual_seed(0), progress=False, **ATTACK_DEFENDED)
        if bool(defended.success[0]):
            raise RuntimeError(f"held-out digit {i} is certified, yet the attack flipped it: a bug in robustwrap")
        break
    else:
        raise RuntimeError(f"no digit of the first {ATTACK_DIGITS} held-out digits to draw images/attack.png: base attack {ATTACK_BASE}")

    label = int(yi[0])

    def say(image):
        with torch.inference_mode():
            b, d = int(model.model(image).argmax(1)[0]), int(model.predict(image)[0])
        return f"base model: {b} ({'right' if b == label else 'WRONG'})\ndefended: {d} ({'right' if d == label else 'WRONG'})"

    low, high = (float(v[0]) for v in input_bounds(model, channels=1))
    ph, pw = model.patch
    h, w = model.image_size
    panels = [
        (xi, None, None, f"clean, label {label}\n{say(xi)} (certified)"),
        (base.x_adv, base.location[0], "#e53935", f"patch optimised on the base model\n{say(base.x_adv)}"),
        (defended.x_adv, defended.location[0], "#fb8c00", f"patch optimised on the defended model\n{say(defended.x_adv)}"),
    ]
    fig = Figure(figsize=(9.6, 3.9), dpi=110, layout="constrained")
    for ax, (image, location, colour, title) in zip(fig.subplots(1, len(panels)), panels):
        ax.imshow(image[0, 0].numpy(), cmap="gray", vmin=low, vmax=high, interpolation="nearest")
        if location is not None:
            top, left = location.tolist()
            ax.add_patch(Rectangle((left - 0.5, top - 0.5), pw, ph, fill=False, edgecolor=colour, linewidth=2.5))
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(title, fontsize=9)
    fig.suptitle(f"a {ph}x{pw} px patch ({100 * ph * pw / (h * w):.2f}% of {h}x{w}) on the attack guide's digit x[{i}]", fontsize=10)
    return _png(fig)


def figure_detection() -> bytes:
    """Certified detection on a held-out digit whose clean output is an alert (the default model, tau 0).

    The first digit where a one-mask view disagrees confidently with the unmasked label: the
    picture shows which masks raise the alert.
    """
    from robustwrap import zoo
    from robustwrap.plots import plot_detection

    model = zoo.create_model(zoo.DEFAULT_MODEL)
    model.tau = 0.0
    x, y = _digits(model, 64)
    alert = model.detect(x).alert
    i = int(alert.nonzero()[0, 0])
    return _png(plot_detection(model, x[i], label=int(y[i])))


FIGURES = (
    "images/mask-set-224.png",
    "images/views-certified.png",
    "images/views-case3.png",
    "images/views-case2.png",
    "images/cutouts.png",
    "images/attack.png",
    "images/detection.png",
)


def figures() -> dict[str, bytes]:
    """Every generated picture (`FIGURES`), by its path under the docs folder."""
    import torch

    from robustwrap import zoo

    # One thread: a few seconds everywhere, where two threads on a busy 2-core machine take minutes.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        pictures = {"images/mask-set-224.png": figure_mask_set()}
        if zoo.DEFAULT_MODEL is None:
            log.warning("the zoo has no default model: the pictures of the embedded model are left out")
            return pictures
        pictures |= figure_views()
        pictures["images/cutouts.png"] = figure_cutouts()
        pictures["images/attack.png"] = figure_attack()
        pictures["images/detection.png"] = figure_detection()
    finally:
        torch.set_num_threads(threads)
    assert set(pictures) == set(FIGURES), sorted(pictures)
    return pictures


def on_files(files, config):
    from mkdocs.structure.files import File

    for path, png in figures().items():
        files.append(File.generated(config, path, content=png))
    return files
