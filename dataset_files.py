"""Each dataset's files: official URLs and MD5s, the checked download, and a reader per format.

    DATA_ROOT/svhn/{train,test}_32x32.mat                         SVHN (torchvision's names)
    DATA_ROOT/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]
    DATA_ROOT/usps/usps.bz2, usps.t.bz2                           LIBSVM's bzip2 text, 16x16 in [-1, 1]
    DATA_ROOT/gtsrb/GTSRB/Training/000CC/*.ppm + GT-000CC.csv     GTSRB (torchvision's layout and zips)
    DATA_ROOT/gtsrb/GTSRB/Final_Test/Images/*.ppm, DATA_ROOT/gtsrb/GT-final_test.csv
    DATA_ROOT/synsig/synthetic_data/train_labelling.txt + images  Synthetic Signs (never downloaded)

Per dataset, `missing_*(root)` names the absent downloadable files and `read_*(root, allow_unverified,
size)` returns its train and test images as uint8 tensors with int64 labels, and the files they came
from (datasets.DOMAINS puts each pair in the dataset's record); what is wrong with a file is a
DataError whose one line says what to do. Sign images are decoded once, cropped to their region of
interest (GTSRB) and resized to `size` x `size` RGB (the network's input).
"""

from __future__ import annotations

import bz2
import csv
import gzip
import hashlib
import os
import sys
import tempfile
import urllib.error
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torchvision.datasets import MNIST, SVHN, USPS
from torchvision.datasets.mnist import read_image_file, read_label_file
from torchvision.datasets.utils import calculate_md5, download_url, extract_archive

# Official URLs and MD5s, taken from torchvision so there is one source of truth.
# SVHN: split -> (url, filename, md5 of the .mat). MNIST: .gz filename -> md5, tried on each mirror.
SVHN_FILES: dict[str, tuple[str, str, str]] = {split: tuple(SVHN.split_list[split]) for split in ("train", "test")}
USPS_FILES: dict[str, tuple[str, str, str]] = {split: tuple(USPS.split_list[split]) for split in ("train", "test")}
MNIST_GZ_MD5: dict[str, str] = dict(MNIST.resources)
MNIST_MIRRORS: list[str] = list(MNIST.mirrors)
# GTSRB: torchvision.datasets.GTSRB.download's URL and archives (split -> (zip, md5, what it extracts)).
GTSRB_URL = "https://sid.erda.dk/public/archives/daaeac0d7ce1152aea9b61d9f1e19370/"
GTSRB_ARCHIVES: dict[str, list[tuple[str, str, str]]] = {
    "train": [("GTSRB-Training_fixed.zip", "513f3c79a4c5141765e10e952eaa2478", "GTSRB/Training")],
    "test": [("GTSRB_Final_Test_Images.zip", "c7e4e6327067d32654124b0fe9e82185", "GTSRB/Final_Test/Images"),
             ("GTSRB_Final_Test_GT.zip", "fe31e9c9270bbcd7b84b7f21a9d9d9e5", "GT-final_test.csv")],
}
SIGN_CLASSES = 43  # GTSRB's classes; Synthetic Signs render the same ones
SYNSIG_LIST = Path("synsig") / "synthetic_data" / "train_labelling.txt"
SYNSIG_TEST_SIZE, SYNSIG_TEST_SEED = 2000, 0  # held out of training; a fifth of a set under 10,000 images


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


