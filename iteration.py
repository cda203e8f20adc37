"""One training iteration, fast and watched: the CUDA graph around update(), async host reads, checks.

TrainStep gathers a batch on the device by index and calls the method's update(); with
config.cuda_graph it captures that whole iteration once and replays it (its docstring holds the rules
update() keeps to for that). Reading a value from the GPU
stalls it, so everything the loop shows or checks per iteration comes back without a wait: HostCopy
(an asynchronous copy to pinned memory with an event), LiveLosses (running means for the progress
bar) and NonFiniteWatch (the first iteration whose losses are NaN or infinite, kept on the device).

Several seeds can train side by side in one process (--parallel-seeds): each run's turn happens inside
its Lane, with its own random generators (SeedRandomness) and, on CUDA, its own stream, so that the
runs' kernels and graph replays overlap on the GPU while each seed stays exactly the run it is alone.
"""

from __future__ import annotations

import contextlib
import time
from typing import Iterator

import torch
from tqdm import tqdm

from algorithms import SourceOnly
from checkpoint import restore_rng, rng_state
from config import synchronize
from datasets import DigitsSplit


class HostCopy:
    """A device value copied to the host without waiting for it: ready() says whether it has landed."""

    def __init__(self, value: torch.Tensor):
        if value.device.type == "cuda":
            self.host = torch.empty(value.shape, dtype=value.dtype, pin_memory=True).copy_(value, non_blocking=True)
            self.event: torch.cuda.Event | None = torch.cuda.Event()
            self.event.record()
        else:  # a copy, not a view: the value goes on changing in place
            self.host, self.event = value.detach().clone(), None

    def ready(self) -> bool:
        return self.event is None or self.event.query()


class LossTally:
    """An epoch's loss sums (in the order of update()'s dict) and its first non-finite iteration, kept on
    the device and updated in place by a few kernels after each iteration. reset() starts an epoch; one
    host read at its end gives the means."""

    def __init__(self, device: torch.device):
        self.names: list[str] = []
        self.sums: torch.Tensor | None = None  # (losses,), created by the first add()
        self.count = torch.zeros((), dtype=torch.long, device=device)  # iterations added this epoch
        self.first_bad = torch.full((), -1, dtype=torch.long, device=device)  # -1: none yet

    def add(self, losses: dict[str, torch.Tensor]) -> None:
        stacked = torch.stack(list(losses.values()))
        if self.sums is None:
            self.names, self.sums = list(losses), torch.zeros_like(stacked)
        self.sums += stacked
        bad = ~torch.isfinite(stacked).all()
        self.first_bad.copy_(torch.where(bad & (self.first_bad < 0), self.count, self.first_bad))
        self.count += 1

    def reset(self) -> None:
        if self.sums is not None:
            self.sums.zero_()
        self.count.zero_()
        self.first_bad.fill_(-1)

    def means(self, iterations: int) -> dict[str, float]:
        return dict(zip(self.names, (self.sums / iterations).tolist()))


class LiveLosses:
    """Running means on the progress bar without stalling the device: every few steps the sums are
    copied to the host asynchronously, and shown once that copy has landed (checked, never waited on)."""

    def __init__(self, bar: tqdm, every: int = 25):
        self.bar, self.every = bar, every
        self.pending: tuple[list[str], int, HostCopy] | None = None

    def update(self, step: int, tally: LossTally) -> None:
        if self.bar.disable or tally.sums is None:  # no terminal, no bar: nothing to copy
            return
        if self.pending is not None:
            names, count, copy = self.pending
            if copy.ready():
                self.bar.set_postfix({n: f"{v / count:.4f}" for n, v in zip(names, copy.host.tolist())}, refresh=False)
                self.pending = None
        if step % self.every == 0 and self.pending is None:
            self.pending = (tally.names, step + 1, HostCopy(tally.sums))


class NonFiniteLoss(Exception):
    """A loss became NaN or infinite at `iteration` (1-based) of the epoch; training stops, keeping the
    last good checkpoint (train.py turns it into a RunStopped that names the run's files)."""

    def __init__(self, iteration: int):
        super().__init__(f"non-finite loss at iteration {iteration}")
        self.iteration = iteration


def finite_weights(model: SourceOnly) -> bool:
    """Whether every parameter and buffer (BatchNorm statistics) of the method's networks is finite: losses
    can stay finite while a huge step leaves the weights at inf, and such a model must never be
    evaluated and checkpointed as good. One host read, once per epoch."""
    tensors = [t for t in model.state_dict().values() if t.is_floating_point()]
    return bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all())


