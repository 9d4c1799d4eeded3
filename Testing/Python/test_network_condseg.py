"""Tests of the ConDSeg and ConDSegStage1 networks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import official_manifest

from MedSegSuiteLib.networks import create
from MedSegSuiteLib.networks.condseg import CDFA, ConDSeg, transfer_stage1_encoder
from MedSegSuiteLib.training.losses.condseg import condseg_loss

pytestmark = pytest.mark.usefixtures("single_thread")


PAPER_PARAMS = 45_552_786
PAPER_PARAMS_NO_AUX = 41_677_263
STAGE1_PARAMS = 8_662_848


def _manifest(name: str) -> dict[str, tuple[int, ...]]:
    return {key: shape for key, shape, _ in official_manifest(name)}


def _shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_condseg_paper_state_dict_matches_official_manifest():
    model = create("condseg", "paper")
    assert _shapes(model) == _manifest("condseg.tsv")
    assert _params(model) == PAPER_PARAMS


def test_condseg_stage1_paper_state_dict_matches_official_manifest():
    model = create("condseg_stage1", "paper")
    assert _shapes(model) == _manifest("condseg_stage1.tsv")
    assert _params(model) == STAGE1_PARAMS


def test_condseg_inference_only_model_drops_exactly_the_aux_head():
    full = create("condseg", "paper")
    slim = create("condseg", "paper", aux_head=False)
    assert _params(slim) == PAPER_PARAMS_NO_AUX
    expected = {k: v for k, v in _shapes(full).items() if not k.startswith("aux_head.")}
    assert _shapes(slim) == expected
    slim.load_state_dict({k: v for k, v in full.state_dict().items() if k in expected}, strict=True)
    slim.load_state_dict(full.state_dict(), strict=True)  # training checkpoints: aux entries are ignored
    with pytest.raises(RuntimeError):
        full.load_state_dict(slim.state_dict(), strict=True)


def test_condseg_lite_forward_returns_logits_and_aux_on_request():
    model = create("condseg", "lite").eval()
    with torch.no_grad():
        model.output_block.c3.bias.fill_(-5.0)  # probabilities could never be negative
    x = torch.rand(2, 3, 64, 96)
    with torch.inference_mode():
        logits = model(x)
        out = model(x, return_aux=True)
        proba = model.predict_proba(x)
    assert logits.shape == (2, 1, 64, 96)
    assert len(out) == 4 and all(t.shape == (2, 1, 64, 96) for t in out)
    assert torch.allclose(out[0], logits)
    assert torch.allclose(proba, torch.sigmoid(logits))
    assert logits.max() < 0


def test_condseg_rejects_bad_inputs_and_arguments():
    model = create("condseg", "lite", aux_head=False).eval()
    with pytest.raises(RuntimeError):
        model(torch.rand(1, 3, 64, 64), return_aux=True)
    with pytest.raises(ValueError):
        model(torch.rand(1, 3, 60, 64))
    with pytest.raises(ValueError):
        ConDSeg(dim=30, num_heads=4)
    with pytest.raises(ValueError):
        ConDSeg(encoder_layers=(3, 4, 6, 3))


def test_condseg_grey_stem_takes_one_channel():
    model = create("condseg", "lite", in_channels=1).eval()
    assert model.layer0[0].weight.shape[1] == 1
    with torch.inference_mode():
        assert model(torch.rand(1, 1, 32, 32)).shape == (1, 1, 32, 32)


def _cdfa_reference(cdfa: CDFA, x: torch.Tensor, g_fg: torch.Tensor, g_bg: torch.Tensor) -> torch.Tensor:
    """Outlook aggregation with explicit unfold/fold, written from the spec formula (section 1.2)."""
    k, heads = cdfa.kernel_size, cdfa.num_heads
    x = cdfa.input_cbr(x)
    b, c, h, w = x.shape
    d, kk = c // heads, k * k

    def attention(g, linear):
        a = linear(g.permute(0, 2, 3, 1)).reshape(b, h * w, heads, kk, kk).permute(0, 2, 1, 3, 4)
        return torch.softmax(a * cdfa.scale, dim=-1)  # [b, heads, L, i, j]

    def aggregate(a, values):  # values [b, h, w, c]
        win = F.unfold(values.permute(0, 3, 1, 2), k, padding=k // 2)  # [b, c*kk, L]
        win = win.reshape(b, heads, d, kk, h * w).permute(0, 1, 4, 3, 2)  # [b, heads, L, j, d]
        y = (a @ win).permute(0, 1, 4, 3, 2).reshape(b, c * kk, h * w)
        return F.fold(y, (h, w), k, padding=k // 2).permute(0, 2, 3, 1)

    v = cdfa.v(x.permute(0, 2, 3, 1))
    z = cdfa.proj(aggregate(attention(g_fg, cdfa.attn_fg), v))
    z = cdfa.proj(aggregate(attention(g_bg, cdfa.attn_bg), z))
    return cdfa.output_cbr(z.permute(0, 3, 1, 2))


@pytest.mark.parametrize("kernel_size", [3, 5])
def test_cdfa_matches_unfold_fold_reference_with_sharp_attention(kernel_size):
    torch.manual_seed(0)
    cdfa = CDFA(in_channels=24, dim=16, num_heads=2, kernel_size=kernel_size).eval()
    with torch.no_grad():  # sharp, far-from-uniform attention so any index mix-up shows
        cdfa.attn_fg.weight.mul_(40)
        cdfa.attn_bg.weight.mul_(40)
    x, g_fg, g_bg = torch.randn(2, 24, 9, 11), torch.randn(2, 16, 9, 11), torch.randn(2, 16, 9, 11)
    with torch.no_grad():
        ours = cdfa(x, g_fg, g_bg)
        ref = _cdfa_reference(cdfa, x, g_fg, g_bg)
    assert torch.allclose(ours, ref, atol=1e-5, rtol=1e-4)


def test_cdfa_gradients_match_reference():
    torch.manual_seed(1)
    cdfa = CDFA(in_channels=8, dim=8, num_heads=2).train()
    x, g_fg, g_bg = torch.randn(2, 8, 6, 7), torch.randn(2, 8, 6, 7), torch.randn(2, 8, 6, 7)
    grads = []
    for fn in (lambda: cdfa(x, g_fg, g_bg), lambda: _cdfa_reference(cdfa, x, g_fg, g_bg)):
        cdfa.zero_grad()
        fn().square().sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in cdfa.parameters()]))
    assert torch.allclose(grads[0], grads[1], atol=1e-4, rtol=1e-3)


def test_stage1_eval_shortcut_equals_official_upsample_first_order():
    torch.manual_seed(0)
    model = create("condseg_stage1", "lite").eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.bias.uniform_(-1, 1)
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        feats = [model.layer0(x)]
        for layer in (model.layer1, model.layer2, model.layer3):
            feats.append(layer(feats[-1]))
        maps = [
            getattr(model.head, f"conv{k + 1}")(F.interpolate(f, size=(64, 64), mode="bilinear", align_corners=True))
            for k, f in enumerate(feats)
        ]
        official_order = model.head.conv_fuse(torch.cat(maps, dim=1))
        ours = model(x)
    assert ours.shape == (1, 1, 64, 64)
    assert torch.allclose(ours, official_order, atol=1e-5)


def test_transfer_stage1_encoder_copies_parameters_and_bn_statistics():
    stage1, stage2 = create("condseg_stage1", "lite"), create("condseg", "lite")
    with torch.no_grad():
        for m in stage1.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
                m.num_batches_tracked.fill_(7)
    copied = transfer_stage1_encoder(stage1, stage2)
    s1, s2 = stage1.state_dict(), stage2.state_dict()
    assert any(k.endswith("running_mean") for k in copied)
    for key in copied:
        assert torch.equal(s1[key], s2[key]), key
    assert not any(k.startswith("head") or k.startswith("dconv") for k in copied)
    with pytest.raises(ValueError):
        transfer_stage1_encoder(create("condseg_stage1", "paper"), stage2)


def test_condseg_training_step_reaches_every_parameter():
    torch.manual_seed(0)
    model = create("condseg", "lite", dim=16, encoder_layers=(1, 1, 1)).train()
    x = torch.rand(2, 3, 32, 32)
    y = (torch.rand(2, 1, 32, 32) > 0.5).float()
    condseg_loss(*model(x, return_aux=True), y)["loss"].backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing


def _discs(n: int, size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Bright discs of random centre/radius on noise, RGB in [0, 1], with their masks."""
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    centre = torch.rand(n, 2, generator=generator) * size * 0.5 + size * 0.25
    radius = torch.rand(n, generator=generator) * size * 0.15 + size * 0.1
    dist = ((yy - centre[:, 0, None, None]) ** 2 + (xx - centre[:, 1, None, None]) ** 2).sqrt()
    mask = (dist < radius[:, None, None]).float().unsqueeze(1)
    noise = torch.rand(n, 3, size, size, generator=generator) * 0.6
    return (noise + 0.4 * mask).clamp(0, 1), mask


