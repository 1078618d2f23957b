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
    """PatchCleanser's train_model.py: timm model, reset_classifier, DataParallel, torch.save of a dict
    under "state_dict" (the key its utils/setup.py reads back)."""
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
            "state_dict": model.state_dict(),
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


def test_patchcleanser_high_resolution_defaults(tmp_path):
    # ImageNette, ImageNet, Flowers: timm's own preprocessing, the paper's 32 px (2%) patch, 6x6 masks
    _, path = _patchcleanser_file(tmp_path, "vit_base_patch16_224_imagenette.pth", "test_vit", 10)
    model = import_checkpoint(path, "patchcleanser", model="test_vit")
    assert model.mask_set.patch_sizes == ((32, 32),) and model.mask_set.grid == (6, 6)
    assert model.model.pretrained_cfg["crop_pct"] == timm.create_model("test_vit").pretrained_cfg["crop_pct"]
    assert (
        model.pretrained_info["dataset"] == "imagenette"
        and model.pretrained_info["strategy"] == "plain fine-tuning (the authors' training)"
    )


def test_patchcleanser_name_maps_to_timm_0412_default_tags(tmp_path):
    # Without --model the name decides the architecture: today's tag for timm 0.4.12's default weights.
    torch.save({"model_state_dict": {"module.x": torch.zeros(1)}}, tmp_path / "resmlp_24_distilled_224_imagenette.pth")
    with pytest.raises(ValueError, match=r"does not fit timm's resmlp_24_224.fb_distilled_in1k with num_classes=10"):
        import_checkpoint(tmp_path / "resmlp_24_distilled_224_imagenette.pth", "patchcleanser")


def test_patchcleanser_mae_checkpoint(tmp_path):
    # MAE's fine-tuned ViT (facebookresearch/mae saves {"model": ...}; fc_norm: timm's global_pool="avg"),
    # renamed `_imagenet.pth` as PatchCleanser's README says; timm's tiny test ViT stands in for ViT-B.
    torch.manual_seed(0)
    theirs = timm.create_model("test_vit", pretrained=False, global_pool="avg", num_classes=1000).eval()
    path = tmp_path / "mae_finetuned_vit_base_imagenet.pth"
    torch.save({"model": theirs.state_dict()}, path)
    model = import_checkpoint(path, "patchcleanser", model="test_vit")
    assert model.model.global_pool == "avg" and model.num_classes == 1000 and model.pretrained_info["dataset"] == "imagenet"
    cfg = model.model.pretrained_cfg
    # utils/setup.py: the ViT's own mean and std deleted (timm's ImageNet defaults), crop 224/256
    assert tuple(cfg["mean"]) == (0.485, 0.456, 0.406) and tuple(cfg["std"]) == (0.229, 0.224, 0.225) and cfg["crop_pct"] == 0.875
    loaded = _roundtrip(model, tmp_path)
    x = torch.randn(1, 3, 160, 160)
    with torch.no_grad():
        _same(loaded.model(x), theirs(x))
    # without --model: timm's ViT-B with MAE's pooling
    torch.save({"model": {"x": torch.zeros(1)}}, tmp_path / "mae_finetuned_vit_base.pth")
    with pytest.raises(ValueError, match="does not fit timm's vit_base_patch16_224 with num_classes=1000, global_pool=avg"):
        import_checkpoint(tmp_path / "mae_finetuned_vit_base.pth", "patchcleanser")


def test_unknown_name_needs_model(tmp_path):
    torch.save({"model_state_dict": {"module.x": torch.zeros(1)}}, tmp_path / "mine.pth")
    with pytest.raises(ValueError, match=r"pass model=, e.g. a timm architecture"):
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


