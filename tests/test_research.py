"""Research features: several seeds with mean ± std, and the pictures of them."""

from __future__ import annotations

import csv
import json
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import main as main_module
import plot_results
import visualize
from train import CSV_COLUMNS

ROOT = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as file:
        return list(csv.DictReader(file))


def _args(data_root: Path, csv_path: Path, *extra: str) -> list[str]:
    return ["--data-root", str(data_root), "--allow-unverified-data", "--no-download", "--device", "cpu",
            "--epochs", "2", "--iters-per-epoch", "2", "--batch-size", "8", "--num-k", "1",
            "--csv", str(csv_path), *extra]


@pytest.fixture(scope="module")
def seed_runs(digits_root, tmp_path_factory) -> Path:
    csv_path = tmp_path_factory.mktemp("seeds") / "mcd.csv"
    assert main_module.main(_args(digits_root, csv_path, "--seeds", "1-2", "3")) == 0
    return csv_path


def test_seeds_write_one_run_each_and_a_summary_of_last_epochs(seed_runs, capsys):
    folder = seed_runs.parent
    assert sorted(p.name for p in folder.glob("*.csv")) == ["mcd_seed1.csv", "mcd_seed2.csv", "mcd_seed3.csv", "mcd_summary.csv"]
    assert all((folder / f"mcd_seed{seed}.pt").exists() for seed in (1, 2, 3))
    last = {seed: _rows(folder / f"mcd_seed{seed}.csv")[-1] for seed in (1, 2, 3)}
    assert len({row["target_acc_ensemble"] + row["loss_source"] for row in last.values()}) == 3  # seeds differ
    summary = {row["metric"]: row for row in _rows(folder / "mcd_summary.csv")}
    assert list(summary) == ["target_acc_ensemble", "target_acc_f1", "target_acc_f2", "source_acc"]
    for metric, row in summary.items():
        values = [float(last[seed][metric]) for seed in (1, 2, 3)]  # the last epoch, never the best
        assert [float(row[f"seed_{seed}"]) for seed in (1, 2, 3)] == pytest.approx(values, abs=1e-4)
        assert float(row["mean"]) == pytest.approx(statistics.fmean(values), abs=1e-4)
        assert float(row["std"]) == pytest.approx(statistics.stdev(values), abs=1e-4)  # sample std


def test_seed_ranges_and_bad_seeds(capsys):
    assert main_module.build_parser().parse_args(["--seeds", "1-3", "7"]).seeds == [[1, 2, 3], [7]]
    with pytest.raises(SystemExit):
        main_module.build_parser().parse_args(["--seeds", "x"])
    assert "not a seed or a range" in capsys.readouterr().err


def test_plot_groups_seed_files_into_a_band(seed_runs, tmp_path):
    folder = seed_runs.parent
    seeds = [folder / f"mcd_seed{seed}.csv" for seed in (1, 2, 3)]
    other = tmp_path / "source_only.csv"
    other.write_text(",".join(CSV_COLUMNS) + "\n1,2,1.0,2.0,,,50,30,31,32\n2,4,2.0,1.0,,,60,33,34,35\n")
    assert plot_results._groups([*seeds, other]) == [("mcd (3 seeds)", [0, 1, 2]), ("source_only", [3])]
    out = tmp_path / "band.png"
    result = subprocess.run([sys.executable, str(ROOT / "plot_results.py"), *map(str, seeds), str(other), "--out", str(out)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    data = out.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 20_000  # two panels with curves, not an empty canvas


def test_training_ends_with_a_confusion_matrix_picture(seed_runs):
    for seed in (1, 2, 3):
        data = (seed_runs.parent / f"mcd_seed{seed}_confusion.png").read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 20_000


def test_confusion_matrix_counts_true_rows_and_predicted_columns():
    labels = np.array([0, 0, 1, 2, 2, 2])
    predicted = np.array([0, 1, 1, 2, 0, 2])
    matrix = visualize.confusion_matrix(predicted, labels, classes=3)
    assert matrix.tolist() == [[1, 1, 0], [0, 1, 0], [1, 0, 2]]


def test_evaluate_reproduces_the_last_row_without_training(seed_runs, capsys):
    checkpoint = seed_runs.parent / "mcd_seed2.pt"
    before = checkpoint.read_bytes()
    assert main_module.main(["--evaluate", str(checkpoint), "--device", "cpu", "--no-download"]) == 0
    out = capsys.readouterr().out
    last = _rows(seed_runs.parent / "mcd_seed2.csv")[-1]
    result = json.loads((seed_runs.parent / "mcd_seed2_evaluation.json").read_text())
    for metric in ("source_acc", "target_acc_f1", "target_acc_f2", "target_acc_ensemble"):
        assert result[metric] == pytest.approx(float(last[metric]), abs=1e-4)  # same weights, same numbers
    assert f"ensemble {float(last['target_acc_ensemble']):.2f}%" in out and result["epoch"] == 2
    assert checkpoint.read_bytes() == before  # evaluation trains nothing and saves nothing over it


def test_evaluate_a_missing_or_foreign_checkpoint_is_one_line(tmp_path, capsys):
    assert main_module.main(["--evaluate", str(tmp_path / "none.pt"), "--device", "cpu"]) == 2
    assert "no checkpoint" in capsys.readouterr().err
    (tmp_path / "foreign.pt").write_bytes(b"not torch")
    assert main_module.main(["--evaluate", str(tmp_path / "foreign.pt"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not a readable checkpoint" in err


def test_visualize_draws_tsne_of_two_models_and_the_confusion_matrix(seed_runs):
    folder = seed_runs.parent
    result = subprocess.run([sys.executable, str(ROOT / "visualize.py"), str(folder / "mcd_seed1.pt"), "--compare",
                             str(folder / "mcd_seed3.pt"), "--images", "60", "--device", "cpu"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    for kind, least in (("tsne", 60_000), ("confusion", 20_000)):
        data = (folder / f"mcd_seed1_{kind}.png").read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > least
