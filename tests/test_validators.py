"""Label-free validators: each score against a hand-computed value, the epoch each picks, the summary over
seeds with rank correlations, STEM_selection.csv from real runs, resume, plots, and --tensorboard."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

import main as main_module
import plot_results
import validators
from algorithms import DISCREPANCIES, MCD, discrepancy
from config import Config
from conftest import LENET, read_rows, train_args
from datasets import load_digits
from results import VALIDATION_COLUMNS, selection_path
from train import evaluate_all

K = 4
CONFIDENT_DIVERSE = torch.eye(K) * 0.96 + 0.01  # each image sure of another class: rows sum to 1
COLLAPSED = torch.tensor([[0.97, 0.01, 0.01, 0.01]] * K)  # every image sure of the same class
UNIFORM = torch.full((K, K), 1 / K)


def _scores(p1: torch.Tensor, p2: torch.Tensor | None = None, chunks: int = 1) -> dict[str, float]:
    """validators.scores from logits whose softmax is p1 (and p2), in `chunks` pieces as eval passes give them."""
    p2 = p1 if p2 is None else p2
    return validators.scores(zip(p1.log().chunk(chunks), p2.log().chunk(chunks)), discrepancy)


def test_entropy_and_information_maximisation_prefer_confident_diverse_predictions():
    uniform, diverse, collapsed = _scores(UNIFORM), _scores(CONFIDENT_DIVERSE), _scores(COLLAPSED)
    assert uniform["val_entropy"] == pytest.approx(math.log(K))  # lower is better: uniform is worst
    row = [0.97, 0.01, 0.01, 0.01]
    assert diverse["val_entropy"] == pytest.approx(-sum(p * math.log(p) for p in row), rel=1e-5)
    assert diverse["val_entropy"] < uniform["val_entropy"]
    assert uniform["val_im"] == pytest.approx(0.0, abs=1e-6)  # H(mean) = H(each) = log K
    assert diverse["val_im"] == pytest.approx(math.log(K) - diverse["val_entropy"], rel=1e-5)
    assert collapsed["val_im"] == pytest.approx(0.0, abs=1e-5)  # confident but one class: no information
    assert diverse["val_im"] > max(uniform["val_im"], collapsed["val_im"])


def test_bnm_is_the_nuclear_norm_over_n_and_rewards_diversity():
    one_hot, same = torch.eye(K), torch.zeros(K, K)
    same[:, 0] = 1
    assert _scores(one_hot.clamp_min(1e-9) / one_hot.clamp_min(1e-9).sum(1, keepdim=True))["val_bnm"] == pytest.approx(1.0, rel=1e-4)
    assert _scores(same.clamp_min(1e-9) / same.clamp_min(1e-9).sum(1, keepdim=True))["val_bnm"] == pytest.approx(0.5, rel=1e-4)  # rank 1: sqrt(4) / 4
    assert _scores(UNIFORM)["val_bnm"] == pytest.approx(0.25, rel=1e-5)  # rank 1: sqrt(16 / 16) / 4


def test_d_is_mcds_discrepancy_between_the_heads():
    assert _scores(UNIFORM)["val_d"] == pytest.approx(0.0, abs=1e-7)
    assert _scores(CONFIDENT_DIVERSE, COLLAPSED)["val_d"] == pytest.approx(
        (CONFIDENT_DIVERSE - COLLAPSED).abs().mean().item(), rel=1e-6)
    e0, e1 = torch.tensor([[0.999, 0.001 / 3, 0.001 / 3, 0.001 / 3]]), torch.tensor([[0.001 / 3, 0.999, 0.001 / 3, 0.001 / 3]])
    assert _scores(e0, e1)["val_d"] == pytest.approx(2 * (0.999 - 0.001 / 3) / K, rel=1e-5)


def test_val_d_is_the_runs_own_discrepancy_and_leaves_training_randomness_alone(digits_root):
    cpu = torch.device("cpu")
    data = load_digits(digits_root, False, True, cpu, "mnist", "usps", "usps")
    images = data.target_train.images[:64]
    values = {}
    for name in DISCREPANCIES:
        torch.manual_seed(0)
        config = Config(network="usps", discrepancy=name, swd_projections=8)
        model = MCD(config, 10, cpu, 1)
        state = torch.get_rng_state()
        values[name] = evaluate_all(model, data, 32, images)["val_d"]
        assert torch.equal(torch.get_rng_state(), state)  # training's random stream is untouched
        assert evaluate_all(model, data, 32, images)["val_d"] == values[name]  # fixed directions: epochs compare
        logits1, logits2 = (torch.cat(parts) for parts in zip(*[(l1, l2) for _, l1, l2 in model.eval_passes(images, 32)]))
        generator = torch.Generator().manual_seed(validators.VALIDATION_SEED)
        assert values[name] == pytest.approx(DISCREPANCIES[name](logits1, logits2, config, generator).item(), rel=1e-6)
    assert values["l1"] != values["swd"]


def test_snd_by_hand_and_against_a_direct_computation():
    same = torch.tensor([[0.7, 0.1, 0.1, 0.1]] * 3)
    # Three equal predictions: each sees two neighbours of equal similarity, so its entropy is log 2.
    assert validators.soft_neighbourhood_density(same) == pytest.approx(math.log(2), rel=1e-6)
    rng = np.random.default_rng(0)
    p = rng.dirichlet(np.ones(K), size=50)
    q = p / np.linalg.norm(p, axis=1, keepdims=True)
    similarity = q @ q.T / validators.SND_TEMPERATURE
    np.fill_diagonal(similarity, -np.inf)
    weights = np.exp(similarity - similarity.max(axis=1, keepdims=True))
    weights /= weights.sum(axis=1, keepdims=True)
    expected = float(np.mean(-(weights * np.log(np.clip(weights, 1e-12, None))).sum(axis=1)))
    tensor = torch.tensor(p, dtype=torch.float32)
    assert validators.soft_neighbourhood_density(tensor, chunk=7).item() == pytest.approx(expected, rel=1e-4)  # rows in chunks
    assert _scores(tensor, chunks=3)["val_snd"] == pytest.approx(expected, rel=1e-4)


def _rows(values: dict[str, list[float | None]]) -> list[dict]:
    epochs = len(values["target_acc_ensemble"])
    return [{"epoch": e + 1, **{name: column[e] for name, column in values.items()}} for e in range(epochs)]


def test_each_validator_picks_its_best_epoch_beside_last_and_the_labelled_oracle():
    rows = _rows({"target_acc_ensemble": [50.0, 70.0, 90.0, 60.0], "val_entropy": [1.0, 0.5, 0.5, 0.9],
                  "val_im": [0.1, 0.2, 0.9, float("nan")], "val_snd": [None, None, None, None], "val_bnm": [0.3, 0.2, 0.1, 0.4],
                  "val_d": [0.05, 0.01, 0.02, 0.03], "source_acc": [80.0, 95.0, 90.0, 85.0]})
    chosen = {row["validator"]: (row["epoch"], row["target_acc_ensemble"]) for row in validators.choose(rows)}
    assert chosen == {"val_entropy": (2, 70.0),  # lower is better; a tie goes to the first epoch
                      "val_im": (3, 90.0),  # a NaN score is never picked
                      "val_bnm": (4, 60.0), "val_d": (2, 70.0), "source_acc": (2, 70.0),
                      "last": (4, 60.0), "oracle (uses target labels)": (3, 90.0)}  # val_snd: no scores, no row


def test_the_summary_over_seeds_has_each_pick_and_spearmans_rho_over_all_epochs():
    seeds = {1: _rows({"target_acc_ensemble": [50.0, 70.0, 90.0], "val_im": [0.1, 0.5, 0.4]}),
             2: _rows({"target_acc_ensemble": [40.0, 80.0, 60.0], "val_im": [0.2, 0.3, 0.6]})}
    summary = {row["validator"]: row for row in validators.summarize_choices(seeds)}
    assert summary["val_im"]["mean"] == pytest.approx((70.0 + 60.0) / 2) and summary["val_im"]["n"] == 2
    assert summary["val_im"]["std"] == pytest.approx(np.std([70.0, 60.0], ddof=1))
    pooled = spearmanr([0.1, 0.5, 0.4, 0.2, 0.3, 0.6], [50, 70, 90, 40, 80, 60]).statistic
    assert summary["val_im"]["spearman"] == pytest.approx(pooled) and summary["val_im"]["direction"] == "higher"
    assert summary["last"]["mean"] == pytest.approx(75.0) and summary["last"]["spearman"] is None
    assert summary["oracle (uses target labels)"]["mean"] == pytest.approx(85.0)
    assert "val_entropy" not in summary  # no scores in these rows
    table = validators.choices_table(list(summary.values()))
    assert "oracle (uses target labels)" in table and f"{pooled:+.2f}" in table


def test_validation_subset_is_fixed_and_never_touches_the_training_randomness():
    torch.manual_seed(3)
    before = torch.random.get_rng_state()
    first = validators.validation_subset(12_000)
    assert torch.equal(torch.random.get_rng_state(), before)
    assert torch.equal(first, validators.validation_subset(12_000)) and len(first) == validators.VALIDATION_IMAGES
    assert sorted(validators.validation_subset(30).tolist()) == list(range(30))  # a small set: all of it


def _tensorboard_scalars(folder) -> dict[str, list[int]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(folder))
    accumulator.Reload()
    return {tag: [event.step for event in accumulator.Scalars(tag)] for tag in accumulator.Tags()["scalars"]}


def test_a_run_writes_its_scores_selection_and_tensorboard_and_resume_keeps_them(digits_root, tmp_path, capsys):
    plain, boarded = tmp_path / "plain.csv", tmp_path / "board.csv"
    assert main_module.main(train_args(digits_root, plain, *LENET, "--deterministic", epochs=3)) == 0
    board = tmp_path / "tb"
    flags = (*LENET, "--deterministic", "--tensorboard", str(board))
    assert main_module.main(train_args(digits_root, boarded, *flags, epochs=2)) == 0
    assert main_module.main(train_args(digits_root, boarded, *flags, "--resume", epochs=3)) == 0
    rows, again = read_rows(plain), read_rows(boarded)
    assert [row["epoch"] for row in rows] == ["1", "2", "3"]
    for row, other in zip(rows, again):  # --tensorboard and the resume change no result
        assert all(row[column] not in ("", None) for column in VALIDATION_COLUMNS)
        assert {k: v for k, v in row.items() if k != "seconds"} == {k: v for k, v in other.items() if k != "seconds"}
    selection = read_rows(selection_path(boarded))
    assert [row["validator"] for row in selection] == [*validators.VALIDATORS, "last", "oracle (uses target labels)"]
    assert selection[-2]["epoch"] == "3"  # last
    best = max(rows, key=lambda row: float(row["target_acc_ensemble"]))
    assert selection[-1]["epoch"] == best["epoch"]
    scalars = _tensorboard_scalars(board / "board")
    assert scalars["accuracy/target_acc_ensemble"] == [1, 2, 3]  # resumed: appended, no epoch twice
    assert scalars["validator/val_im"] == [1, 2, 3] and scalars["loss/loss_source"] == [1, 2, 3]


def test_seeds_print_and_write_the_validators_summary(digits_root, tmp_path, capsys):
    csv_path = tmp_path / "multi.csv"
    assert main_module.main(train_args(digits_root, csv_path, *LENET, "--seeds", "1-2")) == 0
    out = capsys.readouterr().out
    assert "at the epoch each validator picks" in out and "oracle (uses target labels)" in out
    summary = read_rows(selection_path(csv_path, over_seeds=True))
    assert [row["validator"] for row in summary] == [*validators.VALIDATORS, "last", "oracle (uses target labels)"]
    assert all(row["n"] == "2" for row in summary)
    assert selection_path(tmp_path / "multi_seed2.csv").exists()
    png = tmp_path / "validators.png"
    assert plot_results.main([str(tmp_path / "multi_seed1.csv"), str(tmp_path / "multi_seed2.csv"), "--validators",
                              "--out", str(png)]) == 0
    assert png.stat().st_size > 0


def test_an_unwritable_tensorboard_folder_is_one_line_before_any_result(digits_root, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    csv_path = tmp_path / "r.csv"
    assert main_module.main(train_args(digits_root, csv_path, *LENET, "--tensorboard", str(blocker / "tb"))) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--tensorboard" in err and not csv_path.exists()
