"""Train MCD (Saito et al., CVPR 2018) from SVHN to MNIST: `python main.py --epochs 50`.

Parses the flags (one per setting declared in config.py) into one frozen Config and hands it to
train.train(); writes per-epoch accuracies to the CSV given by --csv and a results.json beside it.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import traceback
from dataclasses import Field
from pathlib import Path

from cli import OneLineErrors
from config import GROUPS, MAX_SEED, Config, SettingError, resolve, settings, switch
from downloads import DataError


MAX_SEEDS = 10_000  # one command's seeds: far more than a table needs, far fewer than memory allows


def seed_range(text: str) -> list[int]:
    """'3' -> [3]; '1-5' -> [1, 2, 3, 4, 5]; bounds checked before any list is made."""
    first, dash, last = text.partition("-")
    try:
        low, high = int(first), int(last if dash else first)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a seed or a range such as 1-5") from None
    if low > high:
        raise argparse.ArgumentTypeError(f"{text!r} is an empty range")
    if not 0 <= low <= high <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"{text!r}: seeds must be between 0 and {MAX_SEED}")
    if high - low >= MAX_SEEDS:
        raise argparse.ArgumentTypeError(f"{text!r}: at most {MAX_SEEDS:,} seeds in one command")
    return list(range(low, high + 1))


def seed_list(args: argparse.Namespace) -> list[int] | None:
    """--seeds as one sorted list without repeats (its groups, e.g. '1-3 2 7', joined); None without it."""
    return sorted({seed for group in args.seeds for seed in group}) if args.seeds else None


def flag_name(setting: Field) -> str:
    return setting.metadata["flag"] or "--" + setting.name.replace("_", "-")


def _default_text(setting: Field) -> str:
    meta = setting.metadata
    if meta["auto"]:
        return f"auto: {meta['auto']}"
    off = setting.default is None or (isinstance(setting.default, bool) and meta["parse"] is None)
    return "off" if off else str(setting.default)


def build_parser() -> argparse.ArgumentParser:
    """The flags: one per Config setting (config.py declares each once), grouped, plus the command line's
    own (--seeds, --evaluate, --debug). A flag not given stays out of the namespace (SUPPRESS), so
    config.resolve() knows exactly which were given."""
    parser = OneLineErrors(prog="main.py", argument_default=argparse.SUPPRESS, allow_abbrev=False,
                           description="Maximum Classifier Discrepancy (CVPR 2018) domain adaptation: SVHN -> MNIST, "
                                       "MNIST <-> USPS, traffic signs, your own image folders (docs/settings.md lists "
                                       "every flag).")
    groups = {name: parser.add_argument_group(name) for name in GROUPS}
    for setting in settings():
        meta = setting.metadata
        if meta["flag"] == "":  # set by resolve(), not a flag
            continue
        group, flag = groups[meta["group"]], flag_name(setting)
        shown = f"{meta['help']} (default: {_default_text(setting)})"
        if isinstance(setting.default, bool) and meta["parse"] is None:  # a plain on-off flag
            action = "store_false" if setting.default else "store_true"
            group.add_argument(flag, dest=setting.name, action=action, help=shown)
        else:
            metavar = "{auto,on,off}" if meta["parse"] is switch else None
            group.add_argument(flag, dest=setting.name, type=meta["parse"], choices=meta["choices"], metavar=metavar,
                               help=shown)
    groups["run"].add_argument("--seeds", type=seed_range, nargs="+", default=None, metavar="SEED",
                               help="run once per seed (e.g. 1 2 3, or 1-5), each to CSV_seedN.csv, then write "
                                    "CSV_summary.csv with mean ± std of the last epoch; overrides --seed. One seed "
                                    "after another (several on one GPU: sweep.py --jobs-per-gpu)")
    groups["run"].add_argument("--debug", action="store_true", default=False,
                               help="print the traceback behind an error message")
    groups["output"].add_argument("--evaluate", metavar="CHECKPOINT", type=Path, default=None,
                                  help="no training: evaluate a checkpoint (.pt) on the source and target test sets, "
                                       "print the accuracies and write STEM_evaluation.json and STEM_confusion.png "
                                       "beside it")
    return parser


def given_settings(args: argparse.Namespace) -> dict:
    """The settings whose flags were given (the parser leaves the others out of the namespace)."""
    return {setting.name: getattr(args, setting.name) for setting in settings() if hasattr(args, setting.name)}


def build_config(args: argparse.Namespace, parser: argparse.ArgumentParser) -> Config:
    """The run's Config from the flags given (config.resolve decides every default)."""
    given = given_settings(args)
    seeds = seed_list(args)
    if args.evaluate and (seeds or "resume" in given or "overwrite" in given):
        parser.error("--evaluate scores one checkpoint and trains nothing: leave out --seeds, --resume and --overwrite")
    try:
        return resolve(given)
    except (SettingError, DataError) as error:
        parser.error(str(error))


