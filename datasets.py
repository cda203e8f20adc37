"""SVHN, MNIST and USPS for MCD: torchvision's files, URLs and checksums; data held on the device as uint8.

Layout under the data root (torchvision's own file names):
    DATA_ROOT/svhn/{train,test}_32x32.mat
    DATA_ROOT/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]
    DATA_ROOT/usps/usps.bz2, usps.t.bz2          (LIBSVM's bzip2 text files, 16x16 in [-1, 1])

Preprocessing follows the original MCD code's two setups. A pair with SVHN is 32x32 RGB: MNIST and
USPS are resized (bilinear) and grey is repeated to 3 channels. MNIST <-> USPS is 28x28 grey: USPS is
resized 16 -> 28. Every image is scaled to [-1, 1] (ToTensor then Normalize(0.5, 0.5)); SVHN's label
10 is the digit 0, USPS's labels 1..10 are the digits 0..9. The resize happens once at load time,
the scaling once per batch on the device.
"""

from __future__ import annotations

import bz2
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
import torch.nn.functional as F
from torchvision.datasets import MNIST, SVHN, USPS
from torchvision.datasets.mnist import read_image_file, read_label_file
from torchvision.datasets.utils import calculate_md5, download_url, extract_archive

# Official URLs and MD5s, taken from torchvision so there is one source of truth.
# SVHN: split -> (url, filename, md5 of the .mat). MNIST: .gz filename -> md5, tried on each mirror.
SVHN_FILES: dict[str, tuple[str, str, str]] = {split: tuple(SVHN.split_list[split]) for split in ("train", "test")}
USPS_FILES: dict[str, tuple[str, str, str]] = {split: tuple(USPS.split_list[split]) for split in ("train", "test")}
MNIST_GZ_MD5: dict[str, str] = dict(MNIST.resources)
MNIST_MIRRORS: list[str] = list(MNIST.mirrors)

DOMAINS = ("svhn", "mnist", "usps")
# The paper's default MNIST <-> USPS protocol draws random training subsets of these sizes.
SMALL_TRAIN_SIZES = {"mnist": 2000, "usps": 1800}


@dataclass(frozen=True)
class ImageFormat:
    """What every image of a run is turned into: size x size pixels, 1 (grey) or 3 (RGB) channels."""

    size: int
    channels: int


def image_format(source: str, target: str) -> ImageFormat:
    """The paper's setups: a pair with SVHN at SVHN's 32x32 RGB; MNIST <-> USPS at 28x28 grey."""
    return ImageFormat(32, 3) if "svhn" in (source, target) else ImageFormat(28, 1)


class DataError(Exception):
    """A dataset problem the user can fix; the message is one line that says what to do."""


@dataclass(frozen=True)
class DataFile:
    """One file that was loaded, for the results record."""

    path: str
    md5: str
    verified: bool  # byte-identical to the official release


@dataclass
class DigitsSplit:
    """A whole split on the training device: images uint8 (N, C, H, W), labels int64 (N,)."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return self.labels.shape[0]


@dataclass
class Digits:
    """Source and target splits (SVHN and MNIST by default), plus the files they came from."""

    source_train: DigitsSplit
    source_test: DigitsSplit
    target_train: DigitsSplit
    target_test: DigitsSplit
    files: list[DataFile]


def to_model_input(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float32 [-1, 1]; the same as ToTensor + Normalize(mean=0.5, std=0.5)."""
    return images.float().div_(127.5).sub_(1.0)


