"""Tests of the HiDiff refiner (BBDMRefiner), its binary primitives, and the default segmentor."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import KEYS, official_manifest

from MedSegSuiteLib.networks import create
from MedSegSuiteLib.networks.bbdm import BBDM, BernoulliSchedule, prior_from_logits
from MedSegSuiteLib.networks.hidiff import (
    PRESETS,
    ApproxSign,
    BBDMRefiner,
    BinaryConv2d,
    BinaryLinear,
    FeatureSegmentor,
    HiDiffSegmentor,
    XFormer,
)

PAPER_K9_PARAMS = 89_209_929
PAPER_K1_RGB_PARAMS = 89_184_577
LITE_PARAMS = 5_483_977
SEGMENTOR_PAPER_PARAMS = 17_608_265
SEGMENTOR_LITE_PARAMS = 734_121


def _manifest(name: str) -> list[tuple[str, tuple[int, ...]]]:
    return [(key, shape) for key, shape, _ in official_manifest(name)]


def _params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _inputs(model: BBDMRefiner, size: int = 64, batch: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    k = model.num_classes
    y = torch.bernoulli(torch.full((batch, k, size, size), 0.5), generator=g)
    t = torch.randint(0, 10, (batch,), generator=g)
    img = torch.randn(batch, model.img_channels, size, size, generator=g)
    prior = torch.rand(batch, k, size, size, generator=g)
    feats = [
        torch.randn(batch, c, size // s, size // s, generator=g) for c, s in zip(model.condition_dims, (4, 8, 16, 32))
    ]
    return y, t, img, prior, feats


def _randomize(model: torch.nn.Module, seed: int = 0, std: float = 0.05) -> torch.nn.Module:
    """Perturb every parameter (zero-initialised ones included) and the BN statistics."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)
        for name, b in model.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(torch.randn(b.shape, generator=g) * 0.1)
            elif name.endswith("running_var"):
                b.copy_(torch.rand(b.shape, generator=g) + 0.5)
    return model


# ------------------------------------------------------------------------ official layout
def test_hidiff_refiner_state_dict_matches_official_k9_manifest():
    manifest = _manifest("hidiff_refiner_k9.tsv")
    model = create("hidiff_refiner", "paper")
    ours = [(k, tuple(v.shape)) for k, v in model.state_dict().items()]
    assert ours == manifest  # same keys, shapes and registration order
    assert _params(model) == PAPER_K9_PARAMS
    header = (KEYS / "hidiff_refiner_k9.tsv").read_text(encoding="utf-8").splitlines()[0]
    assert f"total params: {PAPER_K9_PARAMS}" in header


def test_hidiff_refiner_k1_rgb_state_dict_matches_official_manifest():
    manifest = _manifest("hidiff_refiner_k1_rgb.tsv")
    model = create("hidiff_refiner", "paper", img_channels=3, num_classes=1)
    assert [(k, tuple(v.shape)) for k, v in model.state_dict().items()] == manifest
    assert _params(model) == PAPER_K1_RGB_PARAMS


def test_real_valued_twin_has_the_same_keys_and_loads_binary_weights_strictly():
    binary = create("hidiff_refiner", "lite", binary=True)
    real = create("hidiff_refiner", "lite", binary=False)
    assert {k: v.shape for k, v in binary.state_dict().items()} == {k: v.shape for k, v in real.state_dict().items()}
    real.load_state_dict(binary.state_dict(), strict=True)


def test_parameter_counts_of_presets():
    assert _params(create("hidiff_refiner", "lite")) == LITE_PARAMS
    assert _params(create("hidiff_segmentor", "paper")) == SEGMENTOR_PAPER_PARAMS
    assert _params(create("hidiff_segmentor", "lite")) == SEGMENTOR_LITE_PARAMS


# ------------------------------------------------------------------------------ init, shapes
@pytest.mark.parametrize("preset", ["paper", "lite"])
def test_refiner_has_no_nan_at_init_and_starts_at_eps_one_half(preset):
    model = create("hidiff_refiner", preset).eval()
    for name, p in model.state_dict().items():
        assert torch.isfinite(p.float()).all(), name
    y, t, img, prior, feats = _inputs(model, size=32 if preset == "paper" else 64, batch=1)
    with torch.no_grad():
        logits = model(y, t, img, prior, feats)
    assert logits.shape == y.shape
    assert torch.equal(logits, torch.zeros_like(logits))  # zero-initialised head: eps_hat = 0.5


