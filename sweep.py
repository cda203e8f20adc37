"""Sweeps: the paper's Table 1 as a grid of main.py runs, on local GPUs or Slurm (through submitit).

    python sweep.py launch --out runs/table1 --pairs svhn:mnist mnist:usps usps:mnist \\
        --methods mcd source_only --seeds 1-5 --launcher local [--wait] [main.py flags ...]
    python sweep.py status runs/table1      # each job: done / running / failed (last log line) / not started
    python sweep.py table runs/table1       # table.md + table.csv: mean ± std of the last epoch, with n

One job per (pair, method): a `main.py --seeds ... --resume` run into SWEEP_DIR/<pair>_<method>/ (log:
main.log there). A job is its whole command (sweep.json, paths relative to the sweep folder): the same
flags again continue it, more --epochs or seeds extend it, another result setting is refused; another
grid adds its jobs beside. `local`: one worker per visible GPU (K with --jobs-per-gpu K), each taking the
next job nobody has taken; Ctrl-C or SIGTERM to `launch --wait` stops workers and runs, each run keeping
its checkpoint.
`slurm`: one array job, one task per job.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from algorithms import METHODS
from config import Config, non_negative_int, positive_float, positive_int, resolve, result_settings
from datasets import DOMAINS, pair_error
from cli import OneLineErrors
from main import build_parser as main_parser, given_settings, seed_range
from results import OutputError, atomic_text, final_accuracy, read_selection, seed_csv, selection_path, write_table
from locks import lock_holder
from validators import VALIDATORS

ROOT = Path(__file__).resolve().parent
MANIFEST = "sweep.json"
RESULTS = "results.csv"  # each job's --csv, inside its folder
# main.py settings the grid sets itself, per job (by their parsed names: no spelling gets past).
GRID_SETTINGS = ("source", "target", "method", "seed", "csv", "resume", "overwrite")


class SweepError(Exception):
    """What the user must change; the message is one line."""


@dataclass(frozen=True)
class Job:
    """One (pair, method) of the grid: a main.py run over all seeds, in the folder `name` of the sweep."""

    name: str  # <source>_<target>_<method>
    source: str
    target: str
    method: str
    seeds: list[str]  # as given: "1-5", "7"
    flags: list[str] = field(default_factory=list)  # every other main.py flag, the same for all jobs

    def csv(self, out: Path) -> Path:
        return out / self.name / RESULTS

    def argv(self, out: Path) -> list[str]:
        """main.py's flags for this job; a --tensorboard folder gets one subfolder per job (TB/JOB/results_seedN:
        its pair, method and seed), since every job's CSV has the same name."""
        flags = [f"{token}/{self.name}" if i and self.flags[i - 1] == "--tensorboard" else token
                 for i, token in enumerate(self.flags)]
        return ["--source", self.source, "--target", self.target, "--method", self.method, "--seeds", *self.seeds,
                "--csv", str(self.csv(out).absolute()), "--resume", *flags]

    def settings(self) -> dict:
        """What the job computes: its result-changing settings (as main.py resolves them, on a CPU, so that
        the launching machine's devices do not matter) and its epochs."""
        namespace = main_parser().parse_args(["--source", self.source, "--target", self.target, "--method", self.method,
                                              *self.flags])
        given = given_settings(namespace)
        auto_precision = "precision" not in given
        config = resolve({**given, "device": "cpu", "cuda_graph": False})
        values = {name: getattr(config, name) for name in (*result_settings(), "epochs") if name != "seed"}
        if auto_precision:  # the device's choice, made where the job runs
            values["precision"] = "auto"
        return values

    def finished_seeds(self, out: Path) -> list[int]:
        """The seeds whose record says every one of this job's epochs is done."""
        epochs, finished = self.settings()["epochs"], []
        for seed in seed_numbers(self.seeds):
            record = seed_csv(self.csv(out), seed).with_suffix(".json")
            if record.is_file() and final_accuracy(record, epochs) is not None:
                finished.append(seed)
        return finished

    def done(self, out: Path) -> bool:
        return len(self.finished_seeds(out)) == len(seed_numbers(self.seeds))


def expand_grid(pairs: list[str], methods: list[str], seeds: list[str], flags: list[str]) -> list[Job]:
    return [Job(f"{source}_{target}_{method}", source, target, method, seeds, flags)
            for source, _, target in (pair.partition(":") for pair in pairs) for method in methods]


