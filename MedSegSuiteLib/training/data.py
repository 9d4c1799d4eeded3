"""Training samples held in memory: 2D slices and 3D patches, with augmentation.

Images are prepared exactly as the Predictor prepares them (canonical orientation,
channel rule, the card's normalisation, the card's spacing), so a model sees the same
kind of input in training and in use. Labels are stored as class indices (0 =
background, ``i + 1`` = the card's ``labels[i]``).

Per-pixel normalisations (none, scale, imagenet, window) are applied after
augmentation, so colour jitter works on the original 0-255 colours; per-volume ones
(z-score, percentile) are applied once at load time.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field, fields, replace
from typing import Any, Iterator, Mapping, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import InputError
from ..geometry import resample, resampled_grid, to_canonical
from ..preprocessing import match_channels, normalize
from ..progress import check_cancelled
from ..volume import Volume

# (case id, image, label map or None)
Item = tuple[str, Volume, Optional[Volume]]

__all__ = [
    "Augment",
    "Item",
    "PatchStore",
    "SliceStore",
    "augment_2d",
    "augment_3d",
    "changed_augment",
    "class_index_map",
]

log = logging.getLogger(__name__)
_PER_PIXEL = ("none", "scale", "imagenet", "window")


def class_index_map(label: np.ndarray, values: Sequence[int], case_id: str) -> np.ndarray:
    """Map label values to class indices (``values[i]`` -> ``i + 1``); unknown values are refused."""
    lut = np.zeros(int(max(int(label.max()), max(values))) + 1, dtype=np.uint8)
    for index, value in enumerate(values):
        lut[value] = index + 1
    present = {int(v) for v in np.unique(label)} - {0}
    unknown = present - set(values)
    if unknown:
        raise InputError(
            f"case {case_id} has label value(s) {sorted(unknown)} that the model's label table "
            f"({', '.join(map(str, values))}) does not know"
        )
    return lut[label]


@dataclass
class Augment:
    """Random augmentation settings; probabilities in [0, 1], angles in degrees.

    2D: flips, rotation + isotropic scale (one affine), colour jitter for 8-bit RGB
    (brightness, contrast, saturation), specular highlights for 8-bit RGB (``specular``:
    share of images that get 1-4 soft white glints, as endoscope lights make on wet
    mucosa), cut-out holes. 3D: flips, in-plane rot90, rotation about
    every axis by up to ``rotate`` degrees with isotropic ``scale`` (one resampling of
    image and label together), intensity scale/shift and Gaussian noise (in normalised
    units), ``gamma`` (low, high) on the patch's intensity range, a smooth
    multiplicative ``bias_field`` (its largest relative change), and ``fov_pad``:
    patches may reach this many voxels past the image edge (filled with 0, the
    normalised empty background), so a model sees structures near an image border and
    empty surroundings. ``flip_axes`` names the axes that may flip, in canonical
    orientation (x: left-right, y: anterior-posterior, z: inferior-superior; a 2D image's
    x and y): "x" keeps anatomy whose labels differ front to back or top to bottom (for
    example anterior and posterior hippocampus) from being mirrored into the wrong label.
    """

    flip: float = 0.5
    flip_axes: str = "xyz"
    rotate: float = 0.0
    rotate_p: float = 0.5
    scale: tuple[float, float] = (1.0, 1.0)
    colour: float = 0.0
    specular: float = 0.0
    cutout: float = 0.0
    intensity: float = 0.1
    noise: float = 0.0
    rot90: bool = True
    gamma: tuple[float, float] = (1.0, 1.0)
    bias_field: float = 0.0
    fov_pad: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


def changed_augment(augment: Augment, changes: Any) -> Augment:
    """``augment`` with the fields named in ``changes`` (a ``{field: value}`` dict, e.g. from
    ``--recipe augment={'flip_axes':'x'}``) replaced; an Augment replaces it whole, None keeps it."""
    if changes is None or isinstance(changes, Augment):
        return changes or augment
    known = {f.name for f in fields(Augment)}
    if not isinstance(changes, dict) or set(changes) - known:
        raise InputError(f"--recipe augment= takes a dict of augmentation settings among: {', '.join(sorted(known))}")
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in changes.items()}
    if set(values.get("flip_axes", "")) - set("xyz"):
        raise InputError(f"augment flip_axes takes some of x, y and z, got {values['flip_axes']!r}")
    return replace(augment, **values)


def _prepare(
    image: Volume,
    label: Optional[Volume],
    channels: int,
    normalization: Mapping[str, Any],
    spacing: Optional[Sequence[float]],
) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """Canonical, channel-matched, (per-volume) normalised image ``[C, z, y, x]`` and label ``[z, y, x]``."""
    canonical, transform = to_canonical(image)
    data = match_channels(canonical.channel_first(), channels).astype(np.float32)
    if normalization["kind"] not in _PER_PIXEL:
        data = normalize(data, normalization)
    labels = transform.apply(label.array) if label is not None else None
    if spacing is not None:
        target = resampled_grid(canonical.grid, spacing)
        if not target.same_as(canonical.grid, atol=1e-6):
            data = resample(data, canonical.grid, target, order=1)
            labels = (
                resample(np.ascontiguousarray(labels), canonical.grid, target, order=0) if labels is not None else None
            )
    return np.ascontiguousarray(data), (np.ascontiguousarray(labels) if labels is not None else None)


def _prepared(items: Sequence[Item], prepare, cancel) -> Iterator[tuple]:  # noqa: ANN001
    """Prepared items one at a time, so only one full-resolution float copy exists at once."""
    for case_id, image, label in items:
        check_cancelled(cancel)
        yield (case_id, *prepare(image, label))


class SliceStore:
    """2D training slices resized to ``size`` (x, y): images ``[N, C, h, w]``, classes uint8 ``[N, h, w]``.

    Images are kept in float16 where their values fit it (8-bit photos, normalised
    volumes), in float32 otherwise (raw MRI intensities can exceed float16's range).

    ``items`` are (case id, image, label or None): 2D images or 3D volumes (their axial
    slices). Label values are mapped to class indices by ``values`` (or, if None, by
    :meth:`remap` once the label table is known). Unlabelled cases get class 255
    ("unknown") everywhere.
    """

    def __init__(
        self,
        items: Sequence[Item],
        values: Optional[Sequence[int]],
        channels: int,
        normalization: Mapping[str, Any],
        size: Sequence[int],
        cancel=None,  # noqa: ANN001
    ) -> None:
        self.normalization = dict(normalization)
        self.size = (int(size[1]), int(size[0]))  # (h, w)
        images, raw, case_index = [], [], []
        loaded = _prepared(items, lambda i, lb: _prepare(i, lb, channels, normalization, None), cancel)
        for number, (_case_id, data, label) in enumerate(loaded):
            tensor = torch.from_numpy(data).permute(1, 0, 2, 3)  # [z, C, y, x]
            images.append(F.interpolate(tensor, size=self.size, mode="bilinear", align_corners=False))
            if label is None:
                raw.append(None)
            else:
                resized = F.interpolate(
                    torch.from_numpy(label.astype(np.float32))[:, None], size=self.size, mode="nearest"
                )
                raw.append(resized[:, 0].numpy().astype(label.dtype))
            case_index += [number] * tensor.shape[0]
        self.images = torch.cat(images)
        if self.images.numel() and float(self.images.abs().max()) < 60000:  # float16 holds it: half the memory
            self.images = self.images.half()
        self._raw = raw
        self.case_index = torch.tensor(case_index)
        self.ids = [case_id for case_id, _, _ in items]
        self.values = sorted({int(v) for r in raw if r is not None for v in np.unique(r) if v != 0})
        self.rgb8 = (
            channels == 3
            and self.normalization["kind"] in ("scale", "imagenet")
            and float(self.normalization.get("divisor", 255)) == 255.0
        )
        self.remap(values if values is not None else self.values)

    def remap(self, values: Sequence[int]) -> None:
        """Turn the stored label values into class indices by the label table ``values``."""
        classes = []
        for case_id, raw, count in zip(
            self.ids, self._raw, np.bincount(self.case_index.numpy(), minlength=len(self.ids))
        ):
            if raw is None:
                classes.append(torch.full((int(count), *self.size), 255, dtype=torch.uint8))
            else:
                classes.append(torch.from_numpy(class_index_map(raw, values, case_id)))
        self.classes = torch.cat(classes)
        foreground = ((self.classes > 0) & (self.classes < 255)).flatten(1).any(1)
        self.foreground_slices = torch.nonzero(foreground).flatten()

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def sample(
        self, generator: torch.Generator, batch_size: int, augment: Augment, foreground: float = 0.5
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A random augmented batch: normalised images float32 ``[B, C, h, w]`` and classes long ``[B, h, w]``."""
        count = len(self)
        picks = torch.randint(0, count, (batch_size,), generator=generator)
        if len(self.foreground_slices) and foreground > 0:
            use_fg = torch.rand(batch_size, generator=generator) < foreground
            fg = self.foreground_slices[
                torch.randint(0, len(self.foreground_slices), (batch_size,), generator=generator)
            ]
            picks = torch.where(use_fg, fg, picks)
        images = self.images[picks].float()
        classes = self.classes[picks].long()
        images, classes = augment_2d(images, classes, augment, generator, rgb8=self.rgb8)
        return normalize_batch(images, self.normalization), classes


def normalize_batch(images: torch.Tensor, normalization: Mapping[str, Any]) -> torch.Tensor:
    """Apply a per-pixel normalisation (none, scale, imagenet, window) to a ``[B, C, ...]`` batch; others pass."""
    if normalization["kind"] not in _PER_PIXEL:
        return images
    array = normalize(images.transpose(0, 1).numpy(), normalization)
    return torch.from_numpy(array).transpose(0, 1).contiguous()


def _flip_dims(augment: Augment, dims: int) -> tuple[int, ...]:
    """Tensor dimensions of a ``[B|C, (z,) y, x]`` image that ``augment.flip_axes`` lets flip (z: 3D only)."""
    if set(augment.flip_axes) - set("xyz"):
        raise ValueError(f"flip_axes takes some of x, y and z, got {augment.flip_axes!r}")
    chosen = [3 - "xyz".index(axis) for axis in "xyz"[:dims] if axis in augment.flip_axes]
    return tuple(chosen if dims == 2 else reversed(chosen))  # x, y in 2D; z, y, x in 3D


def augment_2d(
    images: torch.Tensor, classes: torch.Tensor, augment: Augment, generator: torch.Generator, rgb8: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Flip, rotate/scale (one affine), colour-jitter (8-bit RGB) and cut out a ``[B, C, h, w]`` batch + classes."""
    batch = images.shape[0]
    rand = lambda *shape: torch.rand(*shape, generator=generator)  # noqa: E731
    for dim in _flip_dims(augment, 2):
        flip = rand(batch) < augment.flip
        images[flip] = images[flip].flip(dim)
        classes[flip] = classes[flip].flip(dim - 1)
    if augment.rotate > 0 or augment.scale != (1.0, 1.0):
        angle = (rand(batch) * 2 - 1) * math.radians(augment.rotate) * (rand(batch) < augment.rotate_p)
        low, high = augment.scale
        zoom = torch.exp(rand(batch) * (math.log(high) - math.log(low)) + math.log(low))
        cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
        theta = torch.stack(
            [torch.stack([cos, -sin, torch.zeros(batch)], 1), torch.stack([sin, cos, torch.zeros(batch)], 1)], 1
        )
        grid = F.affine_grid(theta, list(images.shape), align_corners=False)
        fill = images.flatten(2).min(2).values[:, :, None, None] if not rgb8 else 0.0
        images = F.grid_sample(images - fill, grid, mode="bilinear", padding_mode="zeros", align_corners=False) + fill
        inside = F.grid_sample(torch.ones_like(classes[:, None]).float(), grid, mode="nearest", align_corners=False)
        classes = F.grid_sample(classes[:, None].float(), grid, mode="nearest", align_corners=False)[:, 0].long()
        classes[inside[:, 0] == 0] = 0
    if rgb8 and augment.colour > 0:
        strength = augment.colour
        x = images / 255.0
        brightness = 1 + (rand(batch, 1, 1, 1) * 2 - 1) * strength
        contrast = 1 + (rand(batch, 1, 1, 1) * 2 - 1) * strength
        saturation = 1 + (rand(batch, 1, 1, 1) * 2 - 1) * strength
        x = x * brightness
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        x = (x - mean) * contrast + mean
        grey = 0.299 * x[:, :1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]
        x = (x - grey) * saturation + grey
        images = x.clamp(0, 1) * 255.0
    if rgb8 and augment.specular > 0:
        images = add_specular_highlights(images, augment.specular, generator)
    if augment.cutout > 0:
        h, w = images.shape[-2:]
        for b in torch.nonzero(rand(batch) < augment.cutout).flatten().tolist():
            for _ in range(int(torch.randint(1, 6, (1,), generator=generator))):
                size = max(1, int(min(h, w) * 0.125 * float(rand(1))))
                y0 = int(torch.randint(0, max(1, h - size), (1,), generator=generator))
                x0 = int(torch.randint(0, max(1, w - size), (1,), generator=generator))
                images[b, :, y0 : y0 + size, x0 : x0 + size] = 0
    return images, classes


def add_specular_highlights(images: torch.Tensor, probability: float, generator: torch.Generator) -> torch.Tensor:
    """Blend 1-4 soft, elongated white glints into a share ``probability`` of a 0-255 RGB ``[B, 3, h, w]`` batch."""
    batch, _, h, w = images.shape
    rand = lambda *shape: torch.rand(*shape, generator=generator)  # noqa: E731
    chosen = torch.nonzero(rand(batch) < probability).flatten().tolist()
    if not chosen:
        return images
    ys = torch.arange(h, dtype=torch.float32)[:, None]
    xs = torch.arange(w, dtype=torch.float32)[None, :]
    images = images.clone()
    for b in chosen:
        glint = torch.zeros(h, w)
        for _ in range(int(torch.randint(1, 5, (1,), generator=generator))):
            cy, cx = float(rand(1)) * h, float(rand(1)) * w
            sy, sx = (0.005 + 0.03 * rand(2)) * min(h, w)
            angle = float(rand(1)) * math.pi
            dy, dx = ys - cy, xs - cx
            u = dx * math.cos(angle) + dy * math.sin(angle)
            v = -dx * math.sin(angle) + dy * math.cos(angle)
            blob = torch.exp(-0.5 * ((u / sx) ** 2 + (v / sy) ** 2))
            glint = torch.maximum(glint, (blob * (1.3 + 0.7 * float(rand(1)))).clamp(max=1.0))
        images[b] = images[b] + (255.0 - images[b]) * glint
    return images


class PatchStore:
    """3D training volumes in memory (canonical, normalised, at the card's spacing) sampled as patches.

    ``items`` are (case id, image, label or None). Label values become class indices
    by ``values`` (or later by :meth:`remap`).
    """

    def __init__(
        self,
        items: Sequence[Item],
        values: Optional[Sequence[int]],
        channels: int,
        normalization: Mapping[str, Any],
        spacing: Optional[Sequence[float]] = None,
        cancel=None,  # noqa: ANN001
    ) -> None:
        self.normalization = dict(normalization)
        self.volumes: list[np.ndarray] = []
        self._raw: list[Optional[np.ndarray]] = []
        self.ids = [case_id for case_id, _, _ in items]
        loaded = _prepared(items, lambda i, lb: _prepare(i, lb, channels, normalization, spacing), cancel)
        for _case_id, data, label in loaded:
            if self.normalization["kind"] in _PER_PIXEL:
                data = normalize(data, self.normalization)
            self.volumes.append(data)
            self._raw.append(label)
        self.values = sorted({int(v) for r in self._raw if r is not None for v in np.unique(r) if v != 0})
        self.remap(values if values is not None else self.values)

    def remap(self, values: Sequence[int]) -> None:
        """Turn the stored label values into class indices by the label table ``values``."""
        self.classes: list[Optional[np.ndarray]] = []
        self.foreground: list[np.ndarray] = []
        for case_id, raw in zip(self.ids, self._raw):
            mapped = class_index_map(raw, values, case_id) if raw is not None else None
            self.classes.append(mapped)
            self.foreground.append(
                np.argwhere(mapped > 0).astype(np.int32) if mapped is not None else np.zeros((0, 3), np.int32)
            )

    def __len__(self) -> int:
        return len(self.volumes)

    def sample(
        self,
        generator: torch.Generator,
        batch_size: int,
        patch_zyx: Sequence[int],
        augment: Augment,
        foreground: float = 0.33,
        indices: Optional[Sequence[int]] = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A batch of patches: images float32 ``[B, C, *patch]`` and classes long ``[B, *patch]`` (255 = unlabelled)."""
        images, classes = [], []
        pool = list(indices) if indices is not None else list(range(len(self)))
        for _ in range(batch_size):
            index = pool[int(torch.randint(0, len(pool), (1,), generator=generator))]
            volume, labels, fg = self.volumes[index], self.classes[index], self.foreground[index]
            shape = volume.shape[1:]
            if len(fg) and float(torch.rand(1, generator=generator)) < foreground:
                centre = fg[int(torch.randint(0, len(fg), (1,), generator=generator))]
            else:
                centre = [int(torch.randint(0, s, (1,), generator=generator)) for s in shape]
            start = [int(c) - p // 2 for c, p in zip(centre, patch_zyx)]
            start = [min(max(s, min(0, n - p)), max(0, n - p)) for s, n, p in zip(start, shape, patch_zyx)]
            if augment.fov_pad > 0:
                pad = augment.fov_pad
                start = [s + int(torch.randint(-pad, pad + 1, (1,), generator=generator)) for s in start]
            image_patch = _crop_pad(volume, start, patch_zyx, 0.0)
            label_patch = (
                _crop_pad(labels[None], start, patch_zyx, 0)[0]
                if labels is not None
                else np.full(patch_zyx, 255, np.uint8)
            )
            images.append(torch.from_numpy(image_patch))
            classes.append(torch.from_numpy(label_patch.astype(np.int64)))
        return augment_3d(torch.stack(images), torch.stack(classes), augment, generator)


def _crop_pad(array: np.ndarray, start: Sequence[int], size: Sequence[int], fill: float) -> np.ndarray:
    """``array[:, start:start+size]`` per spatial axis, padded with ``fill`` where it leaves the array."""
    out = np.full((array.shape[0], *size), fill, dtype=array.dtype)
    src, dst = [], []
    for s, n, p in zip(start, array.shape[1:], size):
        a, b = max(s, 0), min(s + p, n)
        src.append(slice(a, b))
        dst.append(slice(a - s, b - s))
    out[(slice(None), *dst)] = array[(slice(None), *src)]
    return out


def augment_3d(
    images: torch.Tensor, classes: torch.Tensor, augment: Augment, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Flip every axis, rot90 in-plane (square patches), scale/shift intensities and add noise, per sample."""
    rand = lambda *shape: torch.rand(*shape, generator=generator)  # noqa: E731
    out_i, out_c = [], []
    for image, label in zip(images, classes):
        for axis in _flip_dims(augment, 3):
            if float(rand(1)) < augment.flip:
                image, label = image.flip(axis), label.flip(axis - 1)
        if augment.rot90 and image.shape[-1] == image.shape[-2]:
            k = int(torch.randint(0, 4, (1,), generator=generator))
            image, label = torch.rot90(image, k, (2, 3)), torch.rot90(label, k, (1, 2))
        if (augment.rotate > 0 or augment.scale != (1.0, 1.0)) and float(rand(1)) < augment.rotate_p:
            image, label = _rotate_scale_3d(image, label, augment, generator)
        if augment.bias_field > 0:
            image = image * _bias_field(image.shape[1:], augment.bias_field, generator)
        if augment.gamma != (1.0, 1.0):
            low, high = augment.gamma
            gamma = math.exp(float(rand(1)) * (math.log(high) - math.log(low)) + math.log(low))
            lo, hi = float(image.min()), float(image.max())
            if hi > lo:
                image = ((image - lo) / (hi - lo)).pow(gamma) * (hi - lo) + lo
        if augment.intensity > 0:
            scale = 1 + (float(rand(1)) * 2 - 1) * augment.intensity
            shift = (float(rand(1)) * 2 - 1) * augment.intensity
            image = image * scale + shift
        if augment.noise > 0:
            image = image + torch.randn(image.shape, generator=generator) * augment.noise * float(rand(1))
        out_i.append(image.contiguous())
        out_c.append(label.contiguous())
    return torch.stack(out_i), torch.stack(out_c)


def _rotate_scale_3d(
    image: torch.Tensor, label: torch.Tensor, augment: Augment, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate ``[C, z, y, x]`` + ``[z, y, x]`` about all three axes and zoom, around the centre; outside is 0."""
    rand = lambda *shape: torch.rand(*shape, generator=generator)  # noqa: E731
    angles = (rand(3) * 2 - 1) * math.radians(augment.rotate)
    low, high = augment.scale
    zoom = math.exp(float(rand(1)) * (math.log(high) - math.log(low)) + math.log(low))
    rotation = torch.eye(3)
    for axis, angle in enumerate(angles.tolist()):
        c, s = math.cos(angle), math.sin(angle)
        a, b = [i for i in range(3) if i != axis]
        turn = torch.eye(3)
        turn[a, a], turn[a, b], turn[b, a], turn[b, b] = c, -s, s, c
        rotation = turn @ rotation
    # affine_grid works in normalised (x, y, z) coordinates; keep voxels cubic for unequal patch sides
    size = torch.tensor(image.shape[1:][::-1], dtype=torch.float32)
    matrix = torch.diag(1 / size) @ rotation @ torch.diag(size) / zoom
    theta = torch.cat([matrix, torch.zeros(3, 1)], 1)[None]
    grid = F.affine_grid(theta, [1, *image.shape], align_corners=False)
    image = F.grid_sample(image[None], grid, mode="bilinear", padding_mode="zeros", align_corners=False)[0]
    known = (label != 255).float()[None, None]
    label_float = torch.where(label == 255, torch.zeros_like(label), label).float()[None, None]
    label_out = F.grid_sample(label_float, grid, mode="nearest", align_corners=False)[0, 0].long()
    if float(known.min()) == 0:
        unknown = F.grid_sample(1 - known, grid, mode="nearest", align_corners=False)[0, 0] > 0
        label_out[unknown] = 255
    return image.contiguous(), label_out


def _bias_field(shape: Sequence[int], strength: float, generator: torch.Generator) -> torch.Tensor:
    """A smooth multiplicative field over ``shape`` (z, y, x): exp of a random quadratic, within 1 +- ``strength``."""
    axes = torch.meshgrid(*[torch.linspace(-1, 1, n) for n in shape], indexing="ij")
    terms = [*axes] + [a * b for i, a in enumerate(axes) for b in axes[i:]]
    coefficients = torch.rand(len(terms), generator=generator) * 2 - 1
    field = sum(c * t for c, t in zip(coefficients, terms))
    field = field / field.abs().max().clamp_min(1e-6) * math.log1p(strength)
    return torch.exp(field)
