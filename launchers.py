"""Where a sweep's jobs run (sweep.py --launcher): local worker processes on one queue, or a Slurm array job
through submitit whose tasks survive cancellation, preemption and time limits; each Slurm job's state as
Slurm's accounting reports it. Each job is a main.py command line and its log; this module knows nothing else.

Local: `python launchers.py QUEUE [GPU]` is one worker; it takes the next job of the queue (a JSON list of
{name, argv, log}) that no other worker has taken, runs it, and goes on until none is left.

Slurm: a task runs one job's main.py (with --resume) and keeps its log. Slurm stops a job with a signal: SIGTERM
when it is cancelled or requeued (preemption), SIGUSR2 `SIGNAL_DELAY_S` before its time limit (submitit
asks for that one; it reaches this task, which passes it on). main.py writes its training state on either and
exits. On SIGUSR2 submitit calls `SweepTask.checkpoint`, which waits for main.py's state, and requeues the task;
a requeued task is the same main.py again, which continues from that state. `states` asks `sacct` (no torch,
no submitit) what became of each job id.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
SIGNAL_DELAY_S = 90  # submitit's: SIGUSR2 this long before the time limit
# Slurm's states of a job that is not over (sacct's spelling); everything else has ended.
WAITING = {"PENDING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "RESIZING", "SUSPENDED", "CONFIGURING",
           "COMPLETING", "SIGNALING", "STAGE_OUT", "STOPPED"}
# sbatch's refusals, by the words of its message, and the sweep flag that set what it refused
REFUSALS = ((("partition",), "--partition"), (("time limit",), "--time"), (("memory", "mem-per"), "--mem"),
            (("gres", "gpu"), "--gpus-per-job"))
STATE_WRITE_S = SIGNAL_DELAY_S - 30  # how long a time-limited main.py may take to write its state before the requeue
LINGER_S = 600  # a task whose run Slurm stopped waits at most this long to be killed (KillWait is far shorter)


def start_run(argv: list[str], log: str, gpu: int | None = None, note: str = "") -> subprocess.Popen:
    """main.py with `argv`, on `gpu` (all visible devices when None), its output appended to `log` after `note`."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", **({"CUDA_VISIBLE_DEVICES": str(gpu)} if gpu is not None else {}))
    Path(log).parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as file:
        if note:
            file.write(note + "\n")
            file.flush()
        return subprocess.Popen([sys.executable, str(ROOT / "main.py"), *argv], stdout=file, stderr=subprocess.STDOUT,
                                env=env, cwd=ROOT)


def pass_on(processes: list[subprocess.Popen], signum: int) -> None:
    if sys.platform != "win32":  # on Windows, a console's Ctrl-C has reached every process in it already
        for process in processes:
            process.send_signal(signum)


