"""Tiny SVHN (.mat), MNIST (IDX, plain and .gz), USPS, GTSRB and Synthetic Signs files in their public
layouts (nothing is downloaded), and the helpers the tests share: a training command line, a CSV's rows."""

from __future__ import annotations

import bz2
import csv
import gzip
import os
import shutil
import socket
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.io

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from algorithms import MCD  # noqa: E402  (the product's folder is on sys.path from here on)
from results import csv_columns  # noqa: E402

LENET = ("--source", "mnist", "--target", "usps")  # the small network: dropout in both heads, fast on a CPU
MCD_COLUMNS = csv_columns(MCD.LOSSES)  # the CSV header of mcd and source_only runs


def train_args(data_root: Path, csv_path: Path, *extra: str, epochs: int = 2, iters: int = 2,
               num_k: int | None = 1, pair: tuple[str, ...] = LENET) -> list[str]:
    """main.py's flags for a tiny CPU run on fixture data (num_k None: the default, 4): `pair` (MNIST -> USPS
    and its small network) unless `extra` names another (files and processes are what most tests are about)."""
    pair = [] if "--source" in extra or "--target" in extra else list(pair)
    return ["--data-root", str(data_root), "--allow-unverified-data", "--no-download", "--device", "cpu",
            "--epochs", str(epochs), "--iters-per-epoch", str(iters), "--batch-size", "8",
            *(["--num-k", str(num_k)] if num_k is not None else []), *pair, "--csv", str(csv_path), *extra]


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as file:
        return list(csv.DictReader(file))


SIZES = {"svhn_train": 400, "svhn_test": 200, "mnist_train": 300, "mnist_test": 200, "usps_train": 240, "usps_test": 120}


