"""Sweeps: the paper's Table 1 as a grid of main.py runs, on local GPUs or Slurm through submitit.

    python sweep.py launch --out runs/table1 --pairs svhn:mnist mnist:usps usps:mnist \\
        --methods mcd source_only --seeds 1-5 --launcher local [--wait] [main.py flags ...]
    python sweep.py status runs/table1      # each job: done / running / failed (last log line) / not started
    python sweep.py table runs/table1       # table.md + table.csv: mean ± std of the last epoch, with n

One job per (pair, method): a normal `main.py --seeds ... --resume` run into SWEEP_DIR/<pair>_<method>/,
its log in main.log there. --resume makes a relaunch of the same command continue where it stopped: a
job whose summary exists is skipped, a finished seed trains nothing, an interrupted one resumes, and
the run lock keeps two jobs off one output. `local` splits the grid into one shard per visible GPU
(submitit's local executor starts every job at once and queues nothing) and runs each shard's jobs in
turn on its GPU; `slurm` submits one array job, one task per job. The grid is saved in sweep.json.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import submitit

from algorithms import METHODS
from datasets import DOMAINS
from main import _seeds
from results import seed_csv, summary_path
from run_control import lock_holder

ROOT = Path(__file__).resolve().parent
MANIFEST = "sweep.json"
RESULTS = "results.csv"  # each job's --csv, inside its folder


@dataclass(frozen=True)
class Job:
    """One (pair, method) of the grid: a main.py run over all seeds."""

    folder: str  # SWEEP_DIR/<source>_<target>_<method>
    source: str
    target: str
    method: str
    seeds: list[str]  # as given: "1-5", "7"
    flags: list[str]  # every other main.py flag, the same for all jobs

    @property
    def csv(self) -> Path:
        return Path(self.folder) / RESULTS

    def argv(self) -> list[str]:
        return ["--source", self.source, "--target", self.target, "--method", self.method, "--seeds", *self.seeds,
                "--csv", str(self.csv), "--resume", *self.flags]

    def done(self) -> bool:
        """Its summary is written only once every seed has finished."""
        return summary_path(self.csv).exists()


def expand_grid(out: Path, pairs: list[str], methods: list[str], seeds: list[str], flags: list[str]) -> list[Job]:
    jobs = []
    for pair in pairs:
        source, _, target = pair.partition(":")
        for method in methods:
            jobs.append(Job(str(out / f"{source}_{target}_{method}"), source, target, method, seeds, flags))
    return jobs


def run_jobs(jobs: list[Job], gpu: int | None) -> list[int]:
    """One shard, in turn: each job a main.py process on `gpu` (all visible ones when None). Runs inside
    a submitit job; returns main.py's exit code per job (0 for one skipped as done)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = str(gpu)
    codes = []
    for job in jobs:
        if job.done():
            codes.append(0)
            continue
        Path(job.folder).mkdir(parents=True, exist_ok=True)
        with open(Path(job.folder) / "main.log", "a") as log:
            codes.append(subprocess.call([sys.executable, str(ROOT / "main.py"), *job.argv()], stdout=log,
                                         stderr=subprocess.STDOUT, env=env, cwd=ROOT))
    return codes


def visible_gpus() -> int:
    import torch  # only to count GPUs: a job's own process does the training

    return torch.cuda.device_count()


def slurm_executor(folder: Path, args: argparse.Namespace) -> submitit.AutoExecutor:
    """submitit's Slurm executor with the sweep's resources; one array task per job."""
    executor = submitit.AutoExecutor(folder=folder / "submitit" / "%j", cluster="slurm")
    executor.update_parameters(name="mcd-sweep", timeout_min=args.time, gpus_per_node=args.gpus_per_job,
                               mem_gb=args.mem, slurm_partition=args.partition,
                               slurm_array_parallelism=args.array_parallelism)
    return executor


