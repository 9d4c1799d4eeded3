"""Refinement benchmark: do HiDiff refinement steps improve a mask a clinician has corrected?

    python benchmarks/refinement --kind photos|volumes [--segmentor ID] [--refiner ID]
        [--data FOLDER] [--cases N] [--steps 1 2 3 5 10] [--scopes volume neighbours]
        [--spread 0 0.5] [--corrections 1 2 3 5] [--default-steps 1] [--default-scope neighbours]
        [--default-spread 0.5]
        [--threads 2] [--out benchmarks/results/refinement-<kind>]

Only validation cases are used: those both models' cards list under
``training.validation_ids`` (never trained on). For each case:

1. the segmentor segments it (its published inference, as ``medsegsuite segment``);
2. a simulated user corrects it (``MedSegSuiteLib.refine.simulated_user``): the axial slice
   with the most wrong voxels (volumes) or the bounding box of the largest wrong region
   (photos) is replaced by the reference and kept;
3. the refiner runs from the corrected mask with the edits kept, for every ``--steps`` and
   ``--scopes`` (``neighbours``: the corrected slice and two on either side) and ``--spread``
   (how strongly a corrected slice guides the slices beside it; see ``Refiner.refine``).

Reported per setting: mean and worst Dice of the segmentor alone, of the corrected mask
and of the refined mask, on the whole case and outside the edited voxels, the change
against the corrected mask, and seconds per refinement step. Then the interactive curve:
Dice after 1, 2, 3, 5 corrections, with and without refinement after each correction (at
the default settings). Results: ``<out>.json``, ``<out>.md`` and ``<out>.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[2]
DEFAULTS = {
    "photos": ("polyp-banet-lite", "polyp-hidiff-lite", "kvasir_seg"),
    "volumes": ("hippocampus-dnet-lite", "hippocampus-hidiff-lite", "msd_hippocampus"),
}


def data_root() -> Path:
    """``$MEDSEGSUITE_DATA``, else ``../shared/data`` beside the repository."""
    return Path(os.environ.get("MEDSEGSUITE_DATA") or REPO.parent / "shared" / "data")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="benchmarks/refinement", description=__doc__.split("\n")[0])
    parser.add_argument("--kind", choices=sorted(DEFAULTS), required=True)
    parser.add_argument("--segmentor", help="model id or folder that segments first")
    parser.add_argument("--refiner", help="HiDiff model id or folder that refines")
    parser.add_argument("--data", help="the labelled data folder (default: the kind's shared data set)")
    parser.add_argument("--cases", type=int, default=20, help="validation cases to use (the first N, sorted)")
    parser.add_argument("--steps", type=int, nargs="+", default=[1, 2, 3, 5, 10])
    parser.add_argument("--scopes", nargs="+", help="refinement scopes (default: volume, and neighbours for volumes)")
    parser.add_argument("--spread", type=float, nargs="+", default=[0.0, 0.5], help="edit spreading weights to try")
    parser.add_argument("--corrections", type=int, nargs="+", default=[1, 2, 3, 5])
    # the curve's settings default to the panel's Refine defaults (MedSegSuiteLib/slicer/parameters.py)
    parser.add_argument("--default-steps", type=int, default=1, help="steps of the interactive curve")
    parser.add_argument("--default-scope", default="neighbours", help="scope of the interactive curve")
    parser.add_argument("--default-spread", type=float, default=0.5, help="edit spreading of the interactive curve")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", help="results path without suffix (default: benchmarks/results/refinement-KIND)")
    return parser.parse_args(argv)


def _model(name: str) -> Any:
    from MedSegSuiteLib.models import ModelRegistry, load_model

    path = Path(name)
    if path.is_dir():
        return load_model(path)
    return load_model(ModelRegistry().get(name))


def _cases(args: argparse.Namespace, segmentor: Any, refiner: Any) -> list[tuple[str, Any, Any]]:
    from MedSegSuiteLib.training.datasets import discover_cases, load_cases

    ids = set(refiner.card.training.get("validation_ids", []))
    if segmentor.card.id != refiner.card.id:
        ids &= set(segmentor.card.training.get("validation_ids", []))
    if not ids:
        raise SystemExit("the two models' cards share no validation cases; nothing unseen to measure on")
    found = sorted((c for c in discover_cases(args.data) if c.id in ids), key=lambda c: c.id)
    chosen = found[: args.cases]
    return load_cases(chosen)


def _label_volume(array: np.ndarray, grid: Any) -> Any:
    from MedSegSuiteLib.volume import Volume

    return Volume.on_grid(np.ascontiguousarray(array.astype(np.uint8)), grid)


def run_case(
    image: Any, reference: Any, segmentor: Any, refiner: Any, args: argparse.Namespace, scopes: list[str]
) -> dict[str, Any]:
    """Every measurement of one case (see the module docstring)."""
    from MedSegSuiteLib.geometry import to_canonical
    from MedSegSuiteLib.refine.simulated_user import correct_once, foreground_dice

    image_c, _ = to_canonical(image)
    truth = np.asarray(to_canonical(reference)[0].array)
    segmented = np.asarray(segmentor.predict(image_c).labels.array)
    first = correct_once(segmented, truth)
    out: dict[str, Any] = {"segmentor": foreground_dice(segmented, truth)}
    if first is None:
        out["perfect"] = True
        return out
    outside = ~first.keep
    out["corrected"] = foreground_dice(first.mask, truth)
    out["segmentor_outside"] = foreground_dice(segmented, truth, outside)
    out["corrected_outside"] = foreground_dice(first.mask, truth, outside)
    out["settings"] = {}
    mask, keep = _label_volume(first.mask, image_c.grid), _label_volume(first.keep, image_c.grid)
    settings = [(scope, steps, spread) for scope in scopes for steps in args.steps for spread in args.spread]
    for scope, steps, spread in settings:
        started = time.perf_counter()
        result = refiner.refine(image_c, mask, steps, keep, scope=scope, slice_index=first.slice_index, spread=spread)
        seconds = time.perf_counter() - started
        refined = np.asarray(result.labels.array)
        if not np.array_equal(refined[first.keep], first.mask[first.keep]):
            raise AssertionError("refinement changed an edited voxel")
        out["settings"][f"{scope}/{steps}/{spread:g}"] = {
            "dice": foreground_dice(refined, truth),
            "dice_outside": foreground_dice(refined, truth, outside),
            "seconds_per_step": seconds / steps,
            "slices": len(result.slices),
        }
    out["curve"] = _curve(image_c, segmented, truth, refiner, args)
    return out


def _curve(image_c: Any, segmented: np.ndarray, truth: np.ndarray, refiner: Any, args: argparse.Namespace) -> dict:
    """Dice after n successive corrections, with and without refinement after each one."""
    from MedSegSuiteLib.refine.simulated_user import correct_once, foreground_dice

    curve: dict[str, dict[int, float]] = {"corrected": {}, "refined": {}}
    plain, plain_keep = segmented, None
    refined, refined_keep = segmented, None
    for n in range(1, max(args.corrections) + 1):
        step = correct_once(plain, truth, plain_keep)
        if step is not None:
            plain, plain_keep = step.mask, step.keep
        step = correct_once(refined, truth, refined_keep)
        if step is not None:
            refined_keep = step.keep
            result = refiner.refine(
                image_c,
                _label_volume(step.mask, image_c.grid),
                args.default_steps,
                _label_volume(step.keep, image_c.grid),
                scope=args.default_scope,
                slice_index=step.slice_index,
                spread=args.default_spread,
            )
            refined = np.asarray(result.labels.array)
        if n in args.corrections:
            curve["corrected"][n] = foreground_dice(plain, truth)
            curve["refined"][n] = foreground_dice(refined, truth)
    return curve


def summarise(cases: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Mean and worst figures over the cases that had something to correct."""
    rows = [c for c in cases.values() if "settings" in c]
    if not rows:
        return {"cases": 0}
    summary: dict[str, Any] = {"cases": len(rows), "perfect_cases": len(cases) - len(rows)}
    for key in ("segmentor", "corrected", "segmentor_outside", "corrected_outside"):
        values = [c[key] for c in rows]
        summary[key] = {"mean": float(np.mean(values)), "worst": float(np.min(values))}
    settings = {}
    for name in rows[0]["settings"]:
        dice = np.array([c["settings"][name]["dice"] for c in rows])
        gain = dice - np.array([c["corrected"] for c in rows])
        outside = np.array([c["settings"][name]["dice_outside"] for c in rows])
        settings[name] = {
            "dice": float(dice.mean()),
            "worst": float(dice.min()),
            "gain": float(gain.mean()),
            "worst_gain": float(gain.min()),
            "dice_outside": float(outside.mean()),
            "gain_outside": float((outside - np.array([c["corrected_outside"] for c in rows])).mean()),
            "seconds_per_step": float(np.mean([c["settings"][name]["seconds_per_step"] for c in rows])),
            "passes": bool(gain.mean() >= 0.005 and gain.min() >= -0.02),
        }
    summary["settings"] = settings
    curve: dict[str, dict[str, float]] = {"corrected": {}, "refined": {}}
    for kind in curve:
        for n in rows[0]["curve"][kind]:
            curve[kind][str(n)] = float(np.mean([c["curve"][kind][n] for c in rows]))
    summary["curve"] = curve
    return summary


