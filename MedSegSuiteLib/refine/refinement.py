"""Refinement steps for clinicians: a few HiDiff diffusion steps that start from a corrected mask.

This is MedSegSuite's extension of HiDiff (the paper refines the segmentor's prior, not a
user's mask; see ``specs/hidiff.md`` §7.3-7.4). For each axial slice in scope:

1. the segmentor gives features and its prior ``p_seg``; the corrected mask ``m``
   softens it: ``p = 0.5 p_seg + 0.5 clip(m, 0.02, 0.98)``;
2. the chain starts at step ``steps - 1`` from the exact forward marginal of ``m``
   (few steps stay close to the mask, ``T`` steps may move far from it);
3. after every step the voxels in ``keep`` (the clinician's own edits) are reset to
   ``m``, and they are copied from the mask again at the image's resolution, so they
   never change;
4. the final ``y0_hat`` is thresholded at 0.5 (argmax for several classes); with an
   ensemble, ``y0_hat`` is averaged over the members and its per-voxel standard
   deviation is returned as the uncertainty.

Seeded: the same image, mask, settings and seed always give the same result.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Optional, Union

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import InputError, ModelError
from ..geometry import Box, crop, paste, to_canonical
from ..inference.device import autocast, resolve_device
from ..models.loading import LoadedModel
from ..networks.bbdm import mask_to_channels, soften_prior
from ..preprocessing import match_channels, normalize
from ..progress import ProgressCallback, check_cancelled, report
from ..volume import Volume

__all__ = ["SCOPES", "Refinement", "Refiner", "axial_index"]

SCOPES = ("volume", "slice", "neighbours", "roi")


@dataclass
class Refinement:
    """The refined label map on the input grid, and (with an ensemble) the per-voxel uncertainty in [0, 0.5]."""

    labels: Volume
    uncertainty: Optional[Volume] = None
    slices: tuple[int, ...] = ()


def axial_index(volume: Volume, lps: Union[tuple[float, float, float], np.ndarray]) -> int:
    """The canonical axial slice index (0 = most inferior) through the LPS point ``lps`` (mm)."""
    _, transform = to_canonical(volume)
    k = transform.canonical_grid().physical_to_index(lps)[2]
    index = int(round(float(k)))
    if not 0 <= index < transform.canonical_grid().shape[0]:
        raise InputError(f"the point {tuple(round(v, 1) for v in lps)} mm lies outside the image's axial extent")
    return index


def _nearest_edited(kept: np.ndarray, reach: int) -> Optional[tuple[np.ndarray, np.ndarray]]:
    """For every axial slice of ``kept`` ``[z, y, x]``: the nearest slice holding kept voxels and its
    distance (0 for such a slice itself and for slices farther than ``reach``: they get no guide)."""
    edited = np.nonzero(kept.reshape(kept.shape[0], -1).any(1))[0]
    if edited.size == 0:
        return None
    slices = np.arange(kept.shape[0])
    gaps = np.abs(slices[:, None] - edited[None, :])
    source = edited[gaps.argmin(1)]
    distance = gaps.min(1)
    distance[distance > reach] = 0
    return np.where(distance > 0, source, slices), distance


class Refiner:
    """Runs refinement steps with a HiDiff model.

    Args:
        model: a loaded model whose network is ``hidiff`` (segmentor + refiner).
        device: ``auto``, ``cpu``, ``cuda`` or ``mps``.
        batch_size: slices per network call.
        amp: autocast on CUDA.
    """

    def __init__(
        self, model: LoadedModel, device: Union[str, torch.device] = "auto", batch_size: int = 4, amp: bool = True
    ) -> None:
        if model.card.network != "hidiff" or not hasattr(model.network, "refiner"):
            raise ModelError(
                f"model {model.card.id!r} is a {model.card.network} model; refinement steps need a HiDiff model"
            )
        if model.card.dims != 2 or model.card.input.size_xy is None:
            raise ModelError(f"model card {model.card.id!r}: a HiDiff model is 2D and needs input.size_xy")
        self.card = model.card
        self.device = resolve_device(device)
        self.network = model.network.to(self.device).eval()
        self.batch_size = max(1, int(batch_size))
        self.amp = amp
        values = [label.value for label in self.card.labels]
        self.values = values
        self.lut = np.zeros(max(values) + 1, dtype=np.int64)
        for index, value in enumerate(values):
            self.lut[value] = index + 1

    @property
    def num_steps(self) -> int:
        return self.network.diffusion.num_steps

    # -- checks ---------------------------------------------------------------------------
    def _check(self, volume: Volume, mask: Volume, keep: Optional[Volume], steps: int, ensemble: int) -> None:
        if not 0 <= steps <= self.num_steps:
            raise InputError(f"steps must be between 0 and {self.num_steps} for this model, got {steps}")
        if ensemble < 1:
            raise InputError("ensemble must be at least 1")
        for name, other in (("mask", mask), ("keep", keep)):
            if other is not None and (other.shape != volume.shape or not other.grid.same_as(volume.grid, atol=1e-3)):
                raise InputError(
                    f"the {name}'s grid ({other.grid.describe()}) differs from the image's ({volume.grid.describe()}); "
                    "resample it onto the image first"
                )
        unknown = {int(v) for v in np.unique(mask.array)} - {0, *self.values}
        if unknown:
            raise InputError(
                f"the mask holds label value(s) {sorted(unknown)} that model {self.card.id!r} does not know "
                f"(its labels: {', '.join(f'{label.value} {label.name}' for label in self.card.labels)})"
            )
        if not mask.array.any():
            raise InputError("the mask is empty: there is nothing to refine; segment first or paint the structure")

    # -- one batch of slices --------------------------------------------------------------
    def _refine_batch(
        self,
        image: np.ndarray,
        classes: np.ndarray,
        keep: Optional[np.ndarray],
        steps: int,
        ensemble: int,
        generator: torch.Generator,
        guide: Optional[np.ndarray] = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Image ``[B, C, h, w]``, class maps and keep ``[B, h, w]`` -> (label classes, uncertainty) ``[B, h, w]``.

        ``guide`` (``[B, h, w]`` class maps and ``[B]`` weights, see :meth:`refine`'s ``spread``)
        blends a nearby edited slice into each slice's mask: the mask becomes soft there.
        """
        net, diffusion = self.network, self.network.diffusion
        h, w = image.shape[-2:]
        size = (self.card.input.size_xy[1], self.card.input.size_xy[0])
        x = F.interpolate(torch.from_numpy(image).to(self.device), size=size, mode="bilinear", align_corners=False)
        m_full = mask_to_channels(torch.from_numpy(classes), net.num_classes).to(self.device)
        if guide is not None:
            guide_classes, weights = guide
            g = mask_to_channels(torch.from_numpy(guide_classes), net.num_classes).to(self.device)
            weight = torch.from_numpy(weights.astype(np.float32)).to(self.device).view(-1, 1, 1, 1)
            m_full = (1 - weight) * m_full + weight * g
        if guide is None:
            m = F.interpolate(m_full, size=size, mode="nearest")
        else:
            m = F.interpolate(m_full, size=size, mode="bilinear", align_corners=False)
        k = (
            None
            if keep is None
            else F.interpolate(
                torch.from_numpy(keep[:, None].astype(np.float32)).to(self.device), size=size, mode="nearest"
            )
            .bool()
            .expand_as(m)
        )
        with torch.inference_mode(), autocast(self.device, self.amp):
            feats, p_seg = net.condition(x)
            feats = [f.float() for f in feats]
            prior = soften_prior(p_seg.float(), m)
            indices = diffusion.chain_indices(steps)
            result = diffusion.sample_ensemble(
                net.model_fn(x, feats, prior), prior, indices, mask=m, keep=k, ensemble=ensemble, generator=generator
            )
        prob = F.interpolate(result.prob.float(), size=(h, w), mode="bilinear", align_corners=False)
        unc = F.interpolate(result.uncertainty.float(), size=(h, w), mode="bilinear", align_corners=False)
        if net.num_classes == 1:
            refined = (prob[:, 0] > 0.5).long()
            uncertainty = unc[:, 0]
        else:
            refined = prob.argmax(1)
            uncertainty = unc.max(1).values
        refined = refined.cpu().numpy()
        if keep is not None:
            refined[keep] = classes[keep]
        return refined, uncertainty.cpu().numpy()

    # -- the job -------------------------------------------------------------------------
    def refine(
        self,
        volume: Volume,
        mask: Volume,
        steps: int,
        keep: Optional[Volume] = None,
        scope: str = "volume",
        slice_index: Optional[int] = None,
        roi: Optional[Box] = None,
        seed: int = 0,
        ensemble: int = 1,
        progress: Optional[ProgressCallback] = None,
        cancel: Optional[threading.Event] = None,
        neighbours: int = 2,
        spread: float = 0.0,
    ) -> Refinement:
        """Refine ``mask`` (a label map on ``volume``'s grid) with ``steps`` diffusion steps.

        ``scope``: ``volume`` refines every axial slice that holds mask voxels, ``slice``
        the canonical axial slice ``slice_index`` (see :func:`axial_index`), ``neighbours``
        that slice and ``neighbours`` slices on either side of it, ``roi`` the slices of
        ``roi`` (a voxel box of the input) inside the box only. ``keep`` (non-zero
        voxels, same grid) never change. ``steps = 0`` returns the mask unchanged.
        Outside the scope the mask is returned as it was.
        ``spread`` (0 to 1) carries the clinician's edits to the slices near them: a slice
        without edits, ``d`` slices (at most ``neighbours``) from the nearest slice that has
        some, starts from its mask blended with that slice's labels at weight ``spread ** d``.
        """
        if scope not in SCOPES:
            raise InputError(f"scope must be one of {', '.join(SCOPES)}, got {scope!r}")
        if not 0.0 <= spread <= 1.0 or neighbours < 0:
            raise InputError(f"spread must be between 0 and 1 and neighbours at least 0, got {spread} and {neighbours}")
        self._check(volume, mask, keep, steps, ensemble)
        if steps == 0:
            return Refinement(mask.with_array(mask.array.copy()))
        if scope == "roi":
            if roi is None:
                raise InputError("scope 'roi' needs an ROI box")
            part = self.refine(
                crop(volume, roi),
                crop(mask, roi),
                steps,
                crop(keep, roi) if keep is not None else None,
                "volume",
                None,
                None,
                seed,
                ensemble,
                progress,
                cancel,
                neighbours=neighbours,
                spread=spread,
            )
            labels = mask.array.copy()
            labels[roi.numpy_slices()] = part.labels.array
            uncertainty = None
            if part.uncertainty is not None:
                uncertainty = mask.with_array(paste(part.uncertainty.array, roi, mask.grid, 0.0))
            return Refinement(mask.with_array(labels), uncertainty, part.slices)

        report(progress, 0, 1, "preprocessing")
        canonical, transform = to_canonical(volume)
        data = normalize(
            match_channels(canonical.channel_first(), self.card.input.channels), self.card.input.normalization
        )
        labels = transform.apply(mask.array)
        classes = self.lut[labels]
        kept = transform.apply(keep.array != 0) if keep is not None else None
        depth = classes.shape[0]
        if scope in ("slice", "neighbours"):
            if slice_index is None or not 0 <= slice_index < depth:
                raise InputError(f"slice index must be between 0 and {depth - 1}, got {slice_index}")
            reach = max(0, int(neighbours)) if scope == "neighbours" else 0
            chosen = list(range(max(0, slice_index - reach), min(depth, slice_index + reach + 1)))
        else:
            chosen = [int(z) for z in np.nonzero(classes.reshape(depth, -1).any(1))[0]]
        sources = _nearest_edited(kept, neighbours) if spread > 0 and kept is not None else None
        if sources is not None and scope == "volume":  # slices beside an edit may hold no mask voxel yet
            chosen = sorted(set(chosen) | {int(z) for z in np.nonzero(sources[1])[0]})
        refined = classes.copy()
        uncertainty = np.zeros(classes.shape, np.float32) if ensemble > 1 else None
        generator = torch.Generator(device=self.device).manual_seed(int(seed))
        total = len(chosen)
        report(progress, 0, total, "refining")
        for start in range(0, total, self.batch_size):
            check_cancelled(cancel)
            batch = chosen[start : start + self.batch_size]
            guide = None
            if sources is not None:
                source, distance = sources[0][batch], sources[1][batch]
                guide = (classes[source], np.where(distance > 0, float(spread) ** distance, 0.0))
            out, unc = self._refine_batch(
                np.ascontiguousarray(data[:, batch].transpose(1, 0, 2, 3)),
                classes[batch],
                kept[batch] if kept is not None else None,
                steps,
                ensemble,
                generator,
                guide,
            )
            refined[batch] = out
            if uncertainty is not None:
                uncertainty[batch] = unc
            report(progress, min(start + self.batch_size, total), total, "refining")
        check_cancelled(cancel)
        values = np.array([0, *self.values], dtype=np.uint8 if max(self.values) <= 255 else np.uint16)
        result = transform.restore(values[refined])
        unc_volume = transform.restore(uncertainty) if uncertainty is not None else None
        return Refinement(Volume.on_grid(result.array, volume.grid), unc_volume, tuple(chosen))
