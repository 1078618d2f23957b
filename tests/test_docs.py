"""Every code block of the documentation runs here, so the docs cannot drift from the code.

Pages: `docs/**/*.md` and `README.md`. Each page is one test; its blocks run top to bottom like a
notebook, in one Python namespace, in a fresh temporary working directory.

- ```` ```python ```` blocks run in the page's namespace. A block with a file title
  (```` ```python title="certify_ddp.py" ````) is a file: it is written to the working directory,
  not run, so that a later shell block can run it.
- ```` ```bash ```` blocks run line by line (a trailing `\\` continues a line). `robustwrap ...`
  runs this checkout's command in-process; anything else runs in `bash` with `robustwrap` on the
  PATH, offline (`HF_HUB_OFFLINE=1`). The working directory links `benchmarks/`, `hub/` and
  `hubconf.py` of the checkout, so commands run as they would in a clone.
- ```` ```text title="Output" ```` right after a block is that block's expected stdout, compared
  after stripping trailing spaces; `...` in it matches any text (like doctest's ELLIPSIS).
- Other blocks (```` ```text ````, ```` ```yaml ````, ...) are not run.

Directives are HTML comments, invisible on the rendered site:

- `<!-- docs-test: setup` + lines of Python + `-->` runs hidden code at that point of the page:
  tiny stand-ins for big models, a folder of images the page assumes you have. The helpers of
  `Helpers` are there as `docs_test`.
- `<!-- docs-test: replace OLD => NEW -->` just before a block runs the block with `OLD` replaced
  by `NEW`. `OLD` must occur in the block, so a stale replacement fails.
- `<!-- docs-test: skip REASON -->` just before a block does not run it. Only for what cannot run
  offline in CI in seconds (installing packages, pushing to or downloading from the Hub or GitHub,
  benchmarks that take minutes); the reason is required, and `test_skips_are_few_and_explained`
  keeps the list short.

README.md belongs to the whole project and carries no directives; its hidden setup and skips
are `README_SETUP` and `README_SKIP` below.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import io
import os
import re
import shlex
import subprocess
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

import robustwrap

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = sorted(p for p in DOCS.rglob("*.md")) + [ROOT / "README.md"]
MAX_SKIPS = 8
CLONE = ("benchmarks", "hub", "hubconf.py")

README_SETUP = """
docs_test.tiny_timm()
images, labels = docs_test.batch(2)
"""
# README shell blocks that install packages or run this test suite are not run (the full
# `robustwrap certify` of the README's first command is tests/test_cli.py's).
README_SKIP = re.compile(r"pip install|pytest")

FENCE = re.compile(r"^(?P<indent>\s*)(?P<fence>```+|~~~+)\s*(?P<lang>[\w+-]*)\s*(?P<attrs>.*)$")
DIRECTIVE = re.compile(r"^\s*<!--\s*docs-test:\s*(?P<kind>\w+)\s*(?P<arg>.*?)\s*(?P<end>-->)?\s*$")


# --------------------------------------------------------------------------------------- parsing
@dataclass
class Block:
    """A fenced code block, with the docs-test directives written just before it."""

    page: str
    line: int
    lang: str
    title: str | None
    code: str
    skip: str | None = None
    replace: list[tuple[str, str]] = field(default_factory=list)

    @property
    def is_output(self) -> bool:
        return self.lang == "text" and self.title == "Output"

    @property
    def where(self) -> str:
        return f"{self.page}:{self.line}"

    def source(self) -> str:
        code = self.code
        for old, new in self.replace:
            if old not in code:
                raise AssertionError(f"{self.where}: docs-test replace {old!r} does not occur in the block (stale directive)")
            code = code.replace(old, new)
        return code


@dataclass
class Setup:
    """Hidden Python from a `<!-- docs-test: setup ... -->` comment."""

    page: str
    line: int
    code: str


def parse(text: str, page: str) -> list[Block | Setup]:
    """The blocks and hidden setups of a Markdown page, in order."""
    lines = text.splitlines()
    items: list[Block | Setup] = []
    skip, replace, pending_line = None, [], None
    i = 0
    while i < len(lines):
        line, number = lines[i], i + 1
        directive, fence = DIRECTIVE.match(line), FENCE.match(line)
        if directive:
            kind, arg, body = directive["kind"], directive["arg"], []
            if not directive["end"]:
                i += 1
                while i < len(lines) and lines[i].strip() != "-->":
                    body.append(lines[i])
                    i += 1
                if i == len(lines):
                    raise AssertionError(f"{page}:{number}: unterminated docs-test comment (end it with '-->' on a line of its own)")
            if kind == "setup":
                items.append(Setup(page, number, textwrap.dedent("\n".join(([arg] if arg else []) + body))))
            elif kind == "skip" and arg:
                skip, pending_line = arg, number
            elif kind == "replace" and " => " in arg:
                replace.append(tuple(arg.split(" => ", 1)))
                pending_line = number
            else:
                raise AssertionError(f"{page}:{number}: bad docs-test directive {line.strip()!r}: use setup, skip REASON or replace OLD => NEW")
        elif fence:
            indent, marker, body = fence["indent"], fence["fence"], []
            i += 1
            while i < len(lines) and not (lines[i].strip() == marker and lines[i].startswith(indent)):
                body.append(lines[i][len(indent) :] if lines[i].startswith(indent) else lines[i].lstrip())
                i += 1
            title = re.search(r'title="([^"]*)"', fence["attrs"])
            items.append(Block(page, number, fence["lang"].lower(), title and title[1], "\n".join(body) + "\n", skip, replace))
            skip, replace, pending_line = None, [], None
        elif line.strip() and pending_line is not None:
            raise AssertionError(f"{page}:{pending_line}: a docs-test skip/replace must come just before a code block")
        i += 1
    if pending_line is not None:
        raise AssertionError(f"{page}:{pending_line}: a docs-test skip/replace must come just before a code block")
    return items


def page_items(path: Path) -> list[Block | Setup]:
    rel = str(path.relative_to(ROOT))
    text = path.read_text()
    if path.is_relative_to(DOCS) and "<!-- robustwrap:zoo-" in text:
        # Run the page as the site shows it, with the code generated from the zoo manifest. (Sections
        # included from other files are theirs: their commands are benchmarks, not docs examples.)
        text, rel = _hook().expand(text, only=("zoo-table", "zoo-default")), f"{rel} (with generated content)"
    items = parse(text, rel)
    if path.name == "README.md" and path.parent == ROOT:
        items.insert(0, Setup(rel, 0, README_SETUP))
        for item in items:
            if isinstance(item, Block) and item.lang == "bash" and README_SKIP.search(item.code):
                item.skip = "README: installs the package or runs the test suite"
    return items


@functools.cache
def _hook():
    """docs/hooks/robustwrap_docs.py, the MkDocs hook that generates content."""
    spec = importlib.util.spec_from_file_location("robustwrap_docs_hook", DOCS / "hooks" / "robustwrap_docs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ------------------------------------------------------------------------------------- helpers
class Helpers:
    """What hidden setups may use, as `docs_test`: tiny stand-ins and files a page assumes."""

    # The family of each big architecture's stand-in: timm's own tiny test networks.
    FAMILIES = (("vit", "test_vit"), ("deit", "test_vit"), ("convnext", "test_convnext"), ("efficientnet", "test_efficientnet"))

    def __init__(self, monkeypatch: pytest.MonkeyPatch, cwd: Path):
        self.monkeypatch = monkeypatch
        self.cwd = cwd
        self.root = str(ROOT)  # the checkout, e.g. for torch.hub.load(<repo dir>, ...)

    def tiny_timm(self, size: int = 32) -> None:
        """`timm.create_model(<any big model>, pretrained=True)` gives timm's tiny test network of
        the same family, random weights, at `size` x `size`, with the real model's mean and std."""
        import timm

        create = timm.create_model

        def stand_in(name, pretrained=False, **kwargs):
            if str(name).startswith(("hf-hub:", "local-dir:", "test_")):  # already small, or saved files
                return create(name, pretrained=pretrained, **kwargs)
            arch = str(name).split(".")[0]
            tiny = next((t for prefix, t in self.FAMILIES if arch.startswith(prefix)), "test_resnet")
            real = timm.models.get_pretrained_cfg(name) if "." in str(name) else timm.models.get_pretrained_cfg(arch)
            overlay = {"input_size": (kwargs.get("in_chans", 3), size, size), "crop_pct": 1.0}
            if real is not None:
                overlay |= {"mean": real.mean, "std": real.std}
            extra = {"img_size": size} if tiny == "test_vit" else {}
            return create(tiny, pretrained=False, pretrained_cfg_overlay=overlay, **extra, **kwargs)

        self.monkeypatch.setattr(timm, "create_model", stand_in)

    def batch(self, n: int, size: int = 32, num_classes: int = 1000, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """`n` random normalised images and labels."""
        g = torch.Generator().manual_seed(seed)
        return torch.randn(n, 3, size, size, generator=g), torch.randint(num_classes, (n,), generator=g)

    def image(self, path: str, size: tuple[int, int] = (40, 48), seed: int = 0) -> Path:
        """A random RGB image file at `path` (relative to the page's working directory)."""
        import numpy as np
        from PIL import Image

        path = self.cwd / path
        path.parent.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(seed)
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(path)
        return path

    def image_folder(self, root: str, classes=("cat", "dog"), per_class: int = 4, seed: int = 0) -> Path:
        """An ImageFolder tree `root/<class>/<i>.png` of random images."""
        for c, name in enumerate(classes):
            for i in range(per_class):
                self.image(f"{root}/{name}/{i}.png", seed=seed + 100 * c + i)
        return self.cwd / root


# ----------------------------------------------------------------------------------- running
def _capture_stdout():
    buffer = io.StringIO()
    return buffer, contextlib.redirect_stdout(buffer)


def _run_cli(argv: list[str]) -> str:
    from robustwrap.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    if code != 0:
        raise AssertionError(f"robustwrap {shlex.join(argv)} exited {code}: {err.getvalue().strip()}")
    return out.getvalue()


def _shell_env(shim: Path) -> dict:
    return {
        **os.environ,
        "PATH": f"{shim}{os.pathsep}{os.environ.get('PATH', '')}",
        "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
    }


def _commands(code: str) -> list[str]:
    commands, current = [], ""
    for line in code.splitlines():
        if line.rstrip().endswith("\\"):
            current += line.rstrip()[:-1] + " "
            continue
        current += line
        if current.strip() and not current.strip().startswith("#"):
            commands.append(current.strip())
        current = ""
    return commands


def run_bash(block: Block, cwd: Path, shim: Path) -> str:
    out = []
    for command in _commands(block.source()):
        if command.startswith("robustwrap ") and not any(c in command for c in "|&;<>$`"):
            out.append(_run_cli(shlex.split(command, comments=True)[1:]))
        else:
            done = subprocess.run(["bash", "-c", command], check=False, cwd=cwd, env=_shell_env(shim), capture_output=True, text=True, timeout=300)
            if done.returncode != 0:
                raise AssertionError(f"{block.where}: `{command}` exited {done.returncode}:\n{done.stderr[-3000:]}")
            out.append(done.stdout)
    return "".join(out)


def matches(expected: str, actual: str) -> bool:
    """`actual` equals `expected` up to trailing spaces, with `...` matching any text."""

    def norm(text: str) -> str:
        return "\n".join(line.rstrip() for line in text.strip("\n").splitlines())

    pattern = ".*?".join(re.escape(part) for part in norm(expected).split("..."))
    return re.fullmatch(pattern, norm(actual), flags=re.DOTALL) is not None


def run_page(path: Path, cwd: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    items = page_items(path)
    for name in CLONE:  # the working directory looks like a clone: `python benchmarks/...`, torch.hub.load(".")
        (cwd / name).symlink_to(ROOT / name)
    shim = cwd / ".bin"
    shim.mkdir()
    # shell scripts, not symlinks: a venv's python found through a link elsewhere does not see the venv's pyvenv.cfg
    for command, run in (("robustwrap", "-m robustwrap.cli "), ("torchrun", "-m torch.distributed.run "), ("python", "")):
        (shim / command).write_text(f'#!/bin/sh\nexec "{sys.executable}" {run}"$@"\n')
        (shim / command).chmod(0o755)
    monkeypatch.chdir(cwd)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    namespace = {"__name__": "__docs__", "docs_test": Helpers(monkeypatch, cwd)}
    last_output: tuple[Block, str] | None = None
    for item in items:
        if isinstance(item, Setup):
            exec(compile(item.code, f"{item.page}:{item.line} (docs-test setup)", "exec"), namespace)  # noqa: S102 - running the docs is the point
            continue
        if item.is_output:
            if last_output is None:
                raise AssertionError(f"{item.where}: an Output block must follow the block that prints it")
            block, printed = last_output
            if not matches(item.code, printed):
                raise AssertionError(f"{item.where}: the output of {block.where} differs from the page.\n--- page:\n{item.code}--- actual:\n{printed}")
            last_output = None
            continue
        if item.skip is not None or item.lang not in ("python", "bash"):
            last_output = None
            continue
        if item.lang == "python" and item.title:
            (cwd / item.title).write_text(item.source())
            continue
        if item.lang == "python":
            buffer, redirect = _capture_stdout()
            try:
                with redirect:
                    exec(compile(item.source(), item.where, "exec"), namespace)  # noqa: S102
            except Exception as error:
                raise AssertionError(f"{item.where}: the python block failed: {type(error).__name__}: {error}") from error
            last_output = (item, buffer.getvalue())
        else:
            last_output = (item, run_bash(item, cwd, shim))


# ------------------------------------------------------------------------------------- tests
@pytest.fixture
def one_thread():
    """One torch thread: the same speed on an idle 2-core runner and on a busy shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("path", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_page_runs(path, tmp_path, monkeypatch, one_thread):
    run_page(path, tmp_path, monkeypatch)




# The rules the code implements, each under a stable anchor of the Concepts page (docstrings cite them).
CONCEPTS_ANCHORS = (
    "threat-model", "patch-size", "ties", "fill", "precision", "margin", "settings",
    "mask-sets", "double-masking", "certification", "what-a-certificate-proves",
    "smoothing", "smoothing-delta", "smoothing-certificate", "smoothing-early-exit",
    "patchguard", "robust-masking", "patchguard-certificate",
    "training", "results", "hub-format",
)  # fmt: skip
# What users get: the docs, the README, the package, the zoo recipes and the benchmarks (whose
# records the docs include).
USER_FILES = sorted(
    [*PAGES, ROOT / "hubconf.py", *(ROOT / "robustwrap").rglob("*.py"), *(ROOT / "robustwrap").rglob("*.md")]
    + [*(ROOT / "hub").rglob("*.py"), *(ROOT / "hub").rglob("*.md"), *(ROOT / "benchmarks").glob("*.*")]
)


def test_the_project_carries_its_own_contract():
    """Every rule has its anchor on the Concepts page; nothing users get points to a design file they
    do not have, to an anchor that does not exist, or to a repository that does not exist (issue 9, item 9)."""
    concepts = (DOCS / "concepts.md").read_text()
    for anchor in CONCEPTS_ANCHORS:
        assert f"{{ #{anchor} }}" in concepts, f"docs/concepts.md has no section with the anchor #{anchor}"
    anchors = set(re.findall(r"\{ #([\w-]+) \}", concepts))
    for path in USER_FILES:
        if not path.is_file() or path.suffix not in (".py", ".md", ".txt", ".json"):
            continue
        text, where = path.read_text(), path.relative_to(ROOT)
        assert "DESIGN.md" not in text and "../shared" not in text, f"{where} points to the internal design file; cite docs/concepts.md"
        assert "github.com/robustwrap" not in text, f"{where} names a repository that does not exist"
        for anchor in re.findall(r"concepts\.md#([\w-]+)", text):
            assert anchor in anchors, f"{where} cites docs/concepts.md#{anchor}, which does not exist"
    config = (ROOT / "mkdocs.yml").read_text()
    assert "repo_url" not in config and "github.com" not in config


def test_generated_content_expands_on_every_page():
    """Every `<!-- robustwrap:... -->` marker renders (a renamed README section or command fails here)."""
    hook = _hook()
    for path in DOCS.rglob("*.md"):
        expanded = hook.expand(path.read_text())
        assert "<!-- robustwrap:" not in expanded, path


def test_zoo_page_is_generated_from_the_manifest():
    hook = _hook()
    assert "<!-- robustwrap:zoo-table -->" in (DOCS / "zoo.md").read_text()
    manifest = hook.load_manifest()
    table = hook.zoo_table(manifest)
    for entry in manifest["models"]:
        assert f"`{entry['name']}`" in table
        if "base" in entry:  # Hub-backed: the paper's claims and the command that measures them
            assert entry["measure_with"] in table
            continue
        assert f"{100 * entry['metrics']['certified_accuracy']:.1f}%" in table
        assert entry["sha256"] in table


def test_cli_reference_covers_every_command():
    from robustwrap.cli import _parser

    page = (DOCS / "cli.md").read_text()
    sub = next(a for a in _parser()._actions if a.__class__.__name__ == "_SubParsersAction")
    for command in sub.choices:
        assert f"<!-- robustwrap:cli-help {command} -->" in page, f"docs/cli.md does not show `robustwrap {command} --help`"


def test_every_public_name_is_in_the_api_reference():
    pages = "\n".join(p.read_text() for p in (DOCS / "api").glob("*.md"))
    overview = (DOCS / "api" / "index.md").read_text()
    for name in robustwrap.__all__:
        if name != "__version__":
            assert f"::: robustwrap.{name}\n" in pages, f"robustwrap.{name} is missing from docs/api/"
            assert f"[robustwrap.{name}]" in overview, f"robustwrap.{name} is missing from the table of docs/api/index.md"


def test_rendered_pages_show_no_literal_escapes():
    """Every page, rendered with the site's Markdown extensions, shows no `\\|` (issue 18, item 11):
    Python-Markdown prints a backslash-escaped pipe in a table's code span as it is."""
    import markdown
    import yaml

    hook = _hook()
    extensions = yaml.safe_load((ROOT / "mkdocs.yml").read_text())["markdown_extensions"]
    names = [e if isinstance(e, str) else next(iter(e)) for e in extensions]
    configs = {k: v for e in extensions if isinstance(e, dict) for k, v in e.items() if v}
    table = "| option | values |\n|---|---|\n| `--ablation` | `column\\|row` |\n"
    assert len(hook.literal_escapes(markdown.markdown(table, extensions=names, extension_configs=configs))) == 1  # the check sees it
    for path in PAGES:
        html = markdown.markdown(hook.expand(path.read_text()), extensions=names, extension_configs=configs)
        assert hook.literal_escapes(html) == [], f"{path.relative_to(ROOT)} shows a literal backslash"


def test_images_on_pages_are_generated():
    hook = _hook()
    for path in DOCS.rglob("*.md"):
        for image in re.findall(r"\]\(((?:\.\./)*images/[^)\s]+)\)", path.read_text()):
            assert re.sub(r"^(\.\./)+", "", image) in hook.FIGURES, f"{path}: {image} is not drawn by docs/hooks/robustwrap_docs.py"


def test_skips_are_few_and_explained():
    skips = [item for path in PAGES for item in page_items(path) if isinstance(item, Block) and item.skip]
    assert all(len(block.skip) > 10 for block in skips)
    assert len(skips) <= MAX_SKIPS, "too many skipped blocks: " + ", ".join(b.where for b in skips)


# ----------------------------------------------------------------------- the harness itself
def test_parse_reads_directives_blocks_and_outputs():
    page = textwrap.dedent(
        '''
        <!-- docs-test: setup
        x = 1
        -->

        <!-- docs-test: replace 40 => 41 -->
        ```python
        print(x + 40)
        ```

        ```text title="Output"
        42
        ```

        <!-- docs-test: skip needs the network -->
        ```bash
        pip install robustwrap
        ```

            ```python title="job.py"
            print("indented, a file")
            ```
        '''
    )
    setup, block, output, skipped, file = parse(page, "page.md")
    assert isinstance(setup, Setup) and setup.code.strip() == "x = 1"
    assert block.lang == "python" and block.source() == "print(x + 41)\n" and block.line == 7
    assert output.is_output and output.code == "42\n"
    assert skipped.skip == "needs the network" and skipped.lang == "bash"
    assert file.title == "job.py" and file.code == 'print("indented, a file")\n'


@pytest.mark.parametrize(
    "page",
    [
        "<!-- docs-test: skip -->\n```python\npass\n```\n",  # no reason
        "<!-- docs-test: replace a b -->\n```python\npass\n```\n",  # no =>
        "<!-- docs-test: skip offline -->\n\nsome prose\n\n```python\npass\n```\n",  # not just before a block
        "<!-- docs-test: frobnicate -->\n",
        "<!-- docs-test: setup\nx = 1\n",  # unterminated
    ],
)
def test_parse_refuses_bad_directives(page):
    with pytest.raises(AssertionError):
        parse(page, "page.md")


def test_stale_replace_fails():
    (block,) = parse("<!-- docs-test: replace resnet50 => test_resnet -->\n```python\nprint(1)\n```\n", "page.md")
    with pytest.raises(AssertionError, match="stale"):
        block.source()


def test_output_matching():
    assert matches("a\n...\nz\n", "a\nb\nc\nz")
    assert matches("speed ... images/s  \n", "speed 12.5 images/s")
    assert not matches("certified 90%\n", "certified 91%")