@pytest.mark.parametrize(
    ("name", "side", "dataset", "interpolation", "crop", "patch"),
    [("bagnet17_nette.pth", 224, "imagenette", "bilinear", 0.875, 32), ("bagnet17_160_cifar.pth", 160, "cifar", "bicubic", 1.0, 30)],
)
def test_patchguard_settings_from_the_name(tmp_path, capsys, name, side, dataset, interpolation, crop, patch):
    # mask_bn_imagenet.py (ImageNette: Resize(256), CenterCrop(224)) and mask_bn_cifar.py (Resize(side), no crop)
    torch.manual_seed(0)
    theirs = _TheirBagNet()
    theirs.fc = nn.Linear(theirs.fc.in_features, 10)
    path = tmp_path / name
    torch.save({"model_state_dict": torch.nn.DataParallel(theirs).state_dict()}, path)
    assert main(["import", str(path), "--format", "patchguard", "--out", str(tmp_path / "pg")]) == 0, capsys.readouterr().err
    loaded = robustwrap.from_pretrained(tmp_path / "pg")
    cfg = loaded.model.pretrained_cfg
    assert loaded.num_classes == 10 and loaded.pretrained_info["dataset"] == dataset and loaded.image_size == (side, side)
    assert (cfg["interpolation"], cfg["crop_pct"], loaded.patch) == (interpolation, crop, (patch, patch))


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


# patchSmoothing's published file (the name train_imagenet_band.py's --resume writes: no model_) and
# the name of a first run; both are their ImageNet certification's data.
_DRS_NAMES = {
    "imagenet_one_band_lr_0.001_regularization_0.0005_band_25_epoch_59_resume_imagenet_58.pth.pth": (25, "resnet18"),
    "imagenet_one_band_lr_0.1_regularization_0.0005_model_resnet18__band_12_epoch_3.pth": (12, "resnet18"),
}


def _their_certify_transform():
    """certify_imagenet_band.py: Resize((299, 299)) (a squash, bilinear), ToTensor, ImageNet's Normalize."""
    from torchvision import transforms

    return transforms.Compose(
        [transforms.Resize((299, 299)), transforms.ToTensor(), transforms.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])]
    )


def _photo(width: int, height: int):
    from PIL import Image

    pixels = torch.rand(height, width, 3, generator=torch.Generator().manual_seed(1))
    return Image.fromarray((pixels * 255).to(torch.uint8).numpy())


@pytest.mark.parametrize("name", list(_DRS_NAMES))
def test_drs_published_names_and_their_squashed_299_preprocessing(tmp_path, name):
    from robustwrap.cli._loading import _preprocessing

    torch.manual_seed(0)
    theirs = _levine_resnet("resnet18", 1000)
    path = tmp_path / name
    torch.save({"net": torch.nn.DataParallel(theirs).state_dict(), "acc": 41.5, "epoch": 3}, path)
    out = tmp_path / "drs"
    assert main(["import", str(path), "--format", "drs", "--out", str(out)]) == 0
    loaded = robustwrap.from_pretrained(out)
    band, arch = _DRS_NAMES[name]
    assert loaded.size == band and loaded.model.pretrained_cfg["architecture"] == arch and loaded.image_size == (299, 299)
    cfg = loaded.model.pretrained_cfg
    assert (cfg["crop_mode"], cfg["crop_pct"], cfg["interpolation"]) == ("squash", 1.0, "bilinear")
    photo = _photo(400, 260)  # not square: a center crop and a squash differ
    transform, mode = _preprocessing(loaded)
    assert mode == "RGB"
    _same(transform(photo), _their_certify_transform()(photo))
    x = torch.randn(1, 6, 64, 64)
    with torch.no_grad():
        _same(loaded.model(x), theirs.eval()(x))


def test_drs_any_name_gets_their_preprocessing_and_the_bottleneck_says_resnet50(tmp_path):
    # A renamed file: the band size must be given, the preprocessing is still their certification's.
    torch.manual_seed(0)
    theirs = _levine_resnet("resnet18", 1000)
    path = tmp_path / "renamed.pth"
    torch.save({"net": torch.nn.DataParallel(theirs).state_dict(), "acc": 41.5, "epoch": 3}, path)
    with pytest.raises(ValueError, match="size is required"):
        import_checkpoint(path, "drs")
    model = import_checkpoint(path, "drs", size=25)
    cfg = model.model.pretrained_cfg
    assert (cfg["crop_mode"], cfg["crop_pct"], cfg["interpolation"], cfg["input_size"][1:]) == ("squash", 1.0, "bilinear", (299, 299))
    assert (model.threshold, model.patch, model.encoding) == (0.2, (42, 42), "levine2020")
    # their resnet50 (the scripts' default model) has bottleneck blocks: a third conv per block
    path = tmp_path / "imagenet_one_band_lr_0.001_regularization_0.0005_band_25_epoch_59_resume_imagenet_58.pth.pth"
    torch.save({"net": {"module.conv1.weight": torch.zeros(64, 6, 7, 7), "module.layer1.0.conv3.weight": torch.zeros(256, 64, 1, 1)}}, path)
    with pytest.raises(ValueError, match="timm's resnet50 with num_classes=1000, in_chans=6"):
        import_checkpoint(path, "drs", num_classes=1000)


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


