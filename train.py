"""Runs the MCD three-step loop: train(config) for one run, run_seeds for several, evaluate_checkpoint.

    train_together(configs)            one run, or several seeds side by side (--parallel-seeds)
      check_output, lock, Run per config: load data, build the algorithm (algorithms.py), restore a
      checkpoint on --resume
      for each epoch:
        train_epoch: `iterations` times, for each run's Lane (iteration.py):
                       TrainStep -> algorithm.update(xs, ys, xt) = step_a, step_b, step_c (MCD)
                                                                   or step_a alone (source only)
        Run.end_epoch: evaluate_all (source test ensemble; target test F1, F2, ensemble), then
                       CheckpointWriter: the epoch's checkpoint, then its CSV row (run_control.py, results.py)
      the target test confusion matrix as a PNG (figures.py)

What is computed lives in algorithms.py, how fast in iteration.py, the files in results.py and
checkpoint.py, and stopping / resuming in run_control.py; this file only puts them in order.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable, Iterator, TypeVar

import torch
from tqdm import tqdm

from algorithms import ALGORITHMS, SourceOnly
from checkpoint import checkpoint_path, load_checkpoint
from config import Config, configure_backends, device_name, seed_everything, speed_label, synchronize
from datasets import BatchStream, Digits, DigitsSplit, load_digits
from figures import picture_path, save_confusion
from iteration import Lane, LiveLosses, NonFiniteLoss, NonFiniteWatch, SeedRandomness, TrainStep, check_finite_weights
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


def train_epoch(lanes: list[Lane], iterations: int, desc: str) -> list[dict[str, float]]:
    """`iterations` training steps of every lane, the lanes taking turns each iteration (on CUDA their
    work overlaps); returns each lane's losses averaged over the epoch (one host read, at the end)."""
    for lane in lanes:
        with lane.active():
            lane.step.tally.reset()
    watches = [NonFiniteWatch(lane.step.tally) for lane in lanes]
    bar = tqdm(range(iterations), desc=desc, leave=False, dynamic_ncols=True, disable=None)
    live = LiveLosses(bar) if len(lanes) == 1 else None  # one bar cannot show several seeds' losses
    means: list[dict[str, float]] = []
    try:
        for i in bar:
            for index, (lane, watch) in enumerate(zip(lanes, watches)):
                with lane.active(), _naming_lane(index):
                    lane()
                    watch.update(i)
            if live is not None:
                live.update(i, lanes[0].step.tally)
        for index, (lane, watch) in enumerate(zip(lanes, watches)):
            with lane.active(), _naming_lane(index):
                watch.finish()
                means.append(lane.step.tally.means(iterations))
    finally:
        bar.close()
    return means


@contextlib.contextmanager
def _naming_lane(index: int) -> Iterator[None]:
    """A NonFiniteLoss raised inside says which lane (run) it came from."""
    try:
        yield
    except NonFiniteLoss as error:
        error.lane = index
        raise


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


