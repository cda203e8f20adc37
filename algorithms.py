"""The methods: MCD (Saito et al., CVPR 2018), its source-only baseline and DANN: what a researcher edits.

MCD, one iteration on a source batch (xs, ys) and a target batch xt:
  A. train G, F1, F2 to classify the source:        min CE(F1(G(xs)), ys) + CE(F2(G(xs)), ys)
  B. G fixed, the heads disagree on the target:     min_{F1,F2} source CE - d(F1(G(xt)), F2(G(xt)))
  C. heads fixed, G removes the disagreement:       min_G d(F1(G(xt)), F2(G(xt))), num_k times
Source and target always go through G in separate forward passes, so BatchNorm sees per-domain batch
statistics, as in the original code.

The contract every method follows (DomainBed's): a method is an nn.Module built as
Method(config, classes, device, total_iterations) that owns its networks (as submodules, so its
state_dict holds them all) and its optimisers (self.optimizers, by name). update(xs, ys, xt) runs one
training iteration and returns a dict of on-device losses, whose keys are among the method's LOSSES:
the CSV's loss columns, in order. Checkpoints save and restore state_dict() and every optimiser. A new
method is one class here plus its line in ALGORITHMS; a new discrepancy is one function plus its line
in DISCREPANCIES. For update() to run inside a CUDA graph it keeps to iteration.TrainStep's rules (no
host reads, fixed shapes, state changed in place).

This file is the mathematics only. How fast it runs (compilation, memory layout, fused optimisers,
CUDA graphs) is applied from outside by iteration.speed_up; precision stays here because it changes
results: bf16 autocast (when configured) for convolutions and matrix products; softmax, cross-entropy
and d in fp32 tensors (a matrix product among them, SWD's projection, uses TF32 units on CUDA unless
--precision is fp32: config.configure_backends).
"""

from __future__ import annotations

import contextlib
from itertools import chain
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from config import Config
from datasets import DigitsSplit, to_model_input
from models import build_models


def discrepancy(logits1: torch.Tensor, logits2: torch.Tensor) -> torch.Tensor:
    """d(p1, p2): mean over batch and classes of |softmax(p1) - softmax(p2)|, computed in fp32."""
    return (logits1.float().softmax(dim=1) - logits2.float().softmax(dim=1)).abs().mean()


def sliced_wasserstein_discrepancy(logits1: torch.Tensor, logits2: torch.Tensor, directions: torch.Tensor) -> torch.Tensor:
    """SWD (Lee et al., CVPR 2019): the two heads' softmax outputs (B, K) are projected on unit directions
    (K, M); each projection is sorted over the batch, so matching sorted values compares the two 1-D
    distributions (the 1-D Wasserstein-2 coupling); the result is the mean squared difference. fp32 tensors;
    the projection is a matrix product, so with --precision tf32 or bf16 it runs on TF32 units on CUDA."""
    projected1 = (logits1.float().softmax(dim=1) @ directions).sort(dim=0).values  # (B, M)
    projected2 = (logits2.float().softmax(dim=1) @ directions).sort(dim=0).values
    return (projected1 - projected2).pow(2).mean()


def random_directions(classes: int, count: int, device: torch.device, generator: torch.Generator | None = None
                      ) -> torch.Tensor:
    """(classes, count) directions drawn uniformly on the unit sphere: normalised Gaussian columns."""
    directions = torch.randn(classes, count, device=device, generator=generator)
    return directions / directions.norm(dim=0, keepdim=True)


def l1(logits1: torch.Tensor, logits2: torch.Tensor, config: Config, generator: torch.Generator | None = None
       ) -> torch.Tensor:
    """--discrepancy l1: the paper's d."""
    return discrepancy(logits1, logits2)


def swd(logits1: torch.Tensor, logits2: torch.Tensor, config: Config, generator: torch.Generator | None = None
        ) -> torch.Tensor:
    """--discrepancy swd: SWD on config.swd_projections fresh directions (from `generator`, else torch's default)."""
    directions = random_directions(logits1.shape[1], config.swd_projections, logits1.device, generator)
    return sliced_wasserstein_discrepancy(logits1, logits2, directions)


# --discrepancy NAME: d(logits1, logits2, config, generator) -> a scalar, fp32
DISCREPANCIES: dict[str, Callable[..., torch.Tensor]] = {"l1": l1, "swd": swd}


@contextlib.contextmanager
def frozen(*modules: nn.Module) -> Iterator[None]:
    """Parameters of these modules get no gradients inside the block (BatchNorm still updates its stats)."""
    params = [p for m in modules for p in m.parameters()]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


