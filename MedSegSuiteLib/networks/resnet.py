"""A hand-written ResNet-50 family trunk with torchvision attribute names, and ImageNet weight import.

The trunk is the bottleneck ResNet of He et al., "Deep Residual Learning for Image Recognition"
(CVPR 2016), with the stride on the 3x3 convolution ("v1.5", as in torchvision and in the official
ConDSeg and BA-Net code). Attribute names equal torchvision's (``conv1, bn1, relu, maxpool,
layer1..layer4, fc``), so a torchvision-format ImageNet ResNet-50 ``state_dict`` loads into it
unchanged. Dilation switches (output stride 16 or 8, multi-grid rates for the last stage) cover the
dilated backbone of BA-Net (Yu & Koltun style "DRN" trunk).

No torchvision is needed. ImageNet weights are never downloaded: :func:`load_imagenet_encoder` reads a
local file (``.pth`` only through ``torch.load(..., weights_only=True)``, or ``.safetensors``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "Bottleneck",
    "ResNet",
    "convert_torchvision_resnet50",
    "copy_resnet_trunk",
    "fused_conv_bn",
    "load_imagenet_encoder",
    "read_state_dict",
    "run_sequential",
]

logger = logging.getLogger(__name__)

_RESNET50_LAYERS = (3, 4, 6, 3)
_FOLD_CACHE = "_inference_fold"


def _fold_key(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> tuple:
    tensors = (conv.weight, conv.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var)
    state = tuple((t.data_ptr(), t._version) if t is not None else None for t in tensors)
    return state + (conv.weight.dtype, conv.weight.device, conv.weight.stride(), bn.eps)


def fused_conv_bn(x: torch.Tensor, conv: nn.Conv2d, bn: nn.BatchNorm2d) -> torch.Tensor:
    """``bn(conv(x))``; at inference (BN in eval mode, autograd off) with BN folded into the conv.

    The folded weight and bias are cached on ``bn`` and recomputed whenever a parameter or running
    statistic changes (tensor version or storage), the device, dtype or memory format. The result
    equals the unfused one up to float rounding (about 1e-6 relative).
    """
    if bn.training or torch.is_grad_enabled() or bn.running_var is None or conv.padding_mode != "zeros":
        return bn(conv(x))
    key = _fold_key(conv, bn)
    cached = bn.__dict__.get(_FOLD_CACHE)
    if cached is None or cached[0] != key:
        with torch.no_grad():
            scale = torch.rsqrt(bn.running_var + bn.eps)
            if bn.weight is not None:
                scale = scale * bn.weight
            shift = -bn.running_mean * scale
            if conv.bias is not None:
                shift = shift + conv.bias * scale
            if bn.bias is not None:
                shift = shift + bn.bias
            weight = conv.weight * scale.view(-1, *([1] * (conv.weight.dim() - 1)))
        cached = (key, weight, shift)
        bn.__dict__[_FOLD_CACHE] = cached
    return F.conv2d(x, cached[1], cached[2], conv.stride, conv.padding, conv.dilation, conv.groups)


def run_sequential(seq: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """Run ``seq`` on ``x`` like ``seq(x)``, folding every Conv2d directly followed by BatchNorm2d.

    See :func:`fused_conv_bn`: the folding only happens at inference; training is unchanged.
    """
    modules = list(seq)
    i = 0
    while i < len(modules):
        module = modules[i]
        if isinstance(module, nn.Conv2d) and i + 1 < len(modules) and isinstance(modules[i + 1], nn.BatchNorm2d):
            x = fused_conv_bn(x, module, modules[i + 1])
            i += 2
        else:
            x = module(x)
            i += 1
    return x


class Bottleneck(nn.Module):
    """The ResNet bottleneck block (1x1 reduce, 3x3, 1x1 expand by 4, identity or projection shortcut).

    Args:
        in_channels: channels of the input.
        planes: width of the 3x3 convolution; the block outputs ``4 * planes`` channels.
        stride: stride of the 3x3 convolution (1 or 2).
        dilation: dilation (and padding) of the 3x3 convolution.
        downsample: projection applied to the shortcut, or ``None`` for the identity.

    ``forward(x[B, in_channels, H, W]) -> [B, 4 * planes, H / stride, W / stride]``.
    """

    expansion = 4

    def __init__(
        self,
        in_channels: int,
        planes: int,
        stride: int = 1,
        dilation: int = 1,
        downsample: Optional[nn.Module] = None,
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else run_sequential(self.downsample, x)
        out = self.relu(fused_conv_bn(x, self.conv1, self.bn1))
        out = self.relu(fused_conv_bn(out, self.conv2, self.bn2))
        out = fused_conv_bn(out, self.conv3, self.bn3)
        return self.relu(out + identity)


class ResNet(nn.Module):
    """Bottleneck ResNet trunk (ResNet-50 by default) with torchvision attribute names.

    He et al., "Deep Residual Learning for Image Recognition", CVPR 2016.

    Args:
        layers: bottleneck blocks per stage; its length (1 to 4) is the number of stages built
            (``layer1`` .. ``layerN``). Default ``(3, 4, 6, 3)`` = ResNet-50. A shallower tuple keeps
            the ResNet-50 widths, so the first blocks of each stage still take ImageNet weights.
        width: channels of the stem and of the first stage's 3x3 convolutions (64 for ResNet-50);
            stage ``k`` has 3x3 width ``width * 2**(k-1)`` and outputs 4 times that.
        in_channels: image channels of the stem convolution (3 = RGB, 1 = grey).
        output_stride: 32 (plain ResNet), 16 (``layer4`` keeps the resolution, dilation 2) or 8
            (``layer3`` and ``layer4`` keep the resolution, dilations 2 and 4). As in torchvision and
            the official BA-Net trunk, the first block of a dilated stage uses the previous stage's
            dilation and the others the stage's own.
        multi_grid: explicit dilations of the last stage's blocks, cycled (BA-Net: ``(4, 4, 4)``,
            which makes every ``layer4`` block use dilation 4). ``None``: the rule above.
        num_classes: when given, a ``fc`` classifier ``Linear(4 * 8 * width, num_classes)`` is
            created (only with 4 stages). It is kept for strict loading of official checkpoints;
            :meth:`forward` never uses it.

    ``forward(x[B, in_channels, H, W])`` returns the list of stage outputs: stage ``k`` has
    ``4 * width * 2**(k-1)`` channels at stride ``min(2**(k+1), output_stride)``.
    """

    def __init__(
        self,
        layers: Sequence[int] = _RESNET50_LAYERS,
        width: int = 64,
        in_channels: int = 3,
        output_stride: int = 32,
        multi_grid: Optional[Sequence[int]] = None,
        num_classes: Optional[int] = None,
    ) -> None:
        super().__init__()
        layers = tuple(int(n) for n in layers)
        if not 1 <= len(layers) <= 4 or min(layers) < 1:
            raise ValueError(f"layers must hold 1 to 4 positive block counts, got {layers}")
        if width < 1 or in_channels < 1:
            raise ValueError(f"width and in_channels must be positive, got {width} and {in_channels}")
        if output_stride not in (8, 16, 32):
            raise ValueError(f"output_stride must be 8, 16 or 32, got {output_stride}")
        if multi_grid is not None and (len(multi_grid) == 0 or min(multi_grid) < 1):
            raise ValueError(f"multi_grid must be a non-empty sequence of positive dilations, got {multi_grid}")
        if num_classes is not None and (num_classes < 1 or len(layers) != 4):
            raise ValueError("num_classes (the fc classifier) needs a positive value and 4 stages")
        self.output_stride = output_stride
        self.out_channels = tuple(width * 2**k * Bottleneck.expansion for k in range(len(layers)))

        self.conv1 = nn.Conv2d(in_channels, width, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self._in = width
        strides, dilations = self._stage_geometry(output_stride)
        previous = 1
        for k, blocks in enumerate(layers):
            grid = multi_grid if (k == 3 and multi_grid is not None) else None
            stage = self._make_stage(width * 2**k, blocks, strides[k], dilations[k], previous, grid)
            self.add_module(f"layer{k + 1}", stage)
            previous = dilations[k]
        if num_classes is not None:
            self.fc = nn.Linear(self.out_channels[-1], num_classes)
        self._init_weights()

    @staticmethod
    def _stage_geometry(output_stride: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        if output_stride == 32:
            return (1, 2, 2, 2), (1, 1, 1, 1)
        if output_stride == 16:
            return (1, 2, 2, 1), (1, 1, 1, 2)
        return (1, 2, 1, 1), (1, 1, 2, 4)

    def _make_stage(
        self, planes: int, blocks: int, stride: int, dilation: int, previous: int, grid: Optional[Sequence[int]]
    ) -> nn.Sequential:
        out = planes * Bottleneck.expansion
        downsample = None
        if stride != 1 or self._in != out:
            downsample = nn.Sequential(nn.Conv2d(self._in, out, 1, stride=stride, bias=False), nn.BatchNorm2d(out))
        rates = [grid[i % len(grid)] for i in range(blocks)] if grid else [previous] + [dilation] * (blocks - 1)
        stage = [Bottleneck(self._in, planes, stride, rates[0], downsample)]
        self._in = out
        stage += [Bottleneck(out, planes, 1, rates[i]) for i in range(1, blocks)]
        return nn.Sequential(*stage)

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    @property
    def stages(self) -> list[nn.Sequential]:
        """The stage modules ``layer1 .. layerN`` in order."""
        return [getattr(self, f"layer{k + 1}") for k in range(len(self.out_channels))]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.maxpool(self.relu(fused_conv_bn(x, self.conv1, self.bn1)))
        features = []
        for stage in self.stages:
            x = stage(x)
            features.append(x)
        return features


def _strip_prefix(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if state_dict and all(k.startswith("module.") for k in state_dict):
        return {k[len("module.") :]: v for k, v in state_dict.items()}
    return dict(state_dict)


def convert_torchvision_resnet50(
    state_dict: Mapping[str, torch.Tensor], in_channels: int = 3
) -> dict[str, torch.Tensor]:
    """Map a torchvision-format ImageNet ResNet-50 ``state_dict`` onto :class:`ResNet` keys.

    The keys are torchvision's (``conv1.weight``, ``bn1.*``, ``layer1.0.conv1.weight`` ... ``fc.*``),
    optionally behind a ``module.`` prefix (removed). With ``in_channels=1`` the stem filters are
    summed over the RGB inputs (a grey image replicated to RGB then gives the same response); with
    ``in_channels=3`` the tensors are returned unchanged. Returns a new dict of float tensors; raises
    ``ValueError`` when the dict is not a ResNet-50 (missing keys or wrong stem shape).
    """
    if in_channels not in (1, 3):
        raise ValueError(f"in_channels must be 1 or 3 for ImageNet weights, got {in_channels}")
    sd = _strip_prefix(state_dict)
    required = ["conv1.weight", "bn1.weight", "bn1.running_var"]
    required += [f"layer{s + 1}.{b}.conv3.weight" for s, n in enumerate(_RESNET50_LAYERS) for b in range(n)]
    missing = [k for k in required if k not in sd]
    if missing:
        raise ValueError(f"not a torchvision ResNet-50 state_dict; missing {missing[:5]} ({len(missing)} keys)")
    stem = sd["conv1.weight"]
    if tuple(stem.shape) != (64, 3, 7, 7):
        raise ValueError(f"expected an RGB ResNet-50 stem of shape (64, 3, 7, 7), got {tuple(stem.shape)}")
    out = {k: v.detach().clone() for k, v in sd.items()}
    if in_channels == 1:
        out["conv1.weight"] = stem.sum(dim=1, keepdim=True)
    return out


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a tensor dict from ``.safetensors`` or from a ``.pth``/``.pt`` file (``weights_only``).

    A ``.pth`` holding ``{"state_dict": ...}`` or ``{"model": ...}`` is unwrapped. Raises
    ``ValueError`` for other suffixes or contents that are not a dict of tensors.
    """
    path = os.fspath(path)
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path, device="cpu")
    if not path.endswith((".pth", ".pt", ".pth.tar", ".ckpt")):
        raise ValueError(f"unsupported weights file {path!r}; use .safetensors or .pth")
    obj = torch.load(path, map_location="cpu", weights_only=True)
    for wrapper in ("state_dict", "model"):
        if isinstance(obj, Mapping) and isinstance(obj.get(wrapper), Mapping):
            obj = obj[wrapper]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path!r} does not hold a state_dict of tensors")
    return dict(obj)


