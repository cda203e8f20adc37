"""The capture contract, enforced on the CPU: what a method's update() may do so that the whole iteration can
be captured once as a CUDA graph and replayed (iteration.TrainStep's rules). Every registered method, with
every registered discrepancy, is checked by being registered; two deliberately broken methods prove that
the check fails where it must.

A TorchDispatchMode records update()'s operations over two calls after a warm-up call (which creates the
optimisers' lazy state) and the check fails on: a host read (.item(), bool(), float() of a tensor); an
operation whose output shape depends on tensor values (nonzero, masked_select, unique, ...); a tensor made
from Python data; operations that differ between the two calls (names, shapes, strides, dtypes, non-tensor
arguments); a state tensor rebound to new storage; a Python attribute that changed; numpy's or Python's
random numbers used. The optimisers' own step() is torch's and is left out (on CUDA speed_up makes it
capturable; on the CPU, Adam reads its step count on the host).
"""

from __future__ import annotations

import json
import random
from contextlib import ExitStack
from dataclasses import replace

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import iteration
from algorithms import ALGORITHMS, DISCREPANCIES, MCD, SourceOnly
from config import Config
from datasets import DigitsSplit
from iteration import CaptureFailed, TrainStep
from train import train

CPU = torch.device("cpu")
HOST_READS = {"aten::_local_scalar_dense", "aten::is_nonzero", "aten::item"}
DATA_DEPENDENT_SHAPES = {"aten::nonzero", "aten::nonzero_static", "aten::masked_select", "aten::unique",
                         "aten::_unique", "aten::_unique2", "aten::unique_dim", "aten::unique_consecutive",
                         "aten::repeat_interleave", "aten::argwhere", "aten::_nested_tensor_from_mask"}
FROM_PYTHON_DATA = {"aten::lift_fresh", "aten::lift_fresh_copy", "aten::scalar_tensor"}


def _describe(value) -> tuple | str:
    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(value.shape), value.stride(), str(value.dtype), value.device.type)
    return repr(value)


class Recorder(TorchDispatchMode):
    """Every aten operation below this mode: its name and a description of its arguments."""

    def __init__(self):
        super().__init__()
        self.trace: list[tuple[str, tuple]] = []
        self.paused = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not self.paused and not func.name().startswith("profiler::"):  # zero_grad's profiler marks: no device work
            flat, _ = tree_flatten((args, kwargs))
            self.trace.append((func.name(), tuple(_describe(value) for value in flat)))
        return func(*args, **kwargs)


def _python_attributes(method: SourceOnly) -> dict[tuple[str, str], object]:
    plain = (int, float, bool, str, type(None), tuple)
    return {(path, name): value for path, module in method.named_modules() for name, value in vars(module).items()
            if isinstance(value, plain)}


def _random_states() -> tuple:
    return random.getstate(), tuple(np.asarray(part).tobytes() if isinstance(part, np.ndarray) else part
                                    for part in np.random.get_state())


def capture_contract_violations(method: SourceOnly, batch: tuple[torch.Tensor, ...]) -> list[str]:
    """What in method.update(*batch) would break or silently freeze a CUDA graph (empty: nothing)."""
    method.train()
    method.update(*batch)  # warm-up: the optimisers create their state
    recorder, traces, problems = Recorder(), [], []
    with ExitStack() as stack:
        for optimizer in method.optimizers.values():  # torch's own step: made capturable by speed_up on CUDA
            real_step = optimizer.step

            def step(*args, _real=real_step, **kwargs):
                recorder.paused += 1
                try:
                    return _real(*args, **kwargs)
                finally:
                    recorder.paused -= 1

            optimizer.step = step
            stack.callback(delattr, optimizer, "step")
        for call in (1, 2):
            storage = {name: tensor.untyped_storage().data_ptr() for name, tensor in iteration._state(method).items()}
            attributes, randomness = _python_attributes(method), _random_states()
            recorder.trace = []
            with recorder:
                method.update(*batch)
            traces.append(recorder.trace)
            names = [name for name, _ in recorder.trace]
            problems += [f"call {call}: host read ({name})" for name in names if name in HOST_READS]
            problems += [f"call {call}: data-dependent shape ({name})" for name in names if name in DATA_DEPENDENT_SHAPES]
            problems += [f"call {call}: tensor made from Python data ({name})" for name in names if name in FROM_PYTHON_DATA]
            after = iteration._state(method)
            problems += [f"call {call}: state tensor {name} rebound (new storage)" for name, pointer in storage.items()
                         if name in after and after[name].untyped_storage().data_ptr() != pointer]
            problems += [f"call {call}: state tensor {name} created" for name in after.keys() - storage.keys()]
            changed = {key for key, value in _python_attributes(method).items() if attributes.get(key, object()) != value}
            problems += [f"call {call}: Python attribute {path or 'method'}.{name} changed" for path, name in sorted(changed)]
            if _random_states() != randomness:
                problems.append(f"call {call}: numpy or Python random numbers drawn")
    if traces[0] != traces[1]:
        first = next(i for i, (a, b) in enumerate(zip(traces[0] + [None], traces[1] + [None])) if a != b)
        problems.append(f"the operations differ between calls from operation {first}: "
                        f"{(traces[0] + [None])[first]} vs {(traces[1] + [None])[first]}")
    return problems


