"""Research features: several seeds with mean ± std, and the pictures of them."""

from __future__ import annotations

import bz2
import json
import os
import statistics
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import matplotlib
import numpy as np
import pytest
import torch
from torchvision.datasets.mnist import read_image_file, read_label_file

import datasets
import main as main_module
import models
import plot_results
import visualize
from checkpoint import load_checkpoint, save_checkpoint
from figures import confusion_matrix
from conftest import MCD_COLUMNS as CSV_COLUMNS, read_rows as _rows, train_args as _args
from checkpoint import checkpoint_data, model_from_checkpoint

ROOT = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def seed_runs(digits_root, tmp_path_factory) -> Path:
    """Three seeds trained with a relative --data-root, as users give it (the evaluation below runs elsewhere)."""
    csv_path, where = tmp_path_factory.mktemp("seeds") / "mcd.csv", os.getcwd()
    os.chdir(digits_root.parent)
    try:
        assert main_module.main(_args(Path(digits_root.name), csv_path, "--seeds", "1-2", "3")) == 0
    finally:
        os.chdir(where)
    return csv_path


def test_seeds_write_one_run_each_and_a_summary_of_last_epochs(seed_runs, capsys):
    folder = seed_runs.parent
    assert sorted(p.name for p in folder.glob("*.csv")) == sorted(
        [*(f"mcd_seed{seed}{kind}.csv" for seed in (1, 2, 3) for kind in ("", "_selection")), "mcd_summary.csv",
         "mcd_selection_summary.csv"])  # each seed's run and validators' picks; both summaries over seeds
    assert all((folder / f"mcd_seed{seed}.pt").exists() for seed in (1, 2, 3))
    last = {seed: _rows(folder / f"mcd_seed{seed}.csv")[-1] for seed in (1, 2, 3)}
    assert len({row["target_acc_ensemble"] + row["loss_source"] for row in last.values()}) == 3  # seeds differ
    summary = {row["metric"]: row for row in _rows(folder / "mcd_summary.csv")}
    assert list(summary) == ["target_acc_ensemble", "target_acc_f1", "target_acc_f2", "source_acc"]
    for metric, row in summary.items():
        values = [float(last[seed][metric]) for seed in (1, 2, 3)]  # the last epoch, never the best
        assert [float(row[f"seed_{seed}"]) for seed in (1, 2, 3)] == pytest.approx(values, abs=1e-4)
        assert float(row["mean"]) == pytest.approx(statistics.fmean(values), abs=1e-4)
        assert float(row["std"]) == pytest.approx(statistics.stdev(values), abs=1e-4)  # sample std


def test_seed_ranges_and_bad_seeds(capsys):
    assert main_module.build_parser().parse_args(["--seeds", "1-3", "7"]).seeds == [[1, 2, 3], [7]]
    with pytest.raises(SystemExit):
        main_module.build_parser().parse_args(["--seeds", "x"])
    assert "not a seed or a range" in capsys.readouterr().err


