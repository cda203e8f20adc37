"""The method contract (algorithms.py): every method trains, checkpoints and resumes through the same
code; DANN's gradient reversal and schedule; settings declared once; the loop's depth."""

from __future__ import annotations

import inspect
import math
import signal
from dataclasses import asdict, fields, replace
from pathlib import Path

import pytest
import torch

import algorithms
import main as main_module
import run_control
from algorithms import ALGORITHMS, DANN, GradientReversal
from checkpoint import ResumeError, load_checkpoint
from config import Config, result_settings
from conftest import LENET, read_rows, train_args
from results import csv_columns
from run_control import Interrupted, check_resumable

CPU = torch.device("cpu")
ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("method", list(ALGORITHMS))
def test_every_method_follows_the_contract(method):
    torch.manual_seed(0)
    config = Config(method=method, batch_size=8, num_k=1, source="mnist", target="usps", network="usps")
    model = ALGORITHMS[method](config, 10, CPU, 10)
    assert isinstance(model, torch.nn.Module) and model.optimizers
    model.train()
    g = torch.Generator().manual_seed(0)
    xs, xt = torch.randn(8, 1, 28, 28, generator=g), torch.randn(8, 1, 28, 28, generator=g)
    ys = torch.randint(0, 10, (8,), generator=g)
    before = {name: value.clone() for name, value in model.state_dict().items()}
    losses = model.update(xs, ys, xt)
    assert set(losses) <= set(model.LOSSES) and "loss_source" in losses
    assert all(v.dim() == 0 and v.device == CPU and torch.isfinite(v) and not v.requires_grad for v in losses.values())
    changed = {name.split(".")[0] for name, value in model.state_dict().items() if not torch.equal(value, before[name])}
    assert {"G", "F1", "F2"} <= changed  # every network the method owns is trained
    # Every optimised parameter belongs to the state_dict that checkpoints save.
    saved = {id(p) for p in model.parameters()}
    assert all(id(p) in saved for opt in model.optimizers.values() for group in opt.param_groups for p in group["params"])


def test_gradient_reversal_is_the_identity_forward_and_minus_strength_backward():
    x = torch.randn(4, 3, requires_grad=True)
    strength = torch.tensor(0.25)
    y = GradientReversal.apply(x, strength)
    assert torch.equal(y, x)
    y.sum().backward()
    assert torch.equal(x.grad, torch.full((4, 3), -0.25))


def test_dann_follows_the_papers_schedule_and_reverses_the_domain_gradient_into_G(monkeypatch):
    torch.manual_seed(0)
    model = DANN(Config(method="dann", batch_size=8, source="mnist", target="usps", network="usps"), 10, CPU,
                 total_iterations=4)
    model.train()
    strengths = []
    real_apply = GradientReversal.apply
    monkeypatch.setattr(GradientReversal, "apply", lambda x, s: strengths.append(float(s)) or real_apply(x, s))
    x = torch.randn(8, 1, 28, 28)
    for _ in range(5):
        model.update(x, torch.zeros(8, dtype=torch.long), x + 1)
    expected = [2 / (1 + math.exp(-10 * min(i / 4, 1.0))) - 1 for i in range(5)]  # p = iterations done / total
    assert strengths == pytest.approx(expected, rel=1e-6) and strengths[0] == 0.0
    assert int(model.iterations_done) == 5 and "iterations_done" in model.state_dict()


def test_dann_trains_resumes_and_writes_its_own_loss_columns(digits_root, tmp_path, monkeypatch):
    straight, resumed = tmp_path / "straight.csv", tmp_path / "resumed.csv"
    flags = ("--method", "dann", "--deterministic", *LENET)
    assert main_module.main(train_args(digits_root, straight, *flags, epochs=3)) == 0
    real_save_epoch = run_control.RunFiles.save_epoch

    def stop_after_epoch_2(run, row, *args):  # a SIGTERM as epoch 2 is saved
        real_save_epoch(run, row, *args)
        if run.epoch == 2:
            raise Interrupted(signal.SIGTERM)

    monkeypatch.setattr(run_control.RunFiles, "save_epoch", stop_after_epoch_2)
    assert main_module.main(train_args(digits_root, resumed, *flags, epochs=3)) == 143
    monkeypatch.undo()
    assert main_module.main(train_args(digits_root, resumed, *flags, "--resume", epochs=3)) == 0
    assert list(read_rows(straight)[0]) == list(csv_columns(DANN.LOSSES))
    without_time = lambda rows: [{k: v for k, v in row.items() if k != "seconds"} for row in rows]  # noqa: E731
    assert without_time(read_rows(straight)) == without_time(read_rows(resumed))  # the schedule's state resumed too
    assert all(row["loss_domain"] for row in read_rows(straight))
    assert {key.split(".")[0] for key in load_checkpoint(straight.with_suffix(".pt"))["models"]} >= {"D", "iterations_done"}


def test_a_loss_the_method_does_not_declare_is_refused_not_dropped(digits_root, tmp_path, monkeypatch):
    real_update = algorithms.MCD.update
    monkeypatch.setattr(algorithms.MCD, "update", lambda self, xs, ys, xt: {**real_update(self, xs, ys, xt),
                                                                            "loss_new": torch.zeros(())})
    with pytest.raises(ValueError, match="loss_new"):
        main_module.main(train_args(digits_root, tmp_path / "r.csv", *LENET, epochs=1))


def test_every_result_setting_is_compared_on_resume(tmp_path):
    # No second list: every setting declared with result=True refuses a checkpoint made with another value.
    config = Config()
    declared = {f.name for f in fields(Config) if f.metadata["result"]}
    assert set(result_settings()) == declared and {"lr", "num_k", "method", "seed", "precision"} <= declared
    for name in result_settings():
        saved = {**asdict(config), name: "something else"}
        with pytest.raises(ResumeError, match=name):
            check_resumable({"config": saved, "epoch": 1}, config, tmp_path / "r.pt")
    check_resumable({"config": asdict(replace(config, epochs=99, csv="elsewhere.csv")), "epoch": 1}, config,
                    tmp_path / "r.pt")  # settings that do not change results may differ


def test_the_docs_flag_table_is_the_parsers():
    table = main_module.flag_table()
    assert table in (ROOT / "docs" / "settings.md").read_text(), \
        "docs/settings.md is stale: paste python -c 'import main; print(main.flag_table())' into it"
    for setting in fields(Config):
        if setting.metadata["flag"] != "":  # "": resolve() sets it, there is no flag
            assert f"`{main_module.flag_name(setting)}`" in table


def test_main_reaches_step_b_in_at_most_four_calls(digits_root, tmp_path, monkeypatch):
    depths = []
    real_step_b = algorithms.MCD.step_b

    def step_b(self, *args):
        frames = [frame.function for frame in inspect.stack()]
        depths.append(frames.index("main") if "main" in frames else None)
        return real_step_b(self, *args)

    monkeypatch.setattr(algorithms.MCD, "step_b", step_b)
    assert main_module.main(train_args(digits_root, tmp_path / "r.csv", *LENET, epochs=1, iters=1)) == 0
    # main.main -> train.train -> TrainStep.__call__ -> MCD.update -> MCD.step_b
    assert depths and depths[0] <= 4