def _default_key_map(key: str) -> Optional[str]:
    return key


def load_imagenet_encoder(model: nn.Module, path: str | os.PathLike) -> list[str]:
    """Copy ImageNet ResNet-50 weights (torchvision format, local file) into ``model``'s encoder.

    ``model`` is a :class:`ResNet` or a network that defines ``imagenet_key(torchvision_key) ->
    model key or None`` and ``encoder_prefixes`` (ConDSeg, ConDSegStage1 and BANet do); every
    encoder tensor must be covered by the file. The stem is converted to the model's
    input channels (see :func:`convert_torchvision_resnet50`). Keys the model lacks (``layer4``/``fc``
    for ConDSeg, blocks beyond a shallower preset's depth) are skipped; a shape mismatch (a narrower
    trunk) raises ``ValueError``. ``num_batches_tracked`` entries absent from old torchvision files are
    left as they are. Returns the model keys that were written; parameters and BN statistics both.
    """
    key_map = getattr(model, "imagenet_key", _default_key_map)
    own = model.state_dict()
    stem_key = key_map("conv1.weight")
    if stem_key is None or stem_key not in own:
        raise ValueError(f"{type(model).__name__} has no ResNet stem to load ImageNet weights into")
    source = convert_torchvision_resnet50(read_state_dict(path), in_channels=int(own[stem_key].shape[1]))
    update: dict[str, torch.Tensor] = {}
    for tv_key, value in source.items():
        key = key_map(tv_key)
        if key is None or key not in own:
            continue
        if tuple(own[key].shape) != tuple(value.shape):
            raise ValueError(
                f"ImageNet tensor {tv_key} {tuple(value.shape)} does not fit {key} {tuple(own[key].shape)}; "
                "this preset's trunk is not ResNet-50 wide"
            )
        update[key] = value.to(own[key].dtype)
    prefixes = tuple(getattr(model, "encoder_prefixes", ("conv1.", "bn1.", "layer")))
    encoder_missing = [
        k for k in own if k.startswith(prefixes) and k not in update and not k.endswith("num_batches_tracked")
    ]
    if encoder_missing:
        raise ValueError(f"the ImageNet file lacks encoder tensors {encoder_missing[:5]}")
    model.load_state_dict(update, strict=False)
    logger.info("loaded %d ImageNet tensors into %s", len(update), type(model).__name__)
    return sorted(update)


