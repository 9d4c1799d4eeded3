"""Finding and loading training cases: image folders, label folders, HDF5 files and list files.

Accepted layouts for ``discover_cases(source)``:

- a folder with ``images/`` and ``labels/`` (or ``masks/``) holding files of the same
  name stem (``../shared/data/msd_hippocampus``, ``../shared/data/kvasir_seg``);
- a folder of ``.h5`` files (or one with an ``h5/`` sub-folder), each holding datasets
  ``image`` and, when labelled, ``label`` in x, y, z axis order
  (``../shared/data/la_mri_2018``);
- a folder of images only (unlabelled cases);
- a text file with one case per line, ``image[,label]``, paths relative to the file.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np

from ..errors import InputError
from ..io import IMAGE_SUFFIXES, compound_suffix, read_image
from ..volume import Volume

__all__ = ["Case", "discover_cases", "label_values", "load_case", "load_cases", "split_cases"]

log = logging.getLogger(__name__)
PathLike = Union[str, Path]
_LABEL_DIRS = ("labels", "masks", "labelsTr", "1st_manual")
_RASTER = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff")
_IMAGE_DIRS = ("images", "imagesTr")


@dataclass(frozen=True)
class Case:
    """One training case: an image file and, if labelled, its label file (or both inside one HDF5 file)."""

    id: str
    image: Path
    label: Optional[Path] = None
    hdf5: bool = False

    @property
    def labelled(self) -> bool:
        return self.label is not None


def _stem(path: Path) -> str:
    suffix = compound_suffix(path)
    return path.name[: len(path.name) - len(suffix)] if suffix else path.name


def _images_in(folder: Path, labels: bool = False) -> list[Path]:
    """Image files in ``folder``; with ``labels`` also Slicer ``.seg.nrrd`` segmentations."""
    suffixes = IMAGE_SUFFIXES + ((".seg.nrrd",) if labels else ())
    return sorted(
        p for p in folder.iterdir() if p.is_file() and compound_suffix(p) in suffixes and not p.name.startswith(".")
    )


def _h5_cases(folder: Path, require_labels: bool) -> list[Case]:
    cases = [Case(p.stem, p, p, hdf5=True) for p in sorted(folder.glob("*.h5"))]
    if require_labels:
        import h5py

        for case in cases:
            with h5py.File(case.image, "r") as handle:
                if "label" not in handle:
                    raise InputError(f"{case.image} has no 'label' dataset, so it cannot be a labelled case")
    return cases


def _from_list(path: Path, require_labels: bool) -> list[Case]:
    cases = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = [p.strip() for p in line.split(",")]
        if len(parts) > 2:
            raise InputError(f"{path}:{number}: expected 'image[,label]', got {line!r}")
        image = (path.parent / parts[0]).resolve()
        label = (path.parent / parts[1]).resolve() if len(parts) == 2 and parts[1] else None
        for file in (image, label):
            if file is not None and not file.exists():
                raise InputError(f"{path}:{number}: {file} does not exist")
        if require_labels and label is None:
            raise InputError(f"{path}:{number}: {parts[0]} has no label; labelled lists need 'image,label' lines")
        is_h5 = image.suffix == ".h5"
        cases.append(Case(_stem(image), image, image if is_h5 and label is None else label, hdf5=is_h5))
    return cases


def discover_cases(source: PathLike, require_labels: bool = True) -> list[Case]:
    """Cases found at ``source`` (a folder or a list file, see the module docstring), sorted by id.

    With ``require_labels`` every image must have a label; otherwise labels are used
    when present. Raises :class:`InputError` naming what is missing or ambiguous.
    """
    source = Path(source)
    if not source.exists():
        raise InputError(f"{source} does not exist")
    if source.is_file():
        cases = (
            [Case(source.stem, source, source, hdf5=True)]
            if source.suffix == ".h5"
            else _from_list(source, require_labels)
        )
    elif (source / "h5").is_dir() or any(source.glob("*.h5")):
        cases = _h5_cases(source / "h5" if (source / "h5").is_dir() else source, require_labels)
    else:
        image_dir = next((source / d for d in _IMAGE_DIRS if (source / d).is_dir()), None)
        label_dir = next((source / d for d in _LABEL_DIRS if (source / d).is_dir()), None)
        if image_dir is None:
            images = _images_in(source)
            if require_labels:
                raise InputError(
                    f"{source} has no images/ and labels/ (or masks/) sub-folders; labelled data needs both"
                )
            cases = [Case(_stem(p), p) for p in images]
        else:
            labels = {_stem(p): p for p in _images_in(label_dir, labels=True)} if label_dir is not None else {}
            cases, missing = [], []
            for image in _images_in(image_dir):
                label = labels.get(_stem(image))
                if label is None and require_labels:
                    missing.append(image.name)
                cases.append(Case(_stem(image), image, label))
            if missing:
                raise InputError(
                    f"{len(missing)} image(s) in {image_dir} have no label of the same name in "
                    f"{label_dir or source / 'labels'} (e.g. {', '.join(missing[:3])})"
                )
    if not cases:
        raise InputError(f"no images found in {source}")
    ids = [c.id for c in cases]
    if len(set(ids)) != len(ids):
        raise InputError(f"{source}: case names are not unique")
    return sorted(cases, key=lambda c: c.id)


def _read_h5(case: Case, spacing: Sequence[float]) -> tuple[Volume, Optional[Volume]]:
    import h5py

    with h5py.File(case.image, "r") as handle:
        image = np.asarray(handle["image"])
        label = np.asarray(handle["label"]) if "label" in handle and case.label is not None else None
    if image.ndim != 3:
        raise InputError(f"{case.image}: 'image' must be 3D (x, y, z), got shape {image.shape}")
    # Stored in x, y, z order; Volume arrays are z, y, x.
    volume = Volume(np.ascontiguousarray(image.transpose(2, 1, 0)), tuple(spacing))
    labels = None
    if label is not None:
        if label.shape != image.shape:
            raise InputError(f"{case.image}: 'label' shape {label.shape} differs from 'image' {image.shape}")
        labels = volume.with_array(np.ascontiguousarray(label.transpose(2, 1, 0)))
    return volume, labels


def _label_map(label: Volume, path: Path) -> np.ndarray:
    """Integer label values from a label file; 8-bit mask images (0/255, JPEG noise) are thresholded at 127."""
    array = label.array
    if array.ndim == 4:  # an RGB(A) mask image: any bright channel marks the object
        array = array.max(axis=0)
    if np.issubdtype(array.dtype, np.floating):
        if not np.all(np.isfinite(array)):
            raise InputError(f"{path}: the label map holds NaN or infinite values")
        if not np.all(array == np.round(array)):
            raise InputError(f"{path}: label maps must hold whole numbers, this one has fractions")
    values = np.unique(array)
    if values.min() < 0:
        raise InputError(f"{path}: label maps must not hold negative values")
    if compound_suffix(path) in _RASTER and values.max() > 200:
        return (array > 127).astype(np.uint8)
    return array.astype(np.uint16 if values.max() > 255 else np.uint8)


def load_case(case: Case, spacing: Sequence[float] = (1.0, 1.0, 1.0)) -> tuple[Volume, Optional[Volume]]:
    """The image and (if labelled) its integer label map, checked to share one grid.

    ``spacing`` (x, y, z mm) applies to HDF5 cases, which store none.
    """
    if case.hdf5:
        image, label = _read_h5(case, spacing)
    else:
        image = read_image(case.image)
        label = read_image(case.label) if case.label is not None else None
    if label is None:
        return image, None
    label = label.with_array(_label_map(label, case.label or case.image))
    if label.shape != image.shape:
        raise InputError(f"case {case.id}: label shape {label.shape} differs from image shape {image.shape}")
    raster = {compound_suffix(case.image), compound_suffix(case.label or case.image)} <= set(_RASTER)
    if raster:  # photos and their masks correspond pixel by pixel; a JPEG's DPI is no voxel size
        return image, Volume.on_grid(label.array, image.grid)
    if not label.grid.same_as(image.grid, atol=1e-3):
        raise InputError(
            f"case {case.id}: the label's geometry differs from the image's "
            f"(image {image.grid.describe()}; label {label.grid.describe()}); resample the label onto the image"
        )
    return image, Volume.on_grid(label.array, image.grid)


def load_cases(
    cases: Sequence[Case],
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    progress=None,  # noqa: ANN001
    cancel=None,
) -> list[tuple[str, Volume, Optional[Volume]]]:  # noqa: ANN001
    """(id, image, label or None) for every case, reporting ``(done, total, "loading data")``."""
    from ..progress import check_cancelled, report

    items = []
    for index, case in enumerate(cases):
        check_cancelled(cancel)
        report(progress, index, len(cases), "loading data")
        items.append((case.id, *load_case(case, spacing)))
    report(progress, len(cases), len(cases), "loading data")
    return items


def label_values(labels: Sequence[Volume]) -> list[int]:
    """Sorted non-zero values present in any of the label maps."""
    found: set[int] = set()
    for label in labels:
        found.update(int(v) for v in np.unique(label.array) if v != 0)
    return sorted(found)


def split_cases(
    cases: Sequence[Case], val_fraction: float = 0.2, seed: int = 0, val_ids: Optional[Sequence[str]] = None
) -> tuple[list[Case], list[Case]]:
    """Split into (train, validation): by explicit ``val_ids``, or a seeded random ``val_fraction`` (at least one)."""
    if val_ids is not None:
        wanted = set(val_ids)
        unknown = wanted - {c.id for c in cases}
        if unknown:
            raise InputError(f"validation cases not in the data: {', '.join(sorted(unknown)[:5])}")
        return [c for c in cases if c.id not in wanted], [c for c in cases if c.id in wanted]
    if not 0 < val_fraction < 1:
        raise InputError(f"validation fraction must be between 0 and 1, got {val_fraction}")
    if len(cases) < 2:
        raise InputError("at least two labelled cases are needed: one to train on and one to validate")
    order = np.random.default_rng(seed).permutation(len(cases))
    count = min(len(cases) - 1, max(1, int(round(val_fraction * len(cases)))))
    chosen = {int(i) for i in order[:count]}
    train = [c for i, c in enumerate(cases) if i not in chosen]
    val = [c for i, c in enumerate(cases) if i in chosen]
    return train, val
