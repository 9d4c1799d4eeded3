"""HiDiff: the BBDM refiner (binary or real-valued) and a default feature-exposing segmentor.

Reference: T. Chen, C. Wang, Z. Chen, Y. Lei, H. Shan, "HiDiff: Hybrid Diffusion Framework for
Medical Image Segmentation", IEEE TMI 2024, arXiv 2407.03548. Spec: ``specs/hidiff.md`` §2-§3.
The diffusion itself (schedules, sampling, loss) lives in :mod:`MedSegSuiteLib.networks.bbdm`.

Attribute names follow the official ``BBDM_binary.UNetModel`` so that official-layout state
dicts load with ``strict=True``; the real-valued twin (``binary=False``) has the same keys.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Optional, Protocol, Union, runtime_checkable

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.networks.blocks import UnetBasicBlock, UnetOutBlock, UnetUpBlock

__all__ = [
    "PRESETS",
    "ApproxSign",
    "BBDMRefiner",
    "BiBasic",
    "BiDown",
    "BiUp",
    "BinaryConv2d",
    "BinaryLinear",
    "CondResBlock",
    "FeatureSegmentor",
    "Fuse",
    "HiDiffSegmentor",
    "TimeLayerScale",
    "TimeRPReLU",
    "TimeShift",
    "XFormer",
    "binary_sign",
    "timestep_embedding",
]

PRESETS = {
    "hidiff_refiner": {
        # Official configuration (manifest specs/keys/hidiff_refiner_k9.tsv).
        "paper": {
            "img_channels": 1,
            "num_classes": 9,
            "condition_dims": (96, 192, 384, 768),
            "width": 128,
            "binary": True,
        },
        # CPU preset: width 32, real-valued; condition dims of the lite segmentor. One 224x224,
        # K=9 call: 145 ms of CPU time single-threaded (paper preset: 1.76 s on the same measure).
        "lite": {
            "img_channels": 1,
            "num_classes": 9,
            "condition_dims": (32, 64, 64, 128),
            "width": 32,
            "binary": False,
        },
    },
    "hidiff_segmentor": {
        "paper": {"in_channels": 1, "num_classes": 9, "features": (32, 64, 96, 192, 384, 768)},
        "lite": {"in_channels": 1, "num_classes": 9, "features": (16, 32, 32, 64, 64, 128)},
    },
}


# --------------------------------------------------------------------------- binary primitives
class ApproxSign(torch.autograd.Function):
    """``sign(x)`` forward; Bi-Real "ApproxSign" gradient backward.

    Backward multiplies the incoming gradient by ``2 + 2x`` on ``[-1, 0]``, ``2 - 2x`` on
    ``(0, 1]`` and 0 elsewhere (the derivative of the piecewise quadratic surrogate).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(x)
        return torch.sign(x)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        (x,) = ctx.saved_tensors
        ax = x.abs()
        return grad_out * torch.where(ax <= 1.0, 2.0 - 2.0 * ax, torch.zeros_like(ax))


def binary_sign(x: torch.Tensor) -> torch.Tensor:
    """``sign(x)`` in ``{-1, 0, 1}`` (0 only at exactly 0), with the ApproxSign gradient when autograd records."""
    if torch.is_grad_enabled() and x.requires_grad:
        return ApproxSign.apply(x)
    return torch.sign(x)


