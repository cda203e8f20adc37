"""The training loop: train(config) for one run (or several seeds side by side), run_seeds, evaluate_checkpoint.

    train(*configs)                     one run, or several seeds side by side (--parallel-seeds)
      check_output, lock, then a Run per config: load data, build the method (algorithms.py), restore a
      checkpoint on --resume
      for each epoch:
        train_epoch: `iterations` times, for each run:
                       run.step(source batch, target batch)        TrainStep (iteration.py): the batch by
                         -> method.update(xs, ys, xt)               index, update() eager or as a CUDA graph
                            MCD: step_a, step_b, step_c; source only: step_a; DANN: one adversarial step
        Run.end_epoch: evaluate (source test ensemble; target test F1, F2, ensemble), then
                       CheckpointWriter: the epoch's checkpoint, then its CSV row (run_control.py, results.py)
      the target test confusion matrix as a PNG (figures.py)

Seeds side by side differ from a single run only in Run.active(): each run's own random generators and
CUDA stream around its turn. What is computed lives in algorithms.py, how fast in iteration.py, the
files in results.py and checkpoint.py, and stopping / resuming in run_control.py.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from dataclasses import replace
from pathlib import Path

import torch
from tqdm import tqdm

from algorithms import ALGORITHMS, SourceOnly
from checkpoint import checkpoint_path, load_checkpoint
from config import Config, configure_backends, device_name, result_settings, seed_everything, speed_label, synchronize
from datasets import BatchStream, Digits, DigitsSplit, load_digits
from figures import picture_path, save_confusion
from iteration import Lane, LiveLosses, NonFiniteLoss, NonFiniteWatch, SeedRandomness, TrainStep, finite_weights
from results import (
    OutputError,
    ResultsWriter,
    run_record,
    seed_csv,
    selection_path,
    summarize,
    summary_line,
    summary_path,
    summary_table,
    write_json,
    write_rows,
    write_summary,
    writing,
)
from run_control import (
    CheckpointWriter,
    Interrupted,
    RunStopped,
    SignalGuard,
    check_output,
    check_resumable,
    check_seed_outputs,
    checkpoint_data,
    checkpoint_payload,
    model_from_checkpoint,
    refuse_if_training,
    restore_run,
    run_lock,
)
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
    `validation_images` (target training images, no labels) also the label-free scores (validators.py)."""
    _, _, source_acc = model.evaluate(data.source_test, chunk_size)
    target_f1, target_f2, target_ensemble = model.evaluate(data.target_test, chunk_size)
    row = {
        "source_acc": source_acc,
        "target_acc_f1": target_f1,
        "target_acc_f2": target_f2,
        "target_acc_ensemble": target_ensemble,
    }
    if validation_images is not None:
        row.update(validators.scores((l1, l2) for _, l1, l2 in model.eval_passes(validation_images, chunk_size)))
    return row


def save_target_confusion(model: SourceOnly, split: DigitsSplit, out: Path, title: str, chunk_size: int) -> None:
    """The ensemble's confusion matrix on `split` (the target test set) as a PNG."""
    predicted = model.predictions(split, chunk_size)[2].cpu().numpy()
    with writing(out):
        save_confusion(predicted, split.labels.cpu().numpy(), out, title, model.classes)


