from __future__ import annotations


import torch

from models import Classifier, Generator, build_models


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_output_shapes():
    G, F1, F2 = build_models(torch.device("cpu"))
    features = G(torch.randn(4, 3, 32, 32))
    assert features.shape == (4, 3072)
    assert F1(features).shape == (4, 10) and F2(features).shape == (4, 10)


def test_parameter_counts_match_the_papers_svhn_network():
    conv = lambda cin, cout: cin * cout * 5 * 5 + cout  # noqa: E731  (5x5 kernel + bias)
    linear = lambda fin, fout: fin * fout + fout  # noqa: E731
    bn = lambda c: 2 * c  # noqa: E731  (weight + bias)
    expected_G = conv(3, 64) + bn(64) + conv(64, 64) + bn(64) + conv(64, 128) + bn(128) + linear(8192, 3072) + bn(3072)
    expected_F = linear(3072, 2048) + bn(2048) + linear(2048, 10)
    assert _count(Generator()) == expected_G == 25_487_808
    assert _count(Classifier()) == expected_F == 6_318_090


def test_heads_have_different_initialisations():
    _, F1, F2 = build_models(torch.device("cpu"))
    assert not torch.equal(F1.net[0].weight, F2.net[0].weight)


def test_dropout_only_in_training():
    G = Generator()
    x = torch.randn(4, 3, 32, 32)
    G.train()
    assert not torch.equal(G(x), G(x))  # fresh dropout masks
    G.eval()
    assert torch.equal(G(x), G(x))
    assert (G(x) >= 0).all()  # ReLU before dropout
