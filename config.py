"""The settings of a run, declared once: the frozen Config, and what it sets up in the process.

Each Config field is a setting: its default, help, flag group and whether it changes results. From
these declarations main.py builds its parser, results.json and checkpoints save the Config whole,
--resume compares every result-changing setting (result_settings()), and docs/settings.md holds the
flag table (main.flag_table()). resolve() turns the flags given into a Config: it alone decides every
default that depends on something else (--protocol, the device).
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import random
from dataclasses import dataclass, field, fields
from typing import Any, Callable

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

# The names the flags accept, declared here so that reading flags needs no torch (--help, a bad flag answer
# in about a second); the registries that implement them are keyed by exactly these (tests/test_layout.py).
METHODS = ("mcd", "source_only", "dann")  # algorithms.ALGORITHMS
DISCREPANCIES = ("l1", "swd")  # algorithms.DISCREPANCIES
DATASETS = ("svhn", "mnist", "usps", "synsig", "gtsrb")  # datasets.DOMAINS
FOLDER = "folder:"  # --source folder:DIR: the user's own images, a subfolder per class (datasets.folder_domain)
NETWORKS = ("svhn2mnist", "usps", "syn2gtrsb")  # models.NETWORKS
BATCHNORM_INITS = ("ones", "uniform")  # models.BATCHNORM_INITS
VALIDATORS = ("val_entropy", "val_im", "val_snd", "val_bnm", "val_d", "source_acc")  # validators.VALIDATORS
PRECISIONS = ("fp32", "tf32", "bf16")
PROTOCOLS = ("default", "original")
GROUPS = ("run", "method", "data", "output", "speed")
# numpy takes seeds below 2**32 and the batch streams use 2 * seed + 1: this keeps every one valid.
MAX_SEED = 2**31 - 1


# ---------------------------------------------------------------------------------------------------
# Parsers for flag values: each raises argparse.ArgumentTypeError with what is wrong


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"must be a finite number greater than 0, got {text}")
    return value


def non_negative_float(text: str) -> float:
    value = float(text)
    if not 0 <= value < math.inf:
        raise argparse.ArgumentTypeError(f"must be a finite number, 0 or more, got {text}")
    return value


def batch_images(text: str) -> int:
    value = int(text)
    if value < 2:  # BatchNorm needs two images to take batch statistics
        raise argparse.ArgumentTypeError(f"must be at least 2 (BatchNorm needs a batch), got {value}")
    return value


def seed_number(text: str) -> int:
    value = int(text)
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"must be between 0 and {MAX_SEED}, got {value}")
    return value


def dataset_name(text: str) -> str:
    """A dataset of DATASETS, or folder:DIR (an existing folder, made absolute so that the run's
    record and checkpoint name it wherever they are read)."""
    if text in DATASETS:
        return text
    if text.startswith(FOLDER) and len(text) > len(FOLDER):
        folder = os.path.abspath(text[len(FOLDER):])
        if not os.path.isdir(folder):
            raise argparse.ArgumentTypeError(f"{text}: no such folder (a subfolder of images per class belongs there)")
        return FOLDER + folder
    raise argparse.ArgumentTypeError(f"invalid choice: {text!r} (choose from {', '.join(DATASETS)}, or folder:DIR)")


def switch(text: str) -> bool | None:
    """on / off / auto -> True / False / None (None: resolve() decides for the device)."""
    choices = {"on": True, "off": False, "auto": None}
    if text not in choices:
        raise argparse.ArgumentTypeError(f"invalid choice: {text!r} (choose from 'auto', 'on', 'off')")
    return choices[text]


def setting(default: Any, help: str, group: str, *, result: bool = False, parse: Callable[[str], Any] | None = None,
            choices: tuple[str, ...] | None = None, auto: str | None = None, flag: str | None = None) -> Any:
    """A Config field declared as a setting. result: it changes what a run computes (a resumed run must
    match its checkpoint on it). auto: the rule resolve() applies when the flag is not given, in words.
    flag: the command-line flag when it is not --name-of-the-field ("" for none)."""
    return field(default=default, metadata={"help": help, "group": group, "result": result, "parse": parse,
                                            "choices": choices, "auto": auto, "flag": flag})


@dataclass(frozen=True)
class Config:
    """Every setting of a run, in one place; built by resolve() and saved with the results."""

    # run
    epochs: int = setting(50, "training epochs (a resumed run may be given more)", "run", parse=positive_int,
                          auto="50; 47 with --protocol original and SVHN")
    iters_per_epoch: int | None = setting(
        None, "iterations per epoch", "run", result=True, parse=positive_int,
        auto="one pass over the smaller training set at the batch size (468 for MNIST at 128); "
             "429 with --protocol original and SVHN")
    seed: int = setting(1, "random seed (init, dropout, batch order)", "run", result=True, parse=seed_number)
    protocol: str = setting("default", "default: this project's setting; original: the original code's run where it "
                            "can be reproduced (BatchNorm scales ~ U(0, 1), fp32, and with SVHN 47 epochs x 429 "
                            "iterations); flags given explicitly override it", "run", result=True, choices=PROTOCOLS)
    deterministic: bool = setting(False, "deterministic algorithms only and no cuDNN autotuning: a rerun gives an "
                                  "identical CSV", "run", result=True)
    device: str = setting("cpu", "where to train", "run", choices=("auto", "cpu", "cuda", "mps"),
                          auto="cuda if available, else mps, else cpu")
    # method
    method: str = setting("mcd", "the method, one of algorithms.ALGORITHMS: mcd = steps A, B, C; source_only = step "
                          "A alone (the paper's baseline); dann = domain-adversarial training (Ganin & Lempitsky "
                          "2015)", "method", result=True, choices=METHODS)
    batch_size: int = setting(128, "images per domain per iteration", "method", result=True, parse=batch_images)
    lr: float = setting(2e-4, "Adam learning rate (every network)", "method", result=True, parse=positive_float)
    weight_decay: float = setting(5e-4, "Adam weight decay (L2)", "method", result=True, parse=non_negative_float)
    num_k: int = setting(4, "generator updates (step C) per iteration", "method", result=True, parse=positive_int)
    discrepancy: str = setting("l1", "l1: the paper's mean |p1 - p2|; swd: sliced Wasserstein discrepancy (Lee et "
                               "al., CVPR 2019)", "method", result=True, choices=DISCREPANCIES)
    swd_projections: int = setting(128, "random unit directions per SWD evaluation (fresh each step)", "method",
                                   result=True, parse=positive_int)
    batchnorm_init: str = setting("ones", "BatchNorm scales at initialisation: ones (PyTorch >= 1.0) or uniform "
                                  "U(0, 1) as PyTorch 0.2", "method", result=True, choices=BATCHNORM_INITS,
                                  auto="ones; uniform with --protocol original")
    # data
    source: str = setting("svhn", f"labelled source dataset: one of {', '.join(DATASETS)}, or folder:DIR (your own "
                          "images, a subfolder per class; docs/your-data.md)", "data", result=True, parse=dataset_name)
    target: str = setting("mnist", "unlabelled target dataset, as --source; its labels are read only for the test "
                          "accuracy", "data", result=True, parse=dataset_name)
    network: str = setting("svhn2mnist", "G, F1 and F2, and the image size and channels every image is brought to: "
                                  "svhn2mnist 32x32 RGB, usps (LeNet-style) 28x28 grey, syn2gtrsb 40x40 RGB", "data",
                                  result=True, choices=NETWORKS,
                                  auto="the source's (MNIST <-> USPS: usps; SVHN: svhn2mnist; signs and folders as "
                                       "their record says); the target's when only the target is in colour")
    small_subsets: bool = setting(False, "the paper's MNIST <-> USPS protocol: random 2,000 MNIST / 1,800 USPS "
                                  "training images (per seed)", "data", result=True)
    data_root: str = setting("./data", "holds svhn/*.mat, MNIST/raw/*, usps/*.bz2, gtsrb/ (torchvision's layout), "
                             "synsig/synthetic_data/ (docs/table1.md#data); for "
                             "--evaluate the checkpoint's unless given", "data")
    download: bool = setting(True, "never download; fail with a list of missing files", "data", flag="--no-download")
    allow_unverified_data: bool = setting(False, "load dataset files whose MD5 differs from the official release "
                                          "(e.g. the offline proxy), with a warning", "data")
    # output
    csv: str = setting("results.csv", "per-epoch results; results.json and the checkpoint (.pt) beside it", "output")
    tensorboard: str | None = setting(None, "also write each epoch's losses, accuracies and label-free scores as "
                                      "TensorBoard scalars in this folder, one run per CSV stem (TENSORBOARD/STEM) with "
                                      "the settings as its hparams; never changes a result", "output", parse=str)
    eval_batch_size: int = setting(2048, "images per evaluation chunk", "output", parse=positive_int)
    checkpoint_every: float = setting(10.0, "minutes between writes of the training state (.pt: weights, optimisers, "
                                      "random states; ~440 MB for the SVHN network) besides the one after the last "
                                      "epoch and the one when a run stops early; 0: after every epoch", "output",
                                      parse=non_negative_float)
    final_state: str = setting("full", "what the .pt keeps once the run has finished: full (it can be continued "
                               "with more --epochs) or weights (the networks and the run's record: all that "
                               "--evaluate, visualize.py and predict.py read; a third of the bytes for the SVHN "
                               "network)", "output", choices=("full", "weights"))
    resume: bool = setting(False, "continue the run whose checkpoint (same stem as --csv, .pt) is beside --csv",
                           "output")
    overwrite: bool = setting(False, "replace an existing --csv, its .json and .pt (without it, an existing run is "
                              "never overwritten)", "output")
    # speed: none of these changes the mathematics (precision aside, which is compared on --resume)
    precision: str = setting("fp32", "fp32 is exact (TF32 off); tf32 uses TF32 matrix units; bf16 autocasts "
                             "convolutions and matrix products, losses stay fp32", "speed", result=True,
                             choices=("auto", *PRECISIONS), auto="bf16 on CUDA, fp32 elsewhere and with --protocol original")
    cuda_graph: bool = setting(False, "capture the whole training iteration once as a CUDA graph and replay it, after "
                               "checking that a replay computes what the eager iteration computes (auto: eager when "
                               "the check fails; on: an error)", "speed", parse=switch, auto="on for CUDA")
    graph_strict: bool = setting(False, "--cuda-graph on was given: a CUDA graph that fails its check is an error",
                                 "speed", flag="")  # no flag of its own: resolve() sets it
    compile: bool = setting(False, "torch.compile the training forward passes of the networks", "speed",
                            parse=switch, auto="off")
    channels_last: bool = setting(False, "NHWC images and convolution weights", "speed", parse=switch,
                                  auto="on for CUDA")


def settings() -> list:
    """The Config fields in declaration order, each with its metadata (help, group, result, ...)."""
    return list(fields(Config))


def result_settings() -> tuple[str, ...]:
    """The settings that change what a run computes: a resumed run must match its checkpoint on each."""
    return tuple(f.name for f in fields(Config) if f.metadata["result"])


# What 'auto' means on CUDA for each speed switch, from the measurements in docs/speed.md.
AUTO_ON_CUDA = {"cuda_graph": True, "compile": False, "channels_last": True}


class SettingError(ValueError):
    """Flags that cannot be combined or used here; the message is one line that says what to do."""


def protocol_values(protocol: str, source: str, target: str) -> dict:
    """The settings a protocol fixes for a pair; flags given explicitly override them. 'original' is the
    original code's run as far as it can be reproduced (docs/differences.md): PyTorch 0.2's BatchNorm
    init and fp32 everywhere, and the schedule a dataset's record gives (SVHN's; the schedule of its
    MNIST <-> USPS runs is not reproduced: those keep the default one)."""
    if protocol == "default":
        return {}
    from datasets import domain

    values = {"batchnorm_init": "uniform", "precision": "fp32"}
    for name in (source, target):
        values.update(domain(name).original_schedule or {})
    return values


def resolve_device(requested: str) -> str:
    import torch

    cuda, mps = torch.cuda.is_available(), torch.backends.mps.is_available()
    if requested == "auto":
        return "cuda" if cuda else "mps" if mps else "cpu"
    if requested == "cuda" and not cuda:
        raise SettingError("--device cuda: no CUDA device is available here; use --device cpu or auto")
    if requested == "mps" and not mps:
        raise SettingError("--device mps: no Apple MPS device is available here; use --device cpu or auto")
    return requested


def resolve(given: dict[str, Any]) -> Config:
    """The Config of the flags given (Config field -> value; a switch given as auto is None): a flag given
    wins, then the protocol's value, then the device's rule for 'auto', then the declared default."""
    from datasets import DOMAINS, default_network

    given = {name: value for name, value in given.items() if value is not None and value != "auto"}
    device = resolve_device(given.get("device", "auto"))
    cuda = device.startswith("cuda")
    values = {**protocol_values(given.get("protocol", "default"), given.get("source", Config.source),
                                given.get("target", Config.target)), **given, "device": device}
    values["graph_strict"] = given.get("cuda_graph") is True
    values.setdefault("precision", "bf16" if cuda else "fp32")
    for name, on_cuda in AUTO_ON_CUDA.items():
        values.setdefault(name, cuda and on_cuda)
    if values["cuda_graph"] and not cuda:
        raise SettingError(f"--cuda-graph on needs a CUDA device, not {device}; use --cuda-graph off or auto")
    pair = (values.setdefault("source", Config.source), values.setdefault("target", Config.target))
    if "network" not in values:
        values["network"] = default_network(*pair)
    subsets = [name for name in DOMAINS if DOMAINS[name].small_train_size]
    if values.get("small_subsets") and not set(pair) <= set(subsets):
        raise SettingError(f"--small-subsets is the paper's MNIST <-> USPS protocol; {pair[0]} -> {pair[1]} uses "
                           f"whole training sets: leave it out, or choose --source/--target among {' and '.join(subsets)}")
    # Recorded whole, so that --evaluate and visualize.py find the data from any folder.
    values["data_root"] = os.path.abspath(values.get("data_root", Config.data_root))
    if values.get("resume") and values.get("overwrite"):
        raise SettingError("argument --resume: not allowed with argument --overwrite (continue the run, or replace it)")
    return Config(**values)


# ---------------------------------------------------------------------------------------------------
# What a Config sets up in the process and on the device (torch is imported here, never to read flags)


def configure_backends(config: Config) -> None:
    """Process-wide numerics for this run: TF32 only when precision allows it (tf32, bf16: then every fp32
    matrix product and convolution on CUDA uses TF32 units, SWD's projection and the SND validator's
    similarities included), cuDNN autotuning on CUDA unless the run must be deterministic."""
    import torch

    tf32 = config.precision != "fp32"
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    torch.backends.cudnn.benchmark = torch.device(config.device).type == "cuda" and not config.deterministic
    if config.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS's condition for reproducibility
    torch.use_deterministic_algorithms(config.deterministic)


def seed_everything(seed: int) -> None:
    """torch (CPU and every device), numpy and Python: model init, dropout, anything else random."""
    import numpy as np
    import torch

    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def speed_label(config: Config) -> str:
    """How the iteration runs, in words, e.g. 'bf16, CUDA graph, channels_last'."""
    flags = [config.precision]
    flags += ["CUDA graph"] if config.cuda_graph else []
    flags += ["compiled"] if config.compile else []
    flags += ["channels_last"] if config.channels_last else []
    return ", ".join(flags)


def device_name(device: torch.device) -> str:
    """The device in words, for the console and the results record."""
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "mps":
        return "Apple MPS"
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def synchronize(device: torch.device) -> None:
    """Wait for the work queued on the device (a no-op on the CPU): before reading a clock."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()
