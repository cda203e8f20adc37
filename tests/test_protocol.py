"""--protocol original: the original code's BatchNorm init, precision and schedule; flags override it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

import main as main_module
from config import Config
from datasets import ORIGINAL_SVHN_SCHEDULE
from conftest import LENET, train_args
from models import build_models

CPU = torch.device("cpu")


def _config(*argv: str) -> Config:
    parser = main_module.build_parser()
    return main_module.build_config(parser.parse_args(["--device", "cpu", *argv]), parser)


def _batchnorms(models) -> list[nn.Module]:
    return [m for model in models for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@pytest.mark.parametrize("architecture", ["svhn2mnist", "usps"])
def test_original_batchnorm_scales_are_uniform_in_0_1_and_the_default_ones(architecture):
    torch.manual_seed(0)
    original = build_models(CPU, architecture, 10, "uniform")
    torch.manual_seed(0)
    default = build_models(CPU, architecture, 10, "ones")
    norms = _batchnorms(original)
    assert len(norms) == 6  # SVHN network: G 4, each head 1; LeNet: G 2, each head 2
    for norm in norms:
        assert ((norm.weight >= 0) & (norm.weight < 1)).all() and not torch.equal(norm.weight, torch.ones_like(norm.weight))
        assert torch.equal(norm.bias, torch.zeros_like(norm.bias))
        assert norm.weight.std() > 0.2  # spread over [0, 1), as U(0, 1) (std 0.289), not a constant
    for norm in _batchnorms(default):
        assert torch.equal(norm.weight, torch.ones_like(norm.weight))
    # Only the BatchNorm scales differ: every other weight is the same for the same seed.
    for a, b in zip(original, default):
        for (name, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
            if not any(name.startswith(prefix) for prefix, m in a.named_modules() if prefix and
                       isinstance(m, nn.modules.batchnorm._BatchNorm)):
                assert torch.equal(p, q), name
    torch.manual_seed(1)
    assert not torch.equal(_batchnorms(build_models(CPU, architecture, 10, "uniform"))[0].weight, norms[0].weight)  # from the seed


def test_the_original_schedule_is_47_epochs_of_429_iterations():
    # 55,000 MNIST images at batch 128: the epoch ends at the first incomplete batch; the run stops once
    # 20,000 iterations are counted.
    assert ORIGINAL_SVHN_SCHEDULE["iters_per_epoch"] == 55_000 // 128 == 429
    epochs = -(-20_000 // 429)  # the first epoch at which 20,000 iterations are reached
    assert ORIGINAL_SVHN_SCHEDULE["epochs"] == epochs == 47 and epochs * 429 == 20_163
    config = _config("--protocol", "original")
    assert (config.epochs, config.iters_per_epoch, config.precision, config.batchnorm_init) == (47, 429, "fp32", "uniform")
    default = _config()
    assert (default.epochs, default.iters_per_epoch, default.batchnorm_init, default.protocol) == (50, None, "ones", "default")


def test_flags_given_explicitly_override_the_protocol():
    config = _config("--protocol", "original", "--epochs", "10", "--iters-per-epoch", "7", "--precision", "tf32",
                     "--batchnorm-init", "ones")
    assert (config.epochs, config.iters_per_epoch, config.precision, config.batchnorm_init) == (10, 7, "tf32", "ones")
    assert _config("--batchnorm-init", "uniform").batchnorm_init == "uniform"  # the ablation without the protocol
    lenet = _config("--protocol", "original", *LENET)  # the original's MNIST <-> USPS schedule is not reproduced
    assert (lenet.epochs, lenet.iters_per_epoch, lenet.batchnorm_init, lenet.precision) == (50, None, "uniform", "fp32")
    assert "override" in main_module.build_parser().format_help()


def _args(root: Path, csv_path: Path, *extra: str) -> list[str]:
    return train_args(root, csv_path, *LENET, *extra, epochs=1)


def test_the_record_names_the_protocol_and_resume_refuses_a_change(digits_root, tmp_path, capsys):
    csv_path = tmp_path / "original.csv"
    assert main_module.main(_args(digits_root, csv_path, "--protocol", "original")) == 0
    record = json.loads(csv_path.with_suffix(".json").read_text())
    assert record["protocol"] == {"name": "original", "set": {"batchnorm_init": "uniform", "precision": "fp32"}}
    assert record["config"]["protocol"] == "original" and record["config"]["batchnorm_init"] == "uniform"
    checkpoint = torch.load(csv_path.with_suffix(".pt"), weights_only=True)
    scales = torch.cat([value for key, value in checkpoint["models"].items()
                        if key.endswith(".weight") and value.dim() == 1])  # BatchNorm's: the only 1-D weights
    assert len(scales) > 100 and scales.min() < 0.5  # after 2 small Adam steps, still spread as U(0, 1) drew them
    before = csv_path.read_bytes()
    capsys.readouterr()
    assert main_module.main(_args(digits_root, csv_path, "--resume", "--epochs", "2")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "protocol 'original' -> 'default'" in err and "batchnorm_init 'uniform' -> 'ones'" in err
    assert csv_path.read_bytes() == before
    assert main_module.main(_args(digits_root, csv_path, "--resume", "--protocol", "original", "--epochs", "2")) == 0


def test_a_checkpoint_from_before_protocols_still_resumes(digits_root, tmp_path):
    csv_path = tmp_path / "old.csv"
    assert main_module.main(_args(digits_root, csv_path)) == 0
    path = csv_path.with_suffix(".pt")
    payload = torch.load(path, weights_only=True)
    payload.pop("checksum")
    payload.pop("provenance")
    for key in ("protocol", "batchnorm_init", "network"):  # what a checkpoint written before these flags holds
        payload["config"].pop(key)
    payload["config"]["parallel_seeds"] = 1  # and a flag that has gone since
    torch.save(payload, path)
    assert main_module.main(_args(digits_root, csv_path, "--resume", "--epochs", "2")) == 0
