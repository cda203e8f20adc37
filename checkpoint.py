"""Checkpoints: everything needed to continue a run exactly where its last finished epoch left it, and the
saved model for --evaluate and pictures.

A checkpoint sits beside the CSV (same stem, .pt) and holds the method's networks and optimisers, every
random state (torch CPU and device, numpy, Python), both batch streams' positions, the config, the data
files' checksums and every CSV row so far. It is written atomically (temp file in the same folder,
fsync, rename), so a crash while saving leaves the previous one intact, and it is read back with
torch.load(weights_only=True): tensors and plain containers only, never pickled code. A SHA-256 of
its contents is stored inside and checked on loading, so a damaged file is refused, not resumed.
CheckpointWriter writes each epoch's CSV row, and the state when it is due, on a background thread.
"""

from __future__ import annotations

import hashlib
import os
import random
import sys
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, fields, replace
from pathlib import Path

import numpy as np
import torch

from algorithms import ALGORITHMS, SourceOnly
from config import Config, result_settings
from datasets import DOMAINS, BatchStream, DataFile, Digits, default_network, load_digits
from results import ResultsWriter, writing

FORMAT_VERSION = 1
# Result settings added after checkpoints were first written, with the value every earlier run had.
ADDED_LATER = {"protocol": "default", "batchnorm_init": "ones"}


# What train() needs from a checkpoint; a file missing any of them is refused (e.g. a truncated pickle).
REQUIRED_KEYS = ("config", "epoch", "rows", "resumed_at", "models", "optimizers", "streams", "rng", "data_files")


class ResumeError(Exception):
    """--resume cannot continue from this checkpoint; the message is one line that says why."""


def checkpoint_path(csv_path: Path) -> Path:
    return csv_path.with_suffix(".pt")


def payload_digest(payload: dict) -> str:
    """SHA-256 over the payload's contents in their order: tensors by dtype, shape and bytes, other
    values by repr. Equal after a save and load round trip; any flipped byte in a tensor changes it."""
    digest = hashlib.sha256()

    def feed(value) -> None:
        if isinstance(value, torch.Tensor):
            tensor = value.detach().cpu().contiguous()
            digest.update(f"tensor {tensor.dtype} {tuple(tensor.shape)}:".encode())
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
        elif isinstance(value, dict):
            digest.update(b"{")
            for key, item in value.items():
                feed(key)
                feed(item)
            digest.update(b"}")
        elif isinstance(value, (list, tuple)):
            digest.update(b"[")
            for item in value:
                feed(item)
            digest.update(b"]")
        else:
            digest.update(f"{type(value).__name__} {value!r};".encode())

    feed(payload)
    return digest.hexdigest()


def save_checkpoint(path: Path, payload: dict) -> None:
    """Atomic and durable: a reader sees the old checkpoint or the new one, never a partial file."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save({**payload, "checksum": payload_digest(payload)}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    if sys.platform != "win32":  # make the rename itself durable (Windows cannot open a folder for this)
        folder = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)


def load_checkpoint(path: Path, flag: str = "--resume", verify: bool = True) -> dict:
    """The checkpoint at path; `flag` (--resume, --evaluate) names what asked for it in the error.
    verify=False maps the tensors without reading them and skips the checksum: for a quick look at
    the config and epoch of a file that is verified when it is really loaded."""
    fix = "run again with --overwrite to start afresh" if flag == "--resume" else "give a .pt file written by main.py"
    if not path.is_file():
        raise ResumeError(f"{flag}: there is no checkpoint {path}; {fix}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=not verify)
    except Exception as error:  # truncated, corrupt, or not a checkpoint at all
        raise ResumeError(f"{flag}: {path} is not a readable checkpoint ({type(error).__name__}); {fix}")
    if not isinstance(checkpoint, dict) or checkpoint.get("format_version") != FORMAT_VERSION:
        raise ResumeError(f"{flag}: {path} is not a checkpoint of this program (format {FORMAT_VERSION}); {fix}")
    missing = [key for key in REQUIRED_KEYS if key not in checkpoint]
    if missing:
        raise ResumeError(f"{flag}: {path} is incomplete (no {', '.join(missing)}); {fix}")
    expected = checkpoint.pop("checksum", None)  # absent only in checkpoints written before it existed
    if verify and expected is not None and payload_digest(checkpoint) != expected:
        raise ResumeError(f"{flag}: {path} is damaged (its contents do not match its checksum); {fix}")
    return checkpoint


def config_differences(saved: dict, current: dict, keys: tuple[str, ...]) -> list[str]:
    """The result-changing settings (`keys`) in which `current` differs from the checkpoint's config."""
    differences = [f"{key} {saved.get(key)!r} -> {current[key]!r}" for key in keys if saved.get(key) != current[key]]
    saved_device, device = torch.device(saved["device"]).type, torch.device(current["device"]).type
    if saved_device != device:  # the batch streams' generators and the RNG states are per device type
        differences.append(f"device {saved_device!r} -> {device!r}")
    return differences


