"""Run control: what lets a run stop at any moment and continue exactly, and never clobber another's files.

- check_output: before any data is loaded, the results can be written where asked and no earlier run's
  files would be replaced without --overwrite;
- CheckpointWriter: each epoch's checkpoint, then its CSV row, written on a background thread;
- checkpoint_payload / check_resumable / restore_run: what a checkpoint holds, whether it can
  continue this run, and putting its state back (checkpoint.py holds the file format itself);
- model_from_checkpoint / checkpoint_data: a saved model and its data, for --evaluate and pictures;
- SignalGuard / Interrupted: SIGINT and SIGTERM stop training with the last epoch intact.
"""

from __future__ import annotations

import os
import signal
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, fields, replace
from pathlib import Path

import torch

from algorithms import ALGORITHMS, SourceOnly
from checkpoint import (
    FORMAT_VERSION,
    ResumeError,
    checkpoint_path,
    config_differences,
    load_optimizer,
    restore_rng,
    rng_state,
    save_checkpoint,
)
from config import Config
from datasets import BatchStream, DataFile, Digits, load_digits
from results import ResultsWriter, record_path


class OutputError(Exception):
    """The results cannot be written where asked; the message is one line that says what to do."""


def check_output(config: Config) -> None:
    """Fail before any data is loaded or time spent if the results cannot be written where asked, or
    would overwrite an earlier run's without --overwrite (a missing folder is created)."""
    csv_path = Path(config.csv)
    try:
        csv_path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise OutputError(f"--csv {csv_path}: cannot create its folder ({error.strerror}); choose another path")
    if csv_path.suffix in (".json", ".pt"):
        raise OutputError(f"--csv {csv_path}: the record (.json) and checkpoint (.pt) are written beside the CSV; "
                          "name the CSV *.csv")
    if csv_path.is_dir():
        raise OutputError(f"--csv {csv_path} is a directory; give a file name such as {csv_path / 'results.csv'}")
    outputs = (csv_path, record_path(csv_path), checkpoint_path(csv_path))
    for path in outputs:
        if not os.access(path if path.exists() else path.parent, os.W_OK):
            raise OutputError(f"--csv {csv_path}: {path} is not writable; choose another path")
    if config.resume:
        if not checkpoint_path(csv_path).exists():
            raise OutputError(f"--resume: there is no checkpoint {checkpoint_path(csv_path)} to continue from; "
                              "run without --resume to start")
    elif not config.overwrite:
        for path in outputs:
            if path.exists():
                raise OutputError(f"--csv {csv_path}: {path} already exists; add --resume to continue that run "
                                  "or --overwrite to replace it")


class Interrupted(Exception):
    """SIGINT or SIGTERM arrived: training stopped, the last checkpoint and CSV row are intact."""

    def __init__(self, signum: int):
        super().__init__(f"interrupted by {signal.Signals(signum).name}")
        self.signum = signum
        self.exit_code = 128 + signum  # the shell's convention: 130 for SIGINT, 143 for SIGTERM
        self.epochs_saved = 0


class SignalGuard:
    """SIGINT and SIGTERM stop training at once, as Interrupted. Handlers are installed only in the main
    thread (Python allows no other) and the previous ones are restored on exit."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

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
        raise Interrupted(signum)


def _to_cpu(value):
    """A copy of a (nested) state on the CPU, detached from the live tensors that training keeps updating."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {key: _to_cpu(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_cpu(item) for item in value)
    return value


class CheckpointWriter:
    """Writes each epoch's checkpoint and then its CSV row on one background thread, so training goes on
    while ~440 MB reach the disk. The state is copied to the CPU first (on the calling thread, at the
    epoch boundary); writes happen one at a time, in epoch order; close() waits for the last one, so an
    interrupted run still finishes writing the epoch it had completed. Signals only ever reach the main
    thread, never a write in progress."""

    def __init__(self, path: Path, results: ResultsWriter):
        self.path, self.results = path, results
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint")
        self.pending: Future | None = None

    def submit(self, payload: dict, row: dict) -> None:
        self.wait()
        self.pending = self.executor.submit(self._write, _to_cpu(payload), row)

    def _write(self, payload: dict, row: dict) -> None:
        try:
            save_checkpoint(self.path, payload)
            self.results.append(row)
        except OSError as error:
            raise OutputError(f"cannot write {self.path} or its CSV row ({error.strerror}); the previous "
                              "epoch's checkpoint and rows are intact")

    def wait(self) -> None:
        if self.pending is not None:
            future, self.pending = self.pending, None
            future.result()  # re-raises a failed write here, on the training thread

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self.executor.shutdown()
            self.results.close()


