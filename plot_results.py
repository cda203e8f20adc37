"""Draw test accuracies (top) and training losses (bottom) per epoch from results CSVs written by main.py.

    python plot_results.py results.csv [more.csv ...] [--out results.png]
    python plot_results.py runs/mcd_seed1.csv runs/mcd_seed2.csv runs/mcd_seed3.csv   # mean ± std band
    python plot_results.py results.csv --validators   # a third panel: the label-free scores vs target accuracy

CSVs named STEM_seedN.csv with the same STEM are seeds of one configuration: they are drawn as their
mean with a ±1 std band (sample std) over the epochs all of them reached. Headless (Agg backend) and
free of torch, so it runs anywhere matplotlib does.
"""

from __future__ import annotations

import csv
import json
import math
import re
import statistics
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)

from matplotlib.ticker import MaxNLocator  # noqa: E402

from cli import HelpFormatter, OneLineErrors  # noqa: E402
from figures import dataset_label, run_title, save_figure  # noqa: E402  (shared with visualize.py and training)

# column -> legend text; colour marks the metric, line style marks the file (or the group of seeds)
CURVES = {"source_acc": "source test", "target_acc_ensemble": "target test (ensemble)"}
# A method's loss columns are whatever its CSV holds between the progress columns and the accuracies
# (results.csv_columns): every one is drawn, by its own name, in these colours in turn.
PROGRESS = ("epoch", "iterations", "seconds")
LOSS_COLOURS = ("tab:green", "tab:purple", "tab:orange", "tab:olive", "tab:brown", "tab:pink")
# the label-free validators' columns (validators.py: that module imports torch, this one must not)
VALIDATORS = {"val_entropy": ("mean entropy", "lower"), "val_im": ("information maximisation", "higher"),
              "val_snd": ("SND", "higher"), "val_bnm": ("BNM", "higher"), "val_d": ("d(F1, F2)", "lower")}
COLOURS = {"source_acc": "tab:blue", "target_acc_ensemble": "tab:red",
           "val_entropy": "tab:brown", "val_im": "tab:pink", "val_snd": "tab:olive", "val_bnm": "tab:cyan",
           "val_d": "tab:gray"}
LINE_STYLES = ("-", "--", ":", "-.")
REQUIRED = ("epoch", *CURVES)
SEED_FILE = re.compile(r"^(?P<stem>.+)_seed(?P<seed>\d+)$")


class PlotError(Exception):
    """A problem with an input or output file; the message is one line."""


def read_results(path: Path) -> dict[str, list[float]]:
    """The columns of a results CSV that are drawn (required, losses, validators) as lists of floats, one
    entry per epoch, in the file's order."""
    if not path.is_file():
        raise PlotError(f"{path}: {'a folder, not a file' if path.is_dir() else 'no such file'}")
    try:
        return _read_columns(path)
    except UnicodeDecodeError:
        raise PlotError(f"{path}: not a text file (not UTF-8); expected a results CSV written by main.py") from None


def _read_columns(path: Path) -> dict[str, list[float]]:
    with open(path, newline="", encoding="utf-8") as file:
        reader = csv.DictReader(file)
        if not reader.fieldnames:
            raise PlotError(f"{path}: the file is empty; expected a results CSV written by main.py")
        missing = [c for c in REQUIRED if c not in reader.fieldnames]
        if missing:
            raise PlotError(f"{path}: not a results CSV from main.py (missing columns: {', '.join(missing)})")
        columns: dict[str, list[float]] = {c: [] for c in REQUIRED}
        losses = [c for c in reader.fieldnames[:reader.fieldnames.index("source_acc")] if c not in PROGRESS]
        optional = losses + [c for c in VALIDATORS if c in reader.fieldnames]
        columns.update({c: [] for c in optional})
        for row in reader:
            for column in optional:  # empty for source-only runs (no discrepancy), older CSVs: not drawn
                text = row[column] or ""
                try:
                    columns[column].append(float(text) if text else math.nan)
                except ValueError:
                    raise PlotError(f"{path}, line {reader.line_num}: {column} is {text!r}, not a number") from None
            for column in REQUIRED:
                if row[column] is None:
                    raise PlotError(f"{path}, line {reader.line_num}: the row ends before {column} (truncated file?)")
                try:
                    value = float(row[column])
                except ValueError:
                    raise PlotError(
                        f"{path}, line {reader.line_num}: {column} is {row[column]!r}, not a number"
                    ) from None
                if not math.isfinite(value):
                    raise PlotError(f"{path}, line {reader.line_num}: {column} is {value}")
                columns[column].append(value)
    if not columns["epoch"]:
        raise PlotError(f"{path}: has a header but no epochs yet")
    return columns


