"""predict.py: a trained run classifies image files and folders (recursively) into a CSV, converting each image as
the run's own images were; one line and exit 2 for what cannot be classified."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import locks
import main as main_module
import predict
from checkpoint import load_checkpoint, model_from_checkpoint
from datasets import DigitsSplit, load_digits
from test_folders import make_folder
from conftest import train_args

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ["cat", "dog", "fish"]


@pytest.fixture(scope="module")
def folder_run(tmp_path_factory) -> tuple[Path, Path, Path]:
    """A run trained from one folder of images to another: (its checkpoint, the source folder, the target folder)."""
    root = tmp_path_factory.mktemp("predict")
    source = make_folder(root / "photos", CLASSES, per_class=10)
    target = make_folder(root / "sketches", CLASSES, per_class=10, seed=1, suffix=".jpg")
    csv_path = root / "run" / "run.csv"
    assert main_module.main(train_args(root, csv_path, "--source", f"folder:{source}", "--target", f"folder:{target}",
                                       "--network", "usps", epochs=2, iters=3)) == 0
    return csv_path.with_suffix(".pt"), source, target


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as file:
        return list(csv.DictReader(file))


def test_predictions_are_the_runs_own_on_the_same_images(folder_run, tmp_path, capsys):
    checkpoint, _, target = folder_run
    out = tmp_path / "predictions.csv"
    assert predict.main([str(checkpoint), str(target), "--out", str(out), "--chunk-size", "7"]) == 0
    assert "wrote" in capsys.readouterr().out
    rows = _rows(out)
    assert list(rows[0]) == list(predict.COLUMNS) and len(rows) == 30  # every image under the folder, recursively
    assert {row["ensemble"] for row in rows} <= set(CLASSES) and all(0 < float(row["confidence"]) <= 1 for row in rows)
    # The run's own reading of the same images (both its splits) gives the same ensemble accuracy, image for image.
    saved = load_checkpoint(checkpoint)
    model = model_from_checkpoint(saved, torch.device("cpu"))
    pair = load_digits(tmp_path, False, False, torch.device("cpu"), saved["config"]["source"], saved["config"]["target"],
                       "usps")
    everything = DigitsSplit(torch.cat([pair.target_train.images, pair.target_test.images]),
                             torch.cat([pair.target_train.labels, pair.target_test.labels]))
    expected = (model.predictions(everything, 512)[2] == everything.labels).sum().item()
    assert sum(row["ensemble"] == Path(row["file"]).parent.name for row in rows) == expected


def test_single_files_and_nested_folders_and_class_names(folder_run, tmp_path):
    checkpoint, source, _ = folder_run
    nested = tmp_path / "inbox" / "deeper"
    nested.mkdir(parents=True)
    (nested / "a.png").write_bytes((source / "dog" / "000.png").read_bytes())
    out = tmp_path / "p.csv"
    assert predict.main([str(checkpoint), str(source / "cat" / "001.png"), str(tmp_path / "inbox"), "--out", str(out)]) == 0
    rows = _rows(out)
    assert [Path(row["file"]).name for row in rows] == ["001.png", "a.png"]
    assert load_checkpoint(checkpoint)["classes"] == CLASSES


@pytest.mark.parametrize("case", ["unreadable image", "empty folder", "missing path", "not a checkpoint",
                                  "still training", "out is a run's file"])
def test_what_cannot_be_classified_is_one_line_exit_2(folder_run, tmp_path, monkeypatch, capsys, case):
    checkpoint, source, _ = folder_run
    paths, out = [str(source)], tmp_path / "p.csv"
    if case == "unreadable image":
        (tmp_path / "broken.png").write_bytes(b"not a png")
        paths = [str(tmp_path / "broken.png")]
    elif case == "empty folder":
        (tmp_path / "empty").mkdir()
        paths = [str(tmp_path / "empty")]
    elif case == "missing path":
        paths = [str(tmp_path / "nowhere")]
    elif case == "not a checkpoint":
        checkpoint = tmp_path / "foreign.pt"
        checkpoint.write_bytes(b"not torch")
    elif case == "still training":
        monkeypatch.setattr(locks, "lock_holder", lambda path: "pid 4242, started 2026-12-07 01:00:00")
    else:
        out = checkpoint.with_suffix(".csv")
    capsys.readouterr()
    assert predict.main([str(checkpoint), *paths, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: "), err
    shown = {"unreadable image": "broken.png is not a readable image", "empty folder": "no image files",
             "missing path": "no such file or folder", "not a checkpoint": "not a readable checkpoint",
             "still training": "still training", "out is a run's file": "is a file of a run"}[case]
    assert shown in err and not (out.exists() and case != "out is a run's file")


def test_help_and_a_bad_flag_answer_without_torch():
    code = ("import sys; sys.modules['torch'] = None; sys.path.insert(0, sys.argv[1]); import predict\n"
            "try:\n    predict.main(sys.argv[2:])\nexcept SystemExit as exit_info:\n    sys.exit(exit_info.code)")
    shown = subprocess.run([sys.executable, "-c", code, str(ROOT), "--help"], capture_output=True, text=True)
    assert shown.returncode == 0 and "--chunk-size" in shown.stdout and "(default: 512)" in shown.stdout
    bad = subprocess.run([sys.executable, "-c", code, str(ROOT), "x.pt", "y", "--chunk-size", "0"], capture_output=True,
                         text=True)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "--chunk-size" in bad.stderr
