"""BA-Net losses (Wang et al., Medical Image Analysis 2022), on logits.

``L = CE(out, y) + SoftDice(out, y) + sum_k [CE(seg_k, y) + CE(edge_k, b)]`` with the boundary target
``b = [|y - avgpool3x3(y)| > 0]`` computed from the mask at the network's input resolution, as in the
official training code (all weights 1, plain cross-entropy, optional class weights for the sparse
edge band).

The soft Dice is ``1 - mean_b (2 I_b + s) / (P_b + T_b + s)``. The official code computes
``2 (I_b + s) / (P_b + T_b + s)``, which gives an empty prediction on an empty mask a Dice of 2
(a loss of -1); this module uses the standard smoothing, so the Dice stays in [0, 1].
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import torch
import torch.nn.functional as F

__all__ = ["banet_loss", "boundary_target", "soft_dice_loss"]


def _labels(target: torch.Tensor) -> torch.Tensor:
    """``[B, H, W]`` or ``[B, 1, H, W]`` class map (int, or float in {0, 1}) -> ``[B, H, W]`` int64."""
    if target.dim() == 4:
        if target.shape[1] != 1:
            raise ValueError(f"target must be [B, H, W] or [B, 1, H, W], got {tuple(target.shape)}")
        target = target[:, 0]
    if target.dim() != 3:
        raise ValueError(f"target must be [B, H, W] or [B, 1, H, W], got {tuple(target.shape)}")
    if target.is_floating_point():
        target = target.round()
    return target.long()


def boundary_target(target: torch.Tensor) -> torch.Tensor:
    """Boundary band of a label map: 1 where the 3x3 neighbourhood mixes labels, else 0.

    ``target`` is ``[B, H, W]`` or ``[B, 1, H, W]``; returns a ``[B, H, W]`` int64 map in {0, 1}. As in
    the official code the 3x3 average counts zero padding, so foreground touching the image border
    is part of the band; the band is about 2 pixels wide, straddling each contour.
    """
    y = _labels(target).to(torch.float32).unsqueeze(1)
    mean = F.avg_pool2d(y, 3, stride=1, padding=1, count_include_pad=True)
    return ((y - mean).abs() > 1e-6).squeeze(1).long()


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """Per-image soft Dice loss of the softmax foreground against the label map, averaged over the batch.

    ``logits`` is ``[B, K, H, W]``. With ``K = 2`` the foreground is class 1 (the official loss); with
    ``K > 2`` the Dice is averaged over classes ``1..K-1`` (one-hot targets). Returns a scalar in [0, 1].
    """
    labels = _labels(target)
    if logits.dim() != 4 or logits.shape[0] != labels.shape[0] or logits.shape[-2:] != labels.shape[-2:]:
        raise ValueError(f"logits {tuple(logits.shape)} do not match target {tuple(target.shape)}")
    k = logits.shape[1]
    prob = torch.softmax(logits, dim=1)[:, 1:]
    onehot = F.one_hot(labels, k).permute(0, 3, 1, 2)[:, 1:].to(prob.dtype)
    inter = (prob * onehot).sum(dim=(2, 3))
    total = prob.sum(dim=(2, 3)) + onehot.sum(dim=(2, 3))
    dice = (2.0 * inter + smooth) / (total + smooth)
    return 1.0 - dice.mean()


def banet_loss(
    logits: torch.Tensor,
    side: Sequence[tuple[torch.Tensor, torch.Tensor]],
    target: torch.Tensor,
    ce_weight: float = 1.0,
    dice_weight: float = 1.0,
    side_weights: Sequence[float] = (1.0,) * 8,
    edge_class_weight: Optional[Sequence[float]] = None,
) -> dict[str, torch.Tensor]:
    """BA-Net training loss from ``BANet(x, return_side=True)`` and the label map ``target``.

    ``logits`` and every side map are ``[B, K, H, W]`` at the target's size; ``side`` holds the
    ``(seg_k, edge_k)`` pairs of levels 1..4. ``side_weights`` are the eight weights in the order
    seg1, edge1, seg2, edge2, ... (all 1 in the paper). ``edge_class_weight`` (background, edge) is
    passed to the edge cross-entropy (``None``: unweighted, the official default). Returns a dict with
    the scalar ``"loss"`` and detached parts ``"ce"``, ``"dice"``, ``"side_seg"``, ``"side_edge"``.
    """
    labels = _labels(target)
    if len(side) != 4 or len(side_weights) != 8:
        raise ValueError("expected four (seg, edge) side pairs and eight side weights")
    edges = boundary_target(labels)
    edge_w = None
    if edge_class_weight is not None:
        edge_w = torch.as_tensor(edge_class_weight, dtype=logits.dtype, device=logits.device)
    ce = F.cross_entropy(logits, labels)
    dice = soft_dice_loss(logits, labels)
    side_seg = logits.new_zeros(())
    side_edge = logits.new_zeros(())
    for k, (seg, edge) in enumerate(side):
        side_seg = side_seg + side_weights[2 * k] * F.cross_entropy(seg, labels)
        side_edge = side_edge + side_weights[2 * k + 1] * F.cross_entropy(edge, edges, weight=edge_w)
    total = ce_weight * ce + dice_weight * dice + side_seg + side_edge
    return {
        "loss": total,
        "ce": ce.detach(),
        "dice": dice.detach(),
        "side_seg": side_seg.detach(),
        "side_edge": side_edge.detach(),
    }
