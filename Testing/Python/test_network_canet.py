"""CANet segmenter and discriminator: official layouts, the token grid, heads, dropout, SE, learning."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import dice, official_manifest, sphere_volume

from MedSegSuiteLib import networks
from MedSegSuiteLib.networks.canet import CANet, CANetDiscriminator

TINY = {
    "base_filters": 4,
    "patch_size": (32, 32, 16),
    "hidden_size": 16,
    "num_layers": 2,
    "num_heads": 2,
    "mlp_dim": 32,
}


pytestmark = pytest.mark.usefixtures("single_thread")


def _state(net: torch.nn.Module) -> list[tuple[str, tuple[int, ...], str]]:
    return [(k, tuple(v.shape), str(v.dtype).replace("torch.", "")) for k, v in net.state_dict().items()]


def _n_params(net: torch.nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def test_canet_paper_state_dict_matches_official_manifest():
    net = networks.create("canet")
    assert _state(net) == official_manifest("canet_vnet.tsv")
    assert _n_params(net) == 24_491_330
    assert net.embeddings.position_embeddings.shape == (1, 245, 168)


def test_canet_discriminator_paper_state_dict_matches_official_manifest():
    net = networks.create("canet_discriminator")
    assert _state(net) == official_manifest("canet_discriminator.tsv")
    assert _n_params(net) == 11_020_290


def test_discriminator_se_is_a_registered_trainable_submodule():
    plain = networks.create("canet_discriminator")
    with_se = networks.create("canet_discriminator", use_se=True)
    extra = {k: tuple(v.shape) for k, v in with_se.state_dict().items() if k not in plain.state_dict()}
    assert extra == {"se.fc.0.weight": (64, 512), "se.fc.2.weight": (512, 64)}
    assert _n_params(with_se) - _n_params(plain) == 2 * 512 * 64
    missing = with_se.load_state_dict(plain.state_dict(), strict=False).missing_keys
    assert sorted(missing) == ["se.fc.0.weight", "se.fc.2.weight"]

    torch.manual_seed(0)
    small = CANetDiscriminator(base=4, use_se=True, se_reduction=4).train()
    logits = small(torch.randn(2, 1, 32, 32, 16), torch.randn(2, 1, 32, 32, 16))
    torch.nn.functional.cross_entropy(logits, torch.tensor([1, 0])).backward()
    assert small.se.fc[0].weight.grad.abs().sum() > 0 and small.se.fc[2].weight.grad.abs().sum() > 0


def test_discriminator_se_changes_the_output_only_when_enabled():
    torch.manual_seed(0)
    plain = CANetDiscriminator(base=4).eval()
    with_se = CANetDiscriminator(base=4, use_se=True, se_reduction=4).eval()
    with_se.load_state_dict(plain.state_dict(), strict=False)
    m, x = torch.randn(2, 1, 32, 32, 16), torch.randn(2, 1, 32, 32, 16)
    with torch.no_grad():
        a, b = plain(m, x), with_se(m, x)
    assert a.shape == (2, 2) and not torch.allclose(a, b)


def test_canet_token_grid_follows_the_patch_size_and_the_size_is_enforced():
    net = CANet(**TINY)
    assert net.grid == (2, 2, 1) and net.embeddings.position_embeddings.shape == (1, 4, 16)
    other = CANet(**{**TINY, "patch_size": (64, 32, 48)})
    assert other.grid == (4, 2, 3) and other.embeddings.position_embeddings.shape == (1, 24, 16)
    with pytest.raises(ValueError, match="built for inputs"):
        net(torch.zeros(1, 1, 32, 32, 32))
    with pytest.raises(ValueError, match="multiples of 16"):
        CANet(patch_size=(112, 112, 72))
    with pytest.raises(ValueError, match="must divide hidden_size"):
        CANet(hidden_size=100, num_heads=12)


def test_canet_returns_tanh_sdf_and_logits_and_predict_logits_matches():
    torch.manual_seed(0)
    net = CANet(**TINY, in_channels=2, num_classes=1)
    x = torch.randn(2, 2, 32, 32, 16)
    net.train()
    sdf, logits = net(x)
    assert sdf.shape == logits.shape == (2, 1, 32, 32, 16)
    assert sdf.abs().max() <= 1
    (sdf.sum() + logits.sum()).backward()
    assert net.transformer.layer[0].attn.query.weight.grad.abs().sum() > 0
    net.eval()
    with torch.no_grad():
        sdf_e, logits_e = net(x)
        torch.testing.assert_close(net.predict_logits(x), logits_e)


def test_canet_eval_fast_path_matches_the_module_formula():
    torch.manual_seed(0)
    net = CANet(**TINY).eval()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm3d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.2)
                m.running_mean.normal_(0, 0.2)
                m.running_var.uniform_(0.5, 2.0)
        net.embeddings.position_embeddings.normal_()
    x = torch.randn(2, 1, 32, 32, 16)
    with torch.no_grad():
        x1 = net.block_one.conv(x)
        x2 = net.block_two.conv(net.block_one_dw.conv(x1))
        x3 = net.block_three.conv(net.block_two_dw.conv(x2))
        x4 = net.block_four.conv(net.block_three_dw.conv(x3))
        x5 = net.block_five.conv(net.block_four_dw.conv(x4))
        tokens = net.transformer(net.embeddings(x5))
        x5 = net.detransformer.conv_more(tokens.transpose(1, 2).reshape(2, 16, 2, 2, 1))
        y = net.block_six.conv(net.block_five_up.conv(x5) + x4)
        y = net.block_seven.conv(net.block_six_up.conv(y) + x3)
        y = net.block_eight.conv(net.block_seven_up.conv(y) + x2)
        y = net.block_nine.conv(net.block_eight_up.conv(y) + x1)
        sdf, logits = net(x)
    torch.testing.assert_close(sdf, torch.tanh(net.out_conv(y)), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(logits, net.out_conv2(y), rtol=1e-4, atol=1e-5)


def test_canet_dropout_is_active_only_in_training_and_can_be_turned_off():
    torch.manual_seed(0)
    net = CANet(**TINY)  # Dropout3d(0.5) at 1/16 and full resolution, dropout 0.1 in the transformer
    x = torch.randn(1, 1, 32, 32, 16)
    with torch.no_grad():
        net.train()
        assert not torch.allclose(net(x)[1], net(x)[1])
        net.eval()
        torch.testing.assert_close(net(x)[1], net(x)[1])
        no_transformer_dropout = CANet(**TINY, dropout=0.0).train()
        no_transformer_dropout.load_state_dict(net.state_dict())
        assert not torch.allclose(no_transformer_dropout(x)[1], no_transformer_dropout(x)[1])
        c = no_transformer_dropout(x, turnoff_drop=True)[1]
        torch.testing.assert_close(c, no_transformer_dropout(x, turnoff_drop=True)[1])
        quiet = CANet(**TINY, dropout=0.0, train_dropout=False).train()
        quiet.load_state_dict(net.state_dict())
        torch.testing.assert_close(quiet(x)[1], quiet(x)[1])


def test_canet_presets_build_and_lite_is_small():
    lite = networks.create("canet", "lite")
    assert _n_params(lite) < 4_000_000 and lite.patch_size == (112, 112, 80)
    assert _n_params(networks.create("canet_discriminator", "lite")) < 1_000_000


def test_canet_tiny_learns_a_bright_sphere():
    from MedSegSuiteLib.training.losses.canet import segmenter_loss

    torch.manual_seed(0)
    rng = np.random.default_rng(0)

    def batch(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        xs, ys = [], []
        for _ in range(n):
            centre = (rng.uniform(12, 20), rng.uniform(12, 20), rng.uniform(6, 10))
            image, mask = sphere_volume((32, 32, 16), centre, rng.uniform(4, 6), seed=int(rng.integers(1 << 30)))
            xs.append((image - image.mean()) / image.std())
            ys.append(mask)
        return torch.from_numpy(np.stack(xs))[:, None], torch.from_numpy(np.stack(ys)).long()

    net = CANet(**{**TINY, "base_filters": 8}, train_dropout=False)  # dropout has its own test
    val_x, val_y = batch(2)

    def val_dice() -> float:
        net.eval()
        with torch.no_grad():
            pred = (net.predict_logits(val_x)[:, 0] > 0).numpy()
        net.train()
        return dice(pred, val_y.numpy())

    before = val_dice()
    optimiser = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(60):
        x, y = batch(2)
        sdf, logits = net(x)
        loss, _ = segmenter_loss(sdf, logits, y)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    after = val_dice()
    assert after > 0.8 and after > before + 0.5, (before, after)