def _dice(logits: torch.Tensor, mask: torch.Tensor) -> float:
    pred = (logits > 0).float()
    inter = (pred * mask).sum(dim=(1, 2, 3))
    return ((2 * inter + 1e-6) / (pred.sum(dim=(1, 2, 3)) + mask.sum(dim=(1, 2, 3)) + 1e-6)).mean().item()


def test_condseg_lite_learns_synthetic_discs():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    x_val, y_val = _discs(8, 64, g)
    model = create("condseg", "lite", dim=16, encoder_layers=(1, 1, 1))
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
        condseg_loss(*model(x, return_aux=True), y)["loss"].backward()
        opt.step()
    end = validate()
    assert end > 0.6 and end > start + 0.3, (start, end)


def test_condseg_channels_last_and_training_mode_paths_agree_with_eval_default():
    torch.manual_seed(0)
    model = create("condseg", "lite").eval()
    x = torch.rand(2, 3, 32, 48)
    with torch.no_grad():
        reference = model(x, return_aux=True)
    with torch.enable_grad():  # autograd on: unfused BN and the out-of-place CDFA path
        plain = model(x, return_aux=True)
    model_cl = model.to(memory_format=torch.channels_last)
    with torch.inference_mode():
        fast = model_cl(x.contiguous(memory_format=torch.channels_last), return_aux=True)
    for a, b, c in zip(reference, plain, fast):
        assert torch.allclose(a, b.detach(), atol=1e-5)
        assert torch.allclose(a, c, atol=1e-5)
