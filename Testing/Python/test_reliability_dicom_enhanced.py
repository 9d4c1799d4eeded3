"""Enhanced (multi-frame) DICOM MR and CT as input: read from their functional groups, or refused in one line.

The files are built here with pydicom the way scanners write them (shared and per-frame
functional groups, frames stored out of order) from a Volume, so every test knows the
exact voxels and geometry the reader must return.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import pytest
from conftest import one_error_line, write_dicom_series
from conftest import run_cli as run
from scipy.spatial.transform import Rotation

from MedSegSuiteLib.errors import InputError
from MedSegSuiteLib.io import read_image, write_image
from MedSegSuiteLib.volume import Volume

pydicom = pytest.importorskip("pydicom")
from pydicom.dataset import Dataset, FileMetaDataset  # noqa: E402
from pydicom.uid import ExplicitVRLittleEndian  # noqa: E402

ENHANCED_MR = "1.2.840.10008.5.1.4.1.1.4.1"
ENHANCED_CT = "1.2.840.10008.5.1.4.1.1.2.1"
UID = "1.2.826.0.1.3680043.8.498.4242"
SHAPE = (6, 10, 8)
SPACING = (0.7, 0.9, 2.5)
ORIGIN = (-12.5, 30.0, 7.25)
OBLIQUE = Rotation.from_euler("xyz", [20, -35, 50], degrees=True).as_matrix()
#: the order the frames are stored in: not the order along the normal, as scanners often write them
STORED_ORDER = (3, 0, 5, 1, 4, 2)


def _item(**attributes) -> Dataset:
    item = Dataset()
    for keyword, value in attributes.items():
        setattr(item, keyword, value)
    return item


def _ds(values: Sequence[float]) -> list[str]:
    """Decimal strings as write_dicom_series writes them (6 decimals), so both files hold the same numbers."""
    return [f"{v:.6f}" for v in values]


def write_enhanced(
    volume: Volume,
    path: Path,
    sop_class: str = ENHANCED_MR,
    modality: str = "MR",
    slopes: Optional[Sequence[float]] = None,
    intercepts: Optional[Sequence[float]] = None,
    positions: Optional[Sequence[Sequence[float]]] = None,
    spacings: Optional[Sequence[Sequence[float]]] = None,
    order: Sequence[int] = STORED_ORDER,
    series_uid: str = UID,
    instance: int = 1,
) -> Path:
    """Write the int16 ``volume`` as one multi-frame file: geometry and rescale in the functional groups.

    Orientation and (unless ``spacings`` gives one per frame) pixel spacing are shared;
    positions are per frame (``positions`` overrides them, in slice order); a rescale is
    written shared, or per frame when ``slopes`` / ``intercepts`` give one per slice.
    Frame ``f`` holds slice ``order[f]``; ``instance`` numbers the file within its series.
    """
    direction = np.asarray(volume.direction)
    array = np.asarray(volume.array, dtype=np.int16)
    count = array.shape[0]
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = f"{series_uid}.{instance}"
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = f"{series_uid}.{instance}"
    ds.Modality = modality
    ds.PatientName = "Test^Patient"
    ds.PatientID = "TEST001"
    ds.StudyInstanceUID = f"{series_uid}.0"
    ds.SeriesInstanceUID = series_uid
    ds.FrameOfReferenceUID = f"{series_uid}.9"
    ds.SeriesDescription = "enhanced test"
    ds.InstanceNumber = instance
    ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "NONE"]
    ds.Rows, ds.Columns = array.shape[1], array.shape[2]
    ds.NumberOfFrames = count
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    shared = _item(
        PlaneOrientationSequence=[_item(ImageOrientationPatient=_ds([*direction[:, 0], *direction[:, 1]]))],
    )
    if spacings is None:
        shared.PixelMeasuresSequence = [
            _item(
                PixelSpacing=_ds([volume.spacing[1], volume.spacing[0]]),
                SliceThickness=f"{volume.spacing[2]:.6f}",
                SpacingBetweenSlices=f"{volume.spacing[2]:.6f}",
            )
        ]
    per_slice = slopes is not None and len(slopes) == count or intercepts is not None and len(intercepts) == count
    if (slopes is not None or intercepts is not None) and not per_slice:
        shared.PixelValueTransformationSequence = [
            _item(
                RescaleSlope=f"{(slopes or [1])[0]:g}",
                RescaleIntercept=f"{(intercepts or [0])[0]:g}",
                RescaleType="US",
            )
        ]
    ds.SharedFunctionalGroupsSequence = [shared]
    frames = []
    for k in order:
        position = positions[k] if positions is not None else volume.grid.index_to_physical((0, 0, k))
        frame = _item(
            FrameContentSequence=[_item(StackID="1", InStackPositionNumber=k + 1)],
            PlanePositionSequence=[_item(ImagePositionPatient=_ds(position))],
        )
        if spacings is not None:
            frame.PixelMeasuresSequence = [_item(PixelSpacing=_ds(spacings[k]))]
        if per_slice:
            frame.PixelValueTransformationSequence = [
                _item(
                    RescaleSlope=f"{(slopes or [1] * count)[k]:g}",
                    RescaleIntercept=f"{(intercepts or [0] * count)[k]:g}",
                    RescaleType="US",
                )
            ]
        frames.append(frame)
    ds.PerFrameFunctionalGroupsSequence = frames
    ds.PixelData = np.ascontiguousarray(array[list(order)]).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def ramp(direction=None) -> Volume:
    """A volume whose voxels all differ (so any mix-up of frames, rows or columns shows)."""
    values = np.arange(np.prod(SHAPE), dtype=np.int16).reshape(SHAPE) * 3 - 200
    return Volume(values, SPACING, ORIGIN, direction)


def same_volume(got: Volume, want: Volume, atol: float = 1e-6) -> None:
    assert got.shape == want.shape
    assert got.array.dtype == want.array.dtype and np.array_equal(got.array, want.array)
    np.testing.assert_allclose(got.spacing, want.spacing, rtol=0, atol=atol)
    np.testing.assert_allclose(got.origin, want.origin, rtol=0, atol=atol)
    np.testing.assert_allclose(got.direction, want.direction, rtol=0, atol=atol)


def refused(capsys, source: Path, tmp_path: Path, *words: str) -> str:
    """The one line `medsegsuite segment SOURCE` fails with (exit 2, nothing written), checked to hold ``words``."""
    out = tmp_path / "labels.nrrd"
    code, stdout, err = run(capsys, "segment", source, "-m", "any", "-o", out)
    line = one_error_line(err)
    assert code == 2 and stdout == "" and not out.exists(), err
    for word in words:
        assert word in line, line
    return line


def edit_frames(path: Path, frames: Sequence[int], **macros: Dataset) -> None:
    """Put the functional-group macros ``macros`` (e.g. PlaneOrientationSequence=item) into the stored ``frames``."""
    dataset = pydicom.dcmread(path)
    for index in frames:
        for keyword, item in macros.items():
            setattr(dataset.PerFrameFunctionalGroupsSequence[index], keyword, [item])
    dataset.save_as(path)


def heights(volume: Volume) -> Volume:
    """``volume`` (axis-aligned) with every voxel 100 x its slice's height in mm, so positions can be checked."""
    z = volume.origin[2] + np.arange(volume.shape[0]) * volume.spacing[2]
    return volume.with_array(np.broadcast_to((100 * z)[:, None, None], volume.shape).astype(np.int16))


