"""`robustwrap masks`: a defense's views at a threat model, without a model."""

from __future__ import annotations

import argparse
from pathlib import Path

from ._format import _columns
from ._options import DEFENSE_NAMES, _check_defense_options, _defense_groups, _image_size, _in_option_words, _int_pair, _single_patch


def register(commands, common: argparse.ArgumentParser) -> None:
    """`robustwrap masks`: its subparser."""
    masks = commands.add_parser(
        "masks",
        parents=[common],
        help="show a defense's views for a patch: a mask set, ablated bands or blocks, a PatchGuard window, or PatchCURE's feature masks",
        description="The geometry of a defense at a threat model, without a model, as a table and (--plot) a picture: "
        "PatchCleanser's mask set, smoothing's ablated views and the number a patch meets, PatchGuard's feature window, or "
        "PatchCURE's feature mask set of a ViT split (--window in tokens of --token-size pixels) drawn on the image.",
    )
    masks.add_argument("--image-size", type=_image_size, default=(224, 224), help="H or HxW (default 224)")
    masks.add_argument("--patch", type=_single_patch, default=0.02, help="pixels (32), a percentage of the image area (2%%) or a fraction (0.02); default 2%%")
    masks.add_argument("--defense", choices=DEFENSE_NAMES, default="patchcleanser", help="the defense whose views to show (default patchcleanser)")
    _defense_groups(masks)
    masks.add_argument(
        "--token-size",
        type=_int_pair(1),
        default=16,
        metavar="P",
        help="--defense patchcure: pixels per ViT token, P or PHxPW (default 16); a cell is --window tokens",
    )
    masks.add_argument(
        "--plot",
        type=Path,
        metavar="FILE",
        help="draw the geometry to FILE (e.g. masks.png): PatchCleanser's mask set, smoothing's views and how many a patch "
        "meets, PatchGuard's window of local logits, or PatchCURE's feature mask set on the image (cells and the pixels they see)",
    )
    masks.set_defaults(run=_masks)


def _masks(args: argparse.Namespace) -> None:
    from ..geometry import MaskSet

    _check_defense_options(args, args.defense, None)
    if args.defense != "patchcleanser":
        with _in_option_words(args.defense):  # the geometry's errors name its Python keywords
            describe = {"smoothing": _smoothing_views, "patchguard": _patchguard_window, "patchcure": _patchcure_masks}[args.defense]
            text = describe(args)
        print(text + (f"\n\npicture: {args.plot}" if args.plot is not None else ""))
        return
    grid = {"stride": args.stride} if args.stride else {"num_masks": args.num_masks} if args.num_masks else {}
    with _in_option_words(args.defense):
        mask_set = MaskSet.square(args.image_size, args.patch, **grid)
    if args.plot is not None:
        # The picture first: `robustwrap masks --plot x.png | head` closes stdout early.
        from ..plots import plot_mask_set

        plot_mask_set(mask_set, path=args.plot)
    k = len(mask_set)
    tops = sorted({b[0] for b in mask_set.boxes})
    lefts = sorted({b[1] for b in mask_set.boxes})
    lines = [
        mask_set.describe(),
        f"views per image: {k} one-mask + {k * (k - 1) // 2} two-mask = {k * (k + 1) // 2} (K(K+1)/2)",
        f"row starts (top):   {' '.join(map(str, tops))}",
        f"col starts (left):  {' '.join(map(str, lefts))}",
        "",
    ]
    rows = [("mask", "top", "left", "height", "width")] + [(str(i), *map(str, box)) for i, box in enumerate(mask_set.boxes)]
    lines.append(_columns(rows))
    if args.plot is not None:
        lines.append(f"\npicture: {args.plot}")
    print("\n".join(lines))


def _smoothing_views(args: argparse.Namespace) -> str:
    """`robustwrap masks --defense smoothing`: the ablated views, Δ and the vote margin a certificate needs."""
    from ..defenses.smoothing import _check_certifiable
    from ..geometry import AblationSet, patch_side

    if args.ablation_size is None:
        raise ValueError("--defense smoothing needs --ablation-size N (the band width / block side in pixels)")
    views = AblationSet(args.image_size, args.ablation or "column", args.ablation_size, args.ablation_stride or 1)
    h, w = views.image_size
    side = patch_side(args.patch, (h, w)) if isinstance(args.patch, float) else args.patch
    delta = views.delta(side)
    _check_certifiable(views, (side, side))
    if args.plot is not None:  # the picture first: `robustwrap masks --plot x.png | head` closes stdout early
        from ..plots import plot_ablation_set

        plot_ablation_set(views, side, path=args.plot)
    rows = [("view", "top", "left")] + [(str(i), str(r), str(c)) for i, (r, c) in enumerate(views.positions())]
    lines = [
        f"patch {side}x{side} px ({100 * side * side / (h * w):.2f}% of {h}x{w}); {views.describe()}",
        f"a patch meets at most Δ={delta} of the V={len(views)} views: a certificate needs a vote margin above 2Δ={2 * delta}",
        "",
        _columns(rows),
    ]
    return "\n".join(lines)


