"""The training loop: train(config) is one run, read top to bottom; run_seeds repeats it per seed and
summarises; evaluate_checkpoint scores a saved model.

    train(config)
      RunFiles: check the outputs, lock them, catch signals, read the checkpoint on --resume (run_control.py)
      data: the pair's datasets whole, as uint8 on the device (datasets.py)
      method: G, F1, F2 and their optimisers (algorithms.py), sped up for the device (iteration.py),
              restored on --resume
      for each epoch:
        for each iteration:  losses = step(source batch, target batch)    TrainStep -> method.update
                                                                           MCD: step_a, step_b, step_c
        evaluate (source test; target test F1, F2, ensemble; label-free scores on target training images)
        run.save_epoch: the epoch's CSV row, and its training state when due
      run.finish: the target confusion matrix, the validators' picks
"""

from __future__ import annotations

import contextlib
import statistics
import time
from dataclasses import replace
from pathlib import Path

import torch
from tqdm import tqdm

from algorithms import ALGORITHMS, DISCREPANCIES, SourceOnly
from checkpoint import checkpoint_path, checkpoint_data, load_checkpoint, model_from_checkpoint
from config import Config, configure_backends, device_name, seed_everything, speed_label, synchronize
from datasets import BatchStream, Digits, load_digits
from figures import picture_path
from iteration import CaptureFailed, EpochLosses, NonFiniteLoss, TrainStep, finite_weights, speed_up
from results import (seed_csv, selection_path, summarize, summary_line, summary_path, summary_table, write_json,
                     write_rows, write_summary)
from locks import refuse_if_training, run_lock
from run_control import Interrupted, RunFiles, RunStopped, SignalGuard, check_seed_outputs, save_target_confusion
import validators


def batch_streams(data: Digits, config: Config) -> tuple[BatchStream, BatchStream]:
    """Two independent index streams (source, target) on the data's device; seeds derive from the run's."""
    device = data.source_train.labels.device
    return (
        BatchStream(len(data.source_train), config.batch_size, device, seed=2 * config.seed),
        BatchStream(len(data.target_train), config.batch_size, device, seed=2 * config.seed + 1),
    )


def evaluate_all(model: SourceOnly, data: Digits, chunk_size: int, validation_images: torch.Tensor | None = None
                 ) -> dict[str, float]:
    """The CSV's accuracy columns: source test (ensemble) and target test (F1, F2, ensemble); with
    `validation_images` (target training images, no labels) also the label-free scores (validators.py),
    val_d being the run's own discrepancy (its SWD directions from a fixed seed)."""
    _, _, source_acc = model.evaluate(data.source_test, chunk_size)
    target_f1, target_f2, target_ensemble = model.evaluate(data.target_test, chunk_size)
    row = {"source_acc": source_acc, "target_acc_f1": target_f1, "target_acc_f2": target_f2,
           "target_acc_ensemble": target_ensemble}
    if validation_images is not None:
        generator = torch.Generator(model.device).manual_seed(validators.VALIDATION_SEED)  # training's RNG untouched
        d = DISCREPANCIES[model.config.discrepancy]
        row.update(validators.scores(((l1, l2) for _, l1, l2 in model.eval_passes(validation_images, chunk_size)),
                                     lambda l1, l2: d(l1, l2, model.config, generator)))
    return row


