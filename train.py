"""Runs the MCD three-step loop: train(config) for one run, run_seeds for several, evaluate_checkpoint.

    train(config)
      check_output, load data, build the algorithm (algorithms.py), restore a checkpoint on --resume
      for each epoch:
        train_epoch: `iterations` times  TrainStep (iteration.py) -> algorithm.update(xs, ys, xt)
                                           = step_a, step_b, step_c (MCD) or step_a alone (source only)
        evaluate_all: source test (ensemble) and target test (F1, F2, ensemble)
        CheckpointWriter: the epoch's checkpoint, then its CSV row (run_control.py, results.py)
      the target test confusion matrix as a PNG (figures.py)

What is computed lives in algorithms.py, how fast in iteration.py, the files in results.py and
checkpoint.py, and stopping / resuming in run_control.py; this file only puts them in order.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import replace
from pathlib import Path

import torch
from tqdm import tqdm

from algorithms import ALGORITHMS, SourceOnly
from checkpoint import checkpoint_path, load_checkpoint
from config import Config, configure_backends, device_name, seed_everything, speed_label, synchronize
from datasets import BatchStream, Digits, DigitsSplit, load_digits
from figures import picture_path, save_confusion
from iteration import LiveLosses, NonFiniteLoss, NonFiniteWatch, TrainStep, check_finite_weights
from results import (
    OutputError,
    ResultsWriter,
    run_record,
    seed_csv,
    summarize,
    summary_line,
    summary_path,
    summary_table,
    write_json,
    write_summary,
    writing,
)
from run_control import (
    CheckpointWriter,
    Interrupted,
    SignalGuard,
    check_output,
    check_resumable,
    check_seed_outputs,
    checkpoint_data,
    checkpoint_payload,
    lock_holder,
    model_from_checkpoint,
    restore_run,
    run_lock,
)


def batch_streams(data: Digits, config: Config) -> tuple[BatchStream, BatchStream]:
    """Two independent index streams (source, target) on the data's device; seeds derive from the run's."""
    device = data.source_train.labels.device
    return (
        BatchStream(len(data.source_train), config.batch_size, device, seed=2 * config.seed),
        BatchStream(len(data.target_train), config.batch_size, device, seed=2 * config.seed + 1),
    )


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


def save_target_confusion(model: SourceOnly, split: DigitsSplit, out: Path, title: str, chunk_size: int) -> None:
    """The ensemble's confusion matrix on `split` (the target test set) as a PNG."""
    predicted = model.predictions(split, chunk_size)[2].cpu().numpy()
    with writing(out):
        save_confusion(predicted, split.labels.cpu().numpy(), out, title)


def train(config: Config) -> dict[str, float | int | None]:
    """Train as configured, writing a checkpoint and then a CSV row after every epoch; returns the last
    row (the result). Raises OutputError / ResumeError / DataError before anything is written,
    Interrupted on SIGINT/SIGTERM and NonFiniteLoss, both keeping the last checkpoint and CSV intact.
    The output's lock and the signal handlers are held until every write has finished."""
    check_output(config)
    with run_lock(Path(config.csv)), SignalGuard():
        saved_path = checkpoint_path(Path(config.csv))
        checkpoint = load_checkpoint(saved_path) if config.resume else None
        if checkpoint is not None:
            check_resumable(checkpoint, config, saved_path)
        rows: list[dict] = list(checkpoint["rows"]) if checkpoint is not None else []  # grows epoch by epoch
        try:
            _train(config, checkpoint, rows)
        except Interrupted as error:
            error.epochs_saved = rows[-1]["epoch"] if rows else 0
            raise
        return rows[-1]


