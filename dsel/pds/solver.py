"""The PMP data-weight solver of PDS (Gu et al.): optimal control of the proxy training run.

Forward (inner training, plain (S)GD with per-example weights gamma):
    theta_{t+1} = theta_t - eta * grad L_t(theta_t),   L_t = s_t * sum_{n in B_t} gamma_n l(x_n, .)
where B_t is step t's batch (all proxy windows for full-batch GD) and s_t = N / |B_t| keeps L_t an
unbiased estimate of sum_n gamma_n l_n.  Objective: the area under the target-loss curve,
sum_{t=1..T} J(theta_t).  Co-state, backward in time:
    lambda_T = grad J(theta_T)
    lambda_t = lambda_{t+1} + grad J(theta_t) - eta * H_t lambda_{t+1},   H_t = Hessian of L_t
and the ascent direction for gamma (REFERENCE.md's convention, eta folded into alpha):
    G_n = sum_{t=0..T-1} s_t [n in B_t] grad l(x_n, theta_t) . lambda_{t+1}
        = -(1/eta) d(sum_{t=1..T} J(theta_t)) / d gamma_n
gamma <- project_to_simplex(gamma + alpha * G), repeated for several outer epochs.

G_n for all n at step t is one forward-mode pass per micro-batch (FunctionalLM.example_dots).
The trajectory is kept every `checkpoint_every` steps; the backward pass recomputes each segment
from its checkpoint, so memory holds T/k + k parameter copies instead of T + 1.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import torch
from torch import nn

from dsel.config import option
from dsel.device import tf32_matmuls
from dsel.errors import DselError
from dsel.io import progress
from dsel.pds.functional import FunctionalLM, Params, all_finite, axpy, zeros_like
from dsel.pds.simplex import project_to_simplex

log = logging.getLogger(__name__)


@dataclass
class SolverConfig:
    """Settings of the PMP solver (the inner proxy training and the outer gamma updates)."""

    steps: int = option(100, "inner training steps T")
    lr: float = option(0.1, "inner (S)GD learning rate eta")
    outer_epochs: int = option(5, "outer gamma updates")
    alpha: float = option(1.0, "gamma step size: gamma += alpha * G before the simplex projection")
    batch_size: int = option(0, "proxy windows per inner step; 0 = all of them (full-batch GD)")
    micro_batch: int = option(16, "windows per forward/backward pass (memory knob, no effect on results)")
    checkpoint_every: int = option(1, "store theta every k steps and recompute the rest backward; 1 = store all")
    offload_trajectory: bool = option(False, "keep stored parameters in CPU memory instead of on the device")
    seed: int = option(0, "seed of the SGD batch order (batch_size > 0)")
    tf32: bool = option(True, "on GPU, fp32 matmuls and the fused head use TF32 tensor cores (off = exact fp32)")


class PMPSolver:
    """Solves PDS's data weights for a proxy set against a target set with a fixed proxy LM."""

    def __init__(
        self,
        model: nn.Module,
        proxy: np.ndarray | torch.Tensor,
        target: np.ndarray | torch.Tensor,
        config: SolverConfig,
        device: str | torch.device | None = None,
        show_progress: bool = True,
    ):
        _check_config(config)
        self.config = config
        self.lm = FunctionalLM(model)
        self.theta0 = self.lm.initial_params()
        self.device = torch.device(device) if device else next(iter(self.theta0.values())).device
        self.theta0 = {k: v.to(self.device) for k, v in self.theta0.items()}
        self.proxy = torch.as_tensor(np.asarray(proxy, dtype=np.int64))
        self.target = torch.as_tensor(np.asarray(target, dtype=np.int64))
        if len(self.proxy) == 0 or len(self.target) == 0:
            raise DselError("PDS solve: the proxy and target sets need at least one window each")
        self.batches = _batch_schedule(len(self.proxy), config)
        self.show_progress = show_progress
        self.epoch = 0

    @property
    def num_examples(self) -> int:
        return len(self.proxy)

    # ----- forward: the weighted inner training -------------------------------------------------
    def step(self, theta: Params, t: int, gamma: np.ndarray) -> Params:
        """theta_{t+1} from theta_t: one (S)GD step on the gamma-weighted loss of batch B_t."""
        grad = zeros_like(theta)
        total_loss = 0.0
        for tokens, weights, _ in self._micro_batches(self.batches[t], gamma):
            g, losses = self.lm.gradient(theta, tokens, weights)
            grad = axpy(1.0, g, grad)
            total_loss += float(losses.sum())
        mean_loss = total_loss / len(self.batches[t])
        if not np.isfinite(mean_loss) or not all_finite(grad):
            raise DselError(
                f"PDS solve: the proxy training loss is {mean_loss} at inner step {t} of outer epoch "
                f"{self.epoch}; lower solver.lr or check the proxy model"
            )
        return axpy(-self.config.lr, grad, theta)

    def forward(self, gamma: np.ndarray) -> dict[int, Params]:
        """Run the T inner steps; keep theta_t for t % k == 0 and theta_T."""
        k, steps = self.config.checkpoint_every, self.config.steps
        kept = {0: self.theta0}
        theta = self.theta0
        for t in progress(range(steps), desc=f"pds epoch {self.epoch} forward", disable=not self.show_progress):
            theta = self.step(theta, t, gamma)
            if (t + 1) % k == 0 or t + 1 == steps:
                kept[t + 1] = self._store(theta)
        return kept

    # ----- backward: co-state and the gamma gradient --------------------------------------------
    def target_gradient(self, theta: Params) -> tuple[float, Params]:
        """J(theta) (mean loss over the target windows) and its gradient."""
        grad = zeros_like(theta)
        total = 0.0
        scale = 1.0 / len(self.target)
        for start in range(0, len(self.target), self.config.micro_batch):
            tokens = self.target[start : start + self.config.micro_batch].to(self.device)
            weights = torch.full((len(tokens),), scale, dtype=_dtype(theta), device=self.device)
            g, losses = self.lm.gradient(theta, tokens, weights)
            grad = axpy(1.0, g, grad)
            total += float(losses.sum()) * scale
        return total, grad

    def training_hvp(self, theta: Params, t: int, gamma: np.ndarray, vector: Params) -> Params:
        """H_t vector: Hessian of step t's weighted training loss at theta times `vector`."""
        product = zeros_like(theta)
        for tokens, weights, _ in self._micro_batches(self.batches[t], gamma):
            product = axpy(1.0, self.lm.hvp(theta, tokens, weights, vector), product)
        return product

    def accumulate_dots(self, theta: Params, t: int, co_state: Params, out: np.ndarray) -> None:
        """out[n] += s_t * grad l(x_n, theta_t) . lambda_{t+1} for every n in B_t."""
        ids = self.batches[t]
        scale = len(self.proxy) / len(ids)
        for start in range(0, len(ids), self.config.micro_batch):
            chunk = ids[start : start + self.config.micro_batch]
            _, dots = self.lm.example_dots(theta, self.proxy[chunk].to(self.device), co_state)
            out[chunk] += scale * dots.double().cpu().numpy()

    def backward(self, gamma: np.ndarray, kept: dict[int, Params]) -> tuple[np.ndarray, float]:
        """G (the gamma ascent direction) and the objective sum_{t=1..T} J(theta_t)."""
        k, steps = self.config.checkpoint_every, self.config.steps
        objective, co_state = self.target_gradient(self._load(kept[steps]))
        dots = np.zeros(len(self.proxy), dtype=np.float64)
        bar = progress(total=steps, desc=f"pds epoch {self.epoch} backward", disable=not self.show_progress)
        for start in reversed(range(0, steps, k)):
            segment = self._recompute_segment(kept[start], start, min(start + k, steps), gamma)
            for t in reversed(range(start, start + len(segment))):
                theta = segment.pop()
                self.accumulate_dots(theta, t, co_state, dots)
                if t > 0:
                    loss, grad_j = self.target_gradient(theta)
                    objective += loss
                    co_state = self._co_state_step(theta, t, gamma, co_state, grad_j)
                bar.update(1)
        bar.close()
        return dots, objective

    def gamma_gradient(self, gamma: np.ndarray) -> tuple[np.ndarray, float]:
        """One forward and backward pass at `gamma`: (G, objective)."""
        gamma = self._check_gamma(gamma)
        with tf32_matmuls(self.config.tf32 and self.device.type == "cuda"):
            return self.backward(gamma, self.forward(gamma))

    def solve(
        self,
        gamma: np.ndarray | None = None,
        start_epoch: int = 0,
        on_epoch: Callable[[int, np.ndarray, float], None] | None = None,
    ) -> np.ndarray:
        """Outer loop: gamma <- project(gamma + alpha * G); `on_epoch(epoch, gamma, objective)` after each."""
        gamma = np.full(len(self.proxy), 1.0 / len(self.proxy)) if gamma is None else self._check_gamma(gamma)
        for epoch in range(start_epoch, self.config.outer_epochs):
            self.epoch = epoch
            dots, objective = self.gamma_gradient(gamma)
            gamma = project_to_simplex(gamma + self.config.alpha * dots)
            log.info("pds epoch %d: objective sum_t J(theta_t) = %.6f, gamma max %.3g, zeros %d",
                     epoch, objective, gamma.max(), int((gamma == 0).sum()))
            if on_epoch is not None:
                on_epoch(epoch, gamma, objective)
        return gamma

    # ----- helpers ------------------------------------------------------------------------------
    def _co_state_step(self, theta: Params, t: int, gamma: np.ndarray, co_state: Params, grad_j: Params) -> Params:
        """lambda_t = lambda_{t+1} + grad J(theta_t) - eta * H_t lambda_{t+1}."""
        hvp = self.training_hvp(theta, t, gamma, co_state)
        new = axpy(-self.config.lr, hvp, axpy(1.0, grad_j, co_state))
        if not all_finite(new):
            raise DselError(f"PDS solve: the co-state is not finite at inner step {t} of outer epoch {self.epoch}; "
                            "lower solver.lr")
        return new

    def _recompute_segment(self, theta: Params, start: int, stop: int, gamma: np.ndarray) -> list[Params]:
        """[theta_start, ..., theta_{stop-1}] recomputed from the stored theta_start."""
        segment = [self._load(theta)]
        for t in range(start, stop - 1):
            segment.append(self.step(segment[-1], t, gamma))
        return segment

    def _micro_batches(self, ids: np.ndarray, gamma: np.ndarray) -> Iterator[tuple[torch.Tensor, torch.Tensor, np.ndarray]]:
        """(tokens, weights s_t * gamma_n, ids) per micro-batch of one step's batch."""
        scale = len(self.proxy) / len(ids)
        dtype = _dtype(self.theta0)
        for start in range(0, len(ids), self.config.micro_batch):
            chunk = ids[start : start + self.config.micro_batch]
            weights = torch.as_tensor(gamma[chunk] * scale, dtype=dtype, device=self.device)
            yield self.proxy[chunk].to(self.device), weights, chunk

    def _store(self, theta: Params) -> Params:
        return {k: v.cpu() for k, v in theta.items()} if self.config.offload_trajectory else theta

    def _load(self, theta: Params) -> Params:
        return {k: v.to(self.device) for k, v in theta.items()}

    def _check_gamma(self, gamma: np.ndarray) -> np.ndarray:
        gamma = np.asarray(gamma, dtype=np.float64)
        if gamma.shape != (len(self.proxy),):
            raise DselError(f"PDS solve: gamma has shape {gamma.shape} but the proxy set has {len(self.proxy)} windows")
        return gamma


def _batch_schedule(num_examples: int, config: SolverConfig) -> list[np.ndarray]:
    """The proxy window ids of every inner step: all of them, or seeded shuffled passes of SGD batches."""
    if config.batch_size <= 0 or config.batch_size >= num_examples:
        return [np.arange(num_examples)] * config.steps
    rng = np.random.default_rng(config.seed)
    per_pass = num_examples // config.batch_size
    batches: list[np.ndarray] = []
    while len(batches) < config.steps:
        order = rng.permutation(num_examples)
        batches += [order[i * config.batch_size : (i + 1) * config.batch_size] for i in range(per_pass)]
    return [np.sort(b) for b in batches[: config.steps]]


def _check_config(config: SolverConfig) -> None:
    for name in ("steps", "outer_epochs", "micro_batch", "checkpoint_every"):
        if getattr(config, name) < 1:
            raise DselError(f"PDS solve: solver.{name} must be at least 1, got {getattr(config, name)}")
    if config.lr <= 0:
        raise DselError(f"PDS solve: solver.lr must be positive, got {config.lr}")


def _dtype(params: Params) -> torch.dtype:
    return next(iter(params.values())).dtype
