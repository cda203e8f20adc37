"""sweep.py --launcher slurm on a real Slurm (.ci/slurm-start in CI): real jobs through submitit on fixture data,
cancelled, preempted (scontrol requeue) and past their time limit, each continuing to the CSV of an
uninterrupted run; status as Slurm reports it, also while its daemons are down; sbatch's refusals."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import pytest

from conftest import ROOT, read_rows

pytestmark = [pytest.mark.slow, pytest.mark.slurm]
RESULTS = "results_seed1.csv"
SLURM = ["--launcher", "slurm", "--gpus-per-job", "0", "--mem", "1", "--time", "30"]


def _flags(data_root: Path, epochs: int, iterations: int = 10) -> list[str]:
    return ["--data-root", str(data_root), "--allow-unverified-data", "--no-download", "--device", "cpu",
            "--epochs", str(epochs), "--iters-per-epoch", str(iterations), "--batch-size", "8", "--num-k", "1", "--deterministic"]


# One thread per run (Slurm's tasks inherit it): several torch processes on a small machine, each with a
# thread per core, slow each other down many times over.
ONE_THREAD = dict(os.environ, OMP_NUM_THREADS="1")


def _sweep(*args: object, timeout: float = 300, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "sweep.py"), *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd, env=ONE_THREAD)


def _slurm(*args: str) -> str:
    done = subprocess.run(list(args), capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, f"{' '.join(args)}: {done.stderr}"
    return done.stdout.strip()


def _until(condition: Callable[[], bool], what: str, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"waited {timeout} s for {what}"
        time.sleep(1)


def _states(out: Path) -> dict[str, str]:
    done = _sweep("status", out)
    assert done.returncode == 0, done.stderr
    return {name: state.rsplit(" [", 1)[0] for name, state in (line.split(": ", 1) for line in done.stdout.splitlines())}


def _rows_without_time(csv_path: Path) -> list[dict[str, str]]:
    return [{key: value for key, value in row.items() if key != "seconds"} for row in read_rows(csv_path)]


def _epochs_written(csv_path: Path) -> int:
    return len(csv_path.read_text().splitlines()) - 1 if csv_path.exists() else 0


def test_a_grid_runs_on_slurm_and_status_shows_what_slurm_says(slurm, digits_root, tmp_path):
    out = tmp_path / "sweep"
    done = _sweep("launch", "--out", out, "--pairs", "mnist:usps", "--methods", "mcd", "source_only", "--seeds", "1-2",
                  "--wait", *SLURM, *_flags(digits_root, 2), cwd=tmp_path)  # launched from outside the project
    assert done.returncode == 0, done.stdout + done.stderr
    assert "submitted: mnist_usps_mcd as " in done.stdout and ": running (" in done.stdout  # progress as it goes
    assert done.stdout.count(": done") == 2 and (out / "table.md").read_text().count("(n=2)") == 2
    assert _states(out) == {"mnist_usps_mcd": "done", "mnist_usps_source_only": "done"}

    # A job that fails inside main.py: Slurm says FAILED, status shows main.py's own last line.
    empty = tmp_path / "no-data"
    empty.mkdir()
    assert _sweep("launch", "--out", out, "--pairs", "usps:mnist", "--methods", "source_only", "--seeds", "1",
                  *SLURM, *_flags(digits_root, 2), "--data-root", empty).returncode == 0
    _until(lambda: _states(out)["usps_mnist_source_only"].startswith("failed"), "the failing job to fail")
    state = _states(out)["usps_mnist_source_only"]
    assert state.startswith("failed (Slurm job ") and ": FAILED): error: " in state and "--no-download" in state


def test_cancelled_preempted_and_timed_out_jobs_each_continue_to_the_uninterrupted_csv(slurm, digits_root, tmp_path):
    """The same job in three sweeps, each meeting one of Slurm's stops after its first epoch."""
    flags = _flags(digits_root, 150, 5)  # long enough to meet Slurm's time-limit check, which comes every 30 s
    sweeps = {fault: tmp_path / fault for fault in ("cancelled", "preempted", "timed_out")}

    def launch(out: Path, *extra: str) -> subprocess.CompletedProcess:
        return _sweep("launch", "--out", out, "--pairs", "mnist:usps", "--methods", "mcd", "--seeds", "1", *SLURM,
                      *flags, *extra, timeout=600)

    # The uninterrupted run to compare with, meanwhile (it fills the cores while the jobs wait on Slurm).
    reference = tmp_path / "reference.csv"
    uninterrupted = subprocess.Popen([sys.executable, str(ROOT / "main.py"), "--source", "mnist", "--target", "usps",
                                      "--method", "mcd", "--seed", "1", "--csv", str(reference), *flags], cwd=ROOT,
                                     env=ONE_THREAD, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    assert all(launch(out).returncode == 0 for out in sweeps.values())
    ids = {fault: json.loads((out / "slurm.json").read_text())["mnist_usps_mcd"] for fault, out in sweeps.items()}
    csvs = {fault: out / "mnist_usps_mcd" / RESULTS for fault, out in sweeps.items()}
    _until(lambda: all(_epochs_written(path) >= 1 for path in csvs.values()), "an epoch of each job")

    def requeued(job_id: str, *restore: str) -> None:
        """Slurm holds a requeued job back two minutes (its BeginTime): released at once here."""
        _until(lambda: _slurm("squeue", "-h", "-j", job_id, "-o", "%T").startswith("PENDING"), f"{job_id} requeued")
        _slurm("scontrol", "update", f"JobId={job_id}", "StartTime=now", *restore)

    # First the time limit (Slurm checks limits every 30 s): within submitit's 90 s, Slurm sends SIGUSR2.
    _slurm("scontrol", "update", f"JobId={ids['timed_out']}", "TimeLimit=1")
    requeued(ids["timed_out"], "TimeLimit=30")
    _slurm("scancel", ids["cancelled"])
    _slurm("scontrol", "requeue", ids["preempted"])  # what preemption does: SIGTERM, then the job queued again
    requeued(ids["preempted"])
    _until(lambda: _states(sweeps["cancelled"])["mnist_usps_mcd"].startswith("cancelled"), "the cancelled state")
    assert _states(sweeps["cancelled"])["mnist_usps_mcd"].startswith(f"cancelled (Slurm job {ids['cancelled']}: CANCELLED")

    again = launch(sweeps["cancelled"], "--wait")  # the same command continues it
    assert again.returncode == 0, again.stdout + again.stderr
    _until(lambda: all(_states(out)["mnist_usps_mcd"] == "done" for out in sweeps.values()), "every job done")
    logs = {fault: (path.parent / "main.log").read_text() for fault, path in csvs.items()}
    said = {fault: [line for line in log.splitlines() if line.startswith(("== Slurm job", "interrupted by"))]
            for fault, log in logs.items()}
    assert "interrupted by SIGTERM" in logs["cancelled"] and logs["cancelled"].count("== Slurm job") == 2, said
    assert "interrupted by SIGTERM" in logs["preempted"] and f"== Slurm job {ids['preempted']} on" in logs["preempted"], said
    assert "interrupted by SIGUSR2" in logs["timed_out"], said  # main.py's state was written before the requeue
    assert "restart 1" in logs["preempted"] and "restart 1" in logs["timed_out"], said

    assert uninterrupted.wait(timeout=600) == 0, uninterrupted.stderr.read()
    for fault, path in csvs.items():
        assert _rows_without_time(path) == _rows_without_time(reference), fault


def _daemon_pid(name: str) -> int:
    """The PID of one of .ci/slurm-start's daemons (its pid file, named in SLURM_CONF's folder)."""
    conf = Path(os.environ.get("SLURM_CONF", "/etc/slurm/slurm.conf"))
    pid_file = conf.parent / "run" / f"{name}.pid"
    if not (conf.parent / "pids").exists() or not pid_file.exists():
        pytest.skip("a cluster not started by .ci/slurm-start: its daemons are not this test's to stop")
    return int(pid_file.read_text())


def _stop(pid: int) -> None:
    os.kill(pid, signal.SIGTERM)
    _until(lambda: not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2],
           f"pid {pid} to stop", 30)


