"""Choosing without peeking: scores of a model that read no target label, every epoch, and the epoch
each would have chosen, next to the honest last epoch and the target-label oracle.

Each score is computed on the device, once per epoch, from the two heads' softmax outputs p1, p2 (N, K)
on a fixed subset of the target *training* images (VALIDATION_IMAGES, drawn once with a fixed seed, the
same for every run of a dataset), from the ensemble p = (p1 + p2) / 2 unless stated:

    val_entropy  mean entropy of p                                              lower is better
    val_im       information maximisation: entropy of mean(p) - mean entropy   higher is better
    val_snd      soft neighbourhood density (Saito et al., ICCV 2021), tau 0.05 higher is better
    val_bnm      nuclear norm of p divided by N (Cui et al., CVPR 2020)         higher is better
    val_d        the run's discrepancy d(F1, F2) (L1: mean |p1 - p2|)             lower is better
    source_acc   source test accuracy (a column already)                        higher is better

DEV (You et al., ICML 2019) is not here: it needs labelled source images held out of training and a
domain classifier trained beside the model, which changes the training set of every run and costs an
extra training loop per epoch. The reported result stays the last epoch; only the oracle row reads
target labels (the test set's), and it is labelled so.
"""

from __future__ import annotations

import math
import statistics
from typing import Callable, Iterable

import torch
import torch.nn.functional as F

VALIDATION_IMAGES = 5000  # target training images scored each epoch (all of a smaller set)
VALIDATION_SEED = 0
SND_TEMPERATURE = 0.05  # the SND paper's
# validator -> its direction; the val_* ones are the CSV columns this module adds (results.VALIDATION_COLUMNS)
VALIDATORS = {"val_entropy": "lower", "val_im": "higher", "val_snd": "higher", "val_bnm": "higher",
              "val_d": "lower", "source_acc": "higher"}
ORACLE = "oracle (uses target labels)"


def validation_subset(count: int) -> torch.Tensor:
    """Indices of the target training images scored each epoch: a seeded draw of VALIDATION_IMAGES (its
    own generator, so training's random streams are untouched)."""
    generator = torch.Generator().manual_seed(VALIDATION_SEED)
    return torch.randperm(count, generator=generator)[:VALIDATION_IMAGES]


def _entropy(p: torch.Tensor) -> torch.Tensor:
    """(N, K) probabilities -> (N,) entropies in nats."""
    return -(p * p.clamp_min(1e-12).log()).sum(dim=1)


def soft_neighbourhood_density(p: torch.Tensor, temperature: float = SND_TEMPERATURE, chunk: int = 1024) -> torch.Tensor:
    """SND: the mean entropy of each prediction's softmax similarity to every other one (L2-normalised
    predictions, cosine similarity / temperature, itself excluded); rows in chunks: never N x N at once.
    fp32 tensors; the similarities are a matrix product, on TF32 units on CUDA unless --precision is fp32."""
    q = F.normalize(p, dim=1)
    total = p.new_zeros(())
    for start in range(0, len(q), chunk):
        similarity = q[start:start + chunk] @ q.T / temperature  # (c, N)
        rows = torch.arange(len(similarity), device=p.device)
        similarity[rows, start + rows] = -math.inf
        total = total + _entropy(similarity.softmax(dim=1)).sum()
    return total / len(q)


def scores(logit_pairs: Iterable[tuple[torch.Tensor, torch.Tensor]],
           discrepancy: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> dict[str, float]:
    """The val_* columns from the two heads' fp32 logits, chunk by chunk, and the run's discrepancy
    d(logits1, logits2) (algorithms.DISCREPANCIES): computed on the device, read with one host transfer."""
    pairs = list(logit_pairs)
    logits1, logits2 = torch.cat([l1 for l1, _ in pairs]), torch.cat([l2 for _, l2 in pairs])
    p1, p2 = logits1.softmax(dim=1), logits2.softmax(dim=1)
    p = (p1 + p2) / 2
    values = {
        "val_entropy": _entropy(p).mean(),
        "val_im": _entropy(p.mean(dim=0, keepdim=True))[0] - _entropy(p).mean(),
        "val_snd": soft_neighbourhood_density(p),
        "val_bnm": torch.linalg.svdvals(p).sum() / len(p),
        "val_d": discrepancy(logits1, logits2),
    }
    return dict(zip(values, torch.stack(list(values.values())).tolist()))


def _usable(value) -> bool:
    return value is not None and math.isfinite(value)


def choose(rows: list[dict]) -> list[dict]:
    """One row per validator: the epoch it picks (the first best) and the target ensemble accuracy there;
    then the last epoch and the oracle (the best target test accuracy: reference only)."""
    chosen = []
    for name, direction in VALIDATORS.items():
        scored = [row for row in rows if _usable(row.get(name))]
        if scored:
            best = (max if direction == "higher" else min)(scored, key=lambda row: row[name])
            chosen.append({"validator": name, "epoch": best["epoch"], "target_acc_ensemble": best["target_acc_ensemble"]})
    oracle = max(rows, key=lambda row: row["target_acc_ensemble"])
    chosen.append({"validator": "last", "epoch": rows[-1]["epoch"], "target_acc_ensemble": rows[-1]["target_acc_ensemble"]})
    chosen.append({"validator": ORACLE, "epoch": oracle["epoch"], "target_acc_ensemble": oracle["target_acc_ensemble"]})
    return chosen


def _spearman(xs: list[float], ys: list[float]) -> float | None:
    from scipy.stats import spearmanr  # scipy: a dependency already (torchvision's SVHN reader)

    if len(xs) < 3 or len(set(xs)) < 2 or len(set(ys)) < 2:
        return None
    return float(spearmanr(xs, ys).statistic)


def summarize_choices(rows_by_seed: dict[int, list[dict]]) -> list[dict]:
    """Over seeds, per validator: mean and sample std of the chosen epochs' target accuracy (n seeds),
    and the Spearman rank correlation of its score with target accuracy over every epoch of every seed
    (raw: a good 'lower is better' validator correlates negatively)."""
    choices = {seed: {row["validator"]: row for row in choose(rows)} for seed, rows in rows_by_seed.items()}
    summary = []
    for name in (*VALIDATORS, "last", ORACLE):
        accuracies = [picked[name]["target_acc_ensemble"] for picked in choices.values() if name in picked]
        if not accuracies:
            continue
        epochs = [row for rows in rows_by_seed.values() for row in rows if _usable(row.get(name))]
        summary.append({
            "validator": name, "direction": VALIDATORS.get(name, ""),
            "mean": statistics.fmean(accuracies), "std": statistics.stdev(accuracies) if len(accuracies) > 1 else None,
            "n": len(accuracies),
            "spearman": _spearman([row[name] for row in epochs], [row["target_acc_ensemble"] for row in epochs])
            if name in VALIDATORS else None,
        })
    return summary


def choices_table(summary: list[dict]) -> str:
    """The summary over seeds as the console shows it."""
    lines = ["target accuracy (ensemble) at the epoch each validator picks, mean ± sample std over seeds:",
             f"{'validator':30s} {'better':>7s} {'mean ± std':>16s} {'n':>3s} {'Spearman':>9s}"]
    for row in summary:
        spread = f"{row['mean']:.2f}" + (f" ± {row['std']:.2f}" if row["std"] is not None else "")
        rho = f"{row['spearman']:+.2f}" if row["spearman"] is not None else "–"
        lines.append(f"{row['validator']:30s} {row['direction']:>7s} {spread:>16s} {row['n']:>3d} {rho:>9s}")
    return "\n".join(lines)
