"""MCD training (Saito et al., CVPR 2018): the three-step loop, evaluation and the results files.

One iteration on a source batch (xs, ys) and a target batch xt:
  A. train G, F1, F2 to classify the source:        min CE(F1(G(xs)), ys) + CE(F2(G(xs)), ys)
  B. G fixed, the heads disagree on the target:     min_{F1,F2} source CE - d(F1(G(xt)), F2(G(xt)))
  C. heads fixed, G removes the disagreement:       min_G d(F1(G(xt)), F2(G(xt))), num_k times
Source and target always go through G in separate forward passes, so BatchNorm sees per-domain batch
statistics, as in the original code.

Speed (CUDA) never changes what is computed: bf16 autocast for convolutions and matrix products with
softmax, cross-entropy and d in fp32 (--precision fp32 is exact: TF32 off), fused Adam, and the whole
iteration (batch gather, steps A, B, C, all optimiser updates) captured once as a CUDA graph and replayed.
"""

from __future__ import annotations

import contextlib
import csv
import functools
import json
import os
import platform
import random
import signal
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, fields, replace
from itertools import chain
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from tqdm import tqdm

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
from datasets import BatchStream, DataFile, Digits, DigitsSplit, load_digits, to_model_input
from models import architecture_for, build_models

METHODS = ("mcd", "source_only")
DISCREPANCIES = ("l1", "swd")
PRECISIONS = ("fp32", "tf32", "bf16")
CSV_COLUMNS = (
    "epoch",
    "iterations",
    "seconds",
    "loss_source",
    "discrepancy_b",
    "discrepancy_c",
    "source_acc",
    "target_acc_f1",
    "target_acc_f2",
    "target_acc_ensemble",
)


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
    method: str = "mcd"  # one of METHODS
    source: str = "svhn"  # one of datasets.DOMAINS
    target: str = "mnist"
    small_subsets: bool = False  # MNIST / USPS training sets: the paper's random 2,000 / 1,800 (seeded by seed)
    discrepancy: str = "l1"  # one of DISCREPANCIES: the paper's L1, or the sliced Wasserstein discrepancy
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
    compile: bool = False  # torch.compile the training forward passes of G, F1, F2
    channels_last: bool = False  # NHWC images and conv weights
    # Run control.
    deterministic: bool = False  # deterministic algorithms only, cuDNN autotuning off: identical reruns
    resume: bool = False  # continue from the checkpoint beside csv
    overwrite: bool = False  # replace an existing csv / checkpoint instead of refusing


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
    flags += ["compiled"] if config.compile else []
    flags += ["channels_last"] if config.channels_last else []
    return ", ".join(flags)


def discrepancy(logits1: torch.Tensor, logits2: torch.Tensor) -> torch.Tensor:
    """d(p1, p2): mean over batch and classes of |softmax(p1) - softmax(p2)|, computed in fp32."""
    return (logits1.float().softmax(dim=1) - logits2.float().softmax(dim=1)).abs().mean()


def sliced_wasserstein_discrepancy(logits1: torch.Tensor, logits2: torch.Tensor, directions: torch.Tensor) -> torch.Tensor:
    """SWD (Lee et al., CVPR 2019): the two heads' softmax outputs (B, K) are projected on unit directions
    (K, M); each projection is sorted over the batch, so matching sorted values compares the two 1-D
    distributions (the 1-D Wasserstein-2 coupling); the result is the mean squared difference. fp32."""
    projected1 = (logits1.float().softmax(dim=1) @ directions).sort(dim=0).values  # (B, M)
    projected2 = (logits2.float().softmax(dim=1) @ directions).sort(dim=0).values
    return (projected1 - projected2).pow(2).mean()


def random_directions(classes: int, count: int, device: torch.device) -> torch.Tensor:
    """(classes, count) directions drawn uniformly on the unit sphere: normalised Gaussian columns."""
    directions = torch.randn(classes, count, device=device)
    return directions / directions.norm(dim=0, keepdim=True)


