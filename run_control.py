"""Run control: what lets a run stop at any moment and continue exactly, and never clobber another's files.

- check_output / check_seed_outputs: before any data is loaded, the results can be written where asked,
  no other run is writing them, and no earlier run's files would be replaced without --overwrite;
- run_lock / lock_holder: one writer per output, an exclusive OS lock on STEM.lock beside the CSV;
- CheckpointWriter: each epoch's checkpoint, then its CSV row, written on a background thread;
- checkpoint_payload / check_resumable / restore_run: what a checkpoint holds, whether it can
  continue this run, and putting its state back (checkpoint.py holds the file format itself);
- model_from_checkpoint / checkpoint_data: a saved model and its data, for --evaluate and pictures;
- SignalGuard / Interrupted: SIGINT and SIGTERM stop training with the last epoch intact;
- RunStopped: a run that stopped before its end, with what the message needs.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, fields, replace
from pathlib import Path
from typing import Callable, Iterator

import filelock
import torch

from algorithms import ALGORITHMS, SourceOnly
from checkpoint import (
    FORMAT_VERSION,
    ResumeError,
    checkpoint_path,
    config_differences,
    load_checkpoint,
    load_optimizer,
    restore_rng,
    rng_state,
    save_checkpoint,
)
from config import Config, result_settings
from datasets import BatchStream, DataFile, Digits, load_digits
from results import OutputError, ResultsWriter, record_path, summary_path, writing


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
        raise OutputError(_locked(csv_path, holder))
    existing = [path for path in outputs if path.exists()]
    if config.resume and not checkpoint.exists():
        fix = ("start it again with --overwrite instead of --resume" if existing else "run without --resume to start")
        raise OutputError(f"--resume: there is no checkpoint {checkpoint} to continue from; {fix}")
    if not config.resume and not config.overwrite and existing:
        fix = ("add --resume to continue that run or --overwrite to replace it" if checkpoint.exists() else
               f"no checkpoint {checkpoint} is there to resume it from: add --overwrite to replace it")
        raise OutputError(f"--csv {csv_path}: {existing[0]} already exists; {fix}")


def check_seed_outputs(config: Config, seeds: list[Config]) -> None:
    """--seeds: every seed's output is checked before the first seed trains. With --resume a seed goes
    on from its checkpoint (whose settings must match) or, having none, starts afresh; but a seed whose
    CSV holds epochs without a checkpoint is refused: finished results are never replaced silently."""
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
        elif _holds_rows(Path(each.csv)):
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


# ---------------------------------------------------------------------------------------------------
# One writer per output: an exclusive lock on STEM.lock beside the CSV, held while the run writes.
# The lock is the OS's own (flock on Linux/macOS, LockFileEx on byte 0 on Windows, both through
# filelock.lock_descriptor), so the kernel lets go when its process dies however it dies. The file
# also records who holds it, from byte 1 on (Windows forbids other processes to read a locked byte).
# A system without native locks (no fcntl) gets filelock's SoftFileLock, which clears a dead holder's file.

NATIVE_LOCKS = sys.platform == "win32" or filelock.unix_has_fcntl
_HELD: dict[Path, Callable[[], None]] = {}  # lock files this process holds -> how to let go of each


def lock_path(csv_path: Path) -> Path:
    """results.csv -> results.lock."""
    return csv_path.with_suffix(".lock")


def lock_holder(csv_path: Path) -> str | None:
    """Who holds the lock of this output, e.g. 'pid 4242, started 2026-11-29 10:15:02'; None when it is
    free, held by this process, or left by a process that died."""
    path = lock_path(csv_path)
    if path.absolute() in _HELD:
        return None
    if not NATIVE_LOCKS:
        return _soft_holder(path)
    try:
        fd = os.open(path, os.O_RDWR)
    except OSError:  # no lock file: nobody holds it
        return None
    try:
        return None if filelock.lock_descriptor(fd, blocking=False) else _holder(fd)  # closing lets go again
    finally:
        os.close(fd)


def refuse_if_training(checkpoint: Path, flag: str) -> None:
    """OutputError when the run that writes this checkpoint still holds its lock: read it once it ends."""
    holder = lock_holder(checkpoint)
    if holder:
        raise OutputError(f"{flag}: {checkpoint} belongs to a run that is still training ({holder}); use it once "
                          "that run has finished")


@contextlib.contextmanager
def run_lock(csv_path: Path) -> Iterator[None]:
    """Holds the output's lock inside the block (re-entrant within this process), else OutputError at
    once. The lock file is removed on the way out; one left by a killed process no longer locks."""
    path = lock_path(csv_path).absolute()
    if path in _HELD:
        yield
        return
    _HELD[path] = _acquire(path, csv_path) if NATIVE_LOCKS else _acquire_soft(path, csv_path)
    try:
        yield
    finally:
        _HELD.pop(path)()


def _acquire(path: Path, csv_path: Path) -> Callable[[], None]:
    while True:
        with writing(path):
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        if not filelock.lock_descriptor(fd, blocking=False):
            holder = _holder(fd)
            os.close(fd)
            raise OutputError(_locked(csv_path, holder))
        try:
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)  # its holder removed that file as we opened it: lock the one at the path now
    record = json.dumps({"pid": os.getpid(), "started": time.strftime("%Y-%m-%d %H:%M:%S")})
    with writing(path):
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, b"\n" + record.encode())

    def release() -> None:
        with contextlib.suppress(OSError):  # Windows keeps a file that is open: it stays, unlocked, and is reused
            path.unlink()  # while still holding it (Linux, macOS), so no other process can have it
        os.close(fd)
    return release


def _holder(fd: int) -> str:
    try:
        os.lseek(fd, 1, os.SEEK_SET)
        info = json.loads(os.read(fd, 4096))
        return f"pid {info['pid']}, started {info['started']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"


def _acquire_soft(path: Path, csv_path: Path) -> Callable[[], None]:
    lock = filelock.SoftFileLock(path, timeout=0)
    try:
        lock.acquire()
    except filelock.Timeout:
        raise OutputError(_locked(csv_path, _soft_holder(path) or "another process")) from None
    return lock.release


def _soft_holder(path: Path) -> str | None:
    probe = filelock.SoftFileLock(path, timeout=0)
    try:
        probe.acquire()  # also clears the file of a holder that died
        probe.release()
        return None
    except filelock.Timeout:
        pass
    try:
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(path.stat().st_mtime))
        return f"pid {probe.pid}, started {started}"
    except OSError:
        return "another process"


def _locked(csv_path: Path, holder: str) -> str:
    return (f"--csv {csv_path}: another run ({holder}) is writing these results (lock {lock_path(csv_path)}); "
            "wait for it to finish or stop it, or choose another --csv")


class Interrupted(BaseException):
    """SIGINT or SIGTERM arrived: training stopped, the last checkpoint and CSV row are intact. A
    BaseException, like KeyboardInterrupt, so that no `except Exception` mistakes it for a failure."""

    def __init__(self, signum: int):
        super().__init__(f"interrupted by {signal.Signals(signum).name}")
        self.signum = signum
        self.exit_code = 128 + signum  # the shell's convention: 130 for SIGINT, 143 for SIGTERM


class RunStopped(Exception):
    """Training stopped before its end (a signal, a non-finite loss or weights), with the last checkpoint
    and CSV row intact: why (`cause`), which run's files (`csv`) hold how many epochs (`epochs_saved`),
    the process's exit code, and `advice` for a failure ("" for a signal: main.py says how to go on)."""

    def __init__(self, cause: str, csv: str, epochs_saved: int, exit_code: int, advice: str = ""):
        super().__init__(cause)
        self.cause, self.csv, self.epochs_saved, self.exit_code, self.advice = cause, csv, epochs_saved, exit_code, advice


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


