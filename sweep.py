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
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

import launchers
from config import (DATASETS, METHODS, VALIDATORS, Config, SettingError, non_negative_int, positive_float, positive_int,
                    resolve, result_settings)
from cli import HelpFormatter, OneLineErrors
from main import build_parser as main_parser, given_settings, seed_range
from results import OutputError, atomic_text, final_accuracy, read_selection, seed_csv, selection_path, write_table
from locks import lock_holder

ROOT = Path(__file__).resolve().parent
MANIFEST = "sweep.json"
RESULTS = "results.csv"  # each job's --csv, inside its folder
SLURM_JOBS = "slurm.json"  # job name -> the Slurm job id of its latest submission (status asks sacct about it)
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
    epochs: int | None = None  # as main.py resolves the flags, recorded at launch: status and table need no torch

    def csv(self, out: Path) -> Path:
        return out / self.name / RESULTS

    def log(self, out: Path) -> Path:
        return (out / self.name / "main.log").absolute()

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

    def epoch_count(self) -> int:
        return self.epochs if self.epochs is not None else self.settings()["epochs"]  # a manifest from before

    def finished_seeds(self, out: Path) -> list[int]:
        """The seeds whose record says every one of this job's epochs is done."""
        epochs, finished = self.epoch_count(), []
        for seed in seed_numbers(self.seeds):
            record = seed_csv(self.csv(out), seed).with_suffix(".json")
            if record.is_file() and final_accuracy(record, epochs) is not None:
                finished.append(seed)
        return finished

    def done(self, out: Path) -> bool:
        return len(self.finished_seeds(out)) == len(seed_numbers(self.seeds))


