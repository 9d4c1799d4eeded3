"""HiDiff as one model: a feature-exposing segmentor plus the BBDM refiner.

Chen et al., "HiDiff: Hybrid Diffusion Framework for Medical Image Segmentation", IEEE
TMI 2024. The segmentor gives features and a prior ``p``; the refiner, conditioned on
both and on the image, denoises a Bernoulli chain that starts from ``B(p)`` (the paper's
inference) or from a clinician-corrected mask (:func:`MedSegSuiteLib.refine.refine`).
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import torch
import torch.nn as nn

from .bbdm import BBDM, BernoulliSchedule, prior_from_logits
from .hidiff import PRESETS as _PARTS
from .hidiff import BBDMRefiner, HiDiffSegmentor

__all__ = ["PRESETS", "HiDiff"]

PRESETS = {
    "hidiff": {
        "paper": {"segmentor": {"preset": "paper"}, "refiner": {"preset": "paper"}},
        "lite": {"segmentor": {"preset": "lite"}, "refiner": {"preset": "lite"}},
    }
}


def _part(kind: str, spec: Mapping[str, Any], **fixed: Any) -> dict[str, Any]:
    spec = dict(spec)
    preset = spec.pop("preset", "lite")
    table = _PARTS[kind]
    if preset not in table:
        raise ValueError(f"{kind} has no preset {preset!r}; presets: {', '.join(table)}")
    return {**table[preset], **spec, **fixed}


def _segmentor(spec: Mapping[str, Any], in_channels: int, num_classes: int) -> nn.Module:
    spec = dict(spec)
    network = spec.pop("network", "hidiff_segmentor")
    if network == "hidiff_segmentor":
        return HiDiffSegmentor(**_part("hidiff_segmentor", spec, in_channels=in_channels, num_classes=num_classes))
    from . import create

    preset = spec.pop("preset", "lite")
    if network == "condseg":
        return create(
            "condseg", preset, **{**spec, "in_channels": in_channels, "out_channels": num_classes, "aux_head": False}
        )
    if network == "banet":  # softmax over >= 2 classes: K = 1 reads the foreground's log-odds
        return create("banet", preset, **{**spec, "in_channels": in_channels, "num_classes": max(2, num_classes)})
    raise ValueError(f"HiDiff segmentor must be 'hidiff_segmentor', 'condseg' or 'banet', got {network!r}")


class HiDiff(nn.Module):
    """HiDiff: segmentor ``f`` + BBDM refiner ``g`` (Chen et al., IEEE TMI 2024).

    Args:
        in_channels: image channels (1 for CT/MRI, 3 for RGB).
        num_classes: mask channels ``K``: 1 for one structure (sigmoid prior), or the number
            of classes including background (softmax prior).
        segmentor: ``{"preset": ..., **overrides}`` for the default :class:`HiDiffSegmentor`, or
            ``{"network": "condseg" | "banet", "preset": ..., **overrides}`` to use ConDSeg or BA-Net
            (ConDSeg's CDFA maps or BA-Net's trunk stages at H/4..H/16, and a 2x2 mean at H/32,
            condition the refiner; the paper's claim that any segmentor works). BA-Net's two-class
            softmax gives ``K = 1`` the foreground's log-odds, so a trained BA-Net model's weights
            load into it unchanged.
        refiner: ``{"preset": ..., **overrides}`` for :class:`BBDMRefiner` (its condition
            dims always follow the segmentor's feature dims).
        schedule: ``"cosine"`` (unsquared) or ``"cosine2"`` (squared); see :class:`BernoulliSchedule`.
        num_steps: diffusion length ``T`` (10 in the paper).
        sampling_steps: refiner calls when segmenting (spaced DDIM from ``B(p)``); 0 returns
            the segmentor's own prediction.
        seed: seed of the sampler, so the same image always gives the same result.

    ``predict_logits(x [B, C, H, W]) -> [B, K, H, W]``: for ``K = 1`` the logit of ``y0_hat``
    (decode with sigmoid > 0.5), for ``K > 1`` ``log(y0_hat)`` (decode with argmax; softmax
    gives the normalised ``y0_hat``). ``forward`` is the segmentor's logits (used in training).
    H and W must be divisible by 32.
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 1,
        segmentor: Optional[Mapping[str, Any]] = None,
        refiner: Optional[Mapping[str, Any]] = None,
        schedule: str = "cosine",
        num_steps: int = 10,
        sampling_steps: int = 10,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if not 0 <= sampling_steps <= num_steps:
            raise ValueError(f"sampling_steps must be in [0, num_steps={num_steps}], got {sampling_steps}")
        self.segmentor = _segmentor(segmentor or {"preset": "lite"}, in_channels, num_classes)
        self.refiner = BBDMRefiner(
            **_part(
                "hidiff_refiner",
                refiner or {"preset": "lite"},
                img_channels=in_channels,
                num_classes=num_classes,
                condition_dims=self.segmentor.feature_dims,
            )
        )
        self.diffusion = BBDM(BernoulliSchedule(schedule, num_steps))
        self.num_classes = num_classes
        self.sampling_steps = sampling_steps
        self.seed = seed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features_and_logits(x)[1]

    def features_and_logits(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """The segmentor's four feature maps and its logits ``[B, K, H, W]``."""
        feats, logits = self.segmentor.features_and_logits(x)
        if self.num_classes == 1 and logits.shape[1] == 2:  # softmax([l0, l1])[1] == sigmoid(l1 - l0)
            logits = logits[:, 1:] - logits[:, :1]
        return feats, logits

    def condition(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Segmentor features and prior ``p`` ``[B, K, H, W]`` in (0, 1) for image ``x``."""
        feats, logits = self.features_and_logits(x)
        return feats, prior_from_logits(logits.float())

    def model_fn(self, x: torch.Tensor, feats: list[torch.Tensor], prior: torch.Tensor):  # noqa: ANN201
        """The refiner as ``(y_k, k) -> eps logits`` for :meth:`BBDM.sample`."""
        return lambda y, k: self.refiner(y, k, x, prior, feats)

    def to_logits(self, y0_hat: torch.Tensor) -> torch.Tensor:
        """Scores whose card activation (sigmoid for K = 1, softmax otherwise) gives back ``y0_hat``."""
        y0_hat = y0_hat.float().clamp(1e-6, 1 - 1e-6)
        return torch.logit(y0_hat) if self.num_classes == 1 else torch.log(y0_hat)

    def predict_logits(self, x: torch.Tensor) -> torch.Tensor:
        feats, logits = self.features_and_logits(x)
        if self.sampling_steps == 0:
            return logits
        prior = prior_from_logits(logits.float())
        generator = torch.Generator(device=x.device).manual_seed(self.seed)
        indices = self.diffusion.chain_indices(self.sampling_steps, start=self.diffusion.num_steps - 1)
        start = self.diffusion.start_state(prior, indices[0], generator=generator)
        y0_hat = self.diffusion.sample(self.model_fn(x, feats, prior), prior, indices, start, generator=generator)
        return self.to_logits(y0_hat)
