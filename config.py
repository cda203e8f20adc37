"""The settings of a run: one frozen Config, and what it sets up in the process and on the device.

Built once by main.py (or benchmark.py) and passed down to every module; saved whole in results.json
and in each checkpoint. The helpers below turn it into process-wide state (numerics, seeds) and
describe the device it runs on.
"""

from __future__ import annotations

import os
import platform
import random
from dataclasses import dataclass

import numpy as np
import torch

PRECISIONS = ("fp32", "tf32", "bf16")
PROTOCOLS = ("default", "original")
# The original code (mil-tokyo/MCD_DA) on SVHN -> MNIST: an epoch ends at the first incomplete batch of
# its 55,000 MNIST images (55,000 // 128 = 429 iterations) and training stops once 20,000 iterations
# are counted, i.e. after 47 epochs = 20,163 iterations.
ORIGINAL_SVHN_SCHEDULE = {"epochs": 47, "iters_per_epoch": 429}


@dataclass(frozen=True)
class Config:
    """Every setting of a run, in one place; built by main.py and saved with the results."""

    epochs: int = 50
    iters_per_epoch: int | None = None  # None: one pass over the smaller training set (468 for MNIST at 128)
    batch_size: int = 128  # per domain: 128 source + 128 target images per iteration
    lr: float = 2e-4
    weight_decay: float = 5e-4
    num_k: int = 4  # generator updates (step C) per iteration
    seed: int = 1
    protocol: str = "default"  # one of PROTOCOLS: what the flags not given default to (see protocol_values)
    batchnorm_init: str = "ones"  # one of models.BATCHNORM_INITS: "uniform" is PyTorch 0.2's gamma ~ U(0, 1)
    method: str = "mcd"  # one of algorithms.METHODS
    source: str = "svhn"  # one of datasets.DOMAINS
    target: str = "mnist"
    small_subsets: bool = False  # MNIST / USPS training sets: the paper's random 2,000 / 1,800 (seeded by seed)
    discrepancy: str = "l1"  # one of algorithms.DISCREPANCIES: the paper's L1, or the sliced Wasserstein discrepancy
    swd_projections: int = 128  # random directions per SWD evaluation
    data_root: str = "./data"
    download: bool = True
    allow_unverified_data: bool = False
    device: str = "cpu"  # resolved by main.py: "cpu", "cuda", "cuda:1", "mps"
    csv: str = "results.csv"
    eval_batch_size: int = 2048
    # Speed switches (resolved per device by main.py); none of them changes the mathematics.
    precision: str = "fp32"  # one of PRECISIONS: fp32 exact (TF32 off), tf32, bf16 autocast with fp32 losses
    cuda_graph: bool = False  # capture the whole iteration once and replay it (CUDA only)
    compile: bool = False  # torch.compile the training forward passes of G, F1, F2...
    compile_step: bool = False  # ...or, with compile, each step's passes and loss as one function
    channels_last: bool = False  # NHWC images and conv weights
    graph_bookkeeping: bool = False  # the loss sums and the non-finite check inside the captured graph
    paired_heads: bool = False  # F1 and F2 as one batched pair: one matrix product per layer (SVHN network)
    parallel_seeds: int = 1  # --seeds: how many seeds train side by side in one process (each as if alone)
    # Run control.
    deterministic: bool = False  # deterministic algorithms only, cuDNN autotuning off: identical reruns
    resume: bool = False  # continue from the checkpoint beside csv
    overwrite: bool = False  # replace an existing csv / checkpoint instead of refusing


def protocol_values(protocol: str, source: str, target: str) -> dict:
    """The settings a protocol fixes for a pair; flags given explicitly override them. 'original' is the
    original code's run as far as it can be reproduced (README 'Differences from the original code'):
    PyTorch 0.2's BatchNorm init and fp32 everywhere, and for pairs with SVHN its schedule (the
    schedule of its MNIST <-> USPS runs is not reproduced: those keep the default one)."""
    if protocol == "default":
        return {}
    values = {"batchnorm_init": "uniform", "precision": "fp32"}
    if "svhn" in (source, target):
        values.update(ORIGINAL_SVHN_SCHEDULE)
    return values


def configure_backends(config: Config) -> None:
    """Process-wide numerics for this run: TF32 only when precision allows it, cuDNN autotuning on CUDA
    unless the run must be deterministic."""
    tf32 = config.precision != "fp32"
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    torch.backends.cudnn.benchmark = torch.device(config.device).type == "cuda" and not config.deterministic
    if config.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS's condition for reproducibility
    torch.use_deterministic_algorithms(config.deterministic)


def seed_everything(seed: int) -> None:
    """torch (CPU and every device), numpy and Python: model init, dropout, anything else random."""
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def speed_label(config: Config) -> str:
    """How the iteration runs, in words, e.g. 'bf16, CUDA graph, compiled'."""
    flags = [config.precision]
    flags += ["CUDA graph"] if config.cuda_graph else []
    flags += [("step compiled" if config.compile_step else "compiled")] if config.compile else []
    flags += ["channels_last"] if config.channels_last else []
    flags += ["bookkeeping in the graph"] if config.graph_bookkeeping and config.cuda_graph else []
    flags += ["paired heads"] if config.paired_heads else []
    return ", ".join(flags)


def device_name(device: torch.device) -> str:
    """The device in words, for the console and the results record."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "mps":
        return "Apple MPS"
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def synchronize(device: torch.device) -> None:
    """Wait for the work queued on the device (a no-op on the CPU): before reading a clock."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()
