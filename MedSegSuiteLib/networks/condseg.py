"""ConDSeg: contrast-driven 2D segmentation, and its stage-1 consistency-reinforcement network.

Lei et al., "ConDSeg: A General Medical Image Segmentation Framework via Contrast-Driven Feature
Enhancement", AAAI 2025 (arXiv:2412.08345). Written from the spec ``specs/condseg_banet.md`` part 1;
attribute names follow the official code so official ``state_dict`` files load with ``strict=True``.

Differences from the official code (none changes a key or a shape):

- every head returns **logits**; the official model ends each head with a sigmoid (and its loss adds
  a second one). :meth:`ConDSeg.predict_proba` gives probabilities.
- the auxiliary head and the uncertainty branch of the SID run only when asked
  (``forward(x, return_aux=True)``), and an inference-only model can be built without the aux head.
- CDFA aggregates its 3x3 windows without ``unfold``/``fold``: the fold of the attention-weighted
  windows is regrouped by displacement (the math is identical, the 9x unfolded copies are never made).
- the stage-1 head applies its 1x1 conv + BN before the upsampling in eval mode (both are affine, so
  the result is the same), which removes most of its cost; training keeps the official order so the
  BatchNorm statistics are the official ones.
- at inference (eval mode, autograd off) BatchNorm is folded into the preceding convolution
  (:func:`MedSegSuiteLib.networks.resnet.fused_conv_bn`); training is unchanged.

Measured against the official code on a 2-core CPU (outputs equal to ~3e-6 in probability), the
inference-only paper network is about 2x faster; channels-last memory format
(``model.to(memory_format=torch.channels_last)``) adds about 10% on CPU.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from MedSegSuiteLib.networks.resnet import ResNet, run_sequential

__all__ = [
    "CBR",
    "CDFA",
    "PRESETS",
    "AuxHead",
    "ChannelAttention",
    "ConDSeg",
    "ConDSegStage1",
    "DecoderBlock",
    "Decouple",
    "FEM",
    "GuidePrep",
    "OutputBlock",
    "SpatialAttention",
    "transfer_stage1_encoder",
]

PRESETS = {
    "condseg": {
        # The published network (official code defaults): ResNet-50 layer0..3, 128-wide heads.
        "paper": {"in_channels": 3, "out_channels": 1, "encoder_layers": (3, 4, 6), "dim": 128, "num_heads": 4},
        # Same family for CPU use and small bundled weights: 2 blocks per ResNet stage at half width
        # (stages of 32/128/256/512 channels), 32-wide heads (FEM, SID, CDFA, decoders and output block
        # scale with dim). 4.3 M parameters (about 9 MB in fp16), trained from scratch.
        "lite": {
            "in_channels": 3,
            "out_channels": 1,
            "encoder_layers": (2, 2, 2),
            "dim": 32,
            "num_heads": 4,
            "encoder_width": 32,
        },
    },
    "condseg_stage1": {
        "paper": {"in_channels": 3, "out_channels": 1, "encoder_layers": (3, 4, 6), "head_width": 64},
        "lite": {
            "in_channels": 3,
            "out_channels": 1,
            "encoder_layers": (2, 2, 2),
            "head_width": 32,
            "encoder_width": 32,
        },
    },
}

_UP = {"mode": "bilinear", "align_corners": True}


def _up(x: torch.Tensor, factor: int = 2) -> torch.Tensor:
    return F.interpolate(x, scale_factor=factor, **_UP)


def _pixel_linear(x: torch.Tensor, linear: nn.Linear, scale: float = 1.0) -> torch.Tensor:
    """``scale * linear`` applied to the channel vector of every pixel of ``x[B, C, H, W]``.

    Returns a contiguous (NCHW) ``[B, out, H, W]`` tensor; channels-last input is read in place.
    """
    b, c, h, w = x.shape
    weight, bias = linear.weight, linear.bias
    if scale != 1.0:
        weight, bias = weight * scale, bias * scale
    out = torch.matmul(weight, x.flatten(2))
    return (out + bias[:, None]).view(b, -1, h, w)


def _span(lo: int, hi: int, offset: int) -> tuple[slice, slice]:
    """Slices ``dst`` and ``src = dst - offset`` of the largest range with both inside ``[lo, hi)``.

    Used to shift maps by ``offset`` without padding them.
    """
    start, stop = max(lo, lo + offset), min(hi, hi + offset)
    stop = max(stop, start)
    return slice(start, stop), slice(start - offset, stop - offset)


class CBR(nn.Module):
    """Conv2d (no bias) + BatchNorm2d (+ ReLU when ``act``); the official ``CBR`` (keys ``conv.0``, ``conv.1``).

    Args:
        in_channels, out_channels: channels in and out.
        kernel_size: square kernel size. padding: zero padding. dilation: kernel dilation.
        act: apply the ReLU.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        padding: int = 1,
        dilation: int = 1,
        act: bool = True,
    ) -> None:
        super().__init__()
        self.act = act
        self.conv = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, kernel_size, padding=padding, dilation=dilation, bias=False),
            nn.BatchNorm2d(out_channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = run_sequential(self.conv, x)
        return F.relu(x, inplace=True) if self.act else x


class ChannelAttention(nn.Module):
    """CBAM channel attention: shared 1x1 MLP (``fc1``, ``fc2``, reduction 16) on avg- and max-pooled maps."""

    def __init__(self, channels: int, ratio: int = 16) -> None:
        super().__init__()
        if channels // ratio < 1:
            raise ValueError(f"channel attention needs at least {ratio} channels, got {channels}")
        self.fc1 = nn.Conv2d(channels, channels // ratio, 1, bias=False)
        self.fc2 = nn.Conv2d(channels // ratio, channels, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = torch.cat([F.adaptive_avg_pool2d(x, 1), F.adaptive_max_pool2d(x, 1)], dim=0)
        gate = self.fc2(F.relu(self.fc1(pooled)))
        avg, mx = gate.chunk(2, dim=0)
        return x * torch.sigmoid(avg + mx)


class SpatialAttention(nn.Module):
    """CBAM spatial attention: 7x7 conv (``conv1``) on the channel-mean and channel-max maps."""

    def __init__(self, kernel_size: int = 7) -> None:
        super().__init__()
        if kernel_size not in (3, 7):
            raise ValueError(f"kernel_size must be 3 or 7, got {kernel_size}")
        self.conv1 = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        stats = torch.cat([x.mean(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)], dim=1)
        return x * torch.sigmoid(self.conv1(stats))


class FEM(nn.Module):
    """Feature-enhancement module (official ``dilated_conv``): four dilated CBR + channel-attention branches.

    Args:
        in_channels: input channels. out_channels: output channels (128 in the paper).
        rates: dilations of the three 3x3 branches (a 1x1 branch is always present).
    """

    def __init__(self, in_channels: int, out_channels: int, rates: Sequence[int] = (6, 12, 18)) -> None:
        super().__init__()
        if len(rates) != 3:
            raise ValueError(f"FEM needs three dilation rates, got {rates}")
        self.c1 = nn.Sequential(CBR(in_channels, out_channels, 1, 0), ChannelAttention(out_channels))
        for k, rate in enumerate(rates):
            branch = nn.Sequential(CBR(in_channels, out_channels, 3, rate, rate), ChannelAttention(out_channels))
            self.add_module(f"c{k + 2}", branch)
        self.c5 = CBR(4 * out_channels, out_channels, 3, 1, act=False)
        self.c6 = CBR(in_channels, out_channels, 1, 0, act=False)
        self.sa = SpatialAttention()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branches = torch.cat([self.c1(x), self.c2(x), self.c3(x), self.c4(x)], dim=1)
        return self.sa(F.relu(self.c5(branches) + self.c6(x), inplace=True))


class Decouple(nn.Module):
    """Semantic information decoupling (SID, official ``DecoupleLayer``): fg, bg, uncertainty stacks.

    Each of ``cbr_fg``, ``cbr_bg``, ``cbr_uc`` is CBR3x3 in->mid, CBR3x3 mid->out, CBR1x1 out->out.
    """

    def __init__(self, in_channels: int, out_channels: int, mid_channels: int = 512) -> None:
        super().__init__()
        for name in ("cbr_fg", "cbr_bg", "cbr_uc"):
            stack = nn.Sequential(
                CBR(in_channels, mid_channels, 3, 1),
                CBR(mid_channels, out_channels, 3, 1),
                CBR(out_channels, out_channels, 1, 0),
            )
            self.add_module(name, stack)

    def forward(
        self, x: torch.Tensor, with_uncertainty: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """Return ``(f_fg, f_bg, f_uc)``; ``f_uc`` is ``None`` unless ``with_uncertainty``."""
        return self.cbr_fg(x), self.cbr_bg(x), self.cbr_uc(x) if with_uncertainty else None


class AuxHead(nn.Module):
    """Auxiliary SID head (training only): per branch, 4x (CBR, bilinear x2) + CBR + 1x1 conv -> 1 logit map.

    Args:
        in_channels: SID feature channels. widths: the five CBR widths ((256, 256, 128, 64, 64) in the paper).
    """

    def __init__(self, in_channels: int, widths: Sequence[int] = (256, 256, 128, 64, 64)) -> None:
        super().__init__()
        if len(widths) != 5:
            raise ValueError(f"AuxHead needs five widths, got {widths}")
        for name in ("branch_fg", "branch_bg", "branch_uc"):
            layers: list[nn.Module] = []
            previous = in_channels
            for k, width in enumerate(widths):
                layers.append(CBR(previous, width, 3, 1))
                if k < 4:
                    layers.append(nn.Upsample(scale_factor=2, **_UP))
                previous = width
            layers.append(nn.Conv2d(previous, 1, 1))
            self.add_module(name, nn.Sequential(*layers))

    def forward(
        self, f_fg: torch.Tensor, f_bg: torch.Tensor, f_uc: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Logits of the fg, bg and uncertainty maps at 16x the input resolution."""
        return self.branch_fg(f_fg), self.branch_bg(f_bg), self.branch_uc(f_uc)


class GuidePrep(nn.Module):
    """Bring SID features to a CDFA level (official ``CDFAPreprocess``): CBR, then log2(up) x (x2, CBR)."""

    def __init__(self, in_channels: int, out_channels: int, up: int) -> None:
        super().__init__()
        if up < 1 or up & (up - 1):
            raise ValueError(f"up must be a power of two, got {up}")
        self.preprocess = nn.Sequential()
        self.c1 = CBR(in_channels, out_channels, 3, 1)
        for i in range(int(math.log2(up))):
            self.preprocess.add_module(f"up_{i}", nn.Upsample(scale_factor=2, **_UP))
            self.preprocess.add_module(f"conv_{i}", CBR(out_channels, out_channels, 3, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.preprocess(self.c1(x))


class CDFA(nn.Module):
    """Contrast-driven feature aggregation (official ``ContrastDrivenFeatureAggregation``).

    Outlook-style attention over ``kernel_size`` x ``kernel_size`` windows whose weights are predicted
    from the foreground guidance (``attn_fg``) and then, on the result, from the background guidance
    (``attn_bg``); both passes share ``proj``.

    Args:
        in_channels: channels of the feature input. dim: working width (128). num_heads: heads (4).
        kernel_size: window size (3, odd).
    """

    def __init__(self, in_channels: int, dim: int = 128, num_heads: int = 4, kernel_size: int = 3) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd and positive, got {kernel_size}")
        self.num_heads = num_heads
        self.kernel_size = kernel_size
        self.scale = (dim // num_heads) ** -0.5
        self.v = nn.Linear(dim, dim)
        self.attn_fg = nn.Linear(dim, kernel_size**4 * num_heads)
        self.attn_bg = nn.Linear(dim, kernel_size**4 * num_heads)
        self.proj = nn.Linear(dim, dim)
        self.input_cbr = nn.Sequential(CBR(in_channels, dim, 3, 1), CBR(dim, dim, 3, 1))
        self.output_cbr = nn.Sequential(CBR(dim, dim, 3, 1), CBR(dim, dim, 3, 1))

    def _attention(self, guide: torch.Tensor, linear: nn.Linear) -> torch.Tensor:
        """Softmax window weights ``[B, heads, k*k (target slot i), k*k (source slot j), H, W]``."""
        b, _, h, w = guide.shape
        k2 = self.kernel_size**2
        logits = _pixel_linear(guide, linear, self.scale).view(b, self.num_heads, k2, k2, h, w)
        return torch.softmax(logits, dim=3)

    def _aggregate(self, attn: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """Fold of the attention-weighted windows, regrouped by displacement.

        With window offsets ``o_i`` the official unfold/fold computes
        ``out[q] = sum_{i,j} A[q - o_i, i, j] * V[q - o_i + o_j]`` (zero outside the image). Grouping
        the pairs by ``d = o_j - o_i`` gives ``out[q] = sum_d W_d[q] * V[q + d]`` with
        ``W_d[q] = sum_{o_j - o_i = d} A[q - o_i, i, j]``: (2k-1)^2 shifted multiply-adds instead of
        k^2-fold copies of ``V``. Returns a contiguous ``[B, C, H, W]`` tensor.
        """
        b, c, h, w = values.shape
        k, r, heads = self.kernel_size, self.kernel_size // 2, self.num_heads
        n = 2 * k - 1
        attn = attn.view(b, heads, k, k, k, k, h, w)
        weights = attn.new_zeros(b, heads, n, n, h, w)
        for iy in range(k):
            qy, py = _span(0, h, iy - r)
            for ix in range(k):
                qx, px = _span(0, w, ix - r)
                weights[:, :, k - 1 - iy : n - iy, k - 1 - ix : n - ix, qy, qx] += attn[:, :, iy, ix, :, :, py, px]
        vals = values.reshape(b, heads, c // heads, h, w)
        out = values.new_zeros(b, heads, c // heads, h, w)
        for ey in range(n):
            qy, vy = _span(0, h, k - 1 - ey)
            for ex in range(n):
                qx, vx = _span(0, w, k - 1 - ex)
                out[:, :, :, qy, qx].addcmul_(weights[:, :, ey : ey + 1, ex, qy, qx], vals[:, :, :, vy, vx])
        return out.view(b, c, h, w)

    def forward(self, x: torch.Tensor, guide_fg: torch.Tensor, guide_bg: torch.Tensor) -> torch.Tensor:
        """``x[B, in_channels, H, W]``, guidance maps ``[B, dim, H, W]`` -> ``[B, dim, H, W]``."""
        x = self.input_cbr(x)
        z = self._aggregate(self._attention(guide_fg, self.attn_fg), _pixel_linear(x, self.v))
        z = _pixel_linear(z, self.proj)
        z = self._aggregate(self._attention(guide_bg, self.attn_bg), z)
        return self.output_cbr(_pixel_linear(z, self.proj))


class DecoderBlock(nn.Module):
    """Size-aware decoder block (official ``decoder_block``): x2 + concat, dense residual CBRs, CBAM."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.c1 = CBR(in_channels + out_channels, out_channels, 1, 0)
        self.c2 = CBR(out_channels, out_channels, 3, 1, act=False)
        self.c3 = CBR(out_channels, out_channels, 3, 1, act=False)
        self.c4 = CBR(out_channels, out_channels, 1, 0, act=False)
        self.ca = ChannelAttention(out_channels)
        self.sa = SpatialAttention()

    def forward(self, deep: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        s1 = self.c1(torch.cat([_up(deep), skip], dim=1))
        s2 = F.relu(self.c2(s1) + s1, inplace=True)
        s3 = F.relu(self.c3(s2) + s2 + s1, inplace=True)
        out = F.relu(self.c4(s3) + s3 + s2 + s1, inplace=True)
        return self.sa(self.ca(out))


class OutputBlock(nn.Module):
    """Fuse the three decoder outputs (official ``output_block``) into ``out_channels`` logit maps."""

    def __init__(self, in_channels: int, out_channels: int = 1) -> None:
        super().__init__()
        self.fuse = CBR(3 * in_channels, in_channels, 3, 1)
        self.c1 = CBR(in_channels, in_channels, 3, 1)
        self.c2 = CBR(in_channels, in_channels // 2, 1, 0)
        self.c3 = nn.Conv2d(in_channels // 2, out_channels, 1)

    def forward(self, small: torch.Tensor, middle: torch.Tensor, large: torch.Tensor) -> torch.Tensor:
        x = self.fuse(torch.cat([small, _up(middle, 2), _up(large, 4)], dim=1))
        return self.c3(self.c2(self.c1(_up(x, 2))))


def _trunk(
    in_channels: int, encoder_layers: Sequence[int], width: int
) -> tuple[nn.Module, nn.Module, nn.Module, nn.Module]:
    if len(encoder_layers) != 3:
        raise ValueError(f"encoder_layers needs the block counts of ResNet stages 1-3, got {encoder_layers}")
    r = ResNet(layers=encoder_layers, width=width, in_channels=in_channels)
    return nn.Sequential(r.conv1, r.bn1, r.relu), nn.Sequential(r.maxpool, r.layer1), r.layer2, r.layer3


def _trunk_widths(width: int) -> tuple[int, int, int, int]:
    """Channels of ``layer0..layer3`` for a trunk of base width ``width`` (64, 256, 512, 1024 at 64)."""
    return (width, 4 * width, 8 * width, 16 * width)


def _imagenet_key(key: str) -> Optional[str]:
    """torchvision ResNet-50 key -> ConDSeg trunk key (``layer0``/``layer1.1``), ``None`` when unused."""
    if key.startswith("conv1."):
        return "layer0.0." + key[len("conv1.") :]
    if key.startswith("bn1."):
        return "layer0.1." + key[len("bn1.") :]
    if key.startswith("layer1."):
        return "layer1.1." + key[len("layer1.") :]
    if key.startswith(("layer2.", "layer3.")):
        return key
    return None


_ENCODER_PREFIXES = ("layer0.", "layer1.", "layer2.", "layer3.")


def _drop_aux_entries(module: nn.Module, state_dict: dict, prefix: str, *args: object) -> None:
    """Load-state-dict pre-hook of an aux-free ConDSeg: remove the training-only ``aux_head.*`` entries."""
    for key in [k for k in state_dict if k.startswith(prefix + "aux_head.")]:
        del state_dict[key]


class ConDSeg(nn.Module):
    """ConDSeg (Lei et al., AAAI 2025): ResNet-50 trunk, FEM, SID, CDFA, size-aware decoders.

    Channel rule: the network takes ``in_channels`` image channels (default 3, RGB in [0, 1] as in
    the official code, no mean/std). Grey CT/MRI slices are replicated to 3 channels by the caller
    when the model was built with 3 channels (the Predictor does this from the model card);
    ``in_channels=1`` builds a 1-channel stem for from-scratch grey training, and the ImageNet importer
    (:func:`MedSegSuiteLib.networks.resnet.load_imagenet_encoder`) sums the RGB stem filters for it.

    Args:
        in_channels: image channels (3).
        out_channels: logit maps of the main output (1, binary).
        encoder_layers: bottleneck blocks of ResNet-50 stages 1-3 ((3, 4, 6); the lite preset uses
            (2, 2, 2), the first blocks of each stage).
        dim: width of FEM, SID, CDFA, decoders and output block (128). The SID hidden width is
            ``4 * dim`` and the aux head widths ``(2, 2, 1, 1/2, 1/2) * dim``, as in the paper preset.
        num_heads: CDFA heads (4). ``dim`` must be divisible by it and at least 16 (channel attention).
        fem_rates: dilations of the FEM 3x3 branches ((6, 12, 18)).
        aux_head: build the training-only SID auxiliary head (``aux_head`` keys). ``False`` gives the
            inference-only network (41.68 M parameters instead of 45.55 M for the paper preset); it
            ignores ``aux_head.*`` entries of a loaded state_dict, so training checkpoints load strictly.
        encoder_width: base width of the ResNet trunk (64 = ResNet-50, ImageNet-loadable); its stages
            have ``(1, 4, 8, 16) * encoder_width`` channels. Narrower trunks are for CPU use.

    ``forward(x[B, in_channels, H, W])`` with H, W divisible by 16 returns the main logits
    ``[B, out_channels, H, W]``. ``forward(x, return_aux=True)`` returns
    ``(logits, aux_fg, aux_bg, aux_uc)``, the last three ``[B, 1, H, W]`` logits of the SID head
    (needs ``aux_head=True``). :meth:`predict_proba` returns sigmoid probabilities.
    """

    encoder_prefixes = _ENCODER_PREFIXES

    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 1,
        encoder_layers: Sequence[int] = (3, 4, 6),
        dim: int = 128,
        num_heads: int = 4,
        fem_rates: Sequence[int] = (6, 12, 18),
        aux_head: bool = True,
        encoder_width: int = 64,
    ) -> None:
        super().__init__()
        if in_channels < 1 or out_channels < 1:
            raise ValueError(f"in_channels and out_channels must be positive, got {in_channels}, {out_channels}")
        if dim < 16 or dim % 2 or dim % num_heads:
            raise ValueError(f"dim must be even, >= 16 and divisible by num_heads ({num_heads}), got {dim}")
        self.dim = dim
        self.out_channels = out_channels
        self.in_channels, self.encoder_layers, self.encoder_width = in_channels, tuple(encoder_layers), encoder_width
        self.layer0, self.layer1, self.layer2, self.layer3 = _trunk(in_channels, encoder_layers, encoder_width)
        widths = _trunk_widths(encoder_width)
        for k, width in enumerate(widths):
            self.add_module(f"dconv{k + 1}", FEM(width, dim, fem_rates))
        self.decouple_layer = Decouple(widths[3], dim, 4 * dim)
        for level, up in ((4, 1), (3, 2), (2, 4), (1, 8)):
            self.add_module(f"preprocess_fg{level}", GuidePrep(dim, dim, up))
            self.add_module(f"preprocess_bg{level}", GuidePrep(dim, dim, up))
        self.aux_head = AuxHead(dim, (2 * dim, 2 * dim, dim, dim // 2, dim // 2)) if aux_head else None
        if not aux_head:
            self.register_load_state_dict_pre_hook(_drop_aux_entries)
        self.cdfa4 = CDFA(dim, dim, num_heads)
        self.cdfa3 = CDFA(2 * dim, dim, num_heads)
        self.cdfa2 = CDFA(2 * dim, dim, num_heads)
        self.cdfa1 = CDFA(2 * dim, dim, num_heads)
        self.decoder_small = DecoderBlock(dim, dim)
        self.decoder_middle = DecoderBlock(dim, dim)
        self.decoder_large = DecoderBlock(dim, dim)
        self.output_block = OutputBlock(dim, out_channels)

    @staticmethod
    def imagenet_key(key: str) -> Optional[str]:
        """Model key for a torchvision ResNet-50 key (``None``: not part of this trunk)."""
        return _imagenet_key(key)

    @property
    def feature_dims(self) -> tuple[int, int, int, int]:
        """Channels of the four maps :meth:`features_and_logits` returns (HiDiff's segmentor protocol)."""
        return (self.dim,) * 4

    @property
    def num_classes(self) -> int:
        return self.out_channels

    def _decode(self, x: torch.Tensor, return_aux: bool) -> tuple[torch.Tensor, ...]:
        if return_aux and self.aux_head is None:
            raise RuntimeError("this ConDSeg was built with aux_head=False; it cannot return aux outputs")
        if x.shape[-2] % 16 or x.shape[-1] % 16:
            raise ValueError(f"ConDSeg needs H and W divisible by 16, got {tuple(x.shape[-2:])}")
        x1 = run_sequential(self.layer0, x)
        x2 = self.layer1(x1)
        x3 = self.layer2(x2)
        x4 = self.layer3(x3)
        d1, d2, d3, d4 = self.dconv1(x1), self.dconv2(x2), self.dconv3(x3), self.dconv4(x4)
        f_fg, f_bg, f_uc = self.decouple_layer(x4, with_uncertainty=return_aux)

        f4 = self.cdfa4(d4, self.preprocess_fg4(f_fg), self.preprocess_bg4(f_bg))
        f3 = self.cdfa3(torch.cat([d3, _up(f4)], dim=1), self.preprocess_fg3(f_fg), self.preprocess_bg3(f_bg))
        f2 = self.cdfa2(torch.cat([d2, _up(f3)], dim=1), self.preprocess_fg2(f_fg), self.preprocess_bg2(f_bg))
        f1 = self.cdfa1(torch.cat([d1, _up(f2)], dim=1), self.preprocess_fg1(f_fg), self.preprocess_bg1(f_bg))
        logits = self.output_block(self.decoder_small(f2, f1), self.decoder_middle(f3, f2), self.decoder_large(f4, f3))
        return logits, f2, f3, f4, f_fg, f_bg, f_uc

    def forward(
        self, x: torch.Tensor, return_aux: bool = False
    ) -> Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
        logits, _, _, _, f_fg, f_bg, f_uc = self._decode(x, return_aux)
        if not return_aux:
            return logits
        aux_fg, aux_bg, aux_uc = self.aux_head(f_fg, f_bg, f_uc)
        return logits, aux_fg, aux_bg, aux_uc

    def features_and_logits(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """HiDiff's segmentor protocol: the CDFA outputs at H/4, H/8, H/16 and their 2x2 mean at H/32
        (``dim`` channels each), and the main logits. ``x`` must be divisible by 32."""
        if x.shape[-2] % 32 or x.shape[-1] % 32:
            raise ValueError(f"as a HiDiff segmentor ConDSeg needs H and W divisible by 32, got {tuple(x.shape[-2:])}")
        logits, f2, f3, f4, _, _, _ = self._decode(x, False)
        return [f2, f3, f4, F.avg_pool2d(f4, 2)], logits

    def predict_proba(self, x: torch.Tensor) -> torch.Tensor:
        """Sigmoid probabilities of the main output, ``[B, out_channels, H, W]`` in [0, 1]."""
        return torch.sigmoid(self.forward(x))


class _Adjust(nn.Module):
    """Stage-1 head (official ``adjust``): per level CBR1x1 -> ``width`` at full size, concat, 1x1 conv."""

    def __init__(self, in_channels: Sequence[int], width: int, out_channels: int) -> None:
        super().__init__()
        for k, channels in enumerate(in_channels):
            self.add_module(f"conv{k + 1}", CBR(channels, width, 1, 0))
        self.conv_fuse = nn.Conv2d(len(in_channels) * width, out_channels, 1, bias=False)

    def forward(self, features: Sequence[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
        maps = []
        for k, feature in enumerate(features):
            cbr = getattr(self, f"conv{k + 1}")
            factor = size[0] // feature.shape[-2]
            if self.training:
                # official order: upsample, then conv + BN (batch statistics at full size) + ReLU
                maps.append(cbr(_up(feature, factor)))
            else:
                # conv 1x1 and eval BN are affine per pixel and commute with bilinear upsampling
                maps.append(F.relu(_up(run_sequential(cbr.conv, feature), factor)))
        return self.conv_fuse(torch.cat(maps, dim=1))


class ConDSegStage1(nn.Module):
    """ConDSeg stage-1 network (consistency reinforcement pre-training of the encoder).

    Lei et al., AAAI 2025. The ResNet-50 trunk ``layer0..layer3`` (same keys as :class:`ConDSeg`)
    plus a light head (``head.conv1..4``, ``head.conv_fuse``) that upsamples every level to the input
    size. Channel rule as in :class:`ConDSeg`: ``in_channels`` (default 3, RGB); grey images are
    replicated to 3 channels by the caller, ``in_channels=1`` builds a grey stem.

    Args:
        in_channels: image channels (3). out_channels: logit maps (1).
        encoder_layers: bottleneck blocks of ResNet-50 stages 1-3 ((3, 4, 6)).
        head_width: width of each per-level 1x1 CBR (64).
        encoder_width: base width of the ResNet trunk (64), as in :class:`ConDSeg`.

    ``forward(x[B, in_channels, H, W])`` (H, W divisible by 16) returns logits ``[B, out_channels, H, W]``.
    Use :func:`transfer_stage1_encoder` to start a :class:`ConDSeg` from it.
    """

    encoder_prefixes = _ENCODER_PREFIXES

    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 1,
        encoder_layers: Sequence[int] = (3, 4, 6),
        head_width: int = 64,
        encoder_width: int = 64,
    ) -> None:
        super().__init__()
        if in_channels < 1 or out_channels < 1 or head_width < 1:
            raise ValueError("in_channels, out_channels and head_width must be positive")
        self.in_channels, self.encoder_layers, self.encoder_width = in_channels, tuple(encoder_layers), encoder_width
        self.layer0, self.layer1, self.layer2, self.layer3 = _trunk(in_channels, encoder_layers, encoder_width)
        self.head = _Adjust(_trunk_widths(encoder_width), head_width, out_channels)

    @staticmethod
    def imagenet_key(key: str) -> Optional[str]:
        """Model key for a torchvision ResNet-50 key (``None``: not part of this trunk)."""
        return _imagenet_key(key)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2] % 16 or x.shape[-1] % 16:
            raise ValueError(f"ConDSegStage1 needs H and W divisible by 16, got {tuple(x.shape[-2:])}")
        x1 = run_sequential(self.layer0, x)
        x2 = self.layer1(x1)
        x3 = self.layer2(x2)
        x4 = self.layer3(x3)
        return self.head((x1, x2, x3, x4), (x.shape[-2], x.shape[-1]))

    def predict_proba(self, x: torch.Tensor) -> torch.Tensor:
        """Sigmoid probabilities ``[B, out_channels, H, W]`` in [0, 1]."""
        return torch.sigmoid(self.forward(x))


def transfer_stage1_encoder(stage1: nn.Module, stage2: nn.Module) -> list[str]:
    """Copy the trunk (``layer0..layer3``) of a stage-1 network into a ConDSeg, parameters and BN buffers.

    The official script copied only ``named_parameters``, leaving the BatchNorm running statistics
    of the stage-2 initialisation; here every ``state_dict`` entry under ``layer0.``..``layer3.``
    (weights, biases, ``running_mean``, ``running_var``, ``num_batches_tracked``) is copied. The two
    trunks share their keys, so it also copies the other way (a ConDSeg's trunk into a stage-1
    network, which the recipe does to start stage 1 from the network's initial trunk).
    Raises ``ValueError`` when the trunks differ in keys or shapes. Returns the copied keys.
    """
    src = {k: v for k, v in stage1.state_dict().items() if k.startswith(_ENCODER_PREFIXES)}
    dst = {k: v for k, v in stage2.state_dict().items() if k.startswith(_ENCODER_PREFIXES)}
    if set(src) != set(dst):
        raise ValueError(f"the encoders differ: {sorted(set(src) ^ set(dst))[:5]}")
    bad = [k for k in src if src[k].shape != dst[k].shape]
    if bad:
        raise ValueError(f"encoder shapes differ at {bad[:5]}")
    with torch.no_grad():
        for key, value in src.items():
            dst[key].copy_(value)
    return sorted(src)
