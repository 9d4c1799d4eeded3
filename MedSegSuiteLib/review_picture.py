"""A review picture of a 3D segmentation: axial, coronal and sagittal views through the
structure, the prediction's contours (solid) over the reference's (dashed), a legend with
label names and Dice, slice positions and orientation markers.

Views follow the radiological convention of 3D Slicer: the patient's right is on the
picture's left in axial and coronal views, anterior is on the left in sagittal views, and
superior is up. Pixels are square in millimetres (anisotropic voxels are stretched).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import numpy as np

from .errors import InputError
from .geometry import to_canonical
from .io.atomic import atomic_output
from .volume import Volume

__all__ = ["ContourLabel", "review_png"]

TILE_PX = 320  # the longest side of the largest view
MARGIN = 14
DASH = 5  # dash length of reference contours, in pixels
BACKGROUND = (24, 24, 28)
TEXT = (235, 235, 235)


@dataclass(frozen=True)
class ContourLabel:
    """One label to draw: its value in both label maps, name, RGB colour and Dice (None: not known)."""

    value: int
    name: str
    color: tuple[int, int, int]
    dice: Optional[float] = None


@dataclass(frozen=True)
class _View:
    name: str
    image: np.ndarray  # (rows, cols) float in [0, 1]
    predicted: np.ndarray  # (rows, cols) label values
    reference: Optional[np.ndarray]
    pixel_mm: tuple[float, float]  # (row, col) spacing
    markers: tuple[str, str, str, str]  # top, bottom, left, right
    caption: str


def _grey(array: np.ndarray) -> np.ndarray:
    low, high = np.percentile(array, [1, 99.5])
    return np.clip((array.astype(np.float32) - low) / max(float(high - low), 1e-6), 0, 1)


def _centre(masks: Sequence[np.ndarray], shape: tuple[int, ...]) -> tuple[int, int, int]:
    """The (k, j, i) voxel at the centre of mass of everything labelled (the middle if nothing is)."""
    union = np.zeros(shape, bool)
    for mask in masks:
        union |= mask > 0
    if not union.any():
        return tuple(n // 2 for n in shape)  # type: ignore[return-value]
    return tuple(int(round(c)) for c in np.argwhere(union).mean(0))  # type: ignore[return-value]


def _views(image: Volume, predicted: Volume, reference: Optional[Volume]) -> list[_View]:
    canonical, transform = to_canonical(image)  # array (k, j, i): i towards L, j towards P, k towards S
    grey = _grey(canonical.channel_first()[0])
    pred = transform.apply(predicted.array)
    ref = transform.apply(reference.array) if reference is not None else None
    k, j, i = _centre([pred] + ([ref] if ref is not None else []), grey.shape)
    sx, sy, sz = canonical.spacing
    world = canonical.grid.index_to_physical((i, j, k))  # LPS mm; captions use RAS like Slicer
    flip = slice(None, None, -1)

    def cut(array: Optional[np.ndarray], index: tuple) -> Optional[np.ndarray]:
        return None if array is None else array[index]

    def caption(lps_axis: int, letter: str, sign: float) -> str:
        """Position along the view's normal in RAS mm (as Slicer shows it) and as the file's own voxel index."""
        direction = np.asarray(image.direction)
        axis = int(np.argmax(np.abs(direction[lps_axis])))  # the file's index axis closest to that normal
        index = int(round(float(image.grid.physical_to_index(world)[axis])))
        size = image.shape[2 - axis]
        return f"{letter} {sign * world[lps_axis]:.1f} mm, slice {'ijk'[axis]} = {index} of 0-{size - 1}"

    whole = slice(None)
    return [
        _View("Axial", grey[k], pred[k], cut(ref, k), (sy, sx), ("A", "P", "R", "L"), caption(2, "S", 1)),
        _View(
            "Coronal",
            grey[flip, j],
            pred[flip, j],
            cut(ref, (flip, j)),
            (sz, sx),
            ("S", "I", "R", "L"),
            caption(1, "A", -1),
        ),
        _View(
            "Sagittal",
            grey[flip, whole, i],
            pred[flip, whole, i],
            cut(ref, (flip, whole, i)),
            (sz, sy),
            ("S", "I", "A", "P"),
            caption(0, "R", -1),
        ),
    ]


def _resize(array: np.ndarray, size: tuple[int, int], smooth: bool) -> np.ndarray:
    """``array`` (rows, cols) resampled to ``size`` = (width, height), bilinear or nearest."""
    from PIL import Image

    resample = Image.BILINEAR if smooth else Image.NEAREST
    return np.asarray(Image.fromarray(np.ascontiguousarray(array, dtype=np.float32)).resize(size, resample))


def _erode(mask: np.ndarray, border: bool = False) -> np.ndarray:
    """One step of 4-neighbour erosion; ``border``: what lies beyond the picture's edge."""
    padded = np.pad(mask, 1, constant_values=border)
    return padded[1:-1, 1:-1] & padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]


def _outline(mask: np.ndarray, outside: bool, width: int = 2) -> np.ndarray:
    """The band of ``width`` pixels just inside (or just outside) the boundary of a boolean mask.

    Predictions are drawn inside and references outside their boundaries, so where the
    two agree both lines show side by side instead of one hiding the other.
    """
    core = ~mask if outside else mask  # the band outside a mask is the band inside its complement
    inner = core
    for _ in range(width):
        inner = _erode(inner, border=outside)
    return core & ~inner


