"""Weight files: safetensors with checksums, safe checkpoint import, strict loading."""

from __future__ import annotations

import os
from collections import OrderedDict

import pytest
import torch

from MedSegSuiteLib.errors import WeightsError
from MedSegSuiteLib.models.weights import (
    load_state_dict_strict,
    read_embedded_card,
    read_torch_checkpoint,
    read_weights,
    save_weights,
    sha256_file,
    unwrap_state_dict,
)


def _net() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Conv2d(4, 2, 1))


def test_save_and_read_round_trip_with_checksum_and_embedded_card(tmp_path):
    net = _net()
    entry = save_weights(net.state_dict(), tmp_path / "w.safetensors", card={"id": "x", "weights": {}})
    assert entry["sha256"] == sha256_file(tmp_path / "w.safetensors") and entry["bytes"] > 0
    state = read_weights(tmp_path / "w.safetensors", sha256=entry["sha256"])
    assert all(torch.equal(state[k], v) for k, v in net.state_dict().items())
    assert read_embedded_card(tmp_path / "w.safetensors") == {"id": "x"}


def test_half_precision_keeps_batchnorm_statistics_in_float32(tmp_path):
    entry = save_weights(_net().state_dict(), tmp_path / "h.safetensors", half=True)
    state = read_weights(tmp_path / "h.safetensors")
    assert entry["dtype"] == "float16"
    assert state["0.weight"].dtype == torch.float16 and state["1.running_var"].dtype == torch.float32


def test_checksum_mismatch_truncation_and_missing_file_are_refused(tmp_path):
    entry = save_weights(_net().state_dict(), tmp_path / "w.safetensors")
    with pytest.raises(WeightsError, match="does not match its model card"):
        read_weights(tmp_path / "w.safetensors", sha256="0" * 64)
    data = (tmp_path / "w.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match="truncated or corrupt"):
        read_weights(tmp_path / "cut.safetensors")
    with pytest.raises(WeightsError, match="does not match"):
        read_weights(tmp_path / "cut.safetensors", sha256=entry["sha256"])
    with pytest.raises(WeightsError, match="missing"):
        read_weights(tmp_path / "gone.safetensors")


def test_torch_checkpoints_are_unwrapped_and_prefixes_stripped(tmp_path):
    state = _net().state_dict()
    wrapped = {"epoch": 3, "state_dict": OrderedDict((f"module.{k}", v) for k, v in state.items())}
    torch.save(wrapped, tmp_path / "ckpt.pth")
    loaded = read_torch_checkpoint(tmp_path / "ckpt.pth")
    assert set(loaded) == set(state)
    nnunet = {"network_weights": dict(state), "optimizer_state": {"lr": 0.01}}
    assert set(unwrap_state_dict(nnunet)) == set(state)
    with pytest.raises(WeightsError, match="holds no state_dict"):
        unwrap_state_dict({"epoch": 1, "optimizer": {"lr": 1}})


class _RunsCode:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    evil = _RunsCode()
    evil.marker = marker
    torch.save({"state_dict": {"w": torch.zeros(1)}, "payload": evil}, tmp_path / "evil.pth")
    with pytest.raises(WeightsError, match="could run code"):
        read_torch_checkpoint(tmp_path / "evil.pth")
    assert not marker.exists()


def test_truncated_checkpoint_is_refused(tmp_path):
    torch.save(_net().state_dict(), tmp_path / "ok.pth")
    data = (tmp_path / "ok.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[:100])
    with pytest.raises(WeightsError, match="truncated"):
        read_torch_checkpoint(tmp_path / "cut.pth")


def test_strict_loading_explains_foreign_weights():
    net = _net()
    foreign = torch.nn.Linear(3, 3).state_dict()
    with pytest.raises(WeightsError, match=r"2 missing .* 2 unexpected") as info:
        load_state_dict_strict(
            net, {**{k: v for k, v in net.state_dict().items() if not k.startswith("2.")}, **foreign}, "x"
        )
    assert "belong to another network" in str(info.value)
    bad_shape = dict(net.state_dict())
    bad_shape["0.weight"] = torch.zeros(8, 1, 3, 3)
    with pytest.raises(WeightsError, match=r"other shapes .*0.weight: network \(4, 1, 3, 3\) vs file \(8, 1, 3, 3\)"):
        load_state_dict_strict(net, bad_shape, "x")
    nan = dict(net.state_dict())
    nan["0.bias"] = torch.full((4,), float("nan"))
    with pytest.raises(WeightsError, match="NaN"):
        load_state_dict_strict(net, nan, "x")
