"""Small files must not make big allocations: each case runs the real CLI in a process capped at 3 GB of
address space (``RLIMIT_AS``) and must be refused before allocating, in one line with exit status 2,
saying how much it would need, with the process's peak resident memory under 2 GB."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest

from MedSegSuiteLib.io import write_image
from MedSegSuiteLib.volume import Volume

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="RLIMIT_AS and ru_maxrss in kB are Linux's")

CAP = 3 << 30
PEAK_LIMIT = 2 << 30
RUNNER = """
import resource, sys
resource.setrlimit(resource.RLIMIT_AS, ({cap}, {cap}))
from MedSegSuiteLib.cli import main
try:
    code = main(sys.argv[2:])
finally:
    with open(sys.argv[1], "w", encoding="utf-8") as handle:
        handle.write(str(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024))
sys.exit(code)
"""


def capped(tmp_path: Path, *args) -> tuple[int, str, int]:
    """Run ``medsegsuite ARGS`` under the cap: (exit status, stderr, peak resident bytes)."""
    peak_file = tmp_path / "peak.txt"
    env = {**os.environ, "MEDSEGSUITE_THREADS": "1", "OMP_NUM_THREADS": "1", "MALLOC_ARENA_MAX": "2"}
    done = subprocess.run(
        [sys.executable, "-c", RUNNER.format(cap=CAP), str(peak_file), *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    return done.returncode, done.stderr, int(peak_file.read_text(encoding="utf-8"))


def refused_with_amount(tmp_path: Path, *args) -> str:
    code, err, peak = capped(tmp_path, *args)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1, err
    assert lines[0].startswith("medsegsuite: error: ") and "needs about" in lines[0], lines[0]
    assert peak < PEAK_LIMIT, f"peak {peak / 2**30:.2f} GB"
    return lines[0]


def test_a_tiny_nrrd_header_claiming_a_huge_image_is_refused(tmp_path):
    header = tmp_path / "huge.nhdr"
    (tmp_path / "huge.raw").write_bytes(b"\0" * 1024)
    header.write_text(
        "NRRD0004\ntype: short\ndimension: 3\nsizes: 40000 40000 20000\nencoding: raw\nendian: little\n"
        "data file: huge.raw\n\n",
        encoding="utf-8",
    )
    line = refused_with_amount(tmp_path, "segment", header, "-m", "any", "-o", tmp_path / "o.nrrd")
    assert "40000 x 40000 x 20000" in line


def test_a_compressed_nifti_that_would_inflate_to_gigabytes_is_refused_before_inflating(tmp_path):
    path = write_image(Volume(np.zeros((4, 4, 4), np.int16)), tmp_path / "bomb.nii.gz")
    import gzip

    raw = bytearray(gzip.decompress(path.read_bytes())[:352])
    struct.pack_into("<8h", raw, 40, 3, 2000, 2000, 1000, 1, 1, 1, 1)  # 8 GB of int16
    with gzip.open(path, "wb") as handle:
        handle.write(bytes(raw))
        zeros = b"\0" * (1 << 20)
        for _ in range(64):  # 64 MB of zeros (64 kB compressed): far less than claimed, far more than the file
            handle.write(zeros)
    assert path.stat().st_size < 1 << 20
    refused_with_amount(tmp_path, "segment", path, "-m", "any", "-o", tmp_path / "o.nrrd")


def _png(path: Path, width: int, height: int) -> Path:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    idat = zlib.compress(b"\0" * (3 * width + 1) * 4)  # a few rows: the header alone claims the size
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    return path


def test_an_enormous_2d_photo_is_refused(tmp_path):
    photo = _png(tmp_path / "huge.png", 60000, 60000)
    line = refused_with_amount(tmp_path, "segment", photo, "-m", "any", "-o", tmp_path / "o.png")
    assert "60000 x 60000" in line


def test_a_gif_claiming_a_huge_screen_is_refused(tmp_path):
    gif = tmp_path / "huge.gif"
    # header, logical screen 65535 x 65535 without colour table, one 1x1 image, trailer
    gif.write_bytes(
        b"GIF89a"
        + struct.pack("<HHBBB", 65535, 65535, 0, 0, 0)
        + b"\x2c"
        + struct.pack("<HHHHB", 0, 0, 65535, 65535, 0)
        + b"\x02\x02\x44\x01\x00\x3b"
    )
    code, err, peak = capped(tmp_path, "segment", gif, "-m", "any", "-o", tmp_path / "o.png")
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "unexpected" not in lines[0], err
    assert "4294836225 pixels" in lines[0] and "downsample" in lines[0] and peak < PEAK_LIMIT


def test_an_absurd_batch_size_is_refused_with_what_it_would_need(tmp_path, model3d):
    image = write_image(Volume(np.zeros((16, 32, 32), np.float32)), tmp_path / "img.nii.gz")
    line = refused_with_amount(
        tmp_path, "segment", image, "-m", model3d, "-o", tmp_path / "o.nrrd", "--batch-size", "4000", "--device", "cpu"
    )
    assert "--batch-size 4000" in line and "per window" in line and "smaller --batch-size" in line
    assert not (tmp_path / "o.nrrd").exists()


def test_an_absurd_batch_size_or_ensemble_is_refused_outright(tmp_path, model3d):
    image = write_image(Volume(np.zeros((16, 32, 32), np.float32)), tmp_path / "img.nii.gz")
    for option, value in (("--batch-size", "100000000"), ("--batch-size", "-3")):
        code, err, _ = capped(tmp_path, "segment", image, "-m", model3d, "-o", tmp_path / "o.nrrd", option, value)
        assert code == 2 and "--batch-size must be between" in err
    code, err, _ = capped(
        tmp_path,
        "refine",
        image,
        "--mask",
        image,
        "-m",
        model3d,
        "--steps",
        "2",
        "--ensemble",
        "1000000",
        "-o",
        tmp_path / "o.nrrd",
    )
    assert code == 2 and "--ensemble must be between" in err


@pytest.mark.parametrize(
    ("features", "expected"),
    [([4096, 8192, 16384, 32768, 65536, 4096], "needs about"), ([32, 32, 64, 128, 10**7, 32], "far beyond")],
)
def test_a_card_with_absurd_network_sizes_is_refused_before_building_it(tmp_path, model3d, features, expected):
    folder = tmp_path / "absurd"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes((model3d / "model.safetensors").read_bytes())
    card = json.loads((model3d / "card.json").read_text(encoding="utf-8"))
    card["config"]["features"] = features
    card["weights"] = {"file": "model.safetensors"}
    (folder / "card.json").write_text(json.dumps(card), encoding="utf-8")
    image = write_image(Volume(np.zeros((16, 32, 32), np.float32)), tmp_path / "img.nii.gz")
    code, err, peak = capped(tmp_path, "segment", image, "-m", folder, "-o", tmp_path / "o.nrrd", "--device", "cpu")
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and expected in lines[0], err
    assert peak < PEAK_LIMIT


def test_an_absurd_spacing_that_would_make_billions_of_windows_is_refused(tmp_path, model3d):
    folder = tmp_path / "fine"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes((model3d / "model.safetensors").read_bytes())
    card = json.loads((model3d / "card.json").read_text(encoding="utf-8"))
    card["input"]["spacing"] = [0.5, 0.5, 0.5]
    (folder / "card.json").write_text(json.dumps(card), encoding="utf-8")
    rng = np.random.default_rng(0)
    image = write_image(
        Volume(rng.random((10, 10, 10), dtype=np.float32), (5000.0, 5000.0, 5000.0)), tmp_path / "img.nii.gz"
    )
    line = refused_with_amount(tmp_path, "segment", image, "-m", folder, "-o", tmp_path / "o.nrrd", "--device", "cpu")
    assert "100000 x 100000 x 100000 voxels" in line and "windows" in line and "spacing" in line
