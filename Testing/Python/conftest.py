"""Shared fixtures: synthetic images with known objects and small models trained on them."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
SHARED = REPO.parent / "shared"
# The real-data tests read a data folder beside the clone (../shared/data), or the one MEDSEGSUITE_DATA names.
SHARED_DATA = Path(os.environ.get("MEDSEGSUITE_DATA") or SHARED / "data")
OUTPUT_DIR = REPO / "Testing" / "output"
KEYS = SHARED / "specs" / "keys"


def _default_threads() -> int:
    """Two threads on an idle machine with two or more cores, one where other work already keeps a core busy:
    on a shared CPU a second thread per test process only adds synchronisation waits."""
    cores = os.cpu_count() or 1
    try:
        busy = os.getloadavg()[0]
    except (AttributeError, OSError):  # not available on Windows
        busy = 0.0
    return 2 if cores >= 2 and cores - busy >= 1.5 else 1


# Threads per test process and per worker process the tests start; MEDSEGSUITE_TEST_THREADS=N overrides.
TEST_THREADS = int(os.environ.get("MEDSEGSUITE_TEST_THREADS") or _default_threads())
torch.set_num_threads(TEST_THREADS)


def real_data(folder: str) -> Path:
    """``folder`` inside the real-data folder; the test is skipped, saying how to provide it, when it is absent."""
    path = SHARED_DATA / folder
    if not path.is_dir():
        pytest.skip(
            f"real data absent: {path} does not exist (put the data folder beside the clone as ../shared/data, "
            "or set MEDSEGSUITE_DATA to where it is)"
        )
    return path


def announce(request: pytest.FixtureRequest, what: str) -> None:
    """Say on the terminal, beside the test file's progress, that a slow shared fixture is being built."""
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is None or capture is None or request.config.get_verbosity() < 0:
        return
    with capture.global_and_fixture_disabled():
        reporter.write(f"[{what}] ")
        reporter.flush()


def official_manifest(name: str) -> list[tuple[str, tuple[int, ...], str]]:
    """``(key, shape, dtype)`` rows of an official state_dict manifest in ``../shared/specs/keys``
    (dtype "" where the manifest has no dtype column); the test is skipped when it is absent."""
    path = KEYS / name
    if not path.exists():
        pytest.skip(f"official key manifest {path} is absent (it comes with the ../shared folder beside the clone)")
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.startswith("#"):
            key, shape, *rest = line.split("\t")
            rows.append((key, tuple(int(s) for s in shape.split(",") if s), rest[0] if rest else ""))
    return rows


@pytest.fixture
def scene():
    """Slicer's MRML scene (the CI harness's stand-ins installed), empty before and after the test."""
    import slicer_harness

    slicer_harness.install()
    import slicer

    slicer.mrmlScene.Clear(0)
    yield slicer.mrmlScene
    slicer.mrmlScene.Clear(0)


@pytest.fixture
def single_thread():
    """One intra-op thread for tests of tiny networks: their many small ops gain nothing from a second
    thread, and on a shared 2-core machine the per-op synchronisation makes two threads much slower."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def sphere_volume(
    shape_zyx: tuple[int, int, int], centre_zyx: tuple[float, float, float], radius: float, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """A noisy float32 volume with one bright ball, and its uint8 mask (z, y, x)."""
    rng = np.random.default_rng(seed)
    zz, yy, xx = np.meshgrid(*[np.arange(n) for n in shape_zyx], indexing="ij")
    dist2 = (zz - centre_zyx[0]) ** 2 + (yy - centre_zyx[1]) ** 2 + (xx - centre_zyx[2]) ** 2
    mask = (dist2 <= radius**2).astype(np.uint8)
    image = 100.0 + 20.0 * rng.standard_normal(shape_zyx) + 80.0 * mask
    return image.astype(np.float32), mask


def disc_image(
    size: int, centre_yx: tuple[float, float], radius: float, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """A noisy RGB uint8 image (3, 1, y, x) with one reddish disc, and its mask (1, y, x)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
    mask = ((yy - centre_yx[0]) ** 2 + (xx - centre_yx[1]) ** 2 <= radius**2).astype(np.uint8)
    base = rng.normal(90, 25, (3, size, size))
    base[0] += 90 * mask
    base[2] -= 40 * mask
    return np.clip(base, 0, 255).astype(np.uint8)[:, None], mask[None]


