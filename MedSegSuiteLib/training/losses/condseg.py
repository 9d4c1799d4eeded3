"""ConDSeg losses (Lei et al., AAAI 2025), on logits.

Stage 2: ``L = DB(y_hat, y) + beta_fg * DB(m_fg, y) + beta_bg * DB(m_bg, 1 - y) + L_compl``;
stage 1 (consistency reinforcement): ``L = DB(P, y) + DB(P', y) + BCE(P, [P' > 0.5]) + BCE(P', [P > 0.5])``
with ``P' = net(T(x))`` under the strong colour augmentation ``T``.

Fixes of the official training code (``specs/condseg_banet.md`` section 1.10):

- **double sigmoid**: the official network returns probabilities and its loss applies a second
  sigmoid; every function here takes **logits** and applies the sigmoid exactly once.
- **background target not augmented**: the official loader passed the background mask to the
  augmentation as an undeclared key, so it was never flipped/rotated with the image. Here the
  background target is always derived from the (already augmented) mask as ``1 - y``; callers pass
  only ``y``.
- **BN statistics dropped between stages**: see
  :func:`MedSegSuiteLib.networks.condseg.transfer_stage1_encoder` (copies buffers too).

Decision on the SID area weights (the paper text was not available; the official code summed the
predicted area over the whole batch and back-propagated through the weight): ``beta`` is computed
**per image** from that image's predicted area fraction, ``beta_b = 1 / (tanh(mean sigma(m_b)) + eps)``,
and **detached**, so it only re-weights the image's term and is not itself a target the network can
lower by inflating its predicted area. It is capped at ``max_weight`` (an image whose predicted
foreground vanishes would otherwise get a weight near ``1 / eps``). ``legacy_weights=True`` reproduces
the official batch-summed, non-detached weights.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

__all__ = [
    "area_weights",
    "complementarity_loss",
    "condseg_loss",
    "dice_bce_loss",
    "stage1_consistency_loss",
]


def _check_pair(logits: torch.Tensor, target: torch.Tensor) -> None:
    if logits.shape != target.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and target {tuple(target.shape)} must have the same shape")
    if logits.dim() < 2:
        raise ValueError("expected a batch: [B, ...]")


def dice_bce_loss(
    logits: torch.Tensor, target: torch.Tensor, smooth: float = 1.0, per_image: bool = False
) -> torch.Tensor:
    """Binary cross-entropy plus soft Dice loss of ``sigmoid(logits)`` against ``target`` in [0, 1].

    ``DB = BCE + 1 - (2 sum(p t) + smooth) / (sum(p) + sum(t) + smooth)``. With ``per_image=False``
    (the official form) the BCE is the mean and the Dice sums run over the whole batch, giving a
    scalar; with ``per_image=True`` both are taken per image and a ``[B]`` tensor is returned.
    Values lie in ``[0, inf)``; the Dice part lies in ``[0, 1)``.
    """
    _check_pair(logits, target)
    target = target.to(logits.dtype)
    prob = torch.sigmoid(logits)
    if per_image:
        dims = tuple(range(1, logits.dim()))
        bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none").mean(dim=dims)
        inter, total = (prob * target).sum(dim=dims), prob.sum(dim=dims) + target.sum(dim=dims)
    else:
        bce = F.binary_cross_entropy_with_logits(logits, target)
        inter, total = (prob * target).sum(), prob.sum() + target.sum()
    return bce + 1.0 - (2.0 * inter + smooth) / (total + smooth)


def area_weights(aux_logits: torch.Tensor, max_weight: float = 10.0, eps: float = 1e-15) -> torch.Tensor:
    """Detached per-image SID weights ``min(1 / (tanh(area fraction) + eps), max_weight)``, shape ``[B]``.

    The area fraction of image ``b`` is the mean of ``sigmoid(aux_logits[b])``; weights are >= ~1.31
    (area 1) and grow as the predicted region shrinks.
    """
    if max_weight <= 0:
        raise ValueError(f"max_weight must be positive, got {max_weight}")
    with torch.no_grad():
        area = torch.sigmoid(aux_logits.float()).flatten(1).mean(dim=1)
        return (1.0 / (torch.tanh(area) + eps)).clamp(max=max_weight).to(aux_logits.dtype)


def complementarity_loss(fg_logits: torch.Tensor, bg_logits: torch.Tensor, uc_logits: torch.Tensor) -> torch.Tensor:
    """Mean over pixels of the pairwise products of the softmax over the three SID probability maps.

    As in the official code the softmax is taken over the three *probabilities* (sigmoids of the
    logits), so the loss stays within about [0.289, 0.334]: the floor (one map at 1, the others at 0)
    is not zero. Scalar.
    """
    if not fg_logits.shape == bg_logits.shape == uc_logits.shape:
        raise ValueError("the three SID maps must have the same shape")
    probs = torch.softmax(torch.sigmoid(torch.stack([fg_logits, bg_logits, uc_logits], dim=1)), dim=1)
    q_f, q_b, q_u = probs.unbind(dim=1)
    return (q_f * q_b + q_f * q_u + q_b * q_u).mean()


def condseg_loss(
    logits: torch.Tensor,
    aux_fg: torch.Tensor,
    aux_bg: torch.Tensor,
    aux_uc: torch.Tensor,
    target: torch.Tensor,
    max_weight: float = 10.0,
    legacy_weights: bool = False,
) -> dict[str, torch.Tensor]:
    """Stage-2 ConDSeg loss from ``ConDSeg(x, return_aux=True)`` logits and the mask ``target`` in [0, 1].

    All inputs are ``[B, 1, H, W]``, except that with several labels ``logits`` and
    ``target`` are ``[B, L, H, W]`` while the single-channel SID maps learn the union of
    the labels as foreground. The background target is ``1 - foreground``. Returns a dict with the
    scalar ``"loss"`` (to back-propagate) and its parts ``"main"``, ``"fg"``, ``"bg"``,
    ``"complementarity"`` and the mean weights ``"beta_fg"``, ``"beta_bg"`` (detached, for logging).
    """
    _check_pair(logits, target)
    target = target.to(logits.dtype)
    main = dice_bce_loss(logits, target)
    if aux_fg.shape[1] != target.shape[1]:
        target = target.amax(dim=1, keepdim=True)  # the SID maps see every label as foreground
    background = 1.0 - target
    if legacy_weights:
        hw = aux_fg.shape[-2] * aux_fg.shape[-1]
        beta_fg = 1.0 / (torch.tanh(torch.sigmoid(aux_fg).sum() / hw) + 1e-15)
        beta_bg = 1.0 / (torch.tanh(torch.sigmoid(aux_bg).sum() / hw) + 1e-15)
        loss_fg = beta_fg * dice_bce_loss(aux_fg, target)
        loss_bg = beta_bg * dice_bce_loss(aux_bg, background)
    else:
        beta_fg = area_weights(aux_fg, max_weight)
        beta_bg = area_weights(aux_bg, max_weight)
        loss_fg = (beta_fg * dice_bce_loss(aux_fg, target, per_image=True)).mean()
        loss_bg = (beta_bg * dice_bce_loss(aux_bg, background, per_image=True)).mean()
    comp = complementarity_loss(aux_fg, aux_bg, aux_uc)
    return {
        "loss": main + loss_fg + loss_bg + comp,
        "main": main.detach(),
        "fg": loss_fg.detach(),
        "bg": loss_bg.detach(),
        "complementarity": comp.detach(),
        "beta_fg": beta_fg.detach().mean(),
        "beta_bg": beta_bg.detach().mean(),
    }


def stage1_consistency_loss(
    logits: torch.Tensor, logits_aug: torch.Tensor, target: Optional[torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Stage-1 loss from ``P = net(x)`` and ``P' = net(T(x))`` (logits, ``[B, 1, H, W]``).

    Each prediction is pulled towards the other's hard mask (threshold 0.5 on the probability, no
    gradient through the target) with BCE, plus Dice+BCE of both against ``target`` when given.
    With ``target=None`` only the consistency part is returned (unlabelled images). Returns a dict
    with the scalar ``"loss"`` and the detached parts ``"supervised"`` and ``"consistency"``.
    """
    if logits.shape != logits_aug.shape:
        raise ValueError("both predictions must have the same shape")
    hard = (logits.detach() > 0).to(logits.dtype)
    hard_aug = (logits_aug.detach() > 0).to(logits.dtype)
    consistency = F.binary_cross_entropy_with_logits(logits, hard_aug) + F.binary_cross_entropy_with_logits(
        logits_aug, hard
    )
    if target is None:
        supervised = consistency.new_zeros(())
    else:
        supervised = dice_bce_loss(logits, target) + dice_bce_loss(logits_aug, target)
    return {"loss": supervised + consistency, "supervised": supervised.detach(), "consistency": consistency.detach()}
