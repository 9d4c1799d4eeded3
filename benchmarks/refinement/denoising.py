"""Refiner check: what has a HiDiff model's refiner learned, step by step, on unseen cases?

    python benchmarks/refinement/denoising.py --kind photos|volumes [--refiner ID_OR_FOLDER]
        [--data FOLDER] [--cases N] [--seed 0] [--threads 1] [--out benchmarks/results/denoising-<kind>]

For each validation case (the refiner card's ``training.validation_ids``; for volumes, the
axial slices that hold the structure) at the model's input size:

- the segmentor's own prediction (the prior ``p``), and the published full chain (10 refiner
  calls from ``B(p)``), as Dice against the reference;
- for every diffusion step ``k``: a state drawn from the training distribution
  ``y_k ~ q(y_k | y0, p)`` (the reference mixed towards the prior), and the refiner's one-call
  estimate ``y0_hat`` from it. A refiner that has learned to correct its segmentor turns
  ``Dice(y_k)`` into a clearly higher ``Dice(y0_hat)`` at every ``k``; at the last step, where
  ``y_k`` is a draw from the prior, that gain is what the full chain can add to the segmentor;
- the true flip rate of ``y_k`` against the refiner's mean flip probability ``|y_k - y0_hat|``:
  a refiner that predicts more flips than there are salts every Bernoulli draw of the chain
  with noise it never saw in training, so the chain is also run with its intermediate
  estimates thresholded (not the published sampler) to show how much of its loss that is.

Dice is the mean over the labels present (as ``refine.simulated_user.foreground_dice``),
per case, then averaged. Results: ``<out>.json`` and ``<out>.md``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]


def _refinement_benchmark() -> Any:
    """The refinement benchmark's module (its defaults, data and model helpers)."""
    spec = importlib.util.spec_from_file_location("refinement_benchmark", HERE / "__main__.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="benchmarks/refinement/denoising.py", description=__doc__.split("\n")[0])
    parser.add_argument("--kind", choices=("photos", "volumes"), required=True)
    parser.add_argument("--refiner", help="HiDiff model id or folder (default: the kind's bundled HiDiff model)")
    parser.add_argument("--data", help="the labelled data folder (default: the kind's shared data set)")
    parser.add_argument("--cases", type=int, default=12, help="validation cases to use (the first N, sorted)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", help="results path without suffix (default: benchmarks/results/denoising-KIND)")
    return parser.parse_args(argv)


def case_inputs(model: Any, image: Any, reference: Any) -> tuple[Any, Any]:
    """Normalised image slices ``[B, C, h, w]`` and class maps ``[B, h, w]`` at the model's input size.

    Volumes give their axial slices that hold a labelled voxel; a photo gives itself.
    """
    import torch
    import torch.nn.functional as F

    from MedSegSuiteLib.geometry import to_canonical
    from MedSegSuiteLib.preprocessing import match_channels, normalize

    card = model.card
    canonical, _ = to_canonical(image)
    data = normalize(match_channels(canonical.channel_first(), card.input.channels), card.input.normalization)
    truth = np.asarray(to_canonical(reference)[0].array)
    lut = np.zeros(max(int(truth.max()), max(label.value for label in card.labels)) + 1, dtype=np.int64)
    for index, label in enumerate(card.labels):
        lut[label.value] = index + 1
    classes = lut[truth]
    chosen = [int(z) for z in np.nonzero(classes.reshape(classes.shape[0], -1).any(1))[0]]
    size = (card.input.size_xy[1], card.input.size_xy[0])
    x = torch.from_numpy(np.ascontiguousarray(data[:, chosen].transpose(1, 0, 2, 3))).float()
    x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    y = torch.from_numpy(classes[chosen]).float().unsqueeze(1)
    y = F.interpolate(y, size=size, mode="nearest")[:, 0].long()
    return x, y


def measure_case(network: Any, x: Any, classes: Any, seed: int) -> dict[str, Any]:
    """Dice of the segmentor, of the full chain, and of ``y_k`` and ``y0_hat`` for every step ``k``."""
    import torch

    from MedSegSuiteLib.networks.bbdm import labels_from_probabilities, mask_to_channels
    from MedSegSuiteLib.refine.simulated_user import foreground_dice

    truth = classes.numpy()
    diffusion = network.diffusion

    def dice(probabilities: torch.Tensor) -> float:
        return foreground_dice(labels_from_probabilities(probabilities.float()).numpy(), truth)

    generator = torch.Generator().manual_seed(seed)
    with torch.inference_mode():
        feats, prior = network.condition(x)
        y0 = mask_to_channels(classes, network.num_classes)
        out: dict[str, Any] = {"slices": int(x.shape[0]), "segmentor": dice(prior), "steps": {}}
        model_fn = network.model_fn(x, feats, prior)
        for k in range(diffusion.num_steps):
            steps = torch.full((x.shape[0],), k, dtype=torch.long)
            yk = diffusion.q_sample(y0, prior, steps, generator)
            y0_hat = diffusion.calibrate_logits(yk, model_fn(yk, steps).float())
            out["steps"][k] = {
                "state": dice(yk),
                "estimate": dice(y0_hat),
                "flip_rate": float((yk - y0).abs().mean()),
                "predicted_flip_rate": float((yk - y0_hat).abs().mean()),
            }
        indices = diffusion.chain_indices(diffusion.num_steps, start=diffusion.num_steps - 1)
        start = diffusion.start_state(prior, indices[0], generator=generator)
        out["full_chain"] = dice(diffusion.sample(model_fn, prior, indices, start, generator=generator))
        out["full_chain_hard"] = dice(_hard_chain(diffusion, model_fn, indices, start, generator))
    return out


def _hard_chain(diffusion: Any, model_fn: Any, indices: list[int], y: Any, generator: Any) -> Any:
    """The DDIM-style chain with each intermediate ``y0_hat`` thresholded at 0.5 before its Bernoulli draw
    (not the published sampler: it shows how much of the chain's loss comes from drawing soft estimates)."""
    import torch

    for n, k in enumerate(indices):
        y0_hat = diffusion.calibrate_logits(y, model_fn(y, torch.full((y.shape[0],), k, dtype=torch.long)).float())
        if n + 1 == len(indices):
            return y0_hat
        y = diffusion.ddim_step(y, (y0_hat > 0.5).float(), k, indices[n + 1], generator)
    return y


def summarise(cases: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Means over the cases."""
    rows = list(cases.values())
    steps = sorted(rows[0]["steps"])
    return {
        "cases": len(rows),
        "segmentor": float(np.mean([r["segmentor"] for r in rows])),
        "full_chain": float(np.mean([r["full_chain"] for r in rows])),
        "full_chain_hard": float(np.mean([r["full_chain_hard"] for r in rows])),
        "steps": {
            str(k): {name: float(np.mean([r["steps"][k][name] for r in rows])) for name in rows[0]["steps"][k]}
            for k in steps
        },
    }


def markdown(summary: dict[str, Any], header: dict[str, Any]) -> str:
    lines = [
        f"# Refiner check: {header['refiner']}",
        "",
        f"{summary['cases']} validation cases, {header['machine']}, {header['minutes']:.1f} minutes. "
        "Mean Dice at the model's input size.",
        "",
        f"- segmentor alone (the prior): **{summary['segmentor']:.4f}**",
        f"- published full chain (10 refiner calls from B(prior)): **{summary['full_chain']:.4f}**",
        f"- the same chain with each intermediate y0_hat thresholded before its draw: "
        f"**{summary['full_chain_hard']:.4f}**",
        "",
        "| step k | Dice of y_k ~ q(y_k given y0, prior) | Dice of the refiner's y0_hat | gain "
        "| true flip rate of y_k | the refiner's mean flip probability |",
        "|---|---|---|---|---|---|",
    ]
    for k, row in summary["steps"].items():
        lines.append(
            f"| {k} | {row['state']:.4f} | {row['estimate']:.4f} | {row['estimate'] - row['state']:+.4f} "
            f"| {row['flip_rate']:.4f} | {row['predicted_flip_rate']:.4f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    import torch

    refinement = _refinement_benchmark()
    torch.set_num_threads(args.threads)
    _, refiner_id, data_name = refinement.DEFAULTS[args.kind]
    args.data = args.data or str(refinement.data_root() / data_name)
    model = refinement._model(args.refiner or refiner_id)
    if model.card.network != "hidiff":
        raise SystemExit(f"{model.card.id} is a {model.card.network} model; the refiner check needs a HiDiff model")
    started = time.perf_counter()
    cases = {}
    for case_id, image, reference in refinement._cases(args, model, model):
        x, classes = case_inputs(model, image, reference)
        if len(x):
            cases[case_id] = measure_case(model.network, x, classes, args.seed)
            print(case_id, json.dumps(cases[case_id])[:200], flush=True)
    if not cases:
        raise SystemExit("no validation case holds a labelled voxel")
    summary = summarise(cases)
    header = {
        "refiner": model.card.id,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, {args.threads} thread(s)",
        "minutes": (time.perf_counter() - started) / 60,
    }
    out = Path(args.out or REPO / "benchmarks" / "results" / f"denoising-{args.kind}")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({**header, "summary": summary, "cases": cases}, indent=1))
    out.with_suffix(".md").write_text(markdown(summary, header))
    print(out.with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    sys.exit(main(sys.argv[1:]))
