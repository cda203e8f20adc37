"""The MCD algorithm (Saito et al., CVPR 2018) and its source-only baseline: what a researcher edits.

One iteration on a source batch (xs, ys) and a target batch xt:
  A. train G, F1, F2 to classify the source:        min CE(F1(G(xs)), ys) + CE(F2(G(xs)), ys)
  B. G fixed, the heads disagree on the target:     min_{F1,F2} source CE - d(F1(G(xt)), F2(G(xt)))
  C. heads fixed, G removes the disagreement:       min_G d(F1(G(xt)), F2(G(xt))), num_k times
Source and target always go through G in separate forward passes, so BatchNorm sees per-domain batch
statistics, as in the original code.

An algorithm owns G, F1, F2 and their optimisers; update(xs, ys, xt) runs one iteration and returns a
dict of on-device losses (DomainBed's shape). Speed switches never change what is computed: bf16
autocast for convolutions and matrix products with softmax, cross-entropy and d in fp32 (fp32 is
exact: TF32 off), fused Adam on CUDA; see iteration.py for the CUDA graph around update().
"""

from __future__ import annotations

import contextlib
import functools
from itertools import chain
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from config import Config
from datasets import DigitsSplit, to_model_input
from models import HeadPair, StackedLinear, architecture_for, build_models

DISCREPANCIES = ("l1", "swd")  # MCD.discrepancy picks one by name


def discrepancy(logits1: torch.Tensor, logits2: torch.Tensor) -> torch.Tensor:
    """d(p1, p2): mean over batch and classes of |softmax(p1) - softmax(p2)|, computed in fp32."""
    return (logits1.float().softmax(dim=1) - logits2.float().softmax(dim=1)).abs().mean()


def sliced_wasserstein_discrepancy(logits1: torch.Tensor, logits2: torch.Tensor, directions: torch.Tensor) -> torch.Tensor:
    """SWD (Lee et al., CVPR 2019): the two heads' softmax outputs (B, K) are projected on unit directions
    (K, M); each projection is sorted over the batch, so matching sorted values compares the two 1-D
    distributions (the 1-D Wasserstein-2 coupling); the result is the mean squared difference. fp32."""
    projected1 = (logits1.float().softmax(dim=1) @ directions).sort(dim=0).values  # (B, M)
    projected2 = (logits2.float().softmax(dim=1) @ directions).sort(dim=0).values
    return (projected1 - projected2).pow(2).mean()


def random_directions(classes: int, count: int, device: torch.device) -> torch.Tensor:
    """(classes, count) directions drawn uniformly on the unit sphere: normalised Gaussian columns."""
    directions = torch.randn(classes, count, device=device)
    return directions / directions.norm(dim=0, keepdim=True)


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