def seed_numbers(seeds: list[str]) -> list[int]:
    """['1-3', '7'] -> [1, 2, 3, 7], read as main.py reads --seeds."""
    return sorted({seed for text in seeds for seed in seed_range(text)})


def load_jobs(out: Path) -> list[Job]:
    manifest = out / MANIFEST
    if not manifest.is_file():
        raise SweepError(f"{manifest} does not exist; start the sweep with python sweep.py launch --out {out}")
    try:
        saved = json.loads(manifest.read_text(encoding="utf-8"))
        if isinstance(saved, list):  # the first format: absolute folders
            saved = {"jobs": [{**job, "name": Path(job.pop("folder")).name} for job in saved]}
        jobs = [Job(**job) for job in saved["jobs"]]
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as error:
        raise SweepError(f"{manifest} is not a sweep manifest ({type(error).__name__}); restore it, or relaunch "
                         "into a new --out") from None
    for job in jobs:
        wrong = [name for name in ("name", "source", "target", "method") if not isinstance(getattr(job, name), str)]
        wrong += [name for name in ("seeds", "flags") if not isinstance(getattr(job, name), list)
                  or not all(isinstance(item, str) for item in getattr(job, name))]
        if wrong:
            raise SweepError(f"{manifest}: {', '.join(wrong)} of {job.name!r} not text as the sweep writes it; restore "
                             "it, or relaunch into a new --out")
        try:
            seed_numbers(job.seeds)
        except argparse.ArgumentTypeError as error:
            raise SweepError(f"{manifest}: the seeds of {job.name}: {error}") from None
    return jobs


def merge_jobs(out: Path, jobs: list[Job]) -> list[Job]:
    """The manifest's jobs with these launched into it: a job of the same name must compute the same thing
    (its seeds and epochs may grow); other jobs stay beside them."""
    earlier = {job.name: job for job in load_jobs(out)} if (out / MANIFEST).exists() else {}
    for job in jobs:
        before = earlier.get(job.name)
        if before is None:
            continue
        old, new = before.settings(), job.settings()
        changed = [f"{key} {old[key]!r} -> {new[key]!r}" for key in old if key != "epochs" and old[key] != new[key]]
        if new["epochs"] < old["epochs"]:
            changed.append(f"epochs {old['epochs']} -> {new['epochs']} (fewer)")
        dropped = sorted(set(seed_numbers(before.seeds)) - set(seed_numbers(job.seeds)))
        if dropped:  # the job's summaries would be rewritten without them
            changed.append(f"seeds {' '.join(before.seeds)} -> {' '.join(job.seeds)} (drops {', '.join(map(str, dropped))})")
        if changed:
            raise SweepError(f"{out / job.name} was launched with other settings ({'; '.join(changed)}); relaunch "
                             "with its flags, or choose a new --out for these")
    return list({**earlier, **{job.name: job for job in jobs}}.values())


def save_jobs(out: Path, jobs: list[Job]) -> None:
    with atomic_text(out / MANIFEST, "; the earlier manifest is intact") as file:
        file.write(json.dumps({"jobs": [asdict(job) for job in jobs]}, indent=2) + "\n")


def run_job(out: Path, job: Job, gpu: int | None, note: str = "") -> subprocess.Popen:
    """main.py for one job, on `gpu` (all visible ones when None), its output appended to main.log
    (after `note`)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = str(gpu)
    folder = out / job.name
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "main.log", "a") as log:
        if note:
            log.write(note + "\n")
            log.flush()
        return subprocess.Popen([sys.executable, str(ROOT / "main.py"), *job.argv(out)], stdout=log,
                                stderr=subprocess.STDOUT, env=env, cwd=ROOT)


def pass_on(processes: list[subprocess.Popen], signum: int) -> None:
    if sys.platform != "win32":  # on Windows, a console's Ctrl-C has reached every process in it already
        for process in processes:
            process.send_signal(signum)


def work(out: Path, launch_id: str, gpu: int | None) -> int:
    """One local worker: takes the next job of the launch that no worker has taken (an exclusive create of
    its claim file, portable and atomic) and runs it, until none is left. A signal is passed on to the
    run and stops the worker; so does a run that was interrupted. Exit: 0, 1 if a run failed, or 128+signal."""
    claims = out / ".claims" / launch_id
    stopped: list[int] = []
    running: list[subprocess.Popen] = []

    def stop(signum: int, frame) -> None:
        stopped.append(signum)
        pass_on(running, signum)

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, stop)
    failed = False
    for job in load_jobs(out):
        if stopped:
            break
        try:
            os.close(os.open(claims / job.name, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:  # another worker has it, or it is not part of this launch
            continue
        if job.done(out):
            continue
        where = f"GPU {gpu}" if gpu is not None else "the visible devices"
        running.append(run_job(out, job, gpu, f"== sweep worker {os.getpid()} on {where}"))
        code = running[0].wait()
        running.clear()
        if code in (130, 143) or code < 0:  # the run was interrupted: so is the sweep
            stopped.append(code if code > 0 else 128 - code)
        failed |= code != 0
    return (stopped[0] if stopped[0] > 128 else 128 + stopped[0]) if stopped else int(failed)


def slurm_task(out: str, name: str) -> int:
    """One Slurm array task: one job's main.py; its exit code."""
    job = next(job for job in load_jobs(Path(out)) if job.name == name)
    return run_job(Path(out), job, None).wait()


