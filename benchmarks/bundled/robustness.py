#!/usr/bin/env python
"""How a volume model holds up on what real scans do: its validation cases as they are, padded, and rotated.

    python benchmarks/bundled/robustness.py MODEL DATA [--pad-mm 10] [--degrees 15] [--cases N]

- *padded*: ``--pad-mm`` of empty background (value 0) added on every side, as when a
  scan's field of view is larger than the training crops;
- *rotated*: image and label turned together by ``--degrees`` about the left-right axis
  (image trilinear, label nearest, empty corners 0), as an oblique acquisition shows
  the anatomy to the network.

Mean Dice of each variant over the model card's validation cases, through the
Predictor (as ``medsegsuite segment`` runs it). Writes JSON + Markdown to
``benchmarks/results/robustness-<model id>.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from MedSegSuiteLib.evaluation import evaluate_model
from MedSegSuiteLib.inference import Predictor
from MedSegSuiteLib.models import load_model
from MedSegSuiteLib.training.datasets import discover_cases, load_cases
from MedSegSuiteLib.volume import Volume

RESULTS = Path(__file__).resolve().parents[1] / "results"


def padded(volume: Volume, voxels: tuple[int, int, int]) -> Volume:
    """``volume`` with ``voxels`` (x, y, z) of zeros added on both sides of each axis; the origin moves outwards."""
    x, y, z = voxels
    array = np.pad(volume.array, ((z, z), (y, y), (x, x)))
    shift = np.asarray(volume.direction) @ (np.array(voxels) * np.array(volume.spacing))
    return Volume(array, volume.spacing, tuple(np.array(volume.origin) - shift), volume.direction)


def rotated(volume: Volume, degrees: float, nearest: bool) -> Volume:
    """``volume``'s content turned by ``degrees`` about the i (left-right) axis around its centre, same grid."""
    angle = math.radians(degrees)
    c, s = math.cos(angle), math.sin(angle)
    zyx = volume.array.shape
    # affine_grid maps output (x, y, z) in [-1, 1] to input; rotate in millimetres about x
    extent = np.array([zyx[2] * volume.spacing[0], zyx[1] * volume.spacing[1], zyx[0] * volume.spacing[2]])
    turn = np.array([[1, 0, 0], [0, c, -s], [0, s, c]])
    matrix = np.diag(2 / extent) @ turn @ np.diag(extent / 2)
    theta = torch.tensor(np.concatenate([matrix, np.zeros((3, 1))], 1), dtype=torch.float32)[None]
    grid = F.affine_grid(theta, [1, 1, *zyx], align_corners=False)
    data = torch.from_numpy(volume.array.astype(np.float32))[None, None]
    out = F.grid_sample(data, grid, mode="nearest" if nearest else "bilinear", align_corners=False)[0, 0].numpy()
    out = out.astype(volume.array.dtype) if nearest else out
    return Volume(out, volume.spacing, volume.origin, volume.direction)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="model id or folder")
    parser.add_argument("data", help="the data folder the model's validation ids come from")
    parser.add_argument("--pad-mm", type=float, default=10.0)
    parser.add_argument("--degrees", type=float, default=15.0)
    parser.add_argument("--cases", type=int, default=0, help="use only the first N validation cases (0: all)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    model = load_model(args.model)
    card = model.card.to_dict()
    ids = list(card["training"]["validation_ids"])
    ids = ids[: args.cases] if args.cases else ids
    cases = load_cases([c for c in discover_cases(Path(args.data)) if c.id in set(ids)], (1.0, 1.0, 1.0))
    predictor = Predictor(model, device="cpu")
    variants = {
        "as is": cases,
        f"padded {args.pad_mm:g} mm": [
            (cid, padded(img, pad), padded(lab, pad))
            for cid, img, lab in cases
            for pad in [tuple(int(round(args.pad_mm / s)) for s in img.spacing)]
        ],
        f"rotated {args.degrees:g} deg": [
            (cid, rotated(img, args.degrees, False), rotated(lab, args.degrees, True)) for cid, img, lab in cases
        ],
    }
    rows = []
    for name, variant in variants.items():
        mean = evaluate_model(predictor, variant).mean()
        rows.append({"variant": name, "dice": round(mean["dice"], 4), "cases": len(variant)})
        print(rows[-1], flush=True)  # noqa: T201 - a benchmark script reports as it goes
    RESULTS.mkdir(exist_ok=True)
    stem = RESULTS / f"robustness-{card['id']}"
    stem.with_suffix(".json").write_text(json.dumps(rows, indent=2), encoding="utf-8")
    lines = ["| variant | cases | mean Dice | change |", "|---|---:|---:|---:|"]
    lines += [f"| {r['variant']} | {r['cases']} | {r['dice']:.4f} | {r['dice'] - rows[0]['dice']:+.4f} |" for r in rows]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
