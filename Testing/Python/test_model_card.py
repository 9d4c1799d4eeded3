"""Model card validation: every field checked with a message naming it."""

from __future__ import annotations

import copy
import json

import pytest
from conftest import UNET3D_CARD

from MedSegSuiteLib.errors import ModelError
from MedSegSuiteLib.models import card_from_dict, load_card


def _card(**changes):
    data = copy.deepcopy(UNET3D_CARD)
    data["weights"] = {"file": "model.safetensors"}
    for key, value in changes.items():
        target = data
        *parents, last = key.split(".")
        for parent in parents:
            target = target[int(parent)] if isinstance(target, list) else target[parent]
        if value is ...:
            del target[last]
        else:
            target[last] = value
    return data


def test_valid_card_exposes_typed_fields():
    card = card_from_dict(_card())
    assert card.id == "test-unet3d" and card.dims == 3 and card.output_channels == 2
    assert card.input.patch_xyz == (32, 32, 16) and card.inference.overlap == 0.25
    assert card.labels[0].color == (230, 60, 40) and card.labels[0].terminology["type"][1] == "4147007"
    assert card.to_dict()["id"] == "test-unet3d"
    assert card.replace(id="other").id == "other"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"id": "Has Spaces"}, "id 'Has Spaces' must be lower-case"),
        ({"version": "1.0"}, "not a semantic version"),
        ({"dims": 4}, "dims must be 2 or 3"),
        ({"network": ...}, "network is missing"),
        ({"labels": []}, "labels must list at least one label"),
        ({"labels.0.value": 0}, r"labels\[0\].value must be between 1 and 65535"),
        ({"labels.0.color": [300, 0, 0]}, r"labels\[0\].color must be three integers 0-255"),
        ({"labels.0.terminology.type": ["SCT", "1"]}, "must be \\[coding scheme, code value, code meaning\\]"),
        ({"input.channels": 0}, "input.channels must be between 1 and 16"),
        ({"input.normalization": {"kind": "magic"}}, "normalization.kind must be one of"),
        ({"input.patch_xyz": [32, 32]}, "input.patch_xyz must have 3 numbers"),
        ({"input.patch_xyz": ...}, "input.patch_xyz is missing"),
        ({"inference.activation": "tanh"}, "inference.activation must be one of"),
        ({"inference.overlap": 1.5}, r"inference.overlap must be in \[0, 1\)"),
        ({"inference.postprocess": ["smooth"]}, "unknown step 'smooth'"),
        ({"weights.file": "../evil.safetensors"}, "must be a plain file name"),
        ({"weights.sha256": "abc"}, "must be 64 lower-case hex digits"),
        ({"schema_version": 99}, "please update"),
        ({"config": "x"}, "config must be Mapping"),
    ],
)
def test_invalid_cards_name_the_field(change, message):
    with pytest.raises(ModelError, match=message):
        card_from_dict(_card(**change), source="card.json")


def test_duplicate_labels_are_refused():
    data = _card()
    data["labels"].append(dict(data["labels"][0]))
    with pytest.raises(ModelError, match="listed twice"):
        card_from_dict(data)


def test_load_card_reports_missing_and_malformed_files(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        load_card(tmp_path / "card.json")
    (tmp_path / "card.json").write_text("{ not json")
    with pytest.raises(ModelError, match="not valid JSON"):
        load_card(tmp_path / "card.json")
    (tmp_path / "card.json").write_text(json.dumps(_card()))
    assert load_card(tmp_path / "card.json").id == "test-unet3d"