def _download(url: str, destination: Path, md5: str) -> None:
    """torchvision's checksummed download (with progress), into a temp file renamed on success,
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


def _single_file(path: Path, url: str, expected: str, allow_unverified: bool) -> DataFile:
    """A dataset that is one file per split (SVHN's .mat, USPS's .bz2): downloaded if absent, then checked."""
    _fetch_if_absent(url, path, expected)
    md5 = calculate_md5(path)
    return DataFile(str(path), md5, _check_md5(path, md5, expected, allow_unverified))


def _mnist_file(root: Path, stem: str, allow_unverified: bool) -> DataFile:
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


def _missing_single_files(root: Path, folder: str, files: dict[str, tuple[str, str, str]]) -> list[str]:
    return [f"{root / folder / filename} (from {url})" for url, filename, _ in files.values()
            if not (root / folder / filename).exists()]


def missing_svhn(root: Path) -> list[str]:
    """Each absent SVHN file, with where it comes from and where it belongs (the same for each missing_*)."""
    return _missing_single_files(root, "svhn", SVHN_FILES)


def missing_usps(root: Path) -> list[str]:
    return _missing_single_files(root, "usps", USPS_FILES)


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


def _gtsrb_files(root: Path, split: str, allow_unverified: bool) -> list[DataFile]:
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


# ----------------------------------------------------------------------------------------------
# Reading


def _read_svhn(path: str) -> tuple[np.ndarray, np.ndarray]:
    import scipy.io  # torchvision's SVHN reads .mat files with scipy too

    try:
        mat = scipy.io.loadmat(path)
    except Exception as error:  # scipy raises several types for a damaged file
        raise DataError(f"{path} is not a readable SVHN .mat file ({error}); delete it and download it again")
    if "X" not in mat or "y" not in mat:
        raise DataError(f"{path} has no 'X' and 'y' arrays; it is not an SVHN file")
    images, labels = mat["X"], mat["y"].astype(np.int64).reshape(-1)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[:3] != (32, 32, 3):
        raise DataError(f"{path}: X must be uint8 (32, 32, 3, N), found {images.dtype} {images.shape}")
    if images.shape[3] != labels.shape[0]:
        raise DataError(f"{path}: {images.shape[3]} images but {labels.shape[0]} labels")
    if labels.size and (labels.min() < 1 or labels.max() > 10):
        raise DataError(f"{path}: labels must be 1..10, found {labels.min()}..{labels.max()}")
    labels[labels == 10] = 0
    return images.transpose(3, 2, 0, 1), labels  # (32, 32, 3, N) -> (N, 3, 32, 32)


IDX_MAGIC = {"images": b"\x00\x00\x08\x03", "labels": b"\x00\x00\x08\x01"}  # uint8 data, 3 or 1 dimensions


def _read_mnist(images_path: str, labels_path: str) -> tuple[torch.Tensor, torch.Tensor]:
    for kind, path in (("images", images_path), ("labels", labels_path)):
        with open(path, "rb") as file:
            magic = file.read(4)
        if magic != IDX_MAGIC[kind]:
            raise DataError(f"{path}: not an MNIST IDX {kind} file (magic number {magic.hex()}, expected "
                            f"{IDX_MAGIC[kind].hex()}); delete it and download it again")
    try:
        images, labels = read_image_file(images_path), read_label_file(labels_path)
    except Exception as error:  # torchvision's reader asserts on a bad header
        raise DataError(f"{images_path} / {labels_path}: not valid MNIST IDX files ({error!r}); delete and re-download")
    if images.shape[1:] != (28, 28) or images.shape[0] != labels.shape[0]:
        raise DataError(f"{images_path}: expected N x 28 x 28 images matching {labels.shape[0]} labels, found {tuple(images.shape)}")
    if labels.numel() and (labels.min() < 0 or labels.max() > 9):
        raise DataError(f"{labels_path}: labels must be 0..9")
    return images, labels


def _read_usps(path: str) -> tuple[torch.Tensor, torch.Tensor]:
    """LIBSVM text in bzip2: per line 'label 1:v1 ... 256:v256', v in [-1, 1] for a 16x16 image, label 1..10."""
    try:
        with bz2.open(path, "rt") as file:
            rows = [line.split() for line in file if line.strip()]
        labels = np.array([int(float(row[0])) for row in rows], dtype=np.int64)
        values = np.array([[float(item.split(":")[-1]) for item in row[1:]] for row in rows], dtype=np.float32)
    except (OSError, EOFError, ValueError, IndexError) as error:
        raise DataError(f"{path} is not a readable USPS .bz2 file ({error}); delete it and download it again")
    if values.ndim != 2 or values.shape[1] != 16 * 16:
        raise DataError(f"{path}: every USPS line must hold 256 pixel values (16 x 16)")
    if labels.size and (labels.min() < 1 or labels.max() > 10):
        raise DataError(f"{path}: labels must be 1..10, found {labels.min()}..{labels.max()}")
    images = np.round((values.clip(-1, 1) + 1) / 2 * 255).astype(np.uint8).reshape(-1, 16, 16)
    return torch.from_numpy(images), torch.from_numpy(labels - 1)


def rgb_image(path: Path, box: tuple[int, int, int, int] | None, where: str, size: int,
              fix: str = "restore it or delete the dataset to fetch it again") -> np.ndarray:
    """(3, size, size) uint8 of one image file: cropped to `box` (x1, y1, x2, y2; x2, y2 exclusive, PIL's
    convention) when given, then resized with PIL's bilinear filter (antialiased when shrinking)."""
    from PIL import Image, UnidentifiedImageError  # torchvision's own image library

    if not path.is_file():
        raise DataError(f"{path}, listed in {where}, does not exist; {fix}")
    try:
        with Image.open(path) as image:
            image = image.convert("RGB")
            if box is not None:
                x1, y1, x2, y2 = box
                if not (0 <= x1 < x2 <= image.width and 0 <= y1 < y2 <= image.height):
                    raise DataError(f"{where}: the region {box} is not inside the {image.width}x{image.height} image {path}")
                image = image.crop(box)
            if image.size != (size, size):
                image = image.resize((size, size), Image.Resampling.BILINEAR)
            return np.asarray(image, dtype=np.uint8).transpose(2, 0, 1)
    except (OSError, UnidentifiedImageError, SyntaxError) as error:
        raise DataError(f"{path} is not a readable image ({error}); {fix}")


