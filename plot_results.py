"""Draw source and target test accuracy per epoch from one or more results CSVs written by main.py.

    python plot_results.py results.csv [more.csv ...] [--out results.png]

Headless (Agg backend) and free of torch, so it runs anywhere matplotlib does.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)

# column -> legend text; colour marks the metric, line style marks the file
CURVES = {"source_acc": "source test", "target_acc_ensemble": "target test (ensemble)"}
COLOURS = {"source_acc": "tab:blue", "target_acc_ensemble": "tab:red"}
LINE_STYLES = ("-", "--", ":", "-.")
REQUIRED = ("epoch", *CURVES)


class PlotError(Exception):
    """A problem with an input or output file; the message is one line."""


def read_results(path: Path) -> dict[str, list[float]]:
    """The required columns of a results CSV as lists of floats, one entry per epoch."""
    if not path.is_file():
        raise PlotError(f"{path}: no such file")
    with open(path, newline="") as file:
        reader = csv.DictReader(file)
        if not reader.fieldnames:
            raise PlotError(f"{path}: the file is empty; expected a results CSV written by main.py")
        missing = [c for c in REQUIRED if c not in reader.fieldnames]
        if missing:
            raise PlotError(f"{path}: not a results CSV from main.py (missing columns: {', '.join(missing)})")
        columns: dict[str, list[float]] = {c: [] for c in REQUIRED}
        for row in reader:
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


def _labels(paths: list[Path]) -> list[str]:
    """File stems for the legend, or the full paths where two stems coincide."""
    stems = [p.stem for p in paths]
    return stems if len(set(stems)) == len(stems) else [str(p.with_suffix("")) for p in paths]


def plot(paths: list[Path], out: Path) -> None:
    results = [read_results(p) for p in paths]  # read all first: a bad file stops before drawing
    figure, axes = plt.subplots(figsize=(8, 5))
    for index, (label, columns) in enumerate(zip(_labels(paths), results)):
        style = LINE_STYLES[index % len(LINE_STYLES)]
        for column, text in CURVES.items():
            axes.plot(columns["epoch"], columns[column], style, color=COLOURS[column], label=f"{label}: {text}")
    axes.set_xlabel("epoch")
    axes.set_ylabel("accuracy (%)")
    axes.set_title("MCD SVHN → MNIST: test accuracy per epoch")
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small")
    figure.tight_layout()
    # Drawn into a temp file beside the target, then renamed: an existing picture is replaced whole or not at all.
    tmp = out.with_name(out.name + ".tmp")
    try:
        figure.savefig(tmp, dpi=120, format="png")
        os.replace(tmp, out)
    except OSError as error:
        raise PlotError(f"cannot write {out}: {error.strerror or error}") from None
    finally:
        plt.close(figure)
        tmp.unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Plot per-epoch accuracies from main.py's results CSVs.")
    parser.add_argument("csv", nargs="+", type=Path, help="one or more results CSVs")
    parser.add_argument("--out", type=Path, default=None, help="output PNG (default: the first CSV with .png)")
    args = parser.parse_args(argv)
    out = args.out or args.csv[0].with_suffix(".png")
    try:
        plot(args.csv, out)
    except PlotError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
