from __future__ import annotations

import copy

import pytest
import torch

from models import Classifier, Generator, HeadPair, LeNetClassifier, build_models


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


def test_head_pair_computes_f1_and_f2_with_their_own_parameters_and_statistics():
    torch.manual_seed(0)
    f1, f2 = Classifier(), Classifier()
    pair = HeadPair(copy.deepcopy(f1), copy.deepcopy(f2))
    x = torch.randn(8, 3072, requires_grad=True)
    x_pair = x.detach().clone().requires_grad_(True)
    loss = lambda a, b: a.sum() + b.pow(2).sum()  # noqa: E731  (the heads weighted differently)
    separate = f1(x), f2(x)
    together = pair(x_pair, pair.stacked_weights(torch.float32))
    loss(*separate).backward()
    loss(*together).backward()
    for a, b in zip(separate, together):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)
    assert torch.allclose(x.grad, x_pair.grad, rtol=1e-5, atol=1e-6)
    for head, copied in ((f1, pair.f1), (f2, pair.f2)):
        for (name, p), q in zip(head.named_parameters(), copied.parameters()):
            assert torch.allclose(p.grad, q.grad, rtol=1e-5, atol=1e-6), name
        for name, buffer in head.named_buffers():
            assert torch.allclose(buffer.float(), copied.get_buffer(name).float()), name
    with pytest.raises(ValueError, match="SVHN network's heads"):
        HeadPair(LeNetClassifier(), LeNetClassifier())
