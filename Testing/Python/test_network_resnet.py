"""Tests of the hand-written ResNet-50 trunk and the ImageNet (torchvision format) importer."""

from __future__ import annotations

import pickle

import pytest
import torch

from MedSegSuiteLib.networks import create
from MedSegSuiteLib.networks.resnet import (
    ResNet,
    convert_torchvision_resnet50,
    copy_resnet_trunk,
    fused_conv_bn,
    load_imagenet_encoder,
    read_state_dict,
    run_sequential,
)

pytestmark = pytest.mark.usefixtures("single_thread")


TORCHVISION_RESNET50_PARAMS = 25_557_032  # torchvision.models.resnet50().parameters()
TORCHVISION_RESNET50_ENTRIES = 320  # len(state_dict()), buffers included


@pytest.fixture(scope="module")
def imagenet_like() -> dict[str, torch.Tensor]:
    """A torchvision-layout ResNet-50 state_dict with random values (no download)."""
    torch.manual_seed(0)
    net = ResNet(num_classes=1000)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.bias.uniform_(-0.1, 0.1)
    return {k: v.clone() for k, v in net.state_dict().items()}


def test_resnet50_has_torchvision_keys_and_parameter_count():
    net = ResNet(num_classes=1000)
    sd = net.state_dict()
    assert len(sd) == TORCHVISION_RESNET50_ENTRIES
    assert sum(p.numel() for p in net.parameters()) == TORCHVISION_RESNET50_PARAMS
    for key in ("conv1.weight", "bn1.running_var", "layer1.0.downsample.0.weight", "layer4.2.bn3.bias", "fc.weight"):
        assert key in sd
    assert tuple(sd["layer2.0.conv2.weight"].shape) == (128, 128, 3, 3)


@pytest.mark.parametrize("output_stride, strides", [(32, (4, 8, 16, 32)), (16, (4, 8, 16, 16)), (8, (4, 8, 8, 8))])
def test_resnet_output_stride_sets_stage_resolution(output_stride, strides):
    net = ResNet(layers=(1, 1, 1, 1), output_stride=output_stride).eval()
    with torch.inference_mode():
        feats = net(torch.rand(1, 3, 64, 64))
    assert [f.shape[1] for f in feats] == [256, 512, 1024, 2048]
    assert [64 // f.shape[-1] for f in feats] == list(strides)


def test_dilated_resnet_follows_official_banet_dilation_rule():
    net = ResNet(output_stride=8, multi_grid=(4, 4, 4))
    assert net.layer3[0].conv2.stride == (1, 1) and net.layer3[0].conv2.dilation == (1, 1)
    assert all(block.conv2.dilation == (2, 2) for block in list(net.layer3)[1:])
    assert all(block.conv2.dilation == (4, 4) and block.conv2.stride == (1, 1) for block in net.layer4)
    assert net.layer3[0].downsample[0].stride == (1, 1)
    plain = ResNet(output_stride=8)
    assert [b.conv2.dilation[0] for b in plain.layer4] == [2, 4, 4]


def test_resnet_rejects_invalid_arguments():
    with pytest.raises(ValueError):
        ResNet(layers=())
    with pytest.raises(ValueError):
        ResNet(output_stride=4)
    with pytest.raises(ValueError):
        ResNet(layers=(3, 4, 6), num_classes=10)


def test_convert_sums_rgb_stem_for_grey_input(imagenet_like):
    grey = convert_torchvision_resnet50(imagenet_like, in_channels=1)
    assert torch.allclose(grey["conv1.weight"], imagenet_like["conv1.weight"].sum(1, keepdim=True))
    rgb_net, grey_net = ResNet(num_classes=1000).eval(), ResNet(in_channels=1, num_classes=1000).eval()
    rgb_net.load_state_dict(convert_torchvision_resnet50(imagenet_like), strict=True)
    grey_net.load_state_dict(grey, strict=True)
    x = torch.rand(1, 1, 64, 64)
    with torch.inference_mode():
        a = rgb_net(x.expand(-1, 3, -1, -1))[-1]
        b = grey_net(x)[-1]
    assert torch.allclose(a, b, atol=1e-4, rtol=1e-4)


def test_convert_rejects_state_dicts_that_are_not_resnet50(imagenet_like):
    with pytest.raises(ValueError):
        convert_torchvision_resnet50({"conv1.weight": torch.zeros(64, 3, 7, 7)})
    with pytest.raises(ValueError):
        convert_torchvision_resnet50(imagenet_like, in_channels=4)
    prefixed = {"module." + k: v for k, v in imagenet_like.items()}
    assert "conv1.weight" in convert_torchvision_resnet50(prefixed)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_load_imagenet_encoder_fills_condseg_trunk_with_bn_statistics(tmp_path, imagenet_like, suffix):
    path = tmp_path / f"resnet50{suffix}"
    if suffix == ".pth":
        torch.save(imagenet_like, path)
    else:
        from safetensors.torch import save_file

        save_file(imagenet_like, str(path))
    model = create("condseg", "lite", encoder_width=64)  # ResNet-50 widths: ImageNet-loadable
    loaded = load_imagenet_encoder(model, path)
    sd = model.state_dict()
    assert torch.equal(sd["layer0.0.weight"], imagenet_like["conv1.weight"])
    assert torch.equal(sd["layer0.1.running_mean"], imagenet_like["bn1.running_mean"])
    assert torch.equal(sd["layer1.1.1.conv2.weight"], imagenet_like["layer1.1.conv2.weight"])
    assert torch.equal(sd["layer3.1.bn3.running_var"], imagenet_like["layer3.1.bn3.running_var"])
    assert not any(k.startswith(("layer4", "fc", "dconv")) for k in loaded)


def test_load_imagenet_encoder_fills_banet_backbone_and_grey_stem(tmp_path, imagenet_like):
    path = tmp_path / "resnet50.pth"
    torch.save({"state_dict": imagenet_like}, path)
    model = create("banet", "lite", in_channels=1, encoder_width=64)
    load_imagenet_encoder(model, path)
    sd = model.state_dict()
    assert torch.allclose(sd["pretrain_model.conv1.weight"], imagenet_like["conv1.weight"].sum(1, keepdim=True))
    assert torch.equal(sd["pretrain_model.layer4.1.conv2.weight"], imagenet_like["layer4.1.conv2.weight"])


def test_load_imagenet_encoder_refuses_a_narrower_trunk(tmp_path, imagenet_like):
    path = tmp_path / "resnet50.pth"
    torch.save(imagenet_like, path)
    with pytest.raises(ValueError, match="does not fit"):
        load_imagenet_encoder(ResNet(width=32), path)


def _randomise_bn(model: torch.nn.Module) -> None:
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)


