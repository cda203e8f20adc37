"""Each dataset's reader: its files (fetched and checked by downloads.py) as uint8 tensors.

    DATA_ROOT/svhn/{train,test}_32x32.mat                         SVHN (torchvision's names)
    DATA_ROOT/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]
    DATA_ROOT/usps/usps.bz2, usps.t.bz2                           LIBSVM's bzip2 text, 16x16 in [-1, 1]
    DATA_ROOT/gtsrb/GTSRB/Training/000CC/*.ppm + GT-000CC.csv     GTSRB (torchvision's layout and zips)
    DATA_ROOT/gtsrb/GTSRB/Final_Test/Images/*.ppm, DATA_ROOT/gtsrb/GT-final_test.csv
    DATA_ROOT/synsig/synthetic_data/train_labelling.txt + images  Synthetic Signs (never downloaded)

Per dataset, `read_*(root, allow_unverified, size)` returns its train and test images as uint8 tensors with int64 labels, and the files they came
from (datasets.DOMAINS puts each pair in the dataset's record); what is wrong with a file is a
DataError whose one line says what to do. Sign images are decoded once, cropped to their region of
interest (GTSRB) and resized to `size` x `size` RGB (the network's input).
"""

from __future__ import annotations

import bz2
import csv
import hashlib
from pathlib import Path

import numpy as np
import torch

from downloads import (DataError, DataFile, SIGN_CLASSES, SVHN_FILES, SYNSIG_LIST, USPS_FILES,
                       gtsrb_files, mnist_file, single_file)

SYNSIG_TEST_SIZE, SYNSIG_TEST_SEED = 2000, 0  # held out of training; a fifth of a set under 10,000 images
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


def _read_idx(path: str, kind: str) -> torch.Tensor:
    """An IDX file (MNIST's format: a magic number, one big-endian int32 per dimension, then uint8 data)."""
    data = Path(path).read_bytes()
    if data[:4] != IDX_MAGIC[kind]:
        raise DataError(f"{path}: not an MNIST IDX {kind} file (magic number {data[:4].hex()}, expected "
                        f"{IDX_MAGIC[kind].hex()}); delete it and download it again")
    dimensions = 3 if kind == "images" else 1
    shape = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(dimensions))
    body = np.frombuffer(data, np.uint8, offset=min(len(data), 4 + 4 * dimensions))
    if body.size != int(np.prod(shape)):
        raise DataError(f"{path}: its header says {shape} but it holds {body.size} bytes of data; delete it and "
                        "download it again")
    return torch.from_numpy(body.reshape(shape).copy())


def _read_mnist(images_path: str, labels_path: str) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = _read_idx(images_path, "images"), _read_idx(labels_path, "labels").long()
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
            record = single_file(root / folder / filename, url, expected, allow_unverified)
            return (*read_file(record.path), [record])
        return _read_splits(split)
    return read


read_svhn = _one_file_per_split("svhn", SVHN_FILES, _read_svhn)  # 32x32 RGB (N, 3, 32, 32); label 10 = digit 0
read_usps = _one_file_per_split("usps", USPS_FILES, _read_usps)  # 16x16 grey (N, 16, 16); labels 1..10 = 0..9


def read_mnist(root: Path, allow_unverified: bool, size: int) -> tuple[Split, Split, list[DataFile]]:
    """MNIST, 28x28 grey (N, 28, 28): 60,000 training and 10,000 test images."""
    def split(name: str):
        prefix = "train" if name == "train" else "t10k"
        records = [mnist_file(root, f"{prefix}-{kind}", allow_unverified) for kind in ("images-idx3-ubyte", "labels-idx1-ubyte")]
        return (*_read_mnist(records[0].path, records[1].path), records)
    return _read_splits(split)


def read_gtsrb(root: Path, allow_unverified: bool, size: int) -> tuple[Split, Split, list[DataFile]]:
    """GTSRB, each sign cropped to its region and resized to size x size RGB."""
    def split(name: str):
        records = gtsrb_files(root, name, allow_unverified)
        return (*_read_gtsrb(root, name, size), records)
    return _read_splits(split)