class NonFiniteWatch:
    """Stops at the first iteration whose losses are not finite (a LossTally's first_bad) without a host
    sync per step: on CUDA the index is read every `every` steps through an asynchronous copy, and once
    more, synchronously, at the end of the epoch; on a CPU, where reading costs nothing, every step."""

    def __init__(self, tally: LossTally, every: int = 25):
        self.tally = tally
        self.cuda = tally.first_bad.device.type == "cuda"
        self.every = every if self.cuda else 1
        self.pending: HostCopy | None = None

    def update(self, step: int) -> None:
        if not self.cuda:
            self._raise_if_bad(int(self.tally.first_bad))
            return
        if self.pending is not None and self.pending.ready():
            self._raise_if_bad(int(self.pending.host))
            self.pending = None
        if step % self.every == 0 and self.pending is None:
            self.pending = HostCopy(self.tally.first_bad)

    def finish(self) -> None:
        self._raise_if_bad(int(self.tally.first_bad))

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

    What update() may do, to be capturable (the one place this is written down): only work queued on
    the device: no host reads (.item(), bool() or print of a tensor, .cpu()), no shapes or control flow
    that depend on tensor values, no new CPU tensors fed to the device; state that changes from one
    iteration to the next (step counters, schedules) lives in device tensors changed in place; random
    draws only from torch's generators. The optimisers are built capturable (algorithms.SourceOnly.adam).
    """

    WARMUP = 3

    def __init__(self, model: SourceOnly, source: DigitsSplit, target: DigitsSplit):
        self.model, self.source, self.target = model, source, target
        self.tally = LossTally(model.device)
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
        """One iteration; its losses are returned and added to self.tally."""
        self.calls += 1
        if not self.model.config.cuda_graph:
            losses = self.iteration(s, t)
        elif self.graph is None and self.calls <= self.WARMUP:
            current = torch.cuda.current_stream(self.model.device)
            self.side_stream.wait_stream(current)
            with torch.cuda.stream(self.side_stream):
                losses = self.iteration(s, t)
            current.wait_stream(self.side_stream)
        else:
            if self.graph is None:
                self._capture(s, t)
            self.static_s.copy_(s)
            self.static_t.copy_(t)
            self.graph.replay()
            losses = self.static_losses
        self.tally.add(losses)
        return losses

    def _capture(self, s: torch.Tensor, t: torch.Tensor) -> None:
        """Record one iteration (capturing runs nothing: the replay that follows is this iteration)."""
        start = time.perf_counter()
        self.static_s, self.static_t = s.clone(), t.clone()
        graph = torch.cuda.CUDAGraph()
        # stream: this step's own (each seed has one), not the capture stream torch.cuda.graph shares
        # across the process. cuBLAS keeps a workspace per (handle, stream) and a graph bakes in the one
        # it captured with, so graphs captured on one shared stream would share a workspace and seeds
        # replaying concurrently could overwrite each other's split-K partial sums.
        # thread_local: the checkpoint writer thread waits on a CUDA event (CheckpointWriter._write); in
        # the default global mode such a call from another thread during the capture invalidates it.
        with torch.cuda.graph(graph, stream=self.side_stream, capture_error_mode="thread_local"):
            self.static_losses = self.iteration(self.static_s, self.static_t)
        self.graph = graph
        synchronize(self.model.device)
        self.capture_seconds = time.perf_counter() - start


class SeedRandomness:
    """One seed's random generators while several seeds share a process. Created right after the seed's
    model is initialised (or restored), it takes the process's generators as they are then; inside
    active() they are this seed's again, and on leaving, where they got to is kept for next time. So
    every dropout mask and SWD direction of a seed is drawn from its own sequence, in the order it
    would be drawn alone, whatever the other seeds do in between.

    On CUDA the seed gets its own Philox state object (Generator.clone_state) which the default
    generator points to inside active() (graphsafe_set_state): a CUDA graph captured there registers
    that state, so every replay advances this seed's offset only, even with other seeds' graphs
    replaying concurrently on other streams."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda_state: torch.Generator | None = None
        if device.type == "cuda":
            self.cuda_state = self._cuda_generator().clone_state()
        self.state = rng_state(device)

    def _cuda_generator(self) -> torch.Generator:
        index = self.device.index if self.device.index is not None else torch.cuda.current_device()
        return torch.cuda.default_generators[index]

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        previous = None
        if self.cuda_state is not None:
            generator = self._cuda_generator()
            previous = generator.graphsafe_get_state()
            generator.graphsafe_set_state(self.cuda_state)
        restore_rng(self.state, self.device)
        try:
            yield
        finally:
            self.state = rng_state(self.device)
            if previous is not None:
                self._cuda_generator().graphsafe_set_state(previous)


class Lane:
    """Where one run's turn happens when it shares the process with other seeds: inside active(), its own
    random generators and, on CUDA, a stream of its own. Alone (`randomness` None) active() changes
    nothing, so a single run is exactly what it always was."""

    def __init__(self, device: torch.device, randomness: SeedRandomness | None = None):
        self.device, self.randomness = device, randomness
        self.cuda_stream = torch.cuda.Stream(device) if randomness is not None and device.type == "cuda" else None

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        with contextlib.ExitStack() as stack:
            if self.randomness is not None:
                stack.enter_context(self.randomness.active())
            if self.cuda_stream is not None:
                # after whatever the process queued before (evaluation reads the weights this run updates)
                self.cuda_stream.wait_stream(torch.cuda.current_stream(self.device))
                stack.enter_context(torch.cuda.stream(self.cuda_stream))
            yield
