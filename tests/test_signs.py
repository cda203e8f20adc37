"""Synthetic Signs -> GTSRB: both public layouts read from tiny fixture files, the ROI crop, the held-out
source test set, each file error as one line, GTSRB's checked download, and the pair trained end to end."""

from __future__ import annotations

import hashlib
import json
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import downloads
import main as main_module
import sweep
from conftest import SIGN_CLASSES_USED, make_signs_root, read_rows, train_args
from datasets import DataError, Digits, load_digits

SIGNS = ("--source", "synsig", "--target", "gtsrb")


def _load(root: Path, **options) -> Digits:
    options = {"download": False, "allow_unverified": True, **options}
    return load_digits(root, device=torch.device("cpu"), source="synsig", target="gtsrb", **options)


def test_both_layouts_are_read_with_labels_roi_crop_and_a_held_out_source_test(tmp_path, capsys):
    labels = make_signs_root(tmp_path)
    data = _load(tmp_path)
    for split in (data.source_train, data.source_test, data.target_train, data.target_test):
        assert split.images.dtype == torch.uint8 and tuple(split.images.shape[1:]) == (3, 40, 40)
    assert data.target_train.labels.tolist() == labels["gtsrb_train"]  # class folders in order, CSV rows in order
    assert data.target_test.labels.tolist() == labels["gtsrb_test"]
    assert set(data.target_train.labels.tolist()) == set(SIGN_CLASSES_USED)  # class 42, the last of 43, included

    # The ROI crop: the fixture's black 5-pixel border is cut off before the 40x40 resize, as PIL does it.
    path = tmp_path / "gtsrb" / "GTSRB" / "Training" / "00000" / "00000_00003.ppm"
    with Image.open(path) as image:
        expected = image.convert("RGB").crop((5, 5, image.width - 5, image.height - 5)).resize((40, 40), Image.BILINEAR)
    assert torch.equal(data.target_train.images[3], torch.from_numpy(np.asarray(expected).transpose(2, 0, 1).copy()))
    assert data.target_train.images[3].float().mean() > 60  # no black border left

    # Synthetic Signs: 30 images, a fifth (6) held out with a fixed seed, never trained on; 48x48 resized.
    assert len(data.source_train) == 24 and len(data.source_test) == 6
    train_images = {bytes(image.numpy().tobytes()) for image in data.source_train.images}
    assert not any(bytes(image.numpy().tobytes()) in train_images for image in data.source_test.images)
    again = _load(tmp_path)
    assert torch.equal(again.source_test.images, data.source_test.images)  # the same draw every run
    assert sorted(data.source_train.labels.tolist() + data.source_test.labels.tolist()) == sorted(labels["synsig"])
    assert [f.verified for f in data.files] == [False] * 4 and "cannot be verified" in capsys.readouterr().err


def _break(root: Path, relative: str, text: str | bytes) -> None:
    path = root / relative
    path.write_bytes(text if isinstance(text, bytes) else text.encode())


