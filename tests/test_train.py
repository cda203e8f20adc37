from __future__ import annotations

import numpy as np
import pytest
import torch

import benchmark
from datasets import BatchStream, DigitsSplit, load_digits, to_model_input
from algorithms import MCD, SourceOnly, discrepancy, random_directions, sliced_wasserstein_discrepancy
from config import Config
from iteration import Lane, LiveLosses, LossTally, TrainStep
from train import train_epoch

CPU = torch.device("cpu")


def _batch(n: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g), torch.randn(n, 3, 32, 32, generator=g)


def _params(module: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.parameters()]


def _same(before: list[torch.Tensor], module: torch.nn.Module) -> bool:
    return all(torch.equal(a, b) for a, b in zip(before, module.parameters()))


def _all_changed(before: list[torch.Tensor], module: torch.nn.Module) -> bool:
    return all(not torch.equal(a, b) for a, b in zip(before, module.parameters()))


@pytest.fixture()
def mcd() -> MCD:
    torch.manual_seed(0)
    model = MCD(Config(num_k=2), CPU, 1)
    model.train()
    return model


def test_discrepancy_matches_hand_computation():
    p1 = np.array([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]])
    p2 = np.array([[0.5, 0.5, 0.5], [2.0, 1.0, 0.0]])
    softmax = lambda z: np.exp(z) / np.exp(z).sum(1, keepdims=True)  # noqa: E731
    expected = np.abs(softmax(p1) - softmax(p2)).sum() / p1.size  # mean over batch AND classes
    got = discrepancy(torch.tensor(p1, dtype=torch.float16), torch.tensor(p2))
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(expected, abs=1e-3)
    assert discrepancy(torch.tensor(p1), torch.tensor(p2)).item() == pytest.approx(expected, rel=1e-6)
    assert discrepancy(torch.tensor(p1), torch.tensor(p1)).item() == 0.0


def test_sliced_wasserstein_matches_hand_computation():
    p1 = np.array([[2.0, 0.0, -1.0], [0.5, 0.5, 0.5], [-1.0, 3.0, 0.0]])
    p2 = np.array([[0.0, 1.0, 0.0], [1.0, -2.0, 2.0], [0.3, 0.1, 0.2]])
    directions = np.array([[1.0, 0.0], [0.0, 0.6], [0.0, 0.8]])  # two unit columns
    softmax = lambda z: np.exp(z) / np.exp(z).sum(1, keepdims=True)  # noqa: E731
    sorted1 = np.sort(softmax(p1) @ directions, axis=0)  # sort each projection over the batch
    sorted2 = np.sort(softmax(p2) @ directions, axis=0)
    expected = ((sorted1 - sorted2) ** 2).mean()
    got = sliced_wasserstein_discrepancy(torch.tensor(p1), torch.tensor(p2), torch.tensor(directions, dtype=torch.float32))
    assert got.item() == pytest.approx(expected, rel=1e-5)
    # Unlike L1, SWD compares distributions: the same outputs in another order are no discrepancy.
    shuffled = torch.tensor(p1[[2, 0, 1]])
    assert sliced_wasserstein_discrepancy(torch.tensor(p1), shuffled, torch.tensor(directions, dtype=torch.float32)).item() < 1e-12


def test_sliced_wasserstein_is_zero_for_identical_inputs_and_differentiable():
    torch.manual_seed(0)
    logits1, logits2 = torch.randn(16, 10, requires_grad=True), torch.randn(16, 10, requires_grad=True)
    directions = random_directions(10, 128, CPU)
    assert directions.shape == (10, 128) and torch.allclose(directions.norm(dim=0), torch.ones(128))
    assert sliced_wasserstein_discrepancy(logits1, logits1, directions).item() == 0.0
    d = sliced_wasserstein_discrepancy(logits1, logits2, directions)
    d.backward()
    assert d.item() > 0 and logits1.grad.abs().sum() > 0 and torch.isfinite(logits2.grad).all()


def test_mcd_with_swd_draws_fresh_directions_and_runs_the_three_steps():
    torch.manual_seed(0)
    model = MCD(Config(num_k=2, discrepancy="swd", swd_projections=16), CPU, 1)
    model.eval()  # same logits twice: only the directions can differ
    logits = model.heads(model.features(torch.randn(8, 3, 32, 32)))
    assert model.discrepancy(logits).item() != model.discrepancy(logits).item()
    model.train()
    G0, F10 = _params(model.G), _params(model.F1)
    losses = model.update(*_batch())
    assert set(losses) == {"loss_source", "discrepancy_b", "discrepancy_c"}
    assert not _same(G0, model.G) and not _same(F10, model.F1)


def test_step_a_trains_G_and_both_heads(mcd):
    xs, ys, _ = _batch()
    G0, F10, F20 = _params(mcd.G), _params(mcd.F1), _params(mcd.F2)
    loss = mcd.step_a(xs, ys)
    assert loss.shape == () and not loss.requires_grad
    assert _all_changed(G0, mcd.G) and _all_changed(F10, mcd.F1) and _all_changed(F20, mcd.F2)


