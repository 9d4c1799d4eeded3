"""The bundled sample case, as a source for Slicer's Sample Data module."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional

from ..models.weights import sha256_file
from ..resources import resources_dir

__all__ = ["CATEGORY", "register_sample_data", "sample_data_source"]

CATEGORY = "MedSegSuite"
SAMPLE_NAME = "MSD-Hippocampus-sample"


def sample_data_source(resources: Optional[Path] = None) -> dict[str, Any]:
    """Keyword arguments for ``SampleDataLogic.registerCustomSampleDataSource``.

    The MSD hippocampus sample (CC BY-SA 4.0) loads as a scalar volume named
    ``MSD-Hippocampus-sample`` and its reference labels as a segmentation named
    ``MSD-Hippocampus-sample-reference``. The files are local (``file://`` URIs) and carry
    their SHA256, so Slicer copies them into its cache once and checks them. Raises
    ``FileNotFoundError`` when the sample is not installed.
    """
    folder = (resources or resources_dir()) / "Samples"
    files = [folder / f"{SAMPLE_NAME}.nrrd", folder / f"{SAMPLE_NAME}-label.nrrd"]
    missing = [str(path) for path in files if not path.is_file()]
    if missing:
        raise FileNotFoundError(f"the MedSegSuite sample is missing ({', '.join(missing)}); re-install the extension")
    icon = folder.parent / "Icons" / "MedSegSuite.png"
    return {
        "category": CATEGORY,
        "sampleName": "MSD hippocampus MRI (MedSegSuite)",
        "uris": [path.resolve().as_uri() for path in files],
        "fileNames": [path.name for path in files],
        "nodeNames": [SAMPLE_NAME, f"{SAMPLE_NAME}-reference"],
        "checksums": [f"SHA256:{sha256_file(path)}" for path in files],
        "loadFileTypes": ["VolumeFile", "SegmentationFile"],
        "thumbnailFileName": str(icon) if icon.is_file() else None,
    }


def register_sample_data(register: Callable[..., Any], resources: Optional[Path] = None) -> None:
    """Register the sample with ``register`` (``SampleData.SampleDataLogic.registerCustomSampleDataSource``)."""
    register(**sample_data_source(resources))
