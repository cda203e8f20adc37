from __future__ import annotations

import gzip
import shutil
import subprocess
import sys
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch

from conftest import ROOT
import downloads
import datasets
from datasets import BatchStream, DataError, load_digits, to_model_input

CPU = torch.device("cpu")


def _load(root: Path, **kwargs) -> datasets.Digits:
    options = dict(download=False, allow_unverified=True, device=CPU)
    options.update(kwargs)
    return load_digits(root, **options)


def test_shapes_dtypes_and_labels(fresh_root):
    root, labels = fresh_root
    data = _load(root)
    for split, name in ((data.source_train, "svhn_train"), (data.source_test, "svhn_test"),
                        (data.target_train, "mnist_train"), (data.target_test, "mnist_test")):
        assert split.images.dtype == torch.uint8 and split.labels.dtype == torch.int64
        assert split.images.shape == (len(labels[name]), 3, 32, 32)
        # SVHN stores digit 0 as label 10; it must come back as 0.
        assert split.labels.tolist() == labels[name].tolist()
    assert set(data.source_train.labels.tolist()) <= set(range(10))


def test_svhn_images_keep_their_pixels(fresh_root):
    root, _ = fresh_root
    X = scipy.io.loadmat(root / "svhn" / "test_32x32.mat")["X"]  # (32, 32, 3, N): H, W, C, N
    data = _load(root)
    assert torch.equal(data.source_test.images[5], torch.from_numpy(X[..., 5].transpose(2, 0, 1).copy()))


def test_mnist_resized_to_32_and_repeated_to_rgb(tmp_path):
    root = tmp_path / "data"
    from conftest import make_digits_root, write_idx

    make_digits_root(root)
    # A known image: left half 0, right half 255. Bilinear 28 -> 32 (pixel centres aligned, as PIL):
    # output column j samples input x = (j + 0.5) * 28 / 32 - 0.5, so columns 15 and 16 fall between
    # input columns 13 and 14 at fractions 0.0625 and 0.9375 -> 16 and 239 after rounding.
    image = np.zeros((1, 28, 28), np.uint8)
    image[:, :, 14:] = 255
    write_idx(root / "MNIST" / "raw" / "t10k-images-idx3-ubyte", image)
    write_idx(root / "MNIST" / "raw" / "t10k-labels-idx1-ubyte", np.array([3], np.uint8))
    out = _load(root).target_test.images[0]
    assert out.shape == (3, 32, 32)
    assert torch.equal(out[0], out[1]) and torch.equal(out[1], out[2])
    expected_row = [0] * 15 + [16, 239] + [255] * 15
    assert (out[0].int() == torch.tensor(expected_row)).all()


def test_model_input_range():
    images = torch.tensor([0, 128, 255], dtype=torch.uint8)
    x = to_model_input(images)
    assert x.dtype == torch.float32
    # ToTensor (x / 255) then Normalize(0.5, 0.5): 2x/255 - 1
    assert torch.allclose(x, torch.tensor([-1.0, 2 * 128 / 255 - 1, 1.0]), atol=1e-6)
    assert x[0] == -1.0 and x[2] == 1.0