def test_refiner_train_mode_forward_and_backward_are_finite():
    model = _randomize(create("hidiff_refiner", "lite", binary=True, num_classes=2, img_channels=3))
    y, t, img, prior, feats = _inputs(model, size=64, batch=2)
    out = model(y, t, img, prior, feats)
    assert out.shape == (2, 2, 64, 64) and torch.isfinite(out).all()
    out.square().mean().backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert model.block1_conv.binary_3x3.weight.grad.abs().sum() > 0


def test_refiner_rejects_bad_arguments_and_inputs():
    with pytest.raises(ValueError, match="width"):
        BBDMRefiner(width=48)
    with pytest.raises(ValueError, match="condition_dims"):
        BBDMRefiner(condition_dims=(96, 192, 384))
    with pytest.raises(ValueError, match="condition_dims"):
        BBDMRefiner(condition_dims=(90, 192, 384, 768))
    model = create("hidiff_refiner", "lite").eval()
    y, t, img, prior, feats = _inputs(model, size=64, batch=1)
    with pytest.raises(ValueError, match="divisible by 32"):
        model(y[..., :48, :48], t, img[..., :48, :48], prior[..., :48, :48], feats)
    with pytest.raises(ValueError, match="feats"):
        model(y, t, img, prior, feats[:3])
    with pytest.raises(ValueError, match="feats\\[1\\]"):
        model(y, t, img, prior, [feats[0], feats[0], feats[2], feats[3]])


# -------------------------------------------------------------------------- binary primitives
def test_approx_sign_forward_is_sign_and_gradient_is_the_surrogate():
    x = torch.tensor([-2.0, -1.0, -0.75, -0.25, 0.0, 0.25, 0.75, 1.0, 1.5], requires_grad=True)
    y = ApproxSign.apply(x)
    assert torch.equal(y, torch.sign(x.detach()))
    y.backward(torch.ones_like(x))
    xd = x.detach()
    expected = torch.where(xd.abs() <= 1, 2 - 2 * xd.abs(), torch.zeros_like(xd))
    assert torch.allclose(x.grad, expected)
    assert x.grad[2] == pytest.approx(2 + 2 * -0.75) and x.grad[6] == pytest.approx(2 - 2 * 0.75)


def test_binary_conv_uses_scaled_sign_weights_and_the_clipped_straight_through_gradient():
    conv = BinaryConv2d(3, 4, 3, 1, 1, binary=True)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape) * 0.6)  # some |w| > 1
        conv.bias.copy_(torch.randn(4))
    w = conv.weight.detach()
    scale = w.abs().mean(dim=(1, 2, 3), keepdim=True)
    assert torch.allclose(conv.effective_weight(), scale * torch.sign(w), atol=1e-6)
    x = torch.randn(2, 3, 8, 8)
    gout = torch.randn(2, 4, 8, 8)
    (conv(x) * gout).sum().backward()
    wb = (scale * torch.sign(w)).requires_grad_(True)
    (grad_wb,) = torch.autograd.grad((F.conv2d(x, wb, conv.bias.detach(), padding=1) * gout).sum(), wb)
    assert torch.allclose(conv.weight.grad, grad_wb * (w.abs() <= 1), atol=1e-5)
    assert (w.abs() > 1).any() and torch.equal(conv.weight.grad[w.abs() > 1], torch.zeros(int((w.abs() > 1).sum())))


