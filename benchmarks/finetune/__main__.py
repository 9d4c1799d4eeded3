"""Finetuning benchmark: does finetuning on a few of a clinician's cases help on their next patients?

    python benchmarks/finetune [--parent Resources/Models/hippocampus-dnet-lite]
        [--data ../shared/data/msd_hippocampus] [--labelled 3 5 10] [--draws 3]
        [--unlabelled 6] [--test 12] [--iterations 200] [--threads 1]
        [--recipe key=value ...] [--lr LR] [--out benchmarks/results/finetune-<parent>]

Only cases the parent never trained on are used: its card's ``training.validation_ids``
(the cases it was validated on, never trained on). For each draw (a seeded shuffle of that
pool) the last ``--test`` cases are the "next patients", never shown to finetuning; the
first ``N`` are the labelled cases and the next ``--unlabelled`` go in without labels.
For each ``N`` the parent is finetuned with ``medsegsuite finetune``'s defaults (held-back
check included) and the mean Dice on the test cases is measured before and after. The
Dice "used" is what the user ends up segmenting with: the new model when it is selected,
the parent otherwise. Results: ``<out>.json`` and ``<out>.md`` (one row per run, then the
mean and worst change per ``N``, and the time per run on this machine).

The data folder defaults to ``$MEDSEGSUITE_DATA/msd_hippocampus`` or
``../shared/data/msd_hippocampus`` beside the repository.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]


def data_root() -> Path:
    """``$MEDSEGSUITE_DATA``, else ``../shared/data`` beside the repository."""
    return Path(os.environ.get("MEDSEGSUITE_DATA") or REPO.parent / "shared" / "data")


def _value(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="benchmarks/finetune", description=__doc__.split("\n")[0])
    parser.add_argument("--parent", default=str(REPO / "Resources" / "Models" / "hippocampus-dnet-lite"))
    parser.add_argument("--data", help="labelled case folder (images/ + labels/); default: the MSD hippocampus")
    parser.add_argument("--labelled", type=int, nargs="+", default=[3, 5, 10])
    parser.add_argument("--draws", type=int, default=3)
    parser.add_argument("--unlabelled", type=int, default=6)
    parser.add_argument("--test", type=int, default=12, help="unseen cases measured before/after per draw")
    parser.add_argument("--iterations", type=int, default=200)
    parser.add_argument("--lr", type=float)
    parser.add_argument("--held-out", type=int)
    parser.add_argument("--min-gain", type=float, help="held-back Dice gain a checkpoint needs (library default)")
    parser.add_argument("--recipe", nargs="*", default=[], help="recipe options key=value")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", help="result files without suffix (default benchmarks/results/finetune-<parent>)")
    parser.add_argument("--label", default="", help="a name for this configuration in the results")
    return parser.parse_args(argv)


def _pool(parent_card: dict[str, Any], data: Path) -> list[str]:
    available = {p.name[: -len(".nii.gz")] for p in (data / "labels").glob("*.nii.gz")}
    unseen = sorted(set(parent_card.get("training", {}).get("validation_ids", [])) & available)
    if not unseen:
        sys.exit(f"the parent's card lists no validation_ids found in {data}: no cases it is known never to have seen")
    return unseen


def _mean_dice(model_dir: Path, cases: list, threads: int) -> float:
    from MedSegSuiteLib.evaluation import evaluate_model
    from MedSegSuiteLib.inference import Predictor
    from MedSegSuiteLib.models import load_model

    return float(evaluate_model(Predictor(load_model(str(model_dir)), device="cpu"), cases).mean()["dice"])


def run(args: argparse.Namespace) -> dict[str, Any]:
    import numpy as np
    import torch

    from MedSegSuiteLib.models import ModelRegistry
    from MedSegSuiteLib.training.datasets import discover_cases, load_cases
    from MedSegSuiteLib.training.finetune import FinetuneOptions, finetune_model

    torch.set_num_threads(args.threads)
    parent = Path(args.parent).resolve()
    card = json.loads((parent / "card.json").read_text(encoding="utf-8"))
    data = Path(args.data) if args.data else data_root() / "msd_hippocampus"
    if not (data / "labels").is_dir():
        sys.exit(f"no labelled cases at {data} (set MEDSEGSUITE_DATA or pass --data)")
    pool = _pool(card, data)
    need = max(args.labelled) + args.unlabelled + args.test
    if len(pool) < need:
        sys.exit(f"{len(pool)} unseen cases, {need} needed: lower --unlabelled or --test")
    by_id = {case.id: case for case in discover_cases(data)}
    recipe = {key: _value(value) for key, value in (item.split("=", 1) for item in args.recipe)}
    runs = []
    for draw in range(args.draws):
        order = [pool[int(i)] for i in np.random.default_rng(1000 + draw).permutation(len(pool))]
        test = load_cases([by_id[i] for i in order[-args.test :]])
        labelled_all = load_cases([by_id[i] for i in order[: max(args.labelled)]])
        start = max(args.labelled)
        unlabelled = [
            (i, image, None) for i, image, _ in load_cases([by_id[i] for i in order[start : start + args.unlabelled]])
        ]
        before = _mean_dice(parent, test, args.threads)
        for n in args.labelled:
            with tempfile.TemporaryDirectory() as home:
                options = FinetuneOptions(
                    parent=str(parent),
                    labelled=labelled_all[:n],
                    unlabelled=unlabelled or None,
                    iterations=args.iterations,
                    lr=args.lr,
                    device="cpu",
                    seed=draw,
                    held_out=args.held_out,
                    recipe=dict(recipe),
                )
                if args.min_gain is not None:
                    options.min_gain = args.min_gain
                started = time.perf_counter()
                entry = finetune_model(options, ModelRegistry(user_dir=Path(home) / "models"))
                seconds = time.perf_counter() - started
                after = _mean_dice(entry.directory, test, args.threads)
            verdict = entry.card.training["finetune"]["verdict"]
            used = after if verdict["selected"] else before
            row = {
                "draw": draw,
                "labelled": n,
                "unlabelled": len(unlabelled),
                "test_cases": len(test),
                "held_back": verdict["held_back"],
                "held_back_before": verdict["dice_before"],
                "held_back_after": verdict["dice_after"],
                "verdict": verdict["outcome"],
                "kept_parent": verdict["kept_parent"],
                "selected": verdict["selected"],
                "test_before": round(before, 4),
                "test_after": round(after, 4),
                "test_change": round(after - before, 4),
                "used_change": round(used - before, 4),
                "seconds": round(seconds, 1),
            }
            runs.append(row)
            print(json.dumps(row), flush=True)
    return {
        "parent": card["id"],
        "parent_dir": str(parent),
        "label": args.label,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"{args.threads} thread(s), torch {torch.__version__}",
        "settings": {
            "iterations": args.iterations,
            "lr": args.lr,
            "held_out": args.held_out,
            "min_gain": args.min_gain if args.min_gain is not None else FinetuneOptions.min_gain,
            "recipe": recipe,
            "unlabelled": args.unlabelled,
            "test": args.test,
            "draws": args.draws,
            "pool": len(pool),
        },
        "runs": runs,
    }


def markdown(result: dict[str, Any]) -> str:
    """The run table and the per-N summary."""
    settings = result["settings"]
    lines = [
        f"# Finetuning benchmark: {result['parent']} {result['label']}".rstrip(),
        "",
        f"{settings['iterations']} iterations, {settings['unlabelled']} unlabelled cases, "
        f"{settings['test']} unseen test cases per draw (pool of {settings['pool']} cases the parent never "
        f"trained on); lr {settings['lr'] or 'default'}, recipe {settings['recipe'] or 'default'}. "
        f"Machine: {result['machine']}.",
        "",
        "| labelled | draw | held back: before -> after | verdict | unseen: before -> after | change | "
        "used change | seconds |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in result["runs"]:
        lines.append(
            f"| {r['labelled']} | {r['draw']} | {r['held_back_before']:.4f} -> {r['held_back_after']:.4f} "
            f"({r['held_back']}) | {r['verdict']}{' (parent kept)' if r['kept_parent'] else ''}"
            f"{'' if r['selected'] else ', not selected'} | {r['test_before']:.4f} -> {r['test_after']:.4f} | "
            f"{r['test_change']:+.4f} | {r['used_change']:+.4f} | {r['seconds']:.0f} |"
        )
    lines += [
        "",
        "| labelled | mean change | worst change | mean used change | mean seconds per run |",
        "|---|---|---|---|---|",
    ]
    for n in sorted({r["labelled"] for r in result["runs"]}):
        rows = [r for r in result["runs"] if r["labelled"] == n]
        changes = [r["test_change"] for r in rows]
        used = [r["used_change"] for r in rows]
        seconds = sum(r["seconds"] for r in rows) / len(rows)
        lines.append(
            f"| {n} | {sum(changes) / len(changes):+.4f} | {min(changes):+.4f} | "
            f"{sum(used) / len(used):+.4f} | {seconds:.0f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    sys.path.insert(0, str(REPO))
    result = run(args)
    out = Path(args.out) if args.out else REPO / "benchmarks" / "results" / f"finetune-{result['parent']}"
    out.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{out}.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    Path(f"{out}.md").write_text(markdown(result), encoding="utf-8")
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
