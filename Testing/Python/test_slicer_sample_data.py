"""The bundled sample appears in Slicer's Sample Data module once Slicer has started."""

from __future__ import annotations

import hashlib
import sys
import types
from pathlib import Path
from urllib.parse import urlparse
from urllib.request import url2pathname

import numpy as np
import pytest
import slicer_harness

from MedSegSuiteLib.io import read_image
from MedSegSuiteLib.slicer.sample_data import sample_data_source


@pytest.fixture
def registered(monkeypatch):
    calls = []
    sample_data = types.ModuleType("SampleData")
    sample_data.SampleDataLogic = types.SimpleNamespace(registerCustomSampleDataSource=lambda **kw: calls.append(kw))
    monkeypatch.setitem(sys.modules, "SampleData", sample_data)
    app = slicer_harness.install()
    slicer_harness.load_module()
    try:
        assert calls == []  # nothing is registered before Slicer has started
        app.emit("startupCompleted()")
        yield calls
    finally:
        slicer_harness.unload_modules()


def test_sample_is_registered_after_startup_with_checksummed_local_files(registered):
    assert len(registered) == 1
    source = registered[0]
    assert source["category"] == "MedSegSuite" and "hippocampus" in source["sampleName"].lower()
    assert source["loadFileTypes"] == ["VolumeFile", "SegmentationFile"]
    paths = [Path(url2pathname(urlparse(uri).path)) for uri in source["uris"]]
    assert [path.name for path in paths] == source["fileNames"]
    for path, checksum in zip(paths, source["checksums"]):
        assert checksum == "SHA256:" + hashlib.sha256(path.read_bytes()).hexdigest()
    image, labels = (read_image(path) for path in paths)
    assert labels.grid.same_as(image.grid) and set(np.unique(labels.array)) == {0, 1, 2}
    assert Path(source["thumbnailFileName"]).is_file()


def test_a_missing_sample_is_reported_with_what_to_do(tmp_path):
    (tmp_path / "Samples").mkdir()
    with pytest.raises(FileNotFoundError, match="re-install the extension"):
        sample_data_source(tmp_path)
