"""Pytest fixtures of the harness; a test file imports those it uses: ``from slicer_harness.fixtures import ...``."""

from __future__ import annotations

import pytest

from .generations import GENERATIONS, api_generation


@pytest.fixture(params=GENERATIONS, ids=[f"slicer-{g}" for g in GENERATIONS])
def slicer_api(request):
    """Run the test once against each Slicer API generation (5.8, current); yields the generation's name."""
    from . import install

    install()
    with api_generation(request.param) as generation:
        yield generation