def test_copy_resnet_trunk_gives_the_source_features_from_the_targets_input_scaling():
    torch.manual_seed(0)
    source = create("banet", "lite").eval()  # width 24, 2 blocks a stage
    _randomise_bn(source)
    target = create("condseg", "lite", encoder_width=24).eval()
    scale, offset = [4.4, 4.5, 4.3], [-2.1, -2.0, -1.8]  # source input = x * scale + offset
    copied = copy_resnet_trunk(source, target, scale, offset)
    assert len(copied) == sum(1 for k in target.state_dict() if k.startswith(target.encoder_prefixes))
    copied_weight = source.state_dict()["pretrain_model.layer3.1.conv2.weight"]
    assert torch.equal(target.state_dict()["layer3.1.conv2.weight"], copied_weight)
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        source_input = x * torch.tensor(scale).view(1, 3, 1, 1) + torch.tensor(offset).view(1, 3, 1, 1)
        want = source.pretrain_model(source_input)[0]
        got = target.layer1(run_sequential(target.layer0, x))  # stage 1, stride 4
    # the same features away from the border, where zero padding meets different inputs
    assert torch.allclose(want[..., 4:-4, 4:-4], got[..., 4:-4, 4:-4], atol=1e-4)
    assert not torch.allclose(want, got, atol=1e-4)  # the border does differ, so the comparison can fail


def test_copy_resnet_trunk_refuses_another_width_or_a_shallower_trunk():
    with pytest.raises(ValueError, match="encoder width"):
        copy_resnet_trunk(create("banet", "lite"), create("condseg", "lite"))  # 24 wide into 32 wide
    shallow = create("banet", "lite", encoder_layers=(1, 1, 1, 1))
    with pytest.raises(ValueError, match="shallower"):
        copy_resnet_trunk(shallow, create("condseg", "lite", encoder_width=24))
    with pytest.raises(ValueError, match="no ResNet trunk"):
        copy_resnet_trunk(torch.nn.Conv2d(3, 3, 1), create("condseg", "lite", encoder_width=24))


def test_read_state_dict_refuses_pickled_objects_and_unknown_suffixes(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"weights": torch.zeros(1), "config": object()}, path)
    with pytest.raises(pickle.UnpicklingError):
        read_state_dict(path)
    with pytest.raises(ValueError):
        read_state_dict(tmp_path / "weights.npz")


def _conv_bn_pair(groups: int = 1) -> tuple[torch.nn.Conv2d, torch.nn.BatchNorm2d]:
    torch.manual_seed(0)
    conv, bn = torch.nn.Conv2d(8, 8, 3, padding=1, groups=groups, bias=groups > 1), torch.nn.BatchNorm2d(8)
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.uniform_(0.5, 2)
        bn.bias.uniform_(-1, 1)
    return conv, bn.eval()


@pytest.mark.parametrize("groups", [1, 8])
def test_fused_conv_bn_equals_conv_then_bn_at_inference(groups):
    conv, bn = _conv_bn_pair(groups)
    x = torch.randn(2, 8, 10, 10)
    with torch.inference_mode():
        fused = fused_conv_bn(x, conv, bn)
    with torch.no_grad():
        again = fused_conv_bn(x, conv, bn)  # cached inference tensors reused outside inference mode
        reference = bn(conv(x))
    assert torch.allclose(fused, reference, atol=1e-5)
    assert torch.allclose(again, reference, atol=1e-5)


def test_fused_conv_bn_cache_follows_parameter_and_statistic_changes():
    conv, bn = _conv_bn_pair()
    x = torch.randn(1, 8, 6, 6)
    with torch.no_grad():
        fused_conv_bn(x, conv, bn)
        bn.running_mean.add_(0.5)
        assert torch.allclose(fused_conv_bn(x, conv, bn), bn(conv(x)), atol=1e-5)
        conv.load_state_dict({"weight": torch.randn_like(conv.weight)})
        assert torch.allclose(fused_conv_bn(x, conv, bn), bn(conv(x)), atol=1e-5)


def test_fused_conv_bn_keeps_training_semantics():
    conv, bn = _conv_bn_pair()
    bn.train()
    x = torch.randn(4, 8, 6, 6)
    before = bn.running_mean.clone()
    out = fused_conv_bn(x, conv, bn)
    assert out.requires_grad and not torch.equal(before, bn.running_mean)
    assert run_sequential(torch.nn.Sequential(conv, bn), x).requires_grad
