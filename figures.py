"""Pictures written as PNG files, from plain numbers: the atomic figure writer and the confusion matrix.

Free of torch (plot_results.py must never import it) and of the training code: the training loop,
--evaluate and visualize.py hand over predictions and labels as numpy arrays. matplotlib (headless, Agg)
is imported when a picture is drawn, not when the training code starts.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np


def pyplot():
    """matplotlib.pyplot on the headless Agg backend (chosen before pyplot is first imported)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(figure, out: Path, dpi: int = 120) -> None:
    """A PNG drawn into a temp file beside `out`, then renamed: an existing picture is replaced whole or
    not at all. Closes the figure; raises OSError."""
    tmp = out.with_name(out.name + ".tmp")
    try:
        figure.savefig(tmp, dpi=dpi, format="png")
        os.replace(tmp, out)
    finally:
        pyplot().close(figure)
        tmp.unlink(missing_ok=True)


def confusion_matrix(predicted: np.ndarray, labels: np.ndarray, classes: int = 10) -> np.ndarray:
    """(classes, classes) counts: row = true class, column = predicted class (10 digits by default)."""
    return np.bincount(labels * classes + predicted, minlength=classes * classes).reshape(classes, classes)


def save_confusion(predicted: np.ndarray, labels: np.ndarray, out: Path, title: str, classes: int = 10) -> np.ndarray:
    """The confusion matrix of (N,) predicted classes against (N,) true ones as a PNG, in one unit: the
    percentage of each true class's images (colour and, for up to 10 classes, the number in each cell;
    each row's image count beside its class). Returns the matrix of counts."""
    matrix = confusion_matrix(predicted, labels, classes)
    percent = 100.0 * matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    few = classes <= 10  # the digits: numbers fit in the cells; 43 signs: colours and every fifth tick
    figure, axes = pyplot().subplots(figsize=(6.8, 5.8) if few else (9.6, 8.4))
    image = axes.imshow(percent, cmap="Blues", vmin=0, vmax=100)
    for true in range(classes if few else 0):
        for guess in range(classes):
            axes.text(guess, true, f"{percent[true, guess]:.0f}", ha="center", va="center", fontsize=7,
                      color="white" if percent[true, guess] > 50 else "black")
    accuracy = 100.0 * np.trace(matrix) / max(matrix.sum(), 1)
    ticks = list(range(0, classes, 1 if few else 5))
    axes.set(xticks=ticks, yticks=ticks, xlabel="predicted class", ylabel="true class (its images)",
             title=f"{title}\naccuracy {accuracy:.2f}% of {matrix.sum():,} images")
    axes.set_yticklabels([f"{k} ({matrix[k].sum():,})" for k in ticks], fontsize=7 if few else 6)
    figure.colorbar(image, ax=axes, label="% of the true class's images")
    figure.tight_layout()
    save_figure(figure, out, dpi=110)
    return matrix


def dataset_label(name: str) -> str:
    """A dataset as a picture names it: 'mnist', or the folder's own name for folder:DIR."""
    return Path(name.removeprefix("folder:")).name if name.startswith("folder:") else name


def run_title(settings: dict) -> str:
    """What a run is, for a picture's title: 'mcd, svhn → mnist' (settings: a Config's or a CSV's record)."""
    source, target = (dataset_label(str(settings.get(key, default))) for key, default in
                      (("source", "svhn"), ("target", "mnist")))
    return f"{settings.get('method', 'mcd')}, {source} → {target}"


def picture_path(checkpoint: Path, kind: str) -> Path:
    """runs/mcd.pt -> runs/mcd_tsne.png, runs/mcd_confusion.png."""
    return checkpoint.with_name(f"{checkpoint.stem}_{kind}.png")