def _sign_label(text: str, where: str) -> int:
    try:
        label = int(text)
    except ValueError:
        raise DataError(f"{where}: the class id {text!r} is not a whole number") from None
    if not 0 <= label < SIGN_CLASSES:
        raise DataError(f"{where}: class id {label} is outside 0..{SIGN_CLASSES - 1}")
    return label


def _stack(pictures: list[np.ndarray], size: int) -> np.ndarray:
    """(N, 3, size, size) uint8 of the sign images read, N = 0 included (the reader names the empty file)."""
    return np.stack(pictures) if pictures else np.zeros((0, 3, size, size), np.uint8)


GTSRB_COLUMNS = ("Filename", "Roi.X1", "Roi.Y1", "Roi.X2", "Roi.Y2", "ClassId")


def _read_gtsrb_csv(path: Path, images: Path, size: int) -> tuple[list[np.ndarray], list[int]]:
    """A GTSRB annotation file (';'-separated: Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId):
    each image cropped to its region and resized, with its class."""
    if not path.is_file():
        raise DataError(f"{path} does not exist; GTSRB's annotations belong there (delete {path.parent} to fetch it again)")
    pictures, labels = [], []
    try:
        with open(path, newline="", encoding="utf-8") as file:
            reader = csv.DictReader(file, delimiter=";", skipinitialspace=True)
            missing = [column for column in GTSRB_COLUMNS if column not in (reader.fieldnames or [])]
            if missing:
                raise DataError(f"{path}: not a GTSRB annotation file (missing columns: {', '.join(missing)})")
            for line, row in enumerate(reader, start=2):
                where = f"{path}, line {line}"
                try:
                    box = tuple(int(row[column]) for column in GTSRB_COLUMNS[1:5])
                except (TypeError, ValueError):
                    raise DataError(f"{where}: the region of interest is not four whole numbers") from None
                labels.append(_sign_label(row["ClassId"] or "", where))
                pictures.append(rgb_image(images / row["Filename"], box, where, size))
    except UnicodeDecodeError:
        raise DataError(f"{path} is not a text file (not UTF-8); restore GTSRB's annotation file") from None
    return pictures, labels