@contextlib.contextmanager
def frozen(*modules: nn.Module) -> Iterator[None]:
    """Parameters of these modules get no gradients inside the block (BatchNorm still updates its stats)."""
    params = [p for m in modules for p in m.parameters()]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


class SourceOnly:
    """G, F1 and F2 trained on the labelled source only (step A alone): the paper's baseline row."""

    def __init__(self, config: Config, device: torch.device):
        self.config, self.device = config, device
        self.G, self.F1, self.F2 = build_models(device, architecture_for(config.source, config.target))
        if config.channels_last:
            self.G.to(memory_format=torch.channels_last)
        # The training forward passes, compiled when asked. Evaluation calls the eager modules: other
        # batch shapes and eval mode would each cost a recompilation for a few milliseconds of work.
        self.g, self.f1, self.f2 = (torch.compile(m) if config.compile else m for m in self.modules)
        # One Adam for G and one for both heads; Adam is per-parameter, so this equals the original's
        # separate optimisers for F1 and F2. weight_decay is Adam's L2 term, as in the original.
        # On CUDA the fused kernel (same update, one launch per step); capturable keeps the step count
        # on the device so the update can be replayed inside a CUDA graph.
        adam = functools.partial(
            torch.optim.Adam,
            lr=config.lr,
            weight_decay=config.weight_decay,
            fused=True if device.type == "cuda" else None,
            capturable=config.cuda_graph,
        )
        self.opt_g = adam(self.G.parameters())
        self.opt_f = adam(chain(self.F1.parameters(), self.F2.parameters()))

    @property
    def modules(self) -> tuple[nn.Module, nn.Module, nn.Module]:
        return self.G, self.F1, self.F2

    def train_mode(self, mode: bool = True) -> None:
        for module in self.modules:
            module.train(mode)

    def autocast(self) -> torch.autocast:
        """bf16 convolutions and matrix products when precision is bf16; a no-op otherwise. Losses take
        .float() logits, so softmax, cross-entropy and d stay fp32. cache_enabled=False: the cast-weight
        cache must not outlive a CUDA graph capture (PyTorch's advice for autocast under graphs)."""
        return torch.autocast(
            self.device.type, dtype=torch.bfloat16, enabled=self.config.precision == "bf16", cache_enabled=False
        )

    def inputs(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) uint8 -> the model's input in [-1, 1], in G's memory format."""
        x = to_model_input(images)
        return x.contiguous(memory_format=torch.channels_last) if self.config.channels_last else x

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, features): 3072 for the SVHN network, 768 for the USPS one: G's training forward pass."""
        with self.autocast():
            return self.g(x)

    def heads(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, features) -> the logits of F1 and F2, each (B, 10)."""
        with self.autocast():
            return self.f1(features), self.f2(features)

    def source_loss(self, logits: tuple[torch.Tensor, torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits[0].float(), labels) + F.cross_entropy(logits[1].float(), labels)

    def step_a(self, xs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
        """A: G, F1, F2 minimise the source cross-entropy of both heads."""
        loss = self.source_loss(self.heads(self.features(xs)), ys)
        self.opt_g.zero_grad()
        self.opt_f.zero_grad()
        loss.backward()
        self.opt_g.step()
        self.opt_f.step()
        return loss.detach()

    def update(self, xs: torch.Tensor, ys: torch.Tensor, xt: torch.Tensor) -> dict[str, torch.Tensor]:
        """One training iteration; returns on-device losses (no host sync)."""
        return {"loss_source": self.step_a(xs, ys)}

    @torch.inference_mode()
    def eval_passes(self, images: torch.Tensor, chunk_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Eval-mode passes over (N, 3, 32, 32) uint8 images in chunks: (features (n, 3072), logits1 (n, 10),
        logits2 (n, 10)) per chunk, logits in fp32. The modules are back in training mode afterwards."""
        self.train_mode(False)
        try:
            for start in range(0, len(images), chunk_size):
                x = self.inputs(images[start : start + chunk_size])
                with self.autocast():
                    features = self.G(x)
                    logits1, logits2 = self.F1(features).float(), self.F2(features).float()
                yield features, logits1, logits2
        finally:
            self.train_mode(True)

    def predictions(self, split: DigitsSplit, chunk_size: int) -> torch.Tensor:
        """(3, N) predicted classes of F1, F2 and the ensemble argmax(logits1 + logits2), one G pass each."""
        return torch.cat([torch.stack([l1.argmax(1), l2.argmax(1), (l1 + l2).argmax(1)])
                          for _, l1, l2 in self.eval_passes(split.images, chunk_size)], dim=1)

    def evaluate(self, split: DigitsSplit, chunk_size: int) -> tuple[float, float, float]:
        """Accuracy in percent of F1, F2 and the ensemble (one host read)."""
        correct = (self.predictions(split, chunk_size) == split.labels).sum(dim=1)
        f1, f2, ensemble = (100.0 * c / len(split) for c in correct.tolist())
        return f1, f2, ensemble