def _straight_through(exact: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Value ``exact - s + s`` (``exact`` up to rounding, as the official code computes it); gradient of ``s``."""
    return exact.detach() - s.detach() + s


class _CachedBinaryWeight:
    """Mixin for layers whose binarised weight is a constant at inference.

    In ``train()`` mode, or whenever autograd needs the weight's gradient, the binarised weight
    is recomputed with its straight-through gradient on every call. Otherwise (``eval()`` under
    ``no_grad``/``inference_mode``, or a frozen weight) it is computed once and reused until the
    weight changes in place (version counter), moves (device, dtype, storage), or the module's
    mode or parameters are converted. Edits through ``param.data`` bypass the version counter:
    call :meth:`clear_binary_cache` after them.
    """

    weight: torch.Tensor
    binary: bool
    training: bool

    def _init_binary_cache(self) -> None:
        self._w_cache: Optional[torch.Tensor] = None
        self._w_cache_key: Optional[tuple] = None

    def clear_binary_cache(self) -> None:
        """Forget the cached binarised weight (recomputed on the next eval call)."""
        self._w_cache = None
        self._w_cache_key = None

    def _binarize(self, w: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def effective_weight(self) -> torch.Tensor:
        """The weight the layer applies: ``self.weight`` (real) or its scaled sign (binary)."""
        w = self.weight
        if not self.binary:
            return w
        if self.training or (torch.is_grad_enabled() and w.requires_grad):
            return self._binarize(w)
        key = (w.data_ptr(), w._version, w.dtype, w.device, tuple(w.shape))
        if self._w_cache is None or self._w_cache_key != key:
            with torch.inference_mode(False), torch.no_grad():
                self._w_cache = self._binarize(w).clone()
            self._w_cache_key = key
        return self._w_cache

    def train(self, mode: bool = True):  # type: ignore[no-untyped-def]
        self.clear_binary_cache()
        return super().train(mode)  # type: ignore[misc]

    def _apply(self, fn, *args, **kwargs):  # type: ignore[no-untyped-def]
        self.clear_binary_cache()
        return super()._apply(fn, *args, **kwargs)  # type: ignore[misc]


class BinaryConv2d(_CachedBinaryWeight, nn.Module):
    """Convolution with scaled sign weights (binary) or plain float weights.

    Binary forward weight: ``mean|W|·sign(W)`` with the mean taken per output channel and
    detached; backward: clipped straight-through estimator (identity for ``|W| <= 1``, else 0).
    The input is **not** binarised here (the blocks apply :func:`binary_sign` before).

    Args:
        in_channels, out_channels: channel counts.
        kernel_size: square kernel (3).
        stride: 1 or 2.
        padding: zero padding (1).
        binary: binarise the weight (True) or use it as is (False).

    Parameters ``weight [out, in, k, k]`` and ``bias [out]``. Binary init: weight
    ``U(-1e-3, 1e-3)``, bias 0; real init: PyTorch's ``Conv2d`` default.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        padding: int = 1,
        binary: bool = True,
    ) -> None:
        super().__init__()
        if in_channels < 1 or out_channels < 1:
            raise ValueError("in_channels and out_channels must be positive")
        self.stride = stride
        self.padding = padding
        self.binary = bool(binary)
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.empty(out_channels))
        self._init_binary_cache()
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Binary: small symmetric uniform weight, zero bias. Real: ``nn.Conv2d``'s default."""
        if self.binary:
            nn.init.uniform_(self.weight, -1e-3, 1e-3)
            nn.init.zeros_(self.bias)
        else:
            nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
            fan_in = self.weight.shape[1] * self.weight.shape[2] * self.weight.shape[3]
            bound = 1.0 / math.sqrt(fan_in)
            nn.init.uniform_(self.bias, -bound, bound)
        self.clear_binary_cache()

    def _binarize(self, w: torch.Tensor) -> torch.Tensor:
        scale = w.abs().mean(dim=3, keepdim=True).mean(dim=2, keepdim=True).mean(dim=1, keepdim=True).detach()
        return _straight_through(scale * torch.sign(w), w.clamp(-1.0, 1.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.effective_weight(), self.bias, stride=self.stride, padding=self.padding)


class BinaryLinear(_CachedBinaryWeight, nn.Linear):
    """Linear layer on binarised activations with row-centred binarised weights, or a plain linear.

    Binary forward: ``sign(x) @ (s·sign(W - rowmean(W)))ᵀ + b`` with ``s = mean|W|`` per output
    row (detached); activations use the ApproxSign gradient, weights the clipped STE of the
    centred weight. ``binary=False`` is ``nn.Linear``. Input/output ``[..., in] -> [..., out]``.
    """

    def __init__(self, in_features: int, out_features: int, binary: bool = True) -> None:
        self.binary = bool(binary)
        super().__init__(in_features, out_features, bias=True)
        self._init_binary_cache()

    def _binarize(self, w: torch.Tensor) -> torch.Tensor:
        scale = w.abs().mean(dim=1, keepdim=True).detach()
        centred = w - w.mean(dim=-1, keepdim=True)
        return _straight_through(scale * torch.sign(centred), centred.clamp(-1.0, 1.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.binary:
            return F.linear(x, self.weight, self.bias)
        return F.linear(binary_sign(x), self.effective_weight()) + self.bias


def _zero_linear(in_features: int, out_features: int) -> nn.Linear:
    layer = nn.Linear(in_features, out_features)
    nn.init.zeros_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


def _time_mlp(emb_dim: int, channels: int) -> nn.Sequential:
    """``SiLU -> Linear(emb_dim, channels)``, zero-initialised (keys ``1.weight``, ``1.bias``)."""
    return nn.Sequential(nn.SiLU(), _zero_linear(emb_dim, channels))


def _pair_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean of adjacent channel pairs: ``[B, 2C, ...] -> [B, C, ...]``."""
    b, c = x.shape[:2]
    return x.reshape(b, c // 2, 2, *x.shape[2:]).mean(dim=2)


class TimeShift(nn.Module):
    """Time-dependent per-channel shift (HiDiff's TB and the shifts of TA): ``x + b(t)``.

    ``b(t) = Linear(SiLU(emb))``, zero-initialised. ``x [B, C, H, W]``, ``emb [B, emb_dim]``.
    """

    def __init__(self, emb_dim: int, channels: int) -> None:
        super().__init__()
        self.bias = _time_mlp(emb_dim, channels)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        return x + self.bias(emb)[:, :, None, None].expand_as(x)


class TimeRPReLU(nn.Module):
    """RPReLU on tokens with time shifts: ``PReLU(x + b1(t)) + b2(t)``; ``x [B, N, C]``."""

    def __init__(self, emb_dim: int, channels: int) -> None:
        super().__init__()
        self.move1 = _time_mlp(emb_dim, channels)
        self.prelu = nn.PReLU(channels)
        self.move2 = _time_mlp(emb_dim, channels)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        shifted = (x + self.move1(emb).unsqueeze(1)).transpose(-1, -2)
        return self.prelu(shifted).transpose(-1, -2) + self.move2(emb).unsqueeze(1)


class TimeLayerScale(nn.Module):
    """Time-dependent scale and shift on tokens: ``x·a(t) + c(t)``; both zero at init. ``x [B, N, C]``."""

    def __init__(self, emb_dim: int, channels: int) -> None:
        super().__init__()
        self.alpha = _time_mlp(emb_dim, channels)
        self.move = _time_mlp(emb_dim, channels)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        return x * self.alpha(emb).unsqueeze(1) + self.move(emb).unsqueeze(1)


class _TokenBatchNorm(nn.BatchNorm1d):
    """BatchNorm over the channel axis of tokens ``[B, N, C]`` (same keys as ``BatchNorm1d``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return super().forward(x.transpose(-1, -2)).transpose(-1, -2)


# ------------------------------------------------------------------------------- conv blocks
class BiBasic(nn.Module):
    """Binary basic block (spec §2.3): ``TA(BN(conv(sign(TB(x)))) + residual)``.

    ``TB`` = ``move1``; ``TA`` = ``move2 -> PReLU -> move3``. The residual is ``x`` when
    ``in_channels == out_channels``, else the mean of adjacent channel pairs (needs
    ``in_channels == 2·out_channels``). ``upsample=True`` first doubles H and W (nearest).
    With ``binary=False`` there is no sign and the conv is real-valued.

    Args:
        emb_dim: time-embedding width.
        in_channels, out_channels: channel counts.
        binary: binary (True) or real-valued (False) variant.
        upsample: nearest x2 upsampling before the block.
    """

    def __init__(
        self, emb_dim: int, in_channels: int, out_channels: int, binary: bool = True, upsample: bool = False
    ) -> None:
        super().__init__()
        if in_channels != out_channels and in_channels != 2 * out_channels:
            raise ValueError(f"in_channels must equal out_channels or twice it, got {in_channels}->{out_channels}")
        self.binary = bool(binary)
        self.upsample = bool(upsample)
        self.pair_residual = in_channels != out_channels
        self.move1 = TimeShift(emb_dim, in_channels)
        self.binary_3x3 = BinaryConv2d(in_channels, out_channels, 3, 1, 1, binary=binary)
        self.bn = nn.BatchNorm2d(out_channels)
        self.move2 = TimeShift(emb_dim, out_channels)
        self.prelu = nn.PReLU(out_channels)
        self.move3 = TimeShift(emb_dim, out_channels)

    def _act(self, x: torch.Tensor) -> torch.Tensor:
        return binary_sign(x) if self.binary else x

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if self.upsample:
            x = F.interpolate(x, scale_factor=2, mode="nearest")
        out = self.bn(self.binary_3x3(self._act(self.move1(x, emb))))
        out = out + (_pair_mean(x) if self.pair_residual else x)
        return self.move3(self.prelu(self.move2(out, emb)), emb)


class BiUp(BiBasic):
    """:class:`BiBasic` after a nearest x2 upsampling (same arguments, ``upsample`` fixed to True)."""

    def __init__(self, emb_dim: int, in_channels: int, out_channels: int, binary: bool = True) -> None:
        super().__init__(emb_dim, in_channels, out_channels, binary=binary, upsample=True)


class BiDown(nn.Module):
    """Binary downsampling block: ``r = out/in`` parallel stride-2 convs on ``sign(TB(x))``.

    Branch ``i``: ``BN_i(conv_i(.)) + AvgPool2(x)``; branches are concatenated, then TA.
    ``out_channels`` must be ``in_channels`` or ``2·in_channels``. Halves H and W.
    """

    def __init__(self, emb_dim: int, in_channels: int, out_channels: int, binary: bool = True) -> None:
        super().__init__()
        if out_channels not in (in_channels, 2 * in_channels):
            raise ValueError(f"out_channels must be in_channels or twice it, got {in_channels}->{out_channels}")
        self.binary = bool(binary)
        self.move1 = TimeShift(emb_dim, in_channels)
        branches = out_channels // in_channels
        self.binary_3x3 = nn.ModuleList(
            [BinaryConv2d(in_channels, in_channels, 3, 2, 1, binary=binary) for _ in range(branches)]
        )
        self.bn = nn.ModuleList([nn.BatchNorm2d(in_channels) for _ in range(branches)])
        self.move2 = TimeShift(emb_dim, out_channels)
        self.prelu = nn.PReLU(out_channels)
        self.move3 = TimeShift(emb_dim, out_channels)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        out = self.move1(x, emb)
        if self.binary:
            out = binary_sign(out)
        pooled = F.avg_pool2d(x, 2, 2)
        out = torch.cat([bn(conv(out)) + pooled for conv, bn in zip(self.binary_3x3, self.bn)], dim=1)
        return self.move3(self.prelu(self.move2(out, emb)), emb)


class CondResBlock(nn.Module):
    """Full-precision ResBlock with FiLM time conditioning (guided-diffusion style).

    ``h = conv3(GN·SiLU(x))``; ``h = conv3_zero(SiLU(GN(h)·(1+scale(t)) + shift(t)))``;
    returns ``skip(x) + h`` with a 1x1 conv skip when the width changes. GroupNorm uses 32
    groups, so both channel counts must be divisible by 32.
    """

    def __init__(self, in_channels: int, emb_dim: int, out_channels: int) -> None:
        super().__init__()
        for c in (in_channels, out_channels):
            if c % 32:
                raise ValueError(f"CondResBlock channels must be divisible by 32 (GroupNorm), got {c}")
        self.in_layers = nn.Sequential(
            nn.GroupNorm(32, in_channels), nn.SiLU(), nn.Conv2d(in_channels, out_channels, 3, padding=1)
        )
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, 2 * out_channels))
        out_conv = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        nn.init.zeros_(out_conv.weight)
        nn.init.zeros_(out_conv.bias)
        self.out_layers = nn.Sequential(nn.GroupNorm(32, out_channels), nn.SiLU(), out_conv)
        self.skip_connection = nn.Identity() if in_channels == out_channels else nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x)
        scale, shift = torch.chunk(self.emb_layers(emb)[:, :, None, None], 2, dim=1)
        h = self.out_layers[0](h) * (1 + scale) + shift
        h = self.out_layers[2](self.out_layers[1](h))
        return self.skip_connection(x) + h


class Fuse(nn.Module):
    """Segmentor-feature fusion (the official ``ConcatLayer``).

    The feature goes through a full-precision :class:`CondResBlock` to ``channels``, is
    concatenated after ``h`` (``2·channels``), then a binary 3x3 conv back to ``channels`` with
    a channel-pair-mean residual of the concatenation, and TA. ``feat [B, cond_dim, H, W]``,
    ``h [B, channels, H, W]`` -> ``[B, channels, H, W]``.
    """

    def __init__(self, cond_dim: int, channels: int, emb_dim: int, binary: bool = True) -> None:
        super().__init__()
        self.binary = bool(binary)
        self.condition_conv = CondResBlock(cond_dim, emb_dim, channels)
        self.move1 = TimeShift(emb_dim, 2 * channels)
        self.binary_3x3 = BinaryConv2d(2 * channels, channels, 3, 1, 1, binary=binary)
        self.bn = nn.BatchNorm2d(channels)
        self.move2 = TimeShift(emb_dim, channels)
        self.prelu = nn.PReLU(channels)
        self.move3 = TimeShift(emb_dim, channels)

    def forward(self, feat: torch.Tensor, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        x = torch.cat([h, self.condition_conv(feat, emb)], dim=1)
        out = self.move1(x, emb)
        if self.binary:
            out = binary_sign(out)
        out = self.bn(self.binary_3x3(out)) + _pair_mean(x)
        return self.move3(self.prelu(self.move2(out, emb)), emb)


# --------------------------------------------------------------------------------- X-Former
class _CrossAttention(nn.Module):
    """(Binary) cross-attention: queries from ``q_tokens``, keys/values from ``kv_tokens`` (spec §3)."""

    def __init__(self, dim: int, emb_dim: int, num_heads: int, threshold: float, binary: bool) -> None:
        super().__init__()
        self.binary = bool(binary)
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.threshold = threshold
        self.moveq1 = _time_mlp(emb_dim, dim)
        self.movek1 = _time_mlp(emb_dim, dim)
        self.movev1 = _time_mlp(emb_dim, dim)
        self.query1 = BinaryLinear(dim, dim, binary=binary)
        self.key1 = BinaryLinear(dim, dim, binary=binary)
        self.value1 = BinaryLinear(dim, dim, binary=binary)
        self.normq1 = _TokenBatchNorm(dim)
        self.normk1 = _TokenBatchNorm(dim)
        self.normv1 = _TokenBatchNorm(dim)
        self.rpreluq1 = TimeRPReLU(emb_dim, dim)
        self.rpreluk1 = TimeRPReLU(emb_dim, dim)
        self.rpreluv1 = TimeRPReLU(emb_dim, dim)
        self.moveq2 = _time_mlp(emb_dim, dim)
        self.movek2 = _time_mlp(emb_dim, dim)
        self.movev2 = _time_mlp(emb_dim, dim)
        self.norm_context = _TokenBatchNorm(dim)
        self.rprelu_context = TimeRPReLU(emb_dim, dim)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        return x.view(b, n, self.num_heads, self.head_dim).permute(0, 2, 1, 3)

    def _attention(self, scores: torch.Tensor) -> torch.Tensor:
        if not self.binary:
            return torch.softmax(scores, dim=-1)
        # 1 where a score exceeds threshold x its row maximum; softmax gradient (straight-through).
        mask = ((scores - self.threshold * scores.amax(dim=-1, keepdim=True)) > 0).to(scores.dtype)
        if torch.is_grad_enabled() and scores.requires_grad:
            soft = torch.softmax(scores, dim=-1)
            return soft - soft.detach() + mask
        return mask

    def forward(self, kv_tokens: torch.Tensor, q_tokens: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        mq = self.normq1(self.query1(q_tokens + self.moveq1(emb).unsqueeze(1))) + q_tokens
        mk = self.normk1(self.key1(kv_tokens + self.movek1(emb).unsqueeze(1))) + kv_tokens
        mv = self.normv1(self.value1(kv_tokens + self.movev1(emb).unsqueeze(1))) + kv_tokens
        mq = self.rpreluq1(mq, emb)
        mk = self.rpreluk1(mk, emb)
        mv = self.rpreluv1(mv, emb)
        q = mq + self.moveq2(emb).unsqueeze(1)
        k = mk + self.movek2(emb).unsqueeze(1)
        v = mv + self.movev2(emb).unsqueeze(1)
        if self.binary:
            q, k, v = binary_sign(q), binary_sign(k), binary_sign(v)
        scores = torch.matmul(self._heads(q), self._heads(k).transpose(-1, -2)) / math.sqrt(self.head_dim)
        context = torch.matmul(self._attention(scores), self._heads(v))
        b, n = q_tokens.shape[:2]
        context = context.permute(0, 2, 1, 3).contiguous().view(b, n, -1)
        context = self.norm_context(context) + mq + mk + mv
        return self.rprelu_context(context, emb)


class _LayerScaleBlock(nn.Module):
    """``TimeLayerScale(RPReLU(BN(linear(x + b(t))) + x))`` on tokens (official ``LayerScaleModule``)."""

    def __init__(self, dim: int, emb_dim: int, binary: bool) -> None:
        super().__init__()
        self.dense = BinaryLinear(dim, dim, binary=binary)
        self.move = _time_mlp(emb_dim, dim)
        self.norm = _TokenBatchNorm(dim)
        self.rprelu = TimeRPReLU(emb_dim, dim)
        self.layerscale = TimeLayerScale(emb_dim, dim)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        out = self.norm(self.dense(x + self.move(emb).unsqueeze(1))) + x
        return self.layerscale(self.rprelu(out, emb), emb)


class _FFNExpand(nn.Module):
    """``RPReLU(BN(linear(x + b(t))) + tile4(x))``: ``[B, N, E] -> [B, N, 4E]``."""

    def __init__(self, dim: int, emb_dim: int, ratio: int, binary: bool) -> None:
        super().__init__()
        self.ratio = ratio
        self.dense = BinaryLinear(dim, dim * ratio, binary=binary)
        self.move = _time_mlp(emb_dim, dim)
        self.norm = _TokenBatchNorm(dim * ratio)
        self.rprelu = TimeRPReLU(emb_dim, dim * ratio)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        out = self.norm(self.dense(x + self.move(emb).unsqueeze(1))) + torch.cat([x] * self.ratio, dim=-1)
        return self.rprelu(out, emb)


class _FFNReduce(nn.Module):
    """``LayerScale(RPReLU(BN(linear(x + b(t))) + avgpool4(x)))``: ``[B, N, 4E] -> [B, N, E]``."""

    def __init__(self, dim: int, emb_dim: int, ratio: int, binary: bool) -> None:
        super().__init__()
        self.ratio = ratio
        self.dense = BinaryLinear(dim * ratio, dim, binary=binary)
        self.move = _time_mlp(emb_dim, dim * ratio)
        self.norm = _TokenBatchNorm(dim)
        self.rprelu = TimeRPReLU(emb_dim, dim)
        self.layerscale = TimeLayerScale(emb_dim, dim)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        out = self.norm(self.dense(x + self.move(emb).unsqueeze(1))) + F.avg_pool1d(x, self.ratio)
        return self.layerscale(self.rprelu(out, emb), emb)


class _FFN(nn.Module):
    """Residual + BN, expand/reduce MLP, plus four time-scaled strip-average mixers over the token grid."""

    def __init__(self, dim: int, emb_dim: int, ratio: int, binary: bool) -> None:
        super().__init__()
        self.layernorm_before = _TokenBatchNorm(dim)  # present in the official layout, unused
        self.layernorm_after = _TokenBatchNorm(dim)
        self.intermediate = _FFNExpand(dim, emb_dim, ratio, binary)
        self.output = _FFNReduce(dim, emb_dim, ratio, binary)
        self.layerscale_w5 = TimeLayerScale(emb_dim, dim)
        self.layerscale_h5 = TimeLayerScale(emb_dim, dim)
        self.layerscale_w3 = TimeLayerScale(emb_dim, dim)
        self.layerscale_h3 = TimeLayerScale(emb_dim, dim)

    def forward(
        self, hidden: torch.Tensor, attention: torch.Tensor, emb: torch.Tensor, grid: tuple[int, int]
    ) -> torch.Tensor:
        hidden = attention + hidden
        normed = self.layernorm_after(hidden)
        out = self.output(self.intermediate(normed, emb), emb) + hidden
        b, n, c = normed.shape
        fmap = normed.permute(0, 2, 1).reshape(b, c, grid[0], grid[1])
        mixers = ((3, self.layerscale_h3, self.layerscale_w3), (5, self.layerscale_h5, self.layerscale_w5))
        for size, scale_h, scale_w in mixers:
            pad = (size - 1) // 2
            mixed_h = F.avg_pool2d(fmap, (size, 1), stride=1, padding=(pad, 0))
            mixed_w = F.avg_pool2d(fmap, (1, size), stride=1, padding=(0, pad))
            out = out + scale_h(mixed_h.reshape(b, c, n).permute(0, 2, 1), emb)
            out = out + scale_w(mixed_w.reshape(b, c, n).permute(0, 2, 1), emb)
        return out


class XFormer(nn.Module):
    """HiDiff's (binary) X-Former at the refiner bottleneck (the official ``CrossAttentionLayer``).

    The deepest segmentor feature goes through a :class:`CondResBlock` to ``dim``; both maps
    become tokens (row-major positions). Block 1 updates the segmentor stream (queries from
    the refiner tokens), block 2 updates the refiner stream (queries from the updated
    segmentor tokens); only the refiner stream is returned, as a map.

    Args:
        cond_dim: channels of the segmentor feature.
        dim: refiner channels ``E`` at the bottleneck.
        emb_dim: time-embedding width.
        num_heads: attention heads (4).
        ffn_ratio: FFN expansion (4).
        threshold: binary attention keeps scores above ``threshold x row max`` (0.35).
        binary: binary (True) or real-valued (False, softmax attention, float linears).
        legacy_token_order: reshape the output tokens ``[B, N, E]`` straight to ``[B, E, H, W]``
            as the official code does (scrambles positions and channels); only for official
            weights. False (default) transposes first.

    ``forward(feat [B, cond_dim, h, w], x [B, dim, h, w], emb) -> [B, dim, h, w]``.
    """

    def __init__(
        self,
        cond_dim: int,
        dim: int,
        emb_dim: int,
        num_heads: int = 4,
        ffn_ratio: int = 4,
        threshold: float = 0.35,
        binary: bool = True,
        legacy_token_order: bool = False,
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} must be divisible by num_heads {num_heads}")
        self.legacy_token_order = bool(legacy_token_order)
        self.condition_conv = CondResBlock(cond_dim, emb_dim, dim)
        self.norm_condition1 = _TokenBatchNorm(dim)
        self.norm_embedding1 = _TokenBatchNorm(dim)
        self.cross_attention1 = _CrossAttention(dim, emb_dim, num_heads, threshold, binary)
        self.layerscale1 = _LayerScaleBlock(dim, emb_dim, binary)
        self.fnn1 = _FFN(dim, emb_dim, ffn_ratio, binary)
        self.norm_condition2 = _TokenBatchNorm(dim)
        self.norm_embedding2 = _TokenBatchNorm(dim)
        self.cross_attention2 = _CrossAttention(dim, emb_dim, num_heads, threshold, binary)
        self.layerscale2 = _LayerScaleBlock(dim, emb_dim, binary)
        self.fnn2 = _FFN(dim, emb_dim, ffn_ratio, binary)

    def forward(self, feat: torch.Tensor, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        cond = self.condition_conv(feat, emb)
        b, c, h, w = x.shape
        if cond.shape[2:] != x.shape[2:]:
            raise ValueError(f"segmentor feature {tuple(cond.shape[2:])} and bottleneck {(h, w)} differ in size")
        cond_tokens0 = cond.flatten(2).transpose(1, 2)
        x_tokens0 = x.flatten(2).transpose(1, 2)
        cond_tokens = self.norm_condition1(cond_tokens0)
        x_tokens = self.norm_embedding1(x_tokens0)

        cond_tokens = self.cross_attention1(cond_tokens, x_tokens, emb)
        cond_tokens = self.fnn1(cond_tokens0, self.layerscale1(cond_tokens, emb), emb, (h, w))

        cond_tokens = self.norm_condition2(cond_tokens)
        x_tokens = self.norm_embedding2(x_tokens)
        x_tokens = self.cross_attention2(x_tokens, cond_tokens, emb)
        x_tokens = self.fnn2(x_tokens0, self.layerscale2(x_tokens, emb), emb, (h, w))

        if self.legacy_token_order:
            return x_tokens.reshape(b, c, h, w).contiguous()
        return x_tokens.transpose(1, 2).reshape(b, c, h, w)


# ---------------------------------------------------------------------------------- refiner
def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding ``[B] -> [B, dim]``: ``[cos(t·f_i), sin(t·f_i)]`` with ``f_i = max_period^(-i/(dim/2))``."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half).to(t.device)
    args = t[:, None].float() * freqs[None]
    out = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        out = torch.cat([out, torch.zeros_like(out[:, :1])], dim=-1)
    return out


class BBDMRefiner(nn.Module):
    """HiDiff's BBDM refiner ``g``: a 5-level time-conditioned (binary) U-Net that predicts
    the Bernoulli flip noise of ``y_t`` (T. Chen et al., "HiDiff: Hybrid Diffusion Framework
    for Medical Image Segmentation", IEEE TMI 2024; official ``BBDM_binary.UNetModel``).

    Input ``cat([img, y_t, prior])`` -> full-precision stem -> five encoder levels of
    :class:`BiBasic`/:class:`BiDown` (segmentor features fused at H/4, H/8, H/16 by
    :class:`Fuse`) -> bottleneck ``BiBasic, XFormer(feat at H/32), BiBasic`` -> five decoder
    levels (:class:`BiUp` + skip concat + :class:`BiBasic`) -> ``GroupNorm·SiLU·conv3x3`` head
    (zero-initialised). Widths ``m, m, 2m, 2m, 4m`` with ``m = width``; time embedding
    ``4m``.

    Args:
        img_channels: image channels ``C_img`` (1 for CT/MRI, 3 for RGB). Default 1.
        num_classes: mask channels ``K`` (independent Bernoulli channels, background included
            for multi-class data). Default 9.
        condition_dims: channels of the four segmentor features at H/4, H/8, H/16, H/32, each
            divisible by 32. Default ``(96, 192, 384, 768)``.
        width: base width ``m``, divisible by 32. Default 128 (the paper's).
        binary: binarised weights and activations (HiDiff) or the real-valued twin. Same
            state_dict keys either way. Default True.
        legacy_token_order: reproduce the official X-Former output reshape without a transpose
            (needed only for official weights). Default False.
        num_heads: X-Former heads. Default 4.
        attention_threshold: binary attention threshold (fraction of the row max). Default 0.35.

    Contract: ``forward(y_t [B,K,H,W], t [B] long, img [B,C_img,H,W], prior [B,K,H,W],
    feats [f0..f3]) -> eps logits [B,K,H,W]``. ``sigmoid(logits)`` is ``eps_hat``, the
    probability that each bit of ``y_t`` is flipped relative to ``y0`` (the official network
    returns that sigmoid; the logits are returned here so that the loss and the calibration
    ``y0_hat = |y_t - eps_hat|`` stay numerically stable, see
    :meth:`MedSegSuiteLib.networks.bbdm.BBDM.calibrate_logits`). ``y_t`` is ``{0,1}``-valued,
    ``prior`` in ``[0,1]``, ``t`` the raw step index (not rescaled). ``H`` and ``W`` must be
    divisible by 32; ``f_i`` has ``condition_dims[i]`` channels at ``H/2^(i+2)``. The Predictor's
    logits contract does not apply (this is not a segmentor). Use ``eval()`` for inference
    (BatchNorm everywhere); in eval mode the binarised weights are cached.
    """

    def __init__(
        self,
        img_channels: int = 1,
        num_classes: int = 9,
        condition_dims: Sequence[int] = (96, 192, 384, 768),
        width: int = 128,
        binary: bool = True,
        legacy_token_order: bool = False,
        num_heads: int = 4,
        attention_threshold: float = 0.35,
    ) -> None:
        super().__init__()
        if img_channels < 1:
            raise ValueError(f"img_channels must be >= 1, got {img_channels}")
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        condition_dims = tuple(int(c) for c in condition_dims)
        if len(condition_dims) != 4 or any(c < 1 or c % 32 for c in condition_dims):
            raise ValueError(f"condition_dims needs 4 positive multiples of 32, got {condition_dims}")
        if width < 32 or width % 32:
            raise ValueError(f"width must be a positive multiple of 32 (GroupNorm), got {width}")
        if (4 * width) % num_heads:
            raise ValueError(f"4*width={4 * width} must be divisible by num_heads={num_heads}")
        self.img_channels = img_channels
        self.num_classes = num_classes
        self.condition_dims = condition_dims
        self.width = width
        self.binary = bool(binary)
        self.model_channels = width
        emb_dim = 4 * width
        self.emb_dim = emb_dim

        self.time_embed = nn.Sequential(nn.Linear(width, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.input_conv = nn.Conv2d(img_channels + 2 * num_classes, width, 3, stride=1, padding=1)
        self._build_encoder(width, emb_dim, condition_dims)
        self._build_middle(width, emb_dim, condition_dims[3], num_heads, attention_threshold, legacy_token_order)
        self._build_decoder(width, emb_dim)
        out_conv = nn.Conv2d(width, num_classes, 3, padding=1)
        nn.init.zeros_(out_conv.weight)
        nn.init.zeros_(out_conv.bias)
        self.out = nn.Sequential(nn.GroupNorm(32, width), nn.SiLU(), out_conv)

    def _build_encoder(self, m: int, emb: int, cond: tuple[int, ...]) -> None:
        b = self.binary
        self.block1_conv = BiBasic(emb, m, m, b)
        self.block1_down = BiDown(emb, m, m, b)
        self.block2_conv = BiBasic(emb, m, m, b)
        self.block2_down = BiDown(emb, m, 2 * m, b)
        self.block3_conv = BiBasic(emb, 2 * m, 2 * m, b)
        self.concat1 = Fuse(cond[0], 2 * m, emb, b)
        self.block3_down = BiDown(emb, 2 * m, 2 * m, b)
        self.block4_conv = BiBasic(emb, 2 * m, 2 * m, b)
        self.concat2 = Fuse(cond[1], 2 * m, emb, b)
        self.block4_down = BiDown(emb, 2 * m, 4 * m, b)
        self.block5_conv = BiBasic(emb, 4 * m, 4 * m, b)
        self.concat3 = Fuse(cond[2], 4 * m, emb, b)
        self.block5_down = BiDown(emb, 4 * m, 4 * m, b)

    def _build_middle(self, m: int, emb: int, cond3: int, heads: int, thr: float, legacy: bool) -> None:
        b = self.binary
        self.middle_block1 = BiBasic(emb, 4 * m, 4 * m, b)
        self.cross1 = XFormer(cond3, 4 * m, emb, heads, 4, thr, b, legacy)
        self.middle_block2 = BiBasic(emb, 4 * m, 4 * m, b)

    def _build_decoder(self, m: int, emb: int) -> None:
        b = self.binary
        self.up_block1_up = BiUp(emb, 4 * m, 4 * m, b)
        self.up_block1_conv = BiBasic(emb, 8 * m, 4 * m, b)
        self.up_block2_up = BiUp(emb, 4 * m, 2 * m, b)
        self.up_block2_conv = BiBasic(emb, 4 * m, 2 * m, b)
        self.up_block3_up = BiUp(emb, 2 * m, 2 * m, b)
        self.up_block3_conv = BiBasic(emb, 4 * m, 2 * m, b)
        self.up_block4_up = BiUp(emb, 2 * m, m, b)
        self.up_block4_conv = BiBasic(emb, 2 * m, m, b)
        self.up_block5_up = BiUp(emb, m, m, b)
        self.up_block5_conv = BiBasic(emb, 2 * m, m, b)

    @property
    def legacy_token_order(self) -> bool:
        """Whether the X-Former reproduces the official output reshape."""
        return self.cross1.legacy_token_order

    @legacy_token_order.setter
    def legacy_token_order(self, value: bool) -> None:
        self.cross1.legacy_token_order = bool(value)

    def clear_binary_cache(self) -> None:
        """Drop every cached binarised weight (needed only after edits through ``param.data``)."""
        for module in self.modules():
            if isinstance(module, _CachedBinaryWeight):
                module.clear_binary_cache()

    def _check_inputs(
        self, y_t: torch.Tensor, t: torch.Tensor, img: torch.Tensor, prior: torch.Tensor, feats: Sequence[torch.Tensor]
    ) -> None:
        if y_t.dim() != 4 or y_t.shape[1] != self.num_classes:
            raise ValueError(f"y_t must be [B, {self.num_classes}, H, W], got {tuple(y_t.shape)}")
        b, _, h, w = y_t.shape
        if h % 32 or w % 32:
            raise ValueError(f"H and W must be divisible by 32, got {h}x{w}")
        if prior.shape != y_t.shape:
            raise ValueError(f"prior must have y_t's shape {tuple(y_t.shape)}, got {tuple(prior.shape)}")
        if img.shape != (b, self.img_channels, h, w):
            raise ValueError(f"img must be [{b}, {self.img_channels}, {h}, {w}], got {tuple(img.shape)}")
        if t.shape != (b,):
            raise ValueError(f"t must be a [B={b}] tensor of step indices, got {tuple(t.shape)}")
        if len(feats) != 4:
            raise ValueError(f"feats must hold 4 maps (H/4..H/32), got {len(feats)}")
        for i, (f, c) in enumerate(zip(feats, self.condition_dims)):
            s = 2 ** (i + 2)
            if tuple(f.shape) != (b, c, h // s, w // s):
                raise ValueError(f"feats[{i}] must be [{b}, {c}, {h // s}, {w // s}], got {tuple(f.shape)}")

    def forward(
        self,
        y_t: torch.Tensor,
        t: torch.Tensor,
        img: torch.Tensor,
        prior: torch.Tensor,
        feats: Sequence[torch.Tensor],
    ) -> torch.Tensor:
        if t.dim() == 0:
            t = t.expand(y_t.shape[0])
        self._check_inputs(y_t, t, img, prior, feats)
        emb = self.time_embed(timestep_embedding(t, self.width).to(self.input_conv.weight.dtype))
        h = self.input_conv(torch.cat([img, y_t, prior], dim=1).to(self.input_conv.weight.dtype))
        skips = []
        h = self.block1_conv(h, emb)
        skips.append(h)
        h = self.block2_conv(self.block1_down(h, emb), emb)
        skips.append(h)
        h = self.block3_conv(self.block2_down(h, emb), emb)
        h = self.concat1(feats[0], h, emb)
        skips.append(h)
        h = self.block4_conv(self.block3_down(h, emb), emb)
        h = self.concat2(feats[1], h, emb)
        skips.append(h)
        h = self.block5_conv(self.block4_down(h, emb), emb)
        h = self.concat3(feats[2], h, emb)
        skips.append(h)
        h = self.middle_block1(self.block5_down(h, emb), emb)
        h = self.middle_block2(self.cross1(feats[3], h, emb), emb)
        for level in range(1, 6):
            up = getattr(self, f"up_block{level}_up")
            conv = getattr(self, f"up_block{level}_conv")
            h = conv(torch.cat([up(h, emb), skips.pop()], dim=1), emb)
        return self.out(h)


# -------------------------------------------------------------------------------- segmentor
@runtime_checkable
class FeatureSegmentor(Protocol):
    """A segmentor that can condition the BBDM refiner.

    ``feature_dims``: channels of the four feature maps; ``num_classes``: ``K``.
    ``features_and_logits(x [B, C, H, W]) -> ([f0, f1, f2, f3], logits [B, K, H, W])`` with
    ``f_i`` of shape ``[B, feature_dims[i], H/2^(i+2), W/2^(i+2)]`` (H, W divisible by 32).
    The refiner's prior is ``MedSegSuiteLib.networks.bbdm.prior_from_logits(logits)``.
    """

    feature_dims: tuple[int, int, int, int]
    num_classes: int

    def features_and_logits(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]: ...


class HiDiffSegmentor(nn.Module):
    """Default 2D U-Net prior for HiDiff (the paper's Fig. 12 uses a U-Net prior; its MERIT
    segmentor is unreleased). Satisfies :class:`FeatureSegmentor`.

    Six levels (H .. H/32) of MONAI ``UnetBasicBlock`` (conv-norm-LeakyReLU x2; stride 2 to go
    down), ``UnetUpBlock`` decoders (transposed conv, skip concat, basic block) and a 1x1 head.
    The refiner features are the decoder outputs at H/4, H/8, H/16 and the bottleneck at H/32.

    Args:
        in_channels: image channels. Default 1.
        num_classes: logit channels ``K`` (background included when ``K > 1``). Default 9.
        features: six widths for H, H/2, H/4, H/8, H/16, H/32; the last four are the feature
            dims handed to the refiner. Default ``(32, 64, 96, 192, 384, 768)``.
        norm: MONAI norm name or ``(name, kwargs)``. Default ``("group", {"num_groups": 8})``:
            batch-size independent and defined on the 1x1 bottleneck of a 32x32 input, where
            instance norm is not; with it every width must be divisible by ``num_groups``.
        dropout: dropout inside the blocks. Default 0.0.

    ``forward(x [B, C, H, W]) -> logits [B, K, H, W]`` (Predictor contract, no activation);
    ``features_and_logits(x)`` also returns the four maps. H and W must be divisible by 32.
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 9,
        features: Sequence[int] = (32, 64, 96, 192, 384, 768),
        norm: Union[str, tuple] = ("group", {"num_groups": 8}),
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        features = tuple(int(f) for f in features)
        if in_channels < 1 or num_classes < 1:
            raise ValueError("in_channels and num_classes must be positive")
        if len(features) != 6 or any(f < 1 for f in features):
            raise ValueError(f"features needs 6 positive widths, got {features}")
        if isinstance(norm, (tuple, list)) and str(norm[0]).lower() == "group":
            groups = int(norm[1].get("num_groups", 1)) if len(norm) > 1 else 1
            if any(f % groups for f in features):
                raise ValueError(f"with group norm every width must be divisible by {groups}, got {features}")
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.features = features
        self.feature_dims: tuple[int, int, int, int] = features[2:6]  # type: ignore[assignment]
        self._build_encoder(in_channels, features, norm, dropout)
        self._build_decoder(features, norm, dropout)
        self.head = UnetOutBlock(2, features[0], num_classes)

    def _build_encoder(self, cin: int, f: tuple[int, ...], norm: Union[str, tuple], dropout: float) -> None:
        chans = (cin,) + f
        self.encoder = nn.ModuleList(
            [
                UnetBasicBlock(2, chans[i], chans[i + 1], 3, 1 if i == 0 else 2, norm_name=norm, dropout=dropout)
                for i in range(6)
            ]
        )

    def _build_decoder(self, f: tuple[int, ...], norm: Union[str, tuple], dropout: float) -> None:
        self.decoder = nn.ModuleList(
            [UnetUpBlock(2, f[i + 1], f[i], 3, 1, 2, norm_name=norm, dropout=dropout) for i in (4, 3, 2, 1, 0)]
        )

    def features_and_logits(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """``x [B, C, H, W]`` -> (``[f0 (H/4), f1 (H/8), f2 (H/16), f3 (H/32)]``, logits ``[B, K, H, W]``)."""
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"x must be [B, {self.in_channels}, H, W], got {tuple(x.shape)}")
        if x.shape[2] % 32 or x.shape[3] % 32:
            raise ValueError(f"H and W must be divisible by 32, got {x.shape[2]}x{x.shape[3]}")
        skips = []
        h = x
        for block in self.encoder:
            h = block(h)
            skips.append(h)
        decoded = [h]
        for block, skip in zip(self.decoder, reversed(skips[:-1])):
            h = block(h, skip)
            decoded.append(h)
        # decoded: H/32 (bottleneck), H/16, H/8, H/4, H/2, H
        feats = [decoded[3], decoded[2], decoded[1], decoded[0]]
        return feats, self.head(h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features_and_logits(x)[1]
