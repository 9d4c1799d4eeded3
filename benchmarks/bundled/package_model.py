"""Turn a trained model folder into a bundled model in Resources/Models/<id>/.

    python benchmarks/bundled/package_model.py TRAINED_DIR DATA [--h5-spacing X,Y,Z] [--drop-aux]
        [--version X.Y.Z] [--modality MR] [--sampling-steps N] [--output Resources/Models]

- re-measures Dice/IoU/HD95 on the card's validation cases with ``medsegsuite evaluate``
  (the Predictor at each image's own resolution, as ``medsegsuite segment`` runs it);
- stores the weights as float16 when the validation Dice moves by less than 0.005,
  float32 otherwise, and records which;
- drops training-only parts (ConDSeg's aux head) with ``--drop-aux``;
- records the measured CPU time per case and the peak memory in ``resources``;
- for HiDiff, measures both its full inference (segmentor, then the refiner's chain from
  the prior) and its segmentor alone, records the one ``segment`` does not use as
  ``dice_full_inference`` or ``dice_segmentor_only``; ``--sampling-steps 0`` makes
  ``segment`` use the segmentor alone (the refiner still runs refinement steps);
- adds the profile of the training inputs (``training.inputs``, for fit warnings) to a card
  trained before ``medsegsuite train`` recorded it, and ``--modality`` to that profile.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

from MedSegSuiteLib.evaluation import evaluate_model
from MedSegSuiteLib.inference import Predictor
from MedSegSuiteLib.inference.fit_check import input_profile
from MedSegSuiteLib.models import LoadedModel, build_network, card_from_dict, load_model, save_model
from MedSegSuiteLib.resources import resources_dir
from MedSegSuiteLib.training.datasets import discover_cases, load_cases

TOLERANCE = 0.005


def evaluate(model: LoadedModel, cases) -> tuple[dict, float]:  # noqa: ANN001
    predictor = Predictor(model, device="cpu")
    started = time.perf_counter()
    result = evaluate_model(predictor, cases).mean()
    return result, (time.perf_counter() - started) / max(1, len(cases))


def _data_name(data: str) -> str:
    """The data set's name: its folder, or the folder above a plain ``h5`` folder."""
    path = Path(data).resolve()
    return path.parent.name if path.name == "h5" else path.name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("trained")
    parser.add_argument("data")
    parser.add_argument("--h5-spacing", default="1,1,1")
    parser.add_argument("--drop-aux", action="store_true", help="build ConDSeg without its training-only aux head")
    parser.add_argument("--output", default=str(resources_dir() / "Models"))
    parser.add_argument("--sampling-steps", type=int, help="HiDiff: refiner calls when segmenting (0: segmentor alone)")
    parser.add_argument("--version", help="the bundled model's version (default: the trained card's)")
    parser.add_argument("--modality", help="the training images' modality (e.g. MR), for the fit warnings")
    args = parser.parse_args()
    threads = int(os.environ.get("OMP_NUM_THREADS") or 2)  # 1 when it shares the CPU with a training
    torch.set_num_threads(threads)
    trained = load_model(args.trained)
    card = trained.card.to_dict()
    if args.version:
        card["version"] = args.version
    spacing = tuple(float(v) for v in args.h5_spacing.split(","))
    ids = set(card["training"]["validation_ids"])
    cases = load_cases([c for c in discover_cases(args.data) if c.id in ids], spacing)
    if args.drop_aux:
        card["config"] = {**card["config"], "aux_head": False}
        slim = build_network(card_from_dict({**card, "weights": {"file": "x"}}))
        slim.load_state_dict(trained.network.state_dict(), strict=True)
        trained = LoadedModel(card_from_dict({**card, "weights": {"file": "x"}}), slim.eval())
    if "inputs" not in card["training"]:
        training = load_cases([c for c in discover_cases(args.data) if c.id not in ids], spacing)
        card["training"]["inputs"] = input_profile([image for _, image, _ in training])
        del training
    if args.modality:
        card["training"]["inputs"]["modality"] = args.modality
    other = None  # HiDiff: the inference segment does not use (full chain, or the segmentor alone)
    if card["network"] == "hidiff":
        used = trained.network.sampling_steps if args.sampling_steps is None else args.sampling_steps
        published = card["config"].get("sampling_steps", trained.network.sampling_steps)
        card["config"] = {**card["config"], "sampling_steps": used}
        trained.network.sampling_steps = published if used == 0 else 0
        other = ("dice_full_inference" if used == 0 else "dice_segmentor_only", evaluate(trained, cases)[0])
        trained.network.sampling_steps = used
    full, seconds = evaluate(trained, cases)
    if other is not None and other[0] == "dice_full_inference" and other[1]["dice"] < full["dice"]:
        card["description"] = (
            card.get("description", "").rstrip() + " Segment uses the segmentor alone (its Dice is the card's); "
            "the refiner's full chain from the prior scored lower (dice_full_inference) and is meant for "
            "refinement steps from a corrected mask."
        ).strip()
    with tempfile.TemporaryDirectory() as tmp:
        half_entry = save_model(Path(tmp) / "half", trained.network, {**card, "weights": {}}, half=True)
        half, _ = evaluate(load_model(half_entry), cases)
    use_half = abs(half["dice"] - full["dice"]) < TOLERANCE
    chosen = half if use_half else full
    split = (
        f"validation: {len(cases)} cases of {_data_name(args.data)} held out from training "
        "(chosen before training, never trained on), measured at each image's original resolution"
    )
    card["metrics"] = [{"name": "dice", "value": round(chosen["dice"], 4), "split": split}]
    if chosen.get("hd95") is not None:
        card["metrics"].append({"name": "hd95_mm", "value": round(chosen["hd95"], 3), "split": split})
    card["metrics"].append({"name": "iou", "value": round(chosen["iou"], 4), "split": split})
    if other is not None:
        card["metrics"].append({"name": other[0], "value": round(other[1]["dice"], 4), "split": split})
    for value, metrics in chosen["per_label"].items():
        card["metrics"].append({"name": f"dice_label_{value}", "value": round(metrics["dice"], 4), "split": split})
    card["resources"] = {
        **card.get("resources", {}),
        "cpu_seconds_per_case": round(seconds, 2),
        "cpu_threads": threads,
        "ram_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20 + 0.25, 1),
        "weights_dtype": "float16" if use_half else "float32",
        "fp16_dice_change": round(half["dice"] - full["dice"], 5),
    }
    target = Path(args.output) / card["id"]
    target.parent.mkdir(parents=True, exist_ok=True)
    entry = save_model(
        target,
        trained.network,
        card,
        half=use_half,
        overwrite=True,
        extra_files={"training_log.json": (Path(args.trained) / "training_log.json").read_text(encoding="utf-8")},
    )
    print(
        json.dumps(
            {
                "id": entry.card.id,
                "dice": chosen["dice"],
                **({other[0]: other[1]["dice"]} if other else {}),
                "fp16": use_half,
                "seconds_per_case": seconds,
                "bytes": entry.card.weights["bytes"],
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    sys.exit(main())