class Run:
    """One run (one seed) in progress: its data, method, training step, rows and checkpoint writer.
    `rows` is the checkpoint's rows on --resume (else empty) and grows by one row per epoch.
    `shared_data` lends datasets already loaded by another run of the same data; `together` gives the
    run its own random generators and CUDA stream, to train beside others."""

    def __init__(self, config: Config, checkpoint: dict | None, shared_data: dict, together: bool):
        self.config = config
        self.rows: list[dict] = list(checkpoint["rows"]) if checkpoint is not None else []
        self.saved_path = checkpoint_path(Path(config.csv))
        self.board = self._tensorboard() if config.tensorboard else None  # before any file of the run is written
        self.device = torch.device(config.device)
        configure_backends(config)
        seed_everything(config.seed)  # model init and dropout masks, on every device
        # The subsets of --small-subsets are drawn per seed; whole datasets are the same for every seed.
        key = config.seed if config.small_subsets else None
        if key not in shared_data:
            shared_data[key] = load_digits(config.data_root, config.download, config.allow_unverified_data, self.device,
                                           config.source, config.target, config.small_subsets, subset_seed=config.seed)
        self.data = data = shared_data[key]
        self.streams = batch_streams(data, config)
        self.validation_images = data.target_train.images[validators.validation_subset(len(data.target_train)).to(self.device)]
        self.iterations = config.iters_per_epoch or min(len(data.source_train), len(data.target_train)) // config.batch_size
        self.model = ALGORITHMS[config.method](config, self.device, config.epochs * self.iterations)
        self.model.train()
        self.resumed_at: list[int] = []
        if checkpoint is not None:
            restore_run(checkpoint, self.model, self.streams, data.files, self.saved_path)
            self.resumed_at = checkpoint["resumed_at"] + [checkpoint["epoch"]]
        else:
            self.saved_path.unlink(missing_ok=True)  # --overwrite: no stale checkpoint beside the new CSV
        self.step = TrainStep(self.model, data.source_train, data.target_train)
        # Alone, the process's generators are the run's; together, the run keeps its own from here on.
        self.lane = Lane(self.device, SeedRandomness(self.device) if together else None)
        record = run_record(config, data.files, self.device, self.iterations)
        record["resumed_at_epochs"] = self.resumed_at
        self.checkpoints = CheckpointWriter(self.saved_path, ResultsWriter(config, record, self.rows, self.model.LOSSES))
        self.prefix = f"seed {config.seed}: " if together else ""
        print(
            f"{self.prefix}{config.method}: {len(data.source_train)} source / {len(data.target_train)} target training "
            f"images, {config.epochs} epochs x {self.iterations} iterations on {device_name(self.device)} "
            f"({speed_label(config)})" + (f"; resuming after epoch {self.epoch}" if self.rows else "")
        )
        if self.rows and self.epoch == config.epochs:
            print(f"{config.csv} already holds all {config.epochs} epochs; raise --epochs to train further")

    def _tensorboard(self):
        """A SummaryWriter in TENSORBOARD/STEM; resuming, TensorBoard drops whatever an earlier process
        wrote after the checkpoint's epoch (purge_step), so no epoch appears twice."""
        from torch.utils.tensorboard import SummaryWriter  # tensorboard is imported only when asked for

        folder = Path(self.config.tensorboard) / Path(self.config.csv).stem
        try:
            folder.mkdir(parents=True, exist_ok=True)
            return SummaryWriter(str(folder), purge_step=self.rows[-1]["epoch"] + 1 if self.rows else None)
        except OSError as error:
            raise OutputError(f"--tensorboard {self.config.tensorboard}: cannot write {folder} ({error.strerror}); "
                              "choose another folder") from None

    def _log_epoch(self, row: dict) -> None:
        for name, value in row.items():
            if name != "epoch" and value is not None:
                kind = ("loss" if name in self.model.LOSSES else "validator" if name in validators.COLUMNS
                        else "accuracy" if "acc" in name else "progress")
                self.board.add_scalar(f"{kind}/{name}", value, row["epoch"])
        self.board.flush()

    @property
    def epoch(self) -> int:
        """Epochs finished (and saved, or being saved)."""
        return self.rows[-1]["epoch"] if self.rows else 0

    def stopped(self, cause: str, exit_code: int = 3, advice: str = "Lower --lr, or check the data.") -> RunStopped:
        """This run stopped before its end: what to tell the user (its files, the epochs they hold)."""
        return RunStopped(cause, self.config.csv, self.epoch, exit_code, advice)

    def end_epoch(self, losses: dict[str, float], seconds: float) -> None:
        """After an epoch's training (`seconds` of it): check the weights, evaluate, then save the
        checkpoint and its CSV row in the background (the two always agree)."""
        if not finite_weights(self.model):  # losses can stay finite while a huge step leaves inf weights
            raise self.stopped(f"non-finite weights at the end of epoch {self.epoch + 1}")
        unknown = set(losses) - set(self.model.LOSSES)
        if unknown:  # never dropped silently
            raise ValueError(f"{type(self.model).__name__}.update returned {sorted(unknown)}, which its LOSSES "
                             f"{self.model.LOSSES} (the CSV's loss columns) do not name")
        row = {
            "epoch": self.epoch + 1,
            "iterations": (self.epoch + 1) * self.iterations,
            # training time only, summed over epochs; evaluation is not counted
            "seconds": (self.rows[-1]["seconds"] if self.rows else 0.0) + seconds,
            **{name: losses.get(name) for name in self.model.LOSSES},
            **evaluate_all(self.model, self.data, self.config.eval_batch_size, self.validation_images),
        }
        payload = checkpoint_payload(self.config, self.model, self.streams, self.data.files, self.rows + [row],
                                     self.resumed_at)
        self.checkpoints.submit(payload, row)
        self.rows.append(row)
        if self.board is not None:
            self._log_epoch(row)
        print(self.prefix + summary_line(row, self.config.epochs, self.model.LOSSES))

    def finish(self) -> None:
        """After the last epoch: the target confusion matrix, STEM_selection.csv (the epoch each validator
        picks, validators.choose) and, with --tensorboard, the settings as hparams beside the last row."""
        save_target_confusion(self.model, self.data.target_test, picture_path(self.saved_path, "confusion"),
                              f"{self.config.method}, target test, ensemble", self.config.eval_batch_size)
        write_rows(selection_path(Path(self.config.csv)), ["validator", "epoch", "target_acc_ensemble"],
                   validators.choose(self.rows))
        if self.board is not None:
            settings = {name: getattr(self.config, name) for name in result_settings()}
            self.board.add_hparams({name: value if isinstance(value, (int, float, str, bool)) else str(value)
                                    for name, value in settings.items()},
                                   {f"hparam/{name}": self.rows[-1][name] for name in ("source_acc", "target_acc_ensemble")},
                                   run_name=".")


