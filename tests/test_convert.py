"""robustwrap.convert / `robustwrap import`: the authors' checkpoints, fabricated exactly as their code saves them.

Each test builds the authors' network (their module layout, tiny where the architecture allows),
saves it the way their training script does (through `DataParallel`, under their key), imports it
and checks that the imported base model computes the same logits, that the settings read from the
file name are the authors', and that the written folder loads with `robustwrap.from_pretrained`.
"""

from __future__ import annotations

import argparse
import math

import pytest
import timm
import torch
import torchvision
from torch import nn

import robustwrap
from robustwrap.cli import main
from robustwrap.convert import import_checkpoint


def _same(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.shape == b.shape
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def _roundtrip(model, tmp_path, name="out"):
    folder = tmp_path / name
    model.save_pretrained(folder)
    return robustwrap.from_pretrained(folder)


# ----------------------------------------------------------------------------- PatchCleanser
def _patchcleanser_file(tmp_path, name: str, arch: str, num_classes: int):
    """PatchCleanser's train_model.py: timm model, reset_classifier, DataParallel, torch.save of a dict."""
    torch.manual_seed(0)
    model = timm.create_model(arch, pretrained=False)
    model.reset_classifier(num_classes=num_classes)
    model = torch.nn.DataParallel(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.001, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=5, gamma=0.1)
    path = tmp_path / name
    torch.save(
        {
            "epoch": 9,
            "model_state_dict": model.state_dict(),
            "optimizer_state_dict": optimizer.state_dict(),
            "scheduler_state_dict": scheduler.state_dict(),
        },
        path,
    )
    return model.module.eval(), path


def test_patchcleanser_cifar_cutout_names_settings_and_logits(tmp_path):
    # The file name says ViT-B, CIFAR-10, Cutout; the network is swapped for timm's tiny test ViT.
    theirs, path = _patchcleanser_file(tmp_path, "vit_base_patch16_224_cutout2_128_cifar.pth", "test_vit", 10)
    model = import_checkpoint(path, "patchcleanser", model="test_vit")
    assert model.defense == "patchcleanser" and model.num_classes == 10
    assert model.mask_set.patch_sizes == ((35, 35),) and model.mask_set.grid == (6, 6)  # CIFAR: 2.4% patch, 6x6 masks
    assert model.model.pretrained_cfg["crop_pct"] == 1.0  # resized without cropping, as the authors' loader
    assert model.pretrained_info["dataset"] == "cifar" and "Cutout, 2 holes of 128 px" in model.pretrained_info["strategy"]
    x = torch.randn(2, 3, 160, 160)
    with torch.no_grad():
        _same(model.model(x), theirs(x))
    loaded = _roundtrip(model, tmp_path)
    with torch.no_grad():
        _same(loaded.model(x), theirs(x))
    assert loaded.settings() == model.settings()


def test_patchcleanser_name_maps_to_timm_0412_default_tags(tmp_path):
    # Without --model the name decides the architecture: today's tag for timm 0.4.12's default weights.
    torch.save({"model_state_dict": {"module.x": torch.zeros(1)}}, tmp_path / "resmlp_24_distilled_224_imagenette.pth")
    with pytest.raises(ValueError, match=r"does not fit timm's resmlp_24_224.fb_distilled_in1k with num_classes=10"):
        import_checkpoint(tmp_path / "resmlp_24_distilled_224_imagenette.pth", "patchcleanser")


def test_unknown_name_needs_model(tmp_path):
    torch.save({"model_state_dict": {"module.x": torch.zeros(1)}}, tmp_path / "mine.pth")
    with pytest.raises(ValueError, match=r"pass model= \(--model\)"):
        import_checkpoint(tmp_path / "mine.pth", "patchcleanser")


# --------------------------------------------------------------------------------- PatchGuard
class _TheirBottleneck(nn.Module):
    """PatchGuard's nets/bagnet.py Bottleneck (unpadded k x k conv, residual cropped bottom-right)."""

    expansion = 4

    def __init__(self, inplanes, planes, stride=1, downsample=None, kernel_size=1):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=kernel_size, stride=stride, padding=0, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        residual = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            residual = self.downsample(x)
        if residual.size(-1) != out.size(-1):
            diff = residual.size(-1) - out.size(-1)
            residual = residual[:, :, :-diff, :-diff]
        out += residual
        return self.relu(out)


class _TheirBagNet(nn.Module):
    """PatchGuard's nets/bagnet.py BagNet with aggregation='none': local logits (B, h, w, K) from a linear head."""

    def __init__(self, layers=(3, 4, 6, 3), strides=(2, 2, 2, 1), kernel3=(1, 1, 1, 0), num_classes=1000):
        super().__init__()
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, 64, kernel_size=1, stride=1, padding=0, bias=False)
        self.conv2 = nn.Conv2d(64, 64, kernel_size=3, stride=1, padding=0, bias=False)
        self.bn1 = nn.BatchNorm2d(64, momentum=0.001)
        self.relu = nn.ReLU(inplace=True)
        for i, (planes, blocks, stride, k3) in enumerate(zip((64, 128, 256, 512), layers, strides, kernel3), start=1):
            self.add_module(f"layer{i}", self._make_layer(planes, blocks, stride, k3))
        self.avgpool = nn.AvgPool2d(1, stride=1)
        self.fc = nn.Linear(512 * 4, num_classes)

    def _make_layer(self, planes, blocks, stride, kernel3):
        downsample = None
        if stride != 1 or self.inplanes != planes * 4:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * 4, kernel_size=1, stride=stride, bias=False), nn.BatchNorm2d(planes * 4)
            )
        layers = [_TheirBottleneck(self.inplanes, planes, stride, downsample, kernel_size=1 if kernel3 == 0 else 3)]
        self.inplanes = planes * 4
        layers += [_TheirBottleneck(self.inplanes, planes, kernel_size=1 if kernel3 <= i else 3) for i in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv2(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(x.permute(0, 2, 3, 1))


def _randomize_bn(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)


def test_patchguard_cifar_bagnet17(tmp_path):
    torch.manual_seed(0)
    theirs = _TheirBagNet()
    theirs.fc = nn.Linear(theirs.fc.in_features, 10)  # mask_bn_cifar.py
    _randomize_bn(theirs)
    net = torch.nn.DataParallel(theirs)
    path = tmp_path / "bagnet17_192_cifar.pth"
    torch.save({"net": net.state_dict(), "acc": 80.0, "epoch": 9}, path)
    model = import_checkpoint(path, "patchguard", image_size=64, patch=8)
    assert model.defense == "patchguard" and model.num_classes == 10 and model.receptive_field == (17, 17)
    cfg = model.model.pretrained_cfg
    assert tuple(cfg["mean"]) == (0.4914, 0.4822, 0.4465) and cfg["crop_pct"] == 1.0 and cfg["interpolation"] == "bicubic"
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        _same(model.model(x), theirs.eval()(x).permute(0, 3, 1, 2))  # their (B, h, w, K) is our (B, K, h, w)
    loaded = _roundtrip(model, tmp_path)
    with torch.no_grad():
        _same(loaded.model(x), model.model(x))
    assert loaded.image_size == (64, 64) and loaded.patch == (8, 8)


# ------------------------------------------------------------------------ (De)Randomized Smoothing
def _levine_resnet(arch: str, num_classes: int) -> nn.Module:
    """patchSmoothing's resnet_imgnt.py: torchvision's ResNet with a 6-channel stem ((x, 1 - x) encoding)."""
    net = torchvision.models.get_model(arch, weights=None, num_classes=num_classes)
    net.conv1 = nn.Conv2d(6, 64, kernel_size=7, stride=2, padding=3, bias=False)
    _randomize_bn(net)
    return net


def test_drs_imagenet_resnet(tmp_path):
    torch.manual_seed(0)
    theirs = _levine_resnet("resnet18", 1000)
    path = tmp_path / "imagenet_one_band_lr_0.1_regularization_0.0005_model_resnet18__band_25_epoch_3.pth"
    torch.save({"net": torch.nn.DataParallel(theirs).state_dict(), "acc": 41.5, "epoch": 3}, path)  # train_imagenet_band.py
    model = import_checkpoint(path, "drs")
    assert model.defense == "smoothing" and model.encoding == "levine2020" and model.size == 25 and model.threshold == 0.2
    assert model.image_size == (299, 299) and model.patch == (42, 42) and model.ablation == "column"
    x = torch.randn(2, 6, 64, 64)
    with torch.no_grad():
        _same(model.model(x), theirs.eval()(x))
    loaded = _roundtrip(model, tmp_path)
    assert loaded.settings() == model.settings()
    with torch.no_grad():
        _same(loaded.model(x), theirs(x))


def test_drs_cifar_network_is_refused_with_the_reason(tmp_path):
    path = tmp_path / "cifar_one_band_lr_0.1_regularization_0.0005_model_resnet18_band_4_epoch_199.pth"
    torch.save({"net": {"module.conv1.weight": torch.zeros(64, 6, 3, 3)}, "acc": 1.0, "epoch": 199}, path)
    with pytest.raises(ValueError, match="neither by timm nor by torchvision"):
        import_checkpoint(path, "drs")


# ------------------------------------------------------------------------------ Smoothed ViT
class _InputNormalize(nn.Module):
    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer("new_mean", torch.tensor(mean)[:, None, None])
        self.register_buffer("new_std", torch.tensor(std)[:, None, None])

    def forward(self, x):
        return (x - self.new_mean) / self.new_std


class _Wrapper(nn.Module):
    def __init__(self, **modules):
        super().__init__()
        for name, module in modules.items():
            self.add_module(name, module)


def test_smoothed_vit_robustness_library_checkpoint(tmp_path):
    # robustness' AttackerModel: normalizer (smoothed-vit's PreProcessor around it), model (DummyModel
    # around the network: add_custom_forward), attacker (sharing the model); saved through DataParallel.
    torch.manual_seed(0)
    vit = timm.create_model("deit_tiny_patch16_224", pretrained=False, num_classes=10)
    mean, std = [0.4914, 0.4822, 0.4465], [0.2023, 0.1994, 0.2010]
    dummy = _Wrapper(model=vit)
    attacker_model = _Wrapper(
        normalizer=_Wrapper(normalizer=_InputNormalize(mean, std)),
        model=dummy,
        attacker=_Wrapper(model=dummy, normalizer=_InputNormalize(mean, std)),
    )
    path = tmp_path / "checkpoint.pt.best"
    torch.save({"model": torch.nn.DataParallel(attacker_model).state_dict(), "optimizer": {}, "schedule": None, "epoch": 30}, path)
    model = import_checkpoint(path, "smoothed-vit")
    assert model.model.pretrained_cfg["architecture"] == "deit_tiny_patch16_224" and model.num_classes == 10
    # their 4 px bands at stride 1 of 32 px CIFAR images against a 5 px patch, upsampled x7 (nearest) to 224: Δ = 8
    assert (model.size, model.stride, model.patch, model.input_size, model.image_size) == (4, 1, (5, 5), (32, 32), (224, 224))
    assert (model.resize, model.delta, model.full_views) == ("nearest", 8, 32)
    assert model.model.pretrained_cfg["interpolation"] == "nearest" and model.model.pretrained_cfg["crop_pct"] == 1.0
    assert model.pretrained_info["dataset"] == "cifar10"
    # their black (0) pixels before normalising are -mean/std after it
    assert model.fill == pytest.approx(tuple(-m / s for m, s in zip(mean, std)))
    # the same views: smoothed-vit's StripeAblator on 32 px is each robustwrap view (before the same nearest x7)
    theirs_keep = []
    for pos in range(32):
        x = torch.ones(1, 1, 32, 32)
        if pos + 4 > 32:
            x[..., pos + 4 - 32 : pos] = 0
        else:
            x[..., :pos] = 0
            x[..., pos + 4 :] = 0
        theirs_keep.append(x[0, 0].bool())
    assert torch.equal(model.ablation_set.keep_masks(), torch.stack(theirs_keep))
    pixels = torch.rand(1, 3, 224, 224)
    normalised = (pixels - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
    with torch.no_grad():
        _same(model.model(normalised), vit.eval()(attacker_model.normalizer.normalizer(pixels)))
    loaded = _roundtrip(model, tmp_path)
    assert tuple(loaded.model.pretrained_cfg["mean"]) == pytest.approx(tuple(mean))
    with torch.no_grad():
        _same(loaded.model(normalised), model.model(normalised))


def _their_kept_tokens_logits(vit: nn.Module, ablated: torch.Tensor, ones_mask: torch.Tensor) -> torch.Tensor:
    """smoothed-vit's forward on one view: MaskProcessor (avg-pool the mask per 16 px token, keep
    the tokens above 0, class token first), position embeddings added, then the selection."""
    kept = torch.where(nn.functional.avg_pool2d(ones_mask[:1, None], 16)[0].reshape(-1) > 0)[0] + 1
    index = torch.cat([torch.zeros(1, dtype=torch.long), kept])
    x = vit.patch_embed(ablated)
    x = torch.cat([vit.cls_token.expand(x.shape[0], -1, -1), x], 1) + vit.pos_embed
    x = vit.norm(vit.blocks(x[:, index]))
    return vit.head(x[:, 0])


def test_smoothed_vit_drops_tokens_as_the_authors_vit_does(tmp_path):
    torch.manual_seed(0)
    vit = timm.create_model("deit_tiny_patch16_224", pretrained=False, num_classes=10).eval()
    mean, std = [0.4914, 0.4822, 0.4465], [0.2023, 0.1994, 0.2010]
    normalizer = _InputNormalize(mean, std)
    dummy = _Wrapper(model=vit)
    attacker_model = _Wrapper(normalizer=_Wrapper(normalizer=normalizer), model=dummy, attacker=_Wrapper(model=dummy, normalizer=normalizer))
    path = tmp_path / "checkpoint.pt.best"
    torch.save({"model": torch.nn.DataParallel(attacker_model).state_dict(), "epoch": 30}, path)
    model = import_checkpoint(path, "smoothed-vit")
    assert model.drop_tokens is True and model.settings()["drop_tokens"] is True
    assert import_checkpoint(path, "smoothed-vit", drop_tokens=False).settings()["drop_tokens"] is False  # overridable

    # Their certification (DerandomizedSmoother, column mode, 4 px bands at stride 1 on a 32 px image):
    # ablate, upsample image and mask x7 (nearest), normalise, run the ViT on the tokens the mask keeps.
    pixels = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    votes = torch.zeros(10, dtype=torch.long)
    kept_per_view = []
    with torch.no_grad():
        for pos in range(32):
            keep = torch.zeros(32, dtype=torch.bool)
            keep[[(pos + i) % 32 for i in range(4)]] = True
            ablated, mask = pixels * keep, keep.expand(1, 32, 32).float()
            ablated, mask = (nn.functional.interpolate(t, scale_factor=7, mode="nearest") for t in (ablated, mask[:, None]))
            logits = _their_kept_tokens_logits(vit, normalizer(ablated), mask[:, 0])
            votes[logits.argmax(1)] += 1
            kept_per_view.append(int((nn.functional.avg_pool2d(mask, 16)[0, 0] > 0).any(0).sum()))
    assert set(kept_per_view) == {2, 3}  # a 28 px band of 224 meets 2 or 3 of the 14 token columns
    image = normalizer(pixels)  # the defended model takes the 32 px image and upsamples it itself
    result = model.certify(image, votes.argmax().unsqueeze(0), early_exit=False)
    assert torch.equal(result.counts[0].long(), votes) and result.delta == 8
    # The reference tells the functions apart: every token kept (pixels only) votes otherwise.
    pixels_only = import_checkpoint(path, "smoothed-vit", drop_tokens=False)
    assert not torch.equal(pixels_only.certify(image, votes.argmax().unsqueeze(0), early_exit=False).counts[0].long(), votes)


# ------------------------------------------------------------------------- refusals and the CLI
def test_pickle_needing_file_is_refused_and_nothing_written(tmp_path, capsys):
    path = tmp_path / "vit_base_patch16_224_cifar.pth"
    torch.save({"model_state_dict": {"module.w": torch.zeros(1)}, "args": argparse.Namespace(lr=0.1)}, path)
    out = tmp_path / "out"
    assert main(["import", str(path), "--format", "patchcleanser", "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "needs pickle code" in err and "weights_only=True" in err
    assert not out.exists()


def test_a_file_that_is_no_checkpoint_is_said_so(tmp_path):
    (tmp_path / "notes.pth").write_text("not a checkpoint")
    with pytest.raises(ValueError, match="is not a readable PyTorch checkpoint"):
        import_checkpoint(tmp_path / "notes.pth", "drs")


def test_cli_import_writes_a_folder_that_certify_loads(tmp_path, capsys):
    theirs, path = _patchcleanser_file(tmp_path, "vit_base_patch16_224_imagenette.pth", "test_vit", 10)
    out = tmp_path / "pc"
    code = main(
        ["import", str(path), "--format", "patchcleanser", "--out", str(out), "--model", "test_vit", "--num-masks", "3", "--patch", "2%"]
    )
    assert code == 0, capsys.readouterr().err
    loaded = robustwrap.from_pretrained(out)
    side = math.ceil(math.sqrt(0.02 * 160 * 160))
    assert loaded.mask_set.patch_sizes == ((side, side),) and loaded.mask_set.grid == (3, 3)
    assert loaded.pretrained_info["source"]["file"] == path.name and loaded.pretrained_info["dataset"] == "imagenette"
    x = torch.randn(1, 3, 160, 160)
    with torch.no_grad():
        _same(loaded.model(x), theirs(x))
    (tmp_path / "project").mkdir()
    (tmp_path / "project" / "README.md").write_text("mine")
    # --out follows save_pretrained's rule: never a folder of other files; an earlier save is replaced
    assert main(["import", str(path), "--format", "patchcleanser", "--out", str(tmp_path / "project"), "--model", "test_vit"]) == 1
    assert "is neither empty nor an earlier robustwrap save" in capsys.readouterr().err
    assert main(["import", str(path), "--format", "patchcleanser", "--out", str(out), "--model", "test_vit"]) == 0
    assert len(robustwrap.from_pretrained(out).mask_set) == 36  # the default masks replaced --num-masks 3's


def test_cli_import_refuses_another_defenses_option(tmp_path, capsys):
    _, path = _patchcleanser_file(tmp_path, "vit_base_patch16_224_imagenette.pth", "test_vit", 10)
    assert main(["import", str(path), "--format", "patchcleanser", "--out", str(tmp_path / "o"), "--ablation-size", "4"]) == 1
    assert "--ablation-size is an option of defense 'smoothing', not of 'patchcleanser'" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
