"""Batch benchmark: N hippocampus volumes in one ``medsegsuite segment`` command against N separate commands.

Run from the repository root: ``nice python -m benchmarks.batch [--cases 20]``. It reads
``../shared/data/msd_hippocampus/images`` (or ``$MEDSEGSUITE_DATA/msd_hippocampus``), segments the
first N volumes (sorted by name) with ``Resources/Models/hippocampus-dnet-lite`` both ways, checks
that both ways give the same labels, and writes ``benchmarks/results/batch.json``. Wall-clock times
include starting Python, importing torch and loading the model, which is what one batch command saves.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
MODEL = REPO / "Resources" / "Models" / "hippocampus-dnet-lite"


def _data() -> Path:
    root = Path(os.environ.get("MEDSEGSUITE_DATA") or REPO.parent / "shared" / "data")
    return root / "msd_hippocampus" / "images"


def _run(args: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "MedSegSuiteLib", *args],
        check=True,
        capture_output=True,
        text=True,
        encoding="utf-8",
        errors="replace",
    )
    return time.perf_counter() - started


def main() -> int:
    """Time both ways, compare their labels and write the result file; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=20, help="how many volumes (default 20)")
    parser.add_argument("--output", default=str(REPO / "benchmarks" / "results" / "batch.json"))
    args = parser.parse_args()
    images = sorted(_data().glob("*.nii.gz"))[: args.cases]
    if len(images) < args.cases:
        print(f"need {args.cases} volumes in {_data()}, found {len(images)}", file=sys.stderr)
        return 2
    from MedSegSuiteLib.io import read_image

    work = Path(tempfile.mkdtemp(prefix="medsegsuite-batch-bench-"))
    try:
        listing = work / "cases.txt"
        listing.write_text("".join(f"{p}\n" for p in images), encoding="utf-8")
        batch_seconds = _run(["segment", str(listing), "-m", str(MODEL), "-o", str(work / "batch"), "-q"])
        separate = []
        (work / "separate").mkdir()
        for image in images:
            name = image.name
            separate.append(_run(["segment", str(image), "-m", str(MODEL), "-o", str(work / "separate" / name), "-q"]))
        same = all(
            np.array_equal(read_image(work / "batch" / p.name).array, read_image(work / "separate" / p.name).array)
            for p in images
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result = {
        "cases": len(images),
        "model": MODEL.name,
        "batch_seconds": round(batch_seconds, 1),
        "separate_seconds": round(sum(separate), 1),
        "separate_per_case_seconds": [round(s, 2) for s in separate],
        "ratio": round(batch_seconds / sum(separate), 3),
        "same_labels": same,
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "load_average_at_end": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "note": "wall-clock seconds; a load_average_at_end above the core count means the CPU was shared",
    }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(result, indent=2))
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
