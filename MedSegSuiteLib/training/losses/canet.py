"""CA-Net semi-supervised loss pieces (SASSNet lineage): Dice, SDF regression, adversarial terms.

The segmenter step of the published recipe, on a batch whose first items are labelled (L) and the
rest unlabelled (U)::

    p      = sigmoid(logits)
    L_dice = dice_loss(p[L], y)                       # squared denominator, summed over the L sub-batch
    L_sdf  = MSE(sdf[L], sdf_target(y))
    L_adv  = CE(D(sdf[U], x[U]), class 1)             # unlabelled maps should pass as "labelled"
    L      = L_dice + 0.3 * L_sdf + adversarial_weight(t) * L_adv

and the discriminator step (segmenter in eval mode, no gradient) uses
``discriminator_loss(D(sdf, x), labelled=[1, 1, 0, 0])``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Union

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

__all__ = [
    "adversarial_weight",
    "dice_loss",
    "discriminator_loss",
    "generator_adversarial_loss",
    "sdf_loss",
    "sdf_target",
    "segmenter_loss",
    "sigmoid_rampup",
]

ArrayLike = Union[np.ndarray, torch.Tensor]


def dice_loss(probs: torch.Tensor, target: torch.Tensor, smooth: float = 1e-5) -> torch.Tensor:
    """``1 - (2*sum(p*y) + s) / (sum(p^2) + sum(y^2) + s)`` over all elements (the whole sub-batch); in [0, 1]."""
    target = target.to(probs.dtype)
    intersect = (probs * target).sum()
    denominator = (probs * probs).sum() + (target * target).sum()
    return 1.0 - (2.0 * intersect + smooth) / (denominator + smooth)


def _normalised(distance: np.ndarray) -> np.ndarray:
    low, high = float(distance.min()), float(distance.max())
    if high <= low:
        return np.zeros_like(distance)
    return (distance - low) / (high - low)


def _sdf_one(mask: np.ndarray) -> np.ndarray:
    inside = mask.astype(bool)
    outside = ~inside
    if not inside.any() or not outside.any():
        return np.zeros(inside.shape, dtype=np.float32)
    inside_distance = ndimage.distance_transform_edt(inside)
    outside_distance = ndimage.distance_transform_edt(outside)
    # inner boundary: foreground voxels with a face-neighbour in the background (the image edge is not background)
    structure = ndimage.generate_binary_structure(inside.ndim, 1)
    boundary = inside & ~ndimage.binary_erosion(inside, structure=structure, border_value=1)
    sdf = _normalised(outside_distance) - _normalised(inside_distance)
    sdf[boundary] = 0.0
    return sdf.astype(np.float32)


def sdf_target(masks: ArrayLike) -> ArrayLike:
    """Normalised signed distance maps of binary masks [B, *S] (numpy or torch; returns the same kind).

    Per sample: ``edt_out/max(edt_out) - edt_in/max(edt_in)`` (each min-max normalised), so values are
    positive outside, negative inside, within [-1, 1], and 0 on the inner boundary (foreground voxels
    touching the background across a face). A sample without foreground, or without background (where
    the published code divides by zero), gives all zeros. float32; a torch input gives a tensor on its
    device.
    """
    if isinstance(masks, torch.Tensor):
        result = sdf_target(masks.detach().cpu().numpy())
        return torch.from_numpy(result).to(masks.device)
    masks = np.asarray(masks)
    if masks.ndim < 2:
        raise ValueError(f"masks must be [B, *spatial], got shape {masks.shape}")
    return np.stack([_sdf_one(m) for m in masks]).astype(np.float32)


def sdf_loss(sdf: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """MSE between a predicted tanh SDF [B, 1, *S] (or [B, *S]) and :func:`sdf_target` of masks [B, *S]."""
    if sdf.ndim == masks.ndim + 1:
        sdf = sdf[:, 0]
    target = sdf_target(masks).to(sdf.dtype)
    return F.mse_loss(sdf, target)


def sigmoid_rampup(current: float, length: float) -> float:
    """``exp(-5 * (1 - clip(current, 0, length)/length)^2)`` (Laine & Aila); 1.0 when ``length`` is 0."""
    if length == 0:
        return 1.0
    phase = 1.0 - min(max(float(current), 0.0), float(length)) / float(length)
    return float(math.exp(-5.0 * phase * phase))


def adversarial_weight(
    iteration: int, max_weight: float = 0.01, rampup_length: float = 40.0, period: int = 150
) -> float:
    """λ(t) = max_weight * sigmoid_rampup(t // period, rampup_length): 0.01*exp(-5) at t=0, 0.01 from t=6000."""
    return max_weight * sigmoid_rampup(iteration // period, rampup_length)


def generator_adversarial_loss(d_logits_unlabelled: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of discriminator logits [N, 2] on unlabelled maps against class 1 ("labelled")."""
    target = torch.ones(d_logits_unlabelled.shape[0], dtype=torch.long, device=d_logits_unlabelled.device)
    return F.cross_entropy(d_logits_unlabelled, target)


def discriminator_loss(d_logits: torch.Tensor, labelled: Sequence[bool] | torch.Tensor) -> torch.Tensor:
    """Cross-entropy of discriminator logits [N, 2] against 1 for labelled and 0 for unlabelled items."""
    target = torch.as_tensor(labelled, device=d_logits.device).long()
    if target.shape != (d_logits.shape[0],):
        raise ValueError(f"{d_logits.shape[0]} logits but labelled flags of shape {tuple(target.shape)}")
    return F.cross_entropy(d_logits, target)


def segmenter_loss(
    sdf: torch.Tensor,
    logits: torch.Tensor,
    masks: torch.Tensor,
    d_logits_unlabelled: torch.Tensor | None = None,
    iteration: int = 0,
    beta: float = 0.3,
    max_adversarial_weight: float = 0.01,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The segmenter objective ``L_dice + beta*L_sdf + λ(t)*L_adv``; returns it and its parts as floats.

    ``sdf`` and ``logits`` [L, 1, *S] are the labelled part of the batch, ``masks`` [L, *S] their binary
    labels, ``d_logits_unlabelled`` [U, 2] the discriminator's output on the unlabelled part (None
    leaves out the adversarial term).
    """
    probs = torch.sigmoid(logits[:, 0])
    l_dice = dice_loss(probs, masks == 1)
    l_sdf = sdf_loss(sdf, masks)
    total = l_dice + beta * l_sdf
    parts = {"dice": float(l_dice.detach()), "sdf": float(l_sdf.detach())}
    if d_logits_unlabelled is not None:
        weight = adversarial_weight(iteration, max_adversarial_weight)
        l_adv = generator_adversarial_loss(d_logits_unlabelled)
        total = total + weight * l_adv
        parts.update(adv=float(l_adv.detach()), adv_weight=weight)
    parts["total"] = float(total.detach())
    return total, parts