class BatchStream:
    """An endless stream of random index batches over a split, drawn on the device.

    Each pass is a fresh permutation (sampling without replacement); the incomplete tail of a pass is
    dropped so every batch has the same size. Source and target use two independent streams.
    """

    def __init__(self, size: int, batch_size: int, device: torch.device, seed: int):
        if batch_size > size:
            raise DataError(f"--batch-size {batch_size} is larger than a training set of {size} images; lower it")
        self.size, self.batch_size = size, batch_size
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self.device = device
        self._reshuffle()

    def _reshuffle(self) -> None:
        self.order = torch.randperm(self.size, device=self.device, generator=self.generator)
        self.position = 0

    def next(self) -> torch.Tensor:
        if self.position + self.batch_size > self.size:
            self._reshuffle()
        indices = self.order[self.position : self.position + self.batch_size]
        self.position += self.batch_size
        return indices

    def state_dict(self) -> dict:
        """Where the stream is: its generator, the current pass's order and the position in it."""
        return {"generator": self.generator.get_state(), "order": self.order.cpu(), "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self.order = state["order"].to(self.device)
        self.position = state["position"]


# ----------------------------------------------------------------------------------------------
# Checking and downloading


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def _md5_bytes(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


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


def _single_file(path: Path, url: str, expected: str, allow_unverified: bool) -> DataFile:
    """A dataset that is one file per split (SVHN's .mat, USPS's .bz2): downloaded if absent, then checked."""
    if not path.exists():
        try:
            _download(url, path, expected)
        except (urllib.error.URLError, OSError, RuntimeError) as error:
            raise _download_error(url, path, error) from error
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
                contents_md5 = _md5_bytes(compressed.read())
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


def _missing_files(root: Path, domains: tuple[str, ...]) -> list[str]:
    """Each file of these domains that is absent, with where it comes from and where it belongs."""
    missing = []
    for domain, files in (("svhn", SVHN_FILES), ("usps", USPS_FILES)):
        if domain in domains:
            missing += [f"{root / domain / filename} (from {url})" for url, filename, _ in files.values()
                        if not (root / domain / filename).exists()]
    if "mnist" in domains:
        for gz_name in MNIST_GZ_MD5:
            gz = root / "MNIST" / "raw" / gz_name
            if not gz.exists() and not gz.with_suffix("").exists():
                missing.append(f"{gz} (from {MNIST_MIRRORS[0]}{gz_name})")
    return missing


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


def to_format(images: torch.Tensor, fmt: ImageFormat) -> torch.Tensor:
    """(N, H, W) uint8 grey -> (N, C, size, size) uint8: bilinear resize as PIL's (antialiased when shrinking),
    grey repeated to C channels."""
    x = images[:, None]
    if images.shape[-1] != fmt.size:
        x = F.interpolate(x.float(), size=fmt.size, mode="bilinear", align_corners=False, antialias=True)
        x = x.round_().clamp_(0, 255).to(torch.uint8)
    return x.expand(-1, fmt.channels, -1, -1).contiguous()


def _load_domain(domain: str, root: Path, fmt: ImageFormat, allow_unverified: bool, device: torch.device
                 ) -> tuple[DigitsSplit, DigitsSplit, list[DataFile]]:
    """(train, test, files) of one dataset, in the run's image format, on the device."""
    splits, files = {}, []
    for split in ("train", "test"):
        if domain == "svhn":
            url, filename, expected = SVHN_FILES[split]
            record = _single_file(root / "svhn" / filename, url, expected, allow_unverified)
            images, labels = _read_svhn(record.path)
            images, labels = torch.from_numpy(np.ascontiguousarray(images)), torch.from_numpy(labels)
            records = [record]
        elif domain == "usps":
            url, filename, expected = USPS_FILES[split]
            records = [_single_file(root / "usps" / filename, url, expected, allow_unverified)]
            images, labels = _read_usps(records[0].path)
        else:
            prefix = "train" if split == "train" else "t10k"
            records = [_mnist_file(root, f"{prefix}-{kind}", allow_unverified) for kind in ("images-idx3-ubyte", "labels-idx1-ubyte")]
            images, labels = _read_mnist(records[0].path, records[1].path)
        files += records
        if len(labels) == 0:
            raise DataError(f"{records[0].path} holds no images; replace it with the official file "
                            "(delete it to download it again)")
        if domain != "svhn":  # SVHN is always used as it comes: 32x32 RGB
            images = to_format(images.to(device), fmt)
        splits[split] = DigitsSplit(images.to(device), labels.to(device))
    return splits["train"], splits["test"], files


def _random_subset(split: DigitsSplit, size: int, seed: int) -> DigitsSplit:
    generator = torch.Generator().manual_seed(seed)
    index = torch.randperm(len(split), generator=generator)[:size].to(split.labels.device)
    return DigitsSplit(split.images[index], split.labels[index])


def load_digits(
    data_root: str | os.PathLike,
    download: bool,
    allow_unverified: bool,
    device: torch.device,
    source: str = "svhn",
    target: str = "mnist",
    small_subsets: bool = False,
    subset_seed: int = 0,
) -> Digits:
    """Load the source and target datasets, downloading what is missing unless told not to. With
    small_subsets, MNIST and USPS training sets are random subsets of the paper's sizes (2,000 / 1,800),
    drawn with subset_seed; test sets are always whole."""
    if source == target or {source, target} - set(DOMAINS):
        raise DataError(f"--source {source} --target {target}: choose two different datasets of {', '.join(DOMAINS)}")
    root = Path(data_root)
    if root.exists() and not root.is_dir():
        raise DataError(f"--data-root {root} is not a directory; give the folder that holds svhn/, MNIST/ and usps/")
    if root.exists() and not os.access(root, os.R_OK | os.X_OK):
        raise DataError(f"--data-root {root} is not readable by this user; fix its permissions or choose another folder")
    missing = _missing_files(root, (source, target))
    if missing and not download:
        where = "missing dataset files" if root.exists() else f"--data-root {root} does not exist"
        raise DataError(f"{where} (--no-download): " + "; ".join(missing) + ". Download them there, or drop --no-download")

    fmt = image_format(source, target)
    source_train, source_test, source_files = _load_domain(source, root, fmt, allow_unverified, device)
    target_train, target_test, target_files = _load_domain(target, root, fmt, allow_unverified, device)
    if small_subsets:
        if source in SMALL_TRAIN_SIZES:
            source_train = _random_subset(source_train, SMALL_TRAIN_SIZES[source], subset_seed)
        if target in SMALL_TRAIN_SIZES:
            target_train = _random_subset(target_train, SMALL_TRAIN_SIZES[target], subset_seed + 1)
    return Digits(source_train, source_test, target_train, target_test, source_files + target_files)