def slurm_executor(folder: Path, args: argparse.Namespace):
    """submitit's Slurm executor with the sweep's resources; one array task per job."""
    import submitit

    executor = submitit.AutoExecutor(folder=folder / "submitit" / "%j", cluster="slurm")
    executor.update_parameters(name="mcd-sweep", timeout_min=args.time, gpus_per_node=args.gpus_per_job,
                               mem_gb=args.mem, slurm_partition=args.partition,
                               slurm_array_parallelism=args.array_parallelism)
    return executor


def checked_flags(flags: list[str]) -> list[str]:
    """The pass-through flags, read by main.py's own parser (no abbreviations); the grid's are refused."""
    namespace = main_parser().parse_args(flags)  # a bad flag: main.py's one-line error, exit 2
    taken = [name for name in GRID_SETTINGS if hasattr(namespace, name)]
    taken += [name for name in ("seeds", "evaluate") if getattr(namespace, name) is not None]
    if taken:
        raise SweepError(f"{', '.join('--' + name.replace('_', '-') for name in taken)}: the sweep sets these per job "
                         "(--pairs, --methods, --seeds, --out)")
    # main.py runs in the project's folder: the data and TensorBoard folders are fixed here, where the sweep is launched
    folders = {"--data-root": os.path.abspath(getattr(namespace, "data_root", Config().data_root))}
    if getattr(namespace, "tensorboard", None):
        folders["--tensorboard"] = os.path.abspath(namespace.tensorboard)
    flags = [token for i, token in enumerate(flags) if not (token.split("=")[0] in folders
                                                            or (i and flags[i - 1] in folders))]
    return [*flags, *(token for pair in folders.items() for token in pair)]


def launch(args: argparse.Namespace, flags: list[str]) -> int:
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise SweepError(f"--out {out} is a file; give a folder for the sweep")
    grid = expand_grid(args.pairs, args.methods, args.seeds, checked_flags(flags))
    jobs, launched = merge_jobs(out, grid), {job.name for job in grid}
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise SweepError(f"--out {out}: cannot create it ({error.strerror}); choose another folder") from None
    save_jobs(out, jobs)  # an OutputError (disk full, ...) is one line, exit 2, as a SweepError
    pending = [job for job in jobs if job.name in launched and not job.done(out)]
    print(f"{len(launched)} jobs, {len(launched) - len(pending)} done already, {len(pending)} to run")
    if not pending:
        print_table(out)
        return 0
    if args.launcher == "slurm":
        try:
            executor = slurm_executor(out, args)
        except RuntimeError as error:  # submitit found no srun: not on a Slurm cluster
            raise SweepError(f"--launcher slurm: {error} Run this on the cluster, or use --launcher local") from None
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
        try:
            submitted = executor.map_array(slurm_task, [str(out.absolute())] * len(pending), [job.name for job in pending])
        except Exception as error:  # sbatch refused the array (partition, limits, ...): submitit raises its own
            first = (str(error).strip().splitlines() or [type(error).__name__])[-1][:200]
            raise SweepError(f"--launcher slurm: sbatch refused the jobs ({first}); check --partition, --time, --mem "
                             "and --gpus-per-job, then relaunch the same command") from None
        print("submitted: " + ", ".join(job.job_id for job in submitted))
        if not args.wait:
            print(f"follow with: python sweep.py status {out}")
            return 0
        try:
            codes = [job.result() for job in submitted]
        except Exception as error:  # a task killed or failed outside main.py (submitit's UncompletedJobError)
            raise SweepError(f"a Slurm task ended without a result ({type(error).__name__}); relaunch the same command "
                             "to continue") from None
        print_table(out)
        return 0 if all(code == 0 for code in codes) else 1
    return launch_local(out, pending, args)


