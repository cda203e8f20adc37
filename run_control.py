"""Run control: one object (RunFiles) owns everything a run writes and reads back, so that a run can stop at
any moment and continue exactly, and never clobber another's files.

- RunFiles: around a whole run: checks its outputs, holds their lock, turns SIGINT/SIGTERM/SIGUSR2 into a
  clean stop, restores a checkpoint on --resume, writes each epoch's checkpoint then its CSV row (in
  the background), the JSON record and TensorBoard scalars, and the run's last files;
- check_output / check_seed_outputs: before any data is loaded, the results can be written where asked,
  no other run is writing them, and no earlier run's files would be replaced without --overwrite;
- run_lock / lock_holder (locks.py): one writer per output;
- SignalGuard / Interrupted / RunStopped: a signal, or a run that stopped before its end.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import threading
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Callable, Iterator

from algorithms import ALGORITHMS, SourceOnly
from checkpoint import (CheckpointWriter, ResumeError, check_resumable, checkpoint_path, checkpoint_payload,
                        config_differences, load_checkpoint, restore_run, saved_config)
from config import Config, result_settings
from datasets import BatchStream, Digits
from figures import dataset_label, picture_path, run_title, save_confusion
from locks import lock_holder, locked_message, run_lock
from results import (OutputError, ResultsWriter, TensorBoardRun, csv_columns, failure_cause, provenance,
                     provenance_changes, record_path, run_record, selection_path, summary_path, write_rows, writing)
import validators


# The longest name written beside the CSV: --evaluate's record, as its temp file.
LONGEST_SUFFIX = "_evaluation.json.tmp"


def check_output(config: Config) -> None:
    """Fail before any data is loaded or time spent if the results cannot be written where asked, are
    being written by another run, or would overwrite an earlier run's without --overwrite (a missing
    folder is created)."""
    csv_path = Path(config.csv)
    try:
        csv_path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise OutputError(f"--csv {csv_path}: cannot create its folder ({error.strerror}); choose another path")
    if csv_path.suffix in (".json", ".pt", ".lock"):
        raise OutputError(f"--csv {csv_path}: the record (.json), checkpoint (.pt) and lock (.lock) are written "
                          "beside the CSV; name the CSV *.csv")
    if csv_path.is_dir():
        raise OutputError(f"--csv {csv_path} is a directory; give a file name such as {csv_path / 'results.csv'}")
    longest, limit = csv_path.stem + LONGEST_SUFFIX, _name_max(csv_path.parent)
    if len(os.fsencode(longest)) > limit:
        raise OutputError(f"--csv {csv_path}: the name is too long for the files written beside it ({longest} has "
                          f"{len(os.fsencode(longest))} bytes, the file system allows {limit}); choose a shorter name")
    _refuse_another_runs_names(csv_path)
    checkpoint = checkpoint_path(csv_path)
    outputs = (csv_path, record_path(csv_path), checkpoint)
    for path in outputs:
        if path.exists() and not path.is_file():  # --overwrite would put a regular file in its place
            raise OutputError(f"--csv {csv_path}: {path} is not a regular file (a device, FIFO or socket); "
                              "choose another path")
        if not os.access(path if path.exists() else path.parent, os.W_OK):
            raise OutputError(f"--csv {csv_path}: {path} is not writable; choose another path")
    holder = lock_holder(csv_path)
    if holder:
        raise OutputError(locked_message(csv_path, holder))
    existing = [path for path in outputs if path.exists()]
    if config.resume and not checkpoint.exists() and not _recorded_with_these_settings(csv_path, config):
        fix = ("start it again with --overwrite instead of --resume" if existing else "run without --resume to start")
        raise OutputError(f"--resume: there is no checkpoint {checkpoint} to continue from; {fix}")
    if not config.resume and not config.overwrite and existing:
        fix = (_advice(checkpoint, config) if checkpoint.exists() else
               f"no checkpoint {checkpoint} is there to resume it from: add --overwrite to replace it")
        raise OutputError(f"--csv {csv_path}: {existing[0]} already exists; {fix}")


def _recorded_with_these_settings(csv_path: Path, config: Config) -> bool:
    """Whether results.json beside the CSV records a run with this config's result settings: one that stopped
    before its first training state was written, which --resume then starts again from epoch 1."""
    try:
        recorded = json.loads(record_path(csv_path).read_text())["config"]
        return not config_differences(saved_config({"config": recorded}), asdict(config), result_settings())
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _advice(checkpoint: Path, config: Config) -> str:
    """What to do about an earlier run at this --csv: continue it when this command would (the same result
    settings), else name what differs."""
    try:
        differences = config_differences(saved_config(load_checkpoint(checkpoint, verify=False)), asdict(config),
                                         result_settings())
    except ResumeError:
        differences = []
    if differences:
        return (f"that run was made with other settings ({'; '.join(differences)}): choose another --csv for this "
                "one, or add --overwrite to replace it")
    return "add --resume to continue that run or --overwrite to replace it"


DERIVED = ("_selection", "_summary", "_selection_summary")  # STEM + each: CSVs a run writes beside its own


def _is_a_run(csv_path: Path) -> bool:
    """Whether csv_path is the CSV of a run of main.py: its checkpoint or record is beside it."""
    return checkpoint_path(csv_path).exists() or record_path(csv_path).exists()


def _derived_from(path: Path) -> tuple[Path, str] | None:
    """(the run's CSV, the suffix) when path is a file a run writes beside its CSV (STEM_selection.csv, ...)."""
    for suffix in DERIVED:
        if path.stem.endswith(suffix) and _is_a_run(base := path.with_name(path.stem.removesuffix(suffix) + path.suffix)):
            return base, suffix
    return None


def belongs_to_a_run(path: Path) -> bool:
    """Whether path is a run's CSV, or a file a run writes beside its CSV (STEM_selection.csv, ...)."""
    return _is_a_run(path) or _derived_from(path) is not None


def _refuse_another_runs_names(csv_path: Path) -> None:
    """A run's derived files (STEM_selection.csv, STEM_summary.csv, ...) never replace another run's
    results, and its CSV is never another run's derived file."""
    for suffix in DERIVED:
        derived = csv_path.with_name(csv_path.stem + suffix + csv_path.suffix)
        if _is_a_run(derived):
            raise OutputError(f"--csv {csv_path}: {derived}, a file this run writes, holds another run's results "
                              f"(its checkpoint or record is beside it); choose another --csv name")
    if owner := _derived_from(csv_path):
        base, suffix = owner
        raise OutputError(f"--csv {csv_path} is a file that the run {base} writes ({suffix[1:].replace('_', ' ')}); "
                          "choose another --csv name")


def check_seed_outputs(config: Config, seeds: list[Config]) -> None:
    """--seeds: every seed's output is checked before the first seed trains. With --resume a seed goes
    on from its checkpoint (whose settings must match) or, having none, starts afresh; but a seed whose
    CSV holds epochs without a checkpoint is refused: finished results are never replaced silently."""
    _refuse_another_runs_names(Path(config.csv))
    summary = summary_path(Path(config.csv))
    if summary.exists() and not (config.resume or config.overwrite):
        raise OutputError(f"--csv {config.csv}: {summary} already exists; add --resume to continue those seeds "
                          "or --overwrite to replace them")
    for each in seeds:
        path = checkpoint_path(Path(each.csv))
        if not each.resume:
            check_output(each)
        elif path.exists():
            check_output(each)
            check_resumable(load_checkpoint(path, verify=False), each, path)
        elif _holds_rows(Path(each.csv)) and not _recorded_with_these_settings(Path(each.csv), each):
            raise OutputError(f"--resume: seed {each.seed}'s {each.csv} holds finished epochs but its checkpoint {path} "
                              "is gone; restore it, or --overwrite to start every seed afresh")
        else:  # never finished an epoch: nothing to lose
            check_output(replace(each, resume=False, overwrite=True))


def _holds_rows(csv_path: Path) -> bool:
    """Whether a results CSV has a row below its header (an unreadable one counts as holding rows)."""
    try:
        with open(csv_path, "rb") as file:
            return len(file.read(1 << 16).splitlines()) > 1
    except FileNotFoundError:
        return False
    except OSError:
        return True


def _name_max(folder: Path) -> int:
    try:
        return os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):  # no pathconf on Windows, whose limit is 255 too
        return 255


