"""Run the benchmark cases, each in a fresh process, and write JSON + a Markdown table.

    python benchmarks/suite.py [--only SUBSTRING ...] [--device cpu|cuda] [--threads N]
                               [--repeats N] [--quick] [--out benchmarks/results]

Cases are defined in ``cases.py``. Results go to ``<out>/<device>[-quick].json`` and
``.md``; the Markdown names the machine it ran on. With ``--only``, the chosen cases'
rows of an existing result file are replaced and the other rows kept.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from cases import cases_for  # noqa: E402


def machine(device: str) -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    text = f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}"
    if device == "cuda" and torch.cuda.is_available():
        text += f", {torch.cuda.get_device_name(0)}"
    return text


def run_case(case: dict, timeout: float) -> dict:
    done = subprocess.run(
        [sys.executable, str(HERE / "measure.py"), json.dumps(case)], capture_output=True, text=True, timeout=timeout
    )
    if done.returncode != 0:
        return {"error": (done.stderr.strip().splitlines() or ["failed"])[-1][:300]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def markdown(results: list[dict], header: str) -> str:
    lines = [header, "", "| case | median s | min-max s | peak RSS MB | notes |", "|---|---:|---:|---:|---|"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['name']} | - | - | - | error: {r['error']} |")
            continue
        notes = ", ".join(f"{k}={v}" for k, v in r.items() if k in ("params_m", "voxels", "peak_cuda_mb", "note"))
        lines.append(
            f"| {r['name']} | {r['median_s']:.3f} | {r['min_s']:.3f}-{r['max_s']:.3f} | "
            f"{r['peak_rss_mb']:.0f} | {notes} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--only", nargs="*", default=[], help="run cases whose name contains any of these (updating their rows)"
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="lite presets and small inputs only")
    parser.add_argument("--timeout", type=float, default=1800)
    parser.add_argument("--out", default=str(HERE / "results"))
    args = parser.parse_args()
    cases = [c for c in cases_for(args.device, args.quick) if not args.only or any(s in c["name"] for s in args.only)]
    results = []
    for case in cases:
        case = {"threads": args.threads, "repeats": args.repeats, "device": args.device, **case}
        started = time.time()
        result = {"name": case["name"], **run_case(case, args.timeout)}
        results.append(result)
        print(
            f"{case['name']}: {result.get('median_s', result.get('error'))} ({time.time() - started:.0f} s)", flush=True
        )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    header = (
        f"Measured {time.strftime('%Y-%m-%d')} on {machine(args.device)}; {args.threads} threads, "
        f"median of {args.repeats} after a warm-up, fp32 unless noted."
    )
    tag = args.device + ("-quick" if args.quick else "")
    previous = out / f"{tag}.json"
    if args.only and previous.is_file():  # re-running some cases updates their rows and keeps the others
        fresh = {r["name"]: r for r in results}
        kept = json.loads(previous.read_text(encoding="utf-8"))["results"]
        results = [fresh.pop(r["name"], r) for r in kept] + list(fresh.values())
    (out / f"{tag}.json").write_text(json.dumps({"machine": header, "results": results}, indent=2), encoding="utf-8")
    (out / f"{tag}.md").write_text(markdown(results, header), encoding="utf-8")
    print(markdown(results, header))


if __name__ == "__main__":
    main()
