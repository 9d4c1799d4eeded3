# ruff: noqa: N802 - Slicer's camelCase API
"""The Slicer API generations the module must work with, presented by one ``slicer-core`` wheel.

``slicer-core`` (5.13) has today's API. Slicer 5.8 differs from it, where MedSegSuite
could notice, in ``vtkSegment``: ``SetTerminology``, ``GetTerminology`` and
``HasTerminology`` came with Slicer 5.10 (compare ``Libs/vtkSegmentationCore/vtkSegment.h``
at tags v5.8.1 and v5.10.0); the terminology string lives in the segment's
``TerminologyEntry`` tag in both. :func:`use_generation` ``("5.8")`` makes every segment
wrapped from then on lack those methods (``hasattr`` is false, a call raises
AttributeError as in Slicer 5.8), through VTK's class override; ``("current")`` puts
the wheel's own class back. Other API differences between 5.8 and today are guarded by
the source scan of ``test_slicer_api_generations.py``.

Segments keep the Python class they were first wrapped with while Python holds a
reference to them, so choose the generation before the test builds its scene.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

__all__ = ["GENERATIONS", "REMOVED_IN_5_8", "api_generation", "current_generation", "use_generation"]

#: The generations the tests run against: Slicer 5.8 and the current API (5.10, main).
GENERATIONS = ("5.8", "current")
#: ``vtkSegment`` methods Slicer 5.8 does not have.
REMOVED_IN_5_8 = ("SetTerminology", "GetTerminology", "HasTerminology")

_state = {"generation": "current"}


def _missing(name: str) -> property:
    def getter(self):
        raise AttributeError(f"'vtkSegment' object has no attribute '{name}' (Slicer 5.8 has no vtkSegment.{name})")

    return property(getter)


def _segment_class_of_5_8():
    import slicer

    namespace = {name: _missing(name) for name in REMOVED_IN_5_8}
    namespace["__doc__"] = "vtkSegment as Slicer 5.8 has it: terminology only through SetTag/GetTag."
    return type("vtkSegment_5_8", (slicer.vtkSegment,), namespace)


def use_generation(generation: str) -> None:
    """Present the API of ``generation`` (one of :data:`GENERATIONS`) from now on."""
    import slicer

    if generation not in GENERATIONS:
        raise ValueError(f"unknown Slicer API generation {generation!r}; choose one of {', '.join(GENERATIONS)}")
    slicer.vtkSegment.override(_segment_class_of_5_8() if generation == "5.8" else None)
    _state["generation"] = generation


def current_generation() -> str:
    """The generation presented now."""
    return _state["generation"]


@contextlib.contextmanager
def api_generation(generation: str) -> Iterator[str]:
    """Present ``generation`` inside the ``with`` block, then the current API again."""
    previous = current_generation()
    use_generation(generation)
    try:
        yield generation
    finally:
        use_generation(previous)