class Interrupted(BaseException):
    """SIGINT, SIGTERM or SIGUSR2 arrived: training stopped, the last checkpoint and CSV row are intact. A
    BaseException, like KeyboardInterrupt, so that no `except Exception` mistakes it for a failure."""

    def __init__(self, signum: int):
        super().__init__(f"interrupted by {signal.Signals(signum).name}")
        self.signum = signum
        self.exit_code = 128 + signum  # the shell's convention: 130 for SIGINT, 143 for SIGTERM, 140 for SIGUSR2


class RunStopped(Exception):
    """Training stopped before its end (a signal, a non-finite loss or weights), with the last checkpoint
    and CSV row intact: why (`cause`), which run's files (`csv`) hold how many epochs (`epochs_saved`),
    the process's exit code, and `advice` for a failure ("" for a signal: main.py says how to go on)."""

    def __init__(self, cause: str, csv: str, epochs_saved: int, exit_code: int, advice: str = ""):
        super().__init__(cause)
        self.cause, self.csv, self.epochs_saved, self.exit_code, self.advice = cause, csv, epochs_saved, exit_code, advice


class SignalGuard:
    """SIGINT, SIGTERM and SIGUSR2 (what Slurm sends before a job's time limit, as submitit asks it to) stop
    training at once, as Interrupted. Handlers are installed only in the main thread (Python allows no
    other) and the previous ones are restored on exit. Inside deferring(), signals are noted instead, so
    that the last writes of a run are finished however many arrive."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM, *([signal.SIGUSR2] if hasattr(signal, "SIGUSR2") else []))
    deferred: list[int] | None = None  # the signals noted while deferring, else None

    def __enter__(self) -> "SignalGuard":
        self.previous = {}
        if threading.current_thread() is threading.main_thread():
            self.previous = {signum: signal.signal(signum, self._handle) for signum in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)

    @staticmethod
    def _handle(signum: int, frame) -> None:
        if SignalGuard.deferred is not None:
            SignalGuard.deferred.append(signum)
            return
        raise Interrupted(signum)

    @classmethod
    @contextlib.contextmanager
    def deferring(cls) -> Iterator[list[int]]:
        previous, cls.deferred = cls.deferred, []
        try:
            yield cls.deferred
        finally:
            cls.deferred = previous


def save_target_confusion(model: SourceOnly, data: Digits, out: Path, settings: dict, epoch: int, chunk_size: int
                          ) -> None:
    """The ensemble's confusion matrix on the target test set as a PNG, titled with the run (`settings`:
    its Config's) and the epoch of the weights."""
    predicted = model.predictions(data.target_test, chunk_size)[2].cpu().numpy()
    title = (f"{run_title(settings)}: {dataset_label(settings.get('target', 'mnist'))} test set, epoch {epoch}, "
             "ensemble of F1 and F2")
    with writing(out):
        save_confusion(predicted, data.target_test.labels.cpu().numpy(), out, title, model.classes)