class Run:
    """One run (one seed) in progress: its data, algorithm, Lane, rows and checkpoint writer. `rows` is
    the caller's list (the checkpoint's rows on --resume) and grows by one row per epoch. `shared_data`
    lends datasets already loaded by another run of the same data; `together` gives the run its own
    random generators and CUDA stream (iteration.Lane) to train beside others."""

    def __init__(self, config: Config, checkpoint: dict | None, rows: list[dict], shared_data: dict, together: bool):
        self.config, self.rows = config, rows
        self.saved_path = checkpoint_path(Path(config.csv))
        self.device = torch.device(config.device)
        configure_backends(config)
        seed_everything(config.seed)  # model init and dropout masks, on every device
        # The subsets of --small-subsets are drawn per seed; whole datasets are the same for every seed.
        key = config.seed if config.small_subsets else None
        if key not in shared_data:
            shared_data[key] = load_digits(config.data_root, config.download, config.allow_unverified_data, self.device,
                                           config.source, config.target, config.small_subsets, subset_seed=config.seed)
        self.data = data = shared_data[key]
        streams = batch_streams(data, config)
        self.iterations = config.iters_per_epoch or min(len(data.source_train), len(data.target_train)) // config.batch_size
        self.model = ALGORITHMS[config.method](config, self.device)
        self.model.train_mode(True)
        self.resumed_at: list[int] = []
        if checkpoint is not None:
            restore_run(checkpoint, self.model, streams, data.files, self.saved_path)
            self.resumed_at = checkpoint["resumed_at"] + [checkpoint["epoch"]]
        else:
            self.saved_path.unlink(missing_ok=True)  # --overwrite: no stale checkpoint beside the new CSV
        # Alone, the process's generators are the run's; together, the run keeps its own from here on.
        self.lane = Lane(TrainStep(self.model, data.source_train, data.target_train), streams,
                         SeedRandomness(self.device) if together else None)
        record = run_record(config, data.files, self.device, self.iterations)
        record["resumed_at_epochs"] = self.resumed_at
        self.checkpoints = CheckpointWriter(self.saved_path, ResultsWriter(config, record, rows))
        self.prefix = f"seed {config.seed}: " if together else ""
        print(
            f"{self.prefix}{config.method}: {len(data.source_train)} source / {len(data.target_train)} target training "
            f"images, {config.epochs} epochs x {self.iterations} iterations on {device_name(self.device)} "
            f"({speed_label(config)})" + (f"; resuming after epoch {self.epoch}" if rows else "")
        )
        if rows and self.epoch == config.epochs:
            print(f"{config.csv} already holds all {config.epochs} epochs; raise --epochs to train further")

    @property
    def epoch(self) -> int:
        """Epochs finished (and saved, or being saved)."""
        return self.rows[-1]["epoch"] if self.rows else 0

    def end_epoch(self, losses: dict[str, float], seconds: float) -> None:
        """After an epoch's training (`seconds` of it): check the weights, evaluate, then save the
        checkpoint and its CSV row in the background (the two always agree)."""
        check_finite_weights(self.model)
        row = {
            "epoch": self.epoch + 1,
            "iterations": (self.epoch + 1) * self.iterations,
            # training time only, summed over epochs; evaluation is not counted
            "seconds": (self.rows[-1]["seconds"] if self.rows else 0.0) + seconds,
            "loss_source": losses["loss_source"],
            "discrepancy_b": losses.get("discrepancy_b"),
            "discrepancy_c": losses.get("discrepancy_c"),
            **evaluate_all(self.model, self.data, self.config.eval_batch_size),
        }
        streams = self.lane.streams
        payload = checkpoint_payload(self.config, self.model, streams, self.data.files, self.rows + [row], self.resumed_at)
        self.checkpoints.submit(payload, row)
        self.rows.append(row)
        print(self.prefix + summary_line(row, self.config.epochs))

    def save_confusion(self) -> None:
        save_target_confusion(self.model, self.data.target_test, picture_path(self.saved_path, "confusion"),
                              f"{self.config.method}, target test, ensemble", self.config.eval_batch_size)


def train(config: Config) -> dict[str, float | int | None]:
    """Train as configured, writing a checkpoint and then a CSV row after every epoch; returns the last
    row (the result). Raises OutputError / ResumeError / DataError before anything is written,
    Interrupted on SIGINT/SIGTERM and NonFiniteLoss, both keeping the last checkpoint and CSV intact.
    The output's lock and the signal handlers are held until every write has finished."""
    return train_together([config])[0]


def train_together(configs: list[Config]) -> list[dict[str, float | int | None]]:
    """train() for several runs (seeds) at once, in one process and on one device: every iteration each
    run takes its turn, each with its own generators and CUDA stream, so each is the run it would be
    alone (same CSV, checkpoint, --resume) while the GPU overlaps their work. Returns each last row.
    An error or a signal stops all of them; Interrupted / NonFiniteLoss name the first unfinished run."""
    for config in configs:
        check_output(config)
    with contextlib.ExitStack() as stack:
        for config in configs:
            stack.enter_context(run_lock(Path(config.csv)))
        stack.enter_context(SignalGuard())
        started: list[tuple[Config, dict | None, list[dict]]] = []
        for config in configs:
            saved_path = checkpoint_path(Path(config.csv))
            checkpoint = load_checkpoint(saved_path) if config.resume else None
            if checkpoint is not None:
                check_resumable(checkpoint, config, saved_path)
            started.append((config, checkpoint, list(checkpoint["rows"]) if checkpoint is not None else []))
        try:
            _train_runs(started)
        except Interrupted as error:  # the messages name the first unfinished run's files
            config, _, rows = next((s for s in started if not s[2] or s[2][-1]["epoch"] < s[0].epochs), started[-1])
            error.csv, error.epochs_saved = config.csv, rows[-1]["epoch"] if rows else 0
            raise
        return [rows[-1] for _, _, rows in started]


