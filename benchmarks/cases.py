"""The benchmark cases: what each network is timed on."""

from __future__ import annotations


def cases_for(device: str, quick: bool) -> list[dict]:
    """Cases for ``device``; ``quick`` keeps lite presets and small inputs."""
    cases = [
        {
            "name": "unet lite 2D 1x3x256x256",
            "kind": "forward",
            "network": "unet",
            "preset": "lite",
            "overrides": {"spatial_dims": 2, "in_channels": 3, "out_channels": 2},
            "shape": [1, 3, 256, 256],
        },
        {
            "name": "unet paper 2D 1x3x256x256",
            "kind": "forward",
            "network": "unet",
            "preset": "paper",
            "overrides": {"spatial_dims": 2, "in_channels": 3, "out_channels": 2},
            "shape": [1, 3, 256, 256],
        },
    ]
    if quick:
        cases = [c for c in cases if " lite " in c["name"]]
    return cases
