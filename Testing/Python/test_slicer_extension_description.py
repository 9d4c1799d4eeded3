"""The extension's descriptions for the 3D Slicer Extensions Index agree with CMakeLists.txt.

``MedSegSuite.s4ext`` is the keyword-per-line description (Slicer's
``Utilities/Templates/Extensions/extension_description.s4ext.in``, v5.8.1);
``MedSegSuite.json`` the catalog entry the index reads today (schema
``slicer-extension-catalog-entry-schema-v1.0.1``: ``$schema``, ``category`` and ``scm_url``
required, no other keys than the schema's). Both name PyTorch as the extension it depends on.
"""

from __future__ import annotations

import json
import re

from conftest import REPO

S4EXT_KEYS = {
    "scm", "scmurl", "scmrevision", "depends", "build_subdirectory", "homepage", "contributors", "category",
    "iconurl", "status", "description", "screenshoturls", "enabled",
}  # fmt: skip
CATALOG_KEYS = {
    "$schema", "category", "scm_url", "scm_revision", "scm_type", "build_dependencies", "build_subdirectory",
    "enabled", "tier",
}  # fmt: skip


def _s4ext() -> dict[str, str]:
    fields = {}
    for line in (REPO / "MedSegSuite.s4ext").read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.strip().partition(" ")
            assert key not in fields, f"{key} appears twice"
            fields[key] = value.strip()
    return fields


def _cmake() -> dict[str, str]:
    text = (REPO / "CMakeLists.txt").read_text(encoding="utf-8")
    return {key: value for key, value in re.findall(r'set\(EXTENSION_(\w+) "([^"]*)"\)', text)}


def test_the_s4ext_has_every_field_and_matches_the_cmake_meta_information():
    fields, cmake = _s4ext(), _cmake()
    assert set(fields) == S4EXT_KEYS
    assert fields["scm"] == "git" and fields["scmurl"].startswith("https://github.com/")
    assert fields["depends"].split() == cmake["DEPENDS"].split() == ["PyTorch"]
    for key in ("HOMEPAGE", "CATEGORY", "CONTRIBUTORS", "DESCRIPTION", "ICONURL", "SCREENSHOTURLS"):
        assert fields[key.lower()] == cmake[key], key
    assert fields["enabled"] in ("0", "1") and fields["build_subdirectory"] == "."


def test_the_catalog_entry_follows_the_schema_and_depends_on_pytorch():
    entry = json.loads((REPO / "MedSegSuite.json").read_text(encoding="utf-8"))
    assert set(entry) <= CATALOG_KEYS and {"$schema", "category", "scm_url"} <= set(entry)
    assert entry["$schema"].endswith("slicer-extension-catalog-entry-schema-v1.0.1.json#")
    assert entry["build_dependencies"] == ["PyTorch"] and entry["category"] == _cmake()["CATEGORY"]
    assert entry["scm_url"] == _s4ext()["scmurl"] and entry["scm_revision"] == _s4ext()["scmrevision"]
    assert isinstance(entry["tier"], int) and 1 <= entry["tier"] <= 5
