"""Channels the channel rule cannot map are refused before any work, through the real CLI (``segment``, a batch,
``demo``): one line naming the image's and the model's channels and what to do. The combinations the rule does
map (grey to RGB, RGB to grey, equal counts) keep working. The panel's side is in test_slicer_bad_inputs.py."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import UNET2D_CARD, UNET3D_CARD, one_error_line
from conftest import run_cli as run
from conftest import untrained_model as untrained

from MedSegSuiteLib.errors import InputError
from MedSegSuiteLib.io import read_image, write_image
from MedSegSuiteLib.preprocessing import channels_map, check_channels, match_channels
from MedSegSuiteLib.volume import Volume

TWO_CHANNEL_CARD = {
    **UNET3D_CARD,
    "id": "test-unet3d-2ch",
    "config": {**UNET3D_CARD["config"], "in_channels": 2},
    "input": {**UNET3D_CARD["input"], "channels": 2},
}


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """Untrained models taking 1 (3D), 2 (3D) and 3 (2D RGB) channels."""
    return {
        "grey3d": untrained(tmp_path_factory, UNET3D_CARD, spatial_dims=3, in_channels=1, out_channels=2),
        "two3d": untrained(tmp_path_factory, TWO_CHANNEL_CARD, spatial_dims=3, in_channels=2, out_channels=2),
        "rgb2d": untrained(tmp_path_factory, UNET2D_CARD, spatial_dims=2, in_channels=3, out_channels=2),
    }


def image(folder: Path, name: str, channels: int, two_d: bool = False) -> Path:
    """A random image with ``channels`` channels (a one-slice 2D image or a 16-slice volume)."""
    shape = (1 if two_d else 16, 32, 32)
    array = np.random.default_rng(channels).random((channels, *shape), dtype=np.float32) * 200
    return write_image(Volume(array[0] if channels == 1 else array, (1.0, 1.0, 2.0)), folder / name)


def test_the_rule_maps_grey_and_rgb_both_ways_and_equal_counts_only():
    mapped = {(have, want) for have in range(1, 7) for want in range(1, 7) if channels_map(have, want)}
    assert mapped == {(n, n) for n in range(1, 7)} | {(1, 3), (3, 1)}
    grey = np.arange(8, dtype=np.float32).reshape(1, 1, 2, 4)
    assert match_channels(grey, 3).shape == (3, 1, 2, 4) and np.array_equal(match_channels(grey, 3)[2], grey[0])
    assert match_channels(np.repeat(grey, 3, 0), 1) == pytest.approx(grey, rel=1e-6)
    with pytest.raises(InputError, match=r"expects 3-channel images but volume 'A' has 4 channels.*choose a model"):
        check_channels(4, 3, image="volume 'A'")


REFUSED = [
    # (model, image channels, 2D image, what the line must say)
    ("grey3d", 2, False, "model 'test-unet3d' expects 1-channel images but this image has 2 channels"),
    ("grey3d", 5, False, "model 'test-unet3d' expects 1-channel images but this image has 5 channels"),
    ("two3d", 1, False, "model 'test-unet3d-2ch' expects 2-channel images but this image has 1 channels"),
    ("two3d", 3, False, "model 'test-unet3d-2ch' expects 2-channel images but this image has 3 channels"),
    ("rgb2d", 2, True, "model 'test-unet2d' expects 3-channel images but this image has 2 channels"),
]


@pytest.mark.parametrize(("model", "channels", "two_d", "expected"), REFUSED)
def test_segment_refuses_channels_the_rule_cannot_map_before_loading_the_model(
    capsys, tmp_path, models, monkeypatch, model, channels, two_d, expected
):
    import MedSegSuiteLib.models

    def no_loading(*args, **kwargs):  # noqa: ANN002, ANN003
        raise AssertionError("the model was loaded for an image it must refuse")

    monkeypatch.setattr(MedSegSuiteLib.models, "load_model", no_loading)
    source = image(tmp_path, "in.nrrd", channels, two_d)
    code, _, err = run(capsys, "segment", source, "-m", models[model], "-o", tmp_path / "out.nrrd")
    line = one_error_line(err)
    assert code == 2 and expected in line, line
    assert "only grey to RGB and RGB to grey are converted" in line
    assert f"choose a model for {channels}-channel images" in line
    assert not (tmp_path / "out.nrrd").exists() and not (tmp_path / "out.labels.json").exists()


MAPPED = [
    ("grey3d", 1, False),  # as is
    ("grey3d", 3, False),  # an RGB volume: its luminance
    ("two3d", 2, False),  # as is
    ("rgb2d", 1, True),  # a grey photo: replicated to RGB
    ("rgb2d", 3, True),  # as is
]


@pytest.mark.parametrize(("model", "channels", "two_d"), MAPPED)
def test_segment_keeps_working_where_the_rule_maps_the_channels(capsys, tmp_path, models, model, channels, two_d):
    source = image(tmp_path, "in.nrrd", channels, two_d)
    code, _, err = run(capsys, "segment", source, "-m", models[model], "-o", tmp_path / "out.nrrd", "--device", "cpu")
    assert code == 0, err
    result = read_image(tmp_path / "out.nrrd")
    assert result.channels == 1 and result.grid.same_as(read_image(source).grid)


def test_a_batch_refuses_the_case_before_any_model_runs_and_does_the_others(capsys, tmp_path, models, monkeypatch):
    from MedSegSuiteLib.inference import Predictor

    cases = tmp_path / "cases"
    cases.mkdir()
    image(cases, "grey.nrrd", 1)
    image(cases, "echoes.nrrd", 2)
    image(cases, "rgb.nrrd", 3)
    seen = []
    real = Predictor.predict

    def record(self, volume, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003
        seen.append((self.card.id, volume.channels))
        return real(self, volume, *args, **kwargs)

    monkeypatch.setattr(Predictor, "predict", record)
    out = tmp_path / "out"
    code, _, err = run(capsys, "segment", cases, "-m", models["grey3d"], "-m", models["two3d"], "-o", out)
    assert code == 2, err
    summary = {case["id"]: case for case in json.loads((out / "summary.json").read_text(encoding="utf-8"))["cases"]}
    # every case fits one of the two models and not the other: none may start, none may write anything
    for case, channels in (("grey", 1), ("echoes", 2), ("rgb", 3)):
        assert summary[case]["status"] == "failed", summary[case]
        assert f"this image has {channels} channels" in summary[case]["error"]
        assert f"medsegsuite: case {case} failed: model " in err
        assert not list(out.glob(f"*/{case}.*"))
    assert seen == []
    code, _, err = run(capsys, "segment", cases, "-m", models["grey3d"], "-o", tmp_path / "one")
    summary = {case["id"]: case for case in json.loads((tmp_path / "one" / "summary.json").read_text())["cases"]}
    assert code == 2 and [s["status"] for s in (summary["grey"], summary["echoes"], summary["rgb"])] == [
        "done",
        "failed",
        "done",
    ]
    assert "expects 1-channel images but this image has 2 channels" in summary["echoes"]["error"]
    assert not list((tmp_path / "one").glob("echoes.*"))


def test_demo_refuses_a_model_the_sample_channels_cannot_feed(capsys, tmp_path, models, monkeypatch):
    monkeypatch.setenv("MEDSEGSUITE_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MEDSEGSUITE_RESOURCES", raising=False)
    code, _, err = run(capsys, "demo", "-m", models["two3d"], "-o", tmp_path / "demo", "--device", "cpu")
    line = one_error_line(err)
    assert code == 2 and "test-unet3d-2ch expects 2-channel images but the sample has 1 channels" in line
    assert not (tmp_path / "demo" / "sample-labels.nrrd").exists()


def test_alpha_is_dropped_from_raster_photos_only_and_four_sequences_in_a_volume_stay(models, tmp_path, capsys):
    from PIL import Image

    rgba = np.random.default_rng(1).integers(0, 255, (20, 24, 4), dtype=np.uint8)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    Image.fromarray(rgba[..., :2].copy(), "LA").save(tmp_path / "grey-alpha.png")
    assert read_image(tmp_path / "rgba.png").channels == 3
    grey = read_image(tmp_path / "grey-alpha.png")
    assert grey.channels == 1 and np.array_equal(grey.array[0], rgba[..., 0])
    four = read_image(image(tmp_path, "four.nrrd", 4))
    assert four.channels == 4  # four MRI sequences: none is silently dropped
    code, out, err = run(capsys, "segment", tmp_path / "four.nrrd", "-m", models["grey3d"], "-o", tmp_path / "o.nrrd")
    assert code == 2 and "expects 1-channel images but this image has 4 channels" in one_error_line(err)
    assert not (tmp_path / "o.nrrd").exists()
