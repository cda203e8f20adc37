"""Time MCD training iterations on random data of the real shapes: no dataset needed.

    python benchmark.py                         # the default fast path of this device
    python benchmark.py --precision fp32 --cuda-graph off
    python benchmark.py --full-epoch            # one real-size epoch (73,257 / 60,000 train images)
                                                #   with its evaluation (26,032 / 10,000 test images)
    python benchmark.py --sweep --out runs/speed.jsonl   # every variant, one subprocess each, a table
    python benchmark.py --network usps          # the MNIST <-> USPS network
    python benchmark.py --profile               # where an iteration's time goes: kernels by group, a trace
    python benchmark.py --evaluation            # one evaluation (26,032 + 10,000 test images) per chunk size

Iterations are the exact training code (iteration.speed_up and TrainStep: on-device batch gather, steps
A, B, C, the optimisers). Warm-up (cuDNN autotuning, compilation) and CUDA-graph capture are timed apart and
excluded from ms/iter; on CUDA the timed region is bracketed by CUDA events. Prints a table, then one
JSON line with everything (device, torch, flags, ms/iter median and spread over repeats, images/s,
peak memory).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from cli import HelpFormatter, OneLineErrors
from config import (METHODS, NETWORKS, PRECISIONS, Config, SettingError, batch_images, configure_backends, device_name,
                    positive_int, resolve, speed_label, switch, synchronize)


def _chunk_sizes(text: str) -> list[int]:
    try:
        sizes = [int(part) for part in text.split(",")]
    except ValueError:
        sizes = []
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers separated by commas, got {text!r}")
    return sizes


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrors(prog="benchmark.py", description=__doc__.split("\n")[0], formatter_class=HelpFormatter, allow_abbrev=False)
    add = parser.add_argument
    add("--device", choices=("auto", "cpu", "cuda", "mps"), default="auto", help="auto: cuda if available")
    add("--method", choices=METHODS, default="mcd")
    add("--network", choices=NETWORKS, default="svhn2mnist",
        help="svhn2mnist: the SVHN -> MNIST network (3x32x32); usps: the MNIST <-> USPS one (1x28x28); syn2gtrsb: "
             "the Synthetic Signs -> GTSRB one (3x40x40, 43 classes)")
    add("--batch-size", type=batch_images, default=128, help="images per domain per iteration")
    add("--num-k", type=positive_int, default=4, help="generator updates (step C) per iteration")
    add("--iters", type=positive_int, default=None, help="timed iterations per repeat (default: 100 on CUDA, 3 on CPU)")
    add("--repeats", type=positive_int, default=3, help="timed repeats; the median is reported")
    add("--warmup", type=positive_int, default=10, help="untimed iterations first (at least the graph warm-up + 2)")
    add("--precision", choices=("auto", *PRECISIONS), default="auto", help="as main.py")
    for flag in ("--cuda-graph", "--compile", "--channels-last"):
        add(flag, type=switch, default=None, metavar="{auto,on,off}", help="as main.py (default: auto)")
    add("--full-epoch", action="store_true", help="time real-size epochs with evaluation instead")
    add("--profile", action="store_true",
        help="profile --iters iterations (default: 20 on CUDA, 2 on CPU) instead: device time by kernel group, a trace")
    add("--evaluation", action="store_true",
        help="time the per-epoch evaluation at the real test sizes for each --eval-batch-sizes chunk instead")
    add("--eval-batch-sizes", type=_chunk_sizes, default=[1024, 2048, 4096, 8192, 16384], metavar="N,N,...",
        help="--evaluation: the chunk sizes to time (main.py's --eval-batch-size)")
    add("--trace", type=Path, default=Path("runs/profile/trace.json"), help="--profile: where the trace goes")
    add("--sweep", action="store_true", help="run every variant in its own process and print a table")
    add("--out", default=None, help="--sweep: also append each variant's JSON line to this file")
    add("--timeout", type=float, default=300, help="--sweep: seconds allowed per variant")
    return parser


if __name__ == "__main__":
    build_parser().parse_args()  # --help and a bad flag are answered here, before torch is imported

import torch  # noqa: E402

from algorithms import ALGORITHMS  # noqa: E402
from datasets import DOMAINS, BatchStream, Digits, DigitsSplit  # noqa: E402
from iteration import EpochLosses, TrainStep, speed_up  # noqa: E402
from models import NETWORKS as NETWORK_RECORDS  # noqa: E402
from train import batch_streams, evaluate_all  # noqa: E402

# Train / test sizes of the real datasets (SVHN 'train' and 'test', MNIST train and test).
REAL_SIZES = {"source_train": 73_257, "source_test": 26_032, "target_train": 60_000, "target_test": 10_000}
# --network: the class count it is timed with (that of the datasets whose record names it)
CLASSES = {name: max(len(record.classes) for record in DOMAINS.values() if record.network == name) for name in NETWORKS}

# --sweep: each variant's switches in SWEEP_FLAGS order, slowest first; each change to the default
# (bf16, graph, channels_last) is also timed alone, then compile on top.
SWEEP_FLAGS = {"precision": "", "cuda-graph": "graph", "compile": "compile", "channels-last": "channels_last"}  # flag: its name in the table
SWEEP_CUDA = (
    ("fp32", "off", "off", "off"),
    ("bf16", "off", "off", "off"),
    ("fp32", "on", "off", "off"),
    ("tf32", "on", "off", "off"),
    ("bf16", "on", "off", "off"),
    ("bf16", "on", "off", "on"),  # the default
    ("bf16", "on", "on", "off"),
    ("bf16", "on", "on", "on"),
)
SWEEP_CPU = (("fp32", "off", "off", "off"), ("bf16", "off", "off", "off"))


def synthetic_digits(sizes: dict[str, int], device: torch.device, seed: int = 0,
                     shape: tuple[int, int, int] = (3, 32, 32), classes: int = 10) -> Digits:
    """Random uint8 images (never zeros: they can run faster than real data) and random labels."""
    generator = torch.Generator(device=device).manual_seed(seed)

    def split(n: int) -> DigitsSplit:
        images = torch.randint(0, 256, (n, *shape), dtype=torch.uint8, device=device, generator=generator)
        return DigitsSplit(images, torch.randint(0, classes, (n,), device=device, generator=generator))

    return Digits(**{name: split(n) for name, n in sizes.items()}, files=[])


class Timer:
    """Elapsed seconds of the work queued in between: CUDA events on CUDA, the host clock elsewhere."""

    def __init__(self, device: torch.device):
        self.device = device

    def __enter__(self) -> "Timer":
        if self.device.type == "cuda":
            self.start_event = torch.cuda.Event(enable_timing=True)
            self.end_event = torch.cuda.Event(enable_timing=True)
            self.start_event.record()
        else:
            self.start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            self.end_event.record()
            self.end_event.synchronize()
            self.seconds = self.start_event.elapsed_time(self.end_event) / 1000
        else:
            self.seconds = time.perf_counter() - self.start


def _setup(config: Config, sizes: dict[str, int]) -> tuple[torch.device, Digits, TrainStep, tuple[BatchStream, BatchStream]]:
    """Synthetic data of the network's image format and a training step built as train.py builds it."""
    device = torch.device(config.device)
    configure_backends(config)
    spec = NETWORK_RECORDS[config.network]
    data = synthetic_digits(sizes, device, shape=(spec.channels, spec.size, spec.size), classes=CLASSES[config.network])
    torch.manual_seed(config.seed)
    method = ALGORITHMS[config.method](config, CLASSES[config.network], device, 1)
    method.train()
    speed_up(method, config)
    return device, data, TrainStep(method, data.source_train, data.target_train, config), batch_streams(data, config)


