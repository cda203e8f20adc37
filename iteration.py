"""One training iteration, fast and watched: the CUDA graph around update(), async host reads, checks.

TrainStep gathers a batch on the device by index and calls the algorithm's update(); with
config.cuda_graph it captures that whole iteration once and replays it. Reading a value from the GPU
stalls it, so everything the loop shows or checks per iteration comes back without a wait: HostCopy
(an asynchronous copy to pinned memory with an event), LiveLosses (running means for the progress
bar) and NonFiniteWatch (the first iteration whose losses are NaN or infinite, kept on the device).
"""

from __future__ import annotations

import time

import torch
from tqdm import tqdm

from algorithms import SourceOnly
from config import synchronize
from datasets import DigitsSplit


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
    """A loss (at `iteration`) or, with iteration None, a weight became NaN or infinite; training stops,
    keeping the last good checkpoint."""

    def __init__(self, iteration: int | None, epoch: int = 0):
        super().__init__("non-finite weights" if iteration is None else f"non-finite loss at iteration {iteration}")
        self.iteration, self.epoch = iteration, epoch


def check_finite_weights(model: SourceOnly) -> None:
    """NonFiniteLoss(None) unless every parameter and BatchNorm statistic of G, F1, F2 is finite: losses
    can stay finite while a huge step leaves the weights at inf, and such a model must never be
    evaluated and checkpointed as good. One host read, once per epoch."""
    tensors = [t for m in model.modules for t in m.state_dict().values() if t.is_floating_point()]
    if not bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all()):
        raise NonFiniteLoss(None)


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
        synchronize(self.model.device)
        self.capture_seconds = time.perf_counter() - start