def checkpoint_payload(config: Config, model: SourceOnly, streams: tuple[BatchStream, BatchStream],
                       files: list[DataFile], rows: list[dict], resumed_at: list[int]) -> dict:
    """Everything train() needs to continue after rows[-1]['epoch'] exactly as if it had never stopped."""
    return {
        "format_version": FORMAT_VERSION,
        "config": asdict(config),
        "epoch": rows[-1]["epoch"],
        "rows": rows,
        "resumed_at": resumed_at,
        "models": {"G": model.G.state_dict(), "F1": model.F1.state_dict(), "F2": model.F2.state_dict()},
        "optimizers": {"G": model.opt_g.state_dict(), "F": model.opt_f.state_dict()},
        "streams": [stream.state_dict() for stream in streams],
        "rng": rng_state(model.device),
        "data_files": {Path(f.path).name: f.md5 for f in files},
    }


def _load_networks(model: SourceOnly, checkpoint: dict) -> None:
    for name, module in (("G", model.G), ("F1", model.F1), ("F2", model.F2)):
        module.load_state_dict(checkpoint["models"][name])


def check_resumable(checkpoint: dict, config: Config, path: Path) -> None:
    """Refuses a checkpoint that cannot continue this run (other result settings, or past --epochs)."""
    differences = config_differences(checkpoint["config"], asdict(config))
    if differences:
        raise ResumeError(f"--resume: {path} was made with other settings ({'; '.join(differences)}); "
                          "use the same flags, or --overwrite to start afresh")
    if checkpoint["epoch"] > config.epochs:
        raise ResumeError(f"--resume: {path} is already at epoch {checkpoint['epoch']}, past --epochs {config.epochs}")


def restore_run(checkpoint: dict, model: SourceOnly, streams: tuple[BatchStream, BatchStream], files: list[DataFile],
                path: Path) -> None:
    """Puts a checkpoint's networks, optimisers, batch-stream positions and random states back, after
    refusing data files that changed since it was written."""
    changed = [f.path for f in files if checkpoint["data_files"].get(Path(f.path).name) != f.md5]
    if changed:
        raise ResumeError(f"--resume: the dataset files changed since {path} was written ({', '.join(changed)}); "
                          "restore them, or --overwrite to start afresh")
    _load_networks(model, checkpoint)
    load_optimizer(model.opt_g, checkpoint["optimizers"]["G"])
    load_optimizer(model.opt_f, checkpoint["optimizers"]["F"])
    for stream, state in zip(streams, checkpoint["streams"]):
        stream.load_state_dict(state)
    restore_rng(checkpoint["rng"], model.device)


def model_from_checkpoint(checkpoint: dict, device: torch.device) -> SourceOnly:
    """The trained G, F1, F2 of a checkpoint, on `device`, for evaluation (eager, no optimiser tricks)."""
    known = {f.name for f in fields(Config)}
    saved = {key: value for key, value in checkpoint["config"].items() if key in known}
    config = replace(Config(**saved), device=str(device), cuda_graph=False, compile=False)
    model = ALGORITHMS[config.method](config, device)
    _load_networks(model, checkpoint)
    return model


def checkpoint_data(checkpoint: dict, device: torch.device, data_root: str | None = None, download: bool = False,
                    allow_unverified: bool = False) -> Digits:
    """The datasets a checkpoint was trained on (its pair, its subsets), from its data root unless given."""
    saved = checkpoint["config"]
    return load_digits(data_root or saved["data_root"], download, allow_unverified or saved["allow_unverified_data"],
                       device, saved.get("source", "svhn"), saved.get("target", "mnist"),
                       saved.get("small_subsets", False), subset_seed=saved["seed"])
