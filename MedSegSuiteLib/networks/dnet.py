"""D-Net: dynamic large kernels (DLK) and dynamic feature fusion (DFF) for 3D segmentation.

Yang, Qiu, Zhang, Marcus, Sotiras, "D-Net: Dynamic large kernel with dynamic feature fusion for
volumetric medical image segmentation", Biomed. Signal Process. Control 113:108837 (2026),
doi:10.1016/j.bspc.2025.108837 (arXiv:2403.10674).

The module keeps the attribute names of the authors' code so that a state_dict in their layout
loads with ``strict=True`` (journal "v2" layout by default, the arXiv-v1 layout with
``variant="v1"``). Three details of that code define the model and are kept: the spatial gate
multiplies the whole concatenated map by the *sum* of both gates, a DLK block uses one
LayerNorm and one layer-scale vector for both of its residual branches, and the salience layer
applies its single BatchNorm twice.

Every layer is computed in channels-last (NDHWC) memory order: 1x1x1 convolutions and the
stride-2 transposed convolutions as matrix products, the dilated depthwise 7^3 convolution as
dense 7^3 convolutions on its 27 interleaved sub-lattices, kernels cropped where they only see
zero padding, and the channel gate of DFF folded into its reduction matrix. In eval mode the
BatchNorms are folded into the neighbouring convolutions, and without autograd the large channel
MLPs run in slabs of a few depth slices so their 4x-wide hidden tensor stays in cache. All of
these are exact rewrites of the same arithmetic: outputs agree with the reference formulation to
float32 rounding (about 1e-6 relative), and the state_dict is unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Union

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "PRESETS",
    "ConvBlock",
    "ConvMLP",
    "DFF",
    "DLK",
    "DLKBlock",
    "DLKModule",
    "DNet",
    "SalienceLayer",
]

PRESETS = {
    "dnet": {
        # The journal configuration: 39.28 M parameters at 1 input channel and 14 classes.
        "paper": {"in_channels": 1, "num_classes": 14},
        # A third of the widths and one DLK block per stage: 3.22 M parameters (K = 14) and 44 GFLOPs at
        # 96^3 (the paper preset: 39.28 M, ~370 GFLOPs), so a 96^3 window takes about a second on two CPU
        # cores. Same blocks and quirks, sized for small tasks such as hippocampus crops (about 35x50x35
        # voxels padded to 64^3, 3 classes), where 39 M parameters would mostly memorise the few hundred
        # training volumes.
        "lite": {"in_channels": 1, "num_classes": 14, "widths": (16, 32, 64, 128, 256), "depths": (1, 1, 1, 1, 1)},
    }
}

_DIVISOR = 32  # five stride-2 stages in both variants
_SLAB_ELEMENTS = 1 << 22  # ~16 MB of float32 hidden activations per slab in tiled inference
_LAST = torch.channels_last_3d
TensorOrList = Union[torch.Tensor, list]


# ----------------------------------------------------------------------------------------------
# functional helpers (exact rewrites of the reference operations)
# ----------------------------------------------------------------------------------------------


def _to_last(x: torch.Tensor) -> torch.Tensor:
    return x.permute(0, 2, 3, 4, 1)


def _to_first(x: torch.Tensor) -> torch.Tensor:
    return x.permute(0, 4, 1, 2, 3)


def _channels_last(x: torch.Tensor) -> torch.Tensor:
    return x if x.is_contiguous(memory_format=_LAST) else x.contiguous(memory_format=_LAST)


def _pointwise(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """A 1x1x1 convolution with ``weight`` [Cout, Cin, 1, 1, 1]; [B, Cin, *S] -> [B, Cout, *S] channels-last."""
    return _to_first(F.linear(_to_last(x), weight.flatten(1), bias))


def _layer_norm(x: torch.Tensor, norm: nn.LayerNorm) -> torch.Tensor:
    """LayerNorm over the channel axis at every voxel; same shape, channels-last."""
    return _to_first(F.layer_norm(_to_last(x), norm.normalized_shape, norm.weight, norm.bias, norm.eps))


def _depthwise(x: torch.Tensor, conv: nn.Conv3d) -> torch.Tensor:
    """A "same"-padded depthwise ``conv`` applied to ``x`` [B, C, *S]; returns [B, C, *S].

    A dilated kernel is run as a dense kernel on each of the dilation^3 interleaved sub-lattices,
    and a kernel wider than the (sub-lattice) volume is cropped to the taps that can reach data.
    """
    dilation = conv.dilation[0]
    spatial = x.shape[2:]
    if dilation == 1:
        weight, padding = _crop_kernel(conv.weight, spatial)
        return F.conv3d(x, weight, conv.bias, padding=padding, groups=conv.groups)
    b, c = x.shape[:2]
    pads = [(-s) % dilation for s in spatial]
    xl = _to_last(x)
    if any(pads):
        xl = F.pad(xl, (0, 0, 0, pads[2], 0, pads[1], 0, pads[0]))
    sub = [(s + p) // dilation for s, p in zip(spatial, pads)]
    xl = xl.reshape(b, sub[0], dilation, sub[1], dilation, sub[2], dilation, c)
    xl = xl.permute(0, 2, 4, 6, 1, 3, 5, 7).reshape(b * dilation**3, sub[0], sub[1], sub[2], c)
    weight, padding = _crop_kernel(conv.weight, sub)
    y = F.conv3d(_to_first(xl), weight, conv.bias, padding=padding, groups=conv.groups)
    y = _to_last(y).reshape(b, dilation, dilation, dilation, sub[0], sub[1], sub[2], c)
    y = y.permute(0, 4, 1, 5, 2, 6, 3, 7).reshape(b, sub[0] * dilation, sub[1] * dilation, sub[2] * dilation, c)
    if any(pads):
        y = y[:, : spatial[0], : spatial[1], : spatial[2]]
    return _channels_last(_to_first(y))


def _crop_kernel(weight: torch.Tensor, spatial: Sequence[int]) -> tuple[torch.Tensor, list[int]]:
    """Crop an odd, centred kernel to at most 2n-1 taps on an axis of n voxels; returns it and its padding."""
    slices = [slice(None), slice(None)]
    padding = []
    for k, n in zip(weight.shape[2:], spatial):
        keep = min(k, 2 * n - 1)
        start = (k - keep) // 2
        slices.append(slice(start, start + keep))
        padding.append(keep // 2)
    return weight[tuple(slices)], padding


def _conv3x3(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """A "same" 3^3 convolution returning channels-last; inputs with fewer than 4 channels get zero channels
    (zero weights, so the result is unchanged) because PyTorch's CPU heuristic otherwise picks a slow
    channels-first kernel for them."""
    missing = 4 - x.shape[1]
    if missing > 0 and x.device.type == "cpu":
        x = torch.cat([x, x.new_zeros(x.shape[0], missing, *x.shape[2:])], dim=1)
        weight = torch.cat([weight, weight.new_zeros(weight.shape[0], missing, *weight.shape[2:])], dim=1)
    return _channels_last(F.conv3d(_channels_last(x), weight, bias, padding=1))


def _upsample2(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """A kernel-2, stride-2 transposed convolution (``weight`` [Cin, Cout, 2, 2, 2]) as one matrix product
    and an interleave; [B, Cin, D, H, W] -> [B, Cout, 2D, 2H, 2W] channels-last."""
    b, _, d, h, w = x.shape
    cout = weight.shape[1]
    weight = weight.permute(2, 3, 4, 1, 0).reshape(8 * cout, -1)
    bias = None if bias is None else bias.repeat(8)
    y = F.linear(_to_last(x), weight, bias).reshape(b, d, h, w, 2, 2, 2, cout)
    y = y.permute(0, 1, 4, 2, 5, 3, 6, 7).reshape(b, 2 * d, 2 * h, 2 * w, cout)
    return _to_first(y)


def _batchnorm_affine(bn: nn.BatchNorm3d) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift) with ``bn(x) == x * scale + shift`` per channel, from the running statistics."""
    scale = bn.weight * torch.rsqrt(bn.running_var + bn.eps)
    return scale, bn.bias - bn.running_mean * scale