def _tile(view: _View, scale: float, labels: Sequence[ContourLabel]) -> np.ndarray:
    """The view as an RGB uint8 array, ``scale`` pixels per mm, with the contours drawn in."""
    rows, cols = view.image.shape
    size = (max(1, round(cols * view.pixel_mm[1] * scale)), max(1, round(rows * view.pixel_mm[0] * scale)))
    rgb = np.repeat(_resize(view.image, size, smooth=True)[..., None], 3, axis=2)
    yy, xx = np.mgrid[: size[1], : size[0]]
    dashes = ((yy // DASH) + (xx // DASH)) % 2 == 0
    for source, is_reference in ((view.reference, True), (view.predicted, False)):
        if source is None:
            continue
        for label in labels:
            mask = _resize((source == label.value).astype(np.float32), size, smooth=True) >= 0.5
            line = _outline(mask, outside=is_reference)
            if is_reference:
                line &= dashes
            rgb[line] = np.asarray(label.color, np.float32) / 255.0
    return (np.clip(rgb, 0, 1) * 255).round().astype(np.uint8)


def _font(size: int):  # noqa: ANN202
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: one fixed bitmap size
        return ImageFont.load_default()


def _markers(draw, box: tuple[int, int, int, int], markers: tuple[str, str, str, str], font) -> None:  # noqa: ANN001
    left, top, right, bottom = box
    middle_x, middle_y = (left + right) // 2, (top + bottom) // 2
    style = dict(font=font, fill=(255, 230, 90), stroke_width=2, stroke_fill=(0, 0, 0))
    draw.text((middle_x, top + 3), markers[0], anchor="mt", **style)
    draw.text((middle_x, bottom - 3), markers[1], anchor="mb", **style)
    draw.text((left + 4, middle_y), markers[2], anchor="lm", **style)
    draw.text((right - 4, middle_y), markers[3], anchor="rm", **style)


def review_png(
    image: Volume,
    predicted: Volume,
    labels: Sequence[ContourLabel],
    path: Union[str, Path],
    reference: Optional[Volume] = None,
    title: str = "",
    prediction_name: str = "prediction",
    overwrite: bool = True,
) -> Path:
    """Write a PNG with axial, coronal and sagittal views through the centre of the labelled structure.

    ``predicted`` (and ``reference``, if given) are label maps on ``image``'s grid; each of
    ``labels`` is drawn as a solid contour where predicted and a dashed contour where the
    reference has it. The legend names every label with its Dice. Returns ``path``.
    """
    from PIL import Image, ImageDraw

    if image.is_2d:
        raise InputError("the review picture shows three orthogonal views: it needs a 3D volume, not a 2D image")
    for other, what in ((predicted, "prediction"), (reference, "reference")):
        if other is not None and other.shape != image.shape:
            raise InputError(f"the {what} has {other.shape} voxels, the image {image.shape}: they must share a grid")
    views = _views(image, predicted, reference)
    extent_mm = max(max(v.image.shape[0] * v.pixel_mm[0], v.image.shape[1] * v.pixel_mm[1]) for v in views)
    scale = TILE_PX / extent_mm
    tiles = [_tile(view, scale, labels) for view in views]

    font, small = _font(17), _font(14)
    caption_h, line_h = 44, 24
    legend_rows = len(labels) + 1
    width = sum(t.shape[1] for t in tiles) + MARGIN * (len(tiles) + 1)
    title_h = 34 if title else 0
    height = title_h + MARGIN + caption_h + max(t.shape[0] for t in tiles) + MARGIN + legend_rows * line_h + MARGIN
    canvas = Image.new("RGB", (max(width, 560), height), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((MARGIN, MARGIN), title, font=font, fill=TEXT)
    x, top = MARGIN, title_h + MARGIN
    for view, tile in zip(views, tiles):
        draw.text((x, top), view.name, font=font, fill=TEXT)
        draw.text((x, top + 22), view.caption, font=small, fill=(190, 190, 190))
        canvas.paste(Image.fromarray(tile), (x, top + caption_h))
        box = (x, top + caption_h, x + tile.shape[1], top + caption_h + tile.shape[0])
        _markers(draw, box, view.markers, small)
        x += tile.shape[1] + MARGIN

    y = top + caption_h + max(t.shape[0] for t in tiles) + MARGIN
    solid, dashed = f"solid: {prediction_name}", "dashed: reference" if reference is not None else ""
    draw.text((MARGIN, y), "   ".join(filter(None, (solid, dashed))), font=small, fill=TEXT)
    for n, label in enumerate(labels, start=1):
        row = y + n * line_h + line_h // 2
        draw.line((MARGIN, row, MARGIN + 34, row), fill=tuple(label.color), width=3)
        if reference is not None:
            for start in range(MARGIN + 44, MARGIN + 78, 2 * DASH):
                draw.line((start, row, start + DASH - 1, row), fill=tuple(label.color), width=3)
        dice = "" if label.dice is None else f"   Dice {label.dice:.3f}"
        draw.text((MARGIN + 90, row), f"{label.value}  {label.name}{dice}", font=small, fill=TEXT, anchor="lm")
    with atomic_output(path, overwrite=overwrite) as tmp:
        canvas.save(tmp, format="PNG")
    return Path(path)