class SourceOnly:
    """G, F1 and F2 trained on the labelled source only (step A alone): the paper's baseline row."""

    # Each step's forward passes and loss, from its inputs: what --compile step compiles as one function
    # (one forward and one backward graph per step); the optimiser steps stay outside.
    STEP_PASSES: tuple[str, ...] = ("source_pass",)

    def __init__(self, config: Config, device: torch.device):
        self.config, self.device = config, device
        self.G, self.F1, self.F2 = build_models(device, architecture_for(config.source, config.target),
                                                config.batchnorm_init)
        if config.channels_last:
            self.G.to(memory_format=torch.channels_last)
        # The training forward passes, compiled when asked: the modules (--compile on), or each step's
        # passes with their loss as one function (--compile step, see STEP_PASSES). Evaluation calls the
        # eager modules: other batch shapes and eval mode would each cost a recompilation for a few
        # milliseconds of work.
        compile_modules = config.compile and not config.compile_step
        self.g, self.f1, self.f2 = (torch.compile(m) if compile_modules else m for m in self.modules)
        # --paired-heads: F1 and F2 in one batched pass (SVHN network); their stacked weights are made per step.
        self.pair = HeadPair(self.F1, self.F2) if config.paired_heads else None
        self.paired = torch.compile(self.pair) if compile_modules and self.pair else self.pair
        if config.compile and config.compile_step:
            for name in self.STEP_PASSES:
                setattr(self, name, torch.compile(getattr(self, name)))
        # One Adam for G and one for both heads; Adam is per-parameter, so this equals the original's
        # separate optimisers for F1 and F2. weight_decay is Adam's L2 term, as in the original.
        # On CUDA the fused kernel (same update, one launch per step); capturable keeps the step count
        # on the device so the update can be replayed inside a CUDA graph.
        adam = functools.partial(
            torch.optim.Adam,
            lr=config.lr,
            weight_decay=config.weight_decay,
            fused=True if device.type == "cuda" else None,
            capturable=config.cuda_graph,
        )
        self.opt_g = adam(self.G.parameters())
        self.opt_f = adam(chain(self.F1.parameters(), self.F2.parameters()))

    @property
    def modules(self) -> tuple[nn.Module, nn.Module, nn.Module]:
        return self.G, self.F1, self.F2

    def train_mode(self, mode: bool = True) -> None:
        for module in self.modules:
            module.train(mode)

    def autocast(self) -> torch.autocast:
        """bf16 convolutions and matrix products when precision is bf16; a no-op otherwise. Losses take
        .float() logits, so softmax, cross-entropy and d stay fp32. cache_enabled=False: the cast-weight
        cache must not outlive a CUDA graph capture (PyTorch's advice for autocast under graphs)."""
        return torch.autocast(
            self.device.type, dtype=torch.bfloat16, enabled=self.config.precision == "bf16", cache_enabled=False
        )

    def inputs(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) uint8 -> the model's input in [-1, 1], in G's memory format."""
        x = to_model_input(images)
        return x.contiguous(memory_format=torch.channels_last) if self.config.channels_last else x

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, features): 3072 for the SVHN network, 768 for the USPS one: G's training forward pass."""
        with self.autocast():
            return self.g(x)

    def head_weights(self) -> list[StackedLinear] | None:
        """With paired heads, F1's and F2's weights stacked (and cast) for one step's forward passes; None
        otherwise. Made after the last optimiser step that changed the heads."""
        if self.pair is None:
            return None
        return self.pair.stacked_weights(torch.bfloat16 if self.config.precision == "bf16" else torch.float32)

    def heads(self, features: torch.Tensor, weights: list[StackedLinear] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, features) -> the logits of F1 and F2, each (B, 10); weights: head_weights() of this step (paired heads)."""
        with self.autocast():
            if weights is not None:
                return self.paired(features, weights)
            return self.f1(features), self.f2(features)

    def source_loss(self, logits: tuple[torch.Tensor, torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits[0].float(), labels) + F.cross_entropy(logits[1].float(), labels)

    def source_pass(self, xs: torch.Tensor, ys: torch.Tensor, weights: list[StackedLinear] | None) -> torch.Tensor:
        """Step A's loss: both heads' source cross-entropy."""
        return self.source_loss(self.heads(self.features(xs), weights), ys)

    def step_a(self, xs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
        """A: G, F1, F2 minimise the source cross-entropy of both heads."""
        loss = self.source_pass(xs, ys, self.head_weights())
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
        """Eval-mode passes over (N, 3, 32, 32) uint8 images in chunks: (features (n, 3072), logits1 (n, 10),
        logits2 (n, 10)) per chunk, logits in fp32. The modules are back in training mode afterwards."""
        self.train_mode(False)
        try:
            for start in range(0, len(images), chunk_size):
                x = self.inputs(images[start : start + chunk_size])
                with self.autocast():
                    features = self.G(x)
                    logits1, logits2 = self.F1(features).float(), self.F2(features).float()
                yield features, logits1, logits2
        finally:
            self.train_mode(True)

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

    STEP_PASSES = ("source_pass", "heads_pass", "target_pass")

    def discrepancy(self, logits: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """The configured d between the heads' logits; SWD draws fresh directions on every call."""
        if self.config.discrepancy == "swd":
            directions = random_directions(logits[0].shape[1], self.config.swd_projections, logits[0].device)
            return sliced_wasserstein_discrepancy(*logits, directions)
        return discrepancy(*logits)

    def heads_pass(self, xs: torch.Tensor, ys: torch.Tensor, xt: torch.Tensor, weights: list[StackedLinear] | None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """Step B's terms: the heads' source CE and their discrepancy on the target."""
        # G is fixed, so its outputs are constants: no graph through G, no wasted backward.
        # Training mode still applies dropout and updates G's BatchNorm statistics, as the original.
        with torch.no_grad():
            features_s, features_t = self.features(xs), self.features(xt)
        return self.source_loss(self.heads(features_s, weights), ys), self.discrepancy(self.heads(features_t, weights))

    def target_pass(self, xt: torch.Tensor, weights: list[StackedLinear] | None) -> torch.Tensor:
        """Step C's loss: the heads' discrepancy on the target."""
        return self.discrepancy(self.heads(self.features(xt), weights))

    def step_b(self, xs: torch.Tensor, ys: torch.Tensor, xt: torch.Tensor) -> torch.Tensor:
        """B: with G fixed, F1 and F2 minimise source CE - d on the target."""
        source_loss, d = self.heads_pass(xs, ys, xt, self.head_weights())
        loss = source_loss - d
        self.opt_f.zero_grad()
        loss.backward()
        self.opt_f.step()
        return d.detach()

    def step_c(self, xt: torch.Tensor) -> torch.Tensor:
        """C: with F1, F2 fixed, G minimises d on the target, num_k times (a new dropout mask each)."""
        total = torch.zeros((), device=xt.device)
        with frozen(self.F1, self.F2):
            weights = self.head_weights()  # constants here: the heads do not change in step C
            for _ in range(self.config.num_k):
                d = self.target_pass(xt, weights)
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


ALGORITHMS = {"mcd": MCD, "source_only": SourceOnly}  # --method NAME
METHODS = tuple(ALGORITHMS)