def _batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(8, 1, 28, 28, generator=g), torch.randint(0, 10, (8,), generator=g), torch.randn(8, 1, 28, 28, generator=g)


@pytest.mark.parametrize("discrepancy", list(DISCREPANCIES))
@pytest.mark.parametrize("method", list(ALGORITHMS))
def test_capture_contract_holds_for_every_registered_method_and_discrepancy(method, discrepancy):
    torch.manual_seed(0)
    config = Config(method=method, discrepancy=discrepancy, network="usps", num_k=2, swd_projections=8)
    assert capture_contract_violations(ALGORITHMS[method](config, 10, CPU, 100), _batch()) == []


class HostReadInStepC(MCD):
    """Broken on purpose: step C stops early on a value read from the device."""

    def step_c(self, xt: torch.Tensor) -> torch.Tensor:
        d = super().step_c(xt)
        if d.item() < 0:  # never true; the read alone stalls the GPU and freezes a captured branch
            raise AssertionError
        return d


class PythonCounter(SourceOnly):
    """Broken on purpose: a schedule kept in a Python counter (a CUDA graph would replay its first value)."""

    calls = 0

    def update(self, xs, ys, xt):
        self.calls += 1
        return super().update(xs, ys, xt)


def test_capture_contract_catches_a_host_read_in_step_c():
    torch.manual_seed(0)
    problems = capture_contract_violations(HostReadInStepC(Config(network="usps", num_k=2), 10, CPU, 100), _batch())
    assert problems and all("host read (aten::_local_scalar_dense)" in p for p in problems), problems


def test_capture_contract_catches_a_python_counter():
    torch.manual_seed(0)
    problems = capture_contract_violations(PythonCounter(Config(network="usps"), 10, CPU, 100), _batch())
    assert problems == ["call 1: Python attribute method.calls changed", "call 2: Python attribute method.calls changed"]


def test_capture_contract_catches_a_rebound_state_tensor_python_data_and_python_randomness():
    class Rebinds(SourceOnly):
        def update(self, xs, ys, xt):
            losses = super().update(xs, ys, xt)
            self.G.net[1].running_mean = self.G.net[1].running_mean * 1.0  # a new tensor, not changed in place
            return losses

    class PythonData(SourceOnly):
        def update(self, xs, ys, xt):
            return {"loss_source": super().update(xs, ys, xt)["loss_source"] * torch.tensor(random.random())}

    torch.manual_seed(0)
    rebinds = capture_contract_violations(Rebinds(Config(network="usps"), 10, CPU, 100), _batch())
    assert any("state tensor G.net.1.running_mean rebound" in p for p in rebinds), rebinds
    python = capture_contract_violations(PythonData(Config(network="usps"), 10, CPU, 100), _batch())
    assert any("tensor made from Python data (aten::lift_fresh)" in p for p in python), python
    assert any("numpy or Python random numbers drawn" in p for p in python), python


# ---------------------------------------------------------------------------------------------------
# The first capture checks itself, and a failure falls back to eager (CUDA emulated on the CPU)


class EmulatedGraphs:
    """iteration.CudaGraphs' part, on the CPU: 'capturing' runs nothing, a replay runs the function again
    into the same output tensors, the random generator is the CPU's."""

    def __init__(self, device: torch.device | None = None):
        self.replays = 0

    def eager(self, fn, strict: bool = False):
        return fn()

    def capture(self, fn):
        outputs: dict[str, torch.Tensor] = {}

        def replay():
            self.replays += 1
            for name, value in self.run(fn).items():
                outputs.setdefault(name, torch.empty_like(value)).copy_(value)
        return replay, outputs

    def run(self, fn):
        return fn()

    def rng_state(self):
        return torch.get_rng_state()

    def set_rng_state(self, state):
        torch.set_rng_state(state)


class SkipsGsUpdate(EmulatedGraphs):
    """A replay that computes something else: G's optimiser does not step."""

    method: SourceOnly

    def run(self, fn):
        self.method.opt_g.step = lambda *args, **kwargs: None
        try:
            return fn()
        finally:
            del self.method.opt_g.step


class CaptureRaises(EmulatedGraphs):
    def capture(self, fn):
        raise RuntimeError("operation not permitted when stream is capturing")


class SyncsInUpdate(EmulatedGraphs):
    def eager(self, fn, strict: bool = False):
        if strict:
            fn()  # half an iteration's worth of state changes before the sync is found
            raise RuntimeError("called a synchronizing CUDA operation")
        return fn()


class StopsReplaying(EmulatedGraphs):
    """Right at the check, then silently no more (a graph that no longer runs)."""

    def run(self, fn):
        return fn() if self.replays == 1 else {name: torch.zeros(()) for name in ("loss_source",)}