def launch_local(out: Path, pending: list[Job], args: argparse.Namespace) -> int:
    """K workers per GPU (--jobs-per-gpu K; on the CPU with --gpus 0), each in its own session: Ctrl-C reaches them once."""
    launch_id = f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    claims = out / ".claims" / launch_id
    try:
        claims.mkdir(parents=True)
    except OSError as error:
        raise SweepError(f"cannot write in {out} ({error.strerror}); free some space or choose another --out") from None
    for job in load_jobs(out):  # only this launch's pending jobs are free to take
        if job not in pending:
            (claims / job.name).touch()
    gpus = args.gpus if args.gpus is not None else torch.cuda.device_count()
    # --jobs-per-gpu K: K workers per device, each with its own process (and CUDA context) on it
    slots = [gpu for gpu in range(max(gpus, 1)) for _ in range(args.jobs_per_gpu)][:len(pending)]
    workers = [subprocess.Popen([sys.executable, str(ROOT / "sweep.py"), "_work", str(out.absolute()), launch_id,
                                 *([str(gpu)] if gpus else [])], cwd=ROOT, start_new_session=True)
               for gpu in slots]
    print(f"started {len(workers)} worker(s): pids {', '.join(str(w.pid) for w in workers)}"
          + (f" on GPUs {', '.join(map(str, slots))}" if gpus else " on the CPU"))
    if not args.wait:
        print(f"follow with: python sweep.py status {out}; stop with: kill {' '.join(str(w.pid) for w in workers)}")
        return 0
    received: list[int] = []

    def stop(signum: int, frame) -> None:
        received.append(signum)
        pass_on(workers, signum)

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, stop)
    codes = [worker.wait() for worker in workers]
    killed = [(worker, signal.Signals(-code).name) for worker, code in zip(workers, codes) if code < 0]
    for worker, _ in [] if received else killed:  # its run goes on in the worker's process group: stop it, saved
        with contextlib.suppress(OSError, AttributeError):  # gone already; no process groups on Windows
            os.killpg(worker.pid, signal.SIGTERM)
    if killed and not received:
        raise SweepError(f"worker {', '.join(f'{w.pid} ({name})' for w, name in killed)} was killed; its run was sent "
                         "SIGTERM and keeps its last checkpoint: relaunch the same command to continue")
    if received:
        print(f"sweep stopped by {signal.Signals(received[0]).name}: every run kept its last checkpoint; relaunch "
              "the same command to continue", file=sys.stderr)
        return 128 + received[0]
    print_table(out)
    interrupted = [code for code in codes if code > 128]
    return interrupted[0] if interrupted else (0 if all(code == 0 for code in codes) else 1)


def job_state(out: Path, job: Job) -> str:
    if job.done(out):
        return "done"
    holder = lock_holder(job.csv(out))
    if holder:
        return f"running ({holder})"
    log = out / job.name / "main.log"
    if not log.exists():
        return "not started"
    lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
    return f"failed: {lines[-1] if lines else 'empty log'}"


def describe(job: Job) -> str:
    """What a job's cell was made with: its seeds and every pass-through flag."""
    return f"seeds {' '.join(job.seeds)}" + (f", {' '.join(job.flags)}" if job.flags else "")


def status(out: Path) -> int:
    for job in load_jobs(out):
        print(f"{job.name}: {job_state(out, job)} [{describe(job)}]")
    return 0