def _patchguard_window(args: argparse.Namespace) -> str:
    """`robustwrap masks --defense patchguard`: the feature window one patch can touch."""
    from ..geometry import feature_window, patch_side

    missing = [f"--{d.replace('_', '-')}" for d in ("receptive_field", "feature_stride") if getattr(args, d) is None]
    if missing:
        raise ValueError(f"--defense patchguard needs {' and '.join(missing)} (and --feature-offset when the model pads)")
    h, w = args.image_size
    r, s, o = (v if isinstance(v, tuple) else (v, v) for v in (args.receptive_field, args.feature_stride, args.feature_offset or 0))
    # A map that covers the image as a convolution padded by o on each side does.
    size = tuple((n + 2 * oo - rr) // ss + 1 for n, rr, ss, oo in zip((h, w), r, s, o))
    if min(size) < 1:
        raise ValueError(f"a receptive field of {r[0]}x{r[1]} px does not fit in the {h}x{w} image")
    side = patch_side(args.patch, (h, w)) if isinstance(args.patch, float) else args.patch
    window = feature_window((h, w), side, r, s, o, size)
    if args.plot is not None:  # the picture first: `robustwrap masks --plot x.png | head` closes stdout early
        from ..plots import plot_feature_window

        plot_feature_window((h, w), side, r, s, o, size, path=args.plot)
    geometry = f"receptive field {r[0]}x{r[1]} px, stride {s[0]}x{s[1]}, offset {o[0]}x{o[1]}; (H + 2o - r) // s + 1 per axis"
    return (
        f"patch {side}x{side} px ({100 * side * side / (h * w):.2f}% of {h}x{w}); local logits {size[0]}x{size[1]} ({geometry})\n"
        f"a patch touches at most a {window[0]}x{window[1]} window of local logits: robust masking removes each class's "
        f"largest {window[0]}x{window[1]} window of evidence"
    )


def _patchcure_masks(args: argparse.Namespace) -> str:
    """`robustwrap masks --defense patchcure`: the feature mask set of a ViT split, in cells and pixels."""
    from .._args import as_pair
    from ..defenses.patchcure import _describe_cells, _feature_masks
    from ..geometry import patch_pixels

    if args.window is None:
        raise ValueError("--defense patchcure needs --window WHxWW (tokens per window of the ViT split; --split does not change the masks)")
    (h, w), token = args.image_size, as_pair(args.token_size, "--token-size")
    cell = tuple(int(n) * int(t) for n, t in zip(as_pair(args.window, "--window"), token))
    if h % cell[0] or w % cell[1]:
        raise ValueError(
            f"--window {args.window} of {token[0]}x{token[1]} px tokens makes {cell[0]}x{cell[1]} px cells, which do not tile the {h}x{w} image"
        )
    grid = (h // cell[0], w // cell[1])
    stride = as_pair(args.mask_stride or 1, "--mask-stride")
    patch = patch_pixels(args.patch, (h, w))
    # A ViT split's cell is its window of tokens: it sees exactly its own pixels (r = s = the cell, o = 0).
    masks = _feature_masks((h, w), patch, cell, cell, (0, 0), grid, stride)
    if args.plot is not None:  # the picture first: `robustwrap masks --plot x.png | head` closes stdout early
        from ..plots import plot_feature_mask_set

        plot_feature_mask_set(masks, (h, w), patch, cell, cell, 0, path=args.plot)
    k = len(masks)
    rows = [("mask", "top", "left", "height", "width", "pixels (top, left, height, width)")]
    for i, (top, left, bh, bw) in enumerate(masks.boxes):
        rows.append((str(i), str(top), str(left), str(bh), str(bw), f"{top * cell[0]}, {left * cell[1]}, {bh * cell[0]}, {bw * cell[1]}"))
    lines = [
        _describe_cells((h, w), patch, masks, cell, cell, stride),
        f"cells of {cell[0]}x{cell[1]} px ({cell[0] // token[0]}x{cell[1] // token[1]} tokens of {token[0]}x{token[1]} px); "
        "the SRF runs once per image, the LRF once per view; masks in cells, and the pixels their cells see",
        f"views per image: {k} one-mask + {k * (k - 1) // 2} two-mask = {k * (k + 1) // 2} (K(K+1)/2)",
        "",
        _columns(rows),
    ]
    return "\n".join(lines)
