"""Each dataset's official files: where they come from, their MD5s, the checked download of a missing one.

Per dataset, `missing_*(root)` names the absent downloadable files (datasets.DOMAINS tells the user where
each belongs); the readers in dataset_files.py call `single_file`, `mnist_file` and `gtsrb_files`,
which download what is absent and check each file against its official MD5: a file that differs is a
DataError whose one line says what to do, unless --allow-unverified-data lets it through with a warning.
torchvision's downloader is imported only when a file is missing.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import sys
import tempfile
import urllib.error
from dataclasses import dataclass
from pathlib import Path

# Official URLs and MD5s, as torchvision's dataset classes hold them (a test checks that they agree; read from
# there, every run would pay torchvision's import, ~1.6 s).
# SVHN, USPS: split -> (url, filename, md5 of the file). MNIST: .gz filename -> md5, tried on each mirror.
SVHN_FILES: dict[str, tuple[str, str, str]] = {
    "train": ("http://ufldl.stanford.edu/housenumbers/train_32x32.mat", "train_32x32.mat", "e26dedcc434d2e4c54c9b2d4a06d8373"),
    "test": ("http://ufldl.stanford.edu/housenumbers/test_32x32.mat", "test_32x32.mat", "eb5a983be6a315427106f1b164d9cef3"),
}
USPS_FILES: dict[str, tuple[str, str, str]] = {
    "train": ("https://www.csie.ntu.edu.tw/~cjlin/libsvmtools/datasets/multiclass/usps.bz2", "usps.bz2",
              "ec16c51db3855ca6c91edd34d0e9b197"),
    "test": ("https://www.csie.ntu.edu.tw/~cjlin/libsvmtools/datasets/multiclass/usps.t.bz2", "usps.t.bz2",
             "8ea070ee2aca1ac39742fdd1ef5ed118"),
}
MNIST_GZ_MD5: dict[str, str] = {
    "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873", "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3", "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
}
MNIST_MIRRORS: list[str] = ["https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/"]
# GTSRB: torchvision.datasets.GTSRB.download's URL and archives (split -> (zip, md5, what it extracts)).
GTSRB_URL = "https://sid.erda.dk/public/archives/daaeac0d7ce1152aea9b61d9f1e19370/"
GTSRB_ARCHIVES: dict[str, list[tuple[str, str, str]]] = {
    "train": [("GTSRB-Training_fixed.zip", "513f3c79a4c5141765e10e952eaa2478", "GTSRB/Training")],
    "test": [("GTSRB_Final_Test_Images.zip", "c7e4e6327067d32654124b0fe9e82185", "GTSRB/Final_Test/Images"),
             ("GTSRB_Final_Test_GT.zip", "fe31e9c9270bbcd7b84b7f21a9d9d9e5", "GT-final_test.csv")],
}
SIGN_CLASSES = 43  # GTSRB's classes; Synthetic Signs render the same ones
SYNSIG_LIST = Path("synsig") / "synthetic_data" / "train_labelling.txt"


class DataError(Exception):
    """A dataset problem the user can fix; the message is one line that says what to do."""


@dataclass(frozen=True)
class DataFile:
    """One file (or folder) that was loaded, for the results record."""

    path: str
    md5: str
    verified: bool  # byte-identical to the official release
    note: str = ""  # how a test split was drawn from it, where the release has none


# ----------------------------------------------------------------------------------------------
# Checking and downloading


def _warn(message: str, said: set[str] = set()) -> None:  # noqa: B006 (the set is the process's memory)
    if message not in said:  # once per process: the seeds of a run read the same files again
        said.add(message)
        print(f"warning: {message}", file=sys.stderr)


def calculate_md5(path: Path | str) -> str:
    with open(path, "rb") as file:
        return hashlib.file_digest(file, "md5").hexdigest()


def download_url(url: str, folder: str, filename: str, md5: str) -> None:
    """torchvision's checksummed download (with progress), imported only when a file is missing."""
    from torchvision.datasets import utils

    utils.download_url(url, folder, filename, md5)


def extract_archive(archive: str, folder: str) -> None:
    """torchvision's extraction (.gz, .zip), imported only when a file is missing."""
    from torchvision.datasets import utils

    utils.extract_archive(archive, folder)