def test_plot_groups_seed_files_into_a_band(seed_runs, tmp_path):
    folder = seed_runs.parent
    seeds = [folder / f"mcd_seed{seed}.csv" for seed in (1, 2, 3)]
    other = tmp_path / "source_only.csv"
    other.write_text(",".join(CSV_COLUMNS) + "\n1,2,1.0,2.0,,,50,30,31,32\n2,4,2.0,1.0,,,60,33,34,35\n")
    assert plot_results._groups([*seeds, other]) == [("mcd (3 seeds)", [0, 1, 2]), ("source_only", [3])]
    out = tmp_path / "band.png"
    result = subprocess.run([sys.executable, str(ROOT / "plot_results.py"), *map(str, seeds), str(other), "--out", str(out)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    data = out.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 20_000  # two panels with curves, not an empty canvas


def test_training_ends_with_a_confusion_matrix_picture(seed_runs):
    for seed in (1, 2, 3):
        data = (seed_runs.parent / f"mcd_seed{seed}_confusion.png").read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 20_000


def test_confusion_matrix_counts_true_rows_and_predicted_columns():
    labels = np.array([0, 0, 1, 2, 2, 2])
    predicted = np.array([0, 1, 1, 2, 0, 2])
    matrix = confusion_matrix(predicted, labels, classes=3)
    assert matrix.tolist() == [[1, 1, 0], [0, 1, 0], [1, 0, 2]]


def test_the_confusion_picture_gives_colours_and_numbers_in_one_unit(tmp_path, monkeypatch):
    import figures

    drawn = []
    monkeypatch.setattr(figures, "save_figure", lambda figure, out, dpi: drawn.append(figure))
    labels, predicted = np.array([0, 0, 0, 0, 1, 1]), np.array([0, 0, 0, 1, 1, 1])
    assert figures.save_confusion(predicted, labels, tmp_path / "c.png", "mcd", classes=2).tolist() == [[3, 1], [0, 2]]
    axes, bar = drawn[0].axes
    assert [text.get_text() for text in axes.texts] == ["75", "25", "0", "100"]  # % of each true class's images
    assert axes.images[0].get_array().tolist() == [[75, 25], [0, 100]] and bar.get_ylabel().startswith("% of the true")
    assert [label.get_text() for label in axes.get_yticklabels()] == ["0 (4)", "1 (2)"]  # each row's image count
    assert "accuracy 83.33% of 6 images" in axes.get_title()
    matplotlib.pyplot.close(drawn[0])


def test_evaluate_reproduces_the_last_row_without_training(seed_runs, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # another folder: the run's data root was recorded whole
    checkpoint = seed_runs.parent / "mcd_seed2.pt"
    before = checkpoint.read_bytes()
    assert main_module.main(["--evaluate", str(checkpoint), "--device", "cpu", "--no-download"]) == 0
    out = capsys.readouterr().out
    last = _rows(seed_runs.parent / "mcd_seed2.csv")[-1]
    result = json.loads((seed_runs.parent / "mcd_seed2_evaluation.json").read_text())
    for metric in ("source_acc", "target_acc_f1", "target_acc_f2", "target_acc_ensemble"):
        assert result[metric] == pytest.approx(float(last[metric]), abs=1e-4)  # same weights, same numbers
    assert f"ensemble {float(last['target_acc_ensemble']):.2f}%" in out and result["epoch"] == 2
    assert checkpoint.read_bytes() == before  # evaluation trains nothing and saves nothing over it


def test_evaluate_a_missing_or_foreign_checkpoint_is_one_line(tmp_path, capsys):
    assert main_module.main(["--evaluate", str(tmp_path / "none.pt"), "--device", "cpu"]) == 2
    assert "no checkpoint" in capsys.readouterr().err
    (tmp_path / "foreign.pt").write_bytes(b"not torch")
    assert main_module.main(["--evaluate", str(tmp_path / "foreign.pt"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not a readable checkpoint" in err


@pytest.mark.slow
def test_visualize_draws_tsne_of_two_models_and_the_confusion_matrix(seed_runs):
    folder = seed_runs.parent
    result = subprocess.run([sys.executable, str(ROOT / "visualize.py"), str(folder / "mcd_seed1.pt"), "--compare",
                             str(folder / "mcd_seed3.pt"), "--images", "60", "--device", "cpu"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    for kind, least in (("tsne", 60_000), ("confusion", 20_000)):
        data = (folder / f"mcd_seed1_visualize_{kind}.png").read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > least


def test_visualize_never_overwrites_a_runs_own_pictures(seed_runs, tmp_path, capsys):
    folder = seed_runs.parent
    before = (folder / "mcd_seed1_confusion.png").read_bytes()
    with pytest.raises(SystemExit) as exit_info:  # mcd_seed1 is a run: mcd_seed1_confusion.png is its own
        visualize.main([str(folder / "mcd_seed1.pt"), "--out", str(folder / "mcd_seed1"), "--device", "cpu"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and "--out" in err and "a run's name" in err
    assert (folder / "mcd_seed1_confusion.png").read_bytes() == before
    assert visualize.main([str(folder / "mcd_seed1.pt"), "--out", str(tmp_path / "mine"), "--images", "30",
                           "--device", "cpu"]) == 0
    assert (tmp_path / "mine_tsne.png").exists() and (tmp_path / "mine_confusion.png").exists()


def test_visualize_refuses_bad_images_and_a_comparison_across_pairs(seed_runs, tmp_path, capsys):
    checkpoint = seed_runs.parent / "mcd_seed1.pt"
    payload = load_checkpoint(checkpoint)
    other = tmp_path / "usps.pt"
    save_checkpoint(other, {**payload, "config": {**payload["config"], "source": "usps", "target": "mnist"}})
    with pytest.raises(SystemExit) as exit_info:
        visualize.main([str(checkpoint), "--images", "0", "--device", "cpu"])
    assert exit_info.value.code == 2 and "--images" in capsys.readouterr().err
    assert visualize.main([str(checkpoint), "--compare", str(other), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "different pairs" in err and "usps -> mnist" in err


@pytest.mark.slow
def test_visualize_refuses_a_missing_cuda_and_a_run_still_training(seed_runs, capsys):
    checkpoint = seed_runs.parent / "mcd_seed1.pt"
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit) as exit_info:
            visualize.main([str(checkpoint), "--device", "cuda"])
        assert exit_info.value.code == 2 and "no CUDA device" in capsys.readouterr().err
    lock = subprocess.Popen([sys.executable, "-c", "import sys, time; sys.path.insert(0, sys.argv[1]); import locks; "
                             "from pathlib import Path\nwith locks.run_lock(Path(sys.argv[2])): print(flush=True); "
                             "time.sleep(60)", str(ROOT), str(checkpoint.with_suffix(".csv"))],
                            stdout=subprocess.PIPE, text=True)
    try:
        lock.stdout.readline()  # the lock is held
        assert visualize.main([str(checkpoint), "--device", "cpu"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "still training" in err
    finally:
        lock.kill()
        lock.wait()


def test_tsne_by_digit_panels_have_a_legend_of_the_ten_digits_in_their_colours(seed_runs, tmp_path, monkeypatch):
    checkpoint = load_checkpoint(seed_runs.parent / "mcd_seed1.pt", flag="visualize")
    model = model_from_checkpoint(checkpoint, torch.device("cpu"))
    data = checkpoint_data(checkpoint, torch.device("cpu"))
    drawn = []
    monkeypatch.setattr(visualize, "save_figure", lambda figure, out, dpi: drawn.append(figure))
    visualize.save_tsne([("mcd", model), ("again", model)], data, ("mnist", "usps"), tmp_path / "tsne.png", images=40)
    by_dataset = [axes for axes in drawn[0].axes if "by dataset" in axes.get_title()]
    assert [axes.get_title() for axes in by_dataset] == ["mcd\nby dataset", "again\nby dataset"]  # each model named
    assert [text.get_text().split(" (")[0] for text in by_dataset[0].get_legend().get_texts()] == ["mnist", "usps"]
    by_digit = [axes for axes in drawn[0].axes if "by class" in axes.get_title()]
    assert len(by_digit) == 2  # one per model
    for axes in by_digit:
        legend = axes.get_legend()
        assert legend is not None, "a 'by digit' panel has no legend"
        assert [text.get_text() for text in legend.get_texts()] == [str(d) for d in range(10)]
        colour_of = {int(text.get_text()): matplotlib.colors.to_rgb(handle.get_color())
                     for text, handle in zip(legend.get_texts(), legend.legend_handles)}
        for points in axes.collections:  # every point is drawn in its digit's legend colour
            for digit, rgba in zip(points.get_array(), points.to_rgba(points.get_array())):
                assert tuple(rgba[:3]) == pytest.approx(colour_of[int(digit)])
    matplotlib.pyplot.close(drawn[0])


# ---------------------------------------------------------------------------------------------------
# The paper's other digit pairs: MNIST <-> USPS at 28x28 grey with the LeNet-style network


def _load(root: Path, **options) -> "datasets.Digits":
    return datasets.load_digits(root, download=False, allow_unverified=True, device=torch.device("cpu"), **options)


def test_mnist_to_usps_is_28x28_grey_with_usps_labels_0_to_9(fresh_root):
    root, labels = fresh_root
    data = _load(root, source="mnist", target="usps")
    assert data.source_train.images.shape == (300, 1, 28, 28) and data.target_train.images.shape == (240, 1, 28, 28)
    assert data.target_test.images.shape == (120, 1, 28, 28) and data.target_train.images.dtype == torch.uint8
    assert data.target_train.labels.tolist() == labels["usps_train"].tolist()  # LIBSVM's 1..10 -> digits 0..9
    # The IDX reader reads what torchvision's reads.
    assert torch.equal(data.source_test.images[:, 0], read_image_file(str(root / "MNIST/raw/t10k-images-idx3-ubyte")))
    assert torch.equal(data.source_test.labels, read_label_file(str(root / "MNIST/raw/t10k-labels-idx1-ubyte")).long())
    # The class pattern survives the 16 -> 28 resize: the bright bar sits at the digit's column.
    digit = int(data.target_train.labels[0])
    columns = data.target_train.images[0, 0].float().mean(dim=0)
    assert abs(int(columns.argmax()) - (digit + 0.5) * 28 / 16) < 2  # fixture bar: column = digit at 16 px
    assert [Path(f.path).name for f in data.files][-2:] == ["usps.bz2", "usps.t.bz2"]


def test_usps_with_svhn_is_32x32_rgb(fresh_root):
    root, _ = fresh_root
    data = _load(root, source="usps", target="svhn")
    assert data.source_train.images.shape == (240, 3, 32, 32) and data.target_train.images.shape == (400, 3, 32, 32)
    assert torch.equal(data.source_train.images[:, 0], data.source_train.images[:, 2])  # grey repeated


def test_small_subsets_are_seeded_random_training_subsets(fresh_root, monkeypatch):
    root, _ = fresh_root
    assert (datasets.DOMAINS["mnist"].small_train_size, datasets.DOMAINS["usps"].small_train_size) == (2000, 1800)
    for name, size in (("mnist", 50), ("usps", 40)):  # the paper's sizes, scaled to the fixture's
        monkeypatch.setitem(datasets.DOMAINS, name, replace(datasets.DOMAINS[name], small_train_size=size))
    one = _load(root, source="usps", target="mnist", small_subsets=True, subset_seed=1)
    assert len(one.source_train) == 40 and len(one.target_train) == 50
    assert len(one.source_test) == 120 and len(one.target_test) == 200  # test sets stay whole
    again = _load(root, source="usps", target="mnist", small_subsets=True, subset_seed=1)
    other = _load(root, source="usps", target="mnist", small_subsets=True, subset_seed=2)
    assert torch.equal(one.target_train.labels, again.target_train.labels)
    assert not torch.equal(one.target_train.images, other.target_train.images)


@pytest.mark.parametrize(("damage", "message"), [
    (lambda p: p.write_bytes(b"not bzip2"), "not a readable USPS .bz2"),
    (lambda p: p.write_bytes(bz2.compress(b"11 " + b" ".join(b"%d:0.1" % i for i in range(1, 257)) + b"\n")), "labels must be 1..10"),
    (lambda p: p.write_bytes(bz2.compress(b"3 1:0.5 2:0.5\n")), "256 pixel values"),
])
def test_damaged_usps_files_are_clear_errors(fresh_root, damage, message):
    root, _ = fresh_root
    damage(root / "usps" / "usps.t.bz2")
    with pytest.raises(datasets.DataError, match=message):
        _load(root, source="mnist", target="usps")


def test_usps_checksum_and_missing_files(fresh_root):
    root, _ = fresh_root
    with pytest.raises(datasets.DataError, match="usps.bz2 is not the official release"):
        datasets.load_digits(root, download=False, allow_unverified=False, device=torch.device("cpu"),
                             source="usps", target="mnist")
    (root / "usps" / "usps.bz2").unlink()
    with pytest.raises(datasets.DataError, match="usps.bz2 \\(from https://www.csie.ntu.edu.tw/"):
        _load(root, source="usps", target="mnist")
    with pytest.raises(datasets.DataError, match="choose two different datasets"):
        _load(root, source="mnist", target="mnist")


def test_the_usps_network_is_the_original_lenet_style_model():
    G, F1, F2 = models.build_models(torch.device("cpu"), datasets.default_network("mnist", "usps"))
    assert datasets.default_network("svhn", "usps") == datasets.default_network("usps", "svhn") == "svhn2mnist"
    assert sum(p.numel() for p in G.parameters()) == 39_440  # conv 1->32 k5, BN, conv 32->48 k5, BN
    assert sum(p.numel() for p in F1.parameters()) == 88_410  # fc 768->100, BN, 100->100, BN, 100->10
    features = G.eval()(torch.randn(4, 1, 28, 28))
    assert features.shape == (4, 768) and F2.eval()(features).shape == (4, 10)


def test_mnist_to_usps_end_to_end(digits_root, tmp_path):
    csv_path = tmp_path / "m2u.csv"
    args = _args(digits_root, csv_path, "--source", "mnist", "--target", "usps", "--small-subsets")
    assert main_module.main(args) == 0
    assert len(_rows(csv_path)) == 2
    config = json.loads(csv_path.with_suffix(".json").read_text())["config"]
    assert (config["source"], config["target"], config["small_subsets"]) == ("mnist", "usps", True)
    assert main_module.main([*_args(digits_root, csv_path, "--source", "mnist", "--target", "svhn"), "--resume"]) == 2