class SourceOnly(nn.Module):
    """G, F1 and F2 trained on the labelled source only (step A alone): the paper's baseline row. The
    base of the other methods: the networks, their optimisers, the forward passes and the evaluation."""

    # MCD's columns: the baseline's rows line up with MCD's, its discrepancies left empty.
    LOSSES: tuple[str, ...] = ("loss_source", "discrepancy_b", "discrepancy_c")

    def __init__(self, config: Config, classes: int, device: torch.device, total_iterations: int):
        super().__init__()
        self.config, self.device, self.classes = config, device, classes
        self.G, self.F1, self.F2 = build_models(device, config.network, classes, config.batchnorm_init)
        # One Adam for G and one for both heads; Adam is per-parameter, so this equals the original's
        # separate optimisers for F1 and F2. weight_decay is Adam's L2 term, as in the original.
        self.opt_g = self.adam(self.G.parameters())
        self.opt_f = self.adam(chain(self.F1.parameters(), self.F2.parameters()))
        self.optimizers = {"G": self.opt_g, "F": self.opt_f}

    def adam(self, parameters) -> torch.optim.Adam:
        """The paper's optimiser."""
        return torch.optim.Adam(parameters, lr=self.config.lr, weight_decay=self.config.weight_decay)

    def autocast(self) -> torch.autocast:
        """bf16 convolutions and matrix products when precision is bf16; a no-op otherwise. Losses take
        .float() logits, so softmax, cross-entropy and d stay fp32. cache_enabled=False: the cast-weight
        cache must not outlive a CUDA graph capture (PyTorch's advice for autocast under graphs)."""
        return torch.autocast(
            self.device.type, dtype=torch.bfloat16, enabled=self.config.precision == "bf16", cache_enabled=False
        )

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) in [-1, 1] -> (B, G.features): 3072 for the SVHN network, 768 for the USPS one."""
        with self.autocast():
            return self.G(x)

    def heads(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, G.features) -> the logits of F1 and F2, each (B, classes): 10 digits, 43 traffic signs."""
        with self.autocast():
            return self.F1(features), self.F2(features)

    def source_loss(self, logits: tuple[torch.Tensor, torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        """Both heads' source cross-entropy, in fp32."""
        return F.cross_entropy(logits[0].float(), labels) + F.cross_entropy(logits[1].float(), labels)

    def step_a(self, xs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
        """A: G, F1, F2 minimise the source cross-entropy of both heads."""
        loss = self.source_loss(self.heads(self.features(xs)), ys)
        self.opt_g.zero_grad()
        self.opt_f.zero_grad()
        loss.backward()
        self.opt_g.step()
        self.opt_f.step()
        return loss.detach()

    def update(self, xs: torch.Tensor, ys: torch.Tensor, xt: torch.Tensor) -> dict[str, torch.Tensor]:
        """One training iteration; returns on-device losses (no host sync)."""
        return {"loss_source": self.step_a(xs, ys)}

    @torch.inference_mode()
    def eval_passes(self, images: torch.Tensor, chunk_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Eval-mode passes over (N, C, H, W) uint8 images in chunks: (features (n, 3072), logits1 (n, classes),
        logits2 (n, classes)) per chunk, logits in fp32. The networks are back in training mode afterwards."""
        self.eval()
        try:
            for start in range(0, len(images), chunk_size):
                x = to_model_input(images[start : start + chunk_size])
                with self.autocast():
                    features = self.G(x)
                    logits1, logits2 = self.F1(features).float(), self.F2(features).float()
                yield features, logits1, logits2
        finally:
            self.train()

    def predictions(self, split: DigitsSplit, chunk_size: int) -> torch.Tensor:
        """(3, N) predicted classes of F1, F2 and the ensemble argmax(logits1 + logits2), one G pass each."""
        return torch.cat([torch.stack([l1.argmax(1), l2.argmax(1), (l1 + l2).argmax(1)])
                          for _, l1, l2 in self.eval_passes(split.images, chunk_size)], dim=1)

    def evaluate(self, split: DigitsSplit, chunk_size: int) -> tuple[float, float, float]:
        """Accuracy in percent of F1, F2 and the ensemble (one host read)."""
        correct = (self.predictions(split, chunk_size) == split.labels).sum(dim=1)
        f1, f2, ensemble = (100.0 * c / len(split) for c in correct.tolist())
        return f1, f2, ensemble


class MCD(SourceOnly):
    """Maximum Classifier Discrepancy: step A, then B (heads maximise d), then C (G minimises d)."""

    def discrepancy(self, logits: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """The run's d (DISCREPANCIES[config.discrepancy]) between the heads' logits."""
        return DISCREPANCIES[self.config.discrepancy](*logits, self.config)

    def step_b(self, xs: torch.Tensor, ys: torch.Tensor, xt: torch.Tensor) -> torch.Tensor:
        """B: with G fixed, F1 and F2 minimise source CE - d on the target."""
        # G is fixed, so its outputs are constants: no graph through G, no wasted backward.
        # Training mode still applies dropout and updates G's BatchNorm statistics, as the original.
        with torch.no_grad():
            features_s, features_t = self.features(xs), self.features(xt)
        source_loss = self.source_loss(self.heads(features_s), ys)
        d = self.discrepancy(self.heads(features_t))  # the target pass last: BatchNorm's last statistics
        loss = source_loss - d
        self.opt_f.zero_grad()
        loss.backward()
        self.opt_f.step()
        return d.detach()

    def step_c(self, xt: torch.Tensor) -> torch.Tensor:
        """C: with F1, F2 fixed, G minimises d on the target, num_k times (a new dropout mask each)."""
        total = torch.zeros((), device=xt.device)
        with frozen(self.F1, self.F2):
            for _ in range(self.config.num_k):
                d = self.discrepancy(self.heads(self.features(xt)))
                self.opt_g.zero_grad()
                d.backward()
                self.opt_g.step()
                total += d.detach()
        return total / self.config.num_k

    def update(self, xs: torch.Tensor, ys: torch.Tensor, xt: torch.Tensor) -> dict[str, torch.Tensor]:
        return {
            "loss_source": self.step_a(xs, ys),
            "discrepancy_b": self.step_b(xs, ys, xt),
            "discrepancy_c": self.step_c(xt),
        }


class GradientReversal(torch.autograd.Function):
    """Identity forward; the gradient times -strength backward (Ganin & Lempitsky 2015)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, strength: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(strength)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (strength,) = ctx.saved_tensors
        return -strength.to(grad.dtype) * grad, None


class DANN(SourceOnly):
    """Domain-adversarial training (Ganin & Lempitsky, ICML 2015): a domain discriminator D on G's
    features learns source (0) from target (1); through a gradient reversal layer G learns to fool it,
    while both heads learn the source labels as in source_only (so the accuracy columns mean the same).
    The reversal's strength follows the paper's schedule 2 / (1 + exp(-10 p)) - 1, p the share of the
    run's iterations done (kept on the device and in the checkpoint). Optimiser: the same Adam as MCD."""

    LOSSES = ("loss_source", "loss_domain")

    def __init__(self, config: Config, classes: int, device: torch.device, total_iterations: int):
        super().__init__(config, classes, device, total_iterations)
        self.D = nn.Sequential(  # the paper's SVHN discriminator: two hidden layers of 1024
            nn.Linear(self.G.features, 1024), nn.ReLU(inplace=True),
            nn.Linear(1024, 1024), nn.ReLU(inplace=True),
            nn.Linear(1024, 1),
        ).to(device)
        self.opt_d = self.adam(self.D.parameters())
        self.optimizers["D"] = self.opt_d
        self.total_iterations = max(total_iterations, 1)
        self.register_buffer("iterations_done", torch.zeros((), dtype=torch.long, device=device))

    def update(self, xs: torch.Tensor, ys: torch.Tensor, xt: torch.Tensor) -> dict[str, torch.Tensor]:
        progress = (self.iterations_done.float() / self.total_iterations).clamp(max=1.0)
        strength = 2.0 / (1.0 + torch.exp(-10.0 * progress)) - 1.0
        features_s, features_t = self.features(xs), self.features(xt)  # (B, features) each
        source_loss = self.source_loss(self.heads(features_s), ys)
        with self.autocast():
            domain_logits = self.D(GradientReversal.apply(torch.cat([features_s, features_t]), strength))  # (2B, 1)
        domains = torch.cat([torch.zeros(len(xs), device=xs.device), torch.ones(len(xt), device=xt.device)])
        domain_loss = F.binary_cross_entropy_with_logits(domain_logits.float().squeeze(1), domains)
        for optimizer in self.optimizers.values():
            optimizer.zero_grad()
        (source_loss + domain_loss).backward()
        for optimizer in self.optimizers.values():
            optimizer.step()
        self.iterations_done += 1
        return {"loss_source": source_loss.detach(), "loss_domain": domain_loss.detach()}


ALGORITHMS = {"mcd": MCD, "source_only": SourceOnly, "dann": DANN}  # --method NAME
METHODS = tuple(ALGORITHMS)
