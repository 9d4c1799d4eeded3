"""Sliding-window inference: MONAI's result, streamed in z, exact strides, OOM retries, cancel."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from monai.inferers import sliding_window_inference

from MedSegSuiteLib.errors import Cancelled, OutOfMemory
from MedSegSuiteLib.inference.sliding_window import SlidingWindow, run_in_batches, scan_starts


@pytest.mark.parametrize(
    ("shape", "roi", "overlap", "blend"),
    [
        ((37, 50, 29), (16, 24, 32), 0.5, "gaussian"),
        ((10, 12, 14), (16, 16, 16), 0.25, "constant"),
        ((40, 33, 21), (8, 16, 16), 0.75, "gaussian"),
    ],
)
def test_streamed_result_equals_monai_sliding_window_inference(shape, roi, overlap, blend):
    torch.manual_seed(0)
    net = torch.nn.Conv3d(2, 3, 3, padding=1)
    image = torch.randn(2, *shape)
    with torch.no_grad():
        expected = sliding_window_inference(image[None], roi, 4, net, overlap=overlap, mode=blend)[0].numpy()
        got = np.full((3, *shape), np.nan, np.float32)
        slabs = []

        def sink(z0, z1, scores):
            slabs.append((z0, z1))
            got[:, z0:z1] = scores

        SlidingWindow(shape, roi, overlap, blend=blend).run(image, net, sink, batch_size=3)
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert slabs[0][0] == 0 and slabs[-1][1] == shape[0]
    assert all(a[1] == b[0] for a, b in zip(slabs, slabs[1:])), "slabs must be consecutive and disjoint"


def test_exact_strides_place_windows_like_canet_paper_protocol():
    assert scan_starts(150, 112, 18) == [0, 18, 36, 38]
    assert scan_starts(88, 80, 4) == [0, 4, 8]
    window = SlidingWindow((88, 150, 140), (80, 112, 112), stride=(4, 18, 18), blend="constant")
    assert len(window) == 3 * 4 * 3


def test_batches_shrink_after_out_of_memory_and_report_progress():
    calls, progress = [], []

    def run_batch(start, stop):
        if stop - start > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB")
        calls.append((start, stop))

    run_in_batches(7, 8, run_batch, progress=lambda d, t, s: progress.append((d, t)))
    assert calls == [(0, 2), (2, 4), (4, 6), (6, 7)]
    assert progress[0] == (0, 7) and progress[-1] == (7, 7)

    def always_oom(start, stop):
        raise RuntimeError("CUDA out of memory")

    with pytest.raises(OutOfMemory, match="even with one slice/window at a time"):
        run_in_batches(3, 4, always_oom)


def test_cancel_is_checked_between_batches():
    cancel = threading.Event()
    done = []

    def run_batch(start, stop):
        done.append(start)
        if start == 2:
            cancel.set()

    with pytest.raises(Cancelled):
        run_in_batches(10, 2, run_batch, cancel=cancel)
    assert done == [0, 2]
