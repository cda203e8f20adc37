"""The paper's SVHN->MNIST network: a feature generator G and two classifier heads F1, F2.

Architecture of the original code's "svhn2mnist" model, without the layers it defined but never used.
Default PyTorch initialisation; F1 and F2 differ only by their random init.
"""

from __future__ import annotations

import torch
from torch import nn

FEATURE_DIM = 3072
NUM_CLASSES = 10


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


def build_models(device: torch.device) -> tuple[Generator, Classifier, Classifier]:
    """G, F1, F2 on the device, initialised from the current torch seed."""
    return Generator().to(device), Classifier().to(device), Classifier().to(device)