def train_epoch(runs: list[Run], iterations: int, desc: str) -> list[dict[str, float]]:
    """`iterations` training steps of every run, the runs taking turns each iteration (on CUDA their
    work overlaps); returns each run's losses averaged over the epoch (one host read, at the end)."""
    watches = []
    for run in runs:
        with run.lane.active():
            run.step.tally.reset()
            watches.append(NonFiniteWatch(run.step.tally))
    bar = tqdm(range(iterations), desc=desc, leave=False, dynamic_ncols=True, disable=None)
    live = LiveLosses(bar) if len(runs) == 1 else None  # one bar cannot show several seeds' losses
    run = runs[0]
    try:
        for i in bar:
            for run, watch in zip(runs, watches):
                with run.lane.active():
                    source, target = run.streams
                    run.step(source.next(), target.next())  # (B,) index tensors on the device
                    watch.update(i)
            if live is not None:
                live.update(i, runs[0].step.tally)
        means = []
        for run, watch in zip(runs, watches):
            with run.lane.active():
                watch.finish()
                means.append(run.step.tally.means(iterations))
        return means
    except NonFiniteLoss as error:
        raise run.stopped(f"non-finite loss in epoch {run.epoch + 1}, iteration {error.iteration}") from error
    finally:
        bar.close()


