"""The attack and audit judged by certified detection, the plot of the alerting masks, and the
command line keeping a loaded model's detection threshold."""

from __future__ import annotations

import pytest
import timm
import torch
from conftest import PeakNet

import robustwrap
from robustwrap import models  # noqa: F401  (registers the BagNets with timm)
from robustwrap import cli


def _sharp(seed: int = 0, num_classes: int = 4) -> PeakNet:
    """A `PeakNet` with logits a few units apart, so that views reach high softmax confidences."""
    net = PeakNet(num_classes=num_classes, seed=seed).eval()
    with torch.no_grad():
        net.conv.weight.mul_(20)
    return net


def _cleanser(tau: float = 0.0, seed: int = 0, **options) -> robustwrap.PatchCleanser:
    model = robustwrap.wrap(_sharp(seed), patch=3, image_size=12, num_masks=3, **options).eval()
    model.tau = tau
    return model


def _images(n: int = 10, seed: int = 0, side: int = 12) -> torch.Tensor:
    return torch.randn(n, 3, side, side, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------ command line
def test_rewrapping_on_the_command_line_keeps_the_loaded_models_tau(tmp_path, capsys):
    from robustwrap import zoo
    from robustwrap.cli import main

    torch.manual_seed(3)
    guard = robustwrap.wrap(timm.create_model("bagnet_tiny").eval(), defense="patchguard", tau=0.3).eval()
    guard.save_pretrained(tmp_path / "saved")
    zoo.builtin_dataset("mnist-heldout")[0][0].save(tmp_path / "digit.png")
    argv = ["predict", str(tmp_path / "digit.png"), "--model", str(tmp_path / "saved"), "--detect"]
    assert main([*argv, "--patch", "3"]) == 0  # --patch re-wraps the loaded model
    assert "certified detection at tau 0.3" in capsys.readouterr().out
    loaded = robustwrap.from_pretrained(str(tmp_path / "saved"))
    for options in (["--patch", "4"], ["--clip", "5"]):
        args = cli._parser().parse_args(["predict", "x.png", *options])
        again = cli._loading._with_settings(loaded, 4 if "--patch" in options else None, args)
        assert again is not loaded and again.tau == 0.3
    args = cli._parser().parse_args(["predict", "x.png", "--defense", "patchcleanser"])
    assert cli._loading._with_settings(loaded, None, args).tau == 0.0  # another defense starts from its own defaults