def _groups(paths: list[Path]) -> list[tuple[str, list[int]]]:
    """(legend label, indices of the files) per configuration: STEM_seedN.csv files with one STEM in one
    folder form a group; every other file stands alone. Labels are stems, or paths where stems clash."""
    keys: dict[str, list[int]] = {}
    for index, path in enumerate(paths):
        match = SEED_FILE.match(path.stem)
        key = str(path.parent / match["stem"]) if match else str(path.with_suffix(""))
        keys.setdefault(key, []).append(index)
    stems = [Path(key).name for key in keys]
    unique = len(set(stems)) == len(stems)
    return [(_shown(Path(key).name if unique else key) + (f" ({len(members)} seeds)" if len(members) > 1 else ""), members)
            for key, members in keys.items()]


def _shown(name: str) -> str:
    """A file name as text a font can draw: bytes that are not UTF-8 (kept by Python as surrogates) become �."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def loss_columns(runs: list[dict[str, list[float]]]) -> list[str]:
    """The loss columns of these runs' CSVs, in the order they first appear."""
    known = {*PROGRESS, *CURVES, *VALIDATORS, "target_acc_f1", "target_acc_f2"}
    return list(dict.fromkeys(column for run in runs for column in run if column not in known))


def _draw(axes, runs: list[dict[str, list[float]]], column: str, style: str, label: str, colour: str | None = None
          ) -> None:
    """One run as a line; several seeds as their mean with a ±1 std band over the epochs all reached."""
    if any(column not in run or all(math.isnan(v) for v in run[column]) for run in runs):
        return
    colour = colour or COLOURS[column]
    epochs = min(len(run["epoch"]) for run in runs)
    x = runs[0]["epoch"][:epochs]
    marker = dict(marker="o", markersize=3 if epochs <= 60 else 0)  # each epoch a point, while they can be told apart
    if len(runs) == 1:
        axes.plot(x, runs[0][column], style, color=colour, label=label, **marker)
        return
    values = [[run[column][i] for run in runs] for i in range(epochs)]
    # An epoch where a seed's value is not finite (inf, nan) has no mean: a gap in the line and band.
    finite = [all(math.isfinite(x) for x in v) for v in values]
    mean = [statistics.fmean(v) if ok else math.nan for v, ok in zip(values, finite)]
    std = [statistics.stdev(v) if ok else math.nan for v, ok in zip(values, finite)]
    axes.plot(x, mean, style, color=colour, label=f"{label}, mean ± std", **marker)
    axes.fill_between(x, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                      color=colour, alpha=0.2, linewidth=0)


def what_ran(paths: list[Path]) -> str:
    """The runs' method, pair and data, from the results.json beside each CSV (where there is one)."""
    seen = []
    for path in paths:
        try:
            config = json.loads(path.with_suffix(".json").read_text(encoding="utf-8"))["config"]
            seen.append(f"{run_title(config)} (data: {dataset_label(Path(config['data_root']).name)})")
        except (OSError, ValueError, KeyError, TypeError):  # no record beside it (a copied CSV): the file names say
            continue
    return "; ".join(dict.fromkeys(seen))