def _their_kept_tokens_logits(vit: nn.Module, ablated: torch.Tensor, ones_mask: torch.Tensor, token: int = 16) -> torch.Tensor:
    """smoothed-vit's forward on one view: MaskProcessor (avg-pool the mask per token, keep the
    tokens above 0, class token first), position embeddings added, then the selection."""
    kept = torch.where(nn.functional.avg_pool2d(ones_mask[:1, None], token)[0].reshape(-1) > 0)[0] + 1
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
    attacker_model = _Wrapper(
        normalizer=_Wrapper(normalizer=normalizer), model=dummy, attacker=_Wrapper(model=dummy, normalizer=normalizer)
    )
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


_IMAGENET_MEAN, _IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def _robustness_file(path, net: nn.Module, mean, std, custom_forward: bool):
    """What smoothed-vit's training saves: the robustness library's AttackerModel through DataParallel.

    Their ViTs are wrapped for a custom forward (`model.model.` keys), a torchvision-named CNN is
    the library's own ImageNet ResNet (`model.` keys); main.py wraps the normaliser in its PreProcessor.
    """
    network = _Wrapper(model=net) if custom_forward else net
    attacker_model = _Wrapper(
        normalizer=_Wrapper(normalizer=_InputNormalize(mean, std)),
        model=network,
        attacker=_Wrapper(model=network, normalizer=_InputNormalize(mean, std)),
    )
    torch.save({"model": torch.nn.DataParallel(attacker_model).state_dict(), "optimizer": {}, "schedule": None, "epoch": 30}, path)
    return path


def _robustness_imagenet_transform():
    """The robustness library's ImageNet test transform, then smoothed-vit's normaliser."""
    from torchvision import transforms

    return transforms.Compose(
        [transforms.Resize(256), transforms.CenterCrop(224), transforms.ToTensor(), transforms.Normalize(_IMAGENET_MEAN, _IMAGENET_STD)]
    )


def test_smoothed_vit_resnet_checkpoints_import_with_no_option(tmp_path, capsys):
    from robustwrap.cli._loading import _preprocessing

    # resnet18_k19.pt: architecture from the name, classes from the head (7 here), no token dropping
    torch.manual_seed(0)
    net = torchvision.models.resnet18(weights=None, num_classes=7)
    _randomize_bn(net)
    path = _robustness_file(tmp_path / "resnet18_k19.pt", net, _IMAGENET_MEAN, _IMAGENET_STD, custom_forward=False)
    out = tmp_path / "r18"
    assert main(["import", str(path), "--format", "smoothed-vit", "--out", str(out)]) == 0, capsys.readouterr().err
    loaded = robustwrap.from_pretrained(out)
    assert loaded.model.pretrained_cfg["architecture"] == "resnet18" and loaded.num_classes == 7 and loaded.drop_tokens is False
    assert (loaded.ablation, loaded.size, loaded.stride, loaded.patch, loaded.image_size) == ("column", 19, 1, (32, 32), (224, 224))
    assert loaded.pretrained_info["dataset"] == "imagenet"
    photo = _photo(300, 250)
    _same(_preprocessing(loaded)[0](photo), _robustness_imagenet_transform()(photo))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        _same(loaded.model(x), net.eval()(x))


def test_smoothed_vit_wide_resnet_name(tmp_path):
    path = tmp_path / "wide_resnet101_2_k19.pt"
    torch.save({"model": {"module.model.conv1.weight": torch.zeros(64, 3, 7, 7), "module.model.fc.weight": torch.zeros(1000, 2048)}}, path)
    with pytest.raises(ValueError, match="timm's wide_resnet101_2 with num_classes=1000"):
        import_checkpoint(path, "smoothed-vit")


