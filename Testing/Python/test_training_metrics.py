"""Dice, IoU and HD95 against hand-computed values."""

from __future__ import annotations

import math

import numpy as np

from MedSegSuiteLib.training.metrics import case_metrics, dice, hd95, iou, summarize


def test_dice_and_iou_by_hand():
    a = np.zeros((10, 10), bool)
    b = np.zeros((10, 10), bool)
    a[:4] = True  # 40 voxels
    b[2:6] = True  # 40 voxels, 20 shared
    assert dice(a, b) == 0.5 and iou(a, b) == 20 / 60
    assert dice(a, a) == 1.0 and dice(np.zeros(3), np.zeros(3)) == 1.0 and dice(a, ~a) == 0.0


def test_hd95_uses_spacing_and_handles_empty_masks():
    a = np.zeros((1, 20, 20), bool)
    a[0, 5:10, 5:10] = True
    b = np.roll(a, 3, axis=2)
    assert hd95(a, a) == 0.0
    assert math.isclose(hd95(a, b, (1.0, 1.0, 1.0)), 3.0)
    assert math.isclose(hd95(a, b, (1.0, 1.0, 0.5)), 1.5)
    assert hd95(np.zeros_like(a), np.zeros_like(a)) == 0.0
    assert math.isinf(hd95(a, np.zeros_like(a)))


def test_case_metrics_per_label_and_summary():
    truth = np.zeros((1, 8, 8), np.uint8)
    truth[0, :4] = 1
    truth[0, 4:] = 2
    prediction = truth.copy()
    prediction[0, 4:] = 0
    metrics = case_metrics(prediction, truth, [1, 2], spacing_xyz=(1, 1, 1))
    assert metrics[1]["dice"] == 1.0 and metrics[2]["dice"] == 0.0 and metrics[2]["hd95"] is None
    summary = summarize([metrics])
    assert summary["dice"] == 0.5 and summary["hd95"] == 0.0
