"""The paper's networks: a feature generator G and two classifier heads F1, F2, in one table (NETWORKS).

- "svhn2mnist" (32x32 RGB): the original code's model of that name, for SVHN <-> MNIST.
- "usps" (28x28 grey): the original code's smaller LeNet-style model of that name, for MNIST <-> USPS.
- "syn2gtrsb" (40x40 RGB): the original code's model of that name, for Synthetic Signs -> GTSRB.
All without the layers the original defined but never used. Each network says what it takes (its input
channels and size: every image of a run is brought to it) and gives (G's feature size; the heads are
built for the run's class count). Default PyTorch initialisation; F1 and F2 differ only by their init.
"""

from __future__ import annotations

import torch
from torch import nn

from dataclasses import dataclass

BATCHNORM_INITS = ("ones", "uniform")


def _conv_block(in_channels: int, out_channels: int, pool: bool) -> list[nn.Module]:
    layers: list[nn.Module] = [
        nn.Conv2d(in_channels, out_channels, kernel_size=5, stride=1, padding=2),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    ]
    if pool:
        layers.append(nn.MaxPool2d(kernel_size=3, stride=2, padding=1))
    return layers


class Generator(nn.Module):
    """G: (B, 3, 32, 32) images in [-1, 1] -> (B, 3072) features."""

    features = 3072

    def __init__(self, dropout: float = 0.5):
        super().__init__()
        self.conv = nn.Sequential(
            *_conv_block(3, 64, pool=True),  # -> (B, 64, 16, 16)
            *_conv_block(64, 64, pool=True),  # -> (B, 64, 8, 8)
            *_conv_block(64, 128, pool=False),  # -> (B, 128, 8, 8)
            nn.Flatten(),  # -> (B, 8192)
        )
        self.fc = nn.Sequential(
            nn.Linear(128 * 8 * 8, self.features),
            nn.BatchNorm1d(self.features),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),  # active in training only: a fresh mask on every forward pass
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(x))


class Classifier(nn.Module):
    """F1 / F2: (B, 3072) features -> (B, classes) logits (10 digits in the paper)."""

    def __init__(self, classes: int = 10):
        super().__init__()
        self.classes = classes
        self.net = nn.Sequential(
            nn.Linear(Generator.features, 2048),
            nn.BatchNorm1d(2048),
            nn.ReLU(inplace=True),
            nn.Linear(2048, classes),
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net(features)


class LeNetGenerator(nn.Module):
    """G of the MNIST <-> USPS setup: (B, 1, 28, 28) in [-1, 1] -> (B, 768) features."""

    features = 48 * 4 * 4

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, 32, kernel_size=5),  # -> (B, 32, 24, 24)
            nn.BatchNorm2d(32),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=2, stride=2),  # -> (B, 32, 12, 12)
            nn.Conv2d(32, 48, kernel_size=5),  # -> (B, 48, 8, 8)
            nn.BatchNorm2d(48),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=2, stride=2),  # -> (B, 48, 4, 4)
            nn.Flatten(),  # -> (B, 768)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class LeNetClassifier(nn.Module):
    """F1 / F2 of the MNIST <-> USPS setup: (B, 768) -> (B, classes), dropout 0.5 before each fc (training only)."""

    def __init__(self, classes: int = 10, dropout: float = 0.5):
        super().__init__()
        self.classes = classes
        self.net = nn.Sequential(
            nn.Dropout(dropout),
            nn.Linear(LeNetGenerator.features, 100),
            nn.BatchNorm1d(100),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(100, 100),
            nn.BatchNorm1d(100),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(100, classes),
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net(features)


class SignsGenerator(nn.Module):
    """G of the traffic signs: (B, 3, 40, 40) in [-1, 1] -> (B, 6400) features."""

    features = 256 * 5 * 5

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(3, 96, kernel_size=5, padding=2),  # -> (B, 96, 40, 40)
            nn.BatchNorm2d(96),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=2, stride=2),  # -> (B, 96, 20, 20)
            nn.Conv2d(96, 144, kernel_size=3, padding=1),  # -> (B, 144, 20, 20)
            nn.BatchNorm2d(144),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=2, stride=2),  # -> (B, 144, 10, 10)
            nn.Conv2d(144, 256, kernel_size=5, padding=2),  # -> (B, 256, 10, 10)
            nn.BatchNorm2d(256),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=2, stride=2),  # -> (B, 256, 5, 5)
            nn.Flatten(),  # -> (B, 6400)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class SignsClassifier(nn.Module):
    """F1 / F2 of the traffic signs: (B, 6400) -> (B, classes), 43 in GTSRB; dropout 0.5 before the last fc
    (training only)."""

    def __init__(self, classes: int = 43, dropout: float = 0.5):
        super().__init__()
        self.classes = classes
        self.net = nn.Sequential(
            nn.Linear(SignsGenerator.features, 512),
            nn.BatchNorm1d(512),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(512, classes),
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net(features)


@dataclass(frozen=True)
class Network:
    """A generator and its heads, and the images G takes: `channels` x `size` x `size`."""

    generator: type[nn.Module]
    classifier: type[nn.Module]
    channels: int
    size: int


NETWORKS = {  # --network NAME; a dataset's record names its default (dataset_files.DOMAINS)
    "svhn2mnist": Network(Generator, Classifier, channels=3, size=32),
    "usps": Network(LeNetGenerator, LeNetClassifier, channels=1, size=28),
    "syn2gtrsb": Network(SignsGenerator, SignsClassifier, channels=3, size=40),
}


def build_models(device: torch.device, network: str = "svhn2mnist", classes: int = 10, batchnorm_init: str = "ones"
                 ) -> tuple[nn.Module, nn.Module, nn.Module]:
    """G, F1, F2 of NETWORKS[network] for `classes` classes, on the device, initialised from the current torch
    seed. batchnorm_init "uniform" redraws every BatchNorm scale from U(0, 1) (shift 0) as PyTorch 0.2 did,
    which the original code ran on; PyTorch >= 1.0 starts at 1. The redraw comes after the default init, so
    every other weight is the same as with "ones" for the same seed: the two differ in the BatchNorm scales alone."""
    spec = NETWORKS[network]
    models = spec.generator().to(device), spec.classifier(classes).to(device), spec.classifier(classes).to(device)
    if batchnorm_init == "uniform":
        for module in (m for model in models for m in model.modules()):
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                nn.init.uniform_(module.weight, 0.0, 1.0)
                nn.init.zeros_(module.bias)
    return models