def print_table(out: Path, validator: str | None = None) -> None:
    """Table 1's form: each (method, pair) cell is the last epoch's target ensemble accuracy of each seed
    that finished all of the job's epochs; with a validator, a row beside each method's at the epoch that
    validator picked in each seed (its STEM_selection.csv)."""
    cells = []
    for job in load_jobs(out):
        records = [seed_csv(job.csv(out), seed).with_suffix(".json") for seed in job.finished_seeds(out)]
        base = {"pair": f"{job.source}→{job.target}", "made_with": describe(job), "expected": len(seed_numbers(job.seeds))}
        epochs = job.settings()["epochs"]
        cells.append({**base, "method": job.method, "values": [final_accuracy(record, epochs) for record in records]})
        if validator:
            picks = [read_selection(selection_path(record.with_suffix(".csv"))).get(validator) for record in records]
            cells.append({**base, "method": f"{job.method} ({validator})", "values": [p for p in picks if p is not None]})
    lines = write_table(out, cells)
    print("target test accuracy (ensemble), last epoch" + (f" and at {validator}'s pick" if validator else "")
          + ", mean ± sample std over seeds")
    print("\n".join(lines))
    print(f"wrote {out / 'table.md'} and {out / 'table.csv'}")


def _pair(text: str) -> str:
    source, _, target = text.partition(":")
    if not {source, target} <= set(DOMAINS):
        raise argparse.ArgumentTypeError(f"{text!r}: give SOURCE:TARGET of {', '.join(DOMAINS)} (your own images: "
                                         "main.py --source folder:DIR)")
    if pair_error(source, target):
        raise argparse.ArgumentTypeError(f"{text!r}: give SOURCE:TARGET; {pair_error(source, target)}")
    return text


def _seeds(text: str) -> str:
    return seed_range(text) and text  # refused here, with main.py's message


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrors(prog="sweep.py", description=__doc__.split("\n")[0], allow_abbrev=False)
    commands = parser.add_subparsers(dest="command", required=True, parser_class=OneLineErrors)
    go = commands.add_parser("launch", help="expand the grid and start its jobs (again: continue or extend it)",
                             allow_abbrev=False)
    go.add_argument("--out", required=True, help="the sweep's folder")
    go.add_argument("--pairs", nargs="+", type=_pair, default=["svhn:mnist"], help="SOURCE:TARGET pairs")
    go.add_argument("--methods", nargs="+", choices=METHODS, default=["mcd", "source_only"])
    go.add_argument("--seeds", nargs="+", type=_seeds, default=["1-5"], help="as main.py --seeds")
    go.add_argument("--launcher", choices=("local", "slurm"), default="local")
    go.add_argument("--gpus", type=non_negative_int, default=None,
                    help="local: workers, one per GPU (default: all visible; 0: one on the CPU)")
    go.add_argument("--jobs-per-gpu", type=positive_int, default=1, metavar="K",
                    help="local: K jobs run at once on each GPU (or on the CPU with --gpus 0), each its own main.py "
                         "process; whether K > 1 pays on a GPU is unmeasured (docs/speed.md)")
    go.add_argument("--wait", action="store_true", help="wait for every job, then print the table")
    go.add_argument("--time", type=positive_int, default=24 * 60, help="slurm: minutes a job may run")
    go.add_argument("--partition", default=None, help="slurm: the partition")
    go.add_argument("--gpus-per-job", type=positive_int, default=1, help="slurm: GPUs per job")
    go.add_argument("--mem", type=positive_float, default=32, help="slurm: memory per job in GB")
    go.add_argument("--array-parallelism", type=positive_int, default=64, help="slurm: array tasks running at once")
    for name, text in (("status", "each job's state"), ("table", "the Table 1 summary")):
        commands.add_parser(name, help=text, allow_abbrev=False).add_argument("out", help="the sweep's folder")
    commands.choices["table"].add_argument("--validator", choices=VALIDATORS, default=None,
                                           help="a row beside each method's: the epoch this label-free score picked")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if hasattr(sys.stdout, "reconfigure"):  # a folder name that is not UTF-8 is printed escaped, never a traceback
        sys.stdout.reconfigure(errors="backslashreplace")
    if argv[:1] == ["_work"]:  # a local worker, started by launch_local: OUT LAUNCH_ID [GPU]
        return work(Path(argv[1]), argv[2], int(argv[3]) if len(argv) > 3 else None)
    parser = build_parser()
    args, flags = parser.parse_known_args(argv)
    try:
        if args.command != "launch" and flags:
            raise SweepError(f"unknown arguments {' '.join(flags)}")
        if args.command == "launch":
            return launch(args, flags)
        if args.command == "status":
            return status(Path(args.out))
        print_table(Path(args.out), args.validator)
        return 0
    except (SweepError, OutputError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