def _digit_patterns(labels: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """(N, size, size) uint8 images a CNN can learn: class k is a bright bar at a class-specific column."""
    images = rng.integers(0, 60, size=(len(labels), size, size), dtype=np.uint8)
    width = size // 10
    for i, label in enumerate(labels):
        images[i, 2:-2, label * width : label * width + width] = rng.integers(180, 256)
    return images


def write_svhn(path: Path, n: int, rng: np.random.Generator) -> np.ndarray:
    """An SVHN-format .mat: X (32, 32, 3, N) uint8, y (N, 1) with labels 1..10 (10 = digit 0)."""
    digits = rng.integers(0, 10, size=n)
    grey = _digit_patterns(digits, 32, rng)  # (N, 32, 32)
    tint = rng.uniform(0.5, 1.0, size=(n, 1, 1, 3))
    X = (grey[..., None] * tint).astype(np.uint8).transpose(1, 2, 3, 0)  # -> (32, 32, 3, N)
    y = np.where(digits == 0, 10, digits).astype(np.uint8)[:, None]
    path.parent.mkdir(parents=True, exist_ok=True)
    scipy.io.savemat(path, {"X": X, "y": y})
    return digits


def idx_bytes(array: np.ndarray) -> bytes:
    """The IDX (LeCun) format of a uint8 array: magic 0x0000 08 ndim, big-endian sizes, then the data."""
    header = struct.pack(">I", 0x0800 | array.ndim) + b"".join(struct.pack(">I", d) for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_idx(path: Path, array: np.ndarray, with_gz: bool = True) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = idx_bytes(array)
    path.write_bytes(data)
    if with_gz:
        path.with_name(path.name + ".gz").write_bytes(gzip.compress(data, mtime=0))


def usps_text(digits: np.ndarray, rng: np.random.Generator) -> str:
    """USPS's LIBSVM lines: 'label 1:v ... 256:v' with labels 1..10 (digit + 1) and 16x16 pixels in [-1, 1]."""
    images = _digit_patterns(digits, 16, rng).reshape(len(digits), -1) / 127.5 - 1
    return "".join(f"{d + 1} " + " ".join(f"{i + 1}:{v:.6f}" for i, v in enumerate(row)) + "\n"
                   for d, row in zip(digits, images))


def write_usps(path: Path, n: int, rng: np.random.Generator) -> np.ndarray:
    digits = rng.integers(0, 10, size=n)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(bz2.compress(usps_text(digits, rng).encode()))
    return digits


def make_digits_root(root: Path, seed: int = 0) -> dict[str, np.ndarray]:
    """Writes all six files under root; returns the true digit labels of each split."""
    rng = np.random.default_rng(seed)
    labels = {
        "svhn_train": write_svhn(root / "svhn" / "train_32x32.mat", SIZES["svhn_train"], rng),
        "svhn_test": write_svhn(root / "svhn" / "test_32x32.mat", SIZES["svhn_test"], rng),
    }
    raw = root / "MNIST" / "raw"
    for split, prefix in (("mnist_train", "train"), ("mnist_test", "t10k")):
        digits = rng.integers(0, 10, size=SIZES[split])
        write_idx(raw / f"{prefix}-images-idx3-ubyte", _digit_patterns(digits, 28, rng))
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", digits.astype(np.uint8))
        labels[split] = digits
    labels["usps_train"] = write_usps(root / "usps" / "usps.bz2", SIZES["usps_train"], rng)
    labels["usps_test"] = write_usps(root / "usps" / "usps.t.bz2", SIZES["usps_test"], rng)
    return labels


SIGN_CLASSES_USED = (0, 7, 42)  # a few of the 43 classes, the last one included


def _sign(label: int, width: int, height: int, rng: np.random.Generator) -> np.ndarray:
    """An RGB image whose colour tells its class, with noise: learnable in a few iterations."""
    colour = np.array([(label * 97) % 256, (label * 57 + 80) % 256, (label * 31 + 160) % 256])
    return (colour + rng.integers(-20, 21, (height, width, 3))).clip(0, 255).astype(np.uint8)


def make_signs_root(root: Path, seed: int = 0, per_class: int = 6) -> dict[str, list[int]]:
    """GTSRB in torchvision's extracted layout (ROI-annotated .ppm files of several sizes) and Synthetic
    Signs in their release layout (40x40 PNGs, one 48x48 to be resized); returns the labels in reading order."""
    from PIL import Image

    rng, labels = np.random.default_rng(seed), {"gtsrb_train": [], "gtsrb_test": [], "synsig": []}
    header = "Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId\n"
    test_dir = root / "gtsrb" / "GTSRB" / "Final_Test" / "Images"
    test_dir.mkdir(parents=True)
    test_rows = []
    for label in SIGN_CLASSES_USED:
        folder = root / "gtsrb" / "GTSRB" / "Training" / f"{label:05d}"
        folder.mkdir(parents=True)
        rows = []
        for index in range(per_class):
            width, height = 30 + index, 32 + 2 * index
            image = np.zeros((height, width, 3), np.uint8)  # a black border around the sign: the ROI drops it
            image[5:height - 5, 5:width - 5] = _sign(label, width - 10, height - 10, rng)
            Image.fromarray(image).save(folder / f"00000_{index:05d}.ppm")
            rows.append(f"00000_{index:05d}.ppm;{width};{height};5;5;{width - 5};{height - 5};{label}\n")
            labels["gtsrb_train"].append(label)
            name = f"{len(test_rows):05d}.ppm"
            Image.fromarray(image).save(test_dir / name)
            test_rows.append(f"{name};{width};{height};5;5;{width - 5};{height - 5};{label}\n")
            labels["gtsrb_test"].append(label)
        (folder / f"GT-{label:05d}.csv").write_text(header + "".join(rows))
    (root / "gtsrb" / "GT-final_test.csv").write_text(header + "".join(test_rows))
    synthetic = root / "synsig" / "synthetic_data"
    (synthetic / "train").mkdir(parents=True)
    lines = []
    for index in range(10 * len(SIGN_CLASSES_USED)):
        label = SIGN_CLASSES_USED[index % len(SIGN_CLASSES_USED)]
        size = 48 if index == 0 else 40
        Image.fromarray(_sign(label, size, size, rng)).save(synthetic / "train" / f"{index:05d}.png")
        lines.append(f"train/{index:05d}.png {label} 1\n")
        labels["synsig"].append(label)
    (synthetic / "train_labelling.txt").write_text("".join(lines))
    return labels



def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: real processes, signals, sweeps and fault injection: the full run only "
                                       "(the quick tier is -m 'not slow')")
    config.addinivalue_line("markers", "slurm: needs a running Slurm cluster with accounting (.ci/slurm-start)")


@pytest.fixture(scope="session")
def slurm() -> None:
    """A reachable Slurm with accounting (.ci/slurm-start's, or a real one): without it the test is skipped,
    saying why, except where MCD_REQUIRE_SLURM=1 (CI), where it fails."""
    problems = []
    for command in (["sinfo", "-h", "-o", "%T"], ["sacct", "-n", "-X", "-S", "now"]):
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=30)
            if done.returncode != 0:
                problems.append(f"{command[0]}: {(done.stderr.strip().splitlines() or ['failed'])[-1]}")
        except (OSError, subprocess.TimeoutExpired) as error:
            problems.append(f"{command[0]}: {error}")
    if problems:
        message = f"no Slurm cluster here ({'; '.join(problems)}); start one with: eval \"$(.ci/slurm-start)\""
        if os.environ.get("MCD_REQUIRE_SLURM") == "1":
            pytest.fail(message)
        pytest.skip(message)


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests never touch the network: any connection attempt in this process fails the test loudly."""

    def refuse(*args, **kwargs):
        raise AssertionError("a test tried to use the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


@pytest.fixture(scope="session")
def signs_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Traffic-sign fixtures shared by the whole session (read-only by convention)."""
    root = tmp_path_factory.mktemp("signs")
    make_signs_root(root)
    return root


@pytest.fixture(scope="session")
def digits_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A read-only-by-convention fixture data root shared by the whole session."""
    root = tmp_path_factory.mktemp("digits")
    make_digits_root(root)
    return root


@pytest.fixture(scope="session")
def _pristine_digits(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, np.ndarray]]:
    """The files fresh_root copies (never handed to a test: nothing reads or writes them)."""
    root = tmp_path_factory.mktemp("pristine-digits")
    return root, make_digits_root(root)


@pytest.fixture()
def fresh_root(tmp_path: Path, _pristine_digits) -> tuple[Path, dict[str, np.ndarray]]:
    """A private data root a test may damage, with its true labels (a copy: writing them costs 0.3 s a test)."""
    pristine, labels = _pristine_digits
    root = tmp_path / "data"
    shutil.copytree(pristine, root)
    return root, {split: values.copy() for split, values in labels.items()}