def expand_grid(pairs: list[str], methods: list[str], seeds: list[str], flags: list[str]) -> list[Job]:
    jobs = [Job(f"{source}_{target}_{method}", source, target, method, seeds, flags)
            for source, _, target in (pair.partition(":") for pair in pairs) for method in methods]
    return [replace(job, epochs=job.settings()["epochs"]) for job in jobs]


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
        wrong += ["epochs"] if job.epochs is not None and (not isinstance(job.epochs, int) or job.epochs < 1) else []
        if wrong:
            raise SweepError(f"{manifest}: {', '.join(wrong)} of {job.name!r} not as the sweep writes it; restore "
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
        return launch_slurm(out, pending, args)
    return launch_local(out, pending, args)


def slurm_ids(out: Path) -> dict[str, str]:
    record = out / SLURM_JOBS
    try:
        return json.loads(record.read_text(encoding="utf-8")) if record.is_file() else {}
    except (OSError, ValueError):
        raise SweepError(f"{record} is not the sweep's record of Slurm job ids; delete it (status then reads the "
                         "jobs' files only)") from None


def launch_slurm(out: Path, pending: list[Job], args: argparse.Namespace) -> int:
    """One array job of the pending jobs that Slurm is not running or holding already (a relaunch of a
    cancelled or failed job continues it from its checkpoint: main.py --resume)."""
    known = slurm_ids(out)
    queued = launchers.states([known[job.name] for job in pending if job.name in known])
    waiting = {job.name for job in pending if job.name in known and launchers.waiting(queued.get(known[job.name], "GONE"))}
    for name in sorted(waiting):
        print(f"{name}: still in Slurm as job {known[name]} ({queued[known[name]]}), left as it is")
    submit = [job for job in pending if job.name not in waiting]
    if submit:
        executor = launchers.executor(out, args.time, args.gpus_per_job, args.mem, args.partition, args.array_parallelism)
        ids = launchers.submit(executor, [job.name for job in submit], [job.argv(out) for job in submit],
                             [str(job.log(out)) for job in submit])
        with atomic_text(out / SLURM_JOBS, "; the jobs were submitted, status will not know their ids") as file:
            file.write(json.dumps({**slurm_ids(out), **ids}, indent=2) + "\n")
        print("submitted: " + ", ".join(f"{name} as {job_id}" for name, job_id in ids.items()))
    if not args.wait:
        print(f"follow with: python sweep.py status {out}")
        return 0
    started = time.monotonic()  # a job unknown to sacct a minute after its submission is lost to Slurm
    follow(out, pending, lambda states: any(state.startswith(("running", "queued")) or
                                            (state.startswith("submitted") and time.monotonic() - started < 60)
                                            for state in states.values()))
    print_table(out)
    return 0 if all(job.done(out) for job in pending) else 1


def follow(out: Path, jobs: list[Job], going: Callable[[dict[str, str]], bool], every_s: float = 2.0) -> None:
    """launch --wait: a line whenever a job's state changes (queued, running, done, failed, ...), until
    `going(states)` is False."""
    shown: dict[str, str] = {}
    while True:
        states = job_states(out, jobs)
        for name, state in states.items():
            kind = state.split(" (")[0].split(":")[0]  # done, running, failed, ... without the details
            if shown.get(name) != kind:
                shown[name] = kind
                print(f"{time.strftime('%H:%M:%S')} {name}: {state}", flush=True)
        if not going(states):
            return
        time.sleep(every_s)


def launch_local(out: Path, pending: list[Job], args: argparse.Namespace) -> int:
    """K workers per GPU (--jobs-per-gpu K; on the CPU with --gpus 0), each in its own session: Ctrl-C reaches them once."""
    queue = out / ".claims" / f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}" / "queue.json"
    try:
        queue.parent.mkdir(parents=True)
    except OSError as error:
        raise SweepError(f"cannot write in {out} ({error.strerror}); free some space or choose another --out") from None
    with atomic_text(queue, "") as file:  # this launch's pending jobs, in the manifest's order
        json.dump([{"name": job.name, "argv": job.argv(out), "log": str(job.log(out))} for job in pending], file)
    if args.gpus is None:
        import torch

    gpus = args.gpus if args.gpus is not None else torch.cuda.device_count()
    # --jobs-per-gpu K: K workers per device, each with its own process (and CUDA context) on it
    slots = [gpu for gpu in range(max(gpus, 1)) for _ in range(args.jobs_per_gpu)][:len(pending)]
    workers = [subprocess.Popen([sys.executable, str(ROOT / "launchers.py"), str(queue.absolute()),
                                 *([str(gpu)] if gpus else [])], cwd=ROOT, start_new_session=True) for gpu in slots]
    print(f"started {len(workers)} worker(s): pids {', '.join(str(w.pid) for w in workers)}"
          + (f" on GPUs {', '.join(map(str, slots))}" if gpus else " on the CPU"))
    if not args.wait:
        print(f"follow with: python sweep.py status {out}; stop with: kill {' '.join(str(w.pid) for w in workers)}")
        return 0
    received: list[int] = []

    def stop(signum: int, frame) -> None:
        received.append(signum)
        launchers.pass_on(workers, signum)

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, stop)
    follow(out, pending, lambda states: any(worker.poll() is None for worker in workers))
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


def job_states(out: Path, jobs: list[Job]) -> dict[str, str]:
    """Each job's state, from its files and, for a job submitted to Slurm, from sacct (one call for all)."""
    known = slurm_ids(out)
    try:
        slurm = launchers.states([known[job.name] for job in jobs if job.name in known])
    except launchers.SlurmError as error:  # e.g. the controller or its accounting is down: the files still tell
        print(f"warning: {error}; the states below come from the jobs' files only", file=sys.stderr)
        slurm = {}
    return {job.name: job_state(out, job, known.get(job.name, ""), slurm.get(known.get(job.name, ""), ""))
            for job in jobs}


def job_state(out: Path, job: Job, slurm_id: str = "", slurm_state: str = "") -> str:
    """done; running (who holds its lock); submitted, queued, cancelled or failed as Slurm says; not started;
    failed: the last line of its log (and of submitit's, on Slurm)."""
    if job.done(out):
        return "done"
    where = f"Slurm job {slurm_id}: {slurm_state}" if slurm_state else ""
    holder = lock_holder(job.csv(out))
    if holder or (slurm_state and launchers.waiting(slurm_state)):
        running = holder or slurm_state.startswith(("RUNNING", "COMPLETING"))
        return f"{'running' if running else 'queued'} ({'; '.join(filter(None, [holder, where]))})"
    if slurm_id and not slurm_state:  # sacct learns of a job seconds after its submission (or never, if cancelled pending)
        return f"submitted (Slurm job {slurm_id}, not in Slurm's accounting yet)"
    log = job.log(out)
    lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()] if log.exists() else []
    if slurm_state.startswith("CANCELLED"):
        return f"cancelled ({where}): relaunch the same command to continue from its checkpoint"
    if slurm_state and not slurm_state.startswith("COMPLETED"):  # FAILED, TIMEOUT, OUT_OF_MEMORY, NODE_FAIL, ...
        return f"failed ({where}): {' | '.join(lines[-1:] + launchers.log_tail(out, slurm_id, 1)) or 'no log'}"
    if not lines:
        return "not started"
    return f"failed: {lines[-1]}"