def markdown(summary: dict[str, Any], args: argparse.Namespace, header: dict[str, Any]) -> str:
    lines = [
        f"# Refinement benchmark: {args.kind}",
        "",
        f"Segmentor `{header['segmentor']}`, refiner `{header['refiner']}`, {summary['cases']} validation cases "
        f"with something to correct ({summary.get('perfect_cases', 0)} already perfect), {header['machine']}, "
        f"{args.threads} threads, {header['minutes']:.1f} minutes.",
        "",
        "| | mean Dice | worst Dice | mean Dice outside the edits |",
        "|---|---|---|---|",
        f"| segmentor alone | {summary['segmentor']['mean']:.4f} | {summary['segmentor']['worst']:.4f} "
        f"| {summary['segmentor_outside']['mean']:.4f} |",
        f"| corrected mask (1 correction) | {summary['corrected']['mean']:.4f} | {summary['corrected']['worst']:.4f} "
        f"| {summary['corrected_outside']['mean']:.4f} |",
        "",
        "| scope / steps / spread | mean Dice | worst Dice | mean change vs corrected | worst change "
        "| Dice outside edits | change outside | s per step | meets the bar |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, row in summary["settings"].items():
        lines.append(
            f"| {name} | {row['dice']:.4f} | {row['worst']:.4f} | {row['gain']:+.4f} | {row['worst_gain']:+.4f} "
            f"| {row['dice_outside']:.4f} | {row['gain_outside']:+.4f} | {row['seconds_per_step']:.3f} "
            f"| {'yes' if row['passes'] else 'no'} |"
        )
    corrections = list(summary["curve"]["corrected"])
    lines += [
        "",
        f"Interactive curve (refinement at {args.default_scope}/{args.default_steps}/{args.default_spread:g} after "
        "each correction):",
        "",
        "| corrections | 0 | " + " | ".join(corrections) + " |",
        "|---" * (len(corrections) + 2) + "|",
        f"| corrections only | {summary['segmentor']['mean']:.4f} | "
        + " | ".join(f"{summary['curve']['corrected'][n]:.4f}" for n in corrections)
        + " |",
        f"| with refinement | {summary['segmentor']['mean']:.4f} | "
        + " | ".join(f"{summary['curve']['refined'][n]:.4f}" for n in corrections)
        + " |",
        "",
    ]
    return "\n".join(lines)


def plot(summary: dict[str, Any], path: Path, title: str) -> None:
    """Mean Dice against the number of corrections, with and without refinement, as a PNG."""
    from PIL import Image, ImageDraw

    width, height, margin = 560, 360, 60
    picture = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(picture)
    counts = [0] + [int(n) for n in summary["curve"]["corrected"]]
    series = {
        "corrections only": [summary["segmentor"]["mean"]] + list(summary["curve"]["corrected"].values()),
        "with refinement": [summary["segmentor"]["mean"]] + list(summary["curve"]["refined"].values()),
    }
    low = min(min(v) for v in series.values())
    low = max(0.0, np.floor(low * 20) / 20)
    high = 1.0

    def at(n: float, dice: float) -> tuple[float, float]:
        x = margin + (width - 1.5 * margin) * n / max(counts)
        y = height - margin - (height - 1.6 * margin) * (dice - low) / (high - low)
        return x, y

    draw.line([at(0, low), at(max(counts), low)], fill="black")
    draw.line([at(0, low), at(0, high)], fill="black")
    for n in counts:
        x, y = at(n, low)
        draw.text((x - 3, y + 6), str(n), fill="black")
    for tick in np.linspace(low, high, 5):
        x, y = at(0, tick)
        draw.text((x - 40, y - 6), f"{tick:.2f}", fill="black")
    draw.text((width / 2 - 60, height - 25), "corrections", fill="black")
    draw.text((margin, 10), title, fill="black")
    for (name, values), colour, offset in zip(series.items(), ("grey", "red"), (30, 45)):
        points = [at(n, v) for n, v in zip(counts, values)]
        draw.line(points, fill=colour, width=3)
        draw.text((width - 200, offset), name, fill=colour)
    picture.save(path)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    import torch

    from MedSegSuiteLib.inference import Predictor
    from MedSegSuiteLib.refine.refinement import Refiner

    torch.set_num_threads(args.threads)
    segmentor_id, refiner_id, data_name = DEFAULTS[args.kind]
    args.data = args.data or str(data_root() / data_name)
    segmentor_model, refiner_model = _model(args.segmentor or segmentor_id), _model(args.refiner or refiner_id)
    scopes = args.scopes or (["volume"] if args.kind == "photos" else ["volume", "neighbours"])
    segmentor = Predictor(segmentor_model, device="cpu")
    refiner = Refiner(refiner_model, device="cpu")
    started = time.perf_counter()
    cases = {}
    for case_id, image, reference in _cases(args, segmentor_model, refiner_model):
        cases[case_id] = run_case(image, reference, segmentor, refiner, args, scopes)
        print(case_id, json.dumps({k: v for k, v in cases[case_id].items() if k != "curve"})[:300], flush=True)
    summary = summarise(cases)
    header = {
        "segmentor": segmentor_model.card.id,
        "refiner": refiner_model.card.id,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "minutes": (time.perf_counter() - started) / 60,
    }
    out = Path(args.out or REPO / "benchmarks" / "results" / f"refinement-{args.kind}")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({**header, "summary": summary, "cases": cases}, indent=1))
    out.with_suffix(".md").write_text(markdown(summary, args, header))
    plot(summary, out.with_suffix(".png"), f"{args.kind}: mean Dice against corrections")
    print(out.with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
