"""The results files of a run: the per-epoch CSV, the JSON record beside it, and the multi-seed summary.

    results.csv           one row per epoch (csv_columns), flushed and fsynced as each epoch ends
    results.json          the config, versions, device, data files + MD5s, the last row (rewritten whole)
    results_seedN.*       the same per seed of a multi-seed run
    results_summary.csv   mean and sample std over seeds of each seed's LAST epoch (never a best epoch)
    results_selection.csv the epoch each label-free validator picks, beside the last epoch and the oracle
    results_selection_summary.csv   the same over seeds, with each validator's rank correlation
    table.md, table.csv   a sweep's Table 1: one cell per (method, pair), the same statistics

Every file is written whole to a temp file and renamed, or appended and fsynced: never half a file.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import io
import json
import math
import hashlib
import importlib.metadata
import os
import platform
import shlex
import statistics
import subprocess
import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, TextIO

from config import VALIDATORS, Config, device_name, protocol_values
from downloads import DataFile

if TYPE_CHECKING:
    import torch

VALIDATION_COLUMNS = tuple(name for name in VALIDATORS if name.startswith("val_"))  # the scores validators.py adds

# A CSV row: these, the method's loss columns (its LOSSES), the accuracies, then the label-free scores.
PROGRESS_COLUMNS = ("epoch", "iterations", "seconds")
ACCURACY_COLUMNS = ("source_acc", "target_acc_f1", "target_acc_f2", "target_acc_ensemble")


def csv_columns(losses: tuple[str, ...]) -> tuple[str, ...]:
    """The CSV's header for a method whose update() returns (some of) `losses`."""
    return (*PROGRESS_COLUMNS, *losses, *ACCURACY_COLUMNS, *VALIDATION_COLUMNS)


class OutputError(Exception):
    """The results cannot be written where asked; the message is one line that says what to do."""


# errno -> the cause in a user's words; anything else gets the system's own words.
CAUSES = {
    errno.ENOSPC: "disk full",
    errno.EDQUOT: "disk quota exceeded",
    errno.EFBIG: "file size limit",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.ENAMETOOLONG: "file name too long",
}


