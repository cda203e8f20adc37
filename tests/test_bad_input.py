"""Every row of docs/resuming.md's "What happens when…" table: a one-line error, exit code 2, and an earlier
run's files beside --csv left exactly as they were."""

from __future__ import annotations

import os
import shutil
import stat
import urllib.error
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import scipy.io
import torch

import downloads
import datasets
import main as main_module
from conftest import idx_bytes

Setup = Callable[[Path, pytest.MonkeyPatch], list[str]]  # (private data root, monkeypatch) -> extra flags


def _main(args: list[str]) -> int:
    try:
        return main_module.main(args)
    except SystemExit as exit_info:  # argparse's errors
        return exit_info.code


def _mat(root: Path, split: str = "train") -> Path:
    return root / "svhn" / f"{split}_32x32.mat"


def _rewrite_mat(root: Path, **arrays: np.ndarray) -> list[str]:
    mat = scipy.io.loadmat(_mat(root))
    scipy.io.savemat(_mat(root), {**{"X": mat["X"], "y": mat["y"]}, **arrays})
    return []


def _idx(root: Path, name: str, data: bytes) -> list[str]:
    raw = root / "MNIST" / "raw" / name
    raw.with_name(raw.name + ".gz").unlink()  # the .gz would be extracted over the damaged file
    raw.write_bytes(data)
    return []


def _labels(root: Path, n: int, value: int = 3) -> np.ndarray:
    return np.full(n, value, dtype=np.uint8)


def _replace(path: Path, data: bytes) -> list[str]:
    if path.is_dir():
        shutil.rmtree(path)
    path.write_bytes(data)
    return []