GTSRB_CSV = "gtsrb/GTSRB/Training/00007/GT-00007.csv"
HEADER = "Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId\n"
SYNSIG_LIST = "synsig/synthetic_data/train_labelling.txt"
ERRORS = {
    "Synthetic Signs missing": (lambda r: shutil.rmtree(r / "synsig"), "cannot be downloaded from its original page"),
    "a list line of two fields": (lambda r: _break(r, SYNSIG_LIST, "train/00000.png 3\n"), "line 1: expected '<image path>"),
    "a class id of 43": (lambda r: _break(r, SYNSIG_LIST, "train/00000.png 43 1\n"), "line 1: class id 43 is outside 0..42"),
    "a class id not a number": (lambda r: _break(r, SYNSIG_LIST, "train/00000.png x 1\n"), "is not a whole number"),
    "a listed image missing": (lambda r: (r / "synsig/synthetic_data/train/00001.png").unlink(), "does not exist"),
    "an image that is not one": (lambda r: _break(r, "synsig/synthetic_data/train/00002.png", b"not a png"),
                                 "is not a readable image"),
    "a list that is not text": (lambda r: _break(r, SYNSIG_LIST, b"\xff\xfe\x00\x01"), "is not a text file"),
    "too few images to hold any out": (lambda r: _break(r, SYNSIG_LIST, "train/00000.png 0 1\n"), "too few to hold a test set"),
    "GTSRB CSV without its columns": (lambda r: _break(r, GTSRB_CSV, "Filename;ClassId\nx.ppm;7\n"), "missing columns: Roi.X1"),
    "a region not numbers": (lambda r: _break(r, GTSRB_CSV, HEADER + "00000_00000.ppm;30;32;a;5;25;27;7\n"),
                             "line 2: the region of interest is not four whole numbers"),
    "a region outside its image": (lambda r: _break(r, GTSRB_CSV, HEADER + "00000_00000.ppm;30;32;5;5;99;27;7\n"),
                                   "is not inside the 30x32 image"),
    "a GTSRB class of 43": (lambda r: _break(r, GTSRB_CSV, HEADER + "00000_00000.ppm;30;32;5;5;25;27;43\n"),
                            "class id 43 is outside 0..42"),
    "a GTSRB image missing": (lambda r: (r / "gtsrb/GTSRB/Training/00007/00000_00001.ppm").unlink(), "does not exist"),
    "a class folder without its CSV": (lambda r: (r / GTSRB_CSV).unlink(), "GT-00007.csv does not exist"),
    "the test annotations missing": (lambda r: (r / "gtsrb/GT-final_test.csv").unlink(), "GTSRB_Final_Test_GT.zip, extracted there"),
    "GTSRB missing (--no-download)": (lambda r: shutil.rmtree(r / "gtsrb"),
                                      "GTSRB-Training_fixed.zip (from https://sid.erda.dk/"),
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_each_sign_file_error_is_one_line_exit_2(case, signs_root, tmp_path, capsys):
    root = tmp_path / "data"
    shutil.copytree(signs_root, root)
    ERRORS[case][0](root)
    csv_path = tmp_path / "out" / "r.csv"
    assert main_module.main(train_args(root, csv_path, *SIGNS)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if not line.startswith("warning:")]
    assert len(errors) == 1 and errors[0].startswith("error: ") and ERRORS[case][1] in errors[0], err
    assert not csv_path.exists()


@pytest.mark.parametrize(("flags", "shown"), [
    (["--source", "svhn", "--target", "gtsrb"], "a pair shares its classes, these do not (only in the source: none; "
                                                 "only in the target: 10, 11, 12, 13, 14)"),
    ([*SIGNS, "--small-subsets"], "synsig -> gtsrb uses whole training sets"),
])
def test_pairs_across_digits_and_signs_are_refused(flags, shown, signs_root, tmp_path, capsys):
    try:
        code = main_module.main(train_args(signs_root, tmp_path / "r.csv", *flags))
    except SystemExit as exit_info:  # a setting refused by the parser
        code = exit_info.code
    assert code == 2 and shown in capsys.readouterr().err
    with pytest.raises(SystemExit):
        sweep.build_parser().parse_args(["launch", "--out", "x", "--pairs", "gtsrb:mnist"])
    assert sweep.build_parser().parse_args(["launch", "--out", "x", "--pairs", "synsig:gtsrb"]).pairs == ["synsig:gtsrb"]


def _zip_gtsrb(root: Path, archives: Path) -> dict[str, list[tuple[str, str, str]]]:
    """The fixture's GTSRB as torchvision's three zips in `archives`; the archive table with their MD5s."""
    table = {}
    for split, entries in downloads.GTSRB_ARCHIVES.items():
        table[split] = []
        for name, _, extracts in entries:
            with zipfile.ZipFile(archives / name, "w") as archive:
                source = root / "gtsrb" / extracts
                for path in sorted([source] if source.is_file() else source.rglob("*")):
                    if path.is_file():
                        archive.write(path, path.relative_to(root / "gtsrb"))
            table[split].append((name, hashlib.md5((archives / name).read_bytes()).hexdigest(), extracts))
    return table


def test_gtsrb_is_downloaded_checked_against_its_md5_and_extracted(signs_root, tmp_path, monkeypatch, capsys):
    archives = tmp_path / "archives"
    archives.mkdir()
    official = _zip_gtsrb(signs_root, archives)
    requested = []

    def fake_download_url(url, folder, filename, md5):  # stands in for torchvision's network download
        requested.append(url)
        shutil.copy(archives / Path(url).name, Path(folder) / filename)

    monkeypatch.setattr(downloads, "download_url", fake_download_url)
    root = tmp_path / "data"
    shutil.copytree(signs_root / "synsig", root / "synsig")
    reference = _load(signs_root)
    capsys.readouterr()

    monkeypatch.setattr(downloads, "GTSRB_ARCHIVES", official)  # the fixture zips as "the official release"
    data = _load(root, download=True, allow_unverified=False)
    assert sorted(requested) == sorted(downloads.GTSRB_URL + name for name in
                                       ("GTSRB-Training_fixed.zip", "GTSRB_Final_Test_Images.zip", "GTSRB_Final_Test_GT.zip"))
    assert torch.equal(data.target_train.images, reference.target_train.images)
    assert torch.equal(data.target_test.labels, reference.target_test.labels)
    assert [f.verified for f in data.files[1:]] == [True, True, True] and "warning" not in capsys.readouterr().err
    assert not list((root / "gtsrb").glob("tmp*"))  # no temp leftovers

    monkeypatch.undo()  # torchvision's real MD5s again: the fixture zips are not the official release
    with pytest.raises(DataError, match="GTSRB-Training_fixed.zip is not the official release"):
        _load(root, allow_unverified=False)

    def offline(url, folder, filename, md5):
        raise OSError("network unreachable")

    monkeypatch.setattr(downloads, "download_url", offline)
    shutil.rmtree(root / "gtsrb")
    with pytest.raises(DataError, match="could not download https://sid.erda.dk/.*GTSRB-Training_fixed.zip"):
        _load(root, download=True)


def test_the_signs_pair_trains_end_to_end_with_43_classes(signs_root, tmp_path, capsys):
    csv_path = tmp_path / "signs.csv"
    assert main_module.main(train_args(signs_root, csv_path, *SIGNS)) == 0
    rows = read_rows(csv_path)
    assert [row["epoch"] for row in rows] == ["1", "2"] and all(0 <= float(row["target_acc_ensemble"]) <= 100 for row in rows)
    record = json.loads(csv_path.with_suffix(".json").read_text())
    assert record["config"]["source"] == "synsig" and record["config"]["target"] == "gtsrb"
    assert (tmp_path / "signs_confusion.png").exists()
    checkpoint = torch.load(csv_path.with_suffix(".pt"), weights_only=True)
    heads = [value for key, value in checkpoint["models"].items() if key.startswith("F1.") and key.endswith("weight")]
    assert heads[-1].shape[0] == 43  # the last layer of F1: GTSRB's 43 classes
    assert main_module.main(["--evaluate", str(csv_path.with_suffix(".pt")), "--device", "cpu"]) == 0


def test_a_sweep_gives_table_1_its_signs_column(signs_root, tmp_path):
    out = tmp_path / "sweep"
    flags = sweep.checked_flags(["--data-root", str(signs_root), "--allow-unverified-data", "--no-download", "--device",
                                 "cpu", "--epochs", "1", "--iters-per-epoch", "2", "--batch-size", "8", "--num-k", "1"])
    [job] = sweep.expand_grid(["synsig:gtsrb"], ["mcd"], ["1"], flags)
    out.mkdir()
    sweep.save_jobs(out, [job])
    assert main_module.main(job.argv(out)) == 0  # what the job's worker runs (tests/test_sweep.py runs real workers)
    assert sweep.main(["table", str(out)]) == 0
    table = (out / "table.md").read_text()
    assert table.startswith("| method | synsig→gtsrb |") and "| mcd | " in table and "(n=1)" in table
    assert sweep.main(["table", str(out), "--validator", "val_im"]) == 0  # a label-free pick's row beside last
    assert "| mcd (val_im) | " in (out / "table.md").read_text()
