"""MaskSet against the Concepts page (docs/concepts.md#mask-sets) and against brute force."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from robustwrap import MaskSet
from robustwrap.geometry import patch_side

# (patch, num_masks, stride) -> (mask side, stride, starts) for N = 224, from the Concepts page.
CONCEPTS_TABLE = [
    (32, 6, None, 64, 33, (0, 33, 66, 99, 132, 160)),
    (23, 6, None, 56, 34, None),
    (39, 6, None, 69, 31, None),
    (32, 3, None, 96, 65, None),
    (35, 6, None, 66, 32, None),
    (32, None, 32, 63, 32, None),
]


@pytest.mark.parametrize("patch,k,stride,mask,step,starts", CONCEPTS_TABLE)
def test_design_table(patch, k, stride, mask, step, starts):
    ms = MaskSet.square(224, patch, num_masks=k, stride=stride) if stride is None else MaskSet.square(224, patch, stride=stride)
    assert ms.mask_size == (mask, mask)
    assert ms.stride == (step, step)
    rows = sorted({b[0] for b in ms.boxes})
    if starts is not None:
        assert tuple(rows) == starts
    assert rows[-1] == 224 - mask  # last mask flush with the edge
    assert ms.patch_size == (patch, patch)


def test_design_counts():
    assert len(MaskSet.square(224, 32)) == 36
    assert len(MaskSet.square(224, 32, num_masks=3)) == 9
    ms = MaskSet.square(224, 32, stride=32)
    assert len(ms) == 49 and ms.boxes[-1][0] == 161 and ms.grid == (7, 7)


@pytest.mark.parametrize("fraction,side", [(0.01, 23), (0.02, 32), (0.03, 39)])
def test_area_fraction(fraction, side):
    assert patch_side(fraction, 224) == side
    assert MaskSet.square(224, fraction).patch_size == (side, side)


def test_area_fraction_is_exact_at_perfect_squares():
    assert patch_side(0.04, 100) == 20  # 0.04 * 100 * 100 is 400.00000000000006 in floats
    assert patch_side(0.25, (16, 64)) == 16


def test_boxes_row_major():
    ms = MaskSet.square(224, 32)
    assert list(ms.boxes) == sorted(ms.boxes, key=lambda b: (b[0], b[1]))
    assert ms.boxes[1] == (0, 33, 64, 64) and ms.boxes[6] == (33, 0, 64, 64)


def brute_covers(image, patch, boxes) -> bool:
    (h, w), (ph, pw) = image, patch
    return all(
        any(t <= r and l <= c and r + ph <= t + bh and c + pw <= l + bw for t, l, bh, bw in boxes)
        for r in range(h - ph + 1)
        for c in range(w - pw + 1)
    )


def formula_starts(n, p, k=None, stride=None):
    s = math.ceil((n - p + 1) / k) if stride is None else stride
    m = min(p + s - 1, n)
    starts, a = [], 0
    while a <= n - m:
        starts.append(a)
        a += s
    if starts[-1] != n - m:
        starts.append(n - m)
    return m, starts


@st.composite
def geometries(draw):
    h = draw(st.integers(1, 40))
    w = draw(st.integers(1, 40))
    ph = draw(st.integers(1, h))
    pw = draw(st.integers(1, w))
    if draw(st.booleans()):
        return (h, w), (ph, pw), dict(num_masks=(draw(st.integers(1, 8)), draw(st.integers(1, 8))))
    return (h, w), (ph, pw), dict(stride=(draw(st.integers(1, 45)), draw(st.integers(1, 45))))


@pytest.mark.filterwarnings("ignore:num_masks=.*cannot be honoured")
@settings(max_examples=300, deadline=None)
@given(geometries())
def test_grid_matches_formula_and_covers(geometry):
    image, patch, kwargs = geometry
    ms = MaskSet.rect(image, patch, **kwargs)
    ks = kwargs.get("num_masks", (None, None))
    strides = kwargs.get("stride", (None, None))
    mh, rows = formula_starts(image[0], patch[0], ks[0], strides[0])
    mw, cols = formula_starts(image[1], patch[1], ks[1], strides[1])
    assert ms.boxes == tuple((t, l, mh, mw) for t in rows for l in cols)
    assert len(ms) == len(rows) * len(cols)
    assert brute_covers(image, patch, ms.boxes)
    assert ms.covers(patch)


@st.composite
def box_sets(draw):
    """An image side, a patch side and boxes inside the image. Half the draws start from a
    covering grid and drop or add a few boxes, so both the covered and the uncovered branch are
    reached often (uniformly random boxes almost never cover)."""
    size = draw(st.integers(4, 20))
    patch = draw(st.integers(1, 4))

    def box():
        top, left = draw(st.integers(0, size - 1)), draw(st.integers(0, size - 1))
        return (top, left, draw(st.integers(1, size - top)), draw(st.integers(1, size - left)))

    if draw(st.booleans()):
        grid = list(MaskSet.square(size, patch, stride=draw(st.integers(1, size))).boxes)
        dropped = set(draw(st.lists(st.integers(0, len(grid) - 1), max_size=2, unique=True)))
        boxes = [b for i, b in enumerate(grid) if i not in dropped] or grid[:1]
        boxes += [box() for _ in range(draw(st.integers(0, 2)))]
    else:
        boxes = [box() for _ in range(draw(st.integers(1, 8)))]
    return size, patch, boxes


@settings(max_examples=200, deadline=None)
@given(box_sets())
def test_covers_is_exhaustive(geometry):
    size, patch, boxes = geometry
    expected = brute_covers((size, size), (patch, patch), boxes)
    if expected:
        assert MaskSet((size, size), tuple(boxes), ((patch, patch),)).covers(patch)
    else:
        with pytest.raises(ValueError, match="do not cover"):
            MaskSet((size, size), tuple(boxes), ((patch, patch),))


def test_box_sets_reach_both_branches():
    """The strategy above is not vacuous: it gives covering and non-covering sets alike."""
    seen = set()

    @settings(max_examples=100, deadline=None, database=None)
    @given(box_sets())
    def collect(geometry):
        size, patch, boxes = geometry
        seen.add(brute_covers((size, size), (patch, patch), boxes))

    collect()
    assert seen == {True, False}


def test_uncovered_set_is_an_error():
    full = MaskSet.square(32, 5, num_masks=3)
    with pytest.raises(ValueError, match="do not cover every position of a 5x5 patch"):
        MaskSet(full.image_size, full.boxes[:-1], full.patch_sizes)


@pytest.mark.parametrize("k", [6, 5])
def test_coarsen_is_exact_union_of_children(k):
    fine = MaskSet.square(224, 32, num_masks=k)
    coarse = fine.coarsen(2)
    assert coarse.grid == (math.ceil(k / 2),) * 2 and len(coarse) == math.ceil(k / 2) ** 2
    fine_keep, coarse_keep = fine.keep_masks(), coarse.keep_masks()
    for c, kids in enumerate(coarse.children):
        assert len(kids) == (4 if k == 6 else len(kids))
        union_keep = fine_keep[list(kids)].all(0)
        assert torch.equal(coarse_keep[c], union_keep)
    assert sorted(i for kids in coarse.children for i in kids) == list(range(len(fine)))
    assert coarse.covers(32)
    if k == 6:
        assert all(len(kids) == 4 for kids in coarse.children)


@pytest.mark.filterwarnings("ignore:num_masks=.*cannot be honoured")
def test_union_covers_both_shapes():
    a = MaskSet.square(64, 8, num_masks=4)
    b = MaskSet.rect(64, (4, 20), num_masks=4)
    u = a | b
    assert len(u) == len(a) + len(b)
    assert u.patch_sizes == ((8, 8), (4, 20))
    assert u.covers(8) and u.covers((4, 20))
    assert len(a | a) == len(a)
    with pytest.raises(ValueError, match="several patch shapes"):
        u.patch_size
    with pytest.raises(ValueError, match="cannot unite"):
        a | MaskSet.square(32, 8)


def test_keep_masks():
    ms = MaskSet.square(20, 3, num_masks=4)
    keep = ms.keep_masks()
    assert keep.shape == (len(ms), 20, 20) and keep.dtype == torch.bool
    for k, (t, l, h, w) in enumerate(ms.boxes):
        assert int((~keep[k]).sum()) == h * w
        assert not keep[k, t : t + h, l : l + w].any()


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(image_size=224, patch=0), "patch must be a positive int, got 0"),
        (dict(image_size=224, patch=-3), "patch must be a positive int"),
        (dict(image_size=224, patch=1.5), r"fraction of the image area must be in \(0, 1\), got 1.5"),
        (dict(image_size=224, patch=0.0), r"must be in \(0, 1\)"),
        (dict(image_size=224, patch=225), "larger than the 224x224 image"),
        (dict(image_size=224, patch=32, num_masks=0), "num_masks must be a positive int, got 0"),
        (dict(image_size=224, patch=32, num_masks=6, stride=32), "not both"),
        (dict(image_size=0, patch=3), "image_size must be a positive int"),
        (dict(image_size=(224, 224, 3), patch=3), "pair"),
        (dict(image_size=224, patch=32, stride=0), "stride must be a positive int"),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MaskSet.square(**kwargs)


def test_stride_alone_is_not_both():
    assert len(MaskSet.square(224, 32, stride=32)) == 49


def test_not_given_num_masks_is_the_default():
    # "not given" is None: with neither num_masks nor stride the grid is 6x6 (no sentinel ints)
    assert MaskSet.square(224, 32, num_masks=None) == MaskSet.square(224, 32) == MaskSet.square(224, 32, num_masks=6)
    assert len(MaskSet.square(224, 32, num_masks=None, stride=None)) == 36


def test_rect_rejects_fractions():
    with pytest.raises(ValueError, match="positive int"):
        MaskSet.rect(224, (0.1, 0.2))


def test_describe_reports_pixels_and_percent():
    assert MaskSet.square(224, 0.02).describe() == "patch 32x32 px (2.04% of 224x224); 36 masks (6x6) of 64x64 px, stride 33x33"


def test_dict_round_trip_for_every_kind_of_set():
    import json

    fine = MaskSet.square(64, 8, num_masks=6)
    for ms in (fine, fine.coarsen(2), fine | MaskSet.rect(64, (4, 20), num_masks=3), MaskSet.square(64, 8, stride=8)):
        assert MaskSet.from_dict(json.loads(json.dumps(ms.to_dict()))) == ms
    broken = fine.to_dict()
    broken["boxes"] = broken["boxes"][:-1]
    with pytest.raises(ValueError, match="do not cover"):
        MaskSet.from_dict(broken)


def test_num_masks_the_formula_cannot_honour_is_said_and_warned():
    # patch=200 on 224 leaves 25 positions per axis: s = ceil(25 / 6) = 5, m = 204, starts 0..20 -> 5 per axis
    with pytest.warns(UserWarning, match=r"num_masks=6x6 cannot be honoured for a 200x200 px patch on a 224x224 image: the mask-set formula gives 5x5"):
        ms = MaskSet.square(224, 200)
    assert ms.grid == (5, 5) and len(ms) == 25
    assert ms.describe().endswith("(num_masks=6x6 asked for; the formula gives 5x5)")
    assert MaskSet.from_dict(ms.to_dict()).describe() == ms.describe()
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an honoured count, or a stride, is silent
        assert "asked for" not in MaskSet.square(224, 32).describe()
        assert "asked for" not in MaskSet.square(224, 200, stride=5).describe()


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("boxes", [[0.5, 0, 8, 8]], r"boxes\[0\] must be a list of 4 ints >= 0, got \[0.5, 0, 8, 8\]"),
        ("boxes", [[0, 0, 8]], r"boxes\[0\] must be a list of 4 ints"),
        ("boxes", [], "boxes must be a non-empty list"),
        ("image_size", [64, "64"], "image_size must be a list of 2 ints >= 1"),
        ("image_size", [64, True], "image_size must be a list of 2 ints >= 1"),
        ("patch_sizes", [[0, 8]], r"patch_sizes\[0\] must be a list of 2 ints >= 1"),
        ("grid", [6, 6.0], "grid must be a list of 2 ints >= 1"),
        ("boxes", [[60, 60, 8, 8]], "is not inside the 64x64 image"),
    ],
)
def test_from_dict_checks_untrusted_input(field, value, message):
    data = MaskSet.square(64, 8, num_masks=6).to_dict()
    data[field] = value
    with pytest.raises(ValueError, match=message):
        MaskSet.from_dict(data)


def test_from_dict_wrong_container():
    with pytest.raises(TypeError, match="must be a dict"):
        MaskSet.from_dict([1, 2])
    data = MaskSet.square(64, 8).to_dict()
    del data["boxes"]
    with pytest.raises(ValueError, match="lacks boxes"):
        MaskSet.from_dict(data)


# ------------------------------------------------- issue 18: patch spellings, as the CLI takes them
@pytest.mark.parametrize(("text", "number"), [("32", 32), ("32px", 32), (" 32PX ", 32), ("2%", 0.02), ("0.5%", 0.005), ("0.02", 0.02), (".02", 0.02)])
def test_a_patch_written_as_text_is_the_number_it_spells(text, number):
    from robustwrap.geometry import patch_pixels

    assert MaskSet.square(224, text) == MaskSet.square(224, number)
    assert patch_pixels(text, 224) == patch_pixels(number, 224)
    assert MaskSet.square(224, "2%").patch_size == (32, 32)  # the Concepts page's 2% of 224x224


@pytest.mark.parametrize("text", ["abc", "0", "0px", "0%", "100%", "1.5", "2 percent", "-3", "", "3x3"])
def test_a_patch_string_that_spells_nothing_is_refused(text):
    from robustwrap.geometry import patch_pixels

    with pytest.raises(ValueError, match=r"patch must be pixels \('32' or '32px'\), a percentage of the image area \('2%'\)"):
        MaskSet.square(224, text)
    with pytest.raises(ValueError, match="patch must be pixels"):
        patch_pixels(text, 224)