def test_step_b_changes_heads_only(mcd):
    xs, ys, xt = _batch()
    G0, F10, F20 = _params(mcd.G), _params(mcd.F1), _params(mcd.F2)
    d = mcd.step_b(xs, ys, xt)
    assert _same(G0, mcd.G)  # bit-identical: G is fixed in step B
    assert _all_changed(F10, mcd.F1) and _all_changed(F20, mcd.F2)
    assert all(p.grad is None for p in mcd.G.parameters())  # nothing was back-propagated into G
    assert d.item() > 0


def test_step_b_maximises_the_discrepancy():
    # With a source batch the heads already fit, step B's gradient must push d up, not down.
    torch.manual_seed(1)
    model = MCD(Config(lr=1e-3), CPU, 1)
    model.eval()  # deterministic forward passes, so d before/after is comparable
    xs, ys, xt = _batch(16, seed=3)
    features_t = model.G(xt).detach()
    before = discrepancy(*model.heads(features_t)).item()
    for _ in range(5):
        model.step_b(xs, ys, xt)
    after = discrepancy(*model.heads(features_t)).item()
    assert after > before


def test_step_c_changes_G_only_and_minimises(mcd):
    xs, ys, xt = _batch()
    mcd.step_b(xs, ys, xt)
    G0, F10, F20 = _params(mcd.G), _params(mcd.F1), _params(mcd.F2)
    d = mcd.step_c(xt)
    assert _same(F10, mcd.F1) and _same(F20, mcd.F2)  # bit-identical: heads fixed in step C
    assert not _same(G0, mcd.G)
    assert all(p.requires_grad for p in mcd.F1.parameters())  # freezing is undone afterwards
    assert d.shape == ()


def test_step_c_runs_num_k_generator_updates(mcd, monkeypatch):
    calls = []
    original = mcd.opt_g.step
    monkeypatch.setattr(mcd.opt_g, "step", lambda *a, **k: calls.append(1) or original(*a, **k))
    mcd.step_c(_batch()[2])
    assert len(calls) == 2  # num_k = 2 in the fixture


def test_update_returns_on_device_losses(mcd):
    losses = mcd.update(*_batch())
    assert set(losses) == {"loss_source", "discrepancy_b", "discrepancy_c"}
    assert all(isinstance(v, torch.Tensor) and v.shape == () for v in losses.values())


def test_source_only_is_step_a_alone():
    torch.manual_seed(0)
    model = SourceOnly(Config(), CPU, 1)
    assert set(model.update(*_batch())) == {"loss_source"}


def test_evaluate_scores_heads_and_ensemble_of_logits():
    torch.manual_seed(0)
    model = SourceOnly(Config(), CPU, 1)
    g = torch.Generator().manual_seed(0)
    split = DigitsSplit(torch.randint(0, 256, (37, 3, 32, 32), generator=g, dtype=torch.uint8), torch.randint(0, 10, (37,), generator=g))
    f1, f2, ensemble = model.evaluate(split, chunk_size=10)  # chunks of 10, 10, 10, 7
    assert model.G.training and model.F1.training  # evaluation puts the model back in training mode
    model.eval()
    with torch.no_grad():
        l1, l2 = model.heads(model.G(to_model_input(split.images)))
    expect = lambda logits: 100.0 * (logits.argmax(1) == split.labels).sum().item() / 37  # noqa: E731
    assert (f1, f2, ensemble) == pytest.approx((expect(l1), expect(l2), expect(l1 + l2)))


def test_source_only_learning_is_real(digits_root):
    torch.manual_seed(0)
    data = load_digits(digits_root, download=False, allow_unverified=True, device=CPU)
    model = SourceOnly(Config(batch_size=32), CPU, 1)  # the paper's lr and weight decay
    model.train()
    _, _, before = model.evaluate(data.source_test, 512)
    streams = (BatchStream(len(data.source_train), 32, CPU, 0), BatchStream(len(data.target_train), 32, CPU, 1))
    run = benchmark.TimedRun(TrainStep(model, data.source_train, data.target_train), streams, Lane(CPU))
    [losses] = train_epoch([run], iterations=30, desc="learning")
    _, _, after = model.evaluate(data.source_test, 512)
    assert before < 30  # chance is 10%
    assert after > 60, f"source accuracy {after:.1f}% after 30 iterations"
    assert losses["loss_source"] > 0


def test_live_losses_show_running_means_on_the_bar():
    class Bar:
        disable = False
        postfix: dict = {}

        def set_postfix(self, values, refresh):
            self.postfix = values

    bar = Bar()
    live = LiveLosses(bar, every=2)
    tally = LossTally(CPU)
    tally.add({"loss_source": torch.tensor(3.0)})
    live.update(0, tally)  # step 0: copy the sum of 1 step
    tally.add({"loss_source": torch.tensor(2.0)})
    live.update(1, tally)  # the copy has landed: show 3.0 / 1
    assert bar.postfix == {"loss_source": "3.0000"}
    tally.add({"loss_source": torch.tensor(4.0)})
    live.update(2, tally)  # step 2: copy the sum of 3 steps
    tally.add({"loss_source": torch.tensor(100.0)})  # after the copy: not in it
    live.update(3, tally)
    assert bar.postfix == {"loss_source": "3.0000"}  # 9 / 3
    bar.disable, bar.postfix = True, {}
    live.update(4, tally)
    live.update(5, tally)
    assert bar.postfix == {}
