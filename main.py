"""Train MCD (Saito et al., CVPR 2018) from SVHN to MNIST: `python main.py --epochs 50`.

Parses the flags into one frozen Config and hands it to train.train(); writes per-epoch accuracies to
the CSV given by --csv and a results.json beside it.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import traceback
from pathlib import Path

import torch

from checkpoint import ResumeError, checkpoint_path
from algorithms import DISCREPANCIES, METHODS
from config import ORIGINAL_SVHN_SCHEDULE, PRECISIONS, PROTOCOLS, Config, protocol_values
from datasets import DOMAINS, DataError
from iteration import NonFiniteLoss
from models import BATCHNORM_INITS, architecture_for
from results import OutputError
from run_control import Interrupted
from train import evaluate_checkpoint, run_seeds, train


SWITCH = ("auto", "on", "off")
# What 'auto' means on CUDA, from the measurements in the README's Speed section.
AUTO_COMPILE_ON_CUDA = False
AUTO_CHANNELS_LAST_ON_CUDA = True
AUTO_GRAPH_BOOKKEEPING_ON_CUDA = False  # not yet timed on a GPU (README 'Speed')
AUTO_PAIRED_HEADS_ON_CUDA = False  # not yet timed on a GPU (README 'Speed')


def _auto(on_cuda: bool) -> str:
    return "on for CUDA" if on_cuda else "off"


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be greater than 0, got {text}")
    return value


def _batch_size(text: str) -> int:
    value = int(text)
    if value < 2:  # BatchNorm needs two images to take batch statistics
        raise argparse.ArgumentTypeError(f"must be at least 2 (BatchNorm needs a batch), got {value}")
    return value


# numpy takes seeds below 2**32 and the batch streams use 2 * seed + 1: this keeps every one valid.
MAX_SEED = 2**31 - 1


def _seed(text: str) -> int:
    value = int(text)
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"must be between 0 and {MAX_SEED}, got {value}")
    return value


def _seeds(text: str) -> list[int]:
    """'3' -> [3]; '1-5' -> [1, 2, 3, 4, 5]."""
    first, _, last = text.partition("-")
    try:
        seeds = list(range(int(first), int(last or first) + 1))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a seed or a range such as 1-5") from None
    if not seeds:
        raise argparse.ArgumentTypeError(f"{text!r} is an empty range")
    if not 0 <= seeds[0] <= seeds[-1] <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"{text!r}: seeds must be between 0 and {MAX_SEED}")
    return seeds


def seed_list(args: argparse.Namespace) -> list[int] | None:
    """--seeds as one sorted list without repeats (its groups, e.g. '1-3 2 7', joined); None without it."""
    return sorted({seed for group in args.seeds for seed in group}) if args.seeds else None


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Each flag's default after its help text, except a None default: that help says what None means."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        return action.help if action.default is None else super()._get_help_string(action)


class OneLineErrors(argparse.ArgumentParser):
    """A bad flag is one line on stderr and exit code 2 (argparse would print its usage block first)."""

    def error(self, message: str) -> None:
        self.exit(2, f"error: {message} (see python {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    defaults = Config()
    parser = OneLineErrors(
        prog="main.py",
        description="Maximum Classifier Discrepancy (CVPR 2018) domain adaptation: SVHN -> MNIST, MNIST <-> USPS.",
        formatter_class=HelpFormatter,
    )
    add = parser.add_argument
    add("--protocol", choices=PROTOCOLS, default=defaults.protocol,
        help="default: this project's setting; original: the original code's run where it can be reproduced "
             "(BatchNorm scales ~ U(0, 1), fp32, and with SVHN 47 epochs x 429 iterations). Flags given "
             "explicitly override the protocol's values (README 'Differences from the original code')")
    add("--epochs", type=_positive_int, default=None,
        help=f"training epochs (default: {defaults.epochs}; {ORIGINAL_SVHN_SCHEDULE['epochs']} with --protocol original "
             "and SVHN)")
    add("--iters-per-epoch", type=_positive_int, default=None,
        help="iterations per epoch (default: one pass over the smaller training set at the batch size, "
             f"468 for MNIST at 128; {ORIGINAL_SVHN_SCHEDULE['iters_per_epoch']} with --protocol original and SVHN)")
    add("--batch-size", type=_batch_size, default=defaults.batch_size, help="images per domain per iteration")
    add("--lr", type=_positive_float, default=defaults.lr, help="Adam learning rate (G and both heads)")
    add("--weight-decay", type=_non_negative_float, default=defaults.weight_decay, help="Adam weight decay (L2)")
    add("--num-k", type=_positive_int, default=defaults.num_k, help="generator updates (step C) per iteration")
    add("--seed", type=_seed, default=defaults.seed, help="random seed (init, dropout, batch order)")
    add("--batchnorm-init", choices=BATCHNORM_INITS, default=None,
        help=f"BatchNorm scales at initialisation: ones (PyTorch >= 1.0) or uniform U(0, 1) as PyTorch 0.2 "
             f"(default: {defaults.batchnorm_init}; uniform with --protocol original)")
    add("--seeds", type=_seeds, nargs="+", default=None, metavar="SEED",
        help="run once per seed (e.g. 1 2 3, or 1-5), each to CSV_seedN.csv, then write CSV_summary.csv "
             "with mean ± std of the last epoch; overrides --seed")
    add("--method", choices=METHODS, default=defaults.method,
        help="mcd: steps A, B, C; source_only: step A alone (the paper's baseline)")
    add("--source", choices=DOMAINS, default=defaults.source, help="labelled source dataset")
    add("--target", choices=DOMAINS, default=defaults.target,
        help="unlabelled target dataset; MNIST <-> USPS use 28x28 grey images and the paper's LeNet-style network")
    add("--small-subsets", action="store_true",
        help="the paper's MNIST <-> USPS protocol: random 2,000 MNIST / 1,800 USPS training images (per seed)")
    add("--discrepancy", choices=DISCREPANCIES, default=defaults.discrepancy,
        help="l1: the paper's mean |p1 - p2|; swd: sliced Wasserstein discrepancy (Lee et al., CVPR 2019)")
    add("--swd-projections", type=_positive_int, default=defaults.swd_projections,
        help="random unit directions per SWD evaluation (fresh each step)")
    add("--data-root", default=None,
        help=f"holds svhn/*.mat and MNIST/raw/* (torchvision layout); default {defaults.data_root}, or for "
             "--evaluate the checkpoint's")
    add("--no-download", action="store_true", help="never download; fail with a list of missing files")
    add("--allow-unverified-data", action="store_true",
        help="load dataset files whose MD5 differs from the official release (e.g. the offline proxy), with a warning")
    add("--device", choices=("auto", "cpu", "cuda", "mps"), default="auto",
        help="auto: cuda if available, else mps, else cpu")
    add("--csv", default=defaults.csv, help="per-epoch results; results.json is written beside it")
    add("--evaluate", metavar="CHECKPOINT", type=Path, default=None,
        help="no training: evaluate a checkpoint (.pt) on the source and target test sets, print the accuracies "
             "and write STEM_evaluation.json and STEM_confusion.png beside it")
    add("--eval-batch-size", type=_positive_int, default=defaults.eval_batch_size, help="images per evaluation chunk")
    runs = parser.add_argument_group("runs")
    once = runs.add_mutually_exclusive_group()
    once.add_argument("--resume", action="store_true",
                      help="continue the run whose checkpoint (same stem as --csv, .pt) is beside --csv")
    once.add_argument("--overwrite", action="store_true",
                      help="replace an existing --csv, its .json and .pt (without it, an existing run is never overwritten)")
    runs.add_argument("--deterministic", action="store_true",
                      help="deterministic algorithms only and no cuDNN autotuning: a rerun gives an identical CSV")
    runs.add_argument("--debug", action="store_true", help="print the traceback behind an error message")
    speed = parser.add_argument_group("speed (none of these changes the mathematics; see README 'Speed')")
    speed.add_argument("--precision", choices=("auto", *PRECISIONS), default="auto",
                       help="auto: bf16 on CUDA, fp32 elsewhere and with --protocol original. fp32 is exact (TF32 off); tf32 uses TF32 "
                            "matrix units; bf16 autocasts convolutions and matrix products, losses stay fp32")
    speed.add_argument("--cuda-graph", choices=SWITCH, default="auto",
                       help="capture the whole training iteration once as a CUDA graph and replay it "
                            "(auto: on for CUDA)")
    speed.add_argument("--compile", choices=(*SWITCH, "step"), default="auto",
                       help="torch.compile the training forward passes of G, F1, F2 (on), or each step's forward passes "
                            "with its loss as one function, forward and backward (step) "
                            f"(auto: {_auto(AUTO_COMPILE_ON_CUDA)})")
    speed.add_argument("--channels-last", choices=SWITCH, default="auto",
                       help=f"NHWC images and convolution weights (auto: {_auto(AUTO_CHANNELS_LAST_ON_CUDA)})")
    speed.add_argument("--graph-bookkeeping", choices=SWITCH, default="auto",
                       help="the per-iteration loss sums and non-finite check inside the captured CUDA graph instead "
                            f"of a few kernels after each replay (auto: {_auto(AUTO_GRAPH_BOOKKEEPING_ON_CUDA)})")
    speed.add_argument("--paired-heads", choices=SWITCH, default="auto",
                       help="F1 and F2 of the SVHN network as one batched pair: one matrix product per layer for both, "
                            f"their weights stacked once per step (auto: {_auto(AUTO_PAIRED_HEADS_ON_CUDA)})")
    speed.add_argument("--parallel-seeds", type=_positive_int, default=None, metavar="K",
                       help="with --seeds: train K seeds side by side in one process, each exactly the run it is alone "
                            "(default: 1, one seed at a time; on CUDA side by side is unmeasured: not yet shown "
                            "correct and faster on a GPU)")
    return parser


def resolve_device(requested: str, parser: argparse.ArgumentParser) -> str:
    cuda, mps = torch.cuda.is_available(), torch.backends.mps.is_available()
    if requested == "auto":
        return "cuda" if cuda else "mps" if mps else "cpu"
    if requested == "cuda" and not cuda:
        parser.error("--device cuda: no CUDA device is available here; use --device cpu or auto")
    if requested == "mps" and not mps:
        parser.error("--device mps: no Apple MPS device is available here; use --device cpu or auto")
    return requested


def resolve_speed(args: argparse.Namespace, device: str, parser: argparse.ArgumentParser,
                  architecture: str = "svhn2mnist") -> dict:
    """The speed switches for this device and network: 'auto' becomes the measured-fastest choice
    (README 'Speed')."""
    cuda = device.startswith("cuda")
    if args.cuda_graph == "on" and not cuda:
        parser.error(f"--cuda-graph on needs a CUDA device, not {device}; use --cuda-graph off or auto")
    pick = lambda switch, auto: auto if switch == "auto" else switch == "on"  # noqa: E731
    cuda_graph = pick(args.cuda_graph, cuda)
    if args.graph_bookkeeping == "on" and not cuda_graph:
        parser.error("--graph-bookkeeping on puts the loss sums inside the CUDA graph: it needs --cuda-graph on (and CUDA)")
    if args.paired_heads == "on" and architecture != "svhn2mnist":
        parser.error("--paired-heads on pairs the SVHN network's heads; the MNIST <-> USPS network's (with dropout) "
                     "are not paired: use --paired-heads off or auto")
    return {
        "precision": ("bf16" if cuda else "fp32") if args.precision == "auto" else args.precision,
        "cuda_graph": cuda_graph,
        "compile": args.compile == "step" or pick(args.compile, cuda and AUTO_COMPILE_ON_CUDA),
        "compile_step": args.compile == "step",
        "channels_last": pick(args.channels_last, cuda and AUTO_CHANNELS_LAST_ON_CUDA),
        "graph_bookkeeping": pick(args.graph_bookkeeping, cuda_graph and AUTO_GRAPH_BOOKKEEPING_ON_CUDA),
        "paired_heads": pick(args.paired_heads, cuda and AUTO_PAIRED_HEADS_ON_CUDA and architecture == "svhn2mnist"),
    }


def build_config(args: argparse.Namespace, parser: argparse.ArgumentParser) -> Config:
    """The run's Config from the flags: a flag given explicitly wins, then the protocol's value, then
    the default."""
    device = resolve_device(args.device, parser)
    protocol = protocol_values(args.protocol, args.source, args.target)

    def chosen(name: str, given, default):
        return given if given is not None else protocol.get(name, default)

    speed = resolve_speed(args, device, parser, architecture_for(args.source, args.target))
    if args.parallel_seeds is not None and not args.seeds:
        parser.error("--parallel-seeds needs --seeds (it says how many of them train side by side)")
    seed_count = len(seed_list(args) or [args.seed])
    # One seed at a time by default on every device: seeds side by side have not yet been shown on a GPU
    # to give the same per-seed CSVs as alone and to be faster per seed (.ci/gpu-check, stage seeds).
    parallel_seeds = args.parallel_seeds or 1
    if args.precision == "auto":
        speed["precision"] = protocol.get("precision", speed["precision"])
    return Config(
        protocol=args.protocol,
        epochs=chosen("epochs", args.epochs, Config.epochs),
        iters_per_epoch=chosen("iters_per_epoch", args.iters_per_epoch, Config.iters_per_epoch),
        batchnorm_init=chosen("batchnorm_init", args.batchnorm_init, Config.batchnorm_init),
        batch_size=args.batch_size,
        lr=args.lr,
        weight_decay=args.weight_decay,
        num_k=args.num_k,
        seed=args.seed,
        method=args.method,
        source=args.source,
        target=args.target,
        small_subsets=args.small_subsets,
        discrepancy=args.discrepancy,
        swd_projections=args.swd_projections,
        data_root=args.data_root or Config.data_root,
        download=not args.no_download,
        allow_unverified_data=args.allow_unverified_data,
        device=device,
        csv=args.csv,
        eval_batch_size=args.eval_batch_size,
        **speed,
        parallel_seeds=min(parallel_seeds, seed_count),
        deterministic=args.deterministic,
        resume=args.resume,
        overwrite=args.overwrite,
    )


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    config = build_config(args, parser)
    device = config.device
    seeds = seed_list(args)
    try:
        if args.evaluate:
            evaluate_checkpoint(args.evaluate, torch.device(device), args.data_root, not args.no_download,
                                args.allow_unverified_data, args.eval_batch_size)
        elif seeds:
            run_seeds(config, seeds)
        else:
            train(config)
    except (DataError, OutputError, ResumeError) as error:
        return _fail(f"error: {error}", 2, args.debug)
    except NonFiniteLoss as error:
        where = (f"weights at the end of epoch {error.epoch}" if error.iteration is None else
                 f"loss in epoch {error.epoch}, iteration {error.iteration}")
        return _fail(f"error: non-finite {where}: training stopped; "
                     f"{_saved(getattr(error, 'csv', config.csv), error.epoch - 1)} Lower --lr, or check the data.", 3, args.debug)
    except Interrupted as error:
        # A multi-seed run always continues with --resume: --overwrite would also replace finished seeds.
        again = ("Continue with: " + _command(argv, "--resume")) if error.epochs_saved or seeds else \
            ("Start again with: " + _command(argv, "--overwrite"))
        saved = _saved(getattr(error, "csv", config.csv), error.epochs_saved)
        return _fail(f"\n{error}: {saved} {again}", error.exit_code, args.debug)
    except KeyboardInterrupt:  # a SIGINT before training started
        return _fail("\ninterrupted before training started; nothing was written", 130, args.debug)
    return 0


def _fail(message: str, code: int, debug: bool) -> int:
    if debug:
        traceback.print_exc()
    print(message, file=sys.stderr)
    return code


def _saved(csv: str, epochs: int) -> str:
    if epochs <= 0:
        return "no epoch had finished, so nothing was saved."
    return f"{csv} and its checkpoint {checkpoint_path(Path(csv))} hold epochs 1-{epochs}."


def _command(argv: list[str] | None, flag: str) -> str:
    """This run's command line with --resume or --overwrite (not both: they exclude each other)."""
    args = [a for a in (sys.argv[1:] if argv is None else argv) if a not in ("--overwrite", "--resume")]
    return shlex.join(["python", "main.py", *args, flag])


if __name__ == "__main__":
    sys.exit(main())