# A HiDiff card without weights: enough for the panel to list it and check segments against its labels.
HIDIFF_CARD = {
    "schema_version": 1,
    "id": "demo-hidiff",
    "version": "1.0.0",
    "name": "Demo disc refiner (HiDiff lite)",
    "network": "hidiff",
    "preset": "lite",
    "config": {"in_channels": 1, "num_classes": 1, "num_steps": 8},
    "dims": 2,
    "input": {"channels": 1, "normalization": {"kind": "scale", "divisor": 255}, "size_xy": [32, 32]},
    "inference": {"activation": "sigmoid", "batch_size": 4},
    "labels": [{"value": 1, "name": "Disc", "color": [250, 200, 40]}],
    "licence": "CC0-1.0",
    "weights": {"file": "model.safetensors"},
}


def _train(network: torch.nn.Module, batches, steps: int, lr: float = 3e-3) -> torch.nn.Module:
    optimiser = torch.optim.Adam(network.parameters(), lr=lr)
    network.train()
    for step in range(steps):
        x, y = batches(step)
        logits = network(x)
        loss = torch.nn.functional.cross_entropy(logits, y)
        probs = torch.softmax(logits, 1)[:, 1]
        fg = (y == 1).float()
        loss = loss + 1 - (2 * (probs * fg).sum() + 1) / (probs.sum() + fg.sum() + 1)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    return network.eval()


UNET3D_CARD = {
    "schema_version": 1,
    "id": "test-unet3d",
    "version": "1.0.0",
    "name": "Test ball finder (3D U-Net)",
    "network": "unet",
    "preset": "lite",
    "config": {"spatial_dims": 3, "in_channels": 1, "out_channels": 2},
    "dims": 3,
    "input": {"channels": 1, "normalization": {"kind": "zscore"}, "patch_xyz": [32, 32, 16]},
    "inference": {"activation": "softmax", "overlap": 0.25, "batch_size": 2, "fast": {"overlap": 0.0}},
    "labels": [
        {
            "value": 1,
            "name": "Ball",
            "color": [230, 60, 40],
            "terminology": {
                "category": ["SCT", "49755003", "Morphologically Altered Structure"],
                "type": ["SCT", "4147007", "Mass"],
            },
        }
    ],
    "licence": "CC0-1.0",
    "training": {"data": "synthetic balls made by the test suite", "licence": "CC0-1.0"},
}

UNET2D_CARD = {
    "schema_version": 1,
    "id": "test-unet2d",
    "version": "1.0.0",
    "name": "Test disc finder (2D U-Net)",
    "network": "unet",
    "preset": "lite",
    "config": {"spatial_dims": 2, "in_channels": 3, "out_channels": 2},
    "dims": 2,
    "input": {"channels": 3, "normalization": {"kind": "scale", "divisor": 255}, "size_xy": [48, 48]},
    "inference": {"activation": "softmax", "batch_size": 4},
    "labels": [{"value": 1, "name": "Disc", "color": [240, 200, 20]}],
    "licence": "CC0-1.0",
}


