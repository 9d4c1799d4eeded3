"""The benchmark cases: what each network is timed on.

``forward`` cases time one network call on the network's standard input; ``python``
cases call a function of ``workloads.py``. Heavy cases run fewer repeats.
"""

from __future__ import annotations

from typing import Any

_W = "workloads"


def _forward(name: str, network: str, preset: str, shape: list[int], **overrides: Any) -> dict[str, Any]:
    return {
        "name": name,
        "kind": "forward",
        "network": network,
        "preset": preset,
        "shape": shape,
        "overrides": overrides,
    }


def _call(name: str, function: str, repeats: int = 3, **args: Any) -> dict[str, Any]:
    return {"name": name, "kind": "python", "module": _W, "function": function, "args": args, "repeats": repeats}


def network_cases() -> list[dict[str, Any]]:
    """One forward per network and preset on its standard input (eval, inference mode, batch 1)."""
    cases = []
    for preset in ("paper", "lite"):
        for size in (256, 352):
            cases.append(
                _forward(
                    f"condseg {preset} forward 1x3x{size}x{size}", "condseg", preset, [1, 3, size, size], aux_head=False
                )
            )
            cases.append(_forward(f"banet {preset} forward 1x3x{size}x{size}", "banet", preset, [1, 3, size, size]))
        cases.append(_forward(f"dnet {preset} forward 1x1x96^3 (K=14)", "dnet", preset, [1, 1, 96, 96, 96]))
        cases.append(
            _forward(
                f"canet {preset} forward 1x1x80x112x112",
                "canet",
                preset,
                [1, 1, 80, 112, 112],
                patch_size=[80, 112, 112],
            )
        )
        for binary in (True, False):
            kind = "binary" if binary else "real"
            cases.append(
                _call(
                    f"hidiff refiner {preset} {kind} call 224x224 (K=9)",
                    "refiner_call",
                    5,
                    preset=preset,
                    binary=binary,
                )
            )
    return cases


def volume_cases(quick: bool) -> list[dict[str, Any]]:
    """Whole images and volumes through the Predictor (reorientation, normalisation, windows, labels)."""
    cases = []
    for preset in ("lite",) if quick else ("lite", "paper"):
        for network, config, size in (
            ("condseg", {"in_channels": 3, "out_channels": 1, "aux_head": False}, 256),
            ("banet", {"in_channels": 3, "num_classes": 2}, 256),
        ):
            activation = {"activation": "sigmoid"} if network == "condseg" else None
            labels = 1
            cases.append(
                _call(
                    f"{network} {preset} 2D photo 3x576x720",
                    "predict_volume",
                    3,
                    network=network,
                    preset=preset,
                    shape=[1, 576, 720],
                    channels=3,
                    config=config,
                    labels=labels,
                    size_xy=[size, size],
                    inference=activation,
                )
            )
            cases.append(
                _call(
                    f"{network} {preset} volume 256x256x128 slice-wise",
                    "predict_volume",
                    1,
                    network=network,
                    preset=preset,
                    shape=[128, 256, 256],
                    config=config,
                    labels=labels,
                    size_xy=[size, size],
                    inference=activation,
                )
            )
        dnet = {"in_channels": 1, "num_classes": 14}
        cases.append(
            _call(
                f"dnet {preset} volume 256x256x128 (96^3, overlap 0.5)",
                "predict_volume",
                1,
                network="dnet",
                preset=preset,
                shape=[128, 256, 256],
                config=dnet,
                labels=13,
                patch_xyz=[96, 96, 96],
                batch_size=1,
            )
        )
        canet = {"in_channels": 1, "num_classes": 1, "patch_size": [80, 112, 112]}
        fast = {"activation": "sigmoid", "overlap": 0.5}
        cases.append(
            _call(
                f"canet {preset} volume 256x256x128 (fast, overlap 0.5)",
                "predict_volume",
                1,
                network="canet",
                preset=preset,
                shape=[128, 256, 256],
                config=canet,
                labels=1,
                patch_xyz=[112, 112, 80],
                inference=fast,
                batch_size=1,
            )
        )
        paper = {
            "activation": "relu",
            "stride_xyz": [18, 18, 4],
            "blend": "constant",
            "postprocess": ["largest_component"],
        }
        cases.append(
            _call(
                f"canet {preset} LA-size volume 183x140x88 (paper strides 18/18/4)",
                "predict_volume",
                1,
                network="canet",
                preset=preset,
                shape=[88, 140, 183],
                config=canet,
                labels=1,
                patch_xyz=[112, 112, 80],
                inference=paper,
                batch_size=2,
            )
        )
    cases.append(
        _call(
            "dnet lite volume 512x512x300 (96^3, overlap 0.5)",
            "predict_volume",
            1,
            network="dnet",
            preset="lite",
            shape=[300, 512, 512],
            config={"in_channels": 1, "num_classes": 14},
            labels=13,
            patch_xyz=[96, 96, 96],
            batch_size=1,
        )
    )
    return cases


def refinement_cases(quick: bool) -> list[dict[str, Any]]:
    """A 10-step refinement of one 224x224 slice, and one step (the interactive unit)."""
    cases = []
    for preset in ("lite",) if quick else ("lite", "paper"):
        for binary in (False, True):
            kind = "binary" if binary else "real"
            cases.append(
                _call(
                    f"hidiff {preset} {kind} refine 10 steps 224x224",
                    "refine_slice",
                    3,
                    preset=preset,
                    binary=binary,
                    steps=10,
                )
            )
    cases.append(
        _call("hidiff lite real refine 1 step 224x224", "refine_slice", 5, preset="lite", binary=False, steps=1)
    )
    return cases


def finetune_cases() -> list[dict[str, Any]]:
    """One mean-teacher finetuning iteration (batch 2 labelled + 2 unlabelled) of each lite network."""
    runs = (
        ("condseg", "256x256", {"in_channels": 1, "out_channels": 1}, 2, {}),
        ("banet", "256x256", {"in_channels": 1, "num_classes": 2}, 2, {}),
        ("dnet", "64^3", {"in_channels": 1, "num_classes": 2}, 3, {"patch_zyx": [64, 64, 64]}),
    )
    return [
        _call(
            f"{network} lite finetune iteration {size}",
            "finetune_iteration",
            3,
            network=network,
            preset="lite",
            config=config,
            dims=dims,
            **extra,
        )
        for network, size, config, dims, extra in runs
    ]


def cases_for(device: str, quick: bool) -> list[dict[str, Any]]:
    """Cases for ``device``; ``quick`` keeps lite presets and small inputs."""
    cases = network_cases() + volume_cases(quick) + refinement_cases(quick) + finetune_cases()
    if quick:
        cases = [c for c in cases if " paper " not in c["name"] and "512x512" not in c["name"]]
    return cases
