"""sweep.py: a grid of main.py runs through submitit's local executor, relaunchable, and its table."""

from __future__ import annotations

import csv
import os
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import launchers
import sweep

ROOT = Path(__file__).resolve().parents[1]
JOBS = ("mnist_usps_mcd", "mnist_usps_source_only")


def _launch(data_root: Path, out: Path, *extra: str, epochs: int = 2, methods: tuple[str, ...] = ("mcd", "source_only")
            ) -> list[str]:
    return [sys.executable, str(ROOT / "sweep.py"), "launch", "--out", str(out), "--pairs", "mnist:usps",
            "--methods", *methods, "--seeds", "1-2", "--gpus", "0", "--wait",
            "--data-root", str(data_root), "--allow-unverified-data", "--no-download", "--device", "cpu",
            "--epochs", str(epochs), "--iters-per-epoch", "2", "--batch-size", "8", "--num-k", "1",
            "--checkpoint-every", "0", *extra]  # a state after every epoch: what is killed continues from one


def _last_rows(folder: Path) -> list[float]:
    values = []
    for seed in (1, 2):
        with open(folder / f"results_seed{seed}.csv", newline="") as file:
            values.append(float(list(csv.DictReader(file))[-1]["target_acc_ensemble"]))
    return values


def _status(out: Path, capsys: pytest.CaptureFixture) -> dict[str, str]:
    """Each job's state (what it was made with, in brackets after it, left out)."""
    capsys.readouterr()
    assert sweep.main(["status", str(out)]) == 0
    return {name: state.rsplit(" [", 1)[0] for name, state in
            (line.split(": ", 1) for line in capsys.readouterr().out.splitlines())}


def _processes_of(out: Path) -> list[int]:
    """Every process of the sweep: launcher, workers and runs all name `out` on their command line."""
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if str(out) in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace"):
                pids.append(int(pid))
        except OSError:  # gone meanwhile
            pass
    return pids


def _wait_for_a_row(csv_path: Path, launcher: subprocess.Popen) -> None:
    """Until the run writing csv_path has finished an epoch (its training state is written only when it stops)."""
    deadline = time.monotonic() + 300
    while not (csv_path.exists() and len(csv_path.read_text().splitlines()) > 1):
        assert launcher.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)


def _kill_everything_of(out: Path) -> None:
    """SIGKILL to every process of the sweep, as a crash would."""
    for pid in _processes_of(out):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.mark.slow