def _train(config: Config, checkpoint: dict | None, rows: list[dict]) -> None:
    """Set up (data, model, restored state), then the epochs, appending each epoch's row to `rows`."""
    csv_path = Path(config.csv)
    saved_path = checkpoint_path(csv_path)
    device = torch.device(config.device)
    configure_backends(config)
    seed_everything(config.seed)  # model init and dropout masks, on every device
    data = load_digits(config.data_root, config.download, config.allow_unverified_data, device,
                       config.source, config.target, config.small_subsets, subset_seed=config.seed)
    streams = batch_streams(data, config)
    iterations = config.iters_per_epoch or min(len(data.source_train), len(data.target_train)) // config.batch_size
    model = ALGORITHMS[config.method](config, device)
    model.train_mode(True)
    resumed_at: list[int] = []
    if checkpoint is not None:
        restore_run(checkpoint, model, streams, data.files, saved_path)
        resumed_at = checkpoint["resumed_at"] + [checkpoint["epoch"]]
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
        for epoch in range(epoch + 1, config.epochs + 1):
            start = time.perf_counter()
            try:
                losses = train_epoch(step, streams, iterations, desc=f"epoch {epoch}/{config.epochs}")
                check_finite_weights(model)
            except NonFiniteLoss as error:
                error.epoch = epoch
                raise
            synchronize(device)
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
    finally:
        checkpoints.close()  # waits for the last write
    save_target_confusion(model, data.target_test, picture_path(saved_path, "confusion"),
                          f"{config.method}, target test, ensemble", config.eval_batch_size)


def run_seeds(config: Config, seeds: list[int]) -> None:
    """The same configuration once per seed, one after another, then the summary over seeds. Every
    seed's output is checked and locked before the first one trains."""
    csv_path = Path(config.csv)
    configs = [replace(config, seed=seed, csv=str(seed_csv(csv_path, seed))) for seed in seeds]
    check_seed_outputs(config, configs)
    final_rows: dict[int, dict] = {}
    current = configs[0]
    with contextlib.ExitStack() as locks, SignalGuard():
        for each in (config, *configs):  # the base name's lock covers the summary
            locks.enter_context(run_lock(Path(each.csv)))
        try:
            for current in configs:
                if current.resume and not checkpoint_path(Path(current.csv)).exists():
                    # --resume of a multi-seed run: a seed that never finished an epoch starts afresh
                    current = replace(current, resume=False, overwrite=True)
                print(f"== seed {current.seed}: {current.csv}")
                final_rows[current.seed] = train(current)
            summary = summarize(final_rows)
            write_summary(summary_path(csv_path), summary)
        except (Interrupted, NonFiniteLoss) as error:
            error.csv = current.csv  # the messages name this seed's files
            if isinstance(error, Interrupted) and current.seed in final_rows:  # between two seeds
                error.epochs_saved = final_rows[current.seed]["epoch"]
            raise
    print(summary_table(summary))
    print(f"wrote {summary_path(csv_path)}")


def evaluate_checkpoint(path: Path, device: torch.device, data_root: str | None, download: bool,
                        allow_unverified: bool, chunk_size: int) -> dict:
    """--evaluate: the accuracies of a saved model, without training (the CSV columns of its last row)."""
    holder = lock_holder(path)
    if holder:
        raise OutputError(f"--evaluate: {path} belongs to a run that is still training ({holder}); "
                          "evaluate it once that run has finished")
    checkpoint = load_checkpoint(path, flag="--evaluate")
    data = checkpoint_data(checkpoint, device, data_root, download, allow_unverified)
    model = model_from_checkpoint(checkpoint, device)
    result = {"checkpoint": str(path), "epoch": checkpoint["epoch"], "method": checkpoint["config"]["method"],
              "device": device_name(device), **evaluate_all(model, data, chunk_size)}
    out = path.with_name(f"{path.stem}_evaluation.json")
    write_json(out, result)
    save_target_confusion(model, data.target_test, picture_path(path, "confusion"), "target test, ensemble", chunk_size)
    print(f"{path} (epoch {checkpoint['epoch']}): source {result['source_acc']:.2f}% | target F1 "
          f"{result['target_acc_f1']:.2f}% F2 {result['target_acc_f2']:.2f}% ensemble {result['target_acc_ensemble']:.2f}%")
    print(f"wrote {out} and {picture_path(path, 'confusion')}")
    return result