def plot(paths: list[Path], out: Path, validators: bool = False) -> None:
    results = [read_results(p) for p in paths]  # read all first: a bad file stops before drawing
    figure = plt.figure(figsize=(9, 14 if validators else 8.5))
    heights = [3, 2, 1.6, 1.6] if validators else [3, 2]  # accuracy, losses, then two rows of small panels
    grid = figure.add_gridspec(len(heights), 3, height_ratios=heights)
    accuracy = figure.add_subplot(grid[0, :])
    losses = figure.add_subplot(grid[1, :], sharex=accuracy)
    scores = [figure.add_subplot(grid[2 + i // 3, i % 3]) for i in range(len(VALIDATORS))] if validators else []
    twins = [axes.twinx() for axes in scores]  # each small panel's right axis: target accuracy
    loss_colours = {column: LOSS_COLOURS[i % len(LOSS_COLOURS)] for i, column in enumerate(loss_columns(results))}
    for index, (label, members) in enumerate(_groups(paths)):
        style = LINE_STYLES[index % len(LINE_STYLES)]
        runs = [results[i] for i in members]
        for column, text in CURVES.items():
            _draw(accuracy, runs, column, style, f"{label}: {text}")
        for column, colour in loss_colours.items():
            _draw(losses, runs, column, style, f"{label}: {column}", colour)
        for axes, twin, column in zip(scores, twins, VALIDATORS):
            # each score in its own units over the whole run, target accuracy beside it on the right
            _draw(axes, runs, column, style, label)
            _draw(twin, runs, "target_acc_ensemble", style, f"{label}: target accuracy")
    figure.suptitle(what_ran(paths) or "results", fontsize="medium")
    accuracy.set_ylabel("accuracy (%)")
    accuracy.set_title("test accuracy per epoch")
    losses.set_ylabel("epoch mean (log scale)")
    losses.set_yscale("log")
    losses.set_title("training losses (the method's CSV columns)")
    for axes, twin, (text, direction) in zip(scores, twins, VALIDATORS.values()):
        axes.set_title(f"{text} ({direction} is better)", fontsize="small")
        axes.tick_params(labelsize="x-small")
        axes.set_xlabel("epoch", fontsize="x-small")
        twin.tick_params(labelsize="x-small", colors=COLOURS["target_acc_ensemble"])
    if scores:  # the sixth cell says how to read the five beside it
        key = figure.add_subplot(grid[3, 2])
        key.axis("off")
        key.text(0, 0.5, "label-free validators: each in its own\nunits (left axis, the score's colour);\n"
                 "target test accuracy in red on the\nright axis: for reference only, it\nuses target labels",
                 fontsize="small", va="center")
    for axes in [accuracy, losses, *scores]:
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers
        axes.grid(alpha=0.3)
    losses.set_xlabel("epoch")
    for axes in (accuracy, losses):
        if axes.get_legend_handles_labels()[0]:  # a CSV without loss columns draws no losses
            axes.legend(fontsize="small")
    figure.tight_layout()
    try:
        save_figure(figure, out)
    except OSError as error:
        raise PlotError(f"cannot write {out}: {error.strerror or error}") from None


def main(argv: list[str] | None = None) -> int:
    parser = OneLineErrors(prog="plot_results.py", description="Plot per-epoch accuracies from main.py's results CSVs.",
                           formatter_class=HelpFormatter, allow_abbrev=False)
    parser.add_argument("csv", nargs="+", type=Path, help="one or more results CSVs")
    parser.add_argument("--out", type=Path, default=None, help="output PNG (default: the first CSV with .png)")
    parser.add_argument("--validators", action="store_true",
                        help="a small panel per label-free validator, in its own units, with target accuracy beside it")
    args = parser.parse_args(argv)
    out = args.out or args.csv[0].with_suffix(".png")
    try:
        if any(out.resolve() == path.resolve() for path in args.csv):
            raise PlotError(f"--out {out} is one of the input CSVs; give a .png path")
        plot(args.csv, out, args.validators)
    except PlotError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