def describe(job: Job) -> str:
    """What a job's cell was made with: its seeds and every pass-through flag."""
    return f"seeds {' '.join(job.seeds)}" + (f", {' '.join(job.flags)}" if job.flags else "")


def status(out: Path) -> int:
    jobs = load_jobs(out)
    for job, state in zip(jobs, job_states(out, jobs).values()):
        print(f"{job.name}: {state} [{describe(job)}]")
    return 0


def print_table(out: Path, validator: str | None = None) -> None:
    """Table 1's form: each (method, pair) cell is the last epoch's target ensemble accuracy of each seed
    that finished all of the job's epochs; with a validator, a row beside each method's at the epoch that
    validator picked in each seed (its STEM_selection.csv)."""
    cells = []
    for job in load_jobs(out):
        records = [seed_csv(job.csv(out), seed).with_suffix(".json") for seed in job.finished_seeds(out)]
        base = {"pair": f"{job.source}→{job.target}", "made_with": describe(job), "expected": len(seed_numbers(job.seeds))}
        epochs = job.epoch_count()
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
    if not {source, target} <= set(DATASETS):
        raise argparse.ArgumentTypeError(f"{text!r}: give SOURCE:TARGET of {', '.join(DATASETS)} (your own images: "
                                         "main.py --source folder:DIR)")
    from datasets import pair_error  # the datasets' class names (and torch): only for two known names

    if pair_error(source, target):
        raise argparse.ArgumentTypeError(f"{text!r}: give SOURCE:TARGET; {pair_error(source, target)}")
    return text


def _seeds(text: str) -> str:
    return seed_range(text) and text  # refused here, with main.py's message


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrors(prog="sweep.py", description=__doc__.split("\n")[0], allow_abbrev=False)
    commands = parser.add_subparsers(dest="command", required=True, parser_class=OneLineErrors)
    go = commands.add_parser(
        "launch", help="expand the grid and start its jobs (again: continue or extend it)", allow_abbrev=False,
        formatter_class=HelpFormatter, epilog="Every other flag is main.py's and goes to every job, e.g. "
        "python sweep.py launch --out runs/t1 --pairs mnist:usps --methods mcd --seeds 1-3 --epochs 10 --small-subsets")
    go.add_argument("--out", required=True, help="the sweep's folder")
    go.add_argument("--pairs", nargs="+", type=_pair, default=["svhn:mnist"], help="SOURCE:TARGET pairs")
    go.add_argument("--methods", nargs="+", choices=METHODS, default=["mcd", "source_only"],
                    help="one job per pair and method")
    go.add_argument("--seeds", nargs="+", type=_seeds, default=["1-5"], help="each job's seeds, as main.py --seeds")
    go.add_argument("--launcher", choices=("local", "slurm"), default="local",
                    help="local: worker processes here; slurm: one array job through submitit")
    go.add_argument("--gpus", type=non_negative_int, default=None,
                    help="local: workers, one per GPU (default: all visible; 0: one on the CPU)")
    go.add_argument("--jobs-per-gpu", type=positive_int, default=1, metavar="K",
                    help="local: K jobs run at once on each GPU (or on the CPU with --gpus 0), each its own main.py "
                         "process; whether K > 1 pays on a GPU is unmeasured (docs/speed.md)")
    go.add_argument("--wait", action="store_true", help="follow the jobs (a line as each starts, ends or fails), then "
                                                        "print the table")
    go.add_argument("--time", type=positive_int, default=24 * 60, help="slurm: minutes a job may run")
    go.add_argument("--partition", default=None, help="slurm: the partition (default: the cluster's)")
    go.add_argument("--gpus-per-job", type=non_negative_int, default=1, help="slurm: GPUs per job (0: none)")
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
    except (SweepError, OutputError, SettingError, launchers.SlurmError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
