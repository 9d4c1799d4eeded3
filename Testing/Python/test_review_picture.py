"""The review picture: three orthogonal views in the radiological orientation whatever the file's axis order,
square millimetres, solid predicted and dashed reference contours in the label colours."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from MedSegSuiteLib.errors import InputError
from MedSegSuiteLib.review_picture import ContourLabel, _tile, _views, review_png
from MedSegSuiteLib.volume import Volume

SHAPE = (20, 24, 28)  # (k, j, i)
SPACING = (1.0, 1.5, 2.0)  # (x, y, z) mm
LABELS = [ContourLabel(1, "Blob", (250, 40, 40), 0.9), ContourLabel(2, "Bar", (40, 120, 250), 0.8)]


def _scene() -> tuple[np.ndarray, np.ndarray]:
    """An image with a gradient, and labels: a blob towards the patient's left, front and top (LPS: high i,
    low j, high k on an identity grid), and a bar elsewhere."""
    k, j, i = np.mgrid[: SHAPE[0], : SHAPE[1], : SHAPE[2]]
    image = (k + 2 * j + 3 * i).astype(np.float32)
    labels = np.zeros(SHAPE, np.uint8)
    labels[13:18, 3:8, 19:25] = 1
    labels[14:16, 4:7, 5:10] = 2
    return image, labels


def _where(mask: np.ndarray) -> tuple[float, float]:
    """Centre of a 2D mask as fractions of its (rows, cols)."""
    rows, cols = np.nonzero(mask)
    return rows.mean() / mask.shape[0], cols.mean() / mask.shape[1]


def test_views_are_radiological_and_do_not_depend_on_the_files_axis_order():
    image, labels = _scene()
    identity = _views(Volume(image, SPACING, (0.0, 0.0, 0.0)), Volume(labels, SPACING, (0.0, 0.0, 0.0)), None)
    axial, coronal, sagittal = (_where(view.predicted == 1) for view in identity)
    assert axial[0] < 0.5 < axial[1], "axial: anterior up, the patient's left on the right"
    assert coronal[0] < 0.5 < coronal[1], "coronal: superior up, the patient's left on the right"
    assert sagittal[0] < 0.5 and sagittal[1] < 0.5, "sagittal: superior up, anterior on the left"
    assert [v.markers for v in identity] == [("A", "P", "R", "L"), ("S", "I", "R", "L"), ("S", "I", "A", "P")]
    assert [v.pixel_mm for v in identity] == [(1.5, 1.0), (2.0, 1.0), (2.0, 1.5)]

    # The same patient stored with i towards the right and j towards the front (as NIfTI files often are).
    flipped_direction = np.diag([-1.0, -1.0, 1.0])
    origin = ((SHAPE[2] - 1) * SPACING[0], (SHAPE[1] - 1) * SPACING[1], 0.0)
    flipped = _views(
        Volume(image[:, ::-1, ::-1].copy(), SPACING, origin, flipped_direction),
        Volume(labels[:, ::-1, ::-1].copy(), SPACING, origin, flipped_direction),
        None,
    )
    for a, b in zip(identity, flipped):
        assert np.array_equal(a.predicted, b.predicted) and np.allclose(a.image, b.image), a.name
        assert a.caption.split(",")[0] == b.caption.split(",")[0], "the same position in mm"
    assert "slice k = " in identity[0].caption and "slice j = " in flipped[1].caption


def test_tiles_have_square_millimetres_and_draw_each_label_in_its_colour():
    image, labels = _scene()
    views = _views(Volume(image, SPACING), Volume(labels, SPACING), Volume(np.roll(labels, 3, axis=2), SPACING))
    sagittal = views[2]
    tile = _tile(sagittal, scale=4.0, labels=LABELS)
    rows, cols = sagittal.image.shape
    assert tile.shape == (round(rows * 2.0 * 4), round(cols * 1.5 * 4), 3)
    axial = _tile(views[0], scale=4.0, labels=LABELS)
    for label in LABELS:
        assert (axial == label.color).all(2).sum() > 20, label.name


def test_the_picture_has_three_views_a_legend_and_refuses_what_it_cannot_show(tmp_path):
    image, labels = _scene()
    reference = np.roll(labels, 2, axis=1)
    path = review_png(
        Volume(image, SPACING),
        Volume(labels, SPACING),
        LABELS,
        tmp_path / "review.png",
        reference=Volume(reference, SPACING),
        title="synthetic",
    )
    picture = np.asarray(Image.open(path).convert("RGB"))
    assert picture.shape[1] >= 700 and picture.shape[0] >= 300
    for label in LABELS:
        assert (picture == label.color).all(2).sum() > 100, label.name

    with pytest.raises(InputError, match="3D volume"):
        review_png(Volume(image[:1]), Volume(labels[:1]), LABELS, tmp_path / "flat.png")
    with pytest.raises(InputError, match="share a grid"):
        review_png(Volume(image), Volume(labels[1:]), LABELS, tmp_path / "other.png")
    assert not (tmp_path / "flat.png").exists() and not (tmp_path / "other.png").exists()
