"""Building networks by name and preset."""

from __future__ import annotations

import pytest
import torch

from MedSegSuiteLib import networks


def test_available_lists_unet_and_create_applies_overrides():
    assert "unet" in networks.available()
    net = networks.create("unet", preset="lite", spatial_dims=2, in_channels=3, out_channels=4)
    assert net(torch.zeros(1, 3, 32, 32)).shape == (1, 4, 32, 32)
    assert set(networks.presets("unet")) >= {"paper", "lite"}


def test_unknown_network_and_preset_are_explained():
    with pytest.raises(ValueError, match="unknown network 'vnet9000'; available networks: "):
        networks.create("vnet9000")
    with pytest.raises(ValueError, match="has no preset 'huge'"):
        networks.create("unet", preset="huge")
    with pytest.raises(ValueError, match="spatial_dims must be 2 or 3"):
        networks.create("unet", spatial_dims=4)


def test_every_listed_network_has_paper_and_lite_presets():
    for name in networks.available():
        assert {"paper", "lite"} <= set(networks.presets(name)), name