# -- what reads ------------------------------------------------------------------------------------
@pytest.mark.parametrize("sop_class, modality", [(ENHANCED_MR, "MR"), (ENHANCED_CT, "CT")])
@pytest.mark.parametrize("direction", [None, OBLIQUE], ids=["axial", "oblique"])
def test_a_file_and_its_folder_read_as_the_same_images_written_as_a_single_frame_series(
    tmp_path, sop_class, modality, direction
):
    volume = ramp(direction)
    path = write_enhanced(volume, tmp_path / "enhanced" / "image.dcm", sop_class, modality)
    write_dicom_series(volume, tmp_path / "series", "1.2.826.0.1.3680043.8.498.4243", modality=modality)
    series = read_image(tmp_path / "series")
    for source in (path, path.parent):
        got = read_image(source)
        same_volume(got, series)  # frames stored out of order come back sorted along the normal
        same_volume(got, volume, atol=1e-5)  # and on the grid they were written from (6-decimal headers)


def test_rescale_slope_and_intercept_shared_or_per_frame_are_applied_as_float32(tmp_path):
    volume = ramp()
    stored = volume.array.astype(np.float64)
    shared = read_image(write_enhanced(volume, tmp_path / "shared.dcm", ENHANCED_CT, "CT", [2.0], [-1024.0]))
    assert shared.array.dtype == np.float32
    assert np.array_equal(shared.array, (2 * stored - 1024).astype(np.float32))
    slopes = [0.5, 1.0, 1.5, 2.0, 2.5, 3.0]
    intercepts = [-10.0, 0.0, 10.0, 20.0, 30.25, 40.0]
    per_frame = read_image(write_enhanced(volume, tmp_path / "frames.dcm", slopes=slopes, intercepts=intercepts))
    expected = stored * np.array(slopes)[:, None, None] + np.array(intercepts)[:, None, None]
    assert per_frame.array.dtype == np.float32 and np.allclose(per_frame.array, expected, rtol=0, atol=1e-4)
    identity = read_image(write_enhanced(volume, tmp_path / "identity.dcm", slopes=[1.0], intercepts=[0.0]))
    assert identity.array.dtype == np.int16 and np.array_equal(identity.array, volume.array)