def _download(url: str, destination: Path, md5: str) -> None:
    """download_url into a temp file renamed on success,
    so an interrupted download never leaves a half file where a dataset file belongs."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=destination.parent) as tmp:
        download_url(url, tmp, destination.name, md5)
        os.replace(Path(tmp) / destination.name, destination)


def _download_error(url: str, destination: Path, error: Exception) -> DataError:
    return DataError(
        f"could not download {url} to {destination} ({error}); without network, copy the file there "
        f"by hand from another machine and rerun with --no-download"
    )


def _unverified(message: str, fix: str, allow_unverified: bool) -> bool:
    """Refuse a file that is not the official one, saying what to do; or, when allowed, warn and go on.
    Returns False: the file is not verified."""
    if not allow_unverified:
        raise DataError(f"{message}; {fix}, or pass --allow-unverified-data to use it as it is")
    _warn(f"{message}; using it anyway (--allow-unverified-data)")
    return False


def _check_md5(path: Path, md5: str, expected: str, allow_unverified: bool) -> bool:
    """True if the file is byte-identical to the official release."""
    message = f"{path} is not the official release (md5 {md5}, expected {expected})"
    return md5 == expected or _unverified(message, "delete it to download it again", allow_unverified)


def _fetch_if_absent(url: str, path: Path, expected: str) -> None:
    """The official file at `path`, downloaded when it is not there; a failed download is one DataError."""
    if not path.exists():
        try:
            _download(url, path, expected)
        except (urllib.error.URLError, OSError, RuntimeError) as error:
            raise _download_error(url, path, error) from error


def single_file(path: Path, url: str, expected: str, allow_unverified: bool) -> DataFile:
    """A dataset that is one file per split (SVHN's .mat, USPS's .bz2): downloaded if absent, then checked."""
    _fetch_if_absent(url, path, expected)
    md5 = calculate_md5(path)
    return DataFile(str(path), md5, _check_md5(path, md5, expected, allow_unverified))


def mnist_file(root: Path, stem: str, allow_unverified: bool) -> DataFile:
    """The uncompressed IDX file; verified through the official .gz it was extracted from."""
    raw_dir = root / "MNIST" / "raw"
    path, gz = raw_dir / stem, raw_dir / f"{stem}.gz"
    expected = MNIST_GZ_MD5[gz.name]
    if not path.exists() and not gz.exists():
        urls = [mirror + gz.name for mirror in MNIST_MIRRORS]
        for url in urls:  # torchvision's mirrors, in its order
            try:
                _download(url, gz, expected)
                break
            except (urllib.error.URLError, OSError, RuntimeError) as error:
                last_error = error
        else:
            raise _download_error(" or ".join(urls), gz, last_error)
    try:
        if not path.exists():
            extract_archive(str(gz), str(raw_dir))
        contents_md5 = None
        if gz.exists():
            with gzip.open(gz, "rb") as compressed:
                contents_md5 = hashlib.md5(compressed.read()).hexdigest()
    except (OSError, EOFError) as error:
        raise DataError(f"{gz} is not a valid .gz file ({error}); delete it to download it again") from error

    md5 = calculate_md5(path)
    if contents_md5 is None:
        message = f"{path} cannot be verified: its official release {gz.name} (md5 {expected}) is not beside it"
        return DataFile(str(path), md5, _unverified(message, "put that file there", allow_unverified))
    verified = _check_md5(gz, calculate_md5(gz), expected, allow_unverified)
    if contents_md5 != md5:
        message = f"{path} differs from the contents of {gz.name} beside it"
        verified = _unverified(message, f"delete {path.name} to extract it again", allow_unverified)
    return DataFile(str(path), md5, verified)


def _missingsingle_files(root: Path, folder: str, files: dict[str, tuple[str, str, str]]) -> list[str]:
    return [f"{root / folder / filename} (from {url})" for url, filename, _ in files.values()
            if not (root / folder / filename).exists()]


def missing_svhn(root: Path) -> list[str]:
    """Each absent SVHN file, with where it comes from and where it belongs (the same for each missing_*)."""
    return _missingsingle_files(root, "svhn", SVHN_FILES)


def missing_usps(root: Path) -> list[str]:
    return _missingsingle_files(root, "usps", USPS_FILES)


def missing_mnist(root: Path) -> list[str]:
    raw = root / "MNIST" / "raw"
    return [f"{raw / gz} (from {MNIST_MIRRORS[0]}{gz})" for gz in MNIST_GZ_MD5
            if not (raw / gz).exists() and not (raw / gz).with_suffix("").exists()]


def missing_gtsrb(root: Path) -> list[str]:
    return [f"{root / 'gtsrb' / name} (from {GTSRB_URL}{name}, extracted there)"
            for archives in GTSRB_ARCHIVES.values() for name, _, extracts in archives
            if not (root / "gtsrb" / extracts).exists() and not (root / "gtsrb" / name).exists()]


def missing_synsig(root: Path) -> list[str]:
    """Synthetic Signs cannot be downloaded: what to do when they are not where they belong."""
    if (root / SYNSIG_LIST).is_file():
        return []
    return [f"Synthetic Signs are not in {root / SYNSIG_LIST.parent}: this dataset (Moiseev et al. 2013, ~100,000 "
            f"rendered traffic signs of GTSRB's 43 classes) cannot be downloaded from its original page; put its "
            f"release there, {SYNSIG_LIST.name} (one line per image: '<image path relative to synthetic_data> "
            "<class id 0..42> <third field>') with the images beside it (docs/table1.md#data)"]


def gtsrb_files(root: Path, split: str, allow_unverified: bool) -> list[DataFile]:
    """GTSRB's archives of a split: downloaded and extracted if absent, each checked against its MD5. An
    extracted folder without its archive beside it cannot be verified."""
    records = []
    for name, expected, extracts in GTSRB_ARCHIVES[split]:
        archive, folder = root / "gtsrb" / name, root / "gtsrb"
        if not (folder / extracts).exists():
            _fetch_if_absent(GTSRB_URL + name, archive, expected)
            try:
                extract_archive(str(archive), str(folder))
            except Exception as error:  # zipfile raises several types for a damaged archive
                raise DataError(f"{archive} is not a readable zip archive ({error}); delete it to download it again")
        if archive.exists():
            md5 = calculate_md5(archive)
            records.append(DataFile(str(archive), md5, _check_md5(archive, md5, expected, allow_unverified)))
        else:
            message = f"{folder / extracts} cannot be verified: its official archive {name} (md5 {expected}) is not beside it"
            records.append(DataFile(str(folder / extracts), "", _unverified(message, "put that file there",
                                                                             allow_unverified)))
    return records
