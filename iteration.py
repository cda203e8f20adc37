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

import sys
import time
from typing import Callable

import torch
from tqdm import tqdm

from algorithms import SourceOnly
from config import Config
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


class CaptureFailed(Exception):
    """The CUDA graph could not be used and --cuda-graph on was given explicitly (otherwise: eager, and why)."""


class CudaGraphs:
    """How TrainStep captures and replays on CUDA. Tests inject a backend with the same three methods to
    emulate a capture, a capture that raises, or a replay that computes something else."""

    def __init__(self, device: torch.device):
        self.device, self.stream = device, torch.cuda.Stream(device)

    def eager(self, fn: Callable[[], dict], strict: bool = False) -> dict:
        """fn() on the side stream (as the capture will see it); strict: a host sync inside raises."""
        current = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(current)
        previous = torch.cuda.get_sync_debug_mode()
        try:
            if strict:
                torch.cuda.set_sync_debug_mode("error")
            with torch.cuda.stream(self.stream):
                result = fn()
        finally:
            torch.cuda.set_sync_debug_mode(previous)
        current.wait_stream(self.stream)
        return result

    def capture(self, fn: Callable[[], dict]) -> tuple[Callable[[], None], dict]:
        """(replay, the static outputs it refreshes). Capturing runs nothing. After a failed capture the
        graph's memory pool is released and the device synchronised; a stream still capturing cannot be
        recovered (the caller stops)."""
        graph = torch.cuda.CUDAGraph()
        try:
            # thread_local: the checkpoint writer thread waits on a CUDA event (CheckpointWriter._write); in
            # the default global mode such a call from another thread during the capture invalidates it.
            with torch.cuda.graph(graph, stream=self.stream, capture_error_mode="thread_local"):
                outputs = fn()
        except Exception:
            graph.reset()
            torch.cuda.synchronize(self.device)
            if torch.cuda.is_current_stream_capturing():
                raise CaptureFailed("the CUDA stream is still capturing after a failed capture; rerun with "
                                    "--cuda-graph off") from None
            raise
        return graph.replay, outputs

    def rng_state(self) -> torch.Tensor:
        return torch.cuda.get_rng_state(self.device)

    def set_rng_state(self, state: torch.Tensor) -> None:
        torch.cuda.set_rng_state(state, self.device)


def _state(method: SourceOnly) -> dict[str, torch.Tensor]:
    """Every tensor an iteration changes: the method's state_dict and every optimiser's state, by name."""
    tensors = dict(method.state_dict())
    for name, optimizer in method.optimizers.items():
        for index, state in enumerate(optimizer.state.values()):
            tensors.update({f"{name}.{index}.{key}": value for key, value in state.items() if torch.is_tensor(value)})
    return tensors


def _counters(method: SourceOnly) -> torch.Tensor:
    """Adam's step count of each parameter group's first parameter, and BatchNorm's batches seen, summed:
    how far training has gone, on the device."""
    values = [optimizer.state[group["params"][0]]["step"].reshape(()).double()
              for optimizer in method.optimizers.values() for group in optimizer.param_groups
              if group["params"][0] in optimizer.state]
    values += [buffer.reshape(()).double() for name, buffer in method.named_buffers() if name.endswith("num_batches_tracked")]
    return torch.stack(values) if values else torch.zeros(0, dtype=torch.float64)


def replay_problem(before: dict[str, torch.Tensor], eager: dict[str, torch.Tensor], replayed: dict[str, torch.Tensor],
                   eager_losses: dict[str, torch.Tensor], replay_losses: dict[str, torch.Tensor]) -> str | None:
    """Why a replay did not compute the iteration the eager code computed from the same state and batch,
    or None. Floating-point tensors may differ by rounding: by at most 5% of that iteration's own change
    plus 1e-3 of their size; integer ones (step counts, batches seen) and the losses' names must match."""
    if eager_losses.keys() != replay_losses.keys():
        return f"the losses {sorted(replay_losses)} are not {sorted(eager_losses)}"
    for name, value in eager_losses.items():
        if not torch.allclose(replay_losses[name].float(), value.float(), rtol=2e-2, atol=1e-4):
            return f"{name} {float(replay_losses[name]):.6g} after the replay, {float(value):.6g} eager"
    for name, value in eager.items():
        other = replayed[name]
        if not value.is_floating_point() or name.endswith(".step"):  # counts: exactly
            if not torch.equal(other, value):
                return f"{name} is {other.tolist()} after the replay, {value.tolist()} eager"
            continue
        change = (value.float() - before[name].float()).abs()
        if ((other.float() - value.float()).abs() > 0.05 * change + 1e-3 * value.float().abs().mean() + 1e-7).any():
            return f"{name} differs from the eager iteration's beyond rounding"
    return None


