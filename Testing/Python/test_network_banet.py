"""Tests of the BA-Net network."""

from __future__ import annotations

import pytest
import torch
from conftest import official_manifest

from MedSegSuiteLib.networks import create
from MedSegSuiteLib.networks.banet import BANet, FeatureCrossFusion, MultiTaskNet
from MedSegSuiteLib.training.losses.banet import banet_loss

PAPER_PARAMS = 44_857_658


pytestmark = pytest.mark.usefixtures("single_thread")


def _manifest(name: str) -> dict[str, tuple[int, ...]]:
    return {key: shape for key, shape, _ in official_manifest(name)}


def test_banet_paper_state_dict_matches_official_manifest():
    model = create("banet", "paper")
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes == _manifest("banet.tsv")
    assert sum(p.numel() for p in model.parameters()) == PAPER_PARAMS


def test_banet_without_unused_parameters_drops_fc_and_up_conv4():
    model = create("banet", "paper", keep_unused=False)
    keys = model.state_dict().keys()
    assert not any(k.startswith(("pretrain_model.fc.", "head.up_conv4.")) for k in keys)
    dropped = PAPER_PARAMS - sum(p.numel() for p in model.parameters())
    assert dropped == 2048 * 1000 + 1000 + 256 * 9 + 2 * 256 + 256 * 128


def test_banet_eval_output_has_the_input_size_for_any_size():
    model = create("banet", "lite").eval()
    for size in ((64, 64), (72, 88)):
        with torch.inference_mode():
            out = model(torch.rand(1, 3, *size))
        assert out.shape == (1, 2, *size)


def test_banet_side_outputs_on_request():
    model = create("banet", "lite").eval()
    x = torch.rand(2, 3, 64, 80)
    with torch.inference_mode():
        plain = model(x)
        logits, side = model(x, return_side=True)
    assert torch.allclose(plain, logits)
    assert len(side) == 4
    assert all(seg.shape == edge.shape == (2, 2, 64, 80) for seg, edge in side)
    probs = model.predict_proba(x)
    assert torch.allclose(probs.sum(1), torch.ones(2, 64, 80), atol=1e-5)


def test_banet_paper_backbone_is_dilated_to_stride_8():
    model = create("banet", "paper").eval()
    with torch.inference_mode():
        feats = model.pretrain_model(torch.rand(1, 3, 64, 64))
    assert [tuple(f.shape[-2:]) for f in feats] == [(16, 16), (8, 8), (8, 8), (8, 8)]
    assert all(b.conv2.dilation == (4, 4) for b in model.pretrain_model.layer4)


def test_banet_rejects_invalid_arguments():
    with pytest.raises(ValueError):
        BANet(num_classes=1)
    with pytest.raises(ValueError):
        BANet(output_stride=32)
    with pytest.raises(ValueError):
        MultiTaskNet(2, 64, 32, (4, 5))
    with pytest.raises(ValueError):
        FeatureCrossFusion(8)(torch.rand(1, 8, 4, 4), torch.rand(1, 8, 4, 4))


def test_cross_feature_fusion_matches_its_formula():
    torch.manual_seed(0)
    cff = FeatureCrossFusion(4)
    own, a, b, c = torch.randn(1, 4, 6, 6), torch.randn(1, 4, 6, 6), torch.randn(1, 4, 3, 3), torch.randn(1, 4, 6, 6)
    b_up = torch.nn.functional.interpolate(b, size=(6, 6), mode="bilinear", align_corners=True)
    gated = (
        torch.sigmoid(cff.att_conv2(a)) * a
        + torch.sigmoid(cff.att_conv3(b_up)) * b_up
        + torch.sigmoid(cff.att_conv4(c)) * c
    )
    expected = own + (1 - torch.sigmoid(cff.att_conv1(own))) * gated
    with torch.no_grad():
        assert torch.allclose(cff(own, a, b, c), expected, atol=1e-6)


def test_banet_training_step_reaches_every_used_parameter():
    torch.manual_seed(0)
    model = create("banet", "lite", reduce_dim=16, aspp_dim=16, encoder_layers=(1, 1, 1, 1)).train()
    x = torch.rand(2, 3, 32, 32)
    y = (torch.rand(2, 32, 32) > 0.5).long()
    logits, side = model(x, return_side=True)
    banet_loss(logits, side, y)["loss"].backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing


def _discs(n: int, size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    centre = torch.rand(n, 2, generator=generator) * size * 0.5 + size * 0.25
    radius = torch.rand(n, generator=generator) * size * 0.15 + size * 0.1
    dist = ((yy - centre[:, 0, None, None]) ** 2 + (xx - centre[:, 1, None, None]) ** 2).sqrt()
    mask = (dist < radius[:, None, None]).long()
    noise = torch.rand(n, 3, size, size, generator=generator) * 0.6
    return (noise + 0.4 * mask.unsqueeze(1)).clamp(0, 1), mask


def _dice(logits: torch.Tensor, mask: torch.Tensor) -> float:
    pred = (logits.argmax(1) == 1).float()
    target = mask.float()
    inter = (pred * target).sum(dim=(1, 2))
    return ((2 * inter + 1e-6) / (pred.sum(dim=(1, 2)) + target.sum(dim=(1, 2)) + 1e-6)).mean().item()


def test_banet_lite_learns_synthetic_discs():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    x_val, y_val = _discs(8, 64, g)
    model = create("banet", "lite", reduce_dim=16, aspp_dim=16, encoder_layers=(1, 1, 1, 1))
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)

    def validate() -> float:
        model.eval()
        with torch.inference_mode():
            return _dice(model(x_val), y_val)

    start = validate()
    model.train()
    for _ in range(30):
        x, y = _discs(8, 64, g)
        opt.zero_grad()
        logits, side = model(x, return_side=True)
        banet_loss(logits, side, y)["loss"].backward()
        opt.step()
    end = validate()
    assert end > 0.6 and end > start + 0.3, (start, end)


def test_banet_channels_last_and_autograd_paths_agree_with_eval_default():
    torch.manual_seed(0)
    model = create("banet", "lite").eval()
    x = torch.rand(2, 3, 48, 40)
    with torch.no_grad():
        reference = model(x)
    with torch.enable_grad():
        plain = model(x).detach()
    with torch.inference_mode():
        fast = model.to(memory_format=torch.channels_last)(x.contiguous(memory_format=torch.channels_last))
    assert torch.allclose(reference, plain, atol=1e-5)
    assert torch.allclose(reference, fast, atol=1e-5)