@pytest.fixture(scope="session")
def unet3d_dir(tmp_path_factory, request) -> Path:
    """A model folder with a 3D U-Net trained for a few seconds to find bright balls."""
    from MedSegSuiteLib import networks
    from MedSegSuiteLib.models import save_model

    torch.manual_seed(0)
    rng = np.random.default_rng(1)
    network = networks.create("unet", "lite", spatial_dims=3, in_channels=1, out_channels=2)

    def batches(step: int):
        xs, ys = [], []
        for _ in range(2):
            radius = 0.0 if rng.random() < 0.25 else rng.uniform(3, 6)  # some patches hold no ball
            centre = rng.uniform(5, 11, 3) + [0, rng.uniform(0, 16), rng.uniform(0, 16)]
            image, mask = sphere_volume((16, 32, 32), tuple(centre), radius, seed=int(rng.integers(1e6)))
            xs.append((image - image.mean()) / image.std())
            ys.append(mask)
        return torch.from_numpy(np.stack(xs))[:, None], torch.from_numpy(np.stack(ys)).long()

    announce(request, "training the test 3D U-Net, once per run")
    _train(network, batches, steps=150)
    directory = tmp_path_factory.mktemp("models") / "test-unet3d"
    save_model(directory, network, UNET3D_CARD)
    return directory