def test_missing_files_no_download_names_each(tmp_path, capsys):
    with pytest.raises(DataError) as error:
        _load(tmp_path / "nowhere")
    message = str(error.value)
    assert "\n" not in message and "--no-download" in message
    for name in ("train_32x32.mat", "test_32x32.mat", "train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
                 "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        assert name in message
    assert "http://ufldl.stanford.edu/housenumbers/train_32x32.mat" in message
    assert str(tmp_path / "nowhere" / "svhn" / "train_32x32.mat") in message


def test_one_missing_file_is_the_only_one_named(fresh_root):
    root, _ = fresh_root
    (root / "svhn" / "test_32x32.mat").unlink()
    with pytest.raises(DataError, match="test_32x32.mat") as error:
        _load(root)
    assert "train_32x32.mat" not in str(error.value)


def test_checksum_mismatch_refused_without_flag(fresh_root):
    root, _ = fresh_root
    with pytest.raises(DataError) as error:
        _load(root, allow_unverified=False)
    message = str(error.value)
    actual = downloads.calculate_md5(root / "svhn" / "train_32x32.mat")
    assert "train_32x32.mat" in message and actual in message
    assert downloads.SVHN_FILES["train"][2] in message and "--allow-unverified-data" in message


def test_unverified_files_load_with_flag_and_warn(fresh_root, capsys):
    root, _ = fresh_root
    data = _load(root, allow_unverified=True)
    assert len(data.files) == 6 and not any(f.verified for f in data.files)
    assert capsys.readouterr().err.count("warning:") == 6
    for f in data.files:
        assert f.md5 == downloads.calculate_md5(f.path)


def test_official_urls_and_md5s_are_torchvisions():
    """downloads.py keeps torchvision's tables as text (its import costs every run ~1.6 s): they must agree."""
    from torchvision.datasets import MNIST, SVHN, USPS

    assert downloads.SVHN_FILES == {split: tuple(SVHN.split_list[split]) for split in ("train", "test")}
    assert downloads.USPS_FILES == {split: tuple(USPS.split_list[split]) for split in ("train", "test")}
    assert downloads.MNIST_GZ_MD5 == dict(MNIST.resources) and downloads.MNIST_MIRRORS == list(MNIST.mirrors)


def test_training_never_imports_torchvision():
    """A run reads its files without torchvision (imported only to download or read a folder)."""
    code = "import sys, main; sys.exit('torchvision' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == 0


def _pretend_official(monkeypatch, root: Path) -> None:
    """Make the fixture files 'the official release' by patching the expected MD5s to theirs."""
    svhn = {s: (url, name, downloads.calculate_md5(root / "svhn" / name)) for s, (url, name, _) in downloads.SVHN_FILES.items()}
    mnist = {gz: downloads.calculate_md5(root / "MNIST" / "raw" / gz) for gz in downloads.MNIST_GZ_MD5}
    for table, values in ((downloads.SVHN_FILES, svhn), (downloads.MNIST_GZ_MD5, mnist)):
        for key, value in values.items():  # in place: each dataset's record reads these tables
            monkeypatch.setitem(table, key, value)


def test_official_files_pass_without_flag(fresh_root, monkeypatch, capsys):
    root, _ = fresh_root
    _pretend_official(monkeypatch, root)
    data = _load(root, allow_unverified=False)
    assert all(f.verified for f in data.files)
    assert "warning" not in capsys.readouterr().err


def test_mnist_file_that_differs_from_its_gz_is_refused(fresh_root, monkeypatch):
    root, _ = fresh_root
    _pretend_official(monkeypatch, root)
    path = root / "MNIST" / "raw" / "t10k-labels-idx1-ubyte"
    data = bytearray(path.read_bytes())
    data[-1] = (data[-1] + 1) % 10
    path.write_bytes(bytes(data))
    with pytest.raises(DataError, match="differs from the contents of t10k-labels-idx1-ubyte.gz"):
        _load(root, allow_unverified=False)


def test_mnist_without_gz_cannot_be_verified(fresh_root, monkeypatch):
    root, _ = fresh_root
    _pretend_official(monkeypatch, root)
    (root / "MNIST" / "raw" / "train-images-idx3-ubyte.gz").unlink()
    with pytest.raises(DataError, match="cannot be verified"):
        _load(root, allow_unverified=False)
    assert len(_load(root).target_train) > 0  # with the flag it loads


def test_mnist_gz_alone_is_extracted(fresh_root):
    root, labels = fresh_root
    raw = root / "MNIST" / "raw" / "t10k-labels-idx1-ubyte"
    raw.unlink()
    data = _load(root)
    assert raw.exists() and data.target_test.labels.tolist() == labels["mnist_test"].tolist()


def test_corrupt_mat_is_a_clear_error(fresh_root):
    root, _ = fresh_root
    path = root / "svhn" / "train_32x32.mat"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(DataError, match="train_32x32.mat"):
        _load(root)


def test_svhn_label_outside_1_to_10_is_refused(fresh_root):
    root, _ = fresh_root
    path = root / "svhn" / "test_32x32.mat"
    mat = scipy.io.loadmat(path)
    mat["y"][0, 0] = 0
    scipy.io.savemat(path, {"X": mat["X"], "y": mat["y"]})
    with pytest.raises(DataError, match="labels must be 1..10"):
        _load(root)


def test_download_fetches_missing_files_into_torchvision_layout(fresh_root, tmp_path, monkeypatch):
    source, labels = fresh_root
    requested = []

    def fake_download_url(url, root, filename, md5):  # stands in for torchvision's network download
        requested.append(url)
        name = Path(url).name
        origin = source / ("svhn" if name.endswith(".mat") else "MNIST/raw") / name
        shutil.copy(origin, Path(root) / filename)

    monkeypatch.setattr(downloads, "download_url", fake_download_url)
    target = tmp_path / "fresh"
    data = _load(target, download=True)
    assert sorted(requested) == sorted(
        [url for url, _, _ in downloads.SVHN_FILES.values()] + [downloads.MNIST_MIRRORS[0] + gz for gz in downloads.MNIST_GZ_MD5]
    )
    assert (target / "svhn" / "train_32x32.mat").exists()
    assert (target / "MNIST" / "raw" / "train-images-idx3-ubyte").exists()
    assert not list(target.rglob("tmp*"))  # no temp leftovers
    assert data.target_train.labels.tolist() == labels["mnist_train"].tolist()


def test_download_failure_names_url_file_and_offline_route(tmp_path, monkeypatch):
    def offline(url, root, filename, md5):
        raise urllib.error.URLError("Temporary failure in name resolution")

    monkeypatch.setattr(downloads, "download_url", offline)
    with pytest.raises(DataError) as error:
        _load(tmp_path / "data", download=True)
    message = str(error.value)
    assert "http://ufldl.stanford.edu/housenumbers/train_32x32.mat" in message
    assert str(tmp_path / "data" / "svhn" / "train_32x32.mat") in message and "--no-download" in message
    assert not (tmp_path / "data" / "svhn" / "train_32x32.mat").exists()


def test_batch_stream_covers_each_pass_without_repeats():
    stream = BatchStream(10, 3, CPU, seed=0)
    first_pass = torch.cat([stream.next() for _ in range(3)])  # 9 of 10; the tail of 1 is dropped
    assert len(set(first_pass.tolist())) == 9 and first_pass.max() < 10
    second_pass = torch.cat([stream.next() for _ in range(3)])
    assert len(set(second_pass.tolist())) == 9
    assert not torch.equal(first_pass, second_pass)  # reshuffled
    again = BatchStream(10, 3, CPU, seed=0)
    assert torch.equal(again.next(), first_pass[:3])  # same seed, same order


def test_batch_larger_than_training_set_is_refused():
    with pytest.raises(DataError, match="--batch-size 20"):
        BatchStream(10, 20, CPU, seed=0)


def test_gz_fixture_matches_plain_file(digits_root):
    raw = digits_root / "MNIST" / "raw" / "train-labels-idx1-ubyte"
    assert gzip.decompress(raw.with_name(raw.name + ".gz").read_bytes()) == raw.read_bytes()


def test_corrupt_gz_is_a_clear_error(fresh_root):
    root, _ = fresh_root
    raw = root / "MNIST" / "raw" / "train-labels-idx1-ubyte"
    raw.unlink()
    raw.with_name(raw.name + ".gz").write_bytes(b"this is not gzip")
    with pytest.raises(DataError, match="train-labels-idx1-ubyte.gz is not a valid .gz file"):
        _load(root)


def test_wrong_idx_magic_is_a_clear_error(fresh_root):
    root, _ = fresh_root
    for path in (root / "MNIST" / "raw").glob("t10k-images-idx3-ubyte*"):
        path.unlink()
    (root / "MNIST" / "raw" / "t10k-images-idx3-ubyte").write_bytes(b"\x00\x00\x00\x00" + bytes(100))
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte"):
        _load(root)


def test_the_suite_cannot_reach_the_network():
    import urllib.request

    with pytest.raises(AssertionError, match="network"):
        urllib.request.urlopen("http://ufldl.stanford.edu/housenumbers/", timeout=1)
