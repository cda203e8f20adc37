"""Checkpoints: everything needed to continue a run exactly where its last finished epoch left it.

A checkpoint sits beside the CSV (same stem, .pt) and holds the method's networks and optimisers, every
random state (torch CPU and device, numpy, Python), both batch streams' positions, the config, the data
files' checksums and every CSV row so far. It is written atomically (temp file in the same folder,
fsync, rename), so a crash while saving leaves the previous one intact, and it is read back with
torch.load(weights_only=True): tensors and plain containers only, never pickled code. A SHA-256 of
its contents is stored inside and checked on loading, so a damaged file is refused, not resumed.
"""

from __future__ import annotations

import hashlib
import os
import random
import sys
from pathlib import Path

import numpy as np
import torch

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
    saved = {**ADDED_LATER, **saved}
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
    capturable, foreach), so a run saved without CUDA graphs can resume with them and vice versa."""
    for saved_group, group in zip(state["param_groups"], optimizer.param_groups):
        for key in ("fused", "capturable", "foreach"):
            if key in group:
                saved_group[key] = group[key]
    optimizer.load_state_dict(state)