def run_iterations(step: TrainStep, streams: tuple[BatchStream, BatchStream], iterations: int) -> dict[str, float]:
    """`iterations` training steps as train.py's loop runs them; the losses' means."""
    source, target = streams
    losses = EpochLosses(step.method.device)
    for _ in range(iterations):
        losses.add(step(source.next(), target.next()))
    return losses.means()


def time_iterations(config: Config, iters: int, repeats: int, warmup: int) -> dict:
    """ms per training iteration: `repeats` timed runs of `iters` iterations after `warmup` untimed ones."""
    sizes = {name: 8 * config.batch_size for name in REAL_SIZES}  # a few batches: shapes are what count
    device, data, step, streams = _setup(config, sizes)
    with Timer(device) as setup:  # includes compilation and the graph capture
        run_iterations(step, streams, max(warmup, TrainStep.WARMUP + 2))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    ms = []
    for _ in range(repeats):
        with Timer(device) as timer:
            losses = run_iterations(step, streams, iters)
        ms.append(1000 * timer.seconds / iters)
    return {
        "ms_per_iter_median": statistics.median(ms),
        "ms_per_iter_min": min(ms),
        "ms_per_iter_max": max(ms),
        "ms_per_iter_all": ms,
        "images_per_s": 2 * config.batch_size * 1000 / statistics.median(ms),  # source + target images
        "iters": iters,
        "repeats": repeats,
        "setup_s": setup.seconds,
        "capture_s": step.capture_seconds,
        "final_losses": losses,
        **_memory(device),
    }


