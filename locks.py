"""One writer per output: an exclusive lock on STEM.lock beside a run's CSV (or its TensorBoard folder),
held while the run writes.

The lock is the OS's own (flock on Linux/macOS, LockFileEx on byte 0 on Windows, both through
filelock.lock_descriptor), so the kernel lets go when its process dies however it dies. The file also
records who holds it, from byte 1 on (Windows forbids other processes to read a locked byte). A system
without native locks (no fcntl) gets filelock's SoftFileLock, which clears a dead holder's file.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Callable, Iterator

import filelock

from results import OutputError, writing

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
            raise OutputError(locked_message(csv_path, holder))
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
        raise OutputError(locked_message(csv_path, _soft_holder(path) or "another process")) from None
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


def locked_message(csv_path: Path, holder: str) -> str:
    return (f"--csv {csv_path}: another run ({holder}) is writing these results (lock {lock_path(csv_path)}); "
            "wait for it to finish or stop it, or choose another --csv")
