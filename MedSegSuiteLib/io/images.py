"""Reading and writing images: NIfTI, NRRD, MetaImage, DICOM series, enhanced DICOM and 2D rasters.

Volumes come back as :class:`~MedSegSuiteLib.volume.Volume` in LPS with SimpleITK's
geometry conventions; 2D images become one-slice volumes (RGB as three channels).
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional, Union

import numpy as np

from ..errors import InputError
from ..volume import Volume
from .atomic import atomic_output, compound_suffix
from .dicom_enhanced import read_enhanced
from .dicom_series import check_series, describe_series, resample_uniform
from .headers import check_header

__all__ = ["IMAGE_SUFFIXES", "read_image", "volume_from_sitk", "volume_to_sitk", "write_image"]

log = logging.getLogger(__name__)

VOLUME_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")
RASTER_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".gif")
IMAGE_SUFFIXES = VOLUME_SUFFIXES + RASTER_SUFFIXES + (".dcm",)
_WRITE_SUFFIXES = VOLUME_SUFFIXES + (".png", ".tif", ".tiff")

PathLike = Union[str, Path]


def volume_from_sitk(image, drop_alpha: bool = False) -> Volume:  # noqa: ANN001 - SimpleITK is imported lazily
    """Convert a 2D or 3D SimpleITK image (scalar or vector pixels) to a :class:`Volume`.

    ``drop_alpha``: a 2- or 4-component image is grey or RGB + alpha (a photo or raster
    file) and loses its alpha; otherwise (e.g. four MRI sequences in one NRRD) every
    component stays.
    """
    import SimpleITK as sitk

    dim = image.GetDimension()
    if dim > 3:
        raise InputError(
            f"this is a {dim}D image (size {image.GetSize()}); only 2D and 3D images are supported: "
            "split time series or multi-volume files into 3D volumes first"
        )
    array = sitk.GetArrayFromImage(image)
    components = image.GetNumberOfComponentsPerPixel()
    if components > 1:
        array = np.moveaxis(array, -1, 0)
        if components in (2, 4) and drop_alpha:
            log.info("dropping the alpha channel of a %s image", "grey + alpha" if components == 2 else "RGBA")
            array = array[: components - 1]
    if dim == 2:
        array = array[..., None, :, :]
        spacing = (*image.GetSpacing(), 1.0)
        origin = (*image.GetOrigin(), 0.0)
        d2 = np.asarray(image.GetDirection(), dtype=np.float64).reshape(2, 2)
        direction = np.eye(3)
        direction[:2, :2] = d2
    elif dim == 3:
        spacing, origin = image.GetSpacing(), image.GetOrigin()
        direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    else:
        raise InputError(f"a {dim}D image cannot be segmented; expected 2D or 3D")
    return Volume(np.ascontiguousarray(array), spacing, origin, direction)


def volume_to_sitk(volume: Volume):  # noqa: ANN201
    """Convert a :class:`Volume` to a 3D SimpleITK image (vector pixels for several channels)."""
    import SimpleITK as sitk

    if volume.array.ndim == 4:
        image = sitk.GetImageFromArray(np.ascontiguousarray(np.moveaxis(volume.array, 0, -1)), isVector=True)
    else:
        image = sitk.GetImageFromArray(np.ascontiguousarray(volume.array))
    image.SetSpacing(volume.spacing)
    image.SetOrigin(volume.origin)
    image.SetDirection(tuple(np.asarray(volume.direction).ravel()))
    return image


def _itk_reason(error: Exception) -> str:
    """The line of an ITK error that says what went wrong (without ITK's source locations)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    lines = [line[len("sitk::ERROR:") :].strip() if line.startswith("sitk::ERROR:") else line for line in lines]
    useful = [line for line in lines if line and not line.startswith(("/", "itk::", "Exception thrown in SimpleITK"))]
    return (useful or lines or ["unknown error"])[-1][:200]


def _read_dicom_series(folder: Path, series_uid: Optional[str]) -> Volume:
    import SimpleITK as sitk

    reader = sitk.ImageSeriesReader()
    with _native_stderr_silenced():  # GDCM prints a warning of its own for a folder without series
        uids = list(reader.GetGDCMSeriesIDs(str(folder)))
    if not uids:
        raise InputError(f"{folder} holds no DICOM series; point to a folder of DICOM files of one series")
    with _native_stderr_silenced():
        found = {uid: list(reader.GetGDCMSeriesFileNames(str(folder), uid)) for uid in uids}
    described = {uid: describe_series(names) for uid, names in found.items()}
    images = [uid for uid in uids if described[uid].is_image]
    if series_uid is None:
        if not images:
            kinds = ", ".join(sorted({described[uid].modality or "unknown" for uid in uids}))
            raise InputError(
                f"{folder} holds no image series, only {kinds} objects (a segmentation is not an image to segment); "
                "point to the folder of the images"
            )
        if len(images) > 1:
            listing = "; ".join(f"{uid} ({described[uid].summary()})" for uid in images)
            raise InputError(
                f"{folder} holds {len(images)} DICOM series of images; choose one with --series-uid UID: {listing}"
            )
        series_uid = images[0]
    elif series_uid not in uids:
        listing = "; ".join(f"{uid} ({described[uid].summary()})" for uid in images)
        raise InputError(f"DICOM series {series_uid} is not in {folder}; image series there: {listing}")
    elif not described[series_uid].is_image:
        raise InputError(
            f"DICOM series {series_uid} in {folder} is a {described[series_uid].modality} object, not an image series"
        )
    files = found[series_uid]
    if described[series_uid].enhanced:  # GDCM's geometry of multi-frame images is not to be trusted
        return read_enhanced(files, folder)
    geometry = check_series(folder, files)
    if geometry is not None:
        from ..memory import check_fits

        files = list(geometry.files)
        check_fits(
            float(geometry.rows) * geometry.columns * len(files) * max(geometry.bytes_per_pixel, 4),
            f"reading the DICOM series in {folder} ({geometry.columns} x {geometry.rows} x {len(files)} voxels)",
            "crop or downsample it first, or use a machine with more memory",
        )
    reader.SetFileNames(files)
    try:
        with _native_stderr_silenced():  # ITK's own warnings about spacing: checked and reported above
            image = reader.Execute()
    except RuntimeError as error:
        raise InputError(f"cannot read the DICOM series in {folder}: {_itk_reason(error)}") from None
    volume = volume_from_sitk(image)
    if geometry is not None and geometry.uneven and volume.shape[0] == len(geometry.positions):
        steps = np.diff(geometry.positions)
        log.warning(
            "the slices of the DICOM series in %s are unevenly spaced (%.3g to %.3g mm apart); resampled them "
            "linearly onto a uniform grid of %.3g mm",
            folder,
            steps.min(),
            steps.max(),
            geometry.step,
        )
        array = resample_uniform(volume.array, geometry.positions, geometry.step)
        volume = Volume(array, (*volume.spacing[:2], geometry.step), volume.origin, volume.direction)
    return volume


def _read_with_pillow(path: Path) -> Volume:
    """A GIF, or a grey + alpha PNG (which ITK cannot read), as a grey or RGB one-slice image."""
    from PIL import Image

    from ..memory import check_fits

    with Image.open(path) as image:
        width, height = image.size
        check_fits(
            6.0 * width * height,
            f"reading {path.name} ({width} x {height} pixels)",
            "downsample it first, or use a machine with more memory",
        )
        image.seek(0)
        if image.mode in ("LA", "La"):
            return Volume(np.ascontiguousarray(np.asarray(image.convert("L"))[None]))
        array = np.asarray(image.convert("RGB"))
    if np.array_equal(array[..., 0], array[..., 1]) and np.array_equal(array[..., 0], array[..., 2]):
        return Volume(np.ascontiguousarray(array[None, ..., 0]))
    return Volume(np.ascontiguousarray(np.moveaxis(array, -1, 0)[:, None]))


def _nifti_expected_bytes(header: bytes) -> Optional[int]:
    """Bytes a complete NIfTI-1/2 file holds (header + voxels), from its header; None if unsure."""
    import struct

    for endian in "<>":
        if len(header) >= 348 and struct.unpack(endian + "i", header[:4])[0] == 348:
            dims = struct.unpack(endian + "8h", header[40:56])
            bitpix = struct.unpack(endian + "h", header[72:74])[0]
            offset = int(struct.unpack(endian + "f", header[108:112])[0])
            break
        if len(header) >= 540 and struct.unpack(endian + "i", header[:4])[0] == 540:
            bitpix = struct.unpack(endian + "h", header[14:16])[0]
            dims = struct.unpack(endian + "8q", header[16:80])
            offset = struct.unpack(endian + "q", header[168:176])[0]
            break
    else:
        return None
    if not 1 <= dims[0] <= 7 or bitpix <= 0:
        return None
    count = int(np.prod([max(int(d), 1) for d in dims[1 : dims[0] + 1]], dtype=np.int64))
    return max(offset, 348) + count * bitpix // 8


def _nifti_bad_spacing(header: bytes) -> Optional[str]:
    """A reason when a NIfTI-1/2 header gives a zero or negative voxel spacing (pixdim), else None.

    ITK silently replaces such a spacing (taking its absolute value, or 1), which moves
    the voxels in space; a size-1 axis may have a zero spacing.
    """
    import struct

    for endian in "<>":
        if len(header) >= 348 and struct.unpack(endian + "i", header[:4])[0] == 348:
            dims = struct.unpack(endian + "8h", header[40:56])
            pixdim = struct.unpack(endian + "8f", header[76:108])
            break
        if len(header) >= 540 and struct.unpack(endian + "i", header[:4])[0] == 540:
            dims = struct.unpack(endian + "8q", header[16:80])
            pixdim = struct.unpack(endian + "8d", header[104:168])
            break
    else:
        return None
    for axis in range(1, min(max(int(dims[0]), 0), 3) + 1):
        if pixdim[axis] < 0 or (pixdim[axis] == 0 and dims[axis] > 1):
            return f"its header gives axis {'ijk'[axis - 1]} a voxel spacing of {pixdim[axis]:g} mm (pixdim[{axis}])"
    return None


def _check_nifti_complete(path: Path) -> None:
    """Raise InputError for a NIfTI file shorter than its header promises (ITK reads those silently),
    or one whose header gives a zero or negative voxel spacing."""
    import gzip
    import zlib

    compressed = path.name.lower().endswith(".gz")
    try:
        with gzip.open(path, "rb") if compressed else open(path, "rb") as handle:
            header = handle.read(540)
            bad_spacing = _nifti_bad_spacing(header)
            if bad_spacing is not None:
                raise InputError(f"{path} has an impossible geometry: {bad_spacing}; spacing must be positive")
            expected = _nifti_expected_bytes(header)
            if expected is None:
                return
            if compressed:  # counted up to what the header promises: a bomb is not inflated further
                size = len(header)
                for block in iter(lambda: handle.read(1 << 22), b""):
                    size += len(block)
                    if size >= expected:
                        break
            else:
                size = path.stat().st_size
    except (EOFError, OSError, zlib.error):
        raise InputError(f"{path} is truncated or corrupt (its compressed data ends early)") from None
    if size < expected:
        raise InputError(f"{path} is truncated: its header describes {expected} bytes but it holds {size}")


def _check_size(path: Path) -> None:
    """Refuse, before reading the voxels, a file whose voxels would not fit in free memory."""
    import SimpleITK as sitk

    from ..memory import check_fits

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        return  # the full read reports what is wrong with the file
    dimension = reader.GetDimension()
    if dimension not in (2, 3):
        raise InputError(
            f"{path.name} is a {dimension}D image (size {reader.GetSize()}); only 2D and 3D images are supported"
            + (": split time series or multi-volume files into 3D volumes first" if dimension > 3 else "")
        )
    voxels = float(np.prod(reader.GetSize())) * reader.GetNumberOfComponents()
    bytes_per_value = sitk.GetArrayViewFromImage(sitk.Image([1, 1], reader.GetPixelID())).dtype.itemsize
    check_fits(  # ITK's buffer and its numpy copy exist at once while reading
        2 * voxels * bytes_per_value,
        f"reading {path.name} ({' x '.join(map(str, reader.GetSize()))} voxels)",
        "crop or downsample it first, or use a machine with more memory",
    )


def read_image(path: PathLike, series_uid: Optional[str] = None) -> Volume:
    """Read an image file or a DICOM series folder into a :class:`Volume`.

    Accepts NIfTI, NRRD, MetaImage, a folder (or one file) of a DICOM series, an
    enhanced (multi-frame) DICOM image or a folder holding it, and 2D
    PNG/JPEG/TIFF/BMP/GIF images. Raises :class:`InputError` with the reason for a
    missing, unreadable, truncated or unsupported file.
    """
    import SimpleITK as sitk

    path = Path(path)
    if not path.exists():
        raise InputError(f"{path} does not exist")
    if path.is_dir():
        return _read_dicom_series(path, series_uid)
    suffix = compound_suffix(path)
    if suffix == ".dcm":
        uid = series_uid
        if uid is None:
            info = describe_series([str(path)])
            if info.enhanced and info.is_image:  # a multi-frame image is a volume by itself
                return read_enhanced([path])
            probe = sitk.ImageFileReader()
            probe.SetFileName(str(path))
            try:
                probe.ReadImageInformation()
                uid = probe.GetMetaData("0020|000e").strip() if probe.HasMetaDataKey("0020|000e") else None
            except RuntimeError as error:
                raise InputError(f"cannot read DICOM file {path}: {_itk_reason(error)}") from None
        return _read_dicom_series(path.parent, uid)
    if suffix not in IMAGE_SUFFIXES:
        raise InputError(
            f"{path.name}: unsupported file type {suffix or '(none)'}; use one of {', '.join(IMAGE_SUFFIXES)} "
            "or a DICOM folder"
        )
    if path.stat().st_size == 0:
        raise InputError(f"{path} is empty (0 bytes)")
    try:
        with open(path, "rb"):
            pass
    except OSError as error:
        raise InputError(f"cannot read {path}: {error.strerror or error}") from None
    if suffix == ".gif":
        from PIL import Image

        try:
            return _read_with_pillow(path)
        except Image.DecompressionBombError as error:
            raise InputError(f"refused {path}: {str(error).rstrip('.')}; downsample it first") from None
        except OSError as error:
            raise InputError(f"cannot read {path}: {error}") from None
    check_header(path, suffix)
    _check_size(path)  # from the header alone, before a compressed file is inflated
    if suffix in (".nii", ".nii.gz"):
        _check_nifti_complete(path)
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as error:
        reason = _itk_reason(error)
        if suffix == ".png" and "PixelType" in reason:  # grey + alpha
            try:
                return _read_with_pillow(path)
            except OSError:
                pass
        if "spacing" in reason.lower():  # ITK refuses a zero spacing in NRRD and MetaImage headers
            raise InputError(
                f"{path} has an impossible geometry: its header gives a zero voxel spacing ({reason}); "
                "spacing must be positive"
            ) from None
        raise InputError(f"cannot read {path}: {reason} (is the file truncated or not a {suffix} image?)") from None
    return volume_from_sitk(image, drop_alpha=suffix in RASTER_SUFFIXES)


def write_image(volume: Volume, path: PathLike, overwrite: bool = False, compress: bool = True) -> Path:
    """Write ``volume`` to ``path`` (NIfTI, NRRD, MetaImage; PNG/TIFF for one-slice images) atomically.

    Refuses to replace an existing file unless ``overwrite``; a failed write leaves
    no partial file. Returns the path written.
    """
    import SimpleITK as sitk

    path = Path(path)
    suffix = compound_suffix(path)
    if suffix not in _WRITE_SUFFIXES:
        raise InputError(f"cannot write {suffix or 'files without a suffix'}: use one of {', '.join(_WRITE_SUFFIXES)}")
    if suffix in (".png", ".tif", ".tiff"):
        if not volume.is_2d:
            raise InputError(f"{suffix} holds one slice; this volume has {volume.shape[0]}: write .nrrd or .nii.gz")
        array = volume.array[..., 0, :, :]
        if array.ndim == 3:
            array = np.moveaxis(array, 0, -1)
        image = sitk.GetImageFromArray(np.ascontiguousarray(array), isVector=array.ndim == 3)
    else:
        image = volume_to_sitk(volume)
    with atomic_output(path, overwrite=overwrite) as tmp:
        try:
            with _native_stderr_silenced():  # MetaIO prints its own line on a full disk; we raise one
                sitk.WriteImage(image, str(tmp), useCompression=compress and suffix != ".png")
        except RuntimeError as error:
            raise InputError(f"cannot write {path}: {_itk_reason(error)}") from None
        _verify_written(tmp, image, path)
    return path


@contextmanager
def _native_stderr_silenced() -> Iterator[None]:
    """Send what native code writes to file descriptor 2 to /dev/null while the block runs."""
    import os
    import sys

    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):
        yield
        return
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _verify_written(tmp: Path, image, target: Path) -> None:  # noqa: ANN001 - SimpleITK image
    """Read back what ITK wrote and raise InputError unless it holds ``image``'s voxels.

    ITK's NIfTI and NRRD writers report success when the disk fills up and leave an
    empty or cut-off file, so every written image is checked before it is committed.
    """
    import SimpleITK as sitk

    hint = "the disk may be full: free some space or choose another folder"
    if tmp.stat().st_size == 0:
        raise InputError(f"cannot write {target}: nothing was written; {hint}")
    try:
        if compound_suffix(tmp) in (".nii", ".nii.gz"):
            _check_nifti_complete(tmp)
        back = sitk.ReadImage(str(tmp))
    except (InputError, RuntimeError):
        raise InputError(f"cannot write {target}: the written file is incomplete; {hint}") from None
    written, wanted = sitk.GetArrayViewFromImage(back), sitk.GetArrayViewFromImage(image)
    if back.GetSize() != image.GetSize() or not np.array_equal(
        written, wanted, equal_nan=np.issubdtype(wanted.dtype, np.floating)
    ):
        raise InputError(f"cannot write {target}: the written file does not read back as written; {hint}")