def time_full_epochs(config: Config, sizes: dict[str, int] = REAL_SIZES, epochs: int = 2) -> dict:
    """Whole epochs at the real dataset sizes, training and evaluation each timed; the first epoch
    includes warm-up, compilation and capture. The 50-epoch figure is epoch 1 + 49 later epochs."""
    device, data, step, streams = _setup(config, sizes)
    iterations = min(sizes["source_train"], sizes["target_train"]) // config.batch_size
    train_s, eval_s = [], []
    for epoch in range(epochs):
        with Timer(device) as train_timer:
            run_iterations(step, streams, iterations)
        with Timer(device) as eval_timer:
            evaluate_all(step.method, data, config.eval_batch_size)
        train_s.append(train_timer.seconds)
        eval_s.append(eval_timer.seconds)
    epoch_s = [t + e for t, e in zip(train_s, eval_s)]
    later = statistics.median(epoch_s[1:]) if epochs > 1 else epoch_s[0]
    return {
        "iterations_per_epoch": iterations,
        "train_s": train_s,
        "eval_s": eval_s,
        "epoch_s": epoch_s,
        "ms_per_iter_epoch_2": 1000 * train_s[-1] / iterations,
        "projected_50_epochs_s": epoch_s[0] + 49 * later,
        "capture_s": step.capture_seconds,
        **_memory(device),
    }


def time_evaluation(config: Config, chunk_sizes: list[int], repeats: int, sizes: dict[str, int] | None = None) -> dict:
    """The per-epoch evaluation (evaluate_all: the source and target test sets, real sizes by default)
    at each chunk size: the median of `repeats` timed passes after an untimed one (autotuning)."""
    sizes = {**(sizes or REAL_SIZES), "source_train": config.batch_size, "target_train": config.batch_size}
    device, data, step, _ = _setup(config, sizes)
    images = len(data.source_test) + len(data.target_test)
    rows = []
    for chunk in chunk_sizes:
        evaluate_all(step.method, data, chunk)
        seconds = []
        for _ in range(repeats):
            with Timer(device) as timer:
                evaluate_all(step.method, data, chunk)
            seconds.append(timer.seconds)
        rows.append({"chunk": chunk, "eval_s_median": statistics.median(seconds), "eval_s_min": min(seconds),
                     "images_per_s": images / statistics.median(seconds)})
    return {"test_images": images, "evaluation": rows, **_memory(device)}


# --profile: kernel (on a CPU: operator) names, lower-cased, to the groups of the table; first match wins.
# cuDNN names its BatchNorm and softmax kernels too, so those groups come before the convolutions.
KERNEL_GROUPS = (
    ("optimiser", ("adam", "multi_tensor", "foreach")),
    ("BatchNorm", ("batch_norm", "batchnorm", "bn_fw", "bn_bw")),
    ("pooling", ("pool",)),
    ("losses", ("softmax", "nll", "cross_entropy", "log_sigmoid")),
    ("convolutions", ("conv", "cudnn", "implicit_gemm", "dgrad", "wgrad", "fprop", "winograd")),
    ("matrix products", ("gemm", "addmm", "matmul", "aten::mm", "bmm", "cutlass", "xmma", "linear")),
    ("copies and gathers", ("copy", "memcpy", "memset", "index", "gather", "fill", "cat")),
)


def kernel_group(name: str) -> str:
    """The table's group of a kernel or operator name; "elementwise, casts, other" when none matches."""
    lowered = name.lower()
    return next((group for group, parts in KERNEL_GROUPS if any(part in lowered for part in parts)), "elementwise, casts, other")