# main.py flags the grid sets itself, per job.
GRID_FLAGS = ("--source", "--target", "--method", "--seed", "--seeds", "--csv", "--resume", "--overwrite", "--evaluate")


def launch(args: argparse.Namespace, flags: list[str]) -> int:
    taken = [flag for flag in flags if flag.split("=")[0] in GRID_FLAGS]
    if taken:
        raise SystemExit(f"error: {' '.join(taken)}: the sweep sets these per job (--pairs, --methods, --seeds, --out)")
    try:
        seed_numbers(args.seeds)
    except argparse.ArgumentTypeError as error:
        raise SystemExit(f"error: --seeds {error}")
    out = Path(args.out).absolute()
    jobs = expand_grid(out, args.pairs, args.methods, args.seeds, flags)
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).write_text(json.dumps([asdict(job) for job in jobs], indent=2) + "\n")
    pending = [job for job in jobs if not job.done()]
    print(f"{len(jobs)} jobs, {len(jobs) - len(pending)} done already, {len(pending)} to run")
    if not pending:
        print_table(out)
        return 0
    # The jobs unpickle this module's functions: let them import the project from wherever they start.
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    if args.launcher == "slurm":
        try:
            executor = slurm_executor(out, args)
        except RuntimeError as error:  # submitit found no srun: not on a Slurm cluster
            raise SystemExit(f"error: --launcher slurm: {error} Run this on the cluster, or use --launcher local")
        submitted = executor.map_array(run_jobs, [[job] for job in pending], [None] * len(pending))
    else:
        gpus = args.gpus if args.gpus is not None else visible_gpus()
        shards = [pending[i::max(gpus, 1)] for i in range(max(gpus, 1))]
        executor = submitit.AutoExecutor(folder=out / "submitit" / "%j", cluster="local")
        executor.update_parameters(name="mcd-sweep", timeout_min=args.time)
        submitted = [executor.submit(run_jobs, shard, gpu if gpus else None)
                     for gpu, shard in enumerate(shards) if shard]
    print("submitted: " + ", ".join(job.job_id for job in submitted))
    if not args.wait:
        print(f"follow with: python sweep.py status {out}")
        return 0
    codes = [code for job in submitted for code in job.result()]
    print_table(out)
    return 0 if all(code == 0 for code in codes) else 1


def load_jobs(out: Path) -> list[Job]:
    manifest = out / MANIFEST
    if not manifest.is_file():
        raise SystemExit(f"error: {manifest} does not exist; start the sweep with python sweep.py launch --out {out}")
    return [Job(**job) for job in json.loads(manifest.read_text())]


def job_state(job: Job) -> str:
    if job.done():
        return "done"
    holder = lock_holder(job.csv)
    if holder:
        return f"running ({holder})"
    log = Path(job.folder) / "main.log"
    if not log.exists():
        return "not started"
    lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
    return f"failed: {lines[-1] if lines else 'empty log'}"


def status(out: Path) -> int:
    for job in load_jobs(out):
        print(f"{Path(job.folder).name}: {job_state(job)}")
    return 0


def seed_numbers(seeds: list[str]) -> list[int]:
    """['1-3', '7'] -> [1, 2, 3, 7], read as main.py reads --seeds."""
    return sorted({seed for text in seeds for seed in _seeds(text)})


def job_result(job: Job) -> dict:
    """The last epoch's target ensemble accuracy of each seed that finished all its epochs."""
    finished = []
    for seed in seed_numbers(job.seeds):
        record = seed_csv(job.csv, seed).with_suffix(".json")
        if record.is_file():
            saved = json.loads(record.read_text())
            if saved["final_row"] and saved["epochs_completed"] == saved["config"]["epochs"]:
                finished.append(saved["final_row"]["target_acc_ensemble"])
    expected = len(seed_numbers(job.seeds))
    return {"values": finished, "n": len(finished), "expected": expected, "complete": len(finished) == expected}