class MCD(SourceOnly):
    """Maximum Classifier Discrepancy: step A, then B (heads maximise d), then C (G minimises d)."""

    def discrepancy(self, logits: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """The configured d between the heads' logits; SWD draws fresh directions on every call."""
        if self.config.discrepancy == "swd":
            directions = random_directions(logits[0].shape[1], self.config.swd_projections, logits[0].device)
            return sliced_wasserstein_discrepancy(*logits, directions)
        return discrepancy(*logits)

    def step_b(self, xs: torch.Tensor, ys: torch.Tensor, xt: torch.Tensor) -> torch.Tensor:
        """B: with G fixed, F1 and F2 minimise source CE - d on the target."""
        # G is fixed, so its outputs are constants: no graph through G, no wasted backward.
        # Training mode still applies dropout and updates G's BatchNorm statistics, as the original.
        with torch.no_grad():
            features_s, features_t = self.features(xs), self.features(xt)
        source_loss = self.source_loss(self.heads(features_s), ys)
        d = self.discrepancy(self.heads(features_t))
        loss = source_loss - d
        self.opt_f.zero_grad()
        loss.backward()
        self.opt_f.step()
        return d.detach()

    def step_c(self, xt: torch.Tensor) -> torch.Tensor:
        """C: with F1, F2 fixed, G minimises d on the target, num_k times (a new dropout mask each)."""
        total = torch.zeros((), device=xt.device)
        with frozen(self.F1, self.F2):
            for _ in range(self.config.num_k):
                d = self.discrepancy(self.heads(self.features(xt)))
                self.opt_g.zero_grad()
                d.backward()
                self.opt_g.step()
                total += d.detach()
        return total / self.config.num_k

    def update(self, xs: torch.Tensor, ys: torch.Tensor, xt: torch.Tensor) -> dict[str, torch.Tensor]:
        return {
            "loss_source": self.step_a(xs, ys),
            "discrepancy_b": self.step_b(xs, ys, xt),
            "discrepancy_c": self.step_c(xt),
        }


ALGORITHMS = {"mcd": MCD, "source_only": SourceOnly}


class HostCopy:
    """A device value copied to the host without waiting for it: ready() says whether it has landed."""

    def __init__(self, value: torch.Tensor):
        if value.device.type == "cuda":
            self.host = torch.empty(value.shape, dtype=value.dtype, pin_memory=True).copy_(value, non_blocking=True)
            self.event: torch.cuda.Event | None = torch.cuda.Event()
            self.event.record()
        else:
            self.host, self.event = value.cpu(), None

    def ready(self) -> bool:
        return self.event is None or self.event.query()


class LiveLosses:
    """Running means on the progress bar without stalling the device: every few steps the sums are
    copied to the host asynchronously, and shown once that copy has landed (checked, never waited on)."""

    def __init__(self, bar: tqdm, every: int = 25):
        self.bar, self.every = bar, every
        self.pending: tuple[list[str], int, HostCopy] | None = None

    def update(self, step: int, totals: dict[str, torch.Tensor]) -> None:
        if self.bar.disable:  # no terminal, no bar: nothing to copy
            return
        if self.pending is not None:
            names, count, copy = self.pending
            if copy.ready():
                self.bar.set_postfix({n: f"{v / count:.4f}" for n, v in zip(names, copy.host.tolist())}, refresh=False)
                self.pending = None
        if step % self.every == 0 and self.pending is None:
            self.pending = (list(totals), step + 1, HostCopy(torch.stack(list(totals.values()))))


class NonFiniteLoss(Exception):
    """A loss became NaN or infinite; training stops, keeping the last good checkpoint."""

    def __init__(self, iteration: int, epoch: int = 0):
        super().__init__(f"non-finite loss at iteration {iteration}")
        self.iteration, self.epoch = iteration, epoch


class NonFiniteWatch:
    """Finds the first iteration whose losses are not finite without a host sync per step: its index is
    kept on the device and read every `every` steps through an asynchronous copy (every step on a CPU,
    where reading costs nothing), and once more, synchronously, at the end of the epoch."""

    def __init__(self, device: torch.device, every: int = 25):
        self.device = device
        self.every = every if device.type == "cuda" else 1
        self.first_bad = torch.full((), -1, dtype=torch.long, device=device)
        self.pending: HostCopy | None = None

    def update(self, step: int, losses: dict[str, torch.Tensor]) -> None:
        bad = ~torch.isfinite(torch.stack(list(losses.values()))).all()
        self.first_bad = torch.where(bad & (self.first_bad < 0), step, self.first_bad)
        if self.device.type != "cuda":
            self._raise_if_bad(int(self.first_bad))
            return
        if self.pending is not None and self.pending.ready():
            self._raise_if_bad(int(self.pending.host))
            self.pending = None
        if step % self.every == 0 and self.pending is None:
            self.pending = HostCopy(self.first_bad)

    def finish(self) -> None:
        self._raise_if_bad(int(self.first_bad))

    @staticmethod
    def _raise_if_bad(first_bad: int) -> None:
        if first_bad >= 0:
            raise NonFiniteLoss(first_bad + 1)


class TrainStep:
    """One training iteration from two (B,) index batches: gather the images on the device, model.update.

    With config.cuda_graph the first WARMUP iterations run eagerly on a side stream (cuDNN autotuning,
    compilation, the optimisers' lazy state), the next is captured into a CUDA graph, and from then on an
    iteration is two index copies into the captured buffers and one replay: no Python, no launch gaps.
    Every iteration, the captured ones included, is a real training step; dropout masks still change
    each replay (PyTorch advances the graph's RNG offset), and the losses come back in static tensors.
    """

    WARMUP = 3

    def __init__(self, model: SourceOnly, source: DigitsSplit, target: DigitsSplit):
        self.model, self.source, self.target = model, source, target
        self.calls = 0
        self.graph: torch.cuda.CUDAGraph | None = None
        self.capture_seconds = 0.0
        if model.config.cuda_graph:
            self.side_stream = torch.cuda.Stream(model.device)

    def iteration(self, s: torch.Tensor, t: torch.Tensor) -> dict[str, torch.Tensor]:
        xs = self.model.inputs(self.source.images[s])  # (B, 3, 32, 32) in [-1, 1]
        ys = self.source.labels[s]
        xt = self.model.inputs(self.target.images[t])  # target labels are never used
        return self.model.update(xs, ys, xt)

    def __call__(self, s: torch.Tensor, t: torch.Tensor) -> dict[str, torch.Tensor]:
        self.calls += 1
        if not self.model.config.cuda_graph:
            return self.iteration(s, t)
        if self.graph is None and self.calls <= self.WARMUP:
            current = torch.cuda.current_stream(self.model.device)
            self.side_stream.wait_stream(current)
            with torch.cuda.stream(self.side_stream):
                losses = self.iteration(s, t)
            current.wait_stream(self.side_stream)
            return losses
        if self.graph is None:
            self._capture(s, t)
        self.static_s.copy_(s)
        self.static_t.copy_(t)
        self.graph.replay()
        return self.static_losses

    def _capture(self, s: torch.Tensor, t: torch.Tensor) -> None:
        """Record one iteration (capturing runs nothing: the replay that follows is this iteration)."""
        start = time.perf_counter()
        self.static_s, self.static_t = s.clone(), t.clone()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.static_losses = self.iteration(self.static_s, self.static_t)
        self.graph = graph
        _synchronize(self.model.device)
        self.capture_seconds = time.perf_counter() - start


def train_epoch(
    step: TrainStep, streams: tuple[BatchStream, BatchStream], iterations: int, desc: str
) -> dict[str, float]:
    """`iterations` training steps; returns each loss averaged over the epoch (one host read, at the end)."""
    source_stream, target_stream = streams
    totals: dict[str, torch.Tensor] = {}
    bar = tqdm(range(iterations), desc=desc, leave=False, dynamic_ncols=True, disable=None)
    live = LiveLosses(bar)
    watch = NonFiniteWatch(step.model.device)
    try:
        for i in bar:
            losses = step(source_stream.next(), target_stream.next())  # (B,) index tensors on the device
            for name, value in losses.items():
                totals[name] = totals[name] + value if name in totals else value.clone()
            watch.update(i, losses)
            live.update(i, totals)
        watch.finish()
    finally:
        bar.close()
    means = torch.stack(list(totals.values())) / iterations
    return dict(zip(totals, means.tolist()))


def batch_streams(data: Digits, config: Config) -> tuple[BatchStream, BatchStream]:
    """Two independent index streams (source, target) on the data's device; seeds derive from the run's."""
    device = data.source_train.labels.device
    return (
        BatchStream(len(data.source_train), config.batch_size, device, seed=2 * config.seed),
        BatchStream(len(data.target_train), config.batch_size, device, seed=2 * config.seed + 1),
    )


def evaluate_all(model: SourceOnly, data: Digits, chunk_size: int) -> dict[str, float]:
    """The CSV's accuracy columns: source test (ensemble) and target test (F1, F2, ensemble)."""
    _, _, source_acc = model.evaluate(data.source_test, chunk_size)
    target_f1, target_f2, target_ensemble = model.evaluate(data.target_test, chunk_size)
    return {
        "source_acc": source_acc,
        "target_acc_f1": target_f1,
        "target_acc_f2": target_f2,
        "target_acc_ensemble": target_ensemble,
    }


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "mps":
        return "Apple MPS"
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def _format(value: float | int | None) -> str:
    if value is None:
        return ""
    return str(value) if isinstance(value, int) else f"{value:.6g}"


def record_path(csv_path: Path) -> Path:
    """results.json beside the CSV, with the same stem."""
    return csv_path.with_suffix(".json")


def write_json(path: Path, record: dict) -> None:
    """Written whole to a temp file then renamed: a crash never leaves a half-written record."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp, path)


class ResultsWriter:
    """The per-epoch CSV (one fsynced row per epoch) and results.json beside it (same stem).

    The CSV starts as a header plus the rows of the run so far (none for a fresh run; a checkpoint's
    rows when resuming, which also drops any row written after that checkpoint), written to a temp file
    and renamed over the old one."""

    def __init__(self, config: Config, record: dict, rows: list[dict]):
        self.csv_path = Path(config.csv)
        self.json_path = record_path(self.csv_path)
        self.record = record
        tmp = self.csv_path.with_name(self.csv_path.name + ".tmp")
        with open(tmp, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(CSV_COLUMNS)
            writer.writerows([_format(row[column]) for column in CSV_COLUMNS] for row in rows)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.csv_path)
        self.file = open(self.csv_path, "a", newline="")
        self.writer = csv.writer(self.file)
        if rows:
            self.record["epochs_completed"], self.record["final_row"] = rows[-1]["epoch"], rows[-1]
        self._write_json()

    def append(self, row: dict[str, float | int | None]) -> None:
        self.writer.writerow([_format(row[column]) for column in CSV_COLUMNS])
        self.file.flush()
        os.fsync(self.file.fileno())
        self.record["epochs_completed"] = row["epoch"]
        self.record["final_row"] = row
        self._write_json()

    def _write_json(self) -> None:
        write_json(self.json_path, self.record)

    def close(self) -> None:
        self.file.close()


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
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        writer.writerows([_format(row[column]) if column != "metric" else row[column] for column in columns]
                         for row in summary)
    os.replace(tmp, path)


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


def run_record(config: Config, files: list[DataFile], device: torch.device, iterations: int) -> dict:
    """What results.json holds besides the rows: how to reproduce the run and what it ran on."""
    return {
        "config": asdict(config),
        "iterations_per_epoch": iterations,
        "device": device_name(device),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "data_files": [asdict(f) for f in files],
        "epochs_completed": 0,
        "final_row": None,
    }


def summary_line(row: dict[str, float | int | None], epochs: int) -> str:
    """The one-line report of an epoch's CSV row."""
    discrepancies = "" if row["discrepancy_b"] is None else (
        f" d_B {row['discrepancy_b']:.4f} d_C {row['discrepancy_c']:.4f}"
    )
    return (
        f"epoch {row['epoch']:3d}/{epochs} | loss {row['loss_source']:.4f}{discrepancies} | "
        f"source {row['source_acc']:.2f}% | target F1 {row['target_acc_f1']:.2f}% F2 {row['target_acc_f2']:.2f}% "
        f"ensemble {row['target_acc_ensemble']:.2f}% | {row['seconds']:.1f}s"
    )


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


def model_from_checkpoint(checkpoint: dict, device: torch.device) -> SourceOnly:
    """The trained G, F1, F2 of a checkpoint, on `device`, for evaluation (eager, no optimiser tricks)."""
    known = {f.name for f in fields(Config)}
    saved = {key: value for key, value in checkpoint["config"].items() if key in known}
    config = replace(Config(**saved), device=str(device), cuda_graph=False, compile=False)
    model = ALGORITHMS[config.method](config, device)
    for name, module in (("G", model.G), ("F1", model.F1), ("F2", model.F2)):
        module.load_state_dict(checkpoint["models"][name])
    return model


def checkpoint_data(checkpoint: dict, device: torch.device, data_root: str | None = None, download: bool = False,
                    allow_unverified: bool = False) -> Digits:
    """The datasets a checkpoint was trained on (its pair, its subsets), from its data root unless given."""
    saved = checkpoint["config"]
    return load_digits(data_root or saved["data_root"], download, allow_unverified or saved["allow_unverified_data"],
                       device, saved.get("source", "svhn"), saved.get("target", "mnist"),
                       saved.get("small_subsets", False), subset_seed=saved["seed"])


def _resume_from(checkpoint: dict, config: Config, path: Path) -> None:
    """Refuses a checkpoint that cannot continue this run, naming what differs."""
    differences = config_differences(checkpoint["config"], asdict(config))
    if differences:
        raise ResumeError(f"--resume: {path} was made with other settings ({'; '.join(differences)}); "
                          "use the same flags, or --overwrite to start afresh")
    if checkpoint["epoch"] > config.epochs:
        raise ResumeError(f"--resume: {path} is already at epoch {checkpoint['epoch']}, past --epochs {config.epochs}")


def _restore(checkpoint: dict, model: SourceOnly, streams: tuple[BatchStream, BatchStream], files: list[DataFile],
             path: Path) -> None:
    changed = [f.path for f in files if checkpoint["data_files"].get(Path(f.path).name) != f.md5]
    if changed:
        raise ResumeError(f"--resume: the dataset files changed since {path} was written ({', '.join(changed)}); "
                          "restore them, or --overwrite to start afresh")
    for name, module in (("G", model.G), ("F1", model.F1), ("F2", model.F2)):
        module.load_state_dict(checkpoint["models"][name])
    load_optimizer(model.opt_g, checkpoint["optimizers"]["G"])
    load_optimizer(model.opt_f, checkpoint["optimizers"]["F"])
    for stream, state in zip(streams, checkpoint["streams"]):
        stream.load_state_dict(state)
    restore_rng(checkpoint["rng"], model.device)


def train(config: Config) -> dict[str, float | int | None]:
    """Train as configured, writing a checkpoint and then a CSV row after every epoch; returns the last
    row (the result). Raises OutputError / ResumeError / DataError before anything is written,
    Interrupted on SIGINT/SIGTERM and NonFiniteLoss, both keeping the last checkpoint and CSV intact."""
    csv_path = Path(config.csv)
    saved_path = checkpoint_path(csv_path)
    check_output(config)
    checkpoint = load_checkpoint(saved_path) if config.resume else None
    if checkpoint is not None:
        _resume_from(checkpoint, config, saved_path)
    device = torch.device(config.device)
    configure_backends(config)
    seed_everything(config.seed)  # model init and dropout masks, on every device
    data = load_digits(config.data_root, config.download, config.allow_unverified_data, device,
                       config.source, config.target, config.small_subsets, subset_seed=config.seed)
    streams = batch_streams(data, config)
    iterations = config.iters_per_epoch or min(len(data.source_train), len(data.target_train)) // config.batch_size
    model = ALGORITHMS[config.method](config, device)
    model.train_mode(True)
    rows: list[dict] = []
    resumed_at: list[int] = []
    if checkpoint is not None:
        _restore(checkpoint, model, streams, data.files, saved_path)
        rows, resumed_at = checkpoint["rows"], checkpoint["resumed_at"] + [checkpoint["epoch"]]
    else:
        saved_path.unlink(missing_ok=True)  # --overwrite: no stale checkpoint beside the new CSV
    step = TrainStep(model, data.source_train, data.target_train)

    record = run_record(config, data.files, device, iterations)
    record["resumed_at_epochs"] = resumed_at
    checkpoints = CheckpointWriter(saved_path, ResultsWriter(config, record, rows))
    print(
        f"{config.method}: {len(data.source_train)} source / {len(data.target_train)} target training images, "
        f"{config.epochs} epochs x {iterations} iterations on {device_name(device)} ({speed_label(config)})"
        + (f"; resuming after epoch {rows[-1]['epoch']}" if rows else "")
    )
    if rows and rows[-1]["epoch"] == config.epochs:
        print(f"{csv_path} already holds all {config.epochs} epochs; raise --epochs to train further")
    seconds = rows[-1]["seconds"] if rows else 0.0
    epoch = rows[-1]["epoch"] if rows else 0
    try:
        with SignalGuard():
            for epoch in range(epoch + 1, config.epochs + 1):
                start = time.perf_counter()
                try:
                    losses = train_epoch(step, streams, iterations, desc=f"epoch {epoch}/{config.epochs}")
                except NonFiniteLoss as error:
                    error.epoch = epoch
                    raise
                _synchronize(device)
                seconds += time.perf_counter() - start  # training time only; evaluation is not counted
                row = {
                    "epoch": epoch,
                    "iterations": epoch * iterations,
                    "seconds": seconds,
                    "loss_source": losses["loss_source"],
                    "discrepancy_b": losses.get("discrepancy_b"),
                    "discrepancy_c": losses.get("discrepancy_c"),
                    **evaluate_all(model, data, config.eval_batch_size),
                }
                # Checkpoint first, then its row (in the background): the two always agree.
                checkpoints.submit(checkpoint_payload(config, model, streams, data.files, rows + [row], resumed_at), row)
                rows.append(row)
                print(summary_line(row, config.epochs))
    except Interrupted as error:
        error.epochs_saved = rows[-1]["epoch"] if rows else 0
        raise
    finally:
        checkpoints.close()
    from visualize import picture_path, save_confusion  # here: visualize imports this module

    save_confusion(model, data.target_test, picture_path(saved_path, "confusion"), f"{config.method}, target test, ensemble",
                   config.eval_batch_size)
    return rows[-1]
