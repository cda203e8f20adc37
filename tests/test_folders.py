"""--source / --target folder:DIR: a user's own images in ImageFolder layout train as one more dataset record:
classes matched by name, a seeded held-out test split recorded, images at the network's input on the
device, and one-line errors for every way such a folder goes wrong."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import datasets
import main as main_module
from conftest import read_rows, train_args
from datasets import DataError, load_digits

CPU = torch.device("cpu")


def make_folder(root: Path, classes: list[str], per_class: int = 6, size: tuple[int, int] = (20, 24), seed: int = 0,
                suffix: str = ".png") -> Path:
    """ROOT/CLASS/NNN.png: each class a colour of its own (learnable), images of an odd size (resized on load)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for k, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        colour = np.array([(k * 97) % 256, (k * 57 + 80) % 256, (k * 31 + 160) % 256])
        for i in range(per_class):
            pixels = (colour + rng.integers(-20, 21, (*size, 3))).clip(0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i:03d}{suffix}")
    return root


def _run(tmp_path: Path, source: str, target: str, *extra: str, digits_root: Path | None = None) -> int:
    argv = train_args(digits_root or tmp_path, tmp_path / "out" / "run.csv", "--source", source, "--target", target,
                      "--network", "usps", *extra, epochs=1, iters=2)
    return main_module.main(argv)


def test_two_folders_train_end_to_end_and_the_record_names_the_held_out_split(tmp_path, capsys):
    classes = ["cat", "dog", "fish"]
    source = make_folder(tmp_path / "photos", classes, per_class=10)
    target = make_folder(tmp_path / "sketches", classes, per_class=10, seed=1, suffix=".jpg")
    assert _run(tmp_path, f"folder:{source}", f"folder:{target}") == 0
    rows = read_rows(tmp_path / "out" / "run.csv")
    assert [row["epoch"] for row in rows] == ["1"] and float(rows[0]["target_acc_ensemble"]) >= 0
    record = json.loads((tmp_path / "out" / "run.json").read_text())
    assert record["config"]["source"] == f"folder:{source}" and record["config"]["network"] == "usps"
    notes = [f["note"] for f in record["data_files"]]
    assert notes == ["6 of 30 images held out as the test set (seed 0)"] * 2
    data = load_digits(tmp_path, False, False, CPU, f"folder:{source}", f"folder:{target}", "usps")
    assert data.classes == tuple(classes)
    assert data.source_train.images.shape == (24, 1, 28, 28) and data.source_test.images.shape == (6, 1, 28, 28)
    assert data.source_train.images.dtype == torch.uint8
    again = load_digits(tmp_path, False, False, CPU, f"folder:{source}", f"folder:{target}", "svhn2mnist")
    assert again.target_train.images.shape == (24, 3, 32, 32)  # the chosen network's input, in colour
    assert torch.equal(again.source_test.labels, data.source_test.labels)  # the same held-out draw every time


def test_a_folder_pairs_with_a_dataset_by_class_name_and_target_labels_follow_the_sources_order(signs_root, tmp_path):
    # 43 classes named 0..42 sort as text (0, 1, 10, 11, ...): GTSRB's labels must be renumbered into that order.
    names = [str(k) for k in range(43)]
    source = make_folder(tmp_path / "signs", names, per_class=1, size=(12, 12))
    data = load_digits(signs_root, False, True, CPU, f"folder:{source}", "gtsrb", "syn2gtrsb")
    assert data.classes == tuple(sorted(names))
    gtsrb = load_digits(signs_root, False, True, CPU, "synsig", "gtsrb")
    expected = torch.tensor([sorted(names).index(str(int(label))) for label in gtsrb.target_test.labels])
    assert torch.equal(data.target_test.labels, expected) and not torch.equal(expected, gtsrb.target_test.labels)


def test_the_default_network_follows_the_records(tmp_path):
    folder = make_folder(tmp_path / "f", list("0123456789"), per_class=1, size=(4, 4))
    assert datasets.default_network(f"folder:{folder}", "mnist") == "svhn2mnist"  # a colour folder: the RGB network
    assert datasets.default_network("mnist", "usps") == "usps" and datasets.default_network("mnist", "svhn") == "svhn2mnist"
    parser = main_module.build_parser()
    config = main_module.build_config(parser.parse_args(["--source", f"folder:{folder}", "--target", "mnist"]), parser)
    assert config.network == "svhn2mnist" and config.source == f"folder:{folder}"


def _broken(tmp_path: Path, case: str) -> tuple[str, str]:
    """(source, target) flags of a folder broken as `case` says."""
    good = make_folder(tmp_path / "good", ["a", "b"])
    bad = tmp_path / "bad"
    if case == "no class folders":
        bad.mkdir()
        (bad / "loose.png").write_bytes((good / "a" / "000.png").read_bytes())
    elif case == "a class without images":
        make_folder(bad, ["a"])
        (bad / "b").mkdir()
    elif case == "a class missing on one side":
        make_folder(bad, ["a", "c"])
    elif case == "an unreadable image":
        make_folder(bad, ["a", "b"])
        (bad / "b" / "001.png").write_bytes(b"not a png")
    elif case == "too few images":
        make_folder(bad, ["a", "b"], per_class=1)
    return f"folder:{good}", f"folder:{bad}"


@pytest.mark.parametrize(("case", "shown"), [
    ("no class folders", "put each class's images in a subfolder"),
    ("a class without images", "put images in it or remove it"),
    ("a class missing on one side", "only in the source: b; only in the target: c"),
    ("an unreadable image", "001.png is not a readable image"),
    ("too few images", "too few to hold a test set out"),
])
def test_each_folder_error_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys, case, shown):
    source, target = _broken(tmp_path, case)
    capsys.readouterr()
    assert _run(tmp_path, source, target) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and shown in err and "Traceback" not in err, err
    assert not (tmp_path / "out" / "run.csv").exists()


def test_a_missing_folder_is_refused_when_the_flags_are_read(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main_module.main(["--source", f"folder:{tmp_path / 'nowhere'}", "--device", "cpu"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no such folder" in err


def test_images_that_do_not_fit_in_memory_are_refused_with_how_many_and_what_to_do(tmp_path, monkeypatch, capsys):
    source = make_folder(tmp_path / "big", ["a", "b"], per_class=5)
    target = make_folder(tmp_path / "other", ["a", "b"], per_class=5, seed=1)
    monkeypatch.setattr(datasets, "free_memory_bytes", lambda: 10_000)  # 10 images at 3 x 28 x 28 need ~47 KB
    assert _run(tmp_path, f"folder:{source}", f"folder:{target}") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "10 images at 3x28x28 need" in err and "--network" in err
    with pytest.raises(DataError, match="fewer images"):
        load_digits(tmp_path, False, False, CPU, f"folder:{source}", f"folder:{target}", "usps")
