#!/usr/bin/env python
"""Seconds per training iteration of each lite network's own recipe on this CPU, by input size and precision.

Each row runs the real recipe step (loss, backward, optimiser) on an in-memory store of
synthetic cases, so only the network, its loss and the augmentation are timed; the
batch is drawn on the training thread (``sample s`` is that share). Writes
``benchmarks/results/training-speed.{json,md}``.

    python benchmarks/training_speed.py [--repeats 3] [--only banet,dnet]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from MedSegSuiteLib import networks
from MedSegSuiteLib.training.data import PatchStore, SliceStore
from MedSegSuiteLib.training.recipes import recipe_module
from MedSegSuiteLib.training.recipes.base import TrainingData
from MedSegSuiteLib.volume import Volume

RESULTS = Path(__file__).resolve().parent / "results"

# network: (dims, sizes, batch size, modes)
PLAN = {
    "banet": (2, (160, 192, 224), 8, ("fp32", "bf16", "bf16+channels-last")),
    "condseg": (2, (160, 224), 4, ("fp32", "bf16", "bf16+channels-last")),
    "hidiff": (2, (160, 224), 8, ("fp32", "bf16")),
    "dnet": (3, (64,), 2, ("fp32", "bf16")),
    "canet": (3, (96,), 2, ("fp32", "bf16")),
}


def _cases(dims: int, size: int, count: int = 6) -> list:
    rng = np.random.default_rng(0)
    cases = []
    for i in range(count):
        if dims == 2:
            image = rng.integers(0, 255, (3, 1, size + 40, size + 60), dtype=np.uint8)
            label = np.zeros((1, size + 40, size + 60), np.uint8)
            label[:, 20 : 20 + size // 2, 30 : 30 + size // 3] = 1
            cases.append((f"c{i}", Volume(image), Volume(label)))
        else:
            image = rng.normal(100, 20, (size + 8, size + 8, size + 8)).astype(np.float32)
            label = np.zeros(image.shape, np.uint8)
            label[10:30, 10:40, 10:30] = 1
            cases.append((f"c{i}", Volume(image), Volume(label)))
    return cases


def _measure(network_name: str, dims: int, size: int, batch: int, mode: str, repeats: int) -> dict:
    module = recipe_module(network_name)
    defaults = module.card_defaults(dims)
    channels = int(defaults.get("channels", 3 if dims == 2 else 1))
    normalization = defaults["input"]["normalization"]
    cases = _cases(dims, size)
    if dims == 2:
        store = SliceStore(cases, [1], channels, normalization, (size, size))
        patch = None
    else:
        store = PatchStore(cases, [1], channels, normalization)
        patch = (size, size, size)
    labels = [{"value": 1, "name": "object"}]
    config = module.network_config(dims, channels, 1, patch_zyx=patch)
    torch.manual_seed(0)
    network = networks.create(network_name, "lite", **config)
    run = dict(defaults["defaults"])
    run.update({"iterations": 1000, "batch_size": batch})
    options = {**run, "device": torch.device("cpu"), "dims": dims, "labels": labels, "preset": "lite"}
    if network_name == "hidiff":
        options["pretrain_fraction"] = 0.0  # time the full alternating step
    recipe = module.make(network, options)
    recipe.cpu_bf16 = "bf16" in mode
    channels_last = "channels-last" in mode
    if channels_last:
        recipe.network.to(memory_format=torch.channels_last)
    data = TrainingData(store, batch, run["augment"], patch_zyx=patch, channels_last=channels_last)
    steps, samples = [], []
    for iteration in range(repeats + 1):
        generator = torch.Generator().manual_seed(iteration)
        started = time.perf_counter()
        data.labelled_batch(torch.Generator().manual_seed(iteration))
        sampled = time.perf_counter()
        recipe.step(data, generator, iteration)
        if iteration:  # the first step warms up
            samples.append(sampled - started)
            steps.append(time.perf_counter() - sampled)
    return {
        "network": network_name,
        "input": f"{size}^{dims}",
        "batch": batch,
        "mode": mode,
        "step_s": round(statistics.median(steps), 3),
        "sample_s": round(statistics.median(samples), 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", help="comma-separated networks")
    args = parser.parse_args()
    only = set(args.only.split(",")) if args.only else set(PLAN)
    rows = []
    load_before = os.getloadavg()[0]
    for name, (dims, sizes, batch, modes) in PLAN.items():
        if name not in only:
            continue
        for size in sizes:
            for mode in modes:
                rows.append(_measure(name, dims, size, batch, mode, args.repeats))
                print(rows[-1], flush=True)  # noqa: T201 - a benchmark script reports as it goes
    facts = {
        "date": time.strftime("%Y-%m-%d"),
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "load_average_before": round(load_before, 2),
        "load_average_after": round(os.getloadavg()[0], 2),
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "training-speed.json").write_text(json.dumps({"facts": facts, "rows": rows}, indent=2), encoding="utf-8")
    lines = [
        f"Measured {facts['date']}, torch {facts['torch']}, {facts['threads']} threads, load average "
        f"{facts['load_average_before']} before and {facts['load_average_after']} after (2 cores; above 2 means "
        "other work shared the CPU and every number is inflated).",
        "",
        "| network | input | batch | precision / layout | s per step | s to draw the batch |",
        "|---|---|---:|---|---:|---:|",
    ]
    lines += [
        f"| {r['network']} lite | {r['input']} | {r['batch']} | {r['mode']} | {r['step_s']} | {r['sample_s']} |"
        for r in rows
    ]
    (RESULTS / "training-speed.md").write_text("\n".join(lines) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
