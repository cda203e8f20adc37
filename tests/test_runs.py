"""Trustworthy runs: checkpoints, exact resume after SIGKILL, signals, refusals that write nothing."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import main as main_module
import algorithms
import train as train_module
from checkpoint import RESULT_KEYS, load_checkpoint, save_checkpoint
from conftest import make_digits_root
from iteration import NonFiniteLoss, NonFiniteWatch
from results import CSV_COLUMNS
from run_control import Interrupted, SignalGuard

ROOT = Path(__file__).resolve().parents[1]


def _args(data_root: Path, csv_path: Path, *extra: str, epochs: int = 2) -> list[str]:
    return ["--data-root", str(data_root), "--allow-unverified-data", "--no-download", "--device", "cpu",
            "--epochs", str(epochs), "--iters-per-epoch", "2", "--batch-size", "8", "--num-k", "1",
            "--csv", str(csv_path), *extra]


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as file:
        return list(csv.DictReader(file))


def _results(path: Path) -> list[dict[str, str]]:
    """Every column but the wall-clock seconds."""
    return [{k: v for k, v in row.items() if k != "seconds"} for row in _rows(path)]


def _snapshot(*paths: Path) -> dict[Path, bytes | None]:
    return {p: p.read_bytes() if p.exists() else None for p in paths}


def _outputs(csv_path: Path) -> tuple[Path, Path, Path]:
    return csv_path, csv_path.with_suffix(".json"), csv_path.with_suffix(".pt")


@pytest.fixture(scope="module")
def finished_run(digits_root, tmp_path_factory) -> Path:
    """One complete 2-epoch run; tests copy its files rather than train again."""
    csv_path = tmp_path_factory.mktemp("finished") / "run.csv"
    assert main_module.main(_args(digits_root, csv_path)) == 0
    return csv_path


def _copy_run(source: Path, folder: Path) -> Path:
    for path in _outputs(source):
        (folder / path.name).write_bytes(path.read_bytes())
    return folder / source.name


# ---------------------------------------------------------------------------------------------------
# Checkpoints


def test_each_epoch_leaves_a_weights_only_checkpoint_that_agrees_with_the_csv(finished_run):
    checkpoint = torch.load(finished_run.with_suffix(".pt"), weights_only=True)  # no pickled code inside
    assert checkpoint["epoch"] == 2 and len(checkpoint["rows"]) == 2
    assert set(checkpoint["models"]) == {"G", "F1", "F2"} and set(checkpoint["optimizers"]) == {"G", "F"}
    assert checkpoint["optimizers"]["G"]["state"][0]["exp_avg"].shape == checkpoint["models"]["G"]["conv.0.weight"].shape
    assert set(checkpoint["rng"]) == {"torch", "device", "numpy", "python"}
    assert [s["position"] for s in checkpoint["streams"]] == [32, 32]  # 2 epochs x 2 batches of 8, each stream
    assert set(RESULT_KEYS) <= set(checkpoint["config"])
    csv_rows = _rows(finished_run)
    assert [int(r["epoch"]) for r in csv_rows] == [row["epoch"] for row in checkpoint["rows"]] == [1, 2]
    assert float(csv_rows[-1]["target_acc_ensemble"]) == pytest.approx(checkpoint["rows"][-1]["target_acc_ensemble"], abs=1e-4)
    assert not list(finished_run.parent.glob("*.tmp"))


def test_a_crash_while_saving_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "run.pt"
    save_checkpoint(path, {"format_version": 1, "epoch": 1})

    def dies_half_way(payload, file):
        file.write(b"half a checkpoint")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", dies_half_way)
    with pytest.raises(OSError):
        save_checkpoint(path, {"format_version": 1, "epoch": 2})
    assert torch.load(path, weights_only=True)["epoch"] == 1
    assert list(tmp_path.iterdir()) == [path]  # no temp file left behind


# ---------------------------------------------------------------------------------------------------
# Never overwrite; resume only what can be resumed


def test_an_existing_run_is_never_overwritten_without_overwrite(finished_run, digits_root, tmp_path, capsys):
    csv_path = _copy_run(finished_run, tmp_path)
    before = _snapshot(*_outputs(csv_path))
    assert main_module.main(_args(digits_root, csv_path)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "already exists" in err and "--resume" in err and "--overwrite" in err
    assert _snapshot(*_outputs(csv_path)) == before


def test_overwrite_starts_afresh(finished_run, digits_root, tmp_path):
    csv_path = _copy_run(finished_run, tmp_path)
    csv_path.write_text(",".join(CSV_COLUMNS) + "\n" + "7,1,1,1,1,1,1,1,1,1\n")  # a stranger's row
    assert main_module.main(_args(digits_root, csv_path, "--overwrite", epochs=1)) == 0
    assert [r["epoch"] for r in _rows(csv_path)] == ["1"]
    assert load_checkpoint(csv_path.with_suffix(".pt"))["epoch"] == 1


def test_resume_refuses_other_settings_and_names_them(finished_run, digits_root, tmp_path, capsys):
    csv_path = _copy_run(finished_run, tmp_path)
    before = _snapshot(*_outputs(csv_path))
    args = _args(digits_root, csv_path, "--resume", "--lr", "0.001", epochs=3)
    args[args.index("--num-k") + 1] = "2"
    assert main_module.main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "lr 0.0002 -> 0.001" in err and "num_k 1 -> 2" in err
    assert _snapshot(*_outputs(csv_path)) == before


def test_resume_refuses_changed_dataset_files(finished_run, tmp_path, capsys):
    other_data = tmp_path / "other"
    make_digits_root(other_data, seed=1)  # same layout, other images
    csv_path = _copy_run(finished_run, tmp_path)
    before = _snapshot(*_outputs(csv_path))
    assert main_module.main(_args(other_data, csv_path, "--resume", epochs=3)) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if not line.startswith("warning:")]
    assert len(errors) == 1 and "dataset files changed" in errors[0] and "train_32x32.mat" in errors[0]
    assert _snapshot(*_outputs(csv_path)) == before


def test_resume_without_a_checkpoint_or_from_a_corrupt_one(digits_root, tmp_path, finished_run, capsys):
    assert main_module.main(_args(digits_root, tmp_path / "none.csv", "--resume")) == 2
    assert "no checkpoint" in capsys.readouterr().err
    csv_path = _copy_run(finished_run, tmp_path)
    csv_path.with_suffix(".pt").write_bytes(b"\x00" * 100)
    before = _snapshot(*_outputs(csv_path))
    assert main_module.main(_args(digits_root, csv_path, "--resume", epochs=3)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not a readable checkpoint" in err
    assert _snapshot(*_outputs(csv_path)) == before


def test_resume_drops_rows_written_after_the_checkpoint_and_continues(finished_run, digits_root, tmp_path):
    csv_path = _copy_run(finished_run, tmp_path)
    with open(csv_path, "a") as file:
        file.write("3,6,9.9,9,9,9,9,9,9,9\n")  # a row no checkpoint vouches for
    assert main_module.main(_args(digits_root, csv_path, "--resume", epochs=3)) == 0
    rows = _rows(csv_path)
    assert [r["epoch"] for r in rows] == ["1", "2", "3"]
    assert rows[2]["loss_source"] != "9" and _results(csv_path)[:2] == _results(finished_run)
    assert load_checkpoint(csv_path.with_suffix(".pt"))["resumed_at"] == [2]


def test_resume_of_a_finished_run_trains_nothing(finished_run, digits_root, tmp_path, capsys):
    csv_path = _copy_run(finished_run, tmp_path)
    assert main_module.main(_args(digits_root, csv_path, "--resume")) == 0
    assert "already holds all 2 epochs" in capsys.readouterr().out
    assert _results(csv_path) == _results(finished_run)


# ---------------------------------------------------------------------------------------------------
# Exact: --deterministic reruns and SIGKILL + --resume give the same CSV (real processes)


def _start(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(ROOT / "main.py"), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT)


def _wait_for_rows(csv_path: Path, count: int, process: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if csv_path.exists() and len(_rows(csv_path)) >= count:
            return
        assert process.poll() is None, process.communicate()
        time.sleep(0.05)
    raise AssertionError(f"{csv_path} never reached {count} rows")


@pytest.fixture(scope="module")
def deterministic_reference(digits_root, tmp_path_factory) -> Path:
    csv_path = tmp_path_factory.mktemp("reference") / "reference.csv"
    result = subprocess.run([sys.executable, str(ROOT / "main.py"), *_args(digits_root, csv_path, "--deterministic", epochs=3)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    return csv_path


def test_deterministic_reruns_give_identical_csvs(deterministic_reference, digits_root, tmp_path):
    csv_path = tmp_path / "again.csv"
    result = subprocess.run([sys.executable, str(ROOT / "main.py"), *_args(digits_root, csv_path, "--deterministic", epochs=3)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert len(_rows(csv_path)) == 3
    assert _results(csv_path) == _results(deterministic_reference)


def test_sigkill_mid_epoch_then_resume_gives_the_uninterrupted_csv(deterministic_reference, digits_root, tmp_path):
    csv_path = tmp_path / "killed.csv"
    args = _args(digits_root, csv_path, "--deterministic", epochs=3)
    process = _start(args)
    _wait_for_rows(csv_path, 1, process)  # epoch 1 is checkpointed; epoch 2 is under way
    time.sleep(0.3)
    process.kill()  # SIGKILL: no handler runs, nothing is flushed
    process.communicate()
    assert process.returncode == -signal.SIGKILL
    saved = load_checkpoint(csv_path.with_suffix(".pt"))["epoch"]
    assert 1 <= saved < 3 and len(_rows(csv_path)) in (saved, saved + 1)
    resumed = subprocess.run([sys.executable, str(ROOT / "main.py"), *args, "--resume"],
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming after epoch {saved}" in resumed.stdout
    assert _results(csv_path) == _results(deterministic_reference)


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_sigterm_and_sigint_keep_the_last_checkpoint_and_say_how_to_resume(digits_root, tmp_path, signum, code):
    csv_path = tmp_path / "stopped.csv"
    process = _start(_args(digits_root, csv_path, epochs=50))
    _wait_for_rows(csv_path, 1, process)
    process.send_signal(signum)
    _, err = process.communicate(timeout=120)
    assert process.returncode == code, err
    assert "Traceback" not in err and "--resume" in err and "python main.py" in err
    saved = load_checkpoint(csv_path.with_suffix(".pt"))
    assert [int(r["epoch"]) for r in _rows(csv_path)] == [row["epoch"] for row in saved["rows"]]
    assert f"hold epochs 1-{saved['epoch']}" in err


def test_signal_guard_turns_signals_into_interrupted_and_restores_handlers():
    previous = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Interrupted) as error:
        with SignalGuard():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)  # the handler raises before this ends
    assert error.value.exit_code == 143
    assert signal.getsignal(signal.SIGTERM) is previous


# ---------------------------------------------------------------------------------------------------
# Non-finite losses


def test_watch_reports_the_first_non_finite_iteration():
    watch = NonFiniteWatch(torch.device("cpu"))
    watch.update(0, {"a": torch.tensor(1.0), "b": torch.tensor(2.0)})
    with pytest.raises(NonFiniteLoss) as error:
        watch.update(1, {"a": torch.tensor(float("nan")), "b": torch.tensor(2.0)})
    assert error.value.iteration == 2  # 1-based, as printed


def test_a_non_finite_loss_stops_with_exit_3_and_keeps_the_last_good_epoch(digits_root, tmp_path, monkeypatch, capsys):
    calls = []
    real_update = algorithms.MCD.update

    def update(self, xs, ys, xt):
        losses = real_update(self, xs, ys, xt)
        calls.append(1)
        if len(calls) >= 4:  # epoch 2, iteration 2 (two iterations per epoch)
            losses["discrepancy_b"] = losses["discrepancy_b"] * float("inf")
        return losses

    monkeypatch.setattr(algorithms.MCD, "update", update)
    csv_path = tmp_path / "nan.csv"
    assert main_module.main(_args(digits_root, csv_path, epochs=3)) == 3
    errors = [line for line in capsys.readouterr().err.splitlines() if not line.startswith("warning:")]
    assert len(errors) == 1 and "non-finite loss in epoch 2, iteration 2" in errors[0] and "hold epochs 1-1" in errors[0]
    assert [r["epoch"] for r in _rows(csv_path)] == ["1"]
    assert load_checkpoint(csv_path.with_suffix(".pt"))["epoch"] == 1


def test_interrupted_before_the_first_epoch_says_to_start_again(digits_root, tmp_path, monkeypatch, capsys):
    def interrupted(*args, **kwargs):
        raise Interrupted(signal.SIGTERM)

    monkeypatch.setattr(train_module, "train_epoch", interrupted)
    csv_path = tmp_path / "early.csv"
    assert main_module.main(_args(digits_root, csv_path)) == 143
    err = capsys.readouterr().err
    assert "no epoch had finished" in err and "Start again with: python main.py" in err and err.rstrip().endswith("--overwrite")
    assert not csv_path.with_suffix(".pt").exists() and _rows(csv_path) == []
