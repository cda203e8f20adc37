"""The data of a run: one record per dataset (DOMAINS, or a folder of the user's own images), a pair's
splits on the device as uint8, and the random index batches drawn from them.

A record says everything this project knows about a dataset: how its files are found and read
(dataset_files.py, downloads.py), its class names, whether it is in colour, and its default network. Pairs, image
formats and networks derive from the records: a pair shares its class names; every image is brought
to the run's network's input (models.NETWORKS: size, grey or RGB) once at load time, as the original
code did (MNIST resized 28 -> 32 and repeated to RGB beside SVHN; USPS 16 -> 28 beside MNIST). Every
image is scaled to [-1, 1] (ToTensor then Normalize(0.5, 0.5)) once per batch on the device.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from dataset_files import Split, held_out, read_gtsrb, read_mnist, read_svhn, read_synsig, read_usps, rgb_image
from downloads import (SIGN_CLASSES, DataError, DataFile, missing_gtsrb, missing_mnist, missing_svhn, missing_synsig,
                       missing_usps)
from models import NETWORKS


@dataclass(frozen=True)
class Domain:
    """One dataset's record."""

    name: str
    read: Callable[[Path, bool, int], tuple[Split, Split, list[DataFile]]]  # (root, allow_unverified, image size)
    missing: Callable[[Path], list[str]]  # its absent files, each with where it comes from
    classes: tuple[str, ...]  # class names; a label is an index into them
    channels: int  # 3: colour, 1: grey
    network: str  # models.NETWORKS: the default network when this dataset is the source
    downloadable: bool = True
    small_train_size: int | None = None  # --small-subsets: the paper's MNIST <-> USPS training subset
    original_schedule: dict | None = None  # --protocol original: the original code's epochs x iterations
    root: Path | None = None  # a folder of the user's own (its images live there, not under --data-root)


DIGITS = tuple("0123456789")
SIGNS = tuple(str(k) for k in range(SIGN_CLASSES))
# The original code on SVHN -> MNIST: an epoch ends at the first incomplete batch of its 55,000 MNIST images
# (55,000 // 128 = 429 iterations) and training stops once 20,000 iterations are counted: 47 epochs.
ORIGINAL_SVHN_SCHEDULE = {"epochs": 47, "iters_per_epoch": 429}
DOMAINS = {  # --source / --target NAME
    "svhn": Domain("svhn", read_svhn, missing_svhn, DIGITS, 3, "svhn2mnist", original_schedule=ORIGINAL_SVHN_SCHEDULE),
    "mnist": Domain("mnist", read_mnist, missing_mnist, DIGITS, 1, "usps", small_train_size=2000),
    "usps": Domain("usps", read_usps, missing_usps, DIGITS, 1, "usps", small_train_size=1800),
    "synsig": Domain("synsig", read_synsig, missing_synsig, SIGNS, 3, "syn2gtrsb", downloadable=False),
    "gtsrb": Domain("gtsrb", read_gtsrb, missing_gtsrb, SIGNS, 3, "syn2gtrsb"),
}
FOLDER = "folder:"  # --source folder:DIR: the user's own images, a subfolder per class
FOLDER_TEST_SHARE, FOLDER_TEST_SEED = 5, 0  # a fifth of a folder's images is held out as its test set


def domain(name: str) -> Domain:
    """The record of a --source / --target value: a dataset of DOMAINS, or folder:DIR."""
    if name.startswith(FOLDER):
        return folder_domain(Path(name[len(FOLDER):]))
    return DOMAINS[name]


def folder_domain(root: Path) -> Domain:
    """A folder of the user's own images in torchvision's ImageFolder layout (ROOT/CLASS/*.png, ...)."""
    from torchvision.datasets.folder import find_classes

    if not root.is_dir():
        raise DataError(f"{FOLDER}{root}: not a folder; give a folder with one subfolder of images per class")
    try:
        classes, _ = find_classes(str(root))
    except (FileNotFoundError, PermissionError) as error:  # no class subfolder
        raise DataError(f"{FOLDER}{root}: {error}; put each class's images in a subfolder named after the class") from None
    return Domain(f"{FOLDER}{root}", read_folder, lambda _: [], tuple(classes), 3, "svhn2mnist", downloadable=False,
                  root=root)


