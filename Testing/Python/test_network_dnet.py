"""D-Net: official state_dict layouts, shapes, the size guard, exactness of the fast kernels, learning."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import dice, official_manifest, sphere_volume

from MedSegSuiteLib import networks
from MedSegSuiteLib.networks import dnet as dnet_module
from MedSegSuiteLib.networks.dnet import DFF, DLK, DNet

TINY = {"widths": (8, 16, 32, 64, 128), "depths": (1, 1, 1, 1, 1)}


pytestmark = pytest.mark.usefixtures("single_thread")


def _state(net: torch.nn.Module) -> list[tuple[str, tuple[int, ...], str]]:
    return [(k, tuple(v.shape), str(v.dtype).replace("torch.", "")) for k, v in net.state_dict().items()]


def _n_params(net: torch.nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def test_dnet_paper_state_dict_matches_official_v2_manifest():
    net = networks.create("dnet")
    assert _state(net) == official_manifest("dnet_v2_k14.tsv")
    assert _n_params(net) == 39_277_628


def test_dnet_v1_state_dict_matches_official_v1_manifest():
    net = networks.create("dnet", variant="v1")
    assert _state(net) == official_manifest("dnet_v1_k14.tsv")
    assert _n_params(net) == 29_957_220


def test_dnet_official_layout_loads_strictly_and_deep_supervision_keeps_the_keys():
    plain = networks.create("dnet", **TINY, num_classes=3)
    supervised = networks.create("dnet", **TINY, num_classes=3, deep_supervision=True)
    assert list(plain.state_dict()) == list(supervised.state_dict())
    supervised.load_state_dict(plain.state_dict(), strict=True)


@pytest.mark.parametrize("variant", ["v2", "v1"])
def test_dnet_forward_shapes_and_gradients(variant):
    torch.manual_seed(0)
    net = networks.create("dnet", **TINY, in_channels=2, num_classes=3, variant=variant)
    x = torch.randn(2, 2, 32, 64, 32)
    y = net(x)
    assert y.shape == (2, 3, 32, 64, 32) and y.is_contiguous()
    y.square().mean().backward()
    head = "output_layer.weight" if variant == "v1" else "decoder.output_layer.weight"
    assert net.get_parameter(head).grad.abs().sum() > 0
    stem = "dnet_down" if variant == "v1" else "encoder"
    assert net.get_parameter(f"{stem}.downsample_layers.0.weight").grad.abs().sum() > 0


def test_dnet_deep_supervision_returns_full_resolution_first():
    torch.manual_seed(0)
    net = networks.create("dnet", **TINY, num_classes=4, deep_supervision=True).eval()
    x = torch.randn(1, 1, 64, 32, 64)
    with torch.no_grad():
        outs = net(x)
        main = net.predict_logits(x)
    assert [tuple(o.shape) for o in outs] == [(1, 4, 64 // s, 32 // s, 64 // s) for s in (1, 2, 4, 8, 16)]
    torch.testing.assert_close(main, outs[0])
    net.deep_supervision = False
    with torch.no_grad():
        torch.testing.assert_close(net(x), main)


def test_dnet_rejects_sizes_that_are_not_multiples_of_32():
    net = networks.create("dnet", **TINY)
    with pytest.raises(ValueError, match=r"axis H has 80\. Nearest valid sizes: 64 or 96"):
        net(torch.zeros(1, 1, 32, 80, 32))
    with pytest.raises(ValueError, match=r"axis D has 20\. Nearest valid sizes: 32"):
        net(torch.zeros(1, 1, 20, 32, 32))


def test_dnet_rejects_bad_arguments():
    with pytest.raises(ValueError, match="variant"):
        DNet(variant="v3")
    with pytest.raises(ValueError, match="even widths"):
        DNet(widths=(9, 16, 32, 64, 128))
    with pytest.raises(ValueError, match="depths needs five"):
        DNet(depths=(2, 2, 2, 2))
    with pytest.raises(ValueError, match="only in D-Net v2"):
        DNet(variant="v1", deep_supervision=True)


@pytest.mark.parametrize(
    "shape, kernel, dilation",
    [
        ((1, 3, 12, 12, 12), 7, 3),
        ((2, 4, 8, 5, 7), 7, 3),
        ((1, 2, 2, 3, 4), 7, 3),
        ((1, 5, 3, 2, 6), 5, 1),
        ((2, 6, 4, 4, 4), 3, 1),
        ((1, 2, 1, 1, 1), 7, 3),
    ],
)
def test_fast_depthwise_conv_equals_plain_dilated_conv(shape, kernel, dilation):
    torch.manual_seed(0)
    channels = shape[1]
    padding = dilation * (kernel // 2)
    conv = torch.nn.Conv3d(channels, channels, kernel, padding=padding, dilation=dilation, groups=channels)
    x = torch.randn(shape)
    torch.testing.assert_close(dnet_module._depthwise(x, conv), conv(x), rtol=1e-5, atol=1e-5)


def test_fast_upsampling_equals_transposed_conv():
    torch.manual_seed(0)
    up = torch.nn.ConvTranspose3d(6, 4, 2, stride=2)
    x = torch.randn(2, 6, 3, 4, 5)
    torch.testing.assert_close(dnet_module._upsample2(x, up.weight, up.bias), up(x), rtol=1e-5, atol=1e-5)


def _reference_dlk(m: DLK, u: torch.Tensor) -> torch.Tensor:
    p = m.channel_proj(u) if m.variant == "v2" else u
    a1 = m.att_conv1(p)
    a2 = m.att_conv2(a1)
    a = torch.cat([a1, a2], 1)
    g = m.spatial_se(torch.cat([a.mean(1, keepdim=True), a.max(1, keepdim=True)[0]], 1))
    if m.variant == "v1":
        return a1 * g[:, :1] + a2 * g[:, 1:] + u
    a = a * g[:, :1] + a * g[:, 1:]
    return m.conv_atten(F.adaptive_avg_pool3d(a, 1)) * a + u


@pytest.mark.parametrize("variant", ["v2", "v1"])
def test_dlk_matches_its_published_formula_including_the_summed_gate(variant):
    torch.manual_seed(0)
    m = DLK(8, variant)
    u = torch.randn(2, 8, 6, 9, 7)
    torch.testing.assert_close(m(u), _reference_dlk(m, u), rtol=1e-5, atol=1e-5)


def test_dff_matches_its_published_formula():
    torch.manual_seed(0)
    m = DFF(6)
    x, s = torch.randn(2, 6, 4, 5, 6), torch.randn(2, 6, 4, 5, 6)
    t = torch.cat([x, s], 1)
    t = t * m.conv_atten(F.adaptive_avg_pool3d(t, 1))
    expected = m.conv_redu(t) * torch.sigmoid(m.conv1(x) + m.conv2(s))
    torch.testing.assert_close(m(x, s), expected, rtol=1e-5, atol=1e-5)


def test_dlk_block_shares_one_norm_and_one_layer_scale():
    block = networks.create("dnet", **TINY).encoder.stages[0][0]
    names = [n for n, _ in block.named_parameters() if "norm" in n or "layer_scale" in n]
    assert names == ["layer_scale", "norm_layer.weight", "norm_layer.bias"]
    with torch.no_grad():
        block.layer_scale.zero_()
    x = torch.randn(1, 8, 4, 4, 4)
    torch.testing.assert_close(block(x), x)  # both branches are scaled by the same vector


def test_salience_layer_updates_its_batchnorm_twice_per_training_forward():
    layer = networks.create("dnet", **TINY).encoder.saliency.train()
    layer(torch.randn(2, 1, 8, 8, 8))
    assert int(layer.norm_layer.num_batches_tracked) == 2


def test_dnet_lite_preset_is_small_and_runs_at_64():
    net = networks.create("dnet", "lite", num_classes=3).eval()
    assert _n_params(net) < 4_000_000
    with torch.no_grad():
        assert net(torch.zeros(1, 1, 64, 64, 64)).shape == (1, 3, 64, 64, 64)


def _sphere_batch(rng: np.random.Generator, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = [], []
    for _ in range(n):
        centre = tuple(rng.uniform(11, 21, 3))
        image, mask = sphere_volume((32, 32, 32), centre, rng.uniform(5, 8), seed=int(rng.integers(1 << 30)))
        xs.append((image - image.mean()) / image.std())
        ys.append(mask)
    return torch.from_numpy(np.stack(xs))[:, None], torch.from_numpy(np.stack(ys)).long()


def test_dnet_tiny_learns_a_bright_sphere():
    from MedSegSuiteLib.training.losses.dnet import DNetLoss

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    net = networks.create("dnet", **TINY, num_classes=2, deep_supervision=True)
    val_x, val_y = _sphere_batch(rng, 2)

    def val_dice() -> float:
        net.eval()
        with torch.no_grad():
            pred = net.predict_logits(val_x).argmax(1).numpy()
        net.train()
        return dice(pred, val_y.numpy())

    before = val_dice()
    loss_fn = DNetLoss()
    optimiser = torch.optim.AdamW(net.parameters(), lr=3e-3)
    for _ in range(20):
        x, y = _sphere_batch(rng, 2)
        loss = loss_fn(net(x), y)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    after = val_dice()
    assert after > 0.7 and after > before + 0.5, (before, after)


def test_tiled_inference_of_the_channel_mlp_equals_the_untiled_one(monkeypatch):
    torch.manual_seed(0)
    mlp = dnet_module.ConvMLP(4).eval()
    x = torch.randn(2, 4, 13, 6, 5)
    residual = torch.randn_like(x)
    with torch.enable_grad():
        expected = mlp._run(x, mlp.fc1.weight, mlp.fc1.bias, residual).detach()
    monkeypatch.setattr(dnet_module, "_SLAB_ELEMENTS", 2 * 6 * 5 * 16 * 2)  # two slices per slab
    with torch.no_grad():
        assert mlp._slab(x) == 2
        torch.testing.assert_close(mlp._run(x, mlp.fc1.weight, mlp.fc1.bias, residual), expected, rtol=1e-5, atol=1e-5)


def _randomise_batchnorms(module: torch.nn.Module) -> None:
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, torch.nn.BatchNorm3d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.2)
                m.running_mean.normal_(0, 0.2)
                m.running_var.uniform_(0.5, 2.0)


def test_eval_mode_batchnorm_folding_matches_the_module_formula():
    torch.manual_seed(0)
    salience = dnet_module.SalienceLayer(1, 8)
    block = dnet_module.ConvBlock(8, 8)
    _randomise_batchnorms(salience)
    _randomise_batchnorms(block)
    salience.eval()
    block.eval()
    x = torch.randn(2, 1, 6, 7, 8)
    with torch.no_grad():
        s = F.leaky_relu(salience.norm_layer(salience.channel_proj(x)), 0.2)
        expected = s + salience.mlp(salience.norm_layer(s))
        torch.testing.assert_close(salience(x), expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(block(s), block.conv2(block.conv1(s.clone())), rtol=1e-5, atol=1e-5)


def test_drop_path_is_stochastic_in_training_and_off_in_eval():
    torch.manual_seed(0)
    net = networks.create("dnet", **TINY, drop_path_rate=0.5)
    rates = [block.drop_path for stage in net.encoder.stages for block in stage]
    assert rates[0] == 0.0 and rates[-1] == pytest.approx(0.5) and rates == sorted(rates)
    with torch.no_grad():
        for block in net.modules():
            if isinstance(block, dnet_module.DLKBlock):
                block.layer_scale.fill_(1.0)
    x = torch.randn(2, 1, 32, 32, 32)
    net.train()
    with torch.no_grad():
        assert not torch.allclose(net(x), net(x))
        net.eval()
        torch.testing.assert_close(net(x), net(x))
