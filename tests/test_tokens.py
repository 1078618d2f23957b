"""Token dropping (`drop_tokens`) for (De)Randomized Smoothing on timm's vision transformers.

The reference below is independent of robustwrap's view scheduling, token masks and batching:
one view at a time, pixels ablated by explicit loops over view positions, a token kept when
any of its pixels is, then timm's public `patch_embed`, `_pos_embed`, `blocks`, `norm` and
`forward_head`.
"""

from __future__ import annotations

import copy

import pytest
import timm
import torch
from torch import nn

import robustwrap
from robustwrap.dataset import model_fingerprint
from robustwrap.defenses.smoothing import DerandomizedSmoothing, RandomAblation, ViewTokens, view_logits
from robustwrap.tokens import token_grid, views_per_pass

SIZE = 32


def _vit(seed: int = 0, **kwargs) -> nn.Module:
    torch.manual_seed(seed)
    options = {"img_size": SIZE, "patch_size": 8, "depth": 2, "num_classes": 5, **kwargs}
    model = timm.create_model(options.pop("name", "vit_tiny_patch16_224"), **options).eval()
    with torch.no_grad():  # larger weights: views disagree, so the vote counts say something
        for p in model.parameters():
            p.mul_(4.0)
    return model


MODELS = {
    "vit": lambda: _vit(),
    "registers": lambda: _vit(1, reg_tokens=4, no_embed_class=True),
    "deit_distilled": lambda: _vit(2, name="deit_tiny_distilled_patch16_224", depth=1),
    "rectangular": lambda: _vit(3, img_size=(SIZE, 24), depth=1),
    "pre_norm": lambda: _vit(5, pre_norm=True, depth=1),  # a LayerNorm before the blocks (CLIP-style): norm_pre
}


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.num_classes = 4

    def forward(self, x):
        return self.conv(x).mean((2, 3))


def _positions(n: int, size: int, stride: int) -> list[list[int]]:
    return [[(q + t) % n for t in range(size)] for q in range(0, n, stride)]


def _reference_keeps(h: int, w: int, ablation: str, size: int, stride: int) -> list[torch.Tensor]:
    rows = _positions(h, size, stride) if ablation in ("row", "block") else [list(range(h))]
    cols = _positions(w, size, stride) if ablation in ("column", "block") else [list(range(w))]
    keeps = []
    for r in rows:
        for c in cols:
            keep = torch.zeros(h, w, dtype=torch.bool)
            keep[torch.tensor(r)[:, None], torch.tensor(c)[None, :]] = True
            keeps.append(keep)
    return keeps


