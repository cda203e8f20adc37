"""Every file a run writes is its own: the TensorBoard run and the derived files (STEM_selection.csv, ...)
come under the same rules as the CSV: locked, checked before the run starts, replaced on --overwrite, kept
exact by --resume; a TensorBoard write that fails never stops training. TensorBoard's own reader checks
its files."""

from __future__ import annotations

import errno
import json
import subprocess
import sys
from pathlib import Path

import pytest

import main as main_module
import results
from checkpoint import load_checkpoint
from conftest import read_rows, train_args

ROOT = Path(__file__).resolve().parents[1]


def _scalars(folder: Path) -> dict[str, list[int]]:
    """tag -> the steps TensorBoard shows for it (its own reader: purges, file order and all)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(folder))
    accumulator.Reload()
    return {tag: [event.step for event in accumulator.Scalars(tag)] for tag in accumulator.Tags()["scalars"]}


def _run(root: Path, csv_path: Path, board: Path, *extra: str, epochs: int = 2) -> int:
    return main_module.main(train_args(root, csv_path, "--tensorboard", str(board), *extra, epochs=epochs))


def test_two_runs_with_one_csv_stem_never_share_a_tensorboard_run(digits_root, tmp_path, capsys):
    board = tmp_path / "tb"
    assert _run(digits_root, tmp_path / "a" / "mcd.csv", board) == 0
    capsys.readouterr()
    assert _run(digits_root, tmp_path / "b" / "mcd.csv", board) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "holds the curves of another run" in err and str(tmp_path / "a" / "mcd.csv") in err
    assert not (tmp_path / "b" / "mcd.csv").exists()  # refused before anything was written
    assert _scalars(board / "mcd")["accuracy/target_acc_ensemble"] == [1, 2]


def test_overwrite_replaces_the_curves_and_resume_writes_each_epoch_once(digits_root, tmp_path):
    board, csv_path = tmp_path / "tb", tmp_path / "run.csv"
    assert _run(digits_root, csv_path, board, epochs=3) == 0
    assert _run(digits_root, csv_path, board, "--overwrite", epochs=1) == 0
    scalars = _scalars(board / "run")
    assert scalars["accuracy/target_acc_ensemble"] == [1] and scalars["hparam/target_acc_ensemble"] == [0]
    assert _run(digits_root, csv_path, board, "--resume", epochs=2) == 0
    assert _run(digits_root, csv_path, board, "--resume", epochs=2) == 0  # finished: nothing trains, curves kept
    scalars = _scalars(board / "run")
    assert scalars["accuracy/target_acc_ensemble"] == [1, 2] and scalars["loss/loss_source"] == [1, 2]
    assert scalars["hparam/target_acc_ensemble"] == [0]  # the settings once
    assert len(list((board / "run").glob("events.out.tfevents.*"))) == 1


@pytest.mark.slow
def test_a_failed_tensorboard_write_never_stops_training_and_resume_writes_the_missing_epochs(
        digits_root, tmp_path, monkeypatch, capsys):
    board, csv_path = tmp_path / "tb", tmp_path / "full.csv"
    real_add_epoch = results.TensorBoardRun.add_epoch

    def full_at_epoch_2(self, row, flush=True):
        if row["epoch"] == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_add_epoch(self, row, flush)

    monkeypatch.setattr(results.TensorBoardRun, "add_epoch", full_at_epoch_2)
    assert _run(digits_root, csv_path, board, epochs=3) == 0
    err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if "--tensorboard" in line]
    assert len(warnings) == 1 and "disk full" in warnings[0] and "--resume writes them again" in warnings[0]
    assert "Traceback" not in err and [row["epoch"] for row in read_rows(csv_path)] == ["1", "2", "3"]
    assert _scalars(board / "full")["accuracy/target_acc_ensemble"] == [1]
    monkeypatch.undo()
    assert _run(digits_root, csv_path, board, "--resume", epochs=3) == 0  # the run is complete: only the curves
    assert _scalars(board / "full")["accuracy/target_acc_ensemble"] == [1, 2, 3]


def test_derived_files_never_replace_another_runs_results(digits_root, tmp_path, capsys):
    first = tmp_path / "x_selection.csv"
    assert main_module.main(train_args(digits_root, first, epochs=1)) == 0
    before = first.read_bytes()
    capsys.readouterr()
    assert main_module.main(train_args(digits_root, tmp_path / "x.csv", epochs=1)) == 2  # x_selection.csv: x's pick
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "x_selection.csv, a file this run writes, holds another run's results" in err
    assert first.read_bytes() == before and not (tmp_path / "x.csv").exists()
    assert main_module.main(train_args(digits_root, tmp_path / "y.csv", epochs=1)) == 0
    for name in ("y_selection.csv", "y_summary.csv"):  # and the other way round
        assert main_module.main(train_args(digits_root, tmp_path / name, epochs=1, num_k=None) + ["--overwrite"]) == 2
        assert "is a file that the run" in capsys.readouterr().err
    assert main_module.main(train_args(digits_root, tmp_path / "z.csv", "--seeds", "1", epochs=1)) == 0
    assert main_module.main(train_args(digits_root, tmp_path / "z_summary.csv", epochs=1)) == 2  # z's summary


def test_a_seed_range_too_large_for_memory_is_refused_at_once(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main_module.main(["--seeds", "0-2000000000"])
    assert exit_info.value.code == 2 and "at most 10,000 seeds" in capsys.readouterr().err


@pytest.mark.slow
def test_a_file_name_that_is_not_utf8_on_a_strict_stdout_is_printed_escaped(digits_root, tmp_path):
    odd = Path(tmp_path.as_posix() + "/r\udcff.csv")  # the byte 0xff, as Python keeps it in a str
    done = subprocess.run([sys.executable, str(ROOT / "main.py"), *train_args(digits_root, odd, "--seeds", "1", epochs=1)],
                          capture_output=True, text=True, timeout=600, cwd=ROOT,
                          env={"PYTHONIOENCODING": "utf-8:strict", "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr
    assert "UnicodeEncodeError" not in done.stderr and "\\udcff" in done.stdout
    assert json.loads(Path(tmp_path.as_posix() + "/r\udcff_seed1.json").read_text())["epochs_completed"] == 1


@pytest.mark.slow
def test_a_weights_only_run_still_evaluates_but_refuses_more_epochs(digits_root, tmp_path, capsys):
    full, light = tmp_path / "full.csv", tmp_path / "light.csv"
    assert main_module.main(train_args(digits_root, full, "--seed", "1")) == 0
    assert main_module.main(train_args(digits_root, light, "--seed", "1", "--final-state", "weights")) == 0
    saved = load_checkpoint(light.with_suffix(".pt"))
    assert saved["weights_only"] and saved["optimizers"] == {} and saved["rng"] is None and saved["epoch"] == 2
    assert light.with_suffix(".pt").stat().st_size < full.with_suffix(".pt").stat().st_size / 2  # no Adam moments
    without_time = lambda path: [{k: v for k, v in row.items() if k != "seconds"} for row in read_rows(path)]  # noqa: E731
    assert without_time(light) == without_time(full)

    capsys.readouterr()
    assert main_module.main(["--evaluate", str(light.with_suffix(".pt")), "--device", "cpu", "--no-download"]) == 0
    evaluated = json.loads((tmp_path / "light_evaluation.json").read_text())
    assert evaluated["target_acc_ensemble"] == pytest.approx(float(read_rows(light)[-1]["target_acc_ensemble"]), abs=1e-4)
    assert main_module.main(train_args(digits_root, light, "--seed", "1", "--resume")) == 0  # finished: nothing to do
    capsys.readouterr()
    assert main_module.main(train_args(digits_root, light, "--seed", "1", "--resume", epochs=3)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "keeps the weights only (--final-state weights)" in err and "--overwrite" in err