@pytest.mark.parametrize(
    ("name", "ablation", "size"),
    [("deit_tiny_block_k75", "block", 75), ("deit_tiny_k19.pt", "column", 19), ("checkpoint.pt.best", "column", 19)],
)
def test_smoothed_vit_readme_vits_read_the_ablation_from_the_name(tmp_path, name, ablation, size):
    from robustwrap.cli._loading import _preprocessing

    torch.manual_seed(0)
    vit = timm.create_model("deit_tiny_patch16_224", pretrained=False, num_classes=1000)
    path = _robustness_file(tmp_path / name, vit, _IMAGENET_MEAN, _IMAGENET_STD, custom_forward=True)
    model = import_checkpoint(path, "smoothed-vit")
    assert (model.ablation, model.size, model.stride, model.patch, model.drop_tokens) == (ablation, size, 1, (32, 32), True)
    loaded = _roundtrip(model, tmp_path)
    assert loaded.settings() == model.settings() and loaded.model.pretrained_cfg["architecture"] == "deit_tiny_patch16_224"
    # the robustness library's Resize(256) (bilinear) and CenterCrop(224), not timm's DeiT defaults (bicubic, 0.9)
    photo = _photo(320, 240)
    _same(_preprocessing(loaded)[0](photo), _robustness_imagenet_transform()(photo))


def test_smoothed_vit_cifar_native_patch4_32_votes_as_theirs(tmp_path):
    # deit_tiny_patch4_32 (their custom_models): 4 px tokens on the 32 px images, --cifar-preprocess-type none
    torch.manual_seed(0)
    vit = timm.create_model("deit_tiny_patch16_224", pretrained=False, num_classes=10, patch_size=4, img_size=32).eval()
    mean, std = [0.4914, 0.4822, 0.4465], [0.2023, 0.1994, 0.2010]
    path = _robustness_file(tmp_path / "checkpoint.pt.best", vit, mean, std, custom_forward=True)
    model = _roundtrip(import_checkpoint(path, "smoothed-vit"), tmp_path)
    assert model.model.pretrained_cfg["architecture"] == "deit_tiny_patch16_224" and model.num_classes == 10
    assert (model.image_size, model.size, model.stride, model.patch, model.drop_tokens) == ((32, 32), 4, 1, (5, 5), True)
    assert model.pretrained_info["dataset"] == "cifar10" and model.model.pretrained_cfg["crop_pct"] == 1.0
    normalizer = _InputNormalize(mean, std)
    pixels = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    votes = torch.zeros(10, dtype=torch.long)
    with torch.no_grad():
        for pos in range(32):  # their DerandomizedSmoother, column mode, 4 px bands at stride 1
            keep = torch.zeros(32, dtype=torch.bool)
            keep[[(pos + i) % 32 for i in range(4)]] = True
            mask = keep.expand(1, 32, 32).float()
            votes[_their_kept_tokens_logits(vit, normalizer(pixels * keep), mask, token=4).argmax(1)] += 1
    result = model.certify(normalizer(pixels), votes.argmax().unsqueeze(0), early_exit=False)
    assert torch.equal(result.counts[0].long(), votes)


def test_smoothed_vit_cifar100(tmp_path):
    torch.manual_seed(0)
    vit = timm.create_model("deit_tiny_patch16_224", pretrained=False, num_classes=100)
    path = _robustness_file(tmp_path / "checkpoint.pt.best", vit, [0.5071, 0.4867, 0.4408], [0.2675, 0.2565, 0.2761], custom_forward=True)
    model = import_checkpoint(path, "smoothed-vit")
    assert model.num_classes == 100 and model.pretrained_info["dataset"] == "cifar100"
    # as CIFAR-10: 32 px inputs, upsampled x7 (nearest) inside the defended model; bands and patch in input pixels
    assert (model.image_size, model.input_size, model.resize) == ((224, 224), (32, 32), "nearest")
    assert (model.size, model.stride, model.patch, model.delta) == (4, 1, (5, 5), 8)
    assert model.model.pretrained_cfg["interpolation"] == "nearest"