def rng_state(device: torch.device) -> dict:
    """Every random generator a run can touch, as tensors and plain values (loadable with weights_only)."""
    _, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    device_state = None
    if device.type == "cuda":
        device_state = torch.cuda.get_rng_state(device)
    elif device.type == "mps":
        device_state = torch.mps.get_rng_state()
    return {
        "torch": torch.get_rng_state(),
        "device": device_state,
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "position": int(position),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)},
        "python": {"version": version, "internal": list(internal), "gauss_next": gauss_next},
    }


def restore_rng(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda":
        torch.cuda.set_rng_state(state["device"], device)
    elif device.type == "mps":
        torch.mps.set_rng_state(state["device"])
    numpy = state["numpy"]
    np.random.set_state(("MT19937", numpy["keys"].numpy().astype(np.uint32), numpy["position"],
                         numpy["has_gauss"], numpy["cached_gaussian"]))
    python = state["python"]
    random.setstate((python["version"], tuple(python["internal"]), python["gauss_next"]))


def load_optimizer(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Loads the saved moments and step counts but keeps this run's implementation switches (fused,
    capturable, foreach) and memory layout, so a run saved without CUDA graphs or channels_last can resume
    with them and vice versa (load_state_dict converts dtype and device, not strides, which the fused
    kernel needs to match its parameter's)."""
    for saved_group, group in zip(state["param_groups"], optimizer.param_groups):
        for key in ("fused", "capturable", "foreach"):
            if key in group:
                saved_group[key] = group[key]
    optimizer.load_state_dict(state)
    for parameter, moments in optimizer.state.items():
        for key, value in moments.items():
            if value.shape == parameter.shape and value.stride() != parameter.stride():
                moments[key] = torch.empty_like(parameter, dtype=value.dtype).copy_(value)


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
    """Each epoch's CSV row, and the training state when it is due, written on one background thread, so
    training goes on while ~440 MB reach the disk. Every epoch's state is copied to the host first
    (HostStaging, at the epoch boundary), so that a run that stops before the next write still writes its
    last finished epoch (write_latest). Writes happen one at a time, in epoch order, and the next copy waits
    for the previous write, whose buffers it reuses; close() waits for the last one. Signals only ever reach
    the main thread, never a write in progress."""

    def __init__(self, path: Path, results: ResultsWriter):
        self.path, self.results = path, results
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint")
        self.pending: Future | None = None
        self.staging = HostStaging()
        self.unwritten: tuple[dict, torch.cuda.Event | None, str] | None = None  # a staged state not on disk yet

    def submit(self, payload: dict, row: dict, write_state: bool) -> None:
        self.wait()
        intact = ("; the epochs before it are saved: free some space, then continue with --resume" if row["epoch"] > 1
                  else "; no epoch was saved yet: free some space, then start again with --overwrite")
        with writing(self.path, intact):  # the host copy can run out of memory
            state, copied = self.staging.stage(payload)
        self.unwritten = None if write_state else (state, copied, intact)
        self.pending = self.executor.submit(self._write, state if write_state else None, copied, row, intact)

    def _write(self, payload: dict | None, copied: torch.cuda.Event | None, row: dict, intact: str) -> None:
        if payload is not None:
            self._save(payload, copied, intact)
        self.results.append(row, intact)

    def write_latest(self) -> None:
        """The last epoch's staged state, when it was not written yet (a run stopping between writes)."""
        self.wait()
        if self.unwritten is not None:
            (state, copied, intact), self.unwritten = self.unwritten, None
            self._save(state, copied, intact)

    def _save(self, state: dict, copied: torch.cuda.Event | None, intact: str) -> None:
        """A staged state to disk, once its host copy is complete."""
        if copied is not None:
            copied.synchronize()
        with writing(self.path, intact):
            save_checkpoint(self.path, state)

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
                       files: list[DataFile], classes: tuple[str, ...], rows: list[dict], resumed_at: list[int],
                       provenance: dict) -> dict:
    """Everything train() needs to continue after rows[-1]['epoch'] exactly as if it had never stopped:
    the method's whole state_dict (every network and buffer) and every optimiser, by name; the class
    names its labels index; and the command line and code version that made it (results.provenance).
    A finished run with --final-state weights keeps its networks and record only (`weights_only`)."""
    weights_only = config.final_state == "weights" and rows[-1]["epoch"] == config.epochs
    return {
        "format_version": FORMAT_VERSION,
        "config": asdict(config),
        "classes": list(classes),
        "provenance": provenance,
        "epoch": rows[-1]["epoch"],
        "rows": rows,
        "resumed_at": resumed_at,
        "models": model.state_dict(),
        "optimizers": {} if weights_only else {name: state.state_dict() for name, state in model.optimizers.items()},
        "streams": [] if weights_only else [stream.state_dict() for stream in streams],
        "rng": None if weights_only else rng_state(model.device),
        "data_files": {Path(f.path).name: f.md5 for f in files},
        "weights_only": weights_only,
    }


def _saved_networks(checkpoint: dict) -> dict[str, torch.Tensor]:
    """The method's saved state_dict. Checkpoints written before methods saved their whole state_dict hold
    one per network ({"G": {...}, "F1": ..., "F2": ...}): those are read as prefixes."""
    saved = checkpoint["models"]
    if all(isinstance(value, dict) for value in saved.values()):
        saved = {f"{network}.{key}": value for network, state in saved.items() for key, value in state.items()}
    return saved


def saved_config(checkpoint: dict) -> dict:
    """A checkpoint's settings, with the value every run had for those added after it was written (the
    network was then always the pair's default)."""
    saved = {**ADDED_LATER, **checkpoint["config"]}
    if "network" not in saved:
        saved["network"] = default_network(saved.get("source", "svhn"), saved.get("target", "mnist"))
    return saved


def _load_networks(model: SourceOnly, checkpoint: dict, path: Path | None) -> None:
    """The saved state_dict into the method."""
    saved = _saved_networks(checkpoint)
    expected = model.state_dict().keys()
    missing, unexpected = sorted(expected - saved.keys()), sorted(saved.keys() - expected)
    if missing or unexpected:
        raise ResumeError(f"{path or 'the checkpoint'} does not hold this method's networks (missing {missing[:3]}, unexpected "
                          f"{unexpected[:3]}); use the checkpoint of a {checkpoint['config']['method']} run")
    model.load_state_dict(saved)


def check_resumable(checkpoint: dict, config: Config, path: Path) -> None:
    """Refuses a checkpoint that cannot continue this run (other result settings, or past --epochs)."""
    differences = config_differences(saved_config(checkpoint), asdict(config), result_settings())
    if differences:
        raise ResumeError(f"--resume: {path} was made with other settings ({'; '.join(differences)}); "
                          "use the same flags, or --overwrite to start afresh")
    if checkpoint["epoch"] > config.epochs:
        raise ResumeError(f"--resume: {path} is already at epoch {checkpoint['epoch']}, past --epochs {config.epochs}")
    if checkpoint.get("weights_only") and checkpoint["epoch"] < config.epochs:
        raise ResumeError(f"--resume: {path} keeps the weights only (--final-state weights), not what training needs "
                          f"to go on past epoch {checkpoint['epoch']}; --overwrite trains afresh")


def restore_run(checkpoint: dict, model: SourceOnly, streams: tuple[BatchStream, BatchStream], files: list[DataFile],
                path: Path) -> None:
    """Puts a checkpoint's networks, optimisers, batch-stream positions and random states back, after
    refusing data files that changed since it was written."""
    changed = [f.path for f in files if checkpoint["data_files"].get(Path(f.path).name) != f.md5]
    if changed:
        raise ResumeError(f"--resume: the dataset files changed since {path} was written ({', '.join(changed)}); "
                          "restore them, or --overwrite to start afresh")
    _load_networks(model, checkpoint, path)
    if checkpoint.get("weights_only"):  # a finished run (check_resumable): nothing more to train
        return
    missing = sorted(model.optimizers.keys() - checkpoint["optimizers"].keys())
    if missing:
        raise ResumeError(f"--resume: {path} holds no state for the optimiser(s) {missing}; --overwrite to start afresh")
    for name, optimizer in model.optimizers.items():
        load_optimizer(optimizer, checkpoint["optimizers"][name])
    for stream, state in zip(streams, checkpoint["streams"]):
        stream.load_state_dict(state)
    restore_rng(checkpoint["rng"], model.device)


def _class_count(checkpoint: dict) -> int:
    """How many classes the saved heads tell apart (the rows of F1's last matrix)."""
    return [value for key, value in _saved_networks(checkpoint).items() if key.startswith("F1.") and value.ndim == 2][-1].shape[0]


def class_names(checkpoint: dict) -> tuple[str, ...]:
    """The names of the classes a checkpoint's labels index: recorded in it (since the one-run redesign), else
    its source dataset's, else the class numbers."""
    if "classes" in checkpoint:
        return tuple(checkpoint["classes"])
    source = saved_config(checkpoint).get("source", "svhn")
    return DOMAINS[source].classes if source in DOMAINS else tuple(str(k) for k in range(_class_count(checkpoint)))


def model_from_checkpoint(checkpoint: dict, device: torch.device, path: Path | None = None) -> SourceOnly:
    """The trained method of a checkpoint, on `device`, for evaluation (eager, no CUDA graph, not compiled);
    its class count is its heads' (the last matrix of F1)."""
    known = {f.name for f in fields(Config)}
    saved = {key: value for key, value in saved_config(checkpoint).items() if key in known}
    config = replace(Config(**saved), device=str(device), cuda_graph=False, compile=False)
    model = ALGORITHMS[config.method](config, _class_count(checkpoint), device, 1)
    _load_networks(model, checkpoint, path)
    return model


def checkpoint_data(checkpoint: dict, device: torch.device, data_root: str | None = None, download: bool = False,
                    allow_unverified: bool = False) -> Digits:
    """The datasets a checkpoint was trained on (its pair, its subsets), from its data root unless given."""
    saved = saved_config(checkpoint)
    return load_digits(data_root or saved["data_root"], download, allow_unverified or saved["allow_unverified_data"],
                       device, saved.get("source", "svhn"), saved.get("target", "mnist"), saved["network"],
                       saved.get("small_subsets", False), subset_seed=saved["seed"])