def train(*configs: Config) -> list[list[dict[str, float | int | None]]]:
    """Train a run as configured (or several seeds side by side, each exactly the run it is alone),
    writing a checkpoint and then a CSV row after every epoch; returns each run's rows. Raises
    OutputError / ResumeError / DataError before anything is written, RunStopped on SIGINT/SIGTERM or a
    non-finite loss, keeping the last checkpoint and CSV intact. The outputs' locks and the signal
    handlers are held until every write has finished."""
    for config in configs:
        check_output(config)
    with contextlib.ExitStack() as stack:
        for config in configs:
            stack.enter_context(run_lock(Path(config.csv)))
        stack.enter_context(SignalGuard())
        checkpoints = []
        for config in configs:
            saved_path = checkpoint_path(Path(config.csv))
            checkpoint = load_checkpoint(saved_path) if config.resume else None
            if checkpoint is not None:
                check_resumable(checkpoint, config, saved_path)
            checkpoints.append(checkpoint)
        runs: list[Run] = []
        clock = time.perf_counter()
        epoch_seconds: list[float] = []  # training only
        try:
            with contextlib.ExitStack() as closing:  # every run's writer finishes its last write, whatever happens
                shared_data: dict = {}
                for config, checkpoint in zip(configs, checkpoints):
                    runs.append(Run(config, checkpoint, shared_data, together=len(configs) > 1))
                    closing.callback(runs[-1].checkpoints.close)
                    if runs[-1].board is not None:
                        closing.callback(runs[-1].board.close)
                setup_seconds = time.perf_counter() - clock
                while unfinished := [run for run in runs if run.epoch < run.config.epochs]:
                    first = unfinished[0]
                    desc = f"epoch {first.epoch + 1}/{first.config.epochs}" + (
                        f" ({len(unfinished)} seeds)" if len(runs) > 1 else "")
                    start = time.perf_counter()
                    # Every run of a group has the same settings but its seed, so the same iterations per epoch.
                    losses = train_epoch(unfinished, first.iterations, desc)
                    synchronize(first.device)
                    seconds = time.perf_counter() - start  # together: the epoch's wall time, shared by its runs
                    epoch_seconds.append(seconds)
                    for run, run_losses in zip(unfinished, losses):
                        with run.lane.active():
                            run.end_epoch(run_losses, seconds)
            for run in runs:
                run.finish()
        except Interrupted as error:  # the message names the first unfinished run's files
            unfinished = [run for run in runs if run.epoch < run.config.epochs] or runs[-1:]
            if unfinished:
                raise unfinished[0].stopped(str(error), error.exit_code, advice="") from error
            epochs = [checkpoint["epoch"] if checkpoint else 0 for checkpoint in checkpoints]
            raise RunStopped(str(error), configs[0].csv, epochs[0], error.exit_code) from error
        if epoch_seconds:
            rest = time.perf_counter() - clock - setup_seconds - sum(epoch_seconds)
            print(timing_line(setup_seconds, epoch_seconds, rest, sum(run.step.capture_seconds for run in runs)))
        return [run.rows for run in runs]


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


def run_seeds(config: Config, seeds: list[int]) -> None:
    """The same configuration once per seed, `config.parallel_seeds` of them at a time side by side,
    then the summary over seeds. Every seed's output is checked and locked before the first one trains."""
    csv_path = Path(config.csv)
    configs = [replace(config, seed=seed, csv=str(seed_csv(csv_path, seed))) for seed in seeds]
    check_seed_outputs(config, configs)
    final_rows: dict[int, dict] = {}  # seed -> its last row
    every_row: dict[int, list[dict]] = {}  # seed -> all its rows, for the validators' rank correlations
    with contextlib.ExitStack() as locks, SignalGuard():
        for each in (config, *configs):  # the base name's lock covers the summary
            locks.enter_context(run_lock(Path(each.csv)))
        try:
            for first in range(0, len(configs), config.parallel_seeds):
                group = [_fresh_unless_saved(each) for each in configs[first : first + config.parallel_seeds]]
                for each in group:
                    print(f"== seed {each.seed}: {each.csv}")
                for each, rows in zip(group, train(*group)):
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
    save_target_confusion(model, data.target_test, picture_path(path, "confusion"), "target test, ensemble", chunk_size)
    print(f"{path} (epoch {checkpoint['epoch']}): source {result['source_acc']:.2f}% | target F1 "
          f"{result['target_acc_f1']:.2f}% F2 {result['target_acc_f2']:.2f}% ensemble {result['target_acc_ensemble']:.2f}%")
    print(f"wrote {out} and {picture_path(path, 'confusion')}")
    return result
