"""The fast path: the speed switches applied to a method, one training iteration (eager or a CUDA graph),
and an epoch's losses watched without stalling the device.

speed_up(method, config) applies what does not change the mathematics (beyond rounding) to a method
built plainly: channels_last weights, torch.compile, and on CUDA the fused Adam kernel, capturable for
graphs. TrainStep gathers a batch on the device by index and calls the method's update(); with
config.cuda_graph it captures that whole iteration once and replays it (its docstring holds the rules
update() keeps to for that). Reading a value from the GPU stalls it, so EpochLosses sums the losses on
the device and reads them back only through asynchronous copies (HostCopy) and once at the epoch's end.
"""

from __future__ import annotations

import time

import torch
from tqdm import tqdm

from algorithms import SourceOnly
from config import Config, synchronize
from datasets import DigitsSplit, to_model_input


def speed_up(method: SourceOnly, config: Config) -> None:
    """The run's speed switches, on a method fresh from its constructor (before any step or restore: the
    optimisers create their state at the first step, in the form their flags then ask for)."""
    if config.channels_last:  # NHWC convolution weights (the inputs follow in TrainStep.batch)
        method.to(memory_format=torch.channels_last)
    if config.compile:
        for network in method.children():
            network.compile()
    if method.device.type == "cuda":
        for optimizer in method.optimizers.values():
            # The fused kernel: the same update in one launch. capturable keeps the step count on the device,
            # so that a CUDA graph can replay the update. Both are Adam's own flags, per parameter group.
            for group in [*optimizer.param_groups, optimizer.defaults]:
                group.update(fused=True, foreach=None, capturable=config.cuda_graph)


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


class NonFiniteLoss(Exception):
    """A loss became NaN or infinite at `iteration` (1-based) of the epoch; training stops, keeping the
    last good checkpoint."""

    def __init__(self, iteration: int):
        super().__init__(f"non-finite loss at iteration {iteration}")
        self.iteration = iteration


class EpochLosses:
    """An epoch's losses, summed on the device in the order of update()'s dict, with the first iteration
    whose losses are not finite. Nothing waits for the device: on CUDA that iteration is read every `every`
    steps through an asynchronous copy (every step on a CPU, where reading costs nothing), and the
    progress bar shows running means once their copy has landed. means() reads the sums once, at the end."""

    def __init__(self, device: torch.device, bar: tqdm | None = None, every: int = 25):
        self.bar, self.cuda, self.every = bar, device.type == "cuda", every
        self.names: list[str] = []
        self.sums: torch.Tensor | None = None  # (losses,), created by the first add()
        self.count = 0  # iterations added
        self.first_bad = torch.full((), -1, dtype=torch.long, device=device)  # -1: none yet
        self.bad_copy: HostCopy | None = None
        self.shown: tuple[int, HostCopy] | None = None  # (iterations summed, their sums on the way)

    def add(self, losses: dict[str, torch.Tensor]) -> None:
        stacked = torch.stack(list(losses.values()))
        if self.sums is None:
            self.names, self.sums = list(losses), torch.zeros_like(stacked)
        self.sums += stacked
        bad = ~torch.isfinite(stacked).all()
        self.first_bad.copy_(torch.where(bad & (self.first_bad < 0), self.count, self.first_bad))
        self.count += 1
        if not self.cuda:
            self._raise_if_bad(int(self.first_bad))
        else:
            if self.bad_copy is not None and self.bad_copy.ready():
                self._raise_if_bad(int(self.bad_copy.host))
                self.bad_copy = None
            if self.bad_copy is None and (self.count - 1) % self.every == 0:
                self.bad_copy = HostCopy(self.first_bad)
        self._show()

    def _show(self) -> None:
        if self.bar is None or self.bar.disable:  # no terminal, no bar: nothing to copy
            return
        if self.shown is not None and self.shown[1].ready():
            count, copy = self.shown
            self.bar.set_postfix({n: f"{v / count:.4f}" for n, v in zip(self.names, copy.host.tolist())}, refresh=False)
            self.shown = None
        if self.shown is None and (self.count - 1) % self.every == 0:
            self.shown = (self.count, HostCopy(self.sums))

    @staticmethod
    def _raise_if_bad(first_bad: int) -> None:
        if first_bad >= 0:
            raise NonFiniteLoss(first_bad + 1)

    def means(self) -> dict[str, float]:
        """The epoch's mean of each loss (one host read); NonFiniteLoss if any iteration's was not finite."""
        self._raise_if_bad(int(self.first_bad))
        return dict(zip(self.names, (self.sums / self.count).tolist())) if self.count else {}