def test_binary_linear_centres_rows_and_routes_gradients_through_both_surrogates():
    lin = BinaryLinear(6, 3, binary=True)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(3, 6) * 0.8 + 0.3)
    w = lin.weight.detach()
    centred = w - w.mean(1, keepdim=True)
    scale = w.abs().mean(1, keepdim=True)  # scale from the uncentred weight, as officially
    assert torch.allclose(lin.effective_weight(), scale * torch.sign(centred), atol=1e-6)
    x = (torch.randn(4, 6) * 0.8).requires_grad_(True)
    gout = torch.randn(4, 3)
    (lin(x) * gout).sum().backward()
    xs = torch.sign(x.detach()).requires_grad_(True)
    wb = (scale * torch.sign(centred)).requires_grad_(True)
    gx, gw = torch.autograd.grad((F.linear(xs, wb) * gout).sum(), (xs, wb))
    ax = x.detach().abs()
    assert torch.allclose(x.grad, gx * torch.where(ax <= 1, 2 - 2 * ax, torch.zeros_like(ax)), atol=1e-5)
    gc = gw * (centred.abs() <= 1)
    assert torch.allclose(lin.weight.grad, gc - gc.mean(1, keepdim=True), atol=1e-5)


def test_binary_eval_cache_equals_the_uncached_forward_and_follows_weight_changes():
    model = _randomize(create("hidiff_refiner", "lite", binary=True, num_classes=2), seed=1)
    inputs = _inputs(model, size=64, batch=2, seed=1)
    model.eval()
    with torch.no_grad():
        cached = model(*inputs)
    conv = model.block1_conv.binary_3x3
    assert conv._w_cache is not None  # eval + no_grad populated the cache
    with torch.enable_grad():
        uncached = model(*inputs)  # autograd path recomputes the binarised weights
    assert torch.allclose(cached, uncached, atol=1e-6, rtol=0)

    # an optimiser step (in place) must invalidate the cache
    model.train()
    assert conv._w_cache is None  # train() clears it
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    model(*inputs).square().mean().backward()
    opt.step()
    model.eval()
    with torch.no_grad():
        cached2 = model(*inputs)
    with torch.enable_grad():
        uncached2 = model(*inputs)
    assert torch.allclose(cached2, uncached2, atol=1e-6, rtol=0)
    assert not torch.allclose(cached2, cached)

    # an in-place edit under no_grad (eval mode, no train() call) is seen too
    with torch.no_grad():
        model.up_block5_conv.binary_3x3.weight.neg_()
        edited = model(*inputs)
    with torch.enable_grad():
        assert torch.allclose(edited, model(*inputs), atol=1e-6, rtol=0)
    assert not torch.allclose(edited, cached2)


def test_xformer_is_the_identity_at_init_with_the_correct_token_order_only():
    correct = XFormer(64, 128, 128, binary=True).eval()
    legacy = XFormer(64, 128, 128, binary=True, legacy_token_order=True).eval()
    legacy.load_state_dict(correct.state_dict())
    x = torch.randn(2, 128, 2, 3)
    feat = torch.randn(2, 64, 2, 3)
    emb = torch.randn(2, 128)
    with torch.no_grad():
        out = correct(feat, x, emb)
        out_legacy = legacy(feat, x, emb)
    assert torch.allclose(out, x, atol=1e-6)  # zero LayerScales: the refiner stream passes through
    assert not torch.allclose(out_legacy, x, atol=1e-3)  # the official reshape scrambles it
    tokens = x.flatten(2).transpose(1, 2)
    assert torch.allclose(out_legacy, tokens.reshape(2, 128, 2, 3), atol=1e-6)


def test_legacy_and_correct_token_order_give_different_refiner_outputs():
    model = _randomize(create("hidiff_refiner", "lite", binary=True, num_classes=2), seed=2).eval()
    inputs = _inputs(model, size=64, batch=1, seed=2)
    with torch.no_grad():
        a = model(*inputs)
        model.legacy_token_order = True
        b = model(*inputs)
    assert model.cross1.legacy_token_order
    assert not torch.allclose(a, b, atol=1e-4)


# ---------------------------------------------------------------------------------- segmentor
@pytest.mark.parametrize("preset", ["paper", "lite"])
def test_segmentor_feature_dims_match_the_refiner_condition_dims(preset):
    seg = PRESETS["hidiff_segmentor"][preset]
    ref = PRESETS["hidiff_refiner"][preset]
    assert tuple(seg["features"][2:]) == tuple(ref["condition_dims"])