def _train(graphs: EmulatedGraphs | None, iterations: int = 6, strict: bool = False):
    """`iterations` MCD steps on the LeNet network from seed 0, with `graphs` as the CUDA graph backend
    (None: plain eager); the step and the method's whole state afterwards."""
    torch.manual_seed(0)
    config = Config(network="usps", num_k=2, cuda_graph=graphs is not None, graph_strict=strict)
    method = MCD(config, 10, CPU, 100)
    method.train()
    if graphs is not None:
        graphs.method = method
    g = torch.Generator().manual_seed(1)
    split = DigitsSplit(torch.randint(0, 256, (32, 1, 28, 28), dtype=torch.uint8, generator=g), torch.randint(0, 10, (32,), generator=g))
    step = TrainStep(method, split, split, config, graphs=graphs)
    losses = [{name: value.clone() for name, value in step(torch.arange(8) + i, torch.arange(8) + 2 * i).items()}
              for i in range(iterations)]
    return step, method, losses


def _same_training(a: tuple, b: tuple) -> None:
    (_, method_a, losses_a), (_, method_b, losses_b) = a, b
    assert all(torch.equal(x[k], y[k]) for x, y in zip(losses_a, losses_b, strict=True) for k in x)
    for (name, x), y in zip(method_a.state_dict().items(), method_b.state_dict().values()):
        assert torch.equal(x, y), name
    for name in method_a.optimizers:
        for x, y in zip(method_a.optimizers[name].state.values(), method_b.optimizers[name].state.values()):
            assert all(torch.equal(x[k], y[k]) for k in x), name


def test_a_faithful_capture_passes_its_check_and_the_checked_iteration_counts_once():
    eager = _train(None)
    graphed = _train(EmulatedGraphs())
    step = graphed[0]
    assert step.path == "CUDA graph" and step.fallback == "" and step.replay is not None
    assert step.graphs.replays == 6 - TrainStep.WARMUP  # the check's replay is iteration 4; then 5 and 6
    _same_training(eager, graphed)  # bit for bit: the check left exactly one iteration's worth
    step.verify()


@pytest.mark.parametrize(("backend", "shown"), [
    (SkipsGsUpdate, "the self-check failed: G."),
    (CaptureRaises, "the capture failed (RuntimeError: operation not permitted when stream is capturing)"),
    (SyncsInUpdate, "update() synchronises with the host (called a synchronizing CUDA operation)"),
])
def test_a_failed_check_falls_back_to_eager_says_why_once_and_loses_nothing(backend, shown, capsys):
    eager = _train(None)
    fallen = _train(backend())
    step = fallen[0]
    assert step.path == "eager" and shown in step.fallback and step.replay is None
    warnings = [line for line in capsys.readouterr().err.splitlines() if "CUDA graph not used" in line]
    assert len(warnings) == 1 and shown in warnings[0] and "--cuda-graph on makes this an error" in warnings[0]
    _same_training(eager, fallen)  # the failed check's iteration counted once, eagerly
    step.verify()


def test_with_cuda_graph_on_given_a_failed_check_is_an_error():
    with pytest.raises(CaptureFailed, match="--cuda-graph on: the self-check failed"):
        _train(SkipsGsUpdate(), strict=True)


def test_a_graph_that_stops_running_is_caught_at_the_end_of_the_epoch():
    step, _, _ = _train(StopsReplaying())
    assert step.path == "CUDA graph"  # the check itself passed
    with pytest.raises(CaptureFailed, match="did not run each iteration exactly once"):
        step.verify()


def test_results_json_names_the_path_used_and_why(digits_root, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(iteration, "CudaGraphs", lambda device: CaptureRaises())  # as train.py builds it
    config = Config(data_root=str(digits_root), allow_unverified_data=True, download=False, source="mnist",
                    target="usps", network="usps", epochs=1, iters_per_epoch=5, batch_size=8, num_k=1,
                    cuda_graph=True, csv=str(tmp_path / "r.csv"))
    train(config)
    record = json.loads((tmp_path / "r.json").read_text())
    assert record["iteration"] == {"path": "eager", "fallback": "the capture failed (RuntimeError: operation not "
                                                                  "permitted when stream is capturing)"}
    train(replace(config, cuda_graph=False, csv=str(tmp_path / "plain.csv")))
    assert json.loads((tmp_path / "plain.json").read_text())["iteration"] == {"path": "eager", "fallback": ""}


def test_cuda_graph_on_given_stops_the_run_with_one_line_and_exit_2(digits_root, tmp_path, monkeypatch):
    from run_control import RunStopped

    monkeypatch.setattr(iteration, "CudaGraphs", lambda device: CaptureRaises())
    config = Config(data_root=str(digits_root), allow_unverified_data=True, download=False, source="mnist",
                    target="usps", network="usps", epochs=1, iters_per_epoch=5, batch_size=8, num_k=1,
                    cuda_graph=True, graph_strict=True, csv=str(tmp_path / "r.csv"))
    with pytest.raises(RunStopped) as stopped:
        train(config)
    assert stopped.value.exit_code == 2 and stopped.value.epochs_saved == 0
    assert stopped.value.cause.startswith("--cuda-graph on: the capture failed") and "auto" in stopped.value.advice