@pytest.fixture(scope="session")
def unet2d_dir(tmp_path_factory, request) -> Path:
    """A model folder with a 2D U-Net trained for a few seconds to find reddish discs in RGB images."""
    from MedSegSuiteLib import networks
    from MedSegSuiteLib.models import save_model

    torch.manual_seed(0)
    rng = np.random.default_rng(2)
    network = networks.create("unet", "lite", spatial_dims=2, in_channels=3, out_channels=2)

    def batches(step: int):
        xs, ys = [], []
        for _ in range(8):
            image, mask = disc_image(48, tuple(rng.uniform(10, 38, 2)), rng.uniform(4, 10), seed=int(rng.integers(1e6)))
            xs.append(image[:, 0] / 255.0)
            ys.append(mask[0])
        return torch.from_numpy(np.stack(xs)).float(), torch.from_numpy(np.stack(ys)).long()

    announce(request, "training the test 2D U-Net, once per run")
    _train(network, batches, steps=60)
    directory = tmp_path_factory.mktemp("models") / "test-unet2d"
    save_model(directory, network, UNET2D_CARD)
    return directory


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    """An empty MEDSEGSUITE_HOME and no bundled models, so registry tests see only what they add."""
    monkeypatch.setenv("MEDSEGSUITE_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("MEDSEGSUITE_RESOURCES", str(tmp_path / "resources"))
    (tmp_path / "resources" / "Models").mkdir(parents=True)
    return tmp_path / "home"


def install_card(home: Path, card: dict) -> Path:
    """A user model folder holding only ``card`` (enough to be listed, not to run)."""
    import json

    folder = home / "models" / card["id"]
    folder.mkdir(parents=True)
    (folder / "card.json").write_text(json.dumps(card), encoding="utf-8")
    return folder


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(bool), b.astype(bool)
    denominator = a.sum() + b.sum()
    return 1.0 if denominator == 0 else float(2 * (a & b).sum() / denominator)


def write_dicom_series(
    volume, folder: Path, series_uid: str = "1.2.826.0.1.3680043.8.498.1", modality: str = "CT"
) -> list[Path]:
    """Write a scalar int16 Volume as a DICOM series (one file per slice) the way scanners do; returns the files."""
    import SimpleITK as sitk

    from MedSegSuiteLib.io import volume_to_sitk

    folder.mkdir(parents=True, exist_ok=True)
    image = sitk.Cast(volume_to_sitk(volume), sitk.sitkInt16)
    direction = np.asarray(volume.direction)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    files = []
    for k in range(volume.shape[0]):
        plane = image[:, :, k]
        position = volume.grid.index_to_physical((0, 0, k))
        tags = {
            "0008|0016": "1.2.840.10008.5.1.4.1.1.2",
            "0008|0018": f"{series_uid}.{k + 1}",
            "0008|0060": modality,
            "0010|0010": "Test^Patient",
            "0010|0020": "TEST001",
            "0020|000d": f"{series_uid}.0",
            "0020|000e": series_uid,
            "0020|0052": f"{series_uid}.9",
            "0020|0013": str(k + 1),
            "0020|0032": "\\".join(f"{v:.6f}" for v in position),
            "0020|0037": "\\".join(f"{v:.6f}" for v in (*direction[:, 0], *direction[:, 1])),
            "0018|0050": f"{volume.spacing[2]:.6f}",
            "0028|1050": "40",
            "0028|1051": "400",
        }
        for key, value in tags.items():
            plane.SetMetaData(key, value)
        plane.SetSpacing(volume.spacing[:2])
        path = folder / f"{series_uid.replace('.', '_')}_{k:03d}.dcm"
        writer.SetFileName(str(path))
        writer.Execute(plane)
        files.append(path)
    return files


def grey_disc(size: int, centre_yx, radius: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A noisy 8-bit grey image (y, x) with one bright disc, and its boolean mask."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    mask = (yy - centre_yx[0]) ** 2 + (xx - centre_yx[1]) ** 2 <= radius**2
    image = np.clip(rng.normal(80, 20, (size, size)) + 100 * mask, 0, 255).astype(np.uint8)
    return image, mask


@pytest.fixture(scope="session")
def hidiff_dir(tmp_path_factory, request) -> Path:
    """A HiDiff lite model (segmentor + refiner) trained briefly on 32x32 grey discs (once per test run)."""
    from PIL import Image

    from MedSegSuiteLib.training.jobs import TrainOptions, train_model

    root = tmp_path_factory.mktemp("hidiff-data")
    (root / "images").mkdir()
    (root / "masks").mkdir()
    rng = np.random.default_rng(0)
    for i in range(40):
        image, mask = grey_disc(32, rng.uniform(9, 23, 2), rng.uniform(4, 8), seed=i)
        Image.fromarray(image).save(root / "images" / f"d{i:02d}.png")
        Image.fromarray((mask * 255).astype(np.uint8)).save(root / "masks" / f"d{i:02d}.png")
    output = tmp_path_factory.mktemp("models") / "test-hidiff"
    options = TrainOptions(
        network="hidiff",
        data=root,
        output=output,
        model_id="test-hidiff",
        iterations=200,  # fewer (or a larger rate) leaves a refiner that no longer mends the test's holes and spurs
        batch_size=4,
        size_xy=(32, 32),
        device="cpu",
        validate_every=200,
        labels=[{"value": 1, "name": "Disc", "color": [250, 200, 40]}],
        recipe={"pretrain_fraction": 0.25},
        data_licence="CC0-1.0 (synthetic)",
    )
    announce(request, "training the test HiDiff model, once per run")
    return train_model(options).directory


def run_cli(capsys, *args) -> tuple[int, str, str]:
    """Exit status, standard output and standard error of ``medsegsuite ARGS`` run in this process."""
    from MedSegSuiteLib.cli import main

    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def one_error_line(err: str) -> str:
    """The one line a failed command printed, checked to be a plain error and not an 'unexpected' one."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("medsegsuite: error: ") and "unexpected" not in lines[0], err
    return lines[0]


def untrained_model(tmp_path_factory, card: dict, **config) -> Path:
    """An untrained U-Net lite model folder for ``card`` (for tests where what it predicts does not matter)."""
    from MedSegSuiteLib import networks
    from MedSegSuiteLib.models import save_model

    torch.manual_seed(0)
    network = networks.create("unet", "lite", **config)
    directory = tmp_path_factory.mktemp("models") / card["id"]
    save_model(directory, network, card)
    return directory


@pytest.fixture(scope="module")
def model3d(tmp_path_factory) -> Path:
    """An untrained 3D U-Net lite model folder with the test 3D card."""
    return untrained_model(tmp_path_factory, UNET3D_CARD, spatial_dims=3, in_channels=1, out_channels=2)