def _fold_batchnorm(weight: torch.Tensor, bias: torch.Tensor, bn: nn.BatchNorm3d) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight and bias of ``conv`` followed by eval-mode ``bn`` as one convolution."""
    scale, shift = _batchnorm_affine(bn)
    return weight * scale.view(-1, *([1] * (weight.ndim - 1))), bias * scale + shift


def _drop_path(x: torch.Tensor, rate: float) -> torch.Tensor:
    """Stochastic depth per sample: zero whole samples with probability ``rate``, rescale the rest by 1/(1-rate)."""
    keep = 1.0 - rate
    mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
    return x * mask / keep


# ----------------------------------------------------------------------------------------------
# blocks
# ----------------------------------------------------------------------------------------------


class ConvMLP(nn.Module):
    """Channel MLP with a depthwise 3^3 convolution: 1x1 C->4C, depthwise 3^3, GELU, 1x1 4C->C.

    Args:
        channels: C, input and output channels.
        expansion: hidden width factor (4 in D-Net).

    ``forward(x[B, C, *S]) -> [B, C, *S]``.
    """

    def __init__(self, channels: int, expansion: int = 4) -> None:
        super().__init__()
        hidden = channels * expansion
        self.fc1 = nn.Conv3d(channels, hidden, 1)
        self.dwconv = nn.Conv3d(hidden, hidden, 3, 1, 1, groups=hidden)
        self.fc2 = nn.Conv3d(hidden, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._run(x, self.fc1.weight, self.fc1.bias)

    def _run(
        self, x: torch.Tensor, fc1_weight: torch.Tensor, fc1_bias: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The MLP with the given first layer, plus ``residual`` when given."""
        slab = self._slab(x)
        if slab:
            return self._run_in_slabs(x, fc1_weight, fc1_bias, residual, slab)
        h = _pointwise(x, fc1_weight, fc1_bias)
        h = F.gelu(_depthwise(h, self.dwconv))
        out = _pointwise(h, self.fc2.weight, self.fc2.bias)
        return out if residual is None else out + residual

    def _slab(self, x: torch.Tensor) -> int:
        """Depth slices per slab for cache-friendly inference, or 0 to run the whole volume at once."""
        if torch.is_grad_enabled() or x.ndim != 5:
            return 0
        plane = x.shape[0] * x.shape[3] * x.shape[4] * self.dwconv.out_channels
        slab = max(1, _SLAB_ELEMENTS // plane)
        return slab if x.shape[2] >= 4 * slab and plane * x.shape[2] >= 2 * _SLAB_ELEMENTS else 0

    def _run_in_slabs(self, x, fc1_weight, fc1_bias, residual, slab: int) -> torch.Tensor:
        # the hidden 4C-channel tensor is only ever built for `slab` depth slices plus a one-slice halo
        depth = x.shape[2]
        xl = _to_last(_channels_last(x))
        res = None if residual is None else _to_last(residual)
        out = torch.empty_like(xl)
        w1, w2 = fc1_weight.flatten(1), self.fc2.weight.flatten(1)
        for z0 in range(0, depth, slab):
            z1 = min(depth, z0 + slab)
            h = F.linear(xl[:, max(0, z0 - 1) : z1 + 1], w1, fc1_bias)
            if z0 == 0 or z1 == depth:  # zero padding of the depthwise convolution at the volume's ends
                h = F.pad(h, (0, 0, 0, 0, 0, 0, int(z0 == 0), int(z1 == depth)))
            h = F.conv3d(_to_first(h), self.dwconv.weight, self.dwconv.bias, padding=(0, 1, 1), groups=h.shape[-1])
            part = F.linear(_to_last(F.gelu(h)), w2, self.fc2.bias)
            if res is None:
                out[:, z0:z1] = part
            else:
                torch.add(part, res[:, z0:z1], out=out[:, z0:z1])
        return _to_first(out)


class DLK(nn.Module):
    """Dynamic large kernel: depthwise 5^3 then dilated (3) depthwise 7^3, spatial and channel gates.

    Args:
        channels: C, input and output channels (even for ``variant="v2"``).
        variant: ``"v2"`` (journal): 1x1 projection C->C/2 before the kernels, gate ``a*(g1+g2)`` on
            the concatenation, then a full-rank sigmoid channel gate. ``"v1"`` (arXiv v1): kernels on
            all C channels, per-branch gate ``a1*g1 + a2*g2``, no channel gate.

    ``forward(u[B, C, *S]) -> [B, C, *S]``, residual to ``u`` included.
    """

    def __init__(self, channels: int, variant: str = "v2") -> None:
        super().__init__()
        if variant not in ("v1", "v2"):
            raise ValueError(f"variant must be 'v1' or 'v2', got {variant!r}")
        if variant == "v2" and channels % 2:
            raise ValueError(f"DLK v2 needs an even channel count, got {channels}")
        self.variant = variant
        inner = channels // 2 if variant == "v2" else channels
        if variant == "v2":
            self.channel_proj = nn.Conv3d(channels, inner, 1, bias=False)
        self.att_conv1 = nn.Conv3d(inner, inner, 5, padding=2, groups=inner)
        self.att_conv2 = nn.Conv3d(inner, inner, 7, padding=9, dilation=3, groups=inner)
        self.spatial_se = nn.Sequential(nn.Conv3d(2, 2, 7, padding=3), nn.Sigmoid())
        if variant == "v2":
            self.conv_atten = nn.Sequential(nn.Conv3d(channels, channels, 1, bias=False), nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = _pointwise(x, self.channel_proj.weight) if self.variant == "v2" else x
        a1 = _depthwise(p, self.att_conv1)
        a2 = _depthwise(a1, self.att_conv2)
        a = torch.cat([a1, a2], dim=1)
        stats = torch.cat([a.mean(1, keepdim=True), a.amax(1, keepdim=True)], dim=1)
        se = self.spatial_se[0]
        gates = torch.sigmoid(F.conv3d(stats, se.weight, se.bias, padding=3))
        if self.variant == "v1":
            return a1 * gates[:, :1] + a2 * gates[:, 1:] + x
        a = a * (gates[:, :1] + gates[:, 1:])
        channel_gate = torch.sigmoid(F.linear(a.mean((2, 3, 4)), self.conv_atten[0].weight.flatten(1)))
        return torch.addcmul(x, a, channel_gate[:, :, None, None, None])


class DLKModule(nn.Module):
    """``x + proj_2(DLK(GELU(proj_1(x))))`` with 1x1 projections.

    Args:
        channels: C, input and output channels.
        variant: DLK variant, ``"v2"`` or ``"v1"``.

    ``forward(x[B, C, *S]) -> [B, C, *S]``.
    """

    def __init__(self, channels: int, variant: str = "v2") -> None:
        super().__init__()
        self.proj_1 = nn.Conv3d(channels, channels, 1)
        self.spatial_gating_unit = DLK(channels, variant)
        self.proj_2 = nn.Conv3d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = F.gelu(_pointwise(x, self.proj_1.weight, self.proj_1.bias))
        u = self.spatial_gating_unit(u)
        return _pointwise(u, self.proj_2.weight, self.proj_2.bias) + x


class DLKBlock(nn.Module):
    """Two pre-norm residual branches, DLKModule then ConvMLP, sharing one LayerNorm and one layer scale.

    ``y = x + s*DropPath(DLKModule(LN(x)))``, ``z = y + s*DropPath(ConvMLP(LN(y)))``.

    Args:
        channels: C, input and output channels.
        drop_path: stochastic-depth rate of both branches (0 disables it).
        layer_scale_init: initial value of every entry of the layer scale ``s`` (1e-6 in D-Net).
        variant: DLK variant, ``"v2"`` or ``"v1"``.

    ``forward(x[B, C, *S]) -> [B, C, *S]``.
    """

    def __init__(self, channels: int, drop_path: float = 0.0, layer_scale_init: float = 1e-6, variant: str = "v2"):
        super().__init__()
        if not 0.0 <= drop_path < 1.0:
            raise ValueError(f"drop_path must be in [0, 1), got {drop_path}")
        self.norm_layer = nn.LayerNorm(channels, eps=1e-6)
        self.attn = DLKModule(channels, variant)
        self.mlp = ConvMLP(channels)
        self.drop_path = float(drop_path)
        self.layer_scale = nn.Parameter(torch.full((channels,), float(layer_scale_init)))

    def _residual(self, x: torch.Tensor, branch: torch.Tensor) -> torch.Tensor:
        scale = self.layer_scale[:, None, None, None]
        if self.drop_path > 0.0 and self.training:
            return x + _drop_path(scale * branch, self.drop_path)
        return torch.addcmul(x, scale, branch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._residual(x, self.attn(_layer_norm(x, self.norm_layer)))
        return self._residual(x, self.mlp(_layer_norm(x, self.norm_layer)))


class DFF(nn.Module):
    """Dynamic feature fusion of a decoder tensor ``x`` and a skip ``s`` (both C channels).

    ``t = [x, s] * sigmoid(W_a GAP([x, s]))``, ``r = W_r t`` (2C->C), ``out = r * sigmoid(w_1 x + w_2 s)``.

    Args:
        channels: C.

    ``forward(x[B, C, *S], skip[B, C, *S]) -> [B, C, *S]``.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv_atten = nn.Sequential(nn.Conv3d(2 * channels, 2 * channels, 1, bias=False), nn.Sigmoid())
        self.conv_redu = nn.Conv3d(2 * channels, channels, 1, bias=False)
        self.conv1 = nn.Conv3d(channels, 1, 1)
        self.conv2 = nn.Conv3d(channels, 1, 1)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        b, c = x.shape[:2]
        spatial = x.shape[2:]
        pooled = torch.cat([x.mean((2, 3, 4)), skip.mean((2, 3, 4))], dim=1)
        gate = torch.sigmoid(F.linear(pooled, self.conv_atten[0].weight.flatten(1)))
        # the channel gate scales the inputs of conv_redu, i.e. its columns; the spatial gate logits ride along
        reduce = self.conv_redu.weight.flatten(1)[None] * gate[:, None, :]
        wx = torch.cat([reduce[:, :, :c], self.conv1.weight.flatten(1).expand(b, 1, c)], dim=1)
        ws = torch.cat([reduce[:, :, c:], self.conv2.weight.flatten(1).expand(b, 1, c)], dim=1)
        xl = _to_last(x).reshape(b, -1, c)
        sl = _to_last(skip).reshape(b, -1, c).to(xl.dtype)
        wx, ws = wx.to(xl.dtype), ws.to(xl.dtype)  # one dtype for the in-place product (autocast)
        y = torch.bmm(xl, wx.transpose(1, 2)).baddbmm_(sl, ws.transpose(1, 2))
        spatial_gate = torch.sigmoid(y[..., c:] + (self.conv1.bias + self.conv2.bias))
        out = y[..., :c] * spatial_gate
        return _to_first(out.reshape(b, *spatial, c))


class ConvBlock(nn.Module):
    """Two rounds of 3^3 convolution (with bias), BatchNorm and LeakyReLU(0.2).

    Args:
        in_channels: input channels.
        channels: output channels of both convolutions.

    ``forward(x[B, in_channels, *S]) -> [B, channels, *S]``.
    """

    def __init__(self, in_channels: int, channels: int) -> None:
        super().__init__()
        self.conv1 = self._round(in_channels, channels)
        self.conv2 = self._round(channels, channels)

    @staticmethod
    def _round(cin: int, cout: int) -> nn.Sequential:
        return nn.Sequential(nn.Conv3d(cin, cout, 3, padding=1), nn.BatchNorm3d(cout), nn.LeakyReLU(0.2, inplace=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            return self.conv2(self.conv1(x))
        for layer in (self.conv1, self.conv2):  # eval: BatchNorm folded into the convolution
            weight, bias = _fold_batchnorm(layer[0].weight, layer[0].bias, layer[1])
            x = F.leaky_relu_(F.conv3d(_channels_last(x), weight, bias, padding=1), 0.2)
        return x


class SalienceLayer(nn.Module):
    """Full-resolution salience branch of D-Net v2.

    ``s = LeakyReLU_0.2(BN(conv3^3(x)))``, ``out = s + ConvMLP(BN(s))`` with the *same* BatchNorm
    applied twice (in training mode its running statistics are updated by both calls).

    Args:
        in_channels: image channels.
        channels: output channels (48 in D-Net).

    ``forward(x[B, in_channels, *S]) -> [B, channels, *S]``.
    """

    def __init__(self, in_channels: int, channels: int) -> None:
        super().__init__()
        self.channel_proj = nn.Conv3d(in_channels, channels, 3, padding=1)
        self.mlp = ConvMLP(channels)
        self.norm_layer = nn.BatchNorm3d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            s = F.leaky_relu(self.norm_layer(_channels_last(self.channel_proj(x))), 0.2)
            return s + self.mlp(self.norm_layer(s))
        # eval: the first BatchNorm folds into channel_proj, the second into the MLP's first 1x1 layer
        weight, bias = _fold_batchnorm(self.channel_proj.weight, self.channel_proj.bias, self.norm_layer)
        s = F.leaky_relu_(_conv3x3(x, weight, bias), 0.2)
        scale, shift = _batchnorm_affine(self.norm_layer)
        fc1 = self.mlp.fc1.weight.flatten(1)
        return self.mlp._run(s, fc1 * scale, self.mlp.fc1.bias + fc1 @ shift, residual=s)


def _stage(channels: int, rates: Sequence[float], layer_scale_init: float, variant: str) -> nn.Sequential:
    return nn.Sequential(*[DLKBlock(channels, rate, layer_scale_init, variant) for rate in rates])


def _rates(depths: Sequence[int], drop_path_rate: float) -> list[float]:
    """Stochastic-depth rates rising linearly over the blocks, as the official code's ``torch.linspace``
    gives them; computed on the CPU, so the network can also be built on the ``meta`` device."""
    return torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist()


# ----------------------------------------------------------------------------------------------
# v2 encoder / decoder (journal layout)
# ----------------------------------------------------------------------------------------------


class _EncoderV2(nn.Module):
    def __init__(self, in_channels: int, depths, widths, drop_path_rate: float, layer_scale_init: float) -> None:
        super().__init__()
        self.downsample_layers = nn.ModuleList([nn.Conv3d(in_channels, widths[0], 7, stride=2, padding=3)])
        for i in range(4):
            self.downsample_layers.append(nn.Conv3d(widths[i], widths[i + 1], 3, stride=2, padding=1))
        rates = _rates(depths, drop_path_rate)
        self.stages = nn.ModuleList()
        for i in range(5):
            start = sum(depths[:i])
            self.stages.append(_stage(widths[i], rates[start : start + depths[i]], layer_scale_init, "v2"))
        self.norm_layers = nn.ModuleList([nn.LayerNorm(w, eps=1e-6) for w in widths])
        self.saliency = SalienceLayer(in_channels, widths[0])

    def forward(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        salience = self.saliency(x)
        skips = []
        for down, norm, stage in zip(self.downsample_layers, self.norm_layers, self.stages):
            x = stage(_layer_norm(down(x), norm))
            skips.append(x)
        return skips, salience


class _DecoderV2(nn.Module):
    def __init__(self, num_classes: int, depths, widths, drop_path_rate: float, layer_scale_init: float) -> None:
        super().__init__()
        levels = [widths[3 - i] for i in range(4)]  # deepest first
        self.upsample_layers = nn.ModuleList(
            [nn.ConvTranspose3d(widths[4 - i], levels[i], 2, stride=2) for i in range(4)]
        )
        self.norm_layers = nn.ModuleList([nn.LayerNorm(c, eps=1e-6) for c in levels])
        self.steps = nn.ModuleList([DFF(c) for c in levels])
        rates = _rates(depths, drop_path_rate)
        self.stages = nn.ModuleList()
        for i in range(4):  # as upstream: decoder stage i (deepest first) takes depths[i]
            start = sum(depths[:i])
            self.stages.append(_stage(levels[i], rates[start : start + depths[i]], layer_scale_init, "v2"))
        self.seg_layers = nn.ModuleList([nn.Conv3d(c, num_classes, 1) for c in levels])
        self.stem = nn.ConvTranspose3d(widths[0], widths[0], 2, stride=2)
        self.final_fusion = DFF(widths[0])
        self.final_layer = ConvBlock(widths[0], widths[0])
        self.output_layer = nn.Conv3d(widths[0], num_classes, 1)

    def forward(self, skips: list[torch.Tensor], salience: torch.Tensor, heads: bool) -> list[torch.Tensor]:
        """Returns [full-res logits] + (the four deep-supervision logits, finest first, when ``heads``)."""
        x = skips[-1]
        side = []
        for i in range(4):
            up = self.upsample_layers[i]
            x = _layer_norm(_upsample2(x, up.weight, up.bias), self.norm_layers[i])
            x = self.stages[i](self.steps[i](x, skips[-i - 2]))
            if heads:
                side.append(_pointwise(x, self.seg_layers[i].weight, self.seg_layers[i].bias))
        x = self.final_fusion(_upsample2(x, self.stem.weight, self.stem.bias), salience)
        x = self.final_layer(_channels_last(x))
        out = _pointwise(x, self.output_layer.weight, self.output_layer.bias)
        return [out] + side[::-1]


# ----------------------------------------------------------------------------------------------
# v1 encoder / bottleneck / decoder (arXiv v1 layout)
# ----------------------------------------------------------------------------------------------


class _EncoderV1(nn.Module):
    def __init__(self, in_channels: int, depths, widths, drop_path_rate: float, layer_scale_init: float) -> None:
        super().__init__()
        self.downsample_layers = nn.ModuleList([nn.Conv3d(in_channels, widths[0], 7, stride=2, padding=3)])
        for i in range(3):
            self.downsample_layers.append(nn.Conv3d(widths[i], widths[i + 1], 2, stride=2))
        rates = _rates(depths[:4], drop_path_rate)
        self.stages = nn.ModuleList()
        for i in range(4):
            start = sum(depths[:i])
            self.stages.append(_stage(widths[i], rates[start : start + depths[i]], layer_scale_init, "v1"))
        self.norm_layers = nn.ModuleList([nn.LayerNorm(w, eps=1e-6) for w in widths[:4]])

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        skips = []
        for down, norm, stage in zip(self.downsample_layers, self.norm_layers, self.stages):
            x = stage(_layer_norm(_channels_last(down(x)), norm))
            skips.append(x)
        return skips


class _BottleneckV1(nn.Module):
    def __init__(self, channels: int, bottom: int, depth: int, layer_scale_init: float) -> None:
        super().__init__()
        self.stage = _stage(bottom, [0.0] * depth, layer_scale_init, "v1")
        self.downsample_layer = nn.Conv3d(channels, bottom, 2, stride=2)
        self.upsample_layer = nn.ConvTranspose3d(bottom, channels, 2, stride=2)
        self.norm_layer1 = nn.LayerNorm(bottom, eps=1e-6)
        self.norm_layer2 = nn.LayerNorm(channels, eps=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stage(_layer_norm(_channels_last(self.downsample_layer(x)), self.norm_layer1))
        return _layer_norm(_upsample2(x, self.upsample_layer.weight, self.upsample_layer.bias), self.norm_layer2)


class _DecoderV1(nn.Module):
    def __init__(self, depths, widths, drop_path_rate: float, layer_scale_init: float) -> None:
        super().__init__()
        levels = [widths[3 - i] for i in range(4)]  # 384, 192, 96, 48
        targets = [widths[2 - i] for i in range(3)] + [widths[0]]  # 192, 96, 48, 48
        self.upsample_layers = nn.ModuleList([nn.ConvTranspose3d(levels[i], targets[i], 2, stride=2) for i in range(4)])
        self.steps = nn.ModuleList([DFF(c) for c in levels])
        rates = _rates(depths[:4], drop_path_rate)
        self.stages = nn.ModuleList()
        for i in range(4):
            start = sum(depths[:i])
            self.stages.append(_stage(levels[i], rates[start : start + depths[i]], layer_scale_init, "v1"))
        self.norm_layers = nn.ModuleList([nn.LayerNorm(c, eps=1e-6) for c in targets])

    def forward(self, x: torch.Tensor, skips: list[torch.Tensor]) -> torch.Tensor:
        for i in range(4):
            x = self.stages[i](self.steps[i](x, skips[-i - 1]))
            up = self.upsample_layers[i]
            x = _layer_norm(_upsample2(x, up.weight, up.bias), self.norm_layers[i])
        return x


# ----------------------------------------------------------------------------------------------
# the network
# ----------------------------------------------------------------------------------------------


class DNet(nn.Module):
    """D-Net (Yang et al., Biomed. Signal Process. Control 2026; arXiv:2403.10674).

    Encoder of DLK blocks at 1/2 ... 1/32 resolution, a decoder that fuses skips with DFF, and a
    full-resolution salience branch fused back with DFF before a conv block and a 1x1 head.

    Args:
        in_channels: image channels. Default 1.
        num_classes: logit channels K (background included, softmax outputs). Default 14.
        depths: DLK blocks per stage, five values. v2: encoder stages 1/2 ... 1/32 use
            ``depths[0..4]``; decoder stage i, counted from the deepest, uses ``depths[i]`` (as the
            authors' code pairs them). v1: encoder ``depths[0..3]``, bottleneck ``depths[4]``,
            decoder as v2. Default (2, 2, 2, 2, 2).
        widths: channels per stage, five values, the last being the 1/32 bottleneck (even numbers
            for v2). Default (48, 96, 192, 384, 768).
        drop_path_rate: largest stochastic-depth rate; rates rise linearly from 0 over the blocks of
            the encoder and, separately, of the decoder (v1 bottleneck: 0). Default 0.
        deep_supervision: when True, ``forward`` returns the list
            ``[K x S, K x S/2, K x S/4, K x S/8, K x S/16]`` (full resolution first, as nnU-Net expects)
            in train and eval mode alike; when False it returns the full-resolution logits. The four
            side heads (``decoder.seg_layers``) exist either way, as upstream. v2 only. Default False.
        layer_scale_init: initial layer-scale value of every DLK block. Default 1e-6.
        variant: ``"v2"`` (journal, 39.28 M parameters at the defaults with K = 14) or ``"v1"``
            (arXiv v1, 29.96 M). Default "v2".

    ``forward(x[B, in_channels, D, H, W]) -> logits[B, K, D, H, W]`` (no activation), or the list
    above. Every spatial size must be a multiple of 32. ``predict_logits(x)`` always returns the
    full-resolution logits and skips the side heads.
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 14,
        depths: Sequence[int] = (2, 2, 2, 2, 2),
        widths: Sequence[int] = (48, 96, 192, 384, 768),
        drop_path_rate: float = 0.0,
        deep_supervision: bool = False,
        layer_scale_init: float = 1e-6,
        variant: str = "v2",
    ) -> None:
        super().__init__()
        depths, widths = tuple(int(d) for d in depths), tuple(int(w) for w in widths)
        self._validate(in_channels, num_classes, depths, widths, drop_path_rate, deep_supervision, variant)
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.variant = variant
        self.deep_supervision = bool(deep_supervision)
        if variant == "v2":
            self._build_v2(in_channels, num_classes, depths, widths, drop_path_rate, layer_scale_init)
        else:
            self._build_v1(in_channels, num_classes, depths, widths, drop_path_rate, layer_scale_init)

    @staticmethod
    def _validate(in_channels, num_classes, depths, widths, drop_path_rate, deep_supervision, variant) -> None:
        if variant not in ("v1", "v2"):
            raise ValueError(f"variant must be 'v1' or 'v2', got {variant!r}")
        if in_channels < 1 or num_classes < 1:
            raise ValueError(f"in_channels and num_classes must be positive, got {in_channels} and {num_classes}")
        if len(depths) != 5 or min(depths) < 1:
            raise ValueError(f"depths needs five positive values, got {depths}")
        if len(widths) != 5 or min(widths) < 1:
            raise ValueError(f"widths needs five positive values, got {widths}")
        if variant == "v2" and any(w % 2 for w in widths):
            raise ValueError(f"D-Net v2 needs even widths (DLK halves them), got {widths}")
        if not 0.0 <= drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate must be in [0, 1), got {drop_path_rate}")
        if deep_supervision and variant == "v1":
            raise ValueError("deep_supervision exists only in D-Net v2")

    def _build_v2(self, in_channels, num_classes, depths, widths, drop_path_rate, layer_scale_init) -> None:
        self.encoder = _EncoderV2(in_channels, depths, widths, drop_path_rate, layer_scale_init)
        self.decoder = _DecoderV2(num_classes, depths, widths, drop_path_rate, layer_scale_init)

    def _build_v1(self, in_channels, num_classes, depths, widths, drop_path_rate, layer_scale_init) -> None:
        self.dnet_down = _EncoderV1(in_channels, depths, widths, drop_path_rate, layer_scale_init)
        self.dnet_up = _DecoderV1(depths, widths, drop_path_rate, layer_scale_init)
        self.bottleneck = _BottleneckV1(widths[3], widths[4], depths[4], layer_scale_init)
        self.saliency = ConvBlock(in_channels, widths[0])
        self.final_layer = ConvBlock(widths[0], widths[0])
        self.dff = DFF(widths[0])
        self.output_layer = nn.Conv3d(widths[0], num_classes, 1)

    def _check_input(self, x: torch.Tensor) -> None:
        if x.ndim != 5 or x.shape[1] != self.in_channels:
            raise ValueError(f"D-Net expects [B, {self.in_channels}, D, H, W], got {tuple(x.shape)}")
        for axis, size in zip("DHW", x.shape[2:]):
            if size % _DIVISOR:
                lower = (size // _DIVISOR) * _DIVISOR
                nearest = [s for s in (lower, lower + _DIVISOR) if s > 0]
                raise ValueError(
                    f"D-Net needs every spatial size to be a multiple of {_DIVISOR}; axis {axis} has {size}. "
                    f"Nearest valid sizes: {' or '.join(str(s) for s in nearest)} (pad or crop the input)."
                )

    def _run(self, x: torch.Tensor, heads: bool) -> list[torch.Tensor]:
        self._check_input(x)
        x = _channels_last(x)
        if self.variant == "v1":
            skips = self.dnet_down(x)
            y = self.dnet_up(self.bottleneck(skips[-1]), skips)
            y = self.final_layer(_channels_last(self.dff(y, _channels_last(self.saliency(x)))))
            outs = [_pointwise(y, self.output_layer.weight, self.output_layer.bias)]
        else:
            skips, salience = self.encoder(x)
            outs = self.decoder(skips, salience, heads)
        return [o.contiguous() for o in outs]

    def forward(self, x: torch.Tensor) -> TensorOrList:
        """Logits [B, K, D, H, W], or the deep-supervision list (full resolution first) when enabled."""
        outs = self._run(x, heads=self.deep_supervision)
        return outs if self.deep_supervision else outs[0]

    def predict_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Full-resolution logits [B, K, D, H, W] whatever ``deep_supervision`` says."""
        return self._run(x, heads=False)[0]