def _trunk_vocabulary() -> list[str]:
    """Every torchvision ResNet-50 trunk key (``conv1.*``, ``bn1.*``, ``layer1.0.*`` .. ``layer4.2.*``)."""
    return list(ResNet(width=1).state_dict())


def copy_resnet_trunk(
    source: nn.Module,
    target: nn.Module,
    input_scale: Optional[Sequence[float]] = None,
    input_offset: Optional[Sequence[float]] = None,
) -> list[str]:
    """Copy the ResNet trunk of a trained ``source`` network into ``target``: parameters and BN statistics.

    Both networks define ``imagenet_key(torchvision_key) -> own key or None`` (BA-Net, ConDSeg and
    ConDSeg's stage-1 network do); a trunk tensor is copied when both networks have it. Every tensor
    under ``target.encoder_prefixes`` must be covered with the same shape, else ``ValueError`` (for
    example a trunk of another width or depth). ``input_scale`` and ``input_offset`` (one value per
    input channel) say how the two networks' inputs differ: the source saw ``x * scale + offset``
    where the target sees ``x``. The stem filters are then rescaled and the stem BN's running mean
    shifted, so the copied trunk computes the source's features from the target's input (exactly,
    away from the image border, where zero padding differs). Returns the target keys written.
    """
    for network in (source, target):
        if not callable(getattr(network, "imagenet_key", None)):
            raise ValueError(f"{type(network).__name__} has no ResNet trunk to copy")
    have, own = source.state_dict(), target.state_dict()
    update: dict[str, torch.Tensor] = {}
    for key in _trunk_vocabulary():
        src, dst = source.imagenet_key(key), target.imagenet_key(key)
        if src is None or dst is None or src not in have or dst not in own:
            continue
        if tuple(have[src].shape) != tuple(own[dst].shape):
            raise ValueError(
                f"the trunks differ at {dst}: {tuple(have[src].shape)} in the source, {tuple(own[dst].shape)} here; "
                "build this network with the source's encoder width and depth"
            )
        update[dst] = have[src].detach().clone().to(own[dst].dtype)
    prefixes = tuple(getattr(target, "encoder_prefixes", ("conv1.", "bn1.", "layer")))
    missing = [k for k in own if k.startswith(prefixes) and k not in update and not k.endswith("num_batches_tracked")]
    if missing:
        raise ValueError(f"the source's trunk lacks {missing[:3]} ({len(missing)} tensors): it is shallower")
    if input_scale is not None or input_offset is not None:
        stem, stem_bn = target.imagenet_key("conv1.weight"), target.imagenet_key("bn1.running_mean")
        weight = update[stem].float()
        channels = weight.shape[1]
        scale = torch.as_tensor(input_scale if input_scale is not None else [1.0] * channels, dtype=torch.float32)
        offset = torch.as_tensor(input_offset if input_offset is not None else [0.0] * channels, dtype=torch.float32)
        if scale.numel() != channels or offset.numel() != channels:
            raise ValueError(f"input_scale and input_offset need one value per input channel ({channels})")
        # conv_W(x * s + o) = conv_{W * s}(x) + sum(W * o): fold s into the filters and the constant into the BN mean.
        update[stem] = (weight * scale.view(1, -1, 1, 1)).to(own[stem].dtype)
        shift = (weight * offset.view(1, -1, 1, 1)).sum(dim=(1, 2, 3))
        update[stem_bn] = (update[stem_bn].float() - shift).to(own[stem_bn].dtype)
    target.load_state_dict(update, strict=False)
    logger.info("copied %d trunk tensors from %s into %s", len(update), type(source).__name__, type(target).__name__)
    return sorted(update)