class HostStaging:
    """The host copy of a checkpoint's state, in buffers allocated once and reused every epoch (same
    layout as the live tensors). On CUDA the buffers are pinned and filled by asynchronous copies, queued
    on the training stream before the next epoch's updates, so training goes on at once; the writer
    waits for the copies' event before it reads them. Elsewhere the copies are plain and immediate."""

    def __init__(self):
        self.buffers: dict[tuple, torch.Tensor] = {}  # by the tensor's place in the payload
        self.on_cuda = False  # whether the last stage() copied from the GPU

    def stage(self, payload: dict) -> tuple[dict, torch.cuda.Event | None]:
        """(the payload with every tensor replaced by its host copy, the event that marks the copies done)."""
        self.on_cuda = False
        state = self._copy(payload, ())
        event = None
        if self.on_cuda:
            event = torch.cuda.Event()
            event.record()
        return state, event

    def _copy(self, value, key: tuple):
        if isinstance(value, torch.Tensor):
            cuda = value.device.type == "cuda"
            self.on_cuda |= cuda
            buffer = self.buffers.get(key)
            if buffer is None or buffer.shape != value.shape or buffer.dtype != value.dtype or buffer.stride() != value.stride():
                buffer = self.buffers[key] = torch.empty_like(value, device="cpu", pin_memory=cuda)
            return buffer.copy_(value.detach(), non_blocking=cuda)
        if isinstance(value, dict):
            return {name: self._copy(item, (*key, name)) for name, item in value.items()}
        if isinstance(value, (list, tuple)):
            return type(value)(self._copy(item, (*key, index)) for index, item in enumerate(value))
        return value


