"""The paper's networks: a feature generator G and two classifier heads F1, F2.

- "svhn2mnist" (32x32 RGB, any pair with SVHN): the original code's model of that name.
- "usps" (28x28 grey, MNIST <-> USPS): the original code's smaller LeNet-style model of that name.
- "syn2gtrsb" (40x40 RGB, Synthetic Signs <-> GTSRB, 43 classes): the original code's model of that name.
All without the layers the original defined but never used. Default PyTorch initialisation; F1 and
F2 differ only by their random init.
"""

from __future__ import annotations

import torch
from torch import nn

from datasets import SIGN_CLASSES, SIGNS

FEATURE_DIM = 3072
NUM_CLASSES = 10  # digits; the traffic signs have SIGN_CLASSES (43)
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

    def __init__(self, dropout: float = 0.5):
        super().__init__()
        self.conv = nn.Sequential(
            *_conv_block(3, 64, pool=True),  # -> (B, 64, 16, 16)
            *_conv_block(64, 64, pool=True),  # -> (B, 64, 8, 8)
            *_conv_block(64, 128, pool=False),  # -> (B, 128, 8, 8)
            nn.Flatten(),  # -> (B, 8192)
        )
        self.fc = nn.Sequential(
            nn.Linear(128 * 8 * 8, FEATURE_DIM),
            nn.BatchNorm1d(FEATURE_DIM),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),  # active in training only: a fresh mask on every forward pass
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(x))


class Classifier(nn.Module):
    """F1 / F2: (B, 3072) features -> (B, 10) logits."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(FEATURE_DIM, 2048),
            nn.BatchNorm1d(2048),
            nn.ReLU(inplace=True),
            nn.Linear(2048, NUM_CLASSES),
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net(features)


class LeNetGenerator(nn.Module):
    """G of the MNIST <-> USPS setup: (B, 1, 28, 28) in [-1, 1] -> (B, 768) features."""

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
    """F1 / F2 of the MNIST <-> USPS setup: (B, 768) -> (B, 10), dropout 0.5 before each fc (training only)."""

    def __init__(self, dropout: float = 0.5):
        super().__init__()
        self.net = nn.Sequential(
            nn.Dropout(dropout),
            nn.Linear(48 * 4 * 4, 100),
            nn.BatchNorm1d(100),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(100, 100),
            nn.BatchNorm1d(100),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(100, NUM_CLASSES),
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net(features)


class SignsGenerator(nn.Module):
    """G of the traffic signs: (B, 3, 40, 40) in [-1, 1] -> (B, 6400) features."""

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
    """F1 / F2 of the traffic signs: (B, 6400) -> (B, 43), dropout 0.5 before the last fc (training only)."""

    def __init__(self, dropout: float = 0.5):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(256 * 5 * 5, 512),
            nn.BatchNorm1d(512),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(512, SIGN_CLASSES),
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net(features)


ARCHITECTURES = {"svhn2mnist": (Generator, Classifier), "usps": (LeNetGenerator, LeNetClassifier),
                 "syn2gtrsb": (SignsGenerator, SignsClassifier)}


def architecture_for(source: str, target: str) -> str:
    """The original code's choice: the signs network for Synthetic Signs <-> GTSRB, the SVHN network for any
    pair with SVHN, the LeNet-style one for MNIST <-> USPS."""
    if {source, target} & set(SIGNS):
        return "syn2gtrsb"
    return "svhn2mnist" if "svhn" in (source, target) else "usps"


def build_models(device: torch.device, architecture: str = "svhn2mnist", batchnorm_init: str = "ones"
                 ) -> tuple[nn.Module, nn.Module, nn.Module]:
    """G, F1, F2 on the device, initialised from the current torch seed. batchnorm_init "uniform" redraws
    every BatchNorm scale from U(0, 1) (shift 0) as PyTorch 0.2 did, which the original code ran on;
    PyTorch >= 1.0 starts at 1. The redraw comes after the default init, so every other weight is the
    same as with "ones" for the same seed: the two differ in the BatchNorm scales alone."""
    generator, classifier = ARCHITECTURES[architecture]
    models = generator().to(device), classifier().to(device), classifier().to(device)
    if batchnorm_init == "uniform":
        for module in (m for model in models for m in model.modules()):
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                nn.init.uniform_(module.weight, 0.0, 1.0)
                nn.init.zeros_(module.bias)
    return models