def flag_table() -> str:
    """docs/settings.md's table of every flag, from the parser itself (tests keep the two equal)."""
    lines = []
    for group in build_parser()._action_groups[2:]:
        lines += [f"### {group.title}", "", "| flag | default | what it does |", "|---|---|---|"]
        for action in group._group_actions:
            text = action.help.replace("|", "\\|")
            default = ""
            if text.endswith(")") and " (default: " in text:
                text, default = text[:-1].rsplit(" (default: ", 1)
            lines.append(f"| `{action.option_strings[0]}` | {default} | {text} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if hasattr(sys.stdout, "reconfigure"):  # a file name that is not UTF-8 is printed escaped, never a traceback
        sys.stdout.reconfigure(errors="backslashreplace")
    parser = build_parser()
    args = parser.parse_args(argv)
    config = build_config(args, parser)
    seeds = seed_list(args)
    # The training code (torch and all) only now: --help and a bad flag are answered without it.
    import torch

    from checkpoint import ResumeError
    from results import OutputError
    from run_control import RunStopped
    from train import evaluate_checkpoint, run_seeds, train

    try:
        if args.evaluate:
            evaluate_checkpoint(args.evaluate, torch.device(config.device), getattr(args, "data_root", None),
                                config.download, config.allow_unverified_data, config.eval_batch_size)
        elif seeds:
            run_seeds(config, seeds, ["main.py", *argv])
        else:
            train(config, ["main.py", *argv])
    except (DataError, OutputError, ResumeError) as error:
        return _fail(f"error: {error}", 2, args.debug)
    except RunStopped as stopped:
        saved = _saved(stopped.csv, stopped.epochs_saved)
        if stopped.advice:  # a failure, with what to change
            return _fail(f"error: {stopped.cause}: training stopped; {saved} {stopped.advice}", stopped.exit_code,
                         args.debug)
        # A multi-seed run always continues with --resume: --overwrite would also replace finished seeds.
        again = ("Continue with: " + _command(argv, "--resume")) if stopped.epochs_saved or seeds else \
            ("Start again with: " + _command(argv, "--overwrite"))
        return _fail(f"\n{stopped.cause}: {saved} {again}", stopped.exit_code, args.debug)
    except KeyboardInterrupt:  # a SIGINT before training started
        return _fail("\ninterrupted before training started; nothing was written", 130, args.debug)
    return 0


def _fail(message: str, code: int, debug: bool) -> int:
    if debug:
        traceback.print_exc()
    print(message, file=sys.stderr)
    return code


def _saved(csv: str, epochs: int) -> str:
    from checkpoint import checkpoint_path  # loaded already: a run stopped

    if epochs <= 0:
        return "no epoch had finished, so nothing was saved."
    return f"{csv} and its checkpoint {checkpoint_path(Path(csv))} hold epochs 1-{epochs}."


def _command(argv: list[str], flag: str) -> str:
    """This run's command line with --resume or --overwrite (not both: they exclude each other)."""
    args = [a for a in argv if a not in ("--overwrite", "--resume")]
    return shlex.join(["python", "main.py", *args, flag])


if __name__ == "__main__":
    sys.exit(main())
