"""Images and segmentations on disk."""

from .atomic import atomic_directory, atomic_output, compound_suffix
from .images import IMAGE_SUFFIXES, read_image, volume_from_sitk, volume_to_sitk, write_image

__all__ = [
    "IMAGE_SUFFIXES",
    "atomic_directory",
    "atomic_output",
    "compound_suffix",
    "read_image",
    "volume_from_sitk",
    "volume_to_sitk",
    "write_image",
]