def _deny_read(root: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    real_access = os.access  # tests run as root here, so permissions cannot be taken away for real
    monkeypatch.setattr(datasets.os, "access", lambda path, mode: False if Path(path) == root else real_access(path, mode))
    return []


def _offline(root: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    shutil.rmtree(root)

    def no_network(url, folder, filename, md5):
        raise urllib.error.URLError("Temporary failure in name resolution")

    monkeypatch.setattr(downloads, "download_url", no_network)
    return ["DOWNLOAD"]


CASES: dict[str, tuple[Setup, str]] = {
    # data
    "data root missing": (lambda r, m: shutil.rmtree(r) or [], "does not exist (--no-download)"),
    "data root is a file": (lambda r, m: _replace(r, b"x"), "is not a directory"),
    "data root not readable": (_deny_read, "is not readable"),
    "dataset file missing": (lambda r, m: _mat(r, "test").unlink() or [], "test_32x32.mat (from http"),
    ".mat truncated": (lambda r, m: _replace(_mat(r), _mat(r).read_bytes()[:2000]), "not a readable SVHN .mat"),
    ".mat wrong keys": (lambda r, m: scipy.io.savemat(_mat(r), {"images": np.zeros(3)}) or [], "no 'X' and 'y'"),
    ".mat wrong dtype": (lambda r, m: _rewrite_mat(r, X=scipy.io.loadmat(_mat(r))["X"].astype(np.float32)), "X must be uint8"),
    ".mat label outside 1..10": (lambda r, m: _rewrite_mat(r, y=np.full((400, 1), 11, dtype=np.uint8)), "labels must be 1..10"),
    ".mat count mismatch": (lambda r, m: _rewrite_mat(r, y=np.ones((399, 1), dtype=np.uint8)), "400 images but 399 labels"),
    "IDX wrong magic": (lambda r, m: _idx(r, "train-images-idx3-ubyte", b"\x00\x00\x09\x03" + bytes(64)), "magic number 00000903"),
    "IDX truncated": (lambda r, m: _idx(r, "t10k-images-idx3-ubyte", (r / "MNIST/raw/t10k-images-idx3-ubyte").read_bytes()[:5000]),
                      "its header says (200, 28, 28) but it holds"),
    "IDX count mismatch": (lambda r, m: _idx(r, "t10k-labels-idx1-ubyte", idx_bytes(_labels(r, 150))), "matching 150 labels"),
    "IDX label outside 0..9": (lambda r, m: _idx(r, "t10k-labels-idx1-ubyte", idx_bytes(_labels(r, 200, 12))), "labels must be 0..9"),
    "a test split of 0 images": (lambda r, m: scipy.io.savemat(_mat(r, "test"), {"X": np.zeros((32, 32, 3, 0), np.uint8),
                                                                              "y": np.zeros((0, 1), np.uint8)}) or [],
                                 "test_32x32.mat holds no images"),
    "checksum mismatch": (lambda r, m: ["STRICT"], "is not the official release"),
    "download fails (no network)": (_offline, "could not download http"),
    # flags
    "batch larger than a training set": (lambda r, m: ["--batch-size", "100000"], "--batch-size 100000 is larger"),
    "iters-per-epoch < 1": (lambda r, m: ["--iters-per-epoch", "0"], "must be at least 1"),
    "lr = 0": (lambda r, m: ["--lr", "0"], "must be a finite number greater than 0"),
    "lr < 0": (lambda r, m: ["--lr=-1e-4"], "must be a finite number greater than 0"),
    "lr infinite": (lambda r, m: ["--lr", "1e400"], "must be a finite number greater than 0, got 1e400"),
    "weight decay infinite": (lambda r, m: ["--weight-decay", "inf"], "must be a finite number, 0 or more"),
    "epochs 0": (lambda r, m: ["--epochs", "0"], "must be at least 1"),
    "batch size 1 (BatchNorm)": (lambda r, m: ["--batch-size", "1"], "must be at least 2"),
    "seed negative": (lambda r, m: ["--seed", "-1"], "must be between 0 and 2147483647"),
    "seed 2**32": (lambda r, m: ["--seed", str(2**32)], "must be between 0 and 2147483647"),
    "seeds beyond the range": (lambda r, m: ["--seeds", "1", f"{2**31 - 1}-{2**31}"], "seeds must be between 0"),
    "a --csv name too long for its files": (lambda r, m: ["--csv", str(r.parent / "out" / ("x" * 240 + ".csv"))],
                                            "the name is too long for the files written beside it"),
    "unknown method": (lambda r, m: ["--method", "adda"], "invalid choice: 'adda'"),
    "unknown device": (lambda r, m: ["--device", "tpu"], "invalid choice: 'tpu'"),
    "unknown precision": (lambda r, m: ["--precision", "fp8"], "invalid choice: 'fp8'"),
    "unknown dataset": (lambda r, m: ["--target", "cifar"], "invalid choice: 'cifar'"),
    "source = target": (lambda r, m: ["--source", "mnist", "--target", "mnist"], "choose two different datasets"),
    "USPS file corrupt": (lambda r, m: _replace(r / "usps" / "usps.bz2", b"BZh9 broken") + ["--target", "usps", "--source", "mnist"],
                          "not a readable USPS .bz2"),
    "--resume with --overwrite": (lambda r, m: ["--resume"], "not allowed with argument"),
    "--small-subsets with SVHN": (lambda r, m: ["--small-subsets"], "--small-subsets is the paper's MNIST <-> USPS"),
    "--evaluate with --seeds": (lambda r, m: ["--evaluate", str(r / "x.pt"), "--seeds", "1"],
                                "--evaluate scores one checkpoint"),
}
if not torch.cuda.is_available():
    CASES["--device cuda without CUDA"] = (lambda r, m: ["--device", "cuda"], "no CUDA device is available")
    CASES["--cuda-graph on without CUDA"] = (lambda r, m: ["--cuda-graph", "on"], "needs a CUDA device")


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_exit_2_and_touches_no_results(case, fresh_root, tmp_path, monkeypatch, capsys):
    root, _ = fresh_root
    setup, message = CASES[case]
    extra = setup(root, monkeypatch)
    csv_path = tmp_path / "out" / "results.csv"
    csv_path.parent.mkdir()
    earlier = {csv_path: b"epoch\n1\n", csv_path.with_suffix(".json"): b"{}", csv_path.with_suffix(".pt"): b"checkpoint"}
    for path, content in earlier.items():
        path.write_bytes(content)
    args = ["--data-root", str(root), "--device", "cpu", "--epochs", "1", "--iters-per-epoch", "1", "--batch-size", "8",
            "--csv", str(csv_path), "--overwrite", "--allow-unverified-data", "--no-download"]
    if "STRICT" in extra:
        args.remove("--allow-unverified-data")
    if "DOWNLOAD" in extra:
        args.remove("--no-download")
    args += [flag for flag in extra if flag not in ("STRICT", "DOWNLOAD")]

    assert _main(args) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line and not line.startswith("warning:")]
    assert len(errors) == 1 and errors[0].startswith("error: "), errors
    assert message in errors[0]
    assert "Traceback" not in errors[0]
    assert {path: path.read_bytes() for path in earlier} == earlier  # nothing written, nothing overwritten
    assert sorted(p.name for p in csv_path.parent.iterdir()) == sorted(p.name for p in earlier)


def test_output_folder_that_cannot_be_created(digits_root, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    args = ["--data-root", str(digits_root), "--allow-unverified-data", "--no-download", "--device", "cpu",
            "--csv", str(blocker / "results.csv")]
    assert _main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot create its folder" in err
    assert blocker.read_text() == "not a folder"


def test_missing_output_folder_is_created(digits_root, tmp_path):
    csv_path = tmp_path / "new" / "deeper" / "results.csv"
    args = ["--data-root", str(digits_root), "--allow-unverified-data", "--no-download", "--device", "cpu",
            "--epochs", "1", "--iters-per-epoch", "1", "--batch-size", "8", "--num-k", "1", "--csv", str(csv_path),
            "--source", "mnist", "--target", "usps"]  # the small network: this is about the folder
    assert _main(args) == 0
    assert csv_path.exists() and csv_path.with_suffix(".pt").exists()


def test_debug_shows_the_traceback_behind_the_message(tmp_path, capsys):
    args = ["--data-root", str(tmp_path / "nowhere"), "--no-download", "--device", "cpu", "--csv", str(tmp_path / "r.csv"),
            "--debug"]
    assert _main(args) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and "DataError" in err and err.strip().splitlines()[-1].startswith("error: ")


def test_a_csv_that_is_not_a_regular_file_is_never_replaced(digits_root, tmp_path, capsys):
    fifo = tmp_path / "fifo.csv"
    os.mkfifo(fifo)
    assert _main(["--data-root", str(digits_root), "--allow-unverified-data", "--no-download", "--device", "cpu",
                  "--csv", str(fifo), "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is not a regular file" in err and stat.S_ISFIFO(os.stat(fifo).st_mode)
