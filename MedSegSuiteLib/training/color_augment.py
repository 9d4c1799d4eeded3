"""Strong colour augmentation of ConDSeg stage 1, in plain torch (no torchvision).

The official stage-1 recipe applies, to the whole batch, a colour jitter (brightness 0.3, contrast
0.3, saturation 0.3, hue 0.1, the four in random order), a random grayscale (p = 0.5) and a Gaussian
blur with a (1, 7) kernel (width 1, height 7: a vertical blur) and sigma in [0.1, 3]. The official
code drew **one** set of random parameters for the whole batch; :func:`strong_color_augment` draws
them per image by default (``per_sample=True``) and takes a ``torch.Generator`` so a run is
reproducible.

All functions take ``[B, 3, H, W]`` RGB images in [0, 1] (on any device) and per-image factors of
shape ``[B]``, and return new tensors of the same shape in [0, 1]. Input must be RGB: the grey and
hue conversions use the RGB luma weights (0.299, 0.587, 0.114).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import torch
import torch.nn.functional as F

__all__ = [
    "adjust_brightness",
    "adjust_contrast",
    "adjust_hue",
    "adjust_saturation",
    "gaussian_blur",
    "rgb_to_grey",
    "strong_color_augment",
]

_LUMA = (0.299, 0.587, 0.114)


def _check(images: torch.Tensor) -> None:
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"expected RGB images [B, 3, H, W], got {tuple(images.shape)}")
    if not images.is_floating_point():
        raise ValueError("expected floating-point images in [0, 1]")


def _per_image(factor: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    return factor.to(images.device, images.dtype).reshape(-1, 1, 1, 1)


def _blend(images: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    f = _per_image(factor, images)
    return (f * images + (1.0 - f) * other).clamp(0.0, 1.0)


def rgb_to_grey(images: torch.Tensor) -> torch.Tensor:
    """Luma ``0.299 R + 0.587 G + 0.114 B`` of ``[B, 3, H, W]`` images, as ``[B, 1, H, W]``."""
    _check(images)
    w = images.new_tensor(_LUMA).view(1, 3, 1, 1)
    return (images * w).sum(dim=1, keepdim=True)


def adjust_brightness(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Scale intensities by ``factor[b]`` (1 = unchanged), clipped to [0, 1]."""
    _check(images)
    return _blend(images, torch.zeros_like(images), factor)