def train(config: Config, command: list[str] | None = None) -> list[dict[str, float | int | None]]:
    """Train one run as configured, writing a checkpoint and then a CSV row after every epoch; returns the
    rows. Raises OutputError / ResumeError / DataError before anything is written, RunStopped on
    SIGINT/SIGTERM or a non-finite loss, keeping the last checkpoint and CSV intact."""
    clock = time.perf_counter()
    with RunFiles(config, command or ["main.py"]) as run:
        device = torch.device(config.device)
        configure_backends(config)
        seed_everything(config.seed)  # model init and dropout masks, on every device

        # The data: both datasets whole, as uint8 on the device; a batch is a (B,) index tensor drawn there.
        data = load_digits(config.data_root, config.download, config.allow_unverified_data, device, config.source,
                           config.target, config.network, config.small_subsets, subset_seed=config.seed)
        source, target = batch_streams(data, config)
        iterations = config.iters_per_epoch or min(len(data.source_train), len(data.target_train)) // config.batch_size
        validation_images = data.target_train.images[validators.validation_subset(len(data.target_train)).to(device)]

        # The method: the mathematics (algorithms.py), then how fast it runs here (iteration.py), then --resume.
        method = ALGORITHMS[config.method](config, len(data.classes), device, config.epochs * iterations)
        method.train()
        speed_up(method, config)
        run.start(method, (source, target), data, iterations)
        step = TrainStep(method, data.source_train, data.target_train, config)
        print(f"{config.method}: {len(data.source_train)} source / {len(data.target_train)} target training images, "
              f"{config.epochs} epoch{'s' if config.epochs > 1 else ''} x {iterations} iterations on {device_name(device)} ({speed_label(config)})"
              + (f"; resuming after epoch {run.epoch}" if run.rows else ""))
        setup_seconds, epoch_seconds = time.perf_counter() - clock, []

        for epoch in range(run.epoch + 1, config.epochs + 1):
            bar = tqdm(range(iterations), desc=f"epoch {epoch}/{config.epochs}", leave=False, dynamic_ncols=True,
                       disable=None)
            losses = EpochLosses(device, bar)  # summed on the device: no host sync inside the loop
            start = time.perf_counter()
            try:
                for _ in bar:
                    losses.add(step(source.next(), target.next()))  # two (B,) index batches -> on-device losses
                means = losses.means()  # one host read per epoch
                step.verify()  # every iteration ran exactly once (a CUDA graph that did not replay would not)
            except NonFiniteLoss as error:
                raise run.stopped(f"non-finite loss in epoch {epoch}, iteration {error.iteration}") from error
            except CaptureFailed as error:
                raise run.stopped(str(error), exit_code=2, advice="--cuda-graph auto goes on eagerly instead") from error
            finally:
                bar.close()
            synchronize(device)
            epoch_seconds.append(time.perf_counter() - start)
            if not finite_weights(method):  # losses can stay finite while a huge step leaves inf weights
                raise run.stopped(f"non-finite weights at the end of epoch {epoch}")
            row = {
                "epoch": epoch,
                "iterations": epoch * iterations,
                # training time only, summed over epochs (and over resumed processes); evaluation is not counted
                "seconds": (run.rows[-1]["seconds"] if run.rows else 0.0) + epoch_seconds[-1],
                **dict.fromkeys(method.LOSSES), **means,
                **evaluate_all(method, data, config.eval_batch_size, validation_images),
            }
            run.save_epoch(row, method, (source, target), {"path": step.path, "fallback": step.fallback})
            print(summary_line(row, config.epochs, method.LOSSES))
        run.finish(method, data)
    if epoch_seconds:
        rest = time.perf_counter() - clock - setup_seconds - sum(epoch_seconds)
        print(timing_line(setup_seconds, epoch_seconds, rest, step.capture_seconds))
    return run.rows


def timing_line(setup: float, epoch_seconds: list[float], rest: float, capture: float) -> str:
    """Where this process's time went, start-up and warm-up apart from steady training: setup (data,
    models, a checkpoint restored into them), training (the first epoch holds the warm-up: cuDNN autotuning,
    compilation, graph capture), evaluation and checkpoints (incl. waiting for the last write). Seconds."""
    line = (f"time in this process: setup {setup:.1f} s; training {sum(epoch_seconds):.1f} s over "
            f"{len(epoch_seconds)} epoch{'s' if len(epoch_seconds) > 1 else ''} (first {epoch_seconds[0]:.1f} s")
    if len(epoch_seconds) > 1:
        later = statistics.median(epoch_seconds[1:])
        line += f", later median {later:.1f} s" + (f": warm-up ≈ {epoch_seconds[0] - later:.1f} s"
                                                    if epoch_seconds[0] > later else "")
    line += f"{f', graph capture {capture:.2f} s' if capture else ''}); evaluation and checkpoints {rest:.1f} s"
    return line


