"""The fast paths compute what the plain path computes, and benchmark.py measures and reports.

CPU tests run everywhere; the CUDA-graph tests run wherever a GPU is present (they are skipped on CI,
which has none) and are part of the GPU check (.ci/gpu-check, docs/speed.md).
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import benchmark
from main import build_config, build_parser
from algorithms import ALGORITHMS, MCD, discrepancy
from config import Config, configure_backends
from iteration import TrainStep, speed_up
from models import NETWORKS

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _run_iterations(config: Config, iterations: int, batch_size: int, seed: int = 0):
    """Trains `iterations` steps on fixed synthetic data of the pair's image format; returns the per-step
    losses and the model."""
    device = torch.device(config.device)
    configure_backends(config)
    spec = NETWORKS[config.network]
    data = benchmark.synthetic_digits({"source_train": 4 * batch_size, "target_train": 4 * batch_size,
                                       "source_test": 1, "target_test": 1}, device, seed=seed,
                                      shape=(spec.channels, spec.size, spec.size))
    torch.manual_seed(seed)
    model = ALGORITHMS[config.method](config, 10, device, iterations)
    model.train()
    speed_up(model, config)
    step = TrainStep(model, data.source_train, data.target_train, config)
    index = torch.Generator(device=device).manual_seed(seed)
    history = []
    for _ in range(iterations):
        s = torch.randperm(4 * batch_size, device=device, generator=index)[:batch_size]
        t = torch.randperm(4 * batch_size, device=device, generator=index)[:batch_size]
        history.append({name: value.item() for name, value in step(s, t).items()})
    return history, model, step


def _close(a: list[dict], b: list[dict], rel_first: float, rel_later: float) -> None:
    """Iteration 1 must agree to rounding. Later ones drift a little more by nature: Adam's first steps
    are close to lr * sign(gradient), so a rounding-level change in a near-zero gradient moves a weight
    by a whole lr; a different batch or a wrong step still moves the losses by far more."""
    for i, (step_a, step_b) in enumerate(zip(a, b, strict=True)):
        for name in step_a:
            rel = rel_first if i == 0 else rel_later
            assert step_b[name] == pytest.approx(step_a[name], rel=rel), (i, name, a, b)


# ---------------------------------------------------------------------------------------------------
# CPU


def _speed(argv: list[str], device: str) -> dict:
    parser = build_parser()
    argv = [*argv, "--device", device]
    with pytest.MonkeyPatch.context() as patch:  # pretend the device is there
        patch.setattr(torch.cuda, "is_available", lambda: device == "cuda")
        config = build_config(parser.parse_args(argv), parser)
    return {name: getattr(config, name) for name in ("precision", "cuda_graph", "compile", "channels_last")}


def test_auto_picks_the_fast_path_on_cuda_and_exact_fp32_elsewhere():
    assert _speed([], "cpu") == {"precision": "fp32", "cuda_graph": False, "compile": False, "channels_last": False}
    assert _speed([], "cuda") == {"precision": "bf16", "cuda_graph": True, "compile": False, "channels_last": True}
    assert _speed(["--precision", "fp32", "--cuda-graph", "off"], "cuda") == \
        {"precision": "fp32", "cuda_graph": False, "compile": False, "channels_last": True}
    assert _speed(["--compile", "on", "--channels-last", "on"], "cpu")["compile"] is True
    assert _speed(["--cuda-graph", "auto", "--protocol", "original"], "cuda")["precision"] == "fp32"


def test_cuda_graph_on_a_cpu_is_a_clear_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        _speed(["--cuda-graph", "on"], "cpu")
    assert exit_info.value.code == 2
    assert "--cuda-graph on needs a CUDA device" in capsys.readouterr().err


def test_fp32_is_exact_and_tf32_is_opt_in():
    configure_backends(Config(precision="fp32"))
    assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
    configure_backends(Config(precision="tf32"))
    assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    configure_backends(Config(precision="fp32"))


def test_bf16_autocasts_the_network_but_losses_stay_fp32():
    torch.manual_seed(0)
    exact, fast = MCD(Config(), 10, CPU, 1), MCD(Config(precision="bf16"), 10, CPU, 1)
    fast.G.load_state_dict(exact.G.state_dict())
    fast.F1.load_state_dict(exact.F1.state_dict())
    fast.F2.load_state_dict(exact.F2.state_dict())
    for model in (exact, fast):
        model.eval()  # no dropout: the two forward passes are comparable
    x = torch.randn(16, 3, 32, 32)
    with torch.no_grad():
        l1_exact, _ = exact.heads(exact.features(x))
        features = fast.features(x)
        l1_fast, l2_fast = fast.heads(features)
    assert features.dtype == torch.bfloat16 and l1_fast.dtype == torch.bfloat16 and l1_exact.dtype == torch.float32
    relative = (l1_fast.float() - l1_exact).norm() / l1_exact.norm()
    assert 1e-4 < relative < 3e-2  # bf16 rounding: visible, small
    assert discrepancy(l1_fast, l2_fast).dtype == torch.float32
    assert fast.source_loss((l1_fast, l2_fast), torch.zeros(16, dtype=torch.long)).dtype == torch.float32


def test_bf16_keeps_activations_bf16_through_batchnorm_relu_and_pooling():
    # Autocast already runs BatchNorm, ReLU, max-pooling and dropout on the bf16 activations (none of them
    # is on its fp32 list), with fp32 running statistics: no cast back to fp32 between the matrix products.
    model = MCD(Config(precision="bf16"), 10, CPU, 1)
    seen = []
    for module in [*model.G.modules(), *model.F1.modules()]:
        if isinstance(module, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.ReLU, torch.nn.MaxPool2d, torch.nn.Dropout)):
            module.register_forward_hook(lambda m, inputs, output: seen.append((type(m).__name__, inputs[0].dtype, output.dtype)))
    model.heads(model.features(torch.randn(4, 3, 32, 32)))
    assert {name for name, _, _ in seen} == {"BatchNorm1d", "BatchNorm2d", "ReLU", "MaxPool2d", "Dropout"}
    assert all((i, o) == (torch.bfloat16, torch.bfloat16) for _, i, o in seen), seen
    assert model.G.conv[1].running_mean.dtype == model.F1.net[1].running_var.dtype == torch.float32


def test_channels_last_computes_the_same_training_steps():
    plain, _, _ = _run_iterations(Config(batch_size=8, num_k=2, network="usps"), 2, batch_size=8)
    nhwc, model, _ = _run_iterations(Config(batch_size=8, num_k=2, network="usps", channels_last=True), 2, batch_size=8)
    assert model.G.net[0].weight.is_contiguous(memory_format=torch.channels_last)
    _close(plain, nhwc, rel_first=2e-4, rel_later=1e-2)


def test_the_methods_file_holds_no_speed_switch_and_speed_up_applies_them_from_outside():
    source = (ROOT / "algorithms.py").read_text()
    for switch in ("channels_last", "compile", "fused", "capturable", "cuda_graph", "CUDAGraph"):
        assert f"{switch}" not in source.split('"""', 2)[2], switch  # the module's docstring may name them
    model = MCD(Config(network="usps", channels_last=True, compile=True), 10, CPU, 1)
    speed_up(model, replace(model.config))
    assert model.G.net[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert all(network._compiled_call_impl is not None for network in (model.G, model.F1, model.F2))


@pytest.mark.slow
def test_compiled_training_computes_the_same_steps():
    # Inductor draws dropout masks with its own generator; fallback_random makes it use eager's, so the
    # two runs see the same masks and must give the same losses and weights. torch's own config.patch:
    # monkeypatch.setattr on torch's config modules leaves the option unreachable once undone.
    import torch._inductor.config

    config = Config(method="source_only", batch_size=8, network="usps")
    eager, _, _ = _run_iterations(config, 3, batch_size=8)
    with torch._inductor.config.patch(fallback_random=True):
        compiled, _, _ = _run_iterations(replace(config, compile=True), 3, batch_size=8)
    _close(eager, compiled, rel_first=2e-4, rel_later=1e-2)


@pytest.mark.slow
def test_benchmark_prints_a_table_line_and_one_json_line():
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmark.py"), "--device", "cpu", "--method", "source_only", "--network", "usps",
         "--batch-size", "8", "--iters", "2", "--repeats", "3", "--warmup", "1"],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr
    header, line, json_line = result.stdout.strip().splitlines()
    assert header.startswith("# CPU") and "torch " + torch.__version__ in header
    assert "ms/iter" in line
    record = json.loads(json_line)
    assert record["device"].startswith("CPU") and record["torch"] == torch.__version__
    assert record["precision"] == "fp32" and record["cuda_graph"] is False
    assert len(record["ms_per_iter_all"]) == 3 and record["ms_per_iter_min"] <= record["ms_per_iter_median"] <= record["ms_per_iter_max"]
    assert record["images_per_s"] == pytest.approx(2 * 8 * 1000 / record["ms_per_iter_median"])
    assert record["final_losses"]["loss_source"] > 0