class RunFiles:
    """Everything one run writes and reads back, used around the whole run (`with RunFiles(config) as run:`).

    Entering checks the outputs, takes their lock, catches SIGINT/SIGTERM/SIGUSR2 (as Interrupted) and, on
    --resume, reads the checkpoint and refuses one that cannot continue this run. start() puts the
    checkpoint back into the method and streams (or removes a stale one) and opens the writers: the CSV
    (header plus the checkpoint's rows), results.json and, with --tensorboard, a TensorBoard run.
    save_epoch() hands each epoch to the background writer: the state when due, then its CSV row. Leaving
    waits for the last write, whatever happened, and turns a signal into RunStopped."""

    def __init__(self, config: Config, command: list[str]):
        check_output(config)
        self.config, self.csv = config, Path(config.csv)
        self.saved_path = checkpoint_path(self.csv)
        self.made_by = provenance(command)
        self.rows: list[dict] = []  # the checkpoint's on --resume, then one per epoch
        self.checkpoint: dict | None = None
        self.resumed_at: list[int] = []
        self.writer: CheckpointWriter | None = None
        self.board = None
        self._held = contextlib.ExitStack()
        self.state_written = time.monotonic()  # when the training state was last written (--checkpoint-every)

    def __enter__(self) -> "RunFiles":
        with contextlib.ExitStack() as entering:
            entering.enter_context(run_lock(self.csv))
            entering.enter_context(SignalGuard())
            if self.config.resume and not self.saved_path.exists():  # check_output found its record: same settings
                print(f"note: {self.csv} stopped before its first training state was written; starting again from "
                      "epoch 1")
            elif self.config.resume:
                self.checkpoint = load_checkpoint(self.saved_path)
                check_resumable(self.checkpoint, self.config, self.saved_path)
                self.rows = list(self.checkpoint["rows"])
                self.resumed_at = self.checkpoint["resumed_at"] + [self.checkpoint["epoch"]]
            if self.config.tensorboard:  # before any file of the run is written
                self.board = self._tensorboard(entering)
            self._held = entering.pop_all()
        return self

    @property
    def epoch(self) -> int:
        """Epochs finished (and saved, or being saved)."""
        return self.rows[-1]["epoch"] if self.rows else 0

    def start(self, method: SourceOnly, streams: tuple[BatchStream, BatchStream], data: Digits, iterations: int) -> None:
        """--resume: the checkpoint's state into the method and streams; else no stale checkpoint stays.
        Then the writers, which write the CSV's header (and the rows so far) and results.json."""
        self.files, self.classes = data.files, data.classes  # what every checkpoint records of the data
        if self.checkpoint is not None:
            restore_run(self.checkpoint, method, streams, data.files, self.saved_path)
            note = provenance_changes(self.checkpoint.get("provenance"), self.made_by)
            if note:
                print(note)
        else:
            self.saved_path.unlink(missing_ok=True)  # --overwrite: no stale checkpoint beside the new CSV
        record = {**run_record(self.config, data.files, method.device, iterations, self.made_by),
                  "resumed_at_epochs": self.resumed_at}
        self.writer = CheckpointWriter(self.saved_path, ResultsWriter(self.config, record, self.rows, method.LOSSES))
        if self.rows and self.epoch == self.config.epochs:
            print(f"{self.csv} already holds all {self.config.epochs} epochs; raise --epochs to train further")

    def save_epoch(self, row: dict, method: SourceOnly, streams: tuple[BatchStream, BatchStream], iteration: dict
                   ) -> None:
        """The epoch's CSV row, and its training state when due (--checkpoint-every), in the background;
        `iteration` (how iterations ran, and why a CUDA graph was given up) goes into results.json."""
        unknown = set(row) - set(csv_columns(method.LOSSES))
        if unknown:  # never dropped silently
            raise ValueError(f"{type(method).__name__}.update returned {sorted(unknown)}, which its LOSSES "
                             f"{method.LOSSES} (the CSV's loss columns) do not name")
        payload = checkpoint_payload(self.config, method, streams, self.files, self.classes, self.rows + [row],
                                     self.resumed_at, self.made_by)
        every, now = self.config.checkpoint_every * 60, time.monotonic()
        due = every == 0 or row["epoch"] >= self.config.epochs or now - self.state_written >= every
        self.state_written = now if due else self.state_written
        self.writer.wait()  # the record is the writer thread's until its last write is done
        self.writer.results.record["iteration"] = iteration
        # The host copy of this epoch's state reuses the last epoch's buffers: a signal in the middle of it
        # would leave a state half of each. It waits until the copy and the rows agree, then stops the run.
        with SignalGuard.deferring() as arrived:
            self.writer.submit(payload, row, write_state=due)
            self.rows.append(row)
        if arrived:
            raise Interrupted(arrived[0])
        if self.board is not None:
            self._curves(lambda board: board.add_epoch(row))

    def finish(self, method: SourceOnly, data: Digits) -> None:
        """After the last epoch: the target confusion matrix, STEM_selection.csv (the epoch each validator
        picks, validators.choose) and, with --tensorboard, the settings as hparams beside the last row."""
        save_target_confusion(method, data, picture_path(self.saved_path, "confusion"), asdict(self.config), self.epoch,
                              self.config.eval_batch_size)
        write_rows(selection_path(self.csv), ["validator", "epoch", "target_acc_ensemble"], validators.choose(self.rows))
        if self.board is not None:
            settings = {name: getattr(self.config, name) for name in result_settings()}
            metrics = {f"hparam/{name}": self.rows[-1][name] for name in ("source_acc", "target_acc_ensemble")}
            self._curves(lambda board: board.add_hparams(settings, metrics))

    def _curves(self, write: Callable[[TensorBoardRun], None]) -> None:
        """A TensorBoard write; one that fails stops the curves (one warning), never the run: the next
        start rewrites them whole from the run's rows."""
        try:
            write(self.board)
        except Exception as error:
            print(f"warning: --tensorboard: the curves in {self.board.folder} stop before epoch {self.epoch} "
                  f"({failure_cause(error)}); training goes on, and --resume writes them again", file=sys.stderr)
            with contextlib.suppress(OSError):
                self.board.close()
            self.board = None

    def stopped(self, cause: str, exit_code: int = 3, advice: str = "Lower --lr, or check the data.") -> RunStopped:
        """This run stopped before its end: what to tell the user (its files, the epochs they hold)."""
        return RunStopped(cause, self.config.csv, self.epoch, exit_code, advice)

    def _tensorboard(self, held: contextlib.ExitStack) -> TensorBoardRun:
        """TENSORBOARD/STEM, this run's alone: locked like the CSV, refused when it holds another run's curves,
        then rewritten from the rows so far."""
        folder = (Path(self.config.tensorboard) / self.csv.stem).absolute()
        where = f"--tensorboard {self.config.tensorboard}: {folder}"
        try:
            folder.parent.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise OutputError(f"{where}: cannot create it ({failure_cause(error)}); choose another folder") from None
        holder = lock_holder(folder.with_suffix(".csv"))
        if holder:
            raise OutputError(f"{where} is being written by another run ({holder}); choose another --tensorboard "
                              "folder or --csv name")
        held.enter_context(run_lock(folder.with_suffix(".csv")))  # TENSORBOARD/STEM.lock
        owner = TensorBoardRun.owner(folder)
        if owner is not None and owner != str(self.csv.absolute()):
            raise OutputError(f"{where} holds the curves of another run ({owner}); choose another --tensorboard "
                              "folder or --csv name")
        try:
            return TensorBoardRun(folder, self.csv, self.rows, ALGORITHMS[self.config.method].LOSSES)
        except Exception as error:
            raise OutputError(f"{where}: cannot write ({failure_cause(error)}); choose another folder") from None

    def __exit__(self, kind, error, traceback) -> None:
        with SignalGuard.deferring() as arrived:  # the epoch being written is finished, whatever happens
            try:
                if self.writer is not None:
                    try:
                        if error is not None and not isinstance(error, OutputError):  # stopping early: keep the last epoch
                            self.writer.write_latest()
                    finally:
                        self.writer.close()
            finally:
                if self.board is not None:
                    self.board.close()
                self._held.close()  # the signal handlers, then the lock
        if isinstance(error, Interrupted):
            raise self.stopped(str(error), error.exit_code, advice="") from error
        if arrived and error is None:
            raise self.stopped(str(Interrupted(arrived[0])), 128 + arrived[0], advice="")