def finite_weights(model: SourceOnly) -> bool:
    """Whether every parameter and buffer (BatchNorm statistics) of the method's networks is finite: losses
    can stay finite while a huge step leaves the weights at inf, and such a model must never be
    evaluated and checkpointed as good. One host read, once per epoch."""
    tensors = [t for t in model.state_dict().values() if t.is_floating_point()]
    return bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all())


class TrainStep:
    """One training iteration from two (B,) index batches: gather the images on the device, method.update.

    With config.cuda_graph the first WARMUP iterations run eagerly on a side stream (cuDNN autotuning,
    compilation, the optimisers' lazy state), the next is captured into a CUDA graph, and from then on an
    iteration is two index copies into the captured buffers and one replay: no Python, no launch gaps.
    Every iteration, the captured ones included, is a real training step; dropout masks still change
    each replay (PyTorch advances the graph's RNG offset), and the losses come back in static tensors.

    What update() may do, to be capturable (the one place this is written down): only work queued on
    the device: no host reads (.item(), bool() or print of a tensor, .cpu()), no shapes or control flow
    that depend on tensor values, no new CPU tensors fed to the device; state that changes from one
    iteration to the next (step counters, schedules) lives in device tensors changed in place; random
    draws only from torch's generators. The optimisers are made capturable by speed_up.
    """

    WARMUP = 3

    def __init__(self, method: SourceOnly, source: DigitsSplit, target: DigitsSplit, config: Config):
        self.method, self.source, self.target = method, source, target
        self.cuda_graph, self.channels_last = config.cuda_graph, config.channels_last
        self.calls = 0
        self.graph: torch.cuda.CUDAGraph | None = None
        self.capture_seconds = 0.0
        if self.cuda_graph:
            self.side_stream = torch.cuda.Stream(method.device)

    def batch(self, s: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(xs, ys, xt): images in [-1, 1] (B, C, H, W) in the weights' memory format, source labels (B,).
        Target labels are never read."""
        xs, xt = to_model_input(self.source.images[s]), to_model_input(self.target.images[t])
        if self.channels_last:
            xs, xt = xs.contiguous(memory_format=torch.channels_last), xt.contiguous(memory_format=torch.channels_last)
        return xs, self.source.labels[s], xt

    def __call__(self, s: torch.Tensor, t: torch.Tensor) -> dict[str, torch.Tensor]:
        """One iteration; returns its on-device losses."""
        self.calls += 1
        if not self.cuda_graph:
            return self.method.update(*self.batch(s, t))
        if self.graph is None and self.calls <= self.WARMUP:
            current = torch.cuda.current_stream(self.method.device)
            self.side_stream.wait_stream(current)
            with torch.cuda.stream(self.side_stream):
                losses = self.method.update(*self.batch(s, t))
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
        # thread_local: the checkpoint writer thread waits on a CUDA event (CheckpointWriter._write); in
        # the default global mode such a call from another thread during the capture invalidates it.
        with torch.cuda.graph(graph, stream=self.side_stream, capture_error_mode="thread_local"):
            self.static_losses = self.method.update(*self.batch(self.static_s, self.static_t))
        self.graph = graph
        synchronize(self.method.device)
        self.capture_seconds = time.perf_counter() - start