def test_segmentor_returns_logits_and_four_feature_maps_that_feed_the_refiner():
    seg = create("hidiff_segmentor", "lite", num_classes=3, in_channels=1).eval()
    assert isinstance(seg, FeatureSegmentor) and isinstance(seg, HiDiffSegmentor)
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        feats, logits = seg.features_and_logits(x)
        assert torch.equal(seg(x), logits)
    assert logits.shape == (2, 3, 64, 64)
    assert [tuple(f.shape) for f in feats] == [
        (2, c, 64 // s, 64 // s) for c, s in zip(seg.feature_dims, (4, 8, 16, 32))
    ]
    refiner = create("hidiff_refiner", "lite", num_classes=3).eval()
    prior = prior_from_logits(logits)
    y = torch.bernoulli(prior)
    with torch.no_grad():
        out = refiner(y, torch.tensor([4, 4]), x, prior, feats)
    assert out.shape == (2, 3, 64, 64)
    with pytest.raises(ValueError, match="divisible by 32"):
        seg(torch.randn(1, 1, 40, 40))
    # the smallest input (1x1 bottleneck) trains, with non-constant features there
    seg.train()
    feats32, logits32 = seg.features_and_logits(torch.randn(2, 1, 32, 32))
    assert logits32.shape == (2, 3, 32, 32) and feats32[3].shape == (2, seg.feature_dims[3], 1, 1)
    assert feats32[3].std() > 0
    with pytest.raises(ValueError, match="divisible by 8"):
        HiDiffSegmentor(features=(12, 32, 32, 64, 64, 128))


# ------------------------------------------------------------------------------------ learning
def _disc_batch(n: int, size: int, g: torch.Generator):
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    centre = torch.rand(n, 2, generator=g) * (size - 16) + 8
    radius = torch.rand(n, generator=g) * 5 + 5
    d2 = (yy[None] - centre[:, 0, None, None]) ** 2 + (xx[None] - centre[:, 1, None, None]) ** 2
    mask = (d2 <= radius[:, None, None] ** 2).float()[:, None]
    img = mask + 0.3 * torch.randn(mask.shape, generator=g)
    shift = torch.randint(-3, 4, (2,), generator=g)
    prior = F.avg_pool2d(torch.roll(mask, (int(shift[0]), int(shift[1])), (2, 3)), 5, 1, 2)
    prior = (0.8 * prior + 0.1 + 0.1 * torch.rand(mask.shape, generator=g)).clamp(0.02, 0.98)
    return img, mask, prior


def test_lite_refiner_learns_to_denoise_disc_masks_with_the_bbdm_loss():
    torch.manual_seed(0)
    size = 32
    model = create("hidiff_refiner", "lite", num_classes=1)
    bbdm = BBDM(BernoulliSchedule("cosine"))
    zero_feats = [torch.zeros(1, c, size // s, size // s) for c, s in zip(model.condition_dims, (4, 8, 16, 32))]

    def loss(batch, k, gen):
        img, y0, prior = batch
        feats = [f.expand(y0.shape[0], -1, -1, -1) for f in zero_feats]
        return bbdm.training_losses(lambda yk, kk: model(yk, kk, img, prior, feats), y0, prior, k, generator=gen)

    held_out = _disc_batch(16, size, torch.Generator().manual_seed(1))
    k_held = torch.arange(16) % 10

    def evaluate() -> float:
        model.eval()
        with torch.no_grad():
            value = float(loss(held_out, k_held, torch.Generator().manual_seed(2))["total"])
        model.train()
        return value

    before = evaluate()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
    g = torch.Generator().manual_seed(3)
    for _ in range(40):
        out = loss(_disc_batch(8, size, g), None, g)
        opt.zero_grad()
        out["total"].backward()
        opt.step()
    after = evaluate()
    img, y0, prior = held_out
    zero = bbdm.training_losses(
        lambda yk, kk: torch.zeros_like(yk), y0, prior, k_held, generator=torch.Generator().manual_seed(2)
    )
    assert before == pytest.approx(float(zero["total"]), abs=1e-6)  # zero-initialised head
    assert after < 0.5 * before, (before, after)