def work(queue: Path, gpu: int | None) -> int:
    """One local worker: takes the next job of the queue that no worker has taken (an exclusive create of its
    claim file beside the queue, portable and atomic) and runs it, until none is left. A signal is passed on
    to the run and stops the worker; so does a run that was interrupted. Exit: 0, 1 if a run failed, or 128+signal."""
    stopped: list[int] = []
    running: list[subprocess.Popen] = []

    def stop(signum: int, frame) -> None:
        stopped.append(signum)
        pass_on(running, signum)

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, stop)
    failed = False
    for job in json.loads(queue.read_text(encoding="utf-8")):
        if stopped:
            break
        try:
            os.close(os.open(queue.parent / job["name"], os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:  # another worker has it
            continue
        where = f"GPU {gpu}" if gpu is not None else "the visible devices"
        running.append(start_run(job["argv"], job["log"], gpu, f"== sweep worker {os.getpid()} on {where}"))
        code = running[0].wait()
        running.clear()
        if code in (130, 143) or code < 0:  # the run was interrupted: so is the sweep
            stopped.append(code if code > 0 else 128 - code)
        failed |= code != 0
    return (stopped[0] if stopped[0] > 128 else 128 + stopped[0]) if stopped else int(failed)


class SlurmError(Exception):
    """Slurm could not be asked, or refused; the message is one line."""


class SweepTask:
    """One array task: main.py with `argv`, its output appended to `log`. Returns main.py's exit code 0; raises
    when main.py failed (submitit records the failure, sacct says FAILED). Picklable: submitit sends it."""

    process: subprocess.Popen | None = None

    def __call__(self, argv: list[str], log: str) -> int:
        restarts = os.environ.get("SLURM_RESTART_COUNT", "0")
        job = (f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}" if "SLURM_ARRAY_JOB_ID" in os.environ
               else os.environ.get("SLURM_JOB_ID", "?"))
        self.process = start_run(argv, log, note=f"== Slurm job {job} on {os.uname().nodename}, restart {restarts}")
        try:
            code = self.process.wait()
        except SystemExit:  # submitit is requeueing this task (checkpoint below): main.py finishes its state first
            self.process.wait()
            raise
        if code == 128 + signal.SIGTERM:
            # Slurm cancelled or requeued the job and kills this task within KillWait. Ending now would leave
            # submitit a result that says the job is over, even when Slurm is about to run it again.
            time.sleep(LINGER_S)
        if code != 0:
            raise RuntimeError(f"main.py exited with {code}; its log: {log}")
        return code

    def checkpoint(self, argv: list[str], log: str):
        """submitit's hook on SIGUSR2 (the time limit is near), before it requeues the job. Slurm signals this
        process, not main.py: the signal is passed on, and main.py is given until it has written its state and
        exited, since the requeue's SIGTERM would otherwise stop it with the wrong cause. The requeued task
        resumes."""
        import submitit

        if self.process is not None:
            self.process.send_signal(signal.SIGUSR2)  # a no-op once it has been reaped
            _until_exited(self.process.pid, STATE_WRITE_S)
        return submitit.helpers.DelayedSubmission(SweepTask(), argv, log)

    def __getstate__(self) -> dict:
        return {}  # the process is this task's own, never sent


def _until_exited(pid: int, timeout: float) -> None:
    """Waits until the child `pid` has exited (at most `timeout` s) without reaping it: the Popen.wait this
    signal interrupted holds Popen's reaping lock, and reaps it afterwards."""
    deadline = time.monotonic() + timeout
    try:
        while os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None and time.monotonic() < deadline:
            time.sleep(0.1)
    except ChildProcessError:  # reaped already
        pass


def executor(folder: Path, time_min: int, gpus: int, mem_gb: float, partition: str | None, parallelism: int):
    """submitit's Slurm executor for a sweep's array job; its logs under folder/submitit/JOBID."""
    import submitit

    try:
        slurm = submitit.AutoExecutor(folder=folder / "submitit" / "%j", cluster="slurm")
    except RuntimeError as error:  # submitit found no srun: not on a Slurm cluster
        raise SlurmError(f"--launcher slurm: {error} Run this on the cluster, or use --launcher local") from None
    slurm.update_parameters(name="mcd-sweep", timeout_min=time_min, mem_gb=mem_gb, slurm_partition=partition,
                            slurm_array_parallelism=parallelism, **({"gpus_per_node": gpus} if gpus else {}))
    return slurm


def submit(slurm, names: list[str], argvs: list[list[str]], logs: list[str]) -> dict[str, str]:
    """One array job of these tasks: name -> Slurm job id. sbatch's own messages (submitit lets it print
    them) are caught, so that a refusal is one line naming the flag to change."""
    # The tasks unpickle SweepTask wherever Slurm starts them: this folder must be on their path (sbatch
    # passes the environment on).
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    with tempfile.TemporaryFile() as said:
        sys.stderr.flush()
        stderr = os.dup(2)
        os.dup2(said.fileno(), 2)
        try:
            submitted = slurm.map_array(SweepTask(), argvs, logs)
            refusal = None
        except Exception as error:  # sbatch refused (partition, limits, ...): submitit raises its own
            refusal = error
        finally:
            os.dup2(stderr, 2)
            os.close(stderr)
        said.seek(0)
        printed = said.read().decode(errors="replace")
    if refusal is None:
        sys.stderr.write(printed)
        return {name: job.job_id for name, job in zip(names, submitted)}
    if isinstance(refusal, OSError):  # submitit writes its scripts and pickles into the sweep's folder first
        raise SlurmError(f"cannot write the Slurm submission into {refusal.filename or 'the sweep folder'} "
                         f"({refusal.strerror or refusal}); free some space or choose another --out, then relaunch")
    reason = _sbatch_errors(printed, refusal)
    named = [flag for words, flag in REFUSALS if any(word in reason.lower() for word in words)]
    raise SlurmError(f"--launcher slurm: sbatch refused the jobs ({reason[:300]}); check "
                     f"{named[0] if named else '--partition, --time, --mem and --gpus-per-job'}, then relaunch the "
                     "same command")


def _sbatch_errors(printed: str, refusal: Exception) -> str:
    """sbatch's own error lines, from what it printed or what submitit's exception holds, as one line."""
    text = "\n".join([printed, str(refusal), os.fsdecode(getattr(refusal, "output", b"") or b"")])
    lines = [line.split("sbatch: error: ", 1)[1].strip() for line in text.splitlines() if "sbatch: error: " in line]
    return "; ".join(dict.fromkeys(lines)) or (str(refusal).strip().splitlines() or [type(refusal).__name__])[-1]


def states(ids: list[str]) -> dict[str, str]:
    """Slurm's state of each job id (sacct, as submitit reads it: e.g. RUNNING, CANCELLED by 0, TIMEOUT)."""
    if not ids:
        return {}
    try:
        done = subprocess.run(["sacct", "-X", "-n", "-P", "-o", "JobID,State", "-j", ",".join(ids)],
                              capture_output=True, text=True, timeout=60)
    except FileNotFoundError:
        raise SlurmError("sacct is not installed here: run this where the sweep's Slurm is") from None
    except subprocess.TimeoutExpired:
        raise SlurmError("sacct did not answer in 60 s: Slurm's accounting is not reachable") from None
    if done.returncode != 0:
        raise SlurmError(f"sacct failed ({(done.stderr.strip().splitlines() or ['no message'])[-1]})")
    found = dict(line.split("|", 1) for line in done.stdout.splitlines() if "|" in line)
    return {job: found[job] for job in ids if job in found}


def waiting(state: str) -> bool:
    return state.split()[0] in WAITING


def log_tail(folder: Path, job_id: str, lines: int = 3) -> list[str]:
    """The last lines of submitit's error log of a Slurm job (what failed outside main.py)."""
    logs = sorted((folder / "submitit" / job_id).glob(f"{job_id}_*_log.err")) if job_id else []
    text = logs[-1].read_text(errors="replace").splitlines() if logs else []
    return [line for line in text if line.strip()][-lines:]


if __name__ == "__main__":  # a local worker, started by sweep.py launch: QUEUE [GPU]
    sys.exit(work(Path(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else None))
