from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from algorithms import DISCREPANCIES, MCD, SourceOnly, discrepancy, random_directions, sliced_wasserstein_discrepancy
from config import Config
from datasets import BatchStream, DigitsSplit, load_digits, to_model_input
from iteration import EpochLosses, TrainStep

CPU = torch.device("cpu")
LENET = {"network": "usps"}  # the MNIST <-> USPS network: 1 x 28 x 28, dropout in both heads, fast on a CPU


def _batch(n: int = 8, seed: int = 0, shape: tuple[int, ...] = (1, 28, 28)) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, generator=g), torch.randint(0, 10, (n,), generator=g), torch.randn(n, *shape, generator=g)


def _params(module: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.parameters()]


def _same(before: list[torch.Tensor], module: torch.nn.Module) -> bool:
    return all(torch.equal(a, b) for a, b in zip(before, module.parameters()))


def _all_changed(before: list[torch.Tensor], module: torch.nn.Module) -> bool:
    return all(not torch.equal(a, b) for a, b in zip(before, module.parameters()))


@pytest.fixture()
def mcd() -> MCD:
    torch.manual_seed(0)
    model = MCD(Config(num_k=2, **LENET), 10, CPU, 1)
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
    model = MCD(Config(num_k=2, discrepancy="swd", swd_projections=16, **LENET), 10, CPU, 1)
    model.eval()  # same logits twice: only the directions can differ
    logits = model.heads(model.features(torch.randn(8, 1, 28, 28)))
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
    model = MCD(Config(lr=1e-3, **LENET), 10, CPU, 1)
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
    model = SourceOnly(Config(**LENET), 10, CPU, 1)
    assert set(model.update(*_batch())) == {"loss_source"}


def test_evaluate_scores_heads_and_ensemble_of_logits():
    torch.manual_seed(0)
    model = SourceOnly(Config(**LENET), 10, CPU, 1)
    g = torch.Generator().manual_seed(0)
    split = DigitsSplit(torch.randint(0, 256, (37, 1, 28, 28), generator=g, dtype=torch.uint8), torch.randint(0, 10, (37,), generator=g))
    f1, f2, ensemble = model.evaluate(split, chunk_size=10)  # chunks of 10, 10, 10, 7
    assert model.G.training and model.F1.training  # evaluation puts the model back in training mode
    model.eval()
    with torch.no_grad():
        l1, l2 = model.heads(model.G(to_model_input(split.images)))
    expect = lambda logits: 100.0 * (logits.argmax(1) == split.labels).sum().item() / 37  # noqa: E731
    assert (f1, f2, ensemble) == pytest.approx((expect(l1), expect(l2), expect(l1 + l2)))


def test_source_only_learning_is_real(digits_root):
    torch.manual_seed(0)
    data = load_digits(digits_root, download=False, allow_unverified=True, device=CPU, source="mnist", target="usps")
    config = Config(batch_size=32, cuda_graph=False, **LENET)  # the paper's lr and weight decay
    model = SourceOnly(config, 10, CPU, 1)
    model.train()
    _, _, before = model.evaluate(data.source_test, 512)
    step = TrainStep(model, data.source_train, data.target_train, config)
    source, target = BatchStream(len(data.source_train), 32, CPU, 0), BatchStream(len(data.target_train), 32, CPU, 1)
    losses = EpochLosses(CPU)
    for _ in range(30):
        losses.add(step(source.next(), target.next()))
    _, _, after = model.evaluate(data.source_test, 512)
    assert before < 30  # chance is 10%
    assert after > 60, f"source accuracy {after:.1f}% after 30 iterations"
    assert losses.means()["loss_source"] > 0


def test_epoch_losses_show_running_means_on_the_bar_and_sum_the_epoch():
    class Bar:
        disable = False
        postfix: dict = {}

        def set_postfix(self, values, refresh):
            self.postfix = values

    bar = Bar()
    losses = EpochLosses(CPU, bar, every=2)
    losses.add({"loss_source": torch.tensor(3.0)})  # iteration 1: the sum of 1 iteration is copied
    losses.add({"loss_source": torch.tensor(2.0)})  # the copy has landed: show 3.0 / 1
    assert bar.postfix == {"loss_source": "3.0000"}
    losses.add({"loss_source": torch.tensor(4.0)})  # iteration 3: the sum of 3 iterations is copied
    losses.add({"loss_source": torch.tensor(100.0)})  # after the copy: not in it
    assert bar.postfix == {"loss_source": "3.0000"}  # 9 / 3
    assert losses.means() == {"loss_source": pytest.approx(109.0 / 4)}
    bar.disable, bar.postfix = True, {}
    losses.add({"loss_source": torch.tensor(1.0)})
    assert bar.postfix == {}