def failure_cause(error: BaseException) -> str:
    """Why a write failed, in words. torch's zip writer reports a failed write as a RuntimeError raised
    while handling the OSError, so the whole exception chain is searched for the OSError behind it."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, MemoryError):
            return "out of memory"
        if isinstance(seen, OSError) and seen.errno is not None:
            return CAUSES.get(seen.errno, seen.strerror or errno.errorcode.get(seen.errno, str(seen.errno)))
        seen = seen.__cause__ or seen.__context__
    first_line = (str(error).strip().splitlines() or [""])[0][:120]
    return f"{type(error).__name__}: {first_line}" if first_line else type(error).__name__


@contextlib.contextmanager
def writing(path: Path, intact: str = "") -> Iterator[None]:
    """Any failure inside (OSError, torch's RuntimeError, MemoryError, ...) becomes one OutputError that
    names the file and the cause, followed by `intact` (what is still safe and what to do)."""
    try:
        yield
    except OutputError:
        raise
    except Exception as error:
        raise OutputError(f"cannot write {path} ({failure_cause(error)}){intact}") from error


@contextlib.contextmanager
def atomic_text(path: Path, intact: str = "") -> Iterator[TextIO]:
    """A text file written whole to a temp file beside `path`, fsynced, then renamed over it: a reader
    sees the old content or the new, never half. The temp file never stays; failures are OutputErrors
    ending in `intact`."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with writing(path, intact), open(tmp, "w", newline="") as file:
            yield file
            file.flush()
            os.fsync(file.fileno())
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _format(value: float | int | str | None) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    return str(value) if isinstance(value, int) else f"{value:.6g}"


def record_path(csv_path: Path) -> Path:
    """results.json beside the CSV, with the same stem."""
    return csv_path.with_suffix(".json")


def write_json(path: Path, record: dict, intact: str = "") -> None:
    """Written whole to a temp file then renamed: a crash never leaves a half-written record."""
    with atomic_text(path, intact) as file:
        file.write(json.dumps(record, indent=2) + "\n")


def _csv_lines(rows: list[list[str]]) -> str:
    """Rows as csv.writer writes them (its quoting, CRLF line ends)."""
    text = io.StringIO()
    csv.writer(text).writerows(rows)
    return text.getvalue()


class ResultsWriter:
    """The per-epoch CSV (one fsynced row per epoch) and results.json beside it (same stem).

    The CSV starts as a header plus the rows of the run so far (none for a fresh run; a checkpoint's
    rows when resuming, which also drops any row written after that checkpoint), written to a temp file
    and renamed over the old one. Rows are then appended unbuffered: a row that fails half-way (disk
    full) is cut off again, so the file always ends with the last complete row."""

    def __init__(self, config: Config, record: dict, rows: list[dict], losses: tuple[str, ...]):
        self.csv_path = Path(config.csv)
        self.json_path = record_path(self.csv_path)
        self.record = record
        self.columns = csv_columns(losses)
        with atomic_text(self.csv_path) as file:
            file.write(_csv_lines([list(self.columns), *(self._cells(row) for row in rows)]))
        with writing(self.csv_path):
            self.file = open(self.csv_path, "ab", buffering=0)
        if rows:
            self.record["epochs_completed"], self.record["final_row"] = rows[-1]["epoch"], rows[-1]
        write_json(self.json_path, self.record)

    def append(self, row: dict[str, float | int | None], intact: str = "") -> None:
        """The row, then the record that points to it; failures are OutputErrors ending in `intact`."""
        data = _csv_lines([self._cells(row)]).encode()
        with writing(self.csv_path, intact):
            end = os.fstat(self.file.fileno()).st_size
            try:
                while data:
                    data = data[self.file.write(data):]  # a raw write may take only part
                os.fsync(self.file.fileno())
            except BaseException:
                os.ftruncate(self.file.fileno(), end)
                raise
        self.record["epochs_completed"] = row["epoch"]
        self.record["final_row"] = row
        write_json(self.json_path, self.record, intact)

    def _cells(self, row: dict[str, float | int | None]) -> list[str]:
        return [_format(row.get(column)) for column in self.columns]

    def close(self) -> None:
        self.file.close()


PROJECT = Path(__file__).resolve().parent


def code_version() -> dict:
    """The code that runs: in a git checkout its commit and whether tracked files differ from it (dirty),
    else a SHA-256 over the project's *.py files (names and contents)."""
    try:
        git = ["git", "-C", str(PROJECT)]
        commit = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=20)
        if commit.returncode == 0:
            changed = subprocess.run([*git, "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                                     text=True, timeout=20)
            return {"git_commit": commit.stdout.strip(), "dirty": changed.returncode != 0 or bool(changed.stdout.strip())}
    except (OSError, subprocess.SubprocessError):  # no git here
        pass
    digest = hashlib.sha256()
    for path in sorted(PROJECT.glob("*.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return {"files_sha256": digest.hexdigest()}


def provenance(command: list[str]) -> dict:
    """How a run was made: its command line (as a shell would take it) and the code's version."""
    return {"command": shlex.join(command), "code": code_version()}


def provenance_changes(saved: dict | None, current: dict) -> str | None:
    """One line for a resumed run whose command line (--resume and --overwrite aside) or code version
    differs from what made its checkpoint; None when both are the same or the checkpoint predates them."""
    if not saved:
        return None
    def bare(command: str) -> list[str]:
        return [token for token in shlex.split(command) if token not in ("--resume", "--overwrite")]
    changes = []
    if bare(saved["command"]) != bare(current["command"]):
        changes.append(f"command line {saved['command']!r} -> {current['command']!r}")
    if saved["code"] != current["code"]:
        describe = lambda code: code.get("git_commit", code.get("files_sha256", "?"))[:12] + (  # noqa: E731
            " (dirty)" if code.get("dirty") else "")
        changes.append(f"code {describe(saved['code'])} -> {describe(current['code'])}")
    return "note: this run continues with another " + "; another ".join(changes) if changes else None


def run_record(config: Config, files: list[DataFile], device: torch.device, iterations: int, made_by: dict) -> dict:
    """What results.json holds besides the rows: how to reproduce the run (its settings, command line and
    code version) and what it ran on."""
    import torch  # loaded already by the run: results.py itself serves torch-free readers (sweep.py, plots)
    return {
        "config": asdict(config),
        **made_by,
        # the protocol, and the values it set that this run uses (flags given explicitly override it)
        "protocol": {"name": config.protocol, "set": {key: value for key, value in
                                                      protocol_values(config.protocol, config.source, config.target).items()
                                                      if getattr(config, key) == value}},
        "iterations_per_epoch": iterations,
        "device": device_name(device),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": importlib.metadata.version("torchvision"),
        "data_files": [asdict(f) for f in files],
        "epochs_completed": 0,
        "final_row": None,
    }


def summary_line(row: dict[str, float | int | None], epochs: int, losses: tuple[str, ...]) -> str:
    """The one-line report of an epoch's CSV row (the losses the method computed, by their column names, then
    the accuracies)."""
    shown = " ".join(f"{name} {row[name]:.4f}" for name in losses if row.get(name) is not None)
    return (
        f"epoch {row['epoch']:3d}/{epochs} | {shown} | "
        f"source {row['source_acc']:.2f}% | target F1 {row['target_acc_f1']:.2f}% F2 {row['target_acc_f2']:.2f}% "
        f"ensemble {row['target_acc_ensemble']:.2f}% | {row['seconds']:.1f}s"
    )


SUMMARY_METRICS = {
    "target_acc_ensemble": "target (ensemble)",
    "target_acc_f1": "target (F1)",
    "target_acc_f2": "target (F2)",
    "source_acc": "source (ensemble)",
}


def seed_csv(csv_path: Path, seed: int) -> Path:
    """results.csv -> results_seed3.csv: one CSV (and .json, .pt) per seed of a multi-seed run."""
    return csv_path.with_name(f"{csv_path.stem}_seed{seed}{csv_path.suffix}")


def summary_path(csv_path: Path) -> Path:
    """results.csv -> results_summary.csv."""
    return csv_path.with_name(f"{csv_path.stem}_summary{csv_path.suffix}")


def selection_path(csv_path: Path, over_seeds: bool = False) -> Path:
    """results.csv -> results_selection.csv (one run), or results_selection_summary.csv (over seeds)."""
    return csv_path.with_name(f"{csv_path.stem}_selection{'_summary' if over_seeds else ''}{csv_path.suffix}")


def read_selection(path: Path) -> dict[str, float]:
    """STEM_selection.csv as validator -> the target accuracy at its pick ({} when there is none)."""
    try:
        with open(path, newline="", encoding="utf-8") as file:
            picks = {row["validator"]: float(row["target_acc_ensemble"]) for row in csv.DictReader(file)}
        if not all(math.isfinite(value) for value in picks.values()):
            raise ValueError("not finite")
        return picks
    except FileNotFoundError:  # a run made before validators existed
        return {}
    except (OSError, UnicodeDecodeError, KeyError, TypeError, ValueError) as error:
        raise OutputError(f"{path} is not a selection file of main.py ({type(error).__name__}); delete it and "
                          "rerun that seed with --resume to write it again") from None


def write_rows(path: Path, columns: list[str], rows: list[dict]) -> None:
    """A small CSV written whole (atomically): one line per dict, its values under `columns`."""
    with atomic_text(path) as file:
        file.write(_csv_lines([columns, *([_format(row[column]) for column in columns] for row in rows)]))


def summarize(final_rows: dict[int, dict]) -> list[dict]:
    """Per metric: mean and sample std over seeds of each seed's LAST-epoch value (never a best epoch)."""
    seeds = list(final_rows)
    summary = []
    for metric, name in SUMMARY_METRICS.items():
        values = [final_rows[seed][metric] for seed in seeds]
        mean = sum(values) / len(values)
        std = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5 if len(values) > 1 else None
        summary.append({"metric": metric, "name": name, "mean": mean, "std": std,
                        **{f"seed_{seed}": value for seed, value in zip(seeds, values)}})
    return summary


def write_summary(path: Path, summary: list[dict]) -> None:
    """summary.csv: metric, mean, std, then one column per seed; written whole, then renamed."""
    columns = ["metric", "mean", "std", *[key for key in summary[0] if key.startswith("seed_")]]
    with atomic_text(path) as file:
        cells = [[row["metric"], *(_format(row[column]) for column in columns[1:])] for row in summary]
        file.write(_csv_lines([columns, *cells]))


def summary_table(summary: list[dict]) -> str:
    """The paper's Table 1 form: mean ± std over seeds, and each seed's value."""
    seeds = [key.removeprefix("seed_") for key in summary[0] if key.startswith("seed_")]
    lines = [f"last epoch over seeds {', '.join(seeds)} (mean ± sample std):",
             f"{'':20s} {'mean ± std':>16s}   per seed"]
    for row in summary:
        spread = f"{row['mean']:.2f} ± {row['std']:.2f}" if row["std"] is not None else f"{row['mean']:.2f}"
        per_seed = ", ".join(f"{row[f'seed_{seed}']:.2f}" for seed in seeds)
        lines.append(f"{row['name']:20s} {spread:>16s}   {per_seed}")
    return "\n".join(lines)


def write_table(out: Path, cells: list[dict]) -> list[str]:
    """Table 1's form in out/table.md and out/table.csv: rows = methods, columns = pairs, each cell
    {method, pair, values (one per finished seed), expected (seeds), made_with} as mean ± sample std (n).
    Returns the markdown table's lines."""
    def text(cell: dict) -> str:
        values, n = cell["values"], len(cell["values"])
        if not values:
            return "–"
        spread = f"{statistics.fmean(values):.2f}" + (f" ± {statistics.stdev(values):.2f}" if n > 1 else "")
        return spread + (f" (n={n})" if n == cell["expected"] else f" (n={n} of {cell['expected']}, incomplete)")

    pairs = list(dict.fromkeys(cell["pair"] for cell in cells))
    by_key = {(cell["method"], cell["pair"]): cell for cell in cells}
    lines = ["| method | " + " | ".join(pairs) + " |", "|---|" + "---|" * len(pairs)]
    lines += [f"| {method} | " + " | ".join(text(by_key[method, pair]) if (method, pair) in by_key else ""
                                           for pair in pairs) + " |"
              for method in dict.fromkeys(cell["method"] for cell in cells)]
    made_with = sorted({cell["made_with"] for cell in cells})
    with atomic_text(out / "table.md") as file:
        file.write("\n".join(lines) + "\n\nmade with: " + "; ".join(made_with) + "\n")
    with atomic_text(out / "table.csv") as file:
        writer = csv.writer(file)
        writer.writerow(["method", "pair", "mean", "std", "n", "seeds", "complete", "made_with"])
        for cell in by_key.values():
            values = cell["values"]
            writer.writerow([cell["method"], cell["pair"], f"{statistics.fmean(values):.4f}" if values else "",
                             f"{statistics.stdev(values):.4f}" if len(values) > 1 else "", len(values),
                             cell["expected"], len(values) == cell["expected"], cell["made_with"]])
    return lines


def final_accuracy(record: Path, epochs: int) -> float | None:
    """A seed's results.json: the target ensemble accuracy of its last epoch once it holds `epochs` epochs,
    else None; anything but a finite number where one belongs is a OutputError naming the file and field."""
    fix = f"delete the folder {record.parent} and relaunch to run that job again"
    try:
        saved = json.loads(record.read_text())
        completed, final = saved["epochs_completed"], saved["final_row"]
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError):
        raise OutputError(f"{record} is not a results record of main.py; {fix}") from None
    if not _number(completed):
        raise OutputError(f"{record}: epochs_completed is {completed!r}, not a number; {fix}")
    if completed < epochs:
        return None
    value = final.get("target_acc_ensemble") if isinstance(final, dict) else None
    if not _number(value) or not math.isfinite(value):
        raise OutputError(f"{record}: final_row.target_acc_ensemble is {value!r}, not a finite number; {fix}")
    return float(value)


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class TensorBoardRun:
    """A run's curves in FOLDER as one TensorBoard event file, written synchronously in tensorboard's own
    record format (no writer thread, so a failed write is an OSError here, never a thread's traceback).
    It is rewritten whole from the run's rows when the run starts, so after a kill, a failed write or a
    resume each epoch is in it exactly once; then one epoch at a time, flushed; the settings as hparams at
    the end. FOLDER/run.json names the run (its CSV) that owns the folder."""

    OWNER = "run.json"

    def __init__(self, folder: Path, csv_path: Path, rows: list[dict], losses: tuple[str, ...]):
        from tensorboard.summary.writer.record_writer import RecordWriter  # tensorboard only when asked for

        self.folder, self.losses = folder, losses
        folder.mkdir(parents=True, exist_ok=True)
        for old in folder.glob("events.out.tfevents.*"):
            old.unlink()
        write_json(folder / self.OWNER, {"csv": str(csv_path.absolute())})
        self.file = open(folder / f"events.out.tfevents.{time.time():.0f}.{platform.node()}.{os.getpid()}", "wb")
        self.records = RecordWriter(self.file)
        self._write(file_version="brain.Event:2")
        for row in rows:
            self.add_epoch(row, flush=False)
        self._flush()

    @classmethod
    def owner(cls, folder: Path) -> str | None:
        """The CSV of the run whose curves FOLDER holds (None: nobody's yet, or unreadable)."""
        try:
            return json.loads((folder / cls.OWNER).read_text())["csv"]
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def _write(self, step: int = 0, **fields) -> None:
        from tensorboard.compat.proto.event_pb2 import Event

        self.records.write(Event(wall_time=time.time(), step=step, **fields).SerializeToString())

    def _flush(self) -> None:
        self.file.flush()
        os.fsync(self.file.fileno())

    def add_epoch(self, row: dict, flush: bool = True) -> None:
        """The row's losses, accuracies, label-free scores and progress as scalars at step = epoch."""
        from torch.utils.tensorboard.summary import scalar

        for name, value in row.items():
            if name != "epoch" and value is not None:
                kind = ("loss" if name in self.losses else "validator" if name in VALIDATION_COLUMNS
                        else "accuracy" if "acc" in name else "progress")
                self._write(row["epoch"], summary=scalar(f"{kind}/{name}", value))
        if flush:
            self._flush()

    def add_hparams(self, settings: dict, metrics: dict[str, float]) -> None:
        from torch.utils.tensorboard.summary import hparams, scalar

        plain = {name: value if isinstance(value, (int, float, str, bool)) else str(value) for name, value in settings.items()}
        for summary in hparams(plain, metrics):
            self._write(summary=summary)
        for name, value in metrics.items():
            self._write(summary=scalar(name, value))
        self._flush()

    def close(self) -> None:
        self.file.close()