# ------------------------------------------------------------------------- refusals and the CLI
def test_pickle_needing_file_is_refused_and_nothing_written(tmp_path, capsys):
    path = tmp_path / "vit_base_patch16_224_cifar.pth"
    torch.save({"model_state_dict": {"module.w": torch.zeros(1)}, "args": argparse.Namespace(lr=0.1)}, path)
    out = tmp_path / "out"
    assert main(["import", str(path), "--format", "patchcleanser", "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "needs pickle code" in err and "weights_only=True" in err
    assert not out.exists()


@pytest.mark.parametrize("text", ["hello, a text file\n", "h", "abc", ""])
def test_a_file_that_is_no_checkpoint_is_refused_in_one_line(tmp_path, capsys, text):
    # torch's reader fails on these with KeyError ("h..."), IndexError ("abc"), ...: the user gets one line
    path = tmp_path / "notes.pth"
    path.write_text(text)
    with pytest.raises(ValueError, match="is not a PyTorch checkpoint: expected a file written by torch.save"):
        import_checkpoint(path, "drs")
    assert main(["import", str(path), "--format", "smoothed-vit", "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(path) in err and "expected a file written by torch.save" in err, err
    assert "internal error" not in err and not (tmp_path / "o").exists()


def test_a_damaged_checkpoint_is_said_so(tmp_path):
    path = tmp_path / "cut.pth"
    torch.save({"net": {"w": torch.zeros(100)}}, path)
    path.write_bytes(path.read_bytes()[:200])  # a zip archive cut short
    with pytest.raises(ValueError, match="is not a readable PyTorch checkpoint"):
        import_checkpoint(path, "drs")
    path.write_bytes(b"\x80\x02 a pickle cut short")
    with pytest.raises(ValueError, match="is not a readable PyTorch checkpoint"):
        import_checkpoint(path, "drs")


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


def test_cli_import_takes_the_model_as_certify_and_train_do(tmp_path, capsys):
    _, path = _patchcleanser_file(tmp_path, "mine.pth", "test_vit", 10)
    assert main(["import", str(path), "--format", "patchcleanser", "--out", str(tmp_path / "a")]) == 1
    err = capsys.readouterr().err
    assert "pass --model, e.g. a timm architecture" in err and "(--model)" not in err
    assert main(["import", str(path), "--format", "patchcleanser", "--out", str(tmp_path / "b"), "--model", "timm:test_vit"]) == 0, (
        capsys.readouterr().err
    )
    loaded = robustwrap.from_pretrained(tmp_path / "b")
    assert loaded.model.pretrained_cfg["architecture"] == "test_vit" and loaded.num_classes == 10  # classes from the head
    for spec in ("hf-hub:org/name", "timm:"):
        assert main(["import", str(path), "--format", "patchcleanser", "--out", str(tmp_path / "c"), "--model", spec]) == 1
        assert "--model" in capsys.readouterr().err and not (tmp_path / "c").exists()


def test_cli_import_overrides_the_preprocessing(tmp_path, capsys):
    _, path = _patchcleanser_file(tmp_path, "vit_base_patch16_224_imagenette.pth", "test_vit", 10)
    common = ["import", str(path), "--format", "patchcleanser", "--model", "timm:test_vit"]
    assert main([*common, "--out", str(tmp_path / "a"), "--crop-pct", "0.8", "--crop-mode", "squash", "--interpolation", "bicubic"]) == 0
    cfg = robustwrap.from_pretrained(tmp_path / "a").model.pretrained_cfg
    assert (cfg["crop_pct"], cfg["crop_mode"], cfg["interpolation"]) == (0.8, "squash", "bicubic")
    capsys.readouterr()
    assert main([*common, "--out", str(tmp_path / "b"), "--crop-mode", "middle"]) == 1
    assert "--crop-mode must be one of center, squash, border" in capsys.readouterr().err
    assert main([*common, "--out", str(tmp_path / "b"), "--interpolation", "cubic"]) == 1
    assert "--interpolation must be one of" in capsys.readouterr().err and not (tmp_path / "b").exists()
    with pytest.raises(ValueError, match="crop_pct must be a fraction in"):
        import_checkpoint(path, "patchcleanser", model="test_vit", crop_pct=1.5)


def test_cli_import_refuses_another_defenses_option(tmp_path, capsys):
    _, path = _patchcleanser_file(tmp_path, "vit_base_patch16_224_imagenette.pth", "test_vit", 10)
    assert main(["import", str(path), "--format", "patchcleanser", "--out", str(tmp_path / "o"), "--ablation-size", "4"]) == 1
    assert "--ablation-size is an option of defense 'smoothing', not of 'patchcleanser'" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