class OriginalMCD:
    """One iteration as the original code (mil-tokyo/MCD_DA, classification/solver.py, train()) wrote it:
    three Adam optimisers (G, C1, C2), reset_grad() between steps, step B with the graph through G, step C
    back-propagating into the heads too (their gradients thrown away by the next reset_grad)."""

    def __init__(self, G, C1, C2, config: Config):
        adam = lambda module: torch.optim.Adam(module.parameters(), lr=config.lr, weight_decay=config.weight_decay)  # noqa: E731
        self.G, self.C1, self.C2, self.num_k = G, C1, C2, config.num_k
        self.opt_g, self.opt_c1, self.opt_c2 = adam(G), adam(C1), adam(C2)

    def reset_grad(self):
        for optimizer in (self.opt_g, self.opt_c1, self.opt_c2):
            optimizer.zero_grad()

    @staticmethod
    def discrepancy(out1, out2):
        return torch.mean(torch.abs(F.softmax(out1, dim=1) - F.softmax(out2, dim=1)))

    def iteration(self, img_s, label_s, img_t):
        criterion = torch.nn.CrossEntropyLoss()
        self.reset_grad()
        feat_s = self.G(img_s)
        loss_s = criterion(self.C1(feat_s), label_s) + criterion(self.C2(feat_s), label_s)
        loss_s.backward()
        self.opt_g.step(), self.opt_c1.step(), self.opt_c2.step()
        self.reset_grad()
        feat_s = self.G(img_s)
        output_s1, output_s2 = self.C1(feat_s), self.C2(feat_s)
        feat_t = self.G(img_t)
        output_t1, output_t2 = self.C1(feat_t), self.C2(feat_t)
        loss_dis_b = self.discrepancy(output_t1, output_t2)
        loss = criterion(output_s1, label_s) + criterion(output_s2, label_s) - loss_dis_b
        loss.backward()
        self.opt_c1.step(), self.opt_c2.step()
        self.reset_grad()
        for _ in range(self.num_k):
            feat_t = self.G(img_t)
            loss_dis = self.discrepancy(self.C1(feat_t), self.C2(feat_t))
            loss_dis.backward()
            self.opt_g.step()
            self.reset_grad()
        return loss_s.detach(), loss_dis_b.detach(), loss_dis.detach()


@pytest.mark.parametrize("network, shape", [("usps", (1, 28, 28)), pytest.param("svhn2mnist", (3, 32, 32), marks=pytest.mark.slow)])
def test_one_mcd_iteration_equals_the_original_codes_bit_for_bit(network, shape):
    """CPU, fp32: losses, every parameter, every BatchNorm buffer and the predictions, over two iterations
    (the second uses the Adam moments of the first)."""
    config = Config(network=network, num_k=2, batch_size=8)
    torch.manual_seed(0)
    ours = MCD(config, 10, CPU, 1)
    original = OriginalMCD(*(copy.deepcopy(m) for m in (ours.G, ours.F1, ours.F2)), config)
    ours.train()
    for seed in (1, 2):
        xs, ys, xt = _batch(8, seed, shape)
        torch.manual_seed(seed)
        losses = ours.update(xs, ys, xt)
        torch.manual_seed(seed)  # the same dropout masks, drawn in the same order
        loss_s, _, _ = original.iteration(xs, ys, xt)
        assert torch.equal(losses["loss_source"], loss_s)
    for mine, theirs in ((ours.G, original.G), (ours.F1, original.C1), (ours.F2, original.C2)):
        for (name, a), b in zip(mine.state_dict().items(), theirs.state_dict().values()):
            assert torch.equal(a, b), name  # parameters and BatchNorm running statistics
    ours.eval(), original.G.eval(), original.C1.eval(), original.C2.eval()
    with torch.no_grad():
        x = _batch(8, 3, shape)[2]
        assert torch.equal(ours.F1(ours.G(x)), original.C1(original.G(x)))


def test_every_discrepancy_of_the_registry_is_a_flag_choice_and_mcd_uses_it(monkeypatch):
    import main as main_module

    choices = next(action.choices for action in main_module.build_parser()._actions if action.dest == "discrepancy")
    assert tuple(choices) == tuple(DISCREPANCIES)
    called = []
    monkeypatch.setitem(DISCREPANCIES, "l1", lambda l1, l2, config, generator=None: called.append(1) or discrepancy(l1, l2))
    model = MCD(Config(num_k=1, **LENET), 10, CPU, 1)
    model.update(*_batch())
    assert len(called) == 2  # step B once, step C num_k times: no other d is computed