def test_slightly_uneven_frames_are_resampled_onto_a_uniform_grid_with_a_warning(tmp_path, caplog):
    volume = heights(ramp())
    positions = [list(volume.grid.index_to_physical((0, 0, k))) for k in range(SHAPE[0])]
    positions[3][2] += 0.2  # 8 % of a step: frame 3 really lies 0.2 mm higher, and its voxels say so
    array = volume.array.copy()
    array[3] = int(round(100 * positions[3][2]))
    path = write_enhanced(volume.with_array(array), tmp_path / "uneven.dcm", positions=positions)
    with caplog.at_level(logging.WARNING):
        got = read_image(path)
    assert "unevenly spaced" in caplog.text and "resampled" in caplog.text and "frames" in caplog.text
    assert got.shape == SHAPE and got.spacing[2] == pytest.approx(SPACING[2])
    # the uniform grid's slice 3 lies 7.5 mm above the first: 100 x its height, not the value stored 0.2 mm higher
    assert np.abs(got.array[:, 4, 4].astype(float) - volume.array[:, 4, 4]).max() <= 1


def test_a_single_frame_enhanced_image_is_a_one_slice_volume(tmp_path):
    volume = Volume(ramp().array[:1], SPACING, ORIGIN)
    got = read_image(write_enhanced(volume, tmp_path / "one.dcm", order=(0,)))
    same_volume(got, volume, atol=1e-5)


def test_an_rle_compressed_file_that_pydicom_decodes_reads_the_same(tmp_path):
    from pydicom.uid import RLELossless

    volume = ramp(OBLIQUE)
    plain = read_image(write_enhanced(volume, tmp_path / "plain.dcm"))
    path = write_enhanced(volume, tmp_path / "rle.dcm")
    dataset = pydicom.dcmread(path)
    dataset.compress(RLELossless)
    dataset.save_as(path)
    assert pydicom.dcmread(path).file_meta.TransferSyntaxUID == RLELossless
    same_volume(read_image(path), plain, atol=0)


def test_a_series_split_into_several_multi_frame_files_is_one_volume_and_two_echoes_are_not(capsys, tmp_path):
    volume = ramp(OBLIQUE)
    folder = tmp_path / "split"
    for instance, slices in ((1, (4, 1, 5)), (2, (0, 3, 2))):  # the frames of one series spread over two files
        part = write_enhanced(volume, folder / f"part{instance}.dcm", instance=instance)
        dataset = pydicom.dcmread(part)
        stored = [STORED_ORDER.index(k) for k in slices]
        dataset.PerFrameFunctionalGroupsSequence = [dataset.PerFrameFunctionalGroupsSequence[f] for f in stored]
        dataset.NumberOfFrames = len(slices)
        dataset.PixelData = np.ascontiguousarray(volume.array[list(slices)]).tobytes()
        dataset.save_as(part)
    same_volume(read_image(folder), volume, atol=1e-5)
    echoes = tmp_path / "echoes"
    write_enhanced(volume, echoes / "echo1.dcm", instance=1)
    write_enhanced(volume, echoes / "echo2.dcm", instance=2)
    refused(capsys, echoes, tmp_path, "enhanced DICOM series in", "6 duplicate frame position(s)", "several stacks")


