"""sweep.py: a grid of main.py runs through submitit's local executor, relaunchable, and its table."""

from __future__ import annotations

import argparse
import csv
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest

import sweep

ROOT = Path(__file__).resolve().parents[1]
JOBS = ("mnist_usps_mcd", "mnist_usps_source_only")


def _launch(data_root: Path, out: Path, *extra: str, epochs: int = 2, methods: tuple[str, ...] = ("mcd", "source_only")
            ) -> list[str]:
    return [sys.executable, str(ROOT / "sweep.py"), "launch", "--out", str(out), "--pairs", "mnist:usps",
            "--methods", *methods, "--seeds", "1-2", "--gpus", "0", "--wait",
            "--data-root", str(data_root), "--allow-unverified-data", "--no-download", "--device", "cpu",
            "--epochs", str(epochs), "--iters-per-epoch", "2", "--batch-size", "8", "--num-k", "1", *extra]


def _last_rows(folder: Path) -> list[float]:
    values = []
    for seed in (1, 2):
        with open(folder / f"results_seed{seed}.csv", newline="") as file:
            values.append(float(list(csv.DictReader(file))[-1]["target_acc_ensemble"]))
    return values


def _status(out: Path, capsys: pytest.CaptureFixture) -> dict[str, str]:
    capsys.readouterr()
    assert sweep.main(["status", str(out)]) == 0
    return dict(line.split(": ", 1) for line in capsys.readouterr().out.splitlines())


def test_a_killed_sweep_relaunched_finishes_without_redoing_and_tabulates_the_last_epochs(digits_root, tmp_path, capsys):
    out = tmp_path / "sweep"
    first, second = out / JOBS[0], out / JOBS[1]
    launcher = subprocess.Popen(_launch(digits_root, out, epochs=3), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                cwd=tmp_path, start_new_session=True)
    deadline = time.monotonic() + 300
    while not ((first / "results_summary.csv").exists() and (second / "results_seed1.pt").exists()):
        assert launcher.poll() is None and time.monotonic() < deadline, "the sweep ended or stalled before the kill"
        time.sleep(0.05)
    os.killpg(launcher.pid, signal.SIGKILL)  # the launcher, its submitit job and the main.py under it
    launcher.wait()
    # wait() covers the launcher only: the main.py under it dies (and the kernel lets go of its lock) a
    # moment later, so the status may say "running" until then.
    deadline = time.monotonic() + 30
    while (states := _status(out, capsys))[JOBS[1]].startswith("running") and time.monotonic() < deadline:
        time.sleep(0.05)
    finished = {path: path.read_bytes() for path in first.iterdir() if path.suffix in (".csv", ".pt", ".json")}
    assert states[JOBS[0]] == "done" and states[JOBS[1]].startswith(("failed", "not started")), states

    again = subprocess.run(_launch(digits_root, out, epochs=3), capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "1 done already, 1 to run" in again.stdout
    assert {path: path.read_bytes() for path in finished} == finished  # the finished job was not run again
    log = (second / "main.log").read_text()
    assert "resuming after epoch" in log or "already holds all 3 epochs" in log  # continued, not restarted
    assert _status(out, capsys) == {job: "done" for job in JOBS}
    with open(out / "table.csv", newline="") as file:
        table = {row["method"]: row for row in csv.DictReader(file)}
    for method, job in zip(("mcd", "source_only"), JOBS):
        values = _last_rows(out / job)  # each seed's LAST epoch, straight from its CSV
        row = table[method]
        assert row["pair"] == "mnist→usps" and row["n"] == "2" and row["complete"] == "True"
        assert float(row["mean"]) == pytest.approx(statistics.fmean(values), abs=1e-3)
        assert float(row["std"]) == pytest.approx(statistics.stdev(values), abs=1e-3)
    markdown = (out / "table.md").read_text()
    assert "| method | mnist→usps |" in markdown and markdown.count("(n=2)") == 2 and "incomplete" not in markdown
    done = subprocess.run(_launch(digits_root, out, epochs=3), capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0 and "2 done already, 0 to run" in done.stdout


def test_a_failed_job_shows_its_last_log_line(tmp_path, capsys):
    out = tmp_path / "sweep"
    done = subprocess.run(_launch(tmp_path / "no-data", out, methods=("mcd",)), capture_output=True, text=True,
                          timeout=600, cwd=tmp_path)
    assert done.returncode == 1
    states = _status(out, capsys)
    assert list(states) == [JOBS[0]] and states[JOBS[0]].startswith("failed: error: ") and "--no-download" in states[JOBS[0]]
    assert "–" in (out / "table.md").read_text()  # no value, no average made up


def test_flags_the_grid_sets_are_refused(tmp_path, capsys):
    with pytest.raises(SystemExit, match="the sweep sets these per job"):
        sweep.main(["launch", "--out", str(tmp_path), "--csv", "x.csv"])
    with pytest.raises(SystemExit, match="sweep.json does not exist"):
        sweep.main(["status", str(tmp_path / "nothing")])


def test_slurm_parameters_are_built_without_a_cluster(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 0\n")  # submitit looks for srun before it builds anything
    (bin_dir / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    args = argparse.Namespace(time=90, gpus_per_job=2, mem=48.0, partition="gpu-h100", array_parallelism=6)
    executor = sweep.slurm_executor(tmp_path, args)
    assert executor.cluster == "slurm"
    script = executor._executor._make_submission_file_text("python -m submitit.core._submit", "uid")
    for line in ("#SBATCH --partition=gpu-h100", "#SBATCH --gpus-per-node=2", "#SBATCH --mem=48GB",
                 "#SBATCH --time=90", "#SBATCH --job-name=mcd-sweep"):
        assert line in script
    assert executor._executor.parameters["array_parallelism"] == 6