def _reference_logits(model, image, keep, encoding, fill, drop=True) -> torch.Tensor:
    if encoding == "fill":
        view = torch.where(keep, image, torch.tensor(fill))
    else:
        view = torch.cat([image, 1 - image]) * keep
    if not drop:
        return model(view[None])[0]
    ph, pw = model.patch_embed.patch_size
    h, w = keep.shape
    token_keep = keep.reshape(h // ph, ph, w // pw, pw).any(3).any(1).flatten()
    tokens = model._pos_embed(model.patch_embed(view[None]))
    chosen = torch.cat([torch.ones(model.num_prefix_tokens, dtype=torch.bool), token_keep])
    tokens = model.norm_pre(tokens[:, chosen])
    for block in model.blocks:
        tokens = block(tokens)
    return model.forward_head(model.norm(tokens))[0]


def _reference_counts(model, x, ablation, size, stride, threshold, encoding, fill=0.0, drop=True) -> torch.Tensor:
    keeps = _reference_keeps(x.shape[2], x.shape[3], ablation, size, stride)
    counts = torch.zeros(x.shape[0], model.num_classes, dtype=torch.long)
    with torch.no_grad():
        for b in range(x.shape[0]):
            for keep in keeps:
                logits = _reference_logits(model, x[b], keep, encoding, fill, drop)
                if threshold is None:
                    counts[b, int(logits.argmax())] += 1
                else:
                    counts[b] += (logits.softmax(0) >= threshold).long()
    return counts


def _images(n: int, shape=(SIZE, SIZE), seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, *shape, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------ exactness
CASES = [
    ("vit", "column", 6, 1, None, "fill"),
    ("vit", "column", 5, 3, 0.3, "fill"),  # 32 is not a multiple of 3: the last view wraps around
    ("vit", "row", 7, 2, None, "fill"),
    ("vit", "block", 12, 5, None, "fill"),
    ("vit", "block", 10, 4, 0.25, "levine2020"),
    ("registers", "column", 6, 2, None, "fill"),
    ("registers", "block", 12, 7, 0.3, "fill"),
    ("deit_distilled", "row", 9, 3, None, "levine2020"),
    ("deit_distilled", "block", 11, 6, None, "fill"),
    ("rectangular", "column", 5, 2, None, "fill"),
    ("rectangular", "block", 9, 5, 0.3, "fill"),
    ("pre_norm", "column", 6, 2, None, "fill"),
]


@pytest.mark.parametrize(("name", "ablation", "size", "stride", "threshold", "encoding"), CASES)
def test_votes_equal_one_view_at_a_time_reference(name, ablation, size, stride, threshold, encoding):
    base = (
        MODELS[name]()
        if encoding == "fill"
        else _vit(4, in_chans=6, **({"name": "deit_tiny_distilled_patch16_224", "depth": 1} if name == "deit_distilled" else {}))
    )
    shape = tuple(base.patch_embed.img_size)
    fill = 0.5 if encoding == "fill" else 0.0
    model = robustwrap.wrap(
        base,
        patch=3,
        defense="smoothing",
        ablation=ablation,
        size=size,
        stride=stride,
        threshold=threshold,
        encoding=encoding,
        fill=fill,
        margin=0.0,
        batch_size=3,
    ).eval()
    assert model.drop_tokens and model.settings()["drop_tokens"] is True
    x = _images(2, shape, seed=len(name) + size)
    want = _reference_counts(base, x, ablation, size, stride, threshold, encoding, fill)
    result = model.certify(x, torch.tensor([0, 1]), early_exit=False)
    assert torch.equal(result.counts, want)
    assert torch.equal(result.num_views, torch.full((2,), model.full_views))
    assert torch.equal(model.predict(x), want.argmax(1))
    assert torch.equal(model(x), want.float() / model.full_views)
    # the certificate of the reference counts, by its definition (margin 0)
    delta = model.delta
    for b, label in enumerate((0, 1)):
        others = [c for c in range(5) if c != label]
        sure = int(want[b].argmax()) == label and all(
            want[b, label] - want[b, c] > 2 * delta or (want[b, label] - want[b, c] == 2 * delta and label < c) for c in others
        )
        assert bool(result.certified[b]) == sure
    # early exit: the same prediction and certificate
    early = model.certify(x, torch.tensor([0, 1]))
    assert torch.equal(early.prediction, result.prediction) and torch.equal(early.certified, result.certified)


def test_token_dropping_changes_the_function_and_false_is_the_pixel_only_one():
    base = MODELS["vit"]()
    x = _images(2, seed=5)
    dropping = robustwrap.wrap(base, patch=3, defense="smoothing", size=6, margin=0.0).eval()
    pixels = robustwrap.wrap(base, patch=3, defense="smoothing", size=6, margin=0.0, drop_tokens=False).eval()
    assert dropping.drop_tokens and not pixels.drop_tokens
    keep = _reference_keeps(SIZE, SIZE, "column", 6, 1)[4]
    with torch.no_grad():
        dropped, full = _reference_logits(base, x[0], keep, "fill", 0.0), _reference_logits(base, x[0], keep, "fill", 0.0, drop=False)
    assert (dropped - full).abs().max() > 0.1  # a dropped token is absent, not filled
    assert torch.equal(
        pixels.certify(x, torch.tensor([0, 1]), early_exit=False).counts,
        _reference_counts(base, x, "column", 6, 1, None, "fill", drop=False),
    )
    assert not torch.equal(dropping(x), pixels(x))
    assert model_fingerprint(dropping) != model_fingerprint(pixels)


# ------------------------------------------------------------------------------- forward passes
def test_views_keeping_the_same_number_of_tokens_share_a_pass_and_passes_follow_tokens():
    base = MODELS["vit"]()
    calls = []
    handle = base.blocks[0].register_forward_hook(lambda m, i, o: calls.append(tuple(i[0].shape[:2])))
    try:
        model = robustwrap.wrap(base, patch=3, defense="smoothing", size=6, batch_size=1000).eval()
        model.certify(_images(2), torch.tensor([0, 1]), early_exit=False)
        # a 6 px column meets one 8 px token column at q % 8 in {0, 1, 2}, else two: 12 and 20
        # views of each image, 4 token rows each, plus the class token
        assert sorted(calls) == [(24, 5), (40, 9)]
        calls.clear()
        model.batch_size = 4
        grid = token_grid(base, (SIZE, SIZE))
        per_pass = views_per_pass(4, grid, 8)
        assert per_pass == 4 * 17 // 9 == 7
        model.certify(_images(2), torch.tensor([0, 1]), early_exit=False)
        assert sum(n for n, _ in calls) == 64 and max(n for n, _ in calls) <= per_pass
        assert len(calls) <= 2 * -(-64 // per_pass)
    finally:
        handle.remove()


# ----------------------------------------------------------------------------------- settings
def test_default_follows_the_model_and_true_needs_a_vit():
    for name, build in MODELS.items():
        base = build()
        model = robustwrap.wrap(base, patch=3, defense="smoothing", size=6)
        assert model.drop_tokens, name
    cnn = SmallCNN()
    assert not robustwrap.wrap(cnn, patch=3, defense="smoothing", size=6, image_size=SIZE).drop_tokens
    with pytest.raises(ValueError, match="VisionTransformer"):
        robustwrap.wrap(cnn, patch=3, defense="smoothing", size=6, image_size=SIZE, drop_tokens=True)
    with pytest.raises(TypeError, match="drop_tokens"):
        robustwrap.wrap(MODELS["vit"](), patch=3, defense="smoothing", size=6, drop_tokens="yes")
    dynamic = _vit(depth=1, dynamic_img_size=True)
    with pytest.raises(ValueError, match="multiple of the model's 8x8 tokens"):
        robustwrap.wrap(dynamic, patch=3, defense="smoothing", size=6, image_size=(SIZE, 28), drop_tokens=True)


def test_a_grid_is_read_only_where_each_token_sees_its_own_pixels():
    # A padded patch embedding shifts every token's pixels: "a token meets the kept region" is no
    # longer a statement about its own patch, so the grid is not read and token dropping is refused.
    padded = _vit(6, depth=1)
    conv = padded.patch_embed.proj
    padded.patch_embed.proj = nn.Conv2d(3, conv.out_channels, conv.kernel_size, conv.stride, padding=1)
    assert padded(_images(1)).shape == (1, 5)  # the same 4x4 grid of tokens: the model runs
    assert token_grid(padded, (SIZE, SIZE)) is None
    assert not robustwrap.wrap(padded, patch=3, defense="smoothing", size=6).drop_tokens
    with pytest.raises(ValueError, match="drop_tokens=True needs a model whose token grid can be read"):
        robustwrap.wrap(padded, patch=3, defense="smoothing", size=6, drop_tokens=True)
    # a grid of another size than the model was built for is no grid it can run on
    assert token_grid(MODELS["vit"](), (SIZE, SIZE)).grid == (4, 4)
    with pytest.raises(ValueError, match="the model takes 32x32 images .* build the model with img_size=48"):
        token_grid(MODELS["vit"](), (48, 48))
    assert token_grid(_vit(depth=1, dynamic_img_size=True), (48, 48)).grid == (6, 6)


def test_the_token_grid_is_read_from_the_current_model():
    vit = MODELS["vit"]()
    model = robustwrap.wrap(vit, patch=3, defense="smoothing", size=6).eval()
    x = _images(1)
    assert model.drop_tokens
    model.model = SmallCNN()
    assert not model.drop_tokens and model.settings()["drop_tokens"] is False
    model.model = vit
    assert model.drop_tokens
    # a 4 px token grid: the counts follow the new model's grid, not the old one's
    other = _vit(7, patch_size=4, depth=1)
    model.model = other
    assert token_grid(other, (SIZE, SIZE)).grid == (8, 8)
    assert torch.equal(
        model.certify(x, torch.tensor([0]), early_exit=False).counts, _reference_counts(other, x, "column", 6, 1, None, "fill")
    )
    forced = robustwrap.wrap(vit, patch=3, defense="smoothing", size=6, drop_tokens=True).eval()
    with pytest.raises(ValueError, match="drop_tokens=True"):
        forced.model = SmallCNN()
        forced.predict(x)


def test_settings_hub_checks_and_old_configs():
    vit = MODELS["vit"]()
    model = robustwrap.wrap(vit, patch=3, defense="smoothing", size=6)
    settings = model.settings()
    assert settings["drop_tokens"] is True
    rebuilt = robustwrap.RobustPatchClassifier.from_settings(vit, settings)
    assert rebuilt.settings() == settings and rebuilt._drop_tokens is True
    for bad in ("true", 1, None):
        with pytest.raises(ValueError, match="drop_tokens"):
            DerandomizedSmoothing.from_settings(vit, {**settings, "drop_tokens": bad})
    with pytest.raises(ValueError, match="drop_tokens=True"):
        DerandomizedSmoothing.from_settings(SmallCNN(), {**settings, "drop_tokens": True})
    # a config written before drop_tokens existed describes views that keep every token
    old = {k: v for k, v in settings.items() if k != "drop_tokens"}
    assert DerandomizedSmoothing.from_settings(vit, old).drop_tokens is False
    off = copy.copy(model)
    off.drop_tokens = False
    assert model_fingerprint(off) != model_fingerprint(model) and model.drop_tokens


def test_hub_round_trip_keeps_drop_tokens(tmp_path):
    vit = timm.create_model("test_vit", num_classes=3).eval()
    for setting in (True, False):
        model = robustwrap.wrap(vit, patch=16, defense="smoothing", size=20, stride=10, drop_tokens=setting).eval()
        folder = tmp_path / str(setting)
        model.save_pretrained(folder)
        loaded = robustwrap.from_pretrained(str(folder))
        assert loaded.drop_tokens is setting and loaded.settings() == model.settings()


# ------------------------------------------------------------------------------------ training
def test_training_views_drop_the_same_tokens():
    base = MODELS["vit"]()
    model = robustwrap.wrap(base, patch=3, defense="smoothing", size=6).eval()
    augment = RandomAblation.from_model(model, generator=torch.Generator().manual_seed(0))
    assert augment.drop_tokens
    x = _images(3)
    views, view = augment(x, return_indices=True)
    view = torch.cat([view[:2], torch.tensor([-1])])  # the last image unablated: every token kept
    views = torch.cat([views[:2], x[2:]])
    with torch.no_grad():
        got = augment.logits(base, views, view)
        keeps = _reference_keeps(SIZE, SIZE, "column", 6, 1)
        for n in range(2):
            assert torch.allclose(got[n], _reference_logits(base, x[n], keeps[int(view[n])], "fill", 0.0), atol=1e-5)
        assert torch.allclose(got[2], base(x[2:])[0], atol=1e-5)
        tokens = ViewTokens.of(model._token_grid(), model.ablation_set, x.device)
        assert torch.allclose(got, view_logits(base, views, view, tokens), atol=1e-5)


@pytest.mark.parametrize("drop", [True, False])
def test_fit_masking_trains_on_the_kept_tokens(drop):
    base = MODELS["vit"]()
    model = robustwrap.wrap(base, patch=3, defense="smoothing", size=6, drop_tokens=drop)
    lengths = []
    handle = base.blocks[0].register_forward_hook(lambda m, i, o: lengths.append(i[0].shape[1]) if m.training else None)
    x, y = _images(8), torch.arange(8) % 5
    try:
        robustwrap.fit_masking(model, [(x, y)], epochs=1, progress=False)
    finally:
        handle.remove()
    # 6 px columns meet at most 2 of the 4 token columns: 2 x 4 patch tokens + the class token
    assert lengths and (max(lengths) <= 9 if drop else set(lengths) == {17})


# ----------------------------------------------------------------------------------- soundness
class ShortDeltaSmoothing(DerandomizedSmoothing):
    """A deliberately broken certificate: one view fewer than a patch can really meet."""

    @property
    def delta(self) -> int:
        return super().delta - 1


def _mean_pool_vit() -> nn.Module:
    """A ViT whose vote is read off the mean of its kept tokens.

    Blocks are the identity (zero attention and MLP outputs), no class token, average pooling
    then LayerNorm; a token's dim 0 is the sum of its channel-0 pixels, dim 1 a constant 1. The
    head votes 0 when the mean of dim 0 over the kept tokens exceeds 1, else 4: a bright pixel
    in a view's kept tokens decides its vote, and only where tokens are dropped (the mean over
    all 16 tokens would dilute it).
    """
    model = timm.create_model(
        "vit_tiny_patch16_224",
        img_size=SIZE,
        patch_size=8,
        embed_dim=8,
        depth=1,
        num_heads=1,
        class_token=False,
        global_pool="avg",
        num_classes=5,
    ).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.patch_embed.proj.weight[0, 0] = 1.0
        model.patch_embed.proj.bias[1] = 1.0
        model.fc_norm.weight.fill_(1.0)
        model.head.weight[0, 0] = 1.0
        model.head.weight[4, 1] = 1.0
    return model


def test_a_certificate_with_delta_one_short_breaks_under_brute_force():
    base = _mean_pool_vit()
    sound = robustwrap.wrap(base, patch=5, defense="smoothing", size=6, margin=0.0).eval()
    broken = copy.copy(sound)
    broken.__class__ = ShortDeltaSmoothing
    assert (sound.delta, broken.delta, sound.full_views) == (10, 9, 32)
    x = torch.zeros(2, 3, SIZE, SIZE)
    x[1, 0, :, 0] = 2.0  # a bright column: the 6 views that keep it vote 0, the other 26 vote 4
    y = torch.tensor([4, 4])
    counts = sound.certify(x, y, early_exit=False).counts
    assert counts[0].tolist() == [0, 0, 0, 0, 32] and counts[1].tolist() == [6, 0, 0, 0, 26]
    # margin 20 = 2Δ with y = 4 > 0: not certified; the broken Δ = 9 certifies it
    assert sound.certify(x, y).certified.tolist() == [True, False]
    assert broken.certify(x, y).certified.tolist() == [True, True]
    # brute force: every patch position on the top rows, every content in {-2, 0, 2}^3
    values = torch.tensor([-2.0, 0.0, 2.0])
    contents = torch.cartesian_prod(values, values, values)
    flipped = {0: [], 1: []}
    for b in range(2):
        for top in (0, 27):
            for left in range(SIZE - 4):
                batch = x[b].repeat(len(contents), 1, 1, 1)
                batch[:, :, top : top + 5, left : left + 5] = contents[:, :, None, None]
                prediction = sound.predict(batch)
                flipped[b] += [(top, left) for _ in range(int((prediction != 4).sum()))]
    assert not flipped[0]  # what the sound certificate certifies holds
    assert flipped[1]  # what the broken one certifies does not


def test_the_attack_surrogate_runs_the_same_function_and_breaks_the_short_certificate():
    from robustwrap.attack import OBJECTIVES

    base = MODELS["registers"]()
    model = robustwrap.wrap(base, patch=3, defense="smoothing", size=6, stride=2, margin=0.0).eval()
    x, y = _images(2, seed=9), torch.tensor([0, 1])
    with torch.no_grad():
        objective = OBJECTIVES["smoothing"](model, x, y, y, False, (3, 3), "margin")
    assert torch.equal(objective.votes.sum(1), model.certify(x, y, early_exit=False).counts)

    # the patch the attack finds through the surrogate flips what the broken Δ certified
    sound = robustwrap.wrap(_mean_pool_vit(), patch=5, defense="smoothing", size=6, margin=0.0).eval()
    broken = copy.copy(sound)
    broken.__class__ = ShortDeltaSmoothing
    x = torch.zeros(1, 3, SIZE, SIZE)
    x[:, 0, :, 0] = 2.0
    y = torch.tensor([4])
    assert broken.certify(x, y).certified.all() and not sound.certify(x, y).certified.any()
    # a position whose 10 views all vote 4 (away from the bright column), from a random start
    result = robustwrap.attack(
        sound,
        x,
        y,
        steps=10,
        restarts=1,
        locations=[(0, 12)],
        bounds=(-2.0, 2.0),
        progress=False,
        generator=torch.Generator().manual_seed(0),
    )
    assert result.success.all() and int(sound.predict(result.x_adv)) != 4
    assert result.num_views >= result.objective_views > 0 and result.forward_passes > 0  # passes on kept tokens count


def test_command_line_rewrap_keeps_drop_tokens():
    from robustwrap import cli

    model = robustwrap.wrap(MODELS["vit"](), 3, defense="smoothing", size=6, drop_tokens=False)
    again = cli._loading._with_settings(model, 4, cli._parser().parse_args(["predict", "x.png", "--patch", "4"]))
    assert again.patch == (4, 4) and again.model is model.model and again.drop_tokens is False


def test_a_vit_built_for_partial_tokens_ablates_pixels_by_default():
    """Issue 23.17: a ViT built for 36x36 images of 8x8 tokens (timm drops the last 4 pixel rows and
    columns) cannot drop tokens exactly: drop_tokens=None ablates pixels, True still refuses."""
    base = _vit(depth=1, img_size=36)
    model = robustwrap.wrap(base, patch=3, defense="smoothing", size=6).eval()
    assert not model.drop_tokens and model.settings()["drop_tokens"] is False
    x = torch.randn(2, 3, 36, 36, generator=torch.Generator().manual_seed(0))
    pixels = robustwrap.wrap(base, patch=3, defense="smoothing", size=6, drop_tokens=False).eval()
    assert torch.equal(model.certify(x, torch.tensor([0, 1])).counts, pixels.certify(x, torch.tensor([0, 1])).counts)
    with pytest.raises(ValueError, match="multiple of the model's 8x8 tokens"):
        robustwrap.wrap(base, patch=3, defense="smoothing", size=6, drop_tokens=True)


@pytest.mark.parametrize(("defense", "options"), [("smoothing", {"size": 8}), ("patchcleanser", {"num_masks": 3})])
def test_a_distilled_deit_in_distilled_training_mode_trains_on_its_eval_logits(defense, options):
    """Issue 23.17: timm's distilled DeiT with set_distilled_training(True) returns (class head,
    distillation head) in train mode; training fits their mean, the function it certifies."""
    from torch.utils.data import DataLoader, TensorDataset

    base = _vit(2, name="deit_tiny_distilled_patch16_224", depth=1, num_classes=3)
    base.set_distilled_training(True)
    x, y = torch.randn(4, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 1, 2, 0])
    with torch.no_grad():
        expected = nn.functional.cross_entropy(base.eval()(x), y).item()  # eval mode: the mean of both heads
    before = copy.deepcopy(base.state_dict())
    model = robustwrap.wrap(base, patch=4, defense=defense, **options)
    loader = DataLoader(TensorDataset(x, y), batch_size=4)
    clean = robustwrap.fit_masking(model, loader, strategy="none", epochs=1, lr=1e-9, progress=False)
    assert clean.final.loss == pytest.approx(expected, rel=1e-5)  # one step: the loss before the update
    robustwrap.fit_masking(model, loader, epochs=1, progress=False)  # the defense's own strategy, through its views
    assert any(not torch.equal(before[k], v) for k, v in base.state_dict().items())