def profile_iterations(config: Config, iters: int, warmup: int, trace: Path, top: int = 15) -> dict:
    """torch.profiler over `iters` iterations after `warmup` (on CUDA: replays of the captured graph):
    the device time of every kernel (on a CPU: every operator's own time), grouped, per iteration and as
    a share of the total; the trace for chrome://tracing or Perfetto goes to `trace`."""
    sizes = {name: 8 * config.batch_size for name in REAL_SIZES}
    device, _, step, streams = _setup(config, sizes)
    run_iterations(step, streams, max(warmup, TrainStep.WARMUP + 2))
    cuda = device.type == "cuda"
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    start = time.perf_counter()
    with torch.profiler.profile(activities=activities) as profiler:
        run_iterations(step, streams, iters)
        synchronize(device)
    wall_ms = 1000 * (time.perf_counter() - start) / iters
    trace.parent.mkdir(parents=True, exist_ok=True)
    profiler.export_chrome_trace(str(trace))
    if cuda:  # kernels only: their device time is the GPU's work, nothing counted twice
        events = [e for e in profiler.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
        times = {e.key: e.self_device_time_total for e in events}
    else:  # each operator's own time (its children's excluded)
        times = {e.key: e.self_cpu_time_total for e in profiler.key_averages() if e.self_cpu_time_total > 0}
    total = sum(times.values()) or 1.0
    groups: dict[str, float] = {}
    for name, microseconds in times.items():
        groups[kernel_group(name)] = groups.get(kernel_group(name), 0.0) + microseconds
    per_iter = lambda microseconds: microseconds / 1000 / iters  # noqa: E731
    return {
        "profiled_iters": iters,
        "wall_ms_per_iter_profiled": wall_ms,
        "kernel_ms_per_iter": per_iter(total),
        "groups": [{"group": g, "ms_per_iter": per_iter(t), "share": t / total}
                   for g, t in sorted(groups.items(), key=lambda item: -item[1])],
        "top": [{"name": n, "group": kernel_group(n), "ms_per_iter": per_iter(t), "share": t / total}
                for n, t in sorted(times.items(), key=lambda item: -item[1])[:top]],
        "trace": str(trace),
    }


def print_profile(result: dict) -> None:
    kind = "kernel" if result["cuda"] else "operator"
    print(f"{result['kernel_ms_per_iter']:.2f} ms of {kind} time per iteration"
          + ("" if result["cuda"] else " (each operator's own CPU time)") + "; "
          f"{result['wall_ms_per_iter_profiled']:.2f} ms wall per iteration under the profiler")
    print("\n| group | ms / iteration | share |\n|---|---|---|")
    for row in result["groups"]:
        print(f"| {row['group']} | {row['ms_per_iter']:.3f} | {100 * row['share']:.1f} % |")
    print(f"\n| top {kind} | group | ms / iteration | share |\n|---|---|---|---|")
    for row in result["top"]:
        print(f"| `{row['name'][:90]}` | {row['group']} | {row['ms_per_iter']:.3f} | {100 * row['share']:.1f} % |")
    print(f"\ntrace: {result['trace']} (chrome://tracing or https://ui.perfetto.dev)")


def _memory(device: torch.device) -> dict:
    if device.type != "cuda":
        return {"peak_memory_mib": None}
    return {"peak_memory_mib": torch.cuda.max_memory_allocated(device) / 2**20}


def environment(device: torch.device) -> dict:
    return {
        "device": device_name(device),
        "torch": torch.__version__,
        "cuda": torch.version.cuda if device.type == "cuda" else None,
    }


def sweep(args: argparse.Namespace, device: str) -> int:
    """Each variant in a fresh process (its own peak memory, and a failure stays its own), then a table."""
    variants = SWEEP_CUDA if device.startswith("cuda") else SWEEP_CPU
    rows, common = [], ["--device", device, "--method", args.method, "--batch-size", str(args.batch_size),
                        "--num-k", str(args.num_k), "--repeats", str(args.repeats), "--warmup", str(args.warmup)]
    common += ["--iters", str(args.iters)] if args.iters else []
    common += ["--network", args.network]
    for variant in variants:
        command = [sys.executable, __file__, *common]
        for flag, value in zip(SWEEP_FLAGS, variant, strict=True):
            command += [f"--{flag}", value]
        label = ", ".join(f"{name} {value}".strip() for name, value in zip(SWEEP_FLAGS.values(), variant))
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout)
            lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
            result = json.loads(lines[-1]) if done.returncode == 0 and lines else None
            failure = None if result else (done.stderr.strip().splitlines() or ["no output"])[-1]
        except subprocess.TimeoutExpired:
            result, failure = None, f"timed out after {args.timeout:.0f} s"
        if result is None:
            result = {"variant": label, "error": failure}
        print(f"{label}: " + (f"{result['ms_per_iter_median']:.2f} ms/iter" if "error" not in result else f"FAILED: {failure}"),
              flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(result) + "\n")
        rows.append((label, result))
    print("\n| precision, " + ", ".join(list(SWEEP_FLAGS.values())[1:]) + " | ms/iter (median, min-max) | images/s | setup s | peak MiB |")
    print("|---|---|---|---|---|")
    for label, r in rows:
        if "error" in r:
            print(f"| {label} | failed: {r['error'][:80]} | | | |")
        else:
            memory = f"{r['peak_memory_mib']:.0f}" if r["peak_memory_mib"] is not None else "-"
            print(f"| {label} | {r['ms_per_iter_median']:.2f} ({r['ms_per_iter_min']:.2f}-{r['ms_per_iter_max']:.2f}) | "
                  f"{r['images_per_s']:,.0f} | {r['setup_s']:.1f} | {memory} |")
    return 0 if all("error" not in r for _, r in rows) else 1


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if sum((args.profile, args.full_epoch, args.sweep, args.evaluation)) > 1:
        parser.error("--profile, --full-epoch, --sweep and --evaluation are different measurements: choose one")
    if args.full_epoch and args.network != "svhn2mnist":
        parser.error("--full-epoch times one SVHN -> MNIST run at the real sizes: leave out --network")
    try:
        config = resolve({"device": args.device, "method": args.method, "batch_size": args.batch_size,
                          "num_k": args.num_k, "network": args.network, "precision": args.precision,
                          "cuda_graph": args.cuda_graph, "compile": args.compile, "channels_last": args.channels_last})
    except SettingError as error:
        parser.error(str(error))
    if args.sweep:
        return sweep(args, config.device)
    on_cuda = config.device.startswith("cuda")
    speed = {name: getattr(config, name) for name in ("precision", "cuda_graph", "compile", "channels_last")}
    header = {**environment(torch.device(config.device)), "method": config.method, "network": args.network,
              "batch_size": config.batch_size, "num_k": config.num_k, **speed}
    print(f"# {header['device']} | torch {header['torch']} | {config.method}, {args.network} network, batch "
          f"{config.batch_size} + {config.batch_size}, num_k {config.num_k} | {speed_label(config)}", flush=True)
    if args.profile:
        result = {**header, "mode": "profile", "cuda": on_cuda,
                  **profile_iterations(config, args.iters or (20 if on_cuda else 2), args.warmup, args.trace)}
        print_profile(result)
    elif args.evaluation:
        result = {**header, "mode": "evaluation", **time_evaluation(config, args.eval_batch_sizes, args.repeats)}
        print(f"\n| evaluation chunk | s per evaluation ({result['test_images']:,} images, median, min) | images/s |\n|---|---|---|")
        for row in result["evaluation"]:
            print(f"| {row['chunk']} | {row['eval_s_median']:.3f} ({row['eval_s_min']:.3f}) | {row['images_per_s']:,.0f} |")
    elif args.full_epoch:
        result = {**header, "mode": "full_epoch", **time_full_epochs(config)}
        for i, (t, e) in enumerate(zip(result["train_s"], result["eval_s"]), 1):
            print(f"epoch {i}: train {t:.2f} s + evaluation {e:.2f} s")
        print(f"{result['ms_per_iter_epoch_2']:.2f} ms/iter in epoch 2; "
              f"50 epochs projected: {result['projected_50_epochs_s']:.0f} s")
    else:
        iters = args.iters or (100 if on_cuda else 3)
        result = {**header, "mode": "iterations", **time_iterations(config, iters, args.repeats, args.warmup)}
        print(f"{result['ms_per_iter_median']:.2f} ms/iter (median of {args.repeats} x {iters}; "
              f"{result['ms_per_iter_min']:.2f}-{result['ms_per_iter_max']:.2f}) | {result['images_per_s']:,.0f} images/s | "
              f"warm-up {result['setup_s']:.1f} s (capture {result['capture_s']:.2f} s)"
              + (f" | peak memory {result['peak_memory_mib']:.0f} MiB" if result["peak_memory_mib"] else ""))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
