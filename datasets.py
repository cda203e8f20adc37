"""The data of a run: which pairs exist, their image format, the splits on the device as uint8, and the
random index batches drawn from them. Each dataset's files and readers are in dataset_files.py.

Preprocessing follows the original MCD code's setups. A pair with SVHN is 32x32 RGB: MNIST and USPS
are resized (bilinear) and grey is repeated to 3 channels. MNIST <-> USPS is 28x28 grey: USPS is
resized 16 -> 28. Synthetic Signs -> GTSRB is 40x40 RGB (GTSRB cropped to each sign's region first).
Every image is scaled to [-1, 1] (ToTensor then Normalize(0.5, 0.5)); SVHN's label 10 is the digit 0,
USPS's labels 1..10 are the digits 0..9. The resize happens once at load time, the scaling once per
batch on the device.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from dataset_files import SIGN_CLASSES, SIGN_SIZE, SYNSIG_LIST, DataError, DataFile, missing_files, read_domain, synsig_missing

DIGITS, SIGNS = ("svhn", "mnist", "usps"), ("synsig", "gtsrb")
DOMAINS = DIGITS + SIGNS
# The paper's default MNIST <-> USPS protocol draws random training subsets of these sizes.
SMALL_TRAIN_SIZES = {"mnist": 2000, "usps": 1800}




@dataclass(frozen=True)
class ImageFormat:
    """What every image of a run is turned into: size x size pixels, 1 (grey) or 3 (RGB) channels."""

    size: int
    channels: int


def image_format(source: str, target: str) -> ImageFormat:
    """The original code's setups: the traffic signs at 40x40 RGB, a pair with SVHN at SVHN's 32x32 RGB,
    MNIST <-> USPS at 28x28 grey."""
    if source in SIGNS:
        return ImageFormat(SIGN_SIZE, 3)
    return ImageFormat(32, 3) if "svhn" in (source, target) else ImageFormat(28, 1)


def num_classes(source: str) -> int:
    """43 traffic signs or 10 digits."""
    return SIGN_CLASSES if source in SIGNS else 10


def pair_error(source: str, target: str) -> str | None:
    """Why SOURCE -> TARGET is not a pair this project trains, or None: two different datasets of one kind."""
    if source == target or {source, target} - set(DOMAINS):
        return f"--source {source} --target {target}: choose two different datasets of {', '.join(DOMAINS)}"
    if (source in SIGNS) != (target in SIGNS):
        return (f"--source {source} --target {target}: digits ({', '.join(DIGITS)}) pair with digits, traffic "
                f"signs ({', '.join(SIGNS)}) with traffic signs")
    return None


@dataclass
class DigitsSplit:
    """A whole split on the training device: images uint8 (N, C, H, W), labels int64 (N,)."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return self.labels.shape[0]


@dataclass
class Digits:
    """Source and target splits (SVHN and MNIST by default; digits or traffic signs), plus the files they came from."""

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
    train, test, files = read_domain(domain, root, allow_unverified)
    splits = []
    for images, labels in (train, test):
        images = images.to(device)
        if images.ndim == 3:  # grey digits: resized to the pair's size, repeated to its channels
            images = to_format(images, fmt)
        splits.append(DigitsSplit(images, labels.to(device)))
    return splits[0], splits[1], files


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
    if pair_error(source, target):
        raise DataError(pair_error(source, target))
    root = Path(data_root)
    if root.exists() and not root.is_dir():
        raise DataError(f"--data-root {root} is not a directory; give the folder that holds svhn/, MNIST/ and usps/")
    if root.exists() and not os.access(root, os.R_OK | os.X_OK):
        raise DataError(f"--data-root {root} is not readable by this user; fix its permissions or choose another folder")
    if "synsig" in (source, target) and not (root / SYNSIG_LIST).is_file():
        raise DataError(synsig_missing(root))  # never downloaded: it has no download to offer
    missing = missing_files(root, (source, target))
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