def run_seeds(config: Config, seeds: list[int], command: list[str] | None = None) -> None:
    """The same configuration once per seed, one after another, then the summary over seeds. Every seed's
    output is checked and locked before the first one trains."""
    csv_path = Path(config.csv)
    configs = [replace(config, seed=seed, csv=str(seed_csv(csv_path, seed))) for seed in seeds]
    check_seed_outputs(config, configs)
    final_rows: dict[int, dict] = {}  # seed -> its last row
    every_row: dict[int, list[dict]] = {}  # seed -> all its rows, for the validators' rank correlations
    with contextlib.ExitStack() as locks, SignalGuard():
        for each in (config, *configs):  # the base name's lock covers the summary
            locks.enter_context(run_lock(Path(each.csv)))
        try:
            for each in configs:
                print(f"== seed {each.seed}: {each.csv}")
                rows = train(_fresh_unless_saved(each), command)
                final_rows[each.seed], every_row[each.seed] = rows[-1], rows
            summary = summarize(final_rows)
            write_summary(summary_path(csv_path), summary)
            choices = validators.summarize_choices(every_row)
            write_rows(selection_path(csv_path, over_seeds=True), list(choices[0]), choices)
        except (Interrupted, RunStopped) as error:
            if isinstance(error, RunStopped) and (error.epochs_saved or error.advice or not final_rows):
                raise  # it names its own run's files
            # a signal between seeds, or before the next seed saved an epoch: the last finished seed's files
            last = max(final_rows, default=None)
            raise RunStopped(str(error), configs[0].csv if last is None else str(seed_csv(csv_path, last)),
                             final_rows[last]["epoch"] if last is not None else 0, error.exit_code) from error
    print(summary_table(summary))
    print(validators.choices_table(choices))
    print(f"wrote {summary_path(csv_path)} and {selection_path(csv_path, over_seeds=True)}")


def _fresh_unless_saved(config: Config) -> Config:
    """--resume of a multi-seed run: a seed that never finished an epoch starts afresh."""
    if config.resume and not checkpoint_path(Path(config.csv)).exists():
        return replace(config, resume=False, overwrite=True)
    return config


def evaluate_checkpoint(path: Path, device: torch.device, data_root: str | None, download: bool,
                        allow_unverified: bool, chunk_size: int) -> dict:
    """--evaluate: the accuracies of a saved model, without training (the CSV columns of its last row)."""
    refuse_if_training(path, "--evaluate")
    checkpoint = load_checkpoint(path, flag="--evaluate")
    data = checkpoint_data(checkpoint, device, data_root, download, allow_unverified)
    model = model_from_checkpoint(checkpoint, device, path)
    result = {"checkpoint": str(path), "epoch": checkpoint["epoch"], "method": checkpoint["config"]["method"],
              "device": device_name(device), **evaluate_all(model, data, chunk_size)}
    out = path.with_name(f"{path.stem}_evaluation.json")
    write_json(out, result)
    save_target_confusion(model, data, picture_path(path, "confusion"), checkpoint["config"], checkpoint["epoch"],
                          chunk_size)
    print(f"{path} (epoch {checkpoint['epoch']}): source {result['source_acc']:.2f}% | target F1 "
          f"{result['target_acc_f1']:.2f}% F2 {result['target_acc_f2']:.2f}% ensemble {result['target_acc_ensemble']:.2f}%")
    print(f"wrote {out} and {picture_path(path, 'confusion')}")
    return result
