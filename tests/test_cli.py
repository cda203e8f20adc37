"""main.py and plot_results.py as a user runs them: real subprocesses on fixture files."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import main as main_module
from conftest import MCD_COLUMNS as CSV_COLUMNS, read_rows as _rows, train_args

ROOT = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def run(script: str, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / script), *args], capture_output=True, text=True, cwd=cwd, timeout=600)


def _train_args(data_root: Path, csv_path: Path, *extra: str) -> list[str]:
    return train_args(data_root, csv_path, *extra, iters=3, num_k=None)


@pytest.mark.slow
def test_train_then_plot_end_to_end(digits_root, tmp_path):
    csv_path = tmp_path / "out" / "results.csv"  # the folder does not exist yet
    result = run("main.py", *_train_args(digits_root, csv_path, "--num-k", "2"))
    assert result.returncode == 0, result.stderr

    assert csv_path.read_text().splitlines()[0] == ",".join(CSV_COLUMNS)
    rows = _rows(csv_path)
    assert [r["epoch"] for r in rows] == ["1", "2"] and [r["iterations"] for r in rows] == ["3", "6"]
    for row in rows:
        assert all(row[c] != "" for c in CSV_COLUMNS)  # MCD fills the discrepancy columns
        assert 0 <= float(row["target_acc_ensemble"]) <= 100 and float(row["discrepancy_b"]) >= 0
    assert float(rows[1]["seconds"]) > float(rows[0]["seconds"]) > 0
    assert "epoch   2/2" in result.stdout
    timing = re.search(r"time in this process: setup ([\d.]+) s; training ([\d.]+) s over 2 epochs \(first ([\d.]+) s, "
                       r"later median ([\d.]+) s(?:: warm-up ≈ ([\d.]+) s)?\); evaluation and checkpoints ([\d.]+) s",
                       result.stdout)  # a warm-up estimate only when it is positive
    assert timing, result.stdout
    setup, training, first, later, rest = map(float, (timing[1], timing[2], timing[3], timing[4], timing[6]))
    assert float(timing[5]) >= 0 if timing[5] else first <= later + 0.1  # never a negative estimate (values rounded)
    assert training == pytest.approx(first + later, abs=0.11) and rest > 0
    assert training == pytest.approx(float(rows[-1]["seconds"]), abs=0.06)  # the CSV's training seconds

    record = json.loads((tmp_path / "out" / "results.json").read_text())
    assert record["config"]["num_k"] == 2 and record["config"]["method"] == "mcd"
    assert record["config"]["lr"] == 2e-4 and record["config"]["weight_decay"] == 5e-4
    assert record["torch"] == torch.__version__ and record["epochs_completed"] == 2
    assert len(record["data_files"]) == 6 and all(len(f["md5"]) == 32 for f in record["data_files"])
    assert set(record["final_row"]) == set(CSV_COLUMNS)
    for column in CSV_COLUMNS:  # the JSON's final row is the CSV's last row (the CSV keeps 6 digits)
        assert float(rows[-1][column]) == pytest.approx(record["final_row"][column], rel=1e-5), column

    png = tmp_path / "curves.png"
    result = run("plot_results.py", str(csv_path), "--out", str(png))
    assert result.returncode == 0, result.stderr
    data = png.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 10_000


def test_source_only_leaves_discrepancy_empty(digits_root, tmp_path):
    csv_path = tmp_path / "source_only.csv"
    assert main_module.main(_train_args(digits_root, csv_path, "--method", "source_only")) == 0
    rows = _rows(csv_path)
    assert len(rows) == 2
    assert all(r["discrepancy_b"] == "" and r["discrepancy_c"] == "" and r["loss_source"] != "" for r in rows)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--epochs", "0"], "--epochs"),
        (["--batch-size", "0"], "--batch-size"),
        (["--num-k", "0"], "--num-k"),
        (["--iters-per-epoch", "0"], "--iters-per-epoch"),
        (["--lr", "0"], "--lr"),
        (["--method", "adda"], "--method"),
        (["--device", "tpu"], "--device"),
    ],
)
def test_invalid_flags_are_argparse_errors(flags, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main_module.main(flags)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_requested_but_absent(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main_module.main(["--device", "cuda"])
    assert exit_info.value.code == 2 and "no CUDA device" in capsys.readouterr().err


@pytest.mark.slow
def test_missing_data_offline_is_one_line_and_writes_nothing(tmp_path):
    csv_path = tmp_path / "results.csv"
    (tmp_path / "empty").mkdir()
    result = run("main.py", "--data-root", str(tmp_path / "empty"), "--no-download", "--device", "cpu", "--csv", str(csv_path))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: missing dataset files") and "Traceback" not in result.stderr
    assert not csv_path.exists()


def test_checksum_refusal_from_the_command_line(digits_root, tmp_path, capsys):
    args = [a for a in _train_args(digits_root, tmp_path / "r.csv") if a != "--allow-unverified-data"]
    assert main_module.main(args) == 2
    err = capsys.readouterr().err
    assert "is not the official release" in err and "--allow-unverified-data" in err
    assert not (tmp_path / "r.csv").exists()


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.mark.slow
def test_plot_errors_are_one_line_exit_2(tmp_path):
    header = ",".join(CSV_COLUMNS)
    cases = {
        "missing": tmp_path / "nope.csv",
        "empty": _write(tmp_path / "empty.csv", ""),
        "foreign": _write(tmp_path / "foreign.csv", "a,b,c\n1,2,3\n"),
        "header only": _write(tmp_path / "header.csv", header + "\n"),
        "truncated": _write(tmp_path / "trunc.csv", header + "\n1,3,0.5,2.3,0.1,0.1,55.0\n"),
        "not numbers": _write(tmp_path / "text.csv", header + "\n1,3,0.5,2.3,0.1,0.1,abc,1,1,1\n"),
        "not UTF-8": tmp_path / "latin.csv",
        "a folder": tmp_path / "folder.csv",
    }
    cases["a folder"].mkdir()
    cases["not UTF-8"].write_bytes(header.encode() + b"\n1,3,0.5,2.3,0.1,0.1,\xe9t\xe9,1,1,1\n")
    for name, path in cases.items():
        result = run("plot_results.py", str(path), "--out", str(tmp_path / "x.png"))
        assert result.returncode == 2, name
        assert result.stderr.startswith("error: ") and len(result.stderr.strip().splitlines()) == 1, (name, result.stderr)
        assert str(path) in result.stderr, name
    assert not (tmp_path / "x.png").exists()


def test_plot_several_files_and_never_imports_torch(tmp_path):
    header = ",".join(CSV_COLUMNS)
    a = _write(tmp_path / "mcd.csv", header + "\n1,3,1.0,2.0,0.1,0.1,50,40,41,42\n2,6,2.0,1.0,0.1,0.1,60,50,51,52\n")
    b = _write(tmp_path / "source_only.csv", header + "\n1,3,1.0,2.0,,,50,30,31,32\n2,6,2.0,1.0,,,60,33,34,35\n")
    code = (
        "import sys, plot_results; rc = plot_results.main(sys.argv[1:]); "
        "assert 'torch' not in sys.modules, 'plot_results imported torch'; sys.exit(rc)"
    )
    result = subprocess.run([sys.executable, "-c", code, str(a), str(b)], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "mcd.png").read_bytes()[:8] == PNG_MAGIC  # default output: first CSV's stem


def test_plot_draws_every_loss_column_a_method_writes(tmp_path, monkeypatch):
    import plot_results
    from algorithms import ALGORITHMS
    from results import csv_columns

    drawn = []
    monkeypatch.setattr(plot_results, "save_figure", lambda figure, out: drawn.append(figure))
    paths = []
    for method, algorithm in ALGORITHMS.items():  # DANN's loss_domain as much as MCD's three
        columns = csv_columns(algorithm.LOSSES)
        row = lambda epoch: ",".join(str(epoch) if c == "epoch" else "0.5" for c in columns)  # noqa: E731
        paths.append(_write(tmp_path / f"{method}.csv", ",".join(columns) + f"\n{row(1)}\n{row(2)}\n"))
    assert plot_results.main([str(p) for p in paths]) == 0
    losses = drawn[0].axes[1]
    labels = {line.get_label() for line in losses.get_lines()}
    expected = {f"{method}: {loss}" for method, algorithm in ALGORITHMS.items() for loss in algorithm.LOSSES}
    assert labels == expected and "dann: loss_domain" in labels


def test_plot_a_flat_validator_keeps_its_value_and_the_picture_says_what_ran(tmp_path, monkeypatch):
    import plot_results
    from algorithms import MCD
    from results import csv_columns

    columns = csv_columns(MCD.LOSSES)
    values = lambda epoch: {"epoch": epoch, "val_bnm": 0.25, "val_d": 0.1 / epoch, "target_acc_ensemble": 40 + epoch}  # noqa: E731
    rows = [",".join(str(values(epoch).get(c, 0.5)) for c in columns) for epoch in (1, 2, 3)]
    csv_path = _write(tmp_path / "flat.csv", ",".join(columns) + "\n" + "\n".join(rows) + "\n")
    config = {"method": "mcd", "source": "svhn", "target": "mnist", "data_root": "../shared/data/digits-proxy-dev"}
    csv_path.with_suffix(".json").write_text(json.dumps({"config": config}))
    drawn = []
    monkeypatch.setattr(plot_results, "save_figure", lambda figure, out: drawn.append(figure))
    assert plot_results.main([str(csv_path), "--validators"]) == 0
    figure = drawn[0]
    assert figure._suptitle.get_text() == "mcd, svhn → mnist (data: digits-proxy-dev)"
    bnm = next(axes for axes in figure.axes if axes.get_title().startswith("BNM"))
    line = bnm.get_lines()[0]
    low, high = bnm.get_ylim()
    assert list(line.get_ydata()) == [0.25] * 3 and low < 0.25 < high  # drawn at its value, not as the "worst"
    assert line.get_marker() == "o"  # three epochs: each a point
    for axes in figure.axes[:2]:  # accuracy and losses: whole epochs on the axis
        assert all(float(tick).is_integer() for tick in axes.get_xticks())
    plot_results.plt.close(figure)


def test_plot_draws_a_non_utf8_file_name_and_seeds_with_an_infinite_loss(tmp_path):
    header = ",".join(CSV_COLUMNS)
    odd = Path(os.fsdecode(bytes(tmp_path) + b"/r\xff.csv"))  # a name that is not UTF-8
    _write(odd, header + "\n1,3,1.0,2.0,0.1,0.1,50,40,41,42\n")
    seeds = [_write(tmp_path / f"b_seed{seed}.csv", header + f"\n1,3,1.0,inf,0.1,0.1,50,40,41,42\n2,6,2.0,{seed},0.1,"
                    "0.1,60,50,51,52\n") for seed in (1, 2)]
    import plot_results

    assert plot_results.main([str(odd), "--out", str(tmp_path / "odd.png")]) == 0
    assert plot_results.main([*map(str, seeds), "--out", str(tmp_path / "band.png")]) == 0
    assert (tmp_path / "band.png").read_bytes()[:8] == PNG_MAGIC


def test_plot_refuses_an_input_csv_as_its_output(tmp_path):
    header = ",".join(CSV_COLUMNS)
    a = _write(tmp_path / "r.csv", header + "\n1,3,1.0,2.0,0.1,0.1,50,40,41,42\n")
    before = a.read_bytes()
    result = run("plot_results.py", str(a), "--out", str(a))
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "is one of the input CSVs" in result.stderr and a.read_bytes() == before


def test_plot_unwritable_output(tmp_path):
    header = ",".join(CSV_COLUMNS)
    a = _write(tmp_path / "r.csv", header + "\n1,3,1.0,2.0,0.1,0.1,50,40,41,42\n")
    result = run("plot_results.py", str(a), "--out", str(tmp_path / "no" / "such" / "dir" / "x.png"))
    assert result.returncode == 2 and result.stderr.startswith("error: cannot write")


def test_unwritable_output_is_refused_before_training(digits_root, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    assert main_module.main(_train_args(digits_root, blocker / "results.csv")) == 2
    assert "--csv" in capsys.readouterr().err
    assert main_module.main(_train_args(digits_root, tmp_path)) == 2  # a directory, not a file
    assert "is a directory" in capsys.readouterr().err
    assert main_module.main(_train_args(digits_root, tmp_path / "results.json")) == 2  # would collide with the record
    assert "name the CSV *.csv" in capsys.readouterr().err