def cell(result: dict) -> str:
    values = result["values"]
    if not values:
        return "–"
    text = f"{statistics.fmean(values):.2f}" + (f" ± {statistics.stdev(values):.2f}" if len(values) > 1 else "")
    return text + (f" (n={result['n']})" if result["complete"] else f" (n={result['n']} of {result['expected']}, incomplete)")


def print_table(out: Path) -> None:
    """Table 1's form: rows = methods, columns = pairs, cells = mean ± sample std over seeds (n)."""
    jobs = load_jobs(out)
    pairs = list(dict.fromkeys(f"{job.source}→{job.target}" for job in jobs))
    methods = list(dict.fromkeys(job.method for job in jobs))
    results = {(job.method, f"{job.source}→{job.target}"): job_result(job) for job in jobs}
    lines = ["| method | " + " | ".join(pairs) + " |", "|---|" + "---|" * len(pairs)]
    lines += [f"| {method} | " + " | ".join(cell(results[method, pair]) if (method, pair) in results else "" for pair in pairs)
              + " |" for method in methods]
    (out / "table.md").write_text("\n".join(lines) + "\n")
    with open(out / "table.csv", "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["method", "pair", "mean", "std", "n", "seeds", "complete"])
        for (method, pair), result in results.items():
            values = result["values"]
            writer.writerow([method, pair, f"{statistics.fmean(values):.4f}" if values else "",
                             f"{statistics.stdev(values):.4f}" if len(values) > 1 else "", result["n"],
                             result["expected"], result["complete"]])
    print("target test accuracy (ensemble), last epoch, mean ± sample std over seeds")
    print("\n".join(lines))
    print(f"wrote {out / 'table.md'} and {out / 'table.csv'}")


def _pair(text: str) -> str:
    source, _, target = text.partition(":")
    if source not in DOMAINS or target not in DOMAINS or source == target:
        raise argparse.ArgumentTypeError(f"{text!r}: give SOURCE:TARGET, two different ones of {', '.join(DOMAINS)}")
    return text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sweep.py", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    # allow_abbrev off: main.py's --seed must pass through, not be read as --seeds
    go = commands.add_parser("launch", help="expand the grid and submit its jobs (again: continue it)", allow_abbrev=False)
    go.add_argument("--out", required=True, help="the sweep's folder")
    go.add_argument("--pairs", nargs="+", type=_pair, default=["svhn:mnist"], help="SOURCE:TARGET pairs")
    go.add_argument("--methods", nargs="+", choices=METHODS, default=["mcd", "source_only"])
    go.add_argument("--seeds", nargs="+", default=["1-5"], help="as main.py --seeds")
    go.add_argument("--launcher", choices=("local", "slurm"), default="local")
    go.add_argument("--gpus", type=int, default=None, help="local: shards, one per GPU (default: all visible; 0: CPU)")
    go.add_argument("--wait", action="store_true", help="wait for every job, then print the table")
    go.add_argument("--time", type=int, default=24 * 60, help="minutes a job may run")
    go.add_argument("--partition", default=None, help="slurm: the partition")
    go.add_argument("--gpus-per-job", type=int, default=1, help="slurm: GPUs per job")
    go.add_argument("--mem", type=float, default=32, help="slurm: memory per job in GB")
    go.add_argument("--array-parallelism", type=int, default=64, help="slurm: array tasks running at once")
    for name, text in (("status", "each job's state"), ("table", "the Table 1 summary")):
        commands.add_parser(name, help=text).add_argument("out", help="the sweep's folder")
    return parser


def main(argv: list[str] | None = None) -> int:
    args, flags = build_parser().parse_known_args(argv)
    if args.command != "launch" and flags:
        raise SystemExit(f"error: unknown arguments {' '.join(flags)}")
    if args.command == "launch":
        return launch(args, flags)
    if args.command == "status":
        return status(Path(args.out))
    print_table(Path(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