def adjust_contrast(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Blend each image with its mean grey level by ``factor[b]`` (1 = unchanged, 0 = flat grey)."""
    _check(images)
    mean = rgb_to_grey(images).mean(dim=(1, 2, 3), keepdim=True)
    return _blend(images, mean.expand_as(images), factor)


def adjust_saturation(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Blend each image with its grey version by ``factor[b]`` (1 = unchanged, 0 = grey)."""
    _check(images)
    return _blend(images, rgb_to_grey(images).expand_as(images), factor)


def adjust_hue(images: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate the hue by ``shift[b]`` turns (in [-0.5, 0.5]; 1/3 maps red to green), keeping S and V."""
    _check(images)
    r, g, b = images.unbind(dim=1)
    value, argmax = images.max(dim=1)
    chroma = value - images.min(dim=1).values
    safe = torch.where(chroma > 0, chroma, torch.ones_like(chroma))
    # hue in sixths of a turn, from the channel holding the maximum
    hue_r = ((g - b) / safe) % 6.0
    hue_g = (b - r) / safe + 2.0
    hue_b = (r - g) / safe + 4.0
    hue = torch.where(argmax == 0, hue_r, torch.where(argmax == 1, hue_g, hue_b))
    hue = torch.where(chroma > 0, hue, torch.zeros_like(hue))
    hue = (hue / 6.0 + _per_image(shift, images)[:, 0]) % 1.0
    # back to RGB: channel n takes value - chroma * clamp(min(k, 4 - k), 0, 1), k = (n + 6 * hue) mod 6
    offsets = images.new_tensor([5.0, 3.0, 1.0]).view(1, 3, 1, 1)
    k = (offsets + 6.0 * hue.unsqueeze(1)) % 6.0
    ramp = torch.minimum(k, 4.0 - k).clamp(0.0, 1.0)
    return (value.unsqueeze(1) - chroma.unsqueeze(1) * ramp).clamp(0.0, 1.0)


def gaussian_blur(images: torch.Tensor, sigma: torch.Tensor, kernel_size: Sequence[int] = (1, 7)) -> torch.Tensor:
    """Separable Gaussian blur with per-image ``sigma[b]`` (pixels) and ``kernel_size = (width, height)``.

    Odd kernel sizes; reflect padding (sizes must be smaller than the image); the kernel sums to 1.
    """
    _check(images)
    kx, ky = (int(k) for k in kernel_size)
    if kx < 1 or ky < 1 or kx % 2 == 0 or ky % 2 == 0:
        raise ValueError(f"kernel sizes must be odd and positive, got {kernel_size}")
    b, c, h, w = images.shape
    s = sigma.to(images.device, images.dtype).reshape(-1, 1)
    out = images.reshape(1, b * c, h, w)
    for size, vertical in ((kx, False), (ky, True)):
        if size == 1:
            continue
        x = torch.arange(size, device=images.device, dtype=images.dtype) - (size - 1) / 2
        kernel = torch.exp(-0.5 * (x / s) ** 2)
        kernel = (kernel / kernel.sum(dim=1, keepdim=True)).repeat_interleave(c, dim=0)
        if vertical:
            weight = kernel.view(b * c, 1, size, 1)
            out = F.conv2d(F.pad(out, (0, 0, size // 2, size // 2), mode="reflect"), weight, groups=b * c)
        else:
            weight = kernel.view(b * c, 1, 1, size)
            out = F.conv2d(F.pad(out, (size // 2, size // 2, 0, 0), mode="reflect"), weight, groups=b * c)
    return out.reshape(b, c, h, w)


def _uniform(n: int, low: float, high: float, generator: Optional[torch.Generator]) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=generator)


def strong_color_augment(
    images: torch.Tensor,
    generator: Optional[torch.Generator] = None,
    brightness: float = 0.3,
    contrast: float = 0.3,
    saturation: float = 0.3,
    hue: float = 0.1,
    grey_p: float = 0.5,
    blur_kernel: Sequence[int] = (1, 7),
    blur_sigma: tuple[float, float] = (0.1, 3.0),
    per_sample: bool = True,
) -> torch.Tensor:
    """Apply the stage-1 strong augmentation ``T`` to RGB images ``[B, 3, H, W]`` in [0, 1].

    Colour jitter (factors uniform in ``[1 - a, 1 + a]``, hue shift in ``[-hue, hue]``, the four
    operations in random order), then grey with probability ``grey_p`` (3 equal channels), then a
    Gaussian blur with ``sigma`` uniform in ``blur_sigma``. Random draws come from ``generator`` (a
    CPU ``torch.Generator``; ``None`` uses the global RNG); ``per_sample=False`` shares one draw over
    the batch (the official behaviour). Returns a new tensor in [0, 1]; the input is not modified.
    """
    _check(images)
    if not 0.0 <= grey_p <= 1.0 or not 0.0 <= hue <= 0.5 or min(brightness, contrast, saturation) < 0:
        raise ValueError("need 0 <= grey_p <= 1, 0 <= hue <= 0.5 and non-negative jitter strengths")
    if not 0.0 < blur_sigma[0] <= blur_sigma[1]:
        raise ValueError(f"blur_sigma must be an increasing pair of positive values, got {blur_sigma}")
    b = images.shape[0]
    n = b if per_sample else 1

    def draw(low: float, high: float) -> torch.Tensor:
        return _uniform(n, low, high, generator).expand(b)

    factors = [
        draw(max(0.0, 1 - brightness), 1 + brightness),
        draw(max(0.0, 1 - contrast), 1 + contrast),
        draw(max(0.0, 1 - saturation), 1 + saturation),
        draw(-hue, hue),
    ]
    orders = torch.stack([torch.randperm(4, generator=generator) for _ in range(n)]).expand(b, 4)
    grey = (torch.rand(n, generator=generator) < grey_p).expand(b)
    sigma = draw(*blur_sigma)

    ops = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)
    out = images
    for position in range(4):
        step = out.clone()
        for op_index, op in enumerate(ops):
            chosen = (orders[:, position] == op_index).nonzero().flatten()
            if chosen.numel():
                idx = chosen.to(images.device)
                step[idx] = op(out[idx], factors[op_index][chosen])
        out = step
    mask = grey.to(images.device).view(-1, 1, 1, 1)
    out = torch.where(mask, rgb_to_grey(out).expand_as(out), out)
    return gaussian_blur(out, sigma, blur_kernel).clamp(0.0, 1.0)