def test_a_killed_sweep_relaunched_finishes_without_redoing_and_tabulates_the_last_epochs(digits_root, tmp_path, capsys):
    out = tmp_path / "sweep"
    first, second = out / JOBS[0], out / JOBS[1]
    launcher = subprocess.Popen(_launch(digits_root, out, epochs=3), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                cwd=tmp_path, start_new_session=True)
    deadline = time.monotonic() + 300
    while not ((first / "results_summary.csv").exists() and (second / "results_seed1.pt").exists()):
        assert launcher.poll() is None and time.monotonic() < deadline, "the sweep ended or stalled before the kill"
        time.sleep(0.05)
    _kill_everything_of(out)  # the launcher, its worker and the main.py under it
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
    capsys.readouterr()
    assert sweep.main(_launch(digits_root, out, epochs=3)[2:]) == 0  # nothing to run: no process started
    assert "2 done already, 0 to run" in capsys.readouterr().out

    # A job is its whole command: another result setting is refused, naming it, and nothing changes.
    manifest = (out / "sweep.json").read_bytes()
    assert sweep.main(_launch(digits_root, out, "--lr", "0.1", epochs=3)[2:]) == 2
    assert "lr 0.0002 -> 0.1" in capsys.readouterr().err
    assert (out / "sweep.json").read_bytes() == manifest
    # A moved sweep reports its own files: sweep.json's paths are relative to its folder.
    moved = tmp_path / "moved"
    out.rename(moved)
    assert _status(moved, capsys) == {job: "done" for job in JOBS}
    moved.rename(out)
    # More seeds for one method extend that job (seed 3 trains); the other job stays in the table.
    more = _launch(digits_root, out, epochs=3, methods=("mcd",))
    more[more.index("1-2")] = "1-3"
    extended = subprocess.run(more, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert extended.returncode == 0 and "1 jobs, 0 done already, 1 to run" in extended.stdout, extended.stdout
    with open(out / "table.csv", newline="") as file:
        table = {row["method"]: row for row in csv.DictReader(file)}
    assert (table["mcd"]["n"], table["mcd"]["complete"], table["source_only"]["n"]) == ("3", "True", "2")


@pytest.mark.slow
def test_a_failed_job_shows_its_last_log_line(tmp_path, capsys):
    out = tmp_path / "sweep"
    done = subprocess.run(_launch(tmp_path / "no-data", out, methods=("mcd",)), capture_output=True, text=True,
                          timeout=600, cwd=tmp_path)
    assert done.returncode == 1
    states = _status(out, capsys)
    assert list(states) == [JOBS[0]] and states[JOBS[0]].startswith("failed: error: ") and "--no-download" in states[JOBS[0]]
    assert "–" in (out / "table.md").read_text()  # no value, no average made up


def test_flags_the_grid_sets_are_refused(tmp_path, capsys):
    assert sweep.main(["launch", "--out", str(tmp_path), "--csv", "x.csv"]) == 2
    assert "the sweep sets these per job" in capsys.readouterr().err
    assert sweep.main(["status", str(tmp_path / "nothing")]) == 2
    assert "sweep.json does not exist" in capsys.readouterr().err


def test_slurm_parameters_are_built_without_a_cluster(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 0\n")  # submitit looks for srun before it builds anything
    (bin_dir / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    executor = launchers.executor(tmp_path, 90, 2, 48.0, "gpu-h100", 6)
    assert executor.cluster == "slurm"
    script = executor._executor._make_submission_file_text("python -m submitit.core._submit", "uid")
    for line in ("#SBATCH --partition=gpu-h100", "#SBATCH --gpus-per-node=2", "#SBATCH --mem=48GB",
                 "#SBATCH --time=90", "#SBATCH --job-name=mcd-sweep",
                 f"#SBATCH --signal=USR2@{launchers.SIGNAL_DELAY_S}"):  # what main.py saves its state on
        assert line in script
    assert executor._executor.parameters["array_parallelism"] == 6
    cpu_only = launchers.executor(tmp_path, 90, 0, 1.0, None, 6)._executor._make_submission_file_text("x", "uid")
    assert "--gpus" not in cpu_only and "--partition" not in cpu_only


def test_abbreviated_or_grid_flags_never_pass_through(tmp_path, capsys):
    out = tmp_path / "sweep"
    for flags, shown in ((["--meth", "source_only"], "--meth"), (["--cs", "x.csv"], "--cs"), (["--seed", "3"], "--seed")):
        with pytest.raises(SystemExit) as exit_info:  # main.py's parser reads them: one line, exit 2
            code = sweep.main(["launch", "--out", str(out), "--pairs", "mnist:usps", "--gpus", "0", *flags])
            raise SystemExit(code)
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and shown in err and err.count("\n") == 1, err
    assert not (out / "sweep.json").exists()
    with pytest.raises(SystemExit) as exit_info:
        import main as main_module

        main_module.main(["--meth", "source_only"])  # no entry point takes abbreviations
    assert exit_info.value.code == 2


def _job_with_a_corrupt_record(out: Path, record: str = "{") -> None:
    (out / "mnist_usps_mcd").mkdir(parents=True)
    sweep.save_jobs(out, [sweep.Job("mnist_usps_mcd", "mnist", "usps", "mcd", ["1"])])
    (out / "mnist_usps_mcd" / "results_seed1.json").write_text(record)


@pytest.mark.parametrize(("setup", "argv", "shown"), [
    (lambda out: out.write_text("x"), ["launch", "--out", "OUT"], "is a file"),
    (lambda out: (out.mkdir(), (out / "sweep.json").write_text("{not json")), ["status", "OUT"], "not a sweep manifest"),
    (lambda out: (out.mkdir(), (out / "sweep.json").write_bytes(b"\xff\xfe\x00")), ["table", "OUT"], "not a sweep manifest"),
    (_job_with_a_corrupt_record, ["table", "OUT"], "is not a results record"),
    (lambda out: _job_with_a_corrupt_record(out, '{"epochs_completed": 99, "final_row": {"epoch": 99}}'),
     ["table", "OUT"], "final_row.target_acc_ensemble is None, not a finite number"),
    (None, ["launch", "--out", "OUT", "--time", "0"], "--time"),
    (None, ["launch", "--out", "OUT", "--gpus", "-1"], "--gpus"),
    (None, ["launch", "--out", "OUT", "--seeds", "1-"], "--seeds"),
    (None, ["launch", "--out", "OUT", "--mem", "nan"], "--mem"),
    (None, ["launch", "--out", "OUT", "--seeds", "1-99999999999"], "seeds must be between"),
    (lambda out: (out.mkdir(), (out / "sweep.json").write_text('{"jobs": [{"name": "a_b_mcd", "source": "mnist", '
                                                                '"target": "usps", "method": "mcd", "seeds": 3}]}')),
     ["status", "OUT"], "seeds of 'a_b_mcd' not as the sweep writes it"),
    (lambda out: (out.mkdir(), (out / "sweep.json").write_text('{"jobs": [{"name": "a_b_mcd", "source": "mnist", '
                                                                '"target": "usps", "method": "mcd", "seeds": ["3"], '
                                                                '"epochs": "ten"}]}')),
     ["status", "OUT"], "epochs of 'a_b_mcd' not as the sweep writes it"),
    (None, ["launch", "--out", "OUT", "--pairs", "svhn:mnist", "--small-subsets"], "--small-subsets is the paper's"),
    (lambda out: _job_with_a_corrupt_record(out, '{"epochs_completed": 99, "final_row": {"target_acc_ensemble": "95.1"}}'),
     ["table", "OUT"], "final_row.target_acc_ensemble is '95.1', not a finite number"),
    (lambda out: _job_with_a_corrupt_record(out, '{"epochs_completed": 99, "final_row": {"target_acc_ensemble": Infinity}}'),
     ["table", "OUT"], "final_row.target_acc_ensemble is inf, not a finite number"),
    (lambda out: (_job_with_a_corrupt_record(out, '{"epochs_completed": 99, "final_row": {"target_acc_ensemble": 90}}'),
                  (out / "mnist_usps_mcd" / "results_seed1_selection.csv").write_text(
                      "validator,epoch,target_acc_ensemble\nval_im,1,inf\n")),
     ["table", "OUT", "--validator", "val_im"], "is not a selection file"),
    (lambda out: (out.mkdir(), sweep.save_jobs(out, [sweep.Job("mnist_usps_mcd", "mnist", "usps", "mcd", ["1-2"])])),
     ["launch", "--out", "OUT", "--pairs", "mnist:usps", "--methods", "mcd", "--seeds", "3", "--gpus", "0"],
     "seeds 1-2 -> 3 (drops 1, 2)"),
])
def test_bad_sweep_input_is_one_line_exit_2(tmp_path, capsys, setup, argv, shown):
    out = tmp_path / "sweep"
    if setup:
        setup(out)
    try:
        code = sweep.main([str(out) if arg == "OUT" else arg for arg in argv])
    except SystemExit as exit_info:  # argparse's errors
        code = exit_info.code
    err = capsys.readouterr().err
    assert code == 2 and shown in err and err.count("\n") == 1, err


def test_each_job_gets_its_own_tensorboard_folder_given_where_the_sweep_is_launched(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    flags = sweep.checked_flags(["--tensorboard", "tb", "--epochs", "3"])
    jobs = sweep.expand_grid(["mnist:usps"], ["mcd", "dann"], ["1-2"], flags)
    folders = [job.argv(tmp_path / "sweep")[job.argv(tmp_path / "sweep").index("--tensorboard") + 1] for job in jobs]
    assert folders == [str(tmp_path / "tb" / "mnist_usps_mcd"), str(tmp_path / "tb" / "mnist_usps_dann")]


def test_a_refused_slurm_submission_is_one_line(tmp_path, monkeypatch, capsys):
    class Refusing:
        def map_array(self, *args):
            raise subprocess.CalledProcessError(1, ["sbatch"], output=b"sbatch: error: invalid partition specified: gpu")

    monkeypatch.setattr(launchers, "executor", lambda *args: Refusing())
    code = sweep.main(["launch", "--out", str(tmp_path / "sweep"), "--pairs", "mnist:usps", "--methods", "mcd",
                       "--launcher", "slurm", "--seeds", "1"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "sbatch refused the jobs" in err and "check --partition," in err


def test_slurm_not_installed_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PATH", str(tmp_path))  # no srun, sbatch or sacct here
    code = sweep.main(["launch", "--out", str(tmp_path / "sweep"), "--pairs", "mnist:usps", "--methods", "mcd",
                       "--launcher", "slurm", "--seeds", "1"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "Run this on the cluster, or use --launcher local" in err, err


CHILD_WRITING_ITS_STATE = """
import signal, sys, time
from pathlib import Path
def stop(signum, frame):
    time.sleep(1)  # writing the training state
    Path(sys.argv[1]).write_text("state")
    sys.exit(128 + signum)
signal.signal(signal.SIGUSR2, stop)
Path(sys.argv[2]).write_text("ready")
time.sleep(60)
"""


@pytest.mark.skipif(not hasattr(signal, "SIGUSR2"), reason="Slurm's time-limit signal is POSIX's")
def test_a_slurm_time_limit_requeues_only_after_main_py_has_written_its_state(tmp_path):
    """Slurm signals the task, submitit calls checkpoint() and then requeues (SIGTERM to everything). So the
    checkpoint hook, run in the middle of the task's wait on main.py, returns only once main.py has exited."""
    task, state, ready = launchers.SweepTask(), tmp_path / "state", tmp_path / "ready"
    task.process = subprocess.Popen([sys.executable, "-c", CHILD_WRITING_ITS_STATE, str(state), str(ready)])
    deadline = time.monotonic() + 30
    while not ready.exists():
        assert time.monotonic() < deadline, "the child never installed its handler"
        time.sleep(0.05)
    seen: dict[str, object] = {}

    def submitit_handler(signum, frame):
        seen["resubmission"] = task.checkpoint(["--epochs", "3"], "main.log")
        seen["state when requeued"] = state.exists()
        raise SystemExit(-1)  # as submitit exits after requeueing

    previous = signal.signal(signal.SIGUSR2, submitit_handler)
    try:
        threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGUSR2)).start()  # Slurm's signal, to the task
        with pytest.raises(SystemExit):
            task.process.wait()  # holds Popen's reaping lock, as SweepTask.__call__ does
    finally:
        signal.signal(signal.SIGUSR2, previous)
    assert seen["state when requeued"] is True
    assert task.process.wait(timeout=10) == 128 + signal.SIGUSR2
    assert seen["resubmission"].args == (["--epochs", "3"], "main.log")


def test_main_refuses_a_huge_seed_range_at_once(capsys):
    import main as main_module

    with pytest.raises(SystemExit) as exit_info:
        main_module.main(["--seeds", "1-99999999999"])  # checked before any list is made: no MemoryError
    assert exit_info.value.code == 2 and "seeds must be between" in capsys.readouterr().err


@pytest.mark.slow
def test_workers_take_jobs_from_one_queue_k_per_gpu(digits_root, tmp_path, capsys):
    out = tmp_path / "sweep"
    command = _launch(digits_root, out, epochs=1, methods=("mcd", "source_only", "dann")) + ["--jobs-per-gpu", "2"]
    command[command.index("--gpus") + 1] = "2"  # two pretend GPUs (the runs stay on the CPU: --device cpu)
    command[command.index("1-2")] = "1"
    command[command.index("--out") + 1] = "sweep"  # relative to the launcher's folder (the workers start elsewhere)
    command[command.index("--data-root") + 1] = os.path.relpath(digits_root, tmp_path)  # so is the data's
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "started 3 worker(s)" in done.stdout and "on GPUs 0, 0, 1" in done.stdout  # --jobs-per-gpu 2, 3 jobs
    progress = [line.split(" ", 1)[1] for line in done.stdout.splitlines() if re.match(r"\d\d:\d\d:\d\d ", line)]
    for job in ("mnist_usps_mcd", "mnist_usps_source_only", "mnist_usps_dann"):  # --wait says as each job ends
        assert f"{job}: done" in progress, done.stdout
    workers = {}
    for folder in out.iterdir():
        if folder.is_dir() and not folder.name.startswith("."):
            lines = [line for line in (folder / "main.log").read_text().splitlines() if line.startswith("== sweep worker")]
            assert len(lines) == 1, folder  # each job ran once
            workers.setdefault(lines[0], []).append(folder.name)  # "== sweep worker PID on GPU N"
    assert len(workers) >= 2 and sum(map(len, workers.values())) == 3  # several workers had work
    assert {line.split(" on ")[1] for line in workers} <= {"GPU 0", "GPU 1"}
    assert set(_status(out, capsys).values()) == {"done"}


@pytest.mark.slow
def test_ctrl_c_stops_the_whole_sweep_and_each_run_keeps_its_checkpoint(digits_root, tmp_path):
    out = tmp_path / "sweep"
    launcher = subprocess.Popen(_launch(digits_root, out, epochs=50), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, cwd=tmp_path)
    first = out / JOBS[0]
    _wait_for_a_row(first / "results_seed1.csv", launcher)
    launcher.send_signal(signal.SIGINT)  # what Ctrl-C sends to the launcher
    _, err = launcher.communicate(timeout=120)
    assert launcher.returncode == 130 and "relaunch the same command to continue" in err, err
    time.sleep(0.5)
    assert not _processes_of(out)  # no worker, no run left behind
    assert not (out / JOBS[1] / "main.log").exists()  # the next job never started
    log = (first / "main.log").read_text()
    assert "interrupted by SIGINT" in log and "--resume" in log and (first / "results_seed1.pt").exists()


@pytest.mark.slow
def test_a_killed_worker_has_its_run_stopped_and_the_message_says_so(digits_root, tmp_path):
    out = tmp_path / "sweep"
    launcher = subprocess.Popen(_launch(digits_root, out, epochs=50), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, cwd=tmp_path)
    lines = [launcher.stdout.readline(), launcher.stdout.readline()]  # "N jobs, ...", "started 1 worker(s): pids PID"
    worker = int(lines[1].split("pids ")[-1].split()[0])
    first = out / JOBS[0]
    _wait_for_a_row(first / "results_seed1.csv", launcher)
    os.kill(worker, signal.SIGKILL)  # the worker dies; its main.py would run on alone
    _, err = launcher.communicate(timeout=120)
    assert launcher.returncode == 2 and "was killed; its run was sent SIGTERM" in err and err.count("\n") == 1, err
    deadline = time.monotonic() + 60
    while _processes_of(out) and time.monotonic() < deadline:  # the run saves what it has and goes
        time.sleep(0.1)
    assert not _processes_of(out)
    log = (first / "main.log").read_text()
    assert "interrupted by SIGTERM" in log and (first / "results_seed1.pt").exists()


def test_launch_help_gives_every_default_and_a_passed_through_main_flag(capsys):
    with pytest.raises(SystemExit) as exit_info:
        sweep.main(["launch", "--help"])
    shown = " ".join(capsys.readouterr().out.split())
    assert exit_info.value.code == 0
    for default in ("(default: ['svhn:mnist'])", "(default: ['mcd', 'source_only'])", "(default: ['1-5'])",
                    "(default: local)", "(default: 1440)", "(default: 32)", "(default: 64)"):
        assert default in shown, default
    assert "Every other flag is main.py's and goes to every job" in shown and "--epochs 10" in shown
