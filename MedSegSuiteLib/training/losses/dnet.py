"""D-Net training loss: soft Dice + cross-entropy with nnU-Net style deep supervision.

The journal D-Net is an nnU-Net v2 network class, so it is trained with nnU-Net's loss: for every
output, cross-entropy plus a soft Dice over the foreground classes (softmax probabilities, smooth
1e-5, background excluded), and with deep supervision a weighted sum over the outputs with weights
1, 1/2, 1/4, ... (full resolution first), the lowest-resolution weight set to 0, then normalised to
sum to 1. Targets for the low-resolution heads are the label map downsampled by nearest neighbour.

One deliberate difference: nnU-Net adds ``-dice`` (so its loss can be negative); here the Dice term
is ``1 - dice``, which has the same gradients and keeps the loss non-negative.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Union

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["DNetLoss", "deep_supervision_weights", "dice_ce_loss", "downsample_labels", "soft_dice"]

Outputs = Union[torch.Tensor, Sequence[torch.Tensor]]


def deep_supervision_weights(num_outputs: int, exclude_lowest: bool = True) -> list[float]:
    """Weights for ``num_outputs`` outputs ordered full resolution first: 2^-i, lowest set to 0, summing to 1.

    With one output the weight is [1.0]. ``exclude_lowest=False`` keeps the last output's 2^-(n-1).
    """
    if num_outputs < 1:
        raise ValueError(f"num_outputs must be positive, got {num_outputs}")
    weights = [0.5**i for i in range(num_outputs)]
    if exclude_lowest and num_outputs > 1:
        weights[-1] = 0.0
    total = sum(weights)
    return [w / total for w in weights]


def downsample_labels(labels: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Nearest-neighbour resize of an integer label map [B, *S] or [B, 1, *S] to [B, *size] (int64)."""
    if labels.ndim >= 2 and labels.shape[1] == 1 and labels.ndim == len(size) + 2:
        labels = labels[:, 0]
    if tuple(labels.shape[1:]) == tuple(size):
        return labels.long()
    resized = F.interpolate(labels[:, None].float(), size=tuple(size), mode="nearest-exact")
    return resized[:, 0].long()


def soft_dice(
    logits: torch.Tensor,
    labels: torch.Tensor,
    include_background: bool = False,
    batch_dice: bool = False,
    smooth: float = 1e-5,
) -> torch.Tensor:
    """Mean soft Dice (in [0, 1]) of softmax(logits) [B, K, *S] against integer labels [B, *S].

    Dice is computed per sample and class (``batch_dice=True``: per class over the whole batch), then
    averaged over classes (and samples); ``(2*I + smooth) / (P + G + smooth)``.
    """
    probs = torch.softmax(logits.float(), dim=1)
    onehot = F.one_hot(labels.long(), logits.shape[1]).movedim(-1, 1).to(probs.dtype)
    if not include_background:
        probs, onehot = probs[:, 1:], onehot[:, 1:]
    axes = tuple(range(2, probs.ndim))
    if batch_dice:
        axes = (0,) + axes
    intersect = (probs * onehot).sum(axes)
    denominator = probs.sum(axes) + onehot.sum(axes)
    return ((2 * intersect + smooth) / (denominator + smooth).clamp_min(1e-8)).mean()


def dice_ce_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    ce_weight: float = 1.0,
    dice_weight: float = 1.0,
    include_background: bool = False,
    batch_dice: bool = False,
    smooth: float = 1e-5,
) -> torch.Tensor:
    """``ce_weight * CE + dice_weight * (1 - soft Dice)`` for logits [B, K, *S] and labels [B, *S] (or [B, 1, *S])."""
    if logits.shape[1] < 2:
        raise ValueError("dice_ce_loss needs K >= 2 softmax channels (background included)")
    labels = downsample_labels(labels, logits.shape[2:])
    ce = F.cross_entropy(logits.float(), labels)
    dice = soft_dice(logits, labels, include_background, batch_dice, smooth)
    return ce_weight * ce + dice_weight * (1.0 - dice)


class DNetLoss(nn.Module):
    """Dice + CE on one output or on a deep-supervision list (full resolution first).

    Args:
        weights: per-output weights; default :func:`deep_supervision_weights` of the list length
            (nnU-Net: 1, 1/2, 1/4, 1/8 and 0 for the lowest level, normalised).
        ce_weight: weight of the cross-entropy term. Default 1.
        dice_weight: weight of the ``1 - Dice`` term. Default 1.
        include_background: count the background class in the Dice. Default False (nnU-Net).
        batch_dice: pool the Dice over the batch. Default False.
        smooth: Dice smoothing. Default 1e-5.

    ``forward(outputs, labels) -> scalar``: ``outputs`` is [B, K, *S] or a list of such tensors at
    decreasing resolution; ``labels`` is the full-resolution integer map [B, *S] or [B, 1, *S]. Outputs
    with weight 0 are not evaluated.
    """

    def __init__(
        self,
        weights: Sequence[float] | None = None,
        ce_weight: float = 1.0,
        dice_weight: float = 1.0,
        include_background: bool = False,
        batch_dice: bool = False,
        smooth: float = 1e-5,
    ) -> None:
        super().__init__()
        if weights is not None and (len(weights) == 0 or min(weights) < 0 or sum(weights) <= 0):
            raise ValueError(f"weights must be non-negative with a positive sum, got {weights}")
        self.weights = None if weights is None else [float(w) for w in weights]
        self.ce_weight = ce_weight
        self.dice_weight = dice_weight
        self.include_background = include_background
        self.batch_dice = batch_dice
        self.smooth = smooth

    def forward(self, outputs: Outputs, labels: torch.Tensor) -> torch.Tensor:
        outs = [outputs] if isinstance(outputs, torch.Tensor) else list(outputs)
        weights = self.weights if self.weights is not None else deep_supervision_weights(len(outs))
        if len(weights) != len(outs):
            raise ValueError(f"{len(outs)} outputs but {len(weights)} weights")
        total = outs[0].new_zeros((), dtype=torch.float32)
        for weight, logits in zip(weights, outs):
            if weight == 0.0:
                continue
            loss = dice_ce_loss(
                logits, labels, self.ce_weight, self.dice_weight, self.include_background, self.batch_dice, self.smooth
            )
            total = total + weight * loss
        return total