@pytest.mark.slow
def test_benchmark_sweep_runs_each_variant_in_its_own_process(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(benchmark, "SWEEP_CPU", (("fp32", "off", "off", "off"), ("fp32", "on", "off", "off")))
    out = tmp_path / "speed.jsonl"
    args = benchmark.build_parser().parse_args(
        ["--sweep", "--device", "cpu", "--method", "source_only", "--network", "usps", "--batch-size", "8", "--iters", "1",
         "--repeats", "1", "--warmup", "1", "--out", str(out)])
    assert benchmark.sweep(args, "cpu") == 1  # the second variant cannot run on a CPU...
    table = capsys.readouterr().out
    assert "| fp32, graph off, compile off, channels_last off |" in table
    assert "needs a CUDA device" in table  # ...and says why, in its row, without stopping the sweep
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert records[0]["ms_per_iter_median"] > 0 and "error" in records[1]


def test_full_epoch_times_training_and_evaluation():
    config = Config(method="source_only", batch_size=8, network="usps")
    sizes = {"source_train": 40, "source_test": 30, "target_train": 32, "target_test": 20}
    result = benchmark.time_full_epochs(config, sizes=sizes, epochs=2)
    assert result["iterations_per_epoch"] == 4  # min(40, 32) // 8, as in training
    assert len(result["train_s"]) == len(result["eval_s"]) == 2 and all(t > 0 for t in result["eval_s"])
    assert result["projected_50_epochs_s"] == pytest.approx(result["epoch_s"][0] + 49 * result["epoch_s"][1])


def test_evaluation_is_timed_per_chunk_size(monkeypatch, capsys):
    monkeypatch.setattr(benchmark, "REAL_SIZES", {"source_train": 8, "source_test": 30, "target_train": 8, "target_test": 20})
    assert benchmark.main(["--device", "cpu", "--evaluation", "--eval-batch-sizes", "7,64", "--repeats", "2",
                           "--batch-size", "8", "--network", "usps"]) == 0
    out = capsys.readouterr().out
    record = json.loads(out.strip().splitlines()[-1])
    assert record["test_images"] == 50 and [row["chunk"] for row in record["evaluation"]] == [7, 64]
    assert all(row["eval_s_median"] >= row["eval_s_min"] > 0 for row in record["evaluation"])
    assert "| 64 |" in out
    with pytest.raises(SystemExit):
        benchmark.build_parser().parse_args(["--eval-batch-sizes", "0,2"])


def test_synthetic_data_is_random_uint8_of_the_real_shapes():
    data = benchmark.synthetic_digits({"source_train": 50, "source_test": 5, "target_train": 40, "target_test": 5}, CPU)
    assert data.source_train.images.shape == (50, 3, 32, 32) and data.source_train.images.dtype == torch.uint8
    assert data.target_train.labels.max() <= 9 and data.source_train.images.float().std() > 50  # not zeros


# ---------------------------------------------------------------------------------------------------
# CUDA (skipped without a GPU)


@needs_cuda
@pytest.mark.parametrize(("method", "rel_later"), [("mcd", 2e-2), ("source_only", 2e-3)])
def test_cuda_graph_replays_the_same_training_steps(method, rel_later):
    # Same seed, same batches: eager and captured training must agree step by step (dropout masks too:
    # the graph's RNG offsets continue the eager sequence), then keep agreeing on later replays.
    # Tolerances from an H100 (torch 2.11): source-only stays within 0.2%; MCD's five G and two head
    # updates per iteration amplify rounding more (0.7% on d_C at the first replay). A replay on stale
    # buffers or with other dropout masks would be off by several percent.
    eager_config = Config(method=method, batch_size=32, device="cuda")
    eager, _, _ = _run_iterations(eager_config, 8, batch_size=32)
    graph_config = Config(method=method, batch_size=32, device="cuda", cuda_graph=True)
    graphed, _, step = _run_iterations(graph_config, 8, batch_size=32)
    assert step.graph is not None and step.calls == 8  # 3 warm-up, 1 captured, 4 more replays
    _close(eager, graphed, rel_first=1e-4, rel_later=rel_later)
    assert len({h["loss_source"] for h in graphed[TrainStep.WARMUP:]}) == 8 - TrainStep.WARMUP  # they really train


@needs_cuda
@pytest.mark.parametrize("method", list(ALGORITHMS))
def test_cuda_default_path_passes_its_self_check_and_follows_eager_for_every_method(method):
    # The default CUDA path (bf16, channels_last, CUDA graph) against the same settings eager, step by step.
    default = Config(method=method, batch_size=32, device="cuda", precision="bf16", channels_last=True)
    eager, _, _ = _run_iterations(default, 8, batch_size=32)
    graphed, _, step = _run_iterations(replace(default, cuda_graph=True), 8, batch_size=32)
    assert step.path == "CUDA graph", step.fallback
    _close(eager, graphed, rel_first=2e-2, rel_later=5e-2)
    step.verify()


@needs_cuda
def test_cuda_bf16_graph_follows_fp32():
    exact, _, _ = _run_iterations(Config(batch_size=64, device="cuda", cuda_graph=True), 6, batch_size=64)
    fast, _, _ = _run_iterations(Config(batch_size=64, device="cuda", cuda_graph=True, precision="bf16"), 6, batch_size=64)
    for a, b in zip(exact, fast):
        assert b["loss_source"] == pytest.approx(a["loss_source"], rel=5e-2)
    assert all(torch.isfinite(torch.tensor(list(h.values()))).all() for h in fast)


@needs_cuda
def test_cuda_compiled_graph_follows_eager():
    import torch._inductor.config

    eager, _, _ = _run_iterations(Config(batch_size=32, device="cuda"), 6, batch_size=32)
    compiled_config = Config(batch_size=32, device="cuda", cuda_graph=True, compile=True)
    with torch._inductor.config.patch(fallback_random=True):
        compiled, _, step = _run_iterations(compiled_config, 6, batch_size=32)
    assert step.graph is not None
    _close(eager, compiled, rel_first=1e-3, rel_later=5e-2)  # inductor's own rounding: 1.3% seen on an H100


@needs_cuda
def test_cuda_benchmark_uses_events_and_reports_memory():
    config = Config(batch_size=32, device="cuda", cuda_graph=True, precision="bf16")
    result = benchmark.time_iterations(config, iters=5, repeats=3, warmup=5)
    assert result["capture_s"] > 0 and result["peak_memory_mib"] > 0
    assert result["ms_per_iter_min"] > 0


def test_profile_groups_the_iterations_time_and_writes_a_trace(tmp_path, capsys):
    trace = tmp_path / "trace.json"
    assert benchmark.main(["--device", "cpu", "--profile", "--network", "usps", "--batch-size", "8", "--num-k", "1",
                           "--iters", "2", "--warmup", "5", "--trace", str(trace)]) == 0
    out = capsys.readouterr().out
    record = json.loads(out.strip().splitlines()[-1])
    groups = {row["group"]: row for row in record["groups"]}
    assert {"convolutions", "matrix products", "optimiser", "BatchNorm"} <= set(groups)
    assert sum(row["share"] for row in record["groups"]) == pytest.approx(1.0)
    assert sum(row["ms_per_iter"] for row in record["groups"]) == pytest.approx(record["kernel_ms_per_iter"])
    assert record["top"][0]["share"] >= record["top"][-1]["share"] and "| group | ms / iteration | share |" in out
    assert json.loads(trace.read_text())["traceEvents"]  # a real trace, readable by chrome://tracing
    assert benchmark.kernel_group("void cudnn::bn_fw_tr_1C11_kernel_NCHW") == "BatchNorm"
    assert benchmark.kernel_group("sm90_xmma_gemm_bf16bf16_bf16f32") == "matrix products"
    assert benchmark.kernel_group("void at::native::(anonymous)::multi_tensor_apply_kernel<FusedAdam>") == "optimiser"
