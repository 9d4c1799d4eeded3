"""The Predictor: one model card + network in, a label volume on the input grid out.

What happens to a volume, in order: checks (finite, not constant, dimensionality),
optional ROI crop, canonical reorientation (permute/flip only), channel matching and
intensity normalisation from the card, optional resampling to the card's spacing,
then 2D networks run over axial slices in batches (each slice resized to the card's
``size_xy`` if given) and 3D networks over sliding windows. Scores are decoded to
label values, post-processed, and mapped back **exactly** onto the input grid.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Any, Optional, Union

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import InputError, ModelError
from ..geometry import Box, crop, paste, resample, resampled_grid, to_canonical
from ..memory import check_fits
from ..models.card import InferenceSpec, ModelCard
from ..models.loading import LoadedModel
from ..preprocessing import match_channels, normalize
from ..progress import ProgressCallback, check_cancelled, report
from ..volume import Grid, Volume
from .device import autocast, resolve_device
from .sliding_window import SlidingWindow, run_in_batches

__all__ = ["Prediction", "Predictor", "decode_scores", "largest_component", "validate_image"]

log = logging.getLogger(__name__)


@dataclass
class Prediction:
    """A label map on the input grid (uint8 or uint16) and, on request, per-channel scores.

    ``scores`` is float32 ``[K, z, y, x]`` on the input grid: softmax probabilities
    (channel 0 = background), sigmoid probabilities, or averaged ReLU scores,
    following the card's ``inference.activation``.
    """

    labels: Volume
    scores: Optional[Volume]
    card: ModelCard


def validate_image(volume: Volume) -> None:
    """Raise :class:`InputError` for images that cannot be segmented (non-finite or constant values)."""
    array = volume.array
    if array.size == 0:
        raise InputError("the image is empty")
    if np.issubdtype(array.dtype, np.floating):
        bad = int(np.count_nonzero(~np.isfinite(array)))
        if bad:
            raise InputError(
                f"the image has {bad} voxel(s) that are NaN or infinite; replace them (e.g. with the minimum) first"
            )
    low, high = array.min(), array.max()
    if low == high:
        raise InputError(f"the image is constant (every voxel is {low}): there is nothing to segment")


def largest_component(labels: np.ndarray) -> np.ndarray:
    """Keep, for each label value, only its largest 26-connected component (in place; returned)."""
    from scipy import ndimage

    structure = np.ones((3,) * labels.ndim, dtype=bool)
    for value in np.unique(labels):
        if value == 0:
            continue
        mask = labels == value
        components, count = ndimage.label(mask, structure=structure)
        if count > 1:
            sizes = np.bincount(components.ravel())
            sizes[0] = 0
            labels[mask & (components != int(np.argmax(sizes)))] = 0
    return labels


def decode_scores(scores: np.ndarray, card: ModelCard, inference: InferenceSpec) -> np.ndarray:
    """Label values from ``[K, ...]`` scores: argmax for softmax, best channel above threshold otherwise."""
    values = [label.value for label in card.labels]
    dtype = np.uint8 if max(values) <= 255 else np.uint16
    if inference.activation == "softmax":
        lut = np.array([0, *values], dtype=dtype)
        return lut[np.argmax(scores, axis=0)]
    lut = np.array(values, dtype=dtype)
    best = np.argmax(scores, axis=0)
    top = np.take_along_axis(scores, best[None], axis=0)[0]
    return np.where(top > inference.threshold, lut[best], 0).astype(dtype)


class Predictor:
    """Runs a loaded model on volumes.

    Args:
        model: the network and its card (see :func:`MedSegSuiteLib.models.load_model`).
        device: ``auto`` (CUDA, else MPS, else CPU), ``cpu``, ``cuda`` or ``mps``.
        batch_size: slices (2D) or windows (3D) per network call; default from the card.
            Halved automatically after an out-of-memory error.
        overlap: 3D window overlap in [0, 1); default from the card.
        fast: use the card's ``inference.fast`` overrides (e.g. lower overlap).
        amp: autocast (bf16/fp16) on CUDA.
        channels_last: switch a 2D network to channels-last memory format (10-20% faster);
            this changes the network in place, so pass False for a network that is being trained.
    """

    def __init__(
        self,
        model: LoadedModel,
        device: Union[str, torch.device] = "auto",
        batch_size: Optional[int] = None,
        overlap: Optional[float] = None,
        fast: bool = False,
        amp: bool = True,
        channels_last: bool = True,
    ) -> None:
        self.card = model.card
        self.device = resolve_device(device)
        self.network = model.network.to(self.device).eval()
        spec = self.card.inference
        changes: dict[str, Any] = dict(spec.fast) if fast else {}
        if overlap is not None:
            if not 0 <= overlap < 1:
                raise InputError(f"overlap must be in [0, 1), got {overlap}")
            changes["overlap"] = overlap
            changes.pop("stride_xyz", None)
            changes["stride_xyz"] = None
        if batch_size is not None:
            if batch_size < 1:
                raise InputError("batch size must be at least 1")
            changes["batch_size"] = batch_size
        if "stride_xyz" in changes and changes["stride_xyz"] is not None:
            changes["stride_xyz"] = tuple(changes["stride_xyz"])
        if "postprocess" in changes:
            changes["postprocess"] = tuple(changes["postprocess"])
        self.inference = InferenceSpec(**{**spec.__dict__, **changes})
        self.amp = amp
        self.channels_last = channels_last and self.card.dims == 2
        if self.channels_last:
            self.network = self.network.to(memory_format=torch.channels_last)
        self._logits = getattr(self.network, "predict_logits", self.network)

    # -- the network call -------------------------------------------------------------
    def _scores(self, batch: torch.Tensor) -> torch.Tensor:
        """Activated scores ``[B, K, ...]`` (float32, on the device) for a normalised batch."""
        with torch.inference_mode(), autocast(self.device, self.amp):
            logits = self._logits(batch.to(self.device, non_blocking=True))
        if not isinstance(logits, torch.Tensor):
            raise ModelError(f"network {self.card.network!r} did not return one logits tensor in eval mode")
        if logits.shape[1] != self.card.output_channels:
            raise ModelError(
                f"model card {self.card.id!r} lists {len(self.card.labels)} label(s), so the network should output "
                f"{self.card.output_channels} channels, but it outputs {logits.shape[1]}: the card's config is wrong"
            )
        logits = logits.float()
        activation = self.inference.activation
        if activation == "softmax":
            return torch.softmax(logits, dim=1)
        if activation == "sigmoid":
            return torch.sigmoid(logits)
        return torch.relu(logits)

    def _free_cache(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    # -- 2D: axial slices --------------------------------------------------------------
    def _run_slices(self, data: np.ndarray, sink, progress, cancel) -> None:  # noqa: ANN001
        depth, height, width = data.shape[1:]
        size = self.card.input.size_xy
        multiple = self.card.input.pad_multiple
        tensor = torch.from_numpy(data)

        def run_batch(start: int, stop: int) -> None:
            batch = tensor[:, start:stop].permute(1, 0, 2, 3)  # [B, C, y, x]
            if size is not None:
                batch = F.interpolate(batch, size=(size[1], size[0]), mode="bilinear", align_corners=False)
            h, w = batch.shape[-2:]
            ph, pw = (-h) % multiple, (-w) % multiple
            if ph or pw:
                batch = F.pad(batch, (0, pw, 0, ph))
            scores = self._scores(batch.contiguous(memory_format=torch.channels_last) if self.channels_last else batch)[
                ..., :h, :w
            ]
            if size is not None:
                scores = F.interpolate(scores, size=(height, width), mode="bilinear", align_corners=False)
            sink(start, stop, scores.permute(1, 0, 2, 3).cpu().numpy())

        run_in_batches(depth, self.inference.batch_size, run_batch, progress, cancel, "segmenting", self._free_cache)

    # -- 3D: sliding windows -------------------------------------------------------------
    def _window(self, shape: tuple[int, int, int]) -> SlidingWindow:
        patch = self.card.input.patch_xyz
        assert patch is not None
        stride = self.inference.stride_xyz
        return SlidingWindow(
            shape,
            (patch[2], patch[1], patch[0]),
            overlap=self.inference.overlap,
            stride=None if stride is None else (stride[2], stride[1], stride[0]),
            blend=self.inference.blend,
        )

    def _run_windows(self, data: np.ndarray, sink, progress, cancel, accumulator: torch.dtype) -> None:  # noqa: ANN001
        window = self._window(data.shape[1:])
        window.run(
            torch.from_numpy(data),
            self._scores,
            sink,
            self.inference.batch_size,
            progress,
            cancel,
            self._free_cache,
            accumulator,
        )

    def _check_memory(
        self, volume: Volume, net_shape: tuple[int, int, int], keep_scores: bool, accumulator: torch.dtype
    ) -> None:
        """Refuse, before allocating, a job whose large arrays would not fit in free memory."""
        voxels = float(np.prod(net_shape))
        channels = self.card.output_channels
        needed = voxels * self.card.input.channels * 4 + voxels + float(np.prod(volume.shape))  # data, labels, output
        if keep_scores:
            needed += voxels * channels * 4
        if self.card.dims == 3:
            needed += self._window(net_shape).buffer_bytes(channels, accumulator)
        check_fits(
            needed,
            f"segmenting this {' x '.join(map(str, volume.shape[::-1]))} image",
            "segment an ROI, use a lower-resolution copy, or a machine with more memory",
        )

    # -- the whole job ------------------------------------------------------------------
    def predict(
        self,
        volume: Volume,
        roi: Optional[Box] = None,
        scores: bool = False,
        progress: Optional[ProgressCallback] = None,
        cancel: Optional[threading.Event] = None,
    ) -> Prediction:
        """Segment ``volume`` (optionally only inside ``roi``); see the module docstring.

        Progress is reported as ``(done, total, stage)`` with slices (2D) or windows
        (3D) as units; ``cancel`` is checked between batches and raises
        :class:`~MedSegSuiteLib.errors.Cancelled`.
        """
        card = self.card
        report(progress, 0, 1, "preprocessing")
        if card.dims == 3 and volume.is_2d:
            raise InputError(f"model {card.id!r} segments 3D volumes; this is a single 2D image")
        validate_image(volume)
        work = crop(volume, roi) if roi is not None else volume
        canonical, transform = to_canonical(work)
        net_grid: Grid = canonical.grid
        if card.input.spacing is not None and card.dims == 3:
            target = resampled_grid(canonical.grid, card.input.spacing)
            if not target.same_as(canonical.grid, atol=1e-6):
                net_grid = target
        resampled = net_grid is not canonical.grid
        keep_scores = scores or resampled
        accumulator = torch.float32 if keep_scores else torch.float16
        self._check_memory(volume, net_grid.shape, keep_scores, accumulator)
        data = normalize(match_channels(canonical.channel_first(), card.input.channels), card.input.normalization)
        if resampled:
            data = resample(data, canonical.grid, net_grid, order=1)
        check_cancelled(cancel)
        channels = card.output_channels
        label_dtype = np.uint8 if max(label.value for label in card.labels) <= 255 else np.uint16
        labels = np.zeros(net_grid.shape, dtype=label_dtype)
        score_array = np.zeros((channels, *net_grid.shape), dtype=np.float32) if keep_scores else None

        def sink(z0: int, z1: int, part: np.ndarray) -> None:
            if score_array is not None:
                score_array[:, z0:z1] = part
            if not resampled:
                labels[z0:z1] = decode_scores(part, card, self.inference)

        if card.dims == 2:
            self._run_slices(data, sink, progress, cancel)
        else:
            self._run_windows(data, sink, progress, cancel, accumulator)
        check_cancelled(cancel)
        report(progress, 0, 1, "postprocessing")
        if resampled:
            assert score_array is not None
            score_array = resample(score_array, net_grid, canonical.grid, order=1)
            labels = decode_scores(score_array, card, self.inference)
        if "largest_component" in self.inference.postprocess:
            labels = largest_component(labels)
        label_volume = transform.restore(labels)
        score_volume = transform.restore(score_array) if scores and score_array is not None else None
        if roi is not None:
            label_volume = Volume.on_grid(paste(label_volume.array, roi, volume.grid), volume.grid)
            if score_volume is not None:
                full = paste(score_volume.array, roi, volume.grid)
                if self.inference.activation == "softmax":
                    outside = np.ones(volume.shape, dtype=bool)
                    outside[roi.numpy_slices()] = False
                    full[0][outside] = 1.0
                score_volume = Volume.on_grid(full, volume.grid)
        report(progress, 1, 1, "postprocessing")
        return Prediction(label_volume, score_volume, card)