def default_network(source: str, target: str) -> str:
    """The source's network, or the target's when only the target is in colour (a grey network would drop
    its colour): MNIST -> SVHN trains the SVHN network, as every pair with SVHN did in the original code."""
    source_record, target_record = domain(source), domain(target)
    return target_record.network if target_record.channels > source_record.channels else source_record.network


def pair_error(source: str, target: str) -> str | None:
    """Why SOURCE -> TARGET is not a pair this project trains, or None: two different datasets that share
    their class names."""
    if source == target:
        return f"--source {source} --target {target}: choose two different datasets"
    source_classes, target_classes = set(domain(source).classes), set(domain(target).classes)
    if source_classes != target_classes:
        only = lambda a, b: ", ".join(sorted(a - b, key=lambda c: (len(c), c))[:5]) or "none"  # noqa: E731
        return (f"--source {source} --target {target}: a pair shares its classes, these do not (only in the source: "
                f"{only(source_classes, target_classes)}; only in the target: {only(target_classes, source_classes)})")
    return None


def free_memory_bytes() -> int | None:
    """The host memory available now (None where the system does not say)."""
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def read_folder(root: Path, allow_unverified: bool, size: int) -> tuple[Split, Split, list[DataFile]]:
    """Every image of an ImageFolder tree, decoded once as (N, 3, size, size) uint8 RGB; labels index the sorted
    class names. A seeded fifth is held out as the test set (recorded in the file's note); its labels
    are used only for the test accuracy when the folder is the target."""
    from torchvision.datasets.folder import IMG_EXTENSIONS, make_dataset

    where = f"{FOLDER}{root}"
    classes = folder_domain(root).classes
    try:
        samples = make_dataset(str(root), {name: k for k, name in enumerate(classes)}, IMG_EXTENSIONS)
    except FileNotFoundError as error:  # a class subfolder without images
        raise DataError(f"{where}: {error}".split("\n")[0] + "; put images in it or remove it") from None
    needed, free = len(samples) * 3 * size * size, free_memory_bytes()
    if free is not None and 2 * needed > free:  # decoded images, then their tensor
        raise DataError(f"{where}: {len(samples):,} images at 3x{size}x{size} need {2 * needed / 2**30:.1f} GiB while "
                        f"decoding, {free / 2**30:.1f} GiB are free; use fewer images or a network with a smaller "
                        "input (--network)")
    if len(samples) < FOLDER_TEST_SHARE:
        raise DataError(f"{where} holds {len(samples)} images: too few to hold a test set out; give at least "
                        f"{FOLDER_TEST_SHARE}")
    digest, pictures = hashlib.md5(), []
    for path, label in samples:
        pictures.append(rgb_image(Path(path), None, where, size, fix="replace or remove it"))
        digest.update(f"{os.path.relpath(path, root)} {label}".encode() + pictures[-1].tobytes())
    images, labels = torch.from_numpy(np.stack(pictures)), torch.tensor([label for _, label in samples])
    test = torch.from_numpy(held_out(len(samples), len(samples) // FOLDER_TEST_SHARE, FOLDER_TEST_SEED))
    note = f"{int(test.sum())} of {len(samples)} images held out as the test set (seed {FOLDER_TEST_SEED})"
    return (images[~test], labels[~test]), (images[test], labels[test]), [DataFile(str(root), digest.hexdigest(), False, note)]


@dataclass
class DigitsSplit:
    """A whole split on the training device: images uint8 (N, C, H, W), labels int64 (N,)."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return self.labels.shape[0]


@dataclass
class Digits:
    """A pair's source and target splits (digits, traffic signs or a user's images), their class names
    (the source's order) and the files they came from."""

    source_train: DigitsSplit
    source_test: DigitsSplit
    target_train: DigitsSplit
    target_test: DigitsSplit
    files: list[DataFile]
    classes: tuple[str, ...] = DIGITS


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


def to_format(images: torch.Tensor, channels: int, size: int) -> torch.Tensor:
    """(N, H, W) grey or (N, C, H, W) uint8 -> (N, channels, size, size) uint8: colour to grey as PIL's
    convert("L") (ITU-R 601 luma), bilinear resize as PIL's (antialiased when shrinking), grey repeated."""
    x = images[:, None] if images.ndim == 3 else images
    if x.shape[1] == 3 and channels == 1:
        luma = torch.tensor([0.299, 0.587, 0.114], device=x.device).view(1, 3, 1, 1)
        x = (x.float() * luma).sum(dim=1, keepdim=True).round_().to(torch.uint8)
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x.float(), size=size, mode="bilinear", align_corners=False, antialias=True)
        x = x.round_().clamp_(0, 255).to(torch.uint8)
    return x.expand(-1, channels, -1, -1).contiguous()


def _on_device(images: torch.Tensor, device: torch.device, where: str) -> torch.Tensor:
    if device.type == "cuda" and images.numel() > torch.cuda.mem_get_info(device)[0]:
        raise DataError(f"{where}: {len(images):,} images need {images.numel() / 2**30:.1f} GiB, more than the GPU has "
                        "free; use fewer images or a network with a smaller input (--network)")
    return images.to(device)


def _load_domain(record: Domain, root: Path, channels: int, size: int, allow_unverified: bool, device: torch.device
                 ) -> tuple[DigitsSplit, DigitsSplit, list[DataFile]]:
    """(train, test, files) of one dataset, in the network's image format, on the device."""
    train, test, files = record.read(record.root or root, allow_unverified, size)
    splits = [DigitsSplit(to_format(_on_device(images, device, record.name), channels, size), labels.to(device))
              for images, labels in (train, test)]
    return splits[0], splits[1], files


def _random_subset(split: DigitsSplit, size: int, seed: int) -> DigitsSplit:
    generator = torch.Generator().manual_seed(seed)
    index = torch.randperm(len(split), generator=generator)[:size].to(split.labels.device)
    return DigitsSplit(split.images[index], split.labels[index])


def load_digits(data_root: str | os.PathLike, download: bool, allow_unverified: bool, device: torch.device,
                source: str = "svhn", target: str = "mnist", network: str | None = None, small_subsets: bool = False,
                subset_seed: int = 0) -> Digits:
    """Load the source and target datasets in `network`'s image format (default: the pair's), downloading
    what is missing unless told not to. With small_subsets, training sets are random subsets of their
    record's size (MNIST 2,000 / USPS 1,800), drawn with subset_seed; test sets are always whole. Target
    labels are renumbered to the source's class order (by name)."""
    if pair_error(source, target):
        raise DataError(pair_error(source, target))
    root = Path(data_root)
    if root.exists() and not root.is_dir():
        raise DataError(f"--data-root {root} is not a directory; give the folder that holds svhn/, MNIST/ and usps/")
    if root.exists() and not os.access(root, os.R_OK | os.X_OK):
        raise DataError(f"--data-root {root} is not readable by this user; fix its permissions or choose another folder")
    records = domain(source), domain(target)
    for record in records:
        if record.missing(root) and not record.downloadable:
            raise DataError("; ".join(record.missing(root)))  # never downloaded: it has no download to offer
    missing = [line for record in records for line in record.missing(root)]
    if missing and not download:
        where = "missing dataset files" if root.exists() else f"--data-root {root} does not exist"
        raise DataError(f"{where} (--no-download): " + "; ".join(missing) + ". Download them there, or drop --no-download")

    spec = NETWORKS[network or default_network(source, target)]
    source_train, source_test, source_files = _load_domain(records[0], root, spec.channels, spec.size, allow_unverified, device)
    target_train, target_test, target_files = _load_domain(records[1], root, spec.channels, spec.size, allow_unverified, device)
    renumber = torch.tensor([records[0].classes.index(name) for name in records[1].classes], device=device)
    target_train.labels, target_test.labels = renumber[target_train.labels], renumber[target_test.labels]
    if small_subsets:
        source_train = _random_subset(source_train, records[0].small_train_size, subset_seed)
        target_train = _random_subset(target_train, records[1].small_train_size, subset_seed + 1)
    return Digits(source_train, source_test, target_train, target_test, source_files + target_files, records[0].classes)