def test_segment_runs_on_an_enhanced_file_and_writes_labels_on_its_grid(capsys, tmp_path, model3d):
    path = write_enhanced(ramp(OBLIQUE), tmp_path / "in" / "mr.dcm")
    out = tmp_path / "labels.nrrd"
    code, _, err = run(capsys, "segment", path, "-m", model3d, "-o", out, "--device", "cpu")
    assert code == 0, err
    assert read_image(out).grid.same_as(read_image(path).grid, atol=1e-6)


# -- what is refused, in one line with exit status 2 ----------------------------------------------
def _positions(steps: Sequence[float]) -> list[list[float]]:
    """Axial positions from ORIGIN with the given steps between consecutive slices."""
    z = ORIGIN[2] + np.concatenate([[0.0], np.cumsum(steps)])
    return [[ORIGIN[0], ORIGIN[1], float(h)] for h in z]


def test_frames_at_the_same_position_are_refused_as_several_stacks(capsys, tmp_path):
    path = write_enhanced(ramp(), tmp_path / "echoes" / "mr.dcm", positions=_positions([2.5, 2.5, 0.0, 2.5, 2.5]))
    for source in (path, path.parent):
        refused(capsys, source, tmp_path, "duplicate frame position", "several stacks, echoes or time points", "split")


def test_frames_that_change_pixel_spacing_are_refused(capsys, tmp_path):
    spacings = [(0.9, 0.7)] * SHAPE[0]
    spacings[4] = (1.0, 0.7)
    path = write_enhanced(ramp(), tmp_path / "spacing.dcm", spacings=spacings)
    refused(capsys, path, tmp_path, "frames of the enhanced DICOM file", "change pixel spacing", "frame")


def test_a_missing_frame_is_refused_with_how_many(capsys, tmp_path):
    path = write_enhanced(ramp(), tmp_path / "gap.dcm", positions=_positions([2.5, 2.5, 5.0, 2.5, 2.5]))
    refused(capsys, path, tmp_path, "missing 1 frame(s)", "2.5 mm apart")


@pytest.mark.parametrize(
    "case, words",
    [
        ("orientation", ("change orientation", "split it")),
        ("sheared", ("shifted within their plane", "gantry tilt")),
        ("very uneven", ("unevenly spaced",)),
        ("no position", ("frame 5 of", "has no position (Plane Position)", "cannot be placed in space")),
    ],
)
def test_tilted_sheared_very_uneven_or_unplaced_frames_are_refused(capsys, tmp_path, case, words):
    volume = ramp()
    positions = None
    if case == "sheared":  # a gantry tilt: each frame shifted 0.5 mm along y
        positions = [[p[0], p[1] + 0.5 * k, p[2]] for k, p in enumerate(_positions([2.5] * 5))]
    elif case == "very uneven":
        positions = _positions([2.5, 1.6, 3.4, 2.5, 2.5])  # 36 % of a step
    path = write_enhanced(volume, tmp_path / "bad.dcm", positions=positions)
    if case == "orientation":
        edit_frames(path, [2], PlaneOrientationSequence=_item(ImageOrientationPatient=[1, 0, 0, 0, 0.995004, 0.099833]))
    elif case == "no position":
        dataset = pydicom.dcmread(path)
        del dataset.PerFrameFunctionalGroupsSequence[4].PlanePositionSequence
        dataset.save_as(path)
    refused(capsys, path, tmp_path, *words)


