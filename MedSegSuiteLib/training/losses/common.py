"""Losses shared by several networks."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["dice_ce_loss", "soft_dice_loss"]


def soft_dice_loss(
    probabilities: torch.Tensor,
    one_hot: torch.Tensor,
    valid: torch.Tensor,
    smooth: float = 1e-5,
    include_background: bool = False,
) -> torch.Tensor:
    """1 - mean soft Dice over classes, each computed over the whole batch (``[B, K, ...]`` inputs).

    ``valid`` ``[B, 1, ...]`` masks out unlabelled voxels. Background (channel 0) is
    left out unless ``include_background``.
    """
    start = 0 if include_background else 1
    p = probabilities[:, start:] * valid
    t = one_hot[:, start:] * valid
    dims = [0] + list(range(2, p.ndim))
    intersection = (p * t).sum(dims)
    denominator = p.sum(dims) + t.sum(dims)
    return 1 - ((2 * intersection + smooth) / (denominator + smooth)).mean()


def dice_ce_loss(logits: torch.Tensor, classes: torch.Tensor, ignore_index: int = 255) -> torch.Tensor:
    """Cross-entropy + soft Dice (foreground classes) for softmax logits ``[B, K, ...]`` and class maps ``[B, ...]``.

    Voxels equal to ``ignore_index`` (unlabelled) count in neither term.
    """
    logits = logits.float()
    ce = F.cross_entropy(logits, classes, ignore_index=ignore_index)
    valid = (classes != ignore_index).unsqueeze(1)
    safe = torch.where(classes == ignore_index, torch.zeros_like(classes), classes)
    one_hot = F.one_hot(safe, logits.shape[1]).movedim(-1, 1).float()
    return ce + soft_dice_loss(torch.softmax(logits, 1), one_hot, valid)