class TrainStep:
    """One training iteration from two (B,) index batches: gather the images on the device, method.update.

    With config.cuda_graph the first WARMUP iterations run eagerly on a side stream (cuDNN autotuning,
    compilation, the optimisers' lazy state); the next is checked and captured (_capture) and from then on
    an iteration is two index copies into the captured buffers and one replay: no Python, no launch gaps.
    Every iteration, the captured ones included, is a real training step; dropout masks still change
    each replay (PyTorch advances the graph's RNG offset), and the losses come back in static tensors.

    What update() may do, to be capturable (the one place this is written down; tests/test_capture.py
    enforces it on the CPU for every registered method): only work queued on the device: no host reads
    (.item(), bool() or print of a tensor, .cpu()), no shapes or control flow that depend on tensor values,
    no new tensors from Python data; state that changes from one iteration to the next (step counters,
    schedules) lives in device tensors changed in place; random draws only from torch's generators. The
    optimisers are made capturable by speed_up.

    `path` says how iterations run ("eager", "CUDA graph") and `fallback` why a CUDA graph was given up.
    """

    WARMUP = 3

    def __init__(self, method: SourceOnly, source: DigitsSplit, target: DigitsSplit, config: Config,
                 graphs: CudaGraphs | None = None):
        self.method, self.source, self.target = method, source, target
        self.channels_last, self.strict = config.channels_last, config.graph_strict
        self.graphs = graphs or (CudaGraphs(method.device) if config.cuda_graph else None)
        self.path, self.fallback = ("CUDA graph" if self.graphs else "eager"), ""
        self.calls, self.capture_seconds = 0, 0.0
        self.replay: Callable[[], None] | None = None
        self.counted: tuple[torch.Tensor, int] | None = None  # (counters, calls) after call 1, then each verify()
        self.per_call: torch.Tensor | None = None  # how far one iteration moves the counters

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
        if self.replay is not None:
            self.static_s.copy_(s)
            self.static_t.copy_(t)
            self.replay()
            return self.static_losses
        if self.graphs is None:
            losses = self.method.update(*self.batch(s, t))
        elif self.calls <= self.WARMUP:
            losses = self.graphs.eager(lambda: self.method.update(*self.batch(s, t)))
        else:
            losses = self._capture(s, t)
        if self.calls == 1:  # the optimisers' state exists from here on
            self.counted = (_counters(self.method), 1)
        elif self.calls == 2:
            self.per_call = _counters(self.method) - self.counted[0]
        return losses

    def _capture(self, s: torch.Tensor, t: torch.Tensor) -> dict[str, torch.Tensor]:
        """This iteration, checked: eager (a hidden host sync raises), then the state and random generator
        put back, captured, replayed on the same batch and compared with the eager result. A replay that
        agrees stands; otherwise the eager result is put back and training goes on eagerly (or, with
        --cuda-graph on given, stops). Either way the iteration counts once."""
        start = time.perf_counter()
        before, rng = {name: value.clone() for name, value in _state(self.method).items()}, self.graphs.rng_state()
        try:
            eager_losses = self.graphs.eager(lambda: self.method.update(*self.batch(s, t)), strict=True)
        except RuntimeError as error:  # a host synchronisation inside update(): put the state back, go on eagerly
            self._put_back(before, rng)
            return self._give_up(f"update() synchronises with the host ({str(error).splitlines()[0]})", s, t)
        eager_losses = {name: value.clone() for name, value in eager_losses.items()}
        eager, eager_rng = {name: value.clone() for name, value in _state(self.method).items()}, self.graphs.rng_state()
        self._put_back(before, rng)
        self.static_s, self.static_t = s.clone(), t.clone()
        try:
            replay, self.static_losses = self.graphs.capture(lambda: self.method.update(*self.batch(self.static_s,
                                                                                                   self.static_t)))
            replay()
        except CaptureFailed:
            raise
        except Exception as error:  # the capture itself failed: the eager result stands
            try:
                self._put_back(eager, eager_rng)
            except Exception as unrecoverable:  # e.g. the generator still marked as capturing
                raise CaptureFailed(f"a failed CUDA graph capture ({error}) left the device unusable "
                                    f"({unrecoverable}); rerun with --cuda-graph off") from error
            return self._give_up(f"the capture failed ({type(error).__name__}: {str(error).splitlines()[0][:160]})",
                                 eager_losses=eager_losses)
        problem = replay_problem(before, eager, _state(self.method), eager_losses, self.static_losses)
        if problem is None and not torch.equal(self.graphs.rng_state(), eager_rng):
            problem = "the replay drew other random numbers than the eager iteration"
        if problem is not None:
            self._put_back(eager, eager_rng)
            return self._give_up(f"the self-check failed: {problem}", eager_losses=eager_losses)
        self.replay, self.capture_seconds = replay, time.perf_counter() - start
        return self.static_losses

    def _put_back(self, state: dict[str, torch.Tensor], rng: torch.Tensor) -> None:
        for name, value in _state(self.method).items():
            value.copy_(state[name])
        self.graphs.set_rng_state(rng)

    def _give_up(self, reason: str, s: torch.Tensor | None = None, t: torch.Tensor | None = None,
                 eager_losses: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """Eager from here on (this iteration too, unless its eager result is already in place)."""
        if self.strict:
            raise CaptureFailed(f"--cuda-graph on: {reason}")
        self.graphs, self.path, self.fallback = None, "eager", reason
        print(f"warning: CUDA graph not used: {reason}; training goes on eagerly (--cuda-graph on makes this an error)",
              file=sys.stderr)
        return self.method.update(*self.batch(s, t)) if eager_losses is None else eager_losses

    def verify(self) -> None:
        """At the end of an epoch: the optimisers' step counts and BatchNorm's batches moved by exactly one
        iteration's worth per call since the last check (one host read). A graph that did not run, or ran
        twice, raises CaptureFailed."""
        if self.counted is None or self.per_call is None:
            return
        now, (then, calls) = _counters(self.method), self.counted
        expected = then + self.per_call * (self.calls - calls)
        if not torch.equal(now, expected):
            raise CaptureFailed(f"training counters moved by {(now - then).tolist()} over {self.calls - calls} "
                                f"iterations, not {(self.per_call * (self.calls - calls)).tolist()}: the {self.path} "
                                "did not run each iteration exactly once; rerun with --cuda-graph off")
        self.counted = (now, self.calls)