def _undecodable_syntaxes() -> list[str]:
    """Compressed transfer syntaxes no decoder here reads: JPEG Lossless (usual for MR) unless a plugin is installed,
    and MPEG-2, for which pydicom has no decoder at all."""
    from pydicom.pixels import get_decoder

    syntaxes = ["1.2.840.10008.1.2.4.100"]
    if not get_decoder("1.2.840.10008.1.2.4.70").is_available:
        syntaxes.append("1.2.840.10008.1.2.4.70")
    return syntaxes


@pytest.mark.parametrize("syntax", _undecodable_syntaxes())
def test_a_compressed_file_that_cannot_be_decoded_here_is_refused_saying_how_to_decompress(capsys, tmp_path, syntax):
    from pydicom.encaps import encapsulate
    from pydicom.uid import UID

    path = write_enhanced(ramp(), tmp_path / "compressed" / "mr.dcm")
    dataset = pydicom.dcmread(path)
    dataset.file_meta.TransferSyntaxUID = syntax
    dataset.PixelData = encapsulate([b"\xff\xd8\xff\xc3 not decodable \xff\xd9"] * SHAPE[0])
    dataset["PixelData"].VR = "OB"
    dataset.save_as(path)
    for source in (path, path.parent):
        refused(capsys, source, tmp_path, "compressed with", UID(syntax).name, "gdcmconv --raw", "dcmdjpeg")
    with pytest.raises(InputError, match="cannot be decoded here|needs"):
        read_image(path)


def test_an_image_larger_than_free_memory_is_refused_before_its_pixels_are_decoded(capsys, tmp_path, monkeypatch):
    from MedSegSuiteLib import memory
    from MedSegSuiteLib.io import dicom_enhanced

    def no_decoding(header):
        raise AssertionError("pixels decoded although the memory check should have refused the image")

    path = write_enhanced(ramp(), tmp_path / "big.dcm")
    monkeypatch.setattr(memory, "available_bytes", lambda: 2_000)
    monkeypatch.setattr(dicom_enhanced, "_decode", no_decoding)
    line = refused(capsys, path, tmp_path, "(8 x 10 x 6 voxels) needs about", "of memory but only", "is free")
    assert "enhanced DICOM file" in line


# -- folders of several series, and DICOM SEG -------------------------------------------------------
def test_a_folder_lists_an_enhanced_file_with_its_frames_and_never_offers_a_seg(capsys, tmp_path):
    folder = tmp_path / "study"
    volume = ramp()
    write_enhanced(volume, folder / "mr.dcm")
    seg = write_enhanced(
        volume, folder / "seg.dcm", "1.2.840.10008.5.1.4.1.1.66.4", "SEG", series_uid="1.2.826.0.1.3680043.8.498.4245"
    )
    same_volume(read_image(folder), read_image(folder / "mr.dcm"))  # the SEG is no image to segment
    line = refused(capsys, seg, tmp_path, "SEG object, not an image series")
    assert "multi-frame" not in line
    write_dicom_series(volume, folder, "1.2.826.0.1.3680043.8.498.4244", modality="CT")
    line = refused(capsys, folder, tmp_path, "holds 2 DICOM series", "--series-uid")
    assert "MR, 'enhanced test', 1 multi-frame file of 6 frames" in line and "CT, 6 images" in line
    assert ".4245" not in line and "SEG" not in line
    same_volume(read_image(folder, series_uid=UID), read_image(folder / "mr.dcm"))


def test_dicom_seg_export_referencing_an_enhanced_image_is_refused_saying_what_to_export_instead(capsys, tmp_path):
    pytest.importorskip("highdicom")
    path = write_enhanced(ramp(), tmp_path / "source" / "mr.dcm")
    image = read_image(path)
    labels = np.zeros(image.shape, np.uint8)
    labels[2:4, 3:6, 3:6] = 1
    labels_path = write_image(image.with_array(labels), tmp_path / "labels.nrrd")
    out = tmp_path / "seg.dcm"
    code, _, err = run(capsys, "export", labels_path, "-o", out, "--dicom-series", path.parent)
    line = one_error_line(err)
    assert code == 2 and not out.exists()
    assert "multi-frame (enhanced)" in line and ".seg.nrrd" in line and ".nii.gz" in line, line
