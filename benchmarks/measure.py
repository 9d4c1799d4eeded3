"""Measure one benchmark case in this process and print one JSON line (run by suite.py, one process per case).

A case is a JSON object with ``kind``:

- ``forward``: ``network``, ``preset``, ``overrides``, ``shape`` (the input batch), optional
  ``call`` (the method, default ``predict_logits`` if present else ``forward``).
- ``predict``: ``model`` (a model folder), ``shape`` (z, y, x) or ``(c, z, y, x)`` of a
  synthetic volume, optional ``fast``; one Predictor.predict of the whole volume.
- ``python``: ``module`` and ``function`` returning a zero-argument callable to time
  (for refinement and training steps, which need more set-up).

Timing: ``warmup`` untimed calls, then ``repeats`` timed calls; the median, min and max
wall seconds are reported, with the process's peak RSS and, on CUDA, peak GPU memory.
"""

from __future__ import annotations

import importlib
import json
import resource
import statistics
import sys
import time


def _callable(case: dict, device):  # noqa: ANN001, ANN202
    import torch

    kind = case["kind"]
    if kind == "forward":
        from MedSegSuiteLib import networks

        net = (
            networks.create(case["network"], case.get("preset", "paper"), **case.get("overrides", {})).eval().to(device)
        )
        if case.get("channels_last"):
            net = net.to(memory_format=torch.channels_last if len(case["shape"]) == 4 else torch.channels_last_3d)
        x = torch.randn(*case["shape"], device=device)
        fn = getattr(net, case.get("call", "predict_logits"), None) or net
        params = sum(p.numel() for p in net.parameters())

        def run():
            with torch.inference_mode():
                return fn(x)

        return run, {"params_m": round(params / 1e6, 2)}
    if kind == "predict":
        import numpy as np

        from MedSegSuiteLib.inference import Predictor
        from MedSegSuiteLib.models import load_model
        from MedSegSuiteLib.volume import Volume

        predictor = Predictor(load_model(case["model"]), device=device, fast=case.get("fast", False))
        array = np.random.default_rng(0).normal(100, 20, case["shape"]).astype(np.float32)
        volume = Volume(array)
        return (lambda: predictor.predict(volume)), {"voxels": int(np.prod(case["shape"][-3:]))}
    if kind == "python":
        module = importlib.import_module(case["module"])
        return getattr(module, case["function"])(device=device, **case.get("args", {})), {}
    raise ValueError(f"unknown case kind {kind!r}")


def main() -> None:
    import torch

    case = json.loads(sys.argv[1])
    torch.set_num_threads(int(case.get("threads", torch.get_num_threads())))
    device = torch.device(case.get("device", "cpu"))
    run, info = _callable(case, device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(int(case.get("warmup", 1))):
        run()
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(int(case.get("repeats", 3))):
        start = time.perf_counter()
        run()
        sync()
        times.append(time.perf_counter() - start)
    result = {
        "median_s": statistics.median(times),
        "min_s": min(times),
        "max_s": max(times),
        "repeats": len(times),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        **info,
    }
    if device.type == "cuda":
        result["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    print(json.dumps(result))


if __name__ == "__main__":
    main()