def _read_gtsrb(root: Path, split: str, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(N, 3, size, size) uint8 and (N,) labels of GTSRB's own split: 39,209 training, 12,630 test images."""
    base = root / "gtsrb"
    if split == "test":
        pictures, labels = _read_gtsrb_csv(base / "GT-final_test.csv", base / "GTSRB" / "Final_Test" / "Images", size)
    else:
        pictures, labels = [], []
        for folder in sorted(path for path in (base / "GTSRB" / "Training").iterdir() if path.is_dir()):
            more, classes = _read_gtsrb_csv(folder / f"GT-{folder.name}.csv", folder, size)
            pictures += more
            labels += classes
    return _stack(pictures, size), np.array(labels, np.int64)


def _read_synsig(root: Path, size: int) -> tuple[np.ndarray, np.ndarray, str]:
    """Every Synthetic Signs image as (N, 3, size, size) uint8, its labels, and an MD5 over the list and images."""
    listing = root / SYNSIG_LIST
    digest, pictures, labels = hashlib.md5(), [], []
    try:
        lines = listing.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise DataError(f"{listing} is not a text file (not UTF-8); restore the release's list of images") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where, fields = f"{listing}, line {number}", line.split()
        if len(fields) != 3:
            raise DataError(f"{where}: expected '<image path> <class id> <third field>', found {line.strip()!r}")
        labels.append(_sign_label(fields[1], where))
        pictures.append(rgb_image(listing.parent / fields[0], None, where, size))
        digest.update(line.encode() + pictures[-1].tobytes())
    return _stack(pictures, size), np.array(labels, np.int64), digest.hexdigest()


def held_out(count: int, size: int, seed: int) -> np.ndarray:
    """A boolean mask of `size` test images among `count`: the same seeded draw for every run."""
    mask = np.zeros(count, bool)
    mask[np.random.default_rng(seed).permutation(count)[:size]] = True
    return mask


Split = tuple[torch.Tensor, torch.Tensor]  # images uint8 (N, H, W) grey or (N, C, H, W), labels int64 (N,)


def _tensors(images, labels) -> Split:
    return tuple(x if isinstance(x, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(x)) for x in (images, labels))


def read_synsig(root: Path, allow_unverified: bool, size: int) -> tuple[Split, Split, list[DataFile]]:
    """One set: a seeded part of it (2,000 images, a fifth of a set under 10,000) is held out as the source test set."""
    images, labels, md5 = _read_synsig(root, size)
    test = held_out(len(labels), SYNSIG_TEST_SIZE if len(labels) >= 10_000 else len(labels) // 5, SYNSIG_TEST_SEED)
    if not test.any():
        raise DataError(f"{root / SYNSIG_LIST} lists {len(labels)} images: too few to hold a test set out; "
                        "give the whole release")
    note = f"{int(test.sum())} of {len(labels)} images held out as the test set (seed {SYNSIG_TEST_SEED})"
    files = [DataFile(str(root / SYNSIG_LIST.parent), md5, False, note)]  # no published checksum to compare with
    return _tensors(images[~test], labels[~test]), _tensors(images[test], labels[test]), files


def _read_splits(read_split) -> tuple[Split, Split, list[DataFile]]:
    """read_split("train" / "test") -> (images, labels, files): both splits, an empty one refused."""
    splits, files = [], []
    for split in ("train", "test"):
        images, labels, records = read_split(split)
        if len(labels) == 0:
            raise DataError(f"{records[0].path} holds no images; replace it with the official file "
                            "(delete it to download it again)")
        files += records
        splits.append(_tensors(images, labels))
    return splits[0], splits[1], files


def _one_file_per_split(folder: str, files: dict[str, tuple[str, str, str]], read_file):
    """The reader of a dataset kept as one official file per split (SVHN's .mat, USPS's .bz2)."""
    def read(root: Path, allow_unverified: bool, size: int) -> tuple[Split, Split, list[DataFile]]:
        def split(name: str):
            url, filename, expected = files[name]
            record = _single_file(root / folder / filename, url, expected, allow_unverified)
            return (*read_file(record.path), [record])
        return _read_splits(split)
    return read


read_svhn = _one_file_per_split("svhn", SVHN_FILES, _read_svhn)  # 32x32 RGB (N, 3, 32, 32); label 10 = digit 0
read_usps = _one_file_per_split("usps", USPS_FILES, _read_usps)  # 16x16 grey (N, 16, 16); labels 1..10 = 0..9


def read_mnist(root: Path, allow_unverified: bool, size: int) -> tuple[Split, Split, list[DataFile]]:
    """MNIST, 28x28 grey (N, 28, 28): 60,000 training and 10,000 test images."""
    def split(name: str):
        prefix = "train" if name == "train" else "t10k"
        records = [_mnist_file(root, f"{prefix}-{kind}", allow_unverified) for kind in ("images-idx3-ubyte", "labels-idx1-ubyte")]
        return (*_read_mnist(records[0].path, records[1].path), records)
    return _read_splits(split)


def read_gtsrb(root: Path, allow_unverified: bool, size: int) -> tuple[Split, Split, list[DataFile]]:
    """GTSRB, each sign cropped to its region and resized to size x size RGB."""
    def split(name: str):
        records = _gtsrb_files(root, name, allow_unverified)
        return (*_read_gtsrb(root, name, size), records)
    return _read_splits(split)
