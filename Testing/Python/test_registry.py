"""The model registry: listing, lookup and offline import of weights, folders and zips."""

from __future__ import annotations

import json
import shutil
import zipfile

import pytest
import torch

from MedSegSuiteLib.errors import ModelError, WeightsError
from MedSegSuiteLib.models import ModelRegistry, load_card, load_model
from MedSegSuiteLib.models.weights import read_weights


def test_bundled_and_user_models_are_listed_and_found(home, unet3d_dir, unet2d_dir, tmp_path):
    registry = ModelRegistry()
    shutil.copytree(unet3d_dir, registry.bundled_dir / "test-unet3d")
    assert [e.card.id for e in registry.entries()] == ["test-unet3d"]
    registry.import_model(unet2d_dir)
    entries = {e.card.id: e.source for e in registry.entries()}
    assert entries == {"test-unet3d": "bundled", "test-unet2d": "user"}
    assert registry.get("test-unet2d").directory == home / "models" / "test-unet2d"
    assert registry.resolve(str(unet3d_dir)).source == "path"
    with pytest.raises(ModelError, match="no model with id 'nope'; known models: test-unet3d, test-unet2d"):
        registry.get("nope")


def test_broken_cards_are_skipped_and_reported(home, unet3d_dir):
    registry = ModelRegistry()
    broken = registry.bundled_dir / "broken"
    broken.mkdir()
    (broken / "card.json").write_text("{}")
    shutil.copytree(unet3d_dir, registry.bundled_dir / "good")
    assert [e.card.id for e in registry.entries()] == ["test-unet3d"]
    assert len(registry.problems) == 1 and "id is missing" in registry.problems[0]


def test_import_safetensors_with_its_card_verifies_and_copies(home, unet3d_dir):
    registry = ModelRegistry()
    entry = registry.import_model(unet3d_dir / "model.safetensors", card=unet3d_dir / "card.json", model_id="copy-a")
    assert entry.card.id == "copy-a" and entry.source == "user"
    assert (
        load_card(entry.directory / "card.json").weights["sha256"]
        == load_card(unet3d_dir / "card.json").weights["sha256"]
    )
    model = load_model("copy-a", registry)
    assert not model.network.training


def test_import_weights_alone_uses_the_embedded_card(home, unet3d_dir, tmp_path):
    lonely = tmp_path / "downloaded.safetensors"
    shutil.copyfile(unet3d_dir / "model.safetensors", lonely)
    entry = ModelRegistry().import_model(lonely)
    assert entry.card.id == "test-unet3d"


def test_import_pth_converts_to_safetensors(home, unet3d_dir, tmp_path):
    state = read_weights(unet3d_dir / "model.safetensors")
    torch.save({"epoch": 10, "state_dict": {f"module.{k}": v for k, v in state.items()}}, tmp_path / "best.pth")
    with pytest.raises(ModelError, match="has no model card: pass one with --card"):
        ModelRegistry().import_model(tmp_path / "best.pth")
    entry = ModelRegistry().import_model(tmp_path / "best.pth", card=unet3d_dir / "card.json", model_id="from-pth")
    assert (entry.directory / "model.safetensors").is_file()
    assert not list(entry.directory.glob("*.pth"))
    loaded = load_model(entry)
    assert torch.equal(loaded.network.state_dict()["conv_0.conv_0.conv.weight"], state["conv_0.conv_0.conv.weight"])


def test_checksum_mismatch_leaves_nothing_behind(home, unet3d_dir, tmp_path):
    card = json.loads((unet3d_dir / "card.json").read_text(encoding="utf-8"))
    card["weights"]["sha256"] = "f" * 64
    (tmp_path / "card.json").write_text(json.dumps(card))
    with pytest.raises(WeightsError, match="does not match the sha256"):
        ModelRegistry().import_model(unet3d_dir / "model.safetensors", card=tmp_path / "card.json")
    assert not (home / "models").exists() or not any((home / "models").iterdir())


def test_card_that_lies_about_the_network_is_refused(home, unet3d_dir, tmp_path):
    card = json.loads((unet3d_dir / "card.json").read_text(encoding="utf-8"))
    card["preset"] = "paper"  # wider network than the weights
    (tmp_path / "card.json").write_text(json.dumps(card))
    with pytest.raises(WeightsError, match="do not fit the network the model card describes"):
        ModelRegistry().import_model(unet3d_dir / "model.safetensors", card=tmp_path / "card.json")
    card["network"] = "no_such_net"
    (tmp_path / "card.json").write_text(json.dumps(card))
    with pytest.raises(ModelError, match="needs network 'no_such_net'"):
        ModelRegistry().import_model(unet3d_dir / "model.safetensors", card=tmp_path / "card.json")


def test_id_clashes_need_a_new_id_or_overwrite(home, unet3d_dir):
    registry = ModelRegistry()
    registry.import_model(unet3d_dir)
    with pytest.raises(ModelError, match="a user model with id 'test-unet3d' exists"):
        registry.import_model(unet3d_dir)
    registry.import_model(unet3d_dir, overwrite=True)
    shutil.copytree(unet3d_dir, registry.bundled_dir / "b")
    with pytest.raises(ModelError, match="bundled model"):
        registry.import_model(unet3d_dir, model_id="test-unet3d", overwrite=True)


def test_zip_import_and_path_escaping_zip_is_refused(home, unet3d_dir, tmp_path):
    good = tmp_path / "model.zip"
    with zipfile.ZipFile(good, "w") as archive:
        for name in ("card.json", "model.safetensors"):
            archive.write(unet3d_dir / name, f"test-unet3d/{name}")
    assert ModelRegistry().import_model(good).card.id == "test-unet3d"
    evil = tmp_path / "evil.zip"
    with zipfile.ZipFile(evil, "w") as archive:
        archive.writestr("../../escaped.txt", "boo")
        archive.write(unet3d_dir / "card.json", "m/card.json")
    with pytest.raises(ModelError, match="outside its folder"):
        ModelRegistry().import_model(evil, model_id="other")
    assert not (tmp_path.parent / "escaped.txt").exists()
    (tmp_path / "bad.zip").write_bytes(b"not a zip")
    with pytest.raises(ModelError, match="not a valid zip"):
        ModelRegistry().import_model(tmp_path / "bad.zip")


def test_remove_deletes_user_models_only(home, unet3d_dir):
    registry = ModelRegistry()
    registry.import_model(unet3d_dir, model_id="temp")
    registry.remove("temp")
    assert [e.card.id for e in registry.entries()] == []
    shutil.copytree(unet3d_dir, registry.bundled_dir / "b")
    with pytest.raises(ModelError, match="cannot be removed"):
        registry.remove("test-unet3d")
