"""Every network is measured on PyTorch's ``meta`` device before it is built: its parameters and the
activations of one window or slice, for both presets; and a card with absurd widths is refused through
the real CLI, in one line, before anything is allocated (the process runs capped at 3 GB of address
space, so a network that escaped the estimate would fail to allocate instead of passing)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from MedSegSuiteLib import networks
from MedSegSuiteLib.io import write_image
from MedSegSuiteLib.models.card import card_from_dict
from MedSegSuiteLib.models.footprint import activation_bytes, check_network_fits, meta_network, parameter_bytes
from MedSegSuiteLib.volume import Volume

#: The networks a model card can name, with what a card of each looks like: dims, input channels, the
#: input size of one slice (size_xy) or window (patch_xyz), activation, labels, and the config that fits them.
CARD_NETWORKS = {
    "condseg": (2, 3, {"size_xy": [256, 256]}, "sigmoid", 1, {"out_channels": 1}),
    "banet": (2, 3, {"size_xy": [256, 256]}, "softmax", 1, {"num_classes": 2}),
    "hidiff": (2, 1, {"size_xy": [64, 64]}, "sigmoid", 1, {"in_channels": 1, "num_classes": 1}),
    "dnet": (3, 1, {"patch_xyz": [64, 64, 64]}, "softmax", 2, {"in_channels": 1, "num_classes": 3}),
    "canet": (3, 1, {"patch_xyz": [80, 112, 112]}, "sigmoid", 1, {"in_channels": 1, "num_classes": 1}),
}

#: Widths far beyond any machine (terabytes of parameters), yet each number under the card check's
#: plain limit, so only the meta estimate can refuse them.
ABSURD = {
    "condseg": {"dim": 32768, "encoder_width": 4096},
    "banet": {"aspp_dim": 32768, "reduce_dim": 32768, "encoder_width": 4096},
    "hidiff": {"segmentor": {"preset": "lite", "features": [4096, 8192, 16384, 32768, 65536, 65536]}},
    "dnet": {"widths": [8192, 16384, 32768, 65536, 65536]},
    "canet": {"base_filters": 4096, "hidden_size": 65536, "mlp_dim": 65536},
}


def card_for(network: str, preset: str, **config) -> dict:
    """A card of ``network`` at ``preset`` (``config`` on top of the one that fits its labels)."""
    dims, channels, size, activation, count, base = CARD_NETWORKS[network]
    return {
        "schema_version": 1,
        "id": f"measured-{network}-{preset}",
        "version": "1.0.0",
        "name": f"{network} {preset}",
        "network": network,
        "preset": preset,
        "config": {**base, **config},
        "dims": dims,
        "input": {"channels": channels, "normalization": {"kind": "zscore"}, **size},
        "inference": {"activation": activation, "batch_size": 1},
        "labels": [{"value": v, "name": f"Structure {v}", "color": [200, 60, 40 * v]} for v in range(1, count + 1)],
        "licence": "CC0-1.0",
        "weights": {"file": "model.safetensors"},
    }


def test_every_card_network_is_in_the_registry():
    assert set(CARD_NETWORKS) <= set(networks.available())


@pytest.mark.parametrize("preset", ["lite", "paper"])
@pytest.mark.parametrize("name", networks.available())
def test_every_registered_network_builds_on_meta(name, preset):
    card = card_from_dict(card_for("dnet", "lite")).replace(network=name, preset=preset, config={})
    network = meta_network(card)
    tensors = list(network.parameters()) + list(network.buffers())
    assert tensors and all(t.device.type == "meta" for t in tensors)
    if preset == "lite":  # the same network as a real build, weight for weight
        real = networks.create(name, preset)
        assert parameter_bytes(network) == parameter_bytes(real)
        assert {k: v.shape for k, v in network.state_dict().items()} == {
            k: v.shape for k, v in real.state_dict().items()
        }


@pytest.mark.parametrize("preset", ["lite", "paper"])
@pytest.mark.parametrize("network", list(CARD_NETWORKS))
def test_every_card_network_and_preset_is_measured(network, preset):
    card = card_from_dict(card_for(network, preset))
    built = check_network_fits(card)
    assert built is not None, f"{network} {preset} was not estimated"
    assert parameter_bytes(built) > 0
    per_item = activation_bytes(card, built)
    assert per_item is not None, f"{network} {preset}: one forward pass on meta failed"
    _, channels, size, _, _, _ = CARD_NETWORKS[network]
    assert per_item > 4 * channels * int(np.prod(size.get("size_xy") or size.get("patch_xyz")))


RUNNER = """
import resource, sys
resource.setrlimit(resource.RLIMIT_AS, ({cap}, {cap}))
from MedSegSuiteLib.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.skipif(sys.platform != "linux", reason="RLIMIT_AS is Linux's")
@pytest.mark.parametrize("network", list(CARD_NETWORKS))
def test_a_card_with_absurd_widths_is_refused_in_one_line_before_allocating(tmp_path, network):
    folder = tmp_path / "absurd"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"\0" * 64)
    card = card_for(network, "lite", **ABSURD[network])
    (folder / "card.json").write_text(json.dumps(card), encoding="utf-8")
    dims, channels, _, _, _, _ = CARD_NETWORKS[network]
    shape = (channels, 1, 32, 32) if dims == 2 else (channels, 16, 32, 32)
    array = np.random.default_rng(0).integers(0, 255, shape).astype(np.uint8 if dims == 2 else np.float32)
    image = write_image(
        Volume(array if channels > 1 else array[0]), tmp_path / ("img.png" if dims == 2 else "img.nrrd")
    )
    env = {**os.environ, "MEDSEGSUITE_THREADS": "1", "OMP_NUM_THREADS": "1", "MALLOC_ARENA_MAX": "2"}
    done = subprocess.run(
        [sys.executable, "-c", RUNNER.format(cap=3 << 30), "segment", str(image), "-m", str(folder)]
        + ["-o", str(tmp_path / "o.nrrd"), "--device", "cpu"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2 and len(lines) == 1, done.stderr
    assert lines[0].startswith("medsegsuite: error: ") and "needs about" in lines[0], lines[0]
    assert f"model 'measured-{network}-lite'" in lines[0] and "check the card's config" in lines[0], lines[0]
    assert not (tmp_path / "o.nrrd").exists()
    assert Path(folder / "card.json").is_file()