def test_status_while_slurms_daemons_restart(slurm, digits_root, tmp_path):
    out = tmp_path / "sweep"
    assert _sweep("launch", "--out", out, "--pairs", "mnist:usps", "--methods", "source_only", "--seeds", "1",
                  *SLURM, *_flags(digits_root, 400)).returncode == 0
    csv_path = out / "mnist_usps_source_only" / "results_seed1.csv"
    _until(lambda: _epochs_written(csv_path) >= 1, "the job's first epoch")

    _stop(_daemon_pid("slurmctld"))  # the controller down: accounting still answers, and the job runs on
    assert _states(out)["mnist_usps_source_only"].startswith("running (")
    _stop(_daemon_pid("slurmdbd"))  # accounting down too: one warning, the states from the jobs' files
    done = _sweep("status", out)
    assert done.returncode == 0 and done.stderr.count("\n") == 1 and "sacct failed" in done.stderr
    assert "mnist_usps_source_only: running (pid " in done.stdout

    subprocess.run(["slurmdbd"], check=True, timeout=60)
    subprocess.run(["slurmctld"], check=True, timeout=60)  # recovers its saved state: the job is still known
    _until(lambda: subprocess.run(["sinfo"], capture_output=True).returncode == 0, "the controller")
    _until(lambda: _states(out)["mnist_usps_source_only"].startswith("running (pid "), "Slurm's state again")
    assert "; Slurm job " in _states(out)["mnist_usps_source_only"]  # Slurm's word is back beside the lock's
    _slurm("scancel", json.loads((out / "slurm.json").read_text())["mnist_usps_source_only"])
    _until(lambda: _states(out)["mnist_usps_source_only"].startswith("cancelled (Slurm job "), "the cancelled state")


@pytest.mark.parametrize("flags, named", [(["--partition", "no-such-partition"], "--partition"),
                                          (["--time", "100000"], "--time"),
                                          (["--mem", "100000"], "--mem")])
def test_sbatch_refusals_are_one_line_naming_the_flag(slurm, digits_root, tmp_path, flags, named):
    options = dict(zip(SLURM[::2], SLURM[1::2]))
    options.update(zip(flags[::2], flags[1::2]))
    done = _sweep("launch", "--out", tmp_path / "sweep", "--pairs", "mnist:usps", "--methods", "mcd", "--seeds", "1",
                  *(token for pair in options.items() for token in pair), *_flags(digits_root, 1))
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert "sbatch refused the jobs" in done.stderr and f"check {named}," in done.stderr
    assert not (tmp_path / "sweep" / "slurm.json").exists()


def test_a_full_disk_under_the_sweep_is_one_line(slurm, digits_root, tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("mounting a small tmpfs needs root")
    try:
        (disk / "filler").write_bytes(b"x" * (64 - 8) * 1024)  # room for the manifest, not for submitit's files
        done = _sweep("launch", "--out", disk / "sweep", "--pairs", "mnist:usps", "--methods", "mcd", "--seeds", "1",
                      *SLURM, *_flags(digits_root, 1))
        assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
        assert "No space left on device" in done.stderr and "free some space or choose another --out" in done.stderr
        assert not (disk / "sweep" / "slurm.json").exists()
    finally:
        subprocess.run(["umount", str(disk)], check=True)
