"""MCD training (Saito et al., CVPR 2018): the three-step loop, evaluation and the results files.

One iteration on a source batch (xs, ys) and a target batch xt:
  A. train G, F1, F2 to classify the source:        min CE(F1(G(xs)), ys) + CE(F2(G(xs)), ys)
  B. G fixed, the heads disagree on the target:     min_{F1,F2} source CE - d(F1(G(xt)), F2(G(xt)))
  C. heads fixed, G removes the disagreement:       min_G d(F1(G(xt)), F2(G(xt))), num_k times
Source and target always go through G in separate forward passes, so BatchNorm sees per-domain batch
statistics, as in the original code.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import platform
import time
from dataclasses import asdict, dataclass
from itertools import chain
from pathlib import Path
from typing import Iterator

import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from tqdm import tqdm

from datasets import BatchStream, DataFile, Digits, DigitsSplit, load_digits, to_model_input
from models import build_models

METHODS = ("mcd", "source_only")
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
    data_root: str = "./data"
    download: bool = True
    allow_unverified_data: bool = False
    device: str = "cpu"  # resolved by main.py: "cpu", "cuda", "cuda:1", "mps"
    csv: str = "results.csv"
    eval_batch_size: int = 2048


def discrepancy(logits1: torch.Tensor, logits2: torch.Tensor) -> torch.Tensor:
    """d(p1, p2): mean over batch and classes of |softmax(p1) - softmax(p2)|, computed in fp32."""
    return (logits1.float().softmax(dim=1) - logits2.float().softmax(dim=1)).abs().mean()


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
        self.config = config
        self.G, self.F1, self.F2 = build_models(device)
        # One Adam for G and one for both heads; Adam is per-parameter, so this equals the original's
        # separate optimisers for F1 and F2. weight_decay is Adam's L2 term, as in the original.
        self.opt_g = torch.optim.Adam(self.G.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        self.opt_f = torch.optim.Adam(
            chain(self.F1.parameters(), self.F2.parameters()), lr=config.lr, weight_decay=config.weight_decay
        )

    @property
    def modules(self) -> tuple[nn.Module, nn.Module, nn.Module]:
        return self.G, self.F1, self.F2

    def train_mode(self, mode: bool = True) -> None:
        for module in self.modules:
            module.train(mode)

    def heads(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3072) features -> the logits of F1 and F2, each (B, 10)."""
        return self.F1(features), self.F2(features)

    def source_loss(self, logits: tuple[torch.Tensor, torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits[0].float(), labels) + F.cross_entropy(logits[1].float(), labels)

    def step_a(self, xs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
        """A: G, F1, F2 minimise the source cross-entropy of both heads."""
        loss = self.source_loss(self.heads(self.G(xs)), ys)
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
    def evaluate(self, split: DigitsSplit, chunk_size: int) -> tuple[float, float, float]:
        """Accuracy in percent of F1, F2 and the ensemble argmax(logits1 + logits2), from one G pass."""
        self.train_mode(False)
        correct = torch.zeros(3, dtype=torch.long, device=split.labels.device)
        for start in range(0, len(split), chunk_size):
            x = to_model_input(split.images[start : start + chunk_size])
            y = split.labels[start : start + chunk_size]
            logits1, logits2 = self.heads(self.G(x))
            predictions = torch.stack([logits1.argmax(1), logits2.argmax(1), (logits1 + logits2).argmax(1)])
            correct += (predictions == y).sum(dim=1)
        self.train_mode(True)
        f1, f2, ensemble = (100.0 * c / len(split) for c in correct.tolist())
        return f1, f2, ensemble


class MCD(SourceOnly):
    """Maximum Classifier Discrepancy: step A, then B (heads maximise d), then C (G minimises d)."""

    def step_b(self, xs: torch.Tensor, ys: torch.Tensor, xt: torch.Tensor) -> torch.Tensor:
        """B: with G fixed, F1 and F2 minimise source CE - d on the target."""
        # G is fixed, so its outputs are constants: no graph through G, no wasted backward.
        # Training mode still applies dropout and updates G's BatchNorm statistics, as the original.
        with torch.no_grad():
            features_s, features_t = self.G(xs), self.G(xt)
        source_loss = self.source_loss(self.heads(features_s), ys)
        d = discrepancy(*self.heads(features_t))
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
                d = discrepancy(*self.heads(self.G(xt)))
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


class LiveLosses:
    """Running means on the progress bar without stalling the device: every few steps the sums are
    copied to the host asynchronously, and shown once that copy has landed (checked, never waited on)."""

    def __init__(self, bar: tqdm, device: torch.device, every: int = 25):
        self.bar, self.device, self.every = bar, device, every
        self.pending: tuple[list[str], int, torch.Tensor, torch.cuda.Event | None] | None = None

    def update(self, step: int, totals: dict[str, torch.Tensor]) -> None:
        if self.bar.disable:  # no terminal, no bar: nothing to copy
            return
        if self.pending is not None:
            names, count, host, event = self.pending
            if event is None or event.query():
                self.bar.set_postfix({n: f"{v / count:.4f}" for n, v in zip(names, host.tolist())}, refresh=False)
                self.pending = None
        if step % self.every == 0 and self.pending is None:
            sums = torch.stack(list(totals.values()))
            if self.device.type == "cuda":
                host = torch.empty(sums.shape, pin_memory=True).copy_(sums, non_blocking=True)
                event = torch.cuda.Event()
                event.record()
            else:
                host, event = sums.cpu(), None
            self.pending = (list(totals), step + 1, host, event)


def train_epoch(
    model: SourceOnly, data: Digits, streams: tuple[BatchStream, BatchStream], iterations: int, desc: str
) -> dict[str, float]:
    """`iterations` training steps; returns each loss averaged over the epoch (one host read, at the end)."""
    source_stream, target_stream = streams
    totals: dict[str, torch.Tensor] = {}
    bar = tqdm(range(iterations), desc=desc, leave=False, dynamic_ncols=True, disable=None)
    live = LiveLosses(bar, data.source_train.labels.device)
    for step in bar:
        s, t = source_stream.next(), target_stream.next()  # (B,) index tensors on the device
        xs = to_model_input(data.source_train.images[s])  # (B, 3, 32, 32) in [-1, 1]
        ys = data.source_train.labels[s]
        xt = to_model_input(data.target_train.images[t])  # target labels are never used
        for name, value in model.update(xs, ys, xt).items():
            totals[name] = totals[name] + value if name in totals else value.clone()
        live.update(step, totals)
    bar.close()
    means = torch.stack(list(totals.values())) / iterations
    return dict(zip(totals, means.tolist()))


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


class ResultsWriter:
    """The per-epoch CSV (one flushed row per epoch) and results.json beside it (same stem)."""

    def __init__(self, config: Config, record: dict):
        self.csv_path = Path(config.csv)
        self.json_path = record_path(self.csv_path)
        self.record = record
        self.file = open(self.csv_path, "w", newline="")
        self.writer = csv.writer(self.file)
        self.writer.writerow(CSV_COLUMNS)
        self.file.flush()
        self._write_json()

    def append(self, row: dict[str, float | int | None]) -> None:
        self.writer.writerow([_format(row[column]) for column in CSV_COLUMNS])
        self.file.flush()
        os.fsync(self.file.fileno())
        self.record["epochs_completed"] = row["epoch"]
        self.record["final_row"] = row
        self._write_json()

    def _write_json(self) -> None:
        # Written whole to a temp file then renamed: a crash never leaves a half-written record.
        tmp = self.json_path.with_name(self.json_path.name + ".tmp")
        tmp.write_text(json.dumps(self.record, indent=2) + "\n")
        os.replace(tmp, self.json_path)

    def close(self) -> None:
        self.file.close()


class OutputError(Exception):
    """The results cannot be written where asked; the message is one line that says what to do."""


def check_output(csv_path: Path) -> None:
    """Fail before any data is loaded or time spent if the results cannot be written (a missing folder is created)."""
    try:
        csv_path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise OutputError(f"--csv {csv_path}: cannot create its folder ({error.strerror}); choose another path")
    if csv_path.suffix == ".json":
        raise OutputError(f"--csv {csv_path}: the results record is written beside the CSV as .json; name the CSV *.csv")
    if csv_path.is_dir():
        raise OutputError(f"--csv {csv_path} is a directory; give a file name such as {csv_path / 'results.csv'}")
    for path in (csv_path, record_path(csv_path)):
        if not os.access(path if path.exists() else path.parent, os.W_OK):
            raise OutputError(f"--csv {csv_path}: {path} is not writable; choose another path")


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


def train(config: Config) -> dict[str, float | int | None]:
    """Train as configured, writing one CSV row per epoch; returns the last row (the result)."""
    check_output(Path(config.csv))
    device = torch.device(config.device)
    torch.manual_seed(config.seed)  # model init and dropout masks, on every device
    data = load_digits(config.data_root, config.download, config.allow_unverified_data, device)
    # Two independent index streams; their seeds derive from the run's seed.
    streams = (
        BatchStream(len(data.source_train), config.batch_size, device, seed=2 * config.seed),
        BatchStream(len(data.target_train), config.batch_size, device, seed=2 * config.seed + 1),
    )
    iterations = config.iters_per_epoch or min(len(data.source_train), len(data.target_train)) // config.batch_size
    model = ALGORITHMS[config.method](config, device)
    model.train_mode(True)

    writer = ResultsWriter(config, run_record(config, data.files, device, iterations))
    print(
        f"{config.method}: {len(data.source_train)} source / {len(data.target_train)} target training images, "
        f"{config.epochs} epochs x {iterations} iterations on {device_name(device)}"
    )
    seconds = 0.0
    row: dict[str, float | int | None] = {}
    try:
        for epoch in range(1, config.epochs + 1):
            start = time.perf_counter()
            losses = train_epoch(model, data, streams, iterations, desc=f"epoch {epoch}/{config.epochs}")
            _synchronize(device)
            seconds += time.perf_counter() - start  # training time only; evaluation is not counted

            _, _, source_acc = model.evaluate(data.source_test, config.eval_batch_size)
            target_f1, target_f2, target_ensemble = model.evaluate(data.target_test, config.eval_batch_size)
            row = {
                "epoch": epoch,
                "iterations": epoch * iterations,
                "seconds": seconds,
                "loss_source": losses["loss_source"],
                "discrepancy_b": losses.get("discrepancy_b"),
                "discrepancy_c": losses.get("discrepancy_c"),
                "source_acc": source_acc,
                "target_acc_f1": target_f1,
                "target_acc_f2": target_f2,
                "target_acc_ensemble": target_ensemble,
            }
            writer.append(row)
            print(summary_line(row, config.epochs))
    finally:
        writer.close()
    return row