class CheckpointWriter:
    """Writes each epoch's checkpoint and then its CSV row on one background thread, so training goes on
    while ~440 MB reach the disk. The state is copied to the host first (HostStaging, at the epoch
    boundary); writes happen one at a time, in epoch order, and the next copy waits for the previous
    write, whose buffers it reuses; close() waits for the last one, so an interrupted run still finishes
    writing the epoch it had completed. Signals only ever reach the main thread, never a write in progress."""

    def __init__(self, path: Path, results: ResultsWriter):
        self.path, self.results = path, results
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint")
        self.pending: Future | None = None
        self.staging = HostStaging()

    def submit(self, payload: dict, row: dict) -> None:
        self.wait()
        intact = ("; the epochs before it are saved: free some space, then continue with --resume" if row["epoch"] > 1
                  else "; no epoch was saved yet: free some space, then start again with --overwrite")
        with writing(self.path, intact):  # the host copy can run out of memory
            state, copied = self.staging.stage(payload)
        self.pending = self.executor.submit(self._write, state, copied, row, intact)

    def _write(self, payload: dict, copied: torch.cuda.Event | None, row: dict, intact: str) -> None:
        if copied is not None:
            copied.synchronize()
        with writing(self.path, intact):
            save_checkpoint(self.path, payload)
        self.results.append(row, intact)

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
    """Everything train() needs to continue after rows[-1]['epoch'] exactly as if it had never stopped:
    the method's whole state_dict (every network and buffer) and every optimiser, by name."""
    return {
        "format_version": FORMAT_VERSION,
        "config": asdict(config),
        "epoch": rows[-1]["epoch"],
        "rows": rows,
        "resumed_at": resumed_at,
        "models": model.state_dict(),
        "optimizers": {name: optimizer.state_dict() for name, optimizer in model.optimizers.items()},
        "streams": [stream.state_dict() for stream in streams],
        "rng": rng_state(model.device),
        "data_files": {Path(f.path).name: f.md5 for f in files},
    }


def _load_networks(model: SourceOnly, checkpoint: dict, path: Path | None) -> None:
    """The saved state_dict into the method. Checkpoints written before methods saved their whole
    state_dict hold one per network ({"G": {...}, "F1": ..., "F2": ...}): those are read as prefixes."""
    saved = checkpoint["models"]
    if all(isinstance(value, dict) for value in saved.values()):
        saved = {f"{network}.{key}": value for network, state in saved.items() for key, value in state.items()}
    expected = model.state_dict().keys()
    missing, unexpected = sorted(expected - saved.keys()), sorted(saved.keys() - expected)
    if missing or unexpected:
        raise ResumeError(f"{path or 'the checkpoint'} does not hold this method's networks (missing {missing[:3]}, unexpected "
                          f"{unexpected[:3]}); use the checkpoint of a {checkpoint['config']['method']} run")
    model.load_state_dict(saved)


def check_resumable(checkpoint: dict, config: Config, path: Path) -> None:
    """Refuses a checkpoint that cannot continue this run (other result settings, or past --epochs)."""
    differences = config_differences(checkpoint["config"], asdict(config), result_settings())
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
    _load_networks(model, checkpoint, path)
    missing = sorted(model.optimizers.keys() - checkpoint["optimizers"].keys())
    if missing:
        raise ResumeError(f"--resume: {path} holds no state for the optimiser(s) {missing}; --overwrite to start afresh")
    for name, optimizer in model.optimizers.items():
        load_optimizer(optimizer, checkpoint["optimizers"][name])
    for stream, state in zip(streams, checkpoint["streams"]):
        stream.load_state_dict(state)
    restore_rng(checkpoint["rng"], model.device)


def model_from_checkpoint(checkpoint: dict, device: torch.device, path: Path | None = None) -> SourceOnly:
    """The trained method of a checkpoint, on `device`, for evaluation (eager, no CUDA graph, not compiled)."""
    known = {f.name for f in fields(Config)}
    saved = {key: value for key, value in checkpoint["config"].items() if key in known}
    config = replace(Config(**saved), device=str(device), cuda_graph=False, compile=False)
    model = ALGORITHMS[config.method](config, device, 1)
    _load_networks(model, checkpoint, path)
    return model


def checkpoint_data(checkpoint: dict, device: torch.device, data_root: str | None = None, download: bool = False,
                    allow_unverified: bool = False) -> Digits:
    """The datasets a checkpoint was trained on (its pair, its subsets), from its data root unless given."""
    saved = checkpoint["config"]
    return load_digits(data_root or saved["data_root"], download, allow_unverified or saved["allow_unverified_data"],
                       device, saved.get("source", "svhn"), saved.get("target", "mnist"),
                       saved.get("small_subsets", False), subset_seed=saved["seed"])