def _train_runs(started: list[tuple[Config, dict | None, list[dict]]]) -> None:
    """Set up a Run per (config, checkpoint, rows), then the epochs until every run has all of its own."""
    together = len(started) > 1
    shared_data: dict = {}
    clock = time.perf_counter()
    epoch_seconds: list[float] = []  # training only
    with contextlib.ExitStack() as closing:  # every run's writer finishes its last write, whatever happens
        runs = []
        for config, checkpoint, rows in started:
            runs.append(Run(config, checkpoint, rows, shared_data, together))
            closing.callback(runs[-1].checkpoints.close)
        device = runs[0].device
        setup_seconds = time.perf_counter() - clock
        while unfinished := [run for run in runs if run.epoch < run.config.epochs]:
            first = unfinished[0]
            desc = f"epoch {first.epoch + 1}/{first.config.epochs}" + (f" ({len(unfinished)} seeds)" if together else "")
            start = time.perf_counter()
            # Every run of a group has the same settings but its seed, so the same iterations per epoch.
            losses = _checked(unfinished, lambda: train_epoch([run.lane for run in unfinished], first.iterations, desc))
            synchronize(device)
            seconds = time.perf_counter() - start  # together: the epoch's wall time, shared by its runs
            epoch_seconds.append(seconds)
            for run, run_losses in zip(unfinished, losses):
                with run.lane.active():
                    _checked([run], lambda: run.end_epoch(run_losses, seconds))
    for run in runs:
        run.save_confusion()
    if epoch_seconds:
        rest = time.perf_counter() - clock - setup_seconds - sum(epoch_seconds)
        print(timing_line(setup_seconds, epoch_seconds, rest, sum(run.lane.step.capture_seconds for run in runs)))


def timing_line(setup: float, epoch_seconds: list[float], rest: float, capture: float) -> str:
    """Where this process's time went, start-up and warm-up apart from steady training: setup (data,
    models, a checkpoint restored into them), training (the first epoch holds the warm-up: cuDNN autotuning, compilation,
    graph capture), evaluation and checkpoints (incl. waiting for the last write). Seconds."""
    line = (f"time in this process: setup {setup:.1f} s; training {sum(epoch_seconds):.1f} s over "
            f"{len(epoch_seconds)} epoch{'s' if len(epoch_seconds) > 1 else ''} (first {epoch_seconds[0]:.1f} s")
    if len(epoch_seconds) > 1:
        later = statistics.median(epoch_seconds[1:])
        line += f", later median {later:.1f} s: warm-up ≈ {epoch_seconds[0] - later:.1f} s"
    line += f"{f', graph capture {capture:.2f} s' if capture else ''}); evaluation and checkpoints {rest:.1f} s"
    return line


Result = TypeVar("Result")


def _checked(runs: list[Run], work: Callable[[], Result]) -> Result:
    """work(), with a NonFiniteLoss saying which run (its files) and which epoch it happened in."""
    try:
        return work()
    except NonFiniteLoss as error:
        run = runs[getattr(error, "lane", 0)]
        error.epoch, error.csv = run.epoch + 1, run.config.csv
        raise


def run_seeds(config: Config, seeds: list[int]) -> None:
    """The same configuration once per seed, `config.parallel_seeds` of them at a time side by side,
    then the summary over seeds. Every seed's output is checked and locked before the first one trains."""
    csv_path = Path(config.csv)
    configs = [replace(config, seed=seed, csv=str(seed_csv(csv_path, seed))) for seed in seeds]
    check_seed_outputs(config, configs)
    final_rows: dict[int, dict] = {}
    with contextlib.ExitStack() as locks, SignalGuard():
        for each in (config, *configs):  # the base name's lock covers the summary
            locks.enter_context(run_lock(Path(each.csv)))
        try:
            for first in range(0, len(configs), config.parallel_seeds):
                group = [_fresh_unless_saved(each) for each in configs[first : first + config.parallel_seeds]]
                for each in group:
                    print(f"== seed {each.seed}: {each.csv}")
                for each, row in zip(group, train_together(group)):
                    final_rows[each.seed] = row
            summary = summarize(final_rows)
            write_summary(summary_path(csv_path), summary)
        except (Interrupted, NonFiniteLoss) as error:
            if not hasattr(error, "csv"):  # between two groups: the last finished seed's files
                last = max(final_rows, default=None)
                error.csv = configs[0].csv if last is None else str(seed_csv(csv_path, last))
                error.epochs_saved = final_rows[last]["epoch"] if last is not None else 0
            raise
    print(summary_table(summary))
    print(f"wrote {summary_path(csv_path)}")


def _fresh_unless_saved(config: Config) -> Config:
    """--resume of a multi-seed run: a seed that never finished an epoch starts afresh."""
    if config.resume and not checkpoint_path(Path(config.csv)).exists():
        return replace(config, resume=False, overwrite=True)
    return config


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
