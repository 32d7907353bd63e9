"""The PMP data-weight solver of PDS (Gu et al.): optimal control of the proxy training run.

Forward (inner training, plain (S)GD with per-example weights gamma):
    theta_{t+1} = theta_t - eta * grad L_t(theta_t),   L_t = s_t * sum_{n in B_t} gamma_n l(x_n, .)
where B_t is step t's batch (all proxy windows for full-batch GD) and s_t = N / |B_t| keeps L_t an
unbiased estimate of sum_n gamma_n l_n.  Objective: the area under the target-loss curve,
sum_{t=1..T} J(theta_t), J = the mean over target examples of each example's mean token loss.
Co-state, backward in time:
    lambda_T = grad J(theta_T)
    lambda_t = lambda_{t+1} + grad J(theta_t) - eta * H_t lambda_{t+1},   H_t = Hessian of L_t
and the per-window ascent direction G (REFERENCE.md's convention, eta folded out):
    exact:      G_n = sum_{t=0..T-1} s_t [n in B_t] grad l(x_n, theta_t) . lambda_{t+1}
                    = -(1/eta) d(sum_{t=1..T} J(theta_t)) / d gamma_n
    fixed-step: G_n = sum_{t in S} grad l(x_n, theta_t) . lambda_{t+1},  S = {0, k, 2k, ...}
Full-batch GD uses the exact G (every window is in every step). In SGD mode (batch_size > 0) the
exact G of a window only sees the 2-3 steps it was drawn at, so it partly measures *when* it was
drawn; the official code instead scores every proxy window at every k-th step (score_every=k), the
default here too (score_every=0 selects the exact G).

What the scorer is fitted to (`scorer_target`): by default the official target, G of the last outer
epoch z-scored over the proxy set and clipped to +-3; or the projected-simplex gamma (Algorithm 1
of the paper), gamma <- project(gamma + alpha/N * z(G)), z-scored. Between outer epochs gamma is
updated by that projected step; its size is in units of G's standard deviation, so no setting
depends on the number of windows, the model or the corpus.

G_n for all n at step t is one forward-mode pass per micro-batch (FunctionalLM.example_dots).
The trajectory is kept every `checkpoint_every` steps; the backward pass recomputes each segment
from its checkpoint, so memory holds T/k + k parameter copies instead of T + 1.

Under torchrun every rank takes every world-th micro-batch of each sum (training gradient, HVP,
target gradient, per-window dots) and the partial sums are all-reduced, so every rank follows the
same trajectory and ends with the same G as a single process.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Iterator, Literal, Sequence

import numpy as np
import torch
from torch import nn

from dsel.config import option
from dsel.device import tf32_matmuls
from dsel.errors import DselError
from dsel.io import progress
from dsel.pds.functional import PAD, FunctionalLM, Params, all_finite, axpy, zeros_like
from dsel.pds.simplex import project_to_simplex

log = logging.getLogger(__name__)

TargetKind = Literal["zscore", "gamma"]
DESCENT_TOLERANCE = 1e-5  # relative rise of the proxy loss below which it counts as flat (fp32 rounding)
ZERO_WEIGHT_LIMIT = 0.5  # a projected gamma with more windows at zero leaves the scorer too little to learn


@dataclass
class SolverConfig:
    """Settings of the PMP solver (the inner proxy training, the score estimator, the scorer target)."""

    steps: int = option(100, "inner training steps T (official: 100)")
    lr: float = option(0.1, "inner (S)GD learning rate eta")
    batch_size: int = option(0, "proxy windows per inner step; 0 = all of them (full-batch GD)")
    score_every: int = option(10, "SGD mode: every proxy window's grad l . lambda at every k-th step (official: "
                                  "10); 0 = each window only at the steps it was drawn (the exact gradient)")
    target_kind: TargetKind = option("zscore", "scorer target: zscore = G z-scored over the proxy set and clipped "
                                               "to +-clip (official); gamma = the projected-simplex gamma, z-scored")
    clip: float = option(3.0, "zscore target: clip to +-clip standard deviations (official: 3)")
    outer_epochs: int = option(1, "outer gamma updates (official: 1)")
    alpha: float = option(0.5, "projected gamma step: gamma += alpha/N * z-score(G), then onto the simplex "
                               "(windows more than 1/alpha standard deviations below the mean drop to 0)")
    micro_batch: int = option(16, "windows per forward/backward pass (memory knob, no effect on results)")
    checkpoint_every: int = option(1, "store theta every k steps and recompute the rest backward; 1 = store all")
    offload_trajectory: bool = option(False, "keep stored parameters in CPU memory instead of on the device")
    seed: int = option(0, "seed of the SGD batch order (batch_size > 0)")
    tf32: bool = option(True, "on GPU, fp32 matmuls and the fused head use TF32 tensor cores (off = exact fp32)")


@dataclass
class EpochResult:
    """One outer epoch: the ascent direction G, the objective at the gamma it started from, the new gamma."""

    G: np.ndarray
    objective: float
    gamma: np.ndarray
    proxy_loss: dict[int, float]  # the gamma-weighted proxy loss at the inner steps where all of it is known


class PMPSolver:
    """Solves PDS's per-window scores for a proxy set against a target set with a fixed proxy LM."""

    def __init__(
        self,
        model: nn.Module,
        proxy: np.ndarray | torch.Tensor,
        target: np.ndarray | torch.Tensor | Sequence[np.ndarray],
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
        self.target, self.target_lengths = pad_examples(target)
        if len(self.proxy) == 0 or len(self.target) == 0:
            raise DselError("PDS solve: the proxy and target sets need at least one window each")
        self.batches = _batch_schedule(len(self.proxy), config)
        self.full_batch = all(len(b) == len(self.proxy) for b in self.batches)
        self.rank, self.world = _rank_and_world()
        self.show_progress = show_progress and self.rank == 0
        self.epoch = 0
        self.proxy_loss: dict[int, float] = {}  # this epoch's gamma-weighted proxy loss by inner step

    @property
    def num_examples(self) -> int:
        return len(self.proxy)

    @property
    def estimator(self) -> str:
        """'exact' (full batch, or SGD with score_every=0) or 'fixed-step' (SGD, every k-th step)."""
        return "exact" if self.full_batch or self.config.score_every == 0 else "fixed-step"

    # ----- forward: the weighted inner training -------------------------------------------------
    def step(self, theta: Params, t: int, gamma: np.ndarray) -> Params:
        """theta_{t+1} from theta_t: one (S)GD step on the gamma-weighted loss of batch B_t."""
        grad = zeros_like(theta)
        total_loss = weighted_loss = 0.0
        for tokens, weights, _ in self._micro_batches(self.batches[t], gamma):
            g, losses = self.lm.gradient(theta, tokens, weights)
            grad = axpy(1.0, g, grad)
            total_loss += float(losses.sum())
            weighted_loss += float((weights * losses).sum())
        grad, (total_loss, weighted_loss) = self._all_reduce(grad, total_loss, weighted_loss)
        mean_loss = total_loss / len(self.batches[t])
        if not np.isfinite(mean_loss) or not all_finite(grad):
            raise DselError(
                f"PDS solve: the proxy training loss is {mean_loss} at inner step {t} of outer epoch "
                f"{self.epoch}; lower solver.lr or check the proxy model"
            )
        if self.full_batch:
            self.proxy_loss[t] = weighted_loss
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
        """J(theta) (mean over target examples of each one's mean token loss) and its gradient."""
        grad = zeros_like(theta)
        total = 0.0
        scale = 1.0 / len(self.target)
        for chunk in self._my_chunks(np.arange(len(self.target))):
            longest = int(self.target_lengths[chunk].max())
            tokens = self.target[chunk, :longest].to(self.device)
            weights = torch.full((len(tokens),), scale, dtype=_dtype(theta), device=self.device)
            g, losses = self.lm.gradient(theta, tokens, weights)
            grad = axpy(1.0, g, grad)
            total += float(losses.sum()) * scale
        grad, (total,) = self._all_reduce(grad, total)
        return total, grad

    def training_hvp(self, theta: Params, t: int, gamma: np.ndarray, vector: Params) -> Params:
        """H_t vector: Hessian of step t's weighted training loss at theta times `vector`."""
        product = zeros_like(theta)
        for tokens, weights, _ in self._micro_batches(self.batches[t], gamma):
            product = axpy(1.0, self.lm.hvp(theta, tokens, weights, vector), product)
        return self._all_reduce(product)[0]

    def scored_windows(self, t: int) -> tuple[np.ndarray, float]:
        """(windows whose grad l . lambda_{t+1} enters G at step t, their factor)."""
        if self.estimator == "exact":
            ids = self.batches[t]
            return ids, len(self.proxy) / len(ids)
        if t % self.config.score_every == 0:
            return np.arange(len(self.proxy)), 1.0
        return np.arange(0), 0.0

    def accumulate_dots(self, theta: Params, t: int, co_state: Params, out: np.ndarray, gamma: np.ndarray) -> float:
        """out[n] += factor * grad l(x_n, theta_t) . lambda_{t+1} for this rank's share of step t's scored windows;
        returns this rank's share of sum_n gamma_n l(x_n, theta_t) over them."""
        ids, scale = self.scored_windows(t)
        weighted_loss = 0.0
        for chunk in self._my_chunks(ids):
            losses, dots = self.lm.example_dots(theta, self.proxy[chunk].to(self.device), co_state)
            out[chunk] += scale * dots.double().cpu().numpy()
            weighted_loss += float((torch.as_tensor(gamma[chunk]) * losses.double().cpu()).sum())
        return weighted_loss

    def backward(self, gamma: np.ndarray, kept: dict[int, Params]) -> tuple[np.ndarray, float]:
        """G (the gamma ascent direction) and the objective sum_{t=1..T} J(theta_t)."""
        k, steps = self.config.checkpoint_every, self.config.steps
        objective, co_state = self.target_gradient(self._load(kept[steps]))
        dots = np.zeros(len(self.proxy), dtype=np.float64)
        scored_loss: dict[int, float] = {}
        bar = progress(total=steps, desc=f"pds epoch {self.epoch} backward", disable=not self.show_progress)
        for start in reversed(range(0, steps, k)):
            segment = self._recompute_segment(kept[start], start, min(start + k, steps), gamma)
            for t in reversed(range(start, start + len(segment))):
                theta = segment.pop()
                loss = self.accumulate_dots(theta, t, co_state, dots, gamma)
                if self.estimator == "fixed-step" and t % self.config.score_every == 0:
                    scored_loss[t] = loss
                if t > 0:
                    loss, grad_j = self.target_gradient(theta)
                    objective += loss
                    co_state = self._co_state_step(theta, t, gamma, co_state, grad_j)
                bar.update(1)
        bar.close()
        if scored_loss:
            steps_scored = sorted(scored_loss)
            totals = self._all_reduce_array(np.array([scored_loss[t] for t in steps_scored]))
            self.proxy_loss.update(zip(steps_scored, map(float, totals)))
        return self._all_reduce_array(dots), objective

    def gamma_gradient(self, gamma: np.ndarray) -> tuple[np.ndarray, float]:
        """One forward and backward pass at `gamma`: (G, objective)."""
        gamma = self._check_gamma(gamma)
        self.proxy_loss = {}
        with tf32_matmuls(self.config.tf32 and self.device.type == "cuda"):
            kept = self.forward(gamma)
            check_descent(self.proxy_loss, self.epoch, self.config.lr)  # full batch: before the costly backward
            G, objective = self.backward(gamma, kept)
            check_descent(self.proxy_loss, self.epoch, self.config.lr)  # fixed-step SGD: from the scored steps
            return G, objective

    def solve(
        self,
        gamma: np.ndarray | None = None,
        start_epoch: int = 0,
        on_epoch: Callable[[int, EpochResult], None] | None = None,
    ) -> list[EpochResult]:
        """Outer loop from `start_epoch`: G at gamma, then gamma <- project(gamma + alpha/N * z(G)).

        Stops with one line when G has no spread or the projected step zeroes most windows."""
        gamma = np.full(len(self.proxy), 1.0 / len(self.proxy)) if gamma is None else self._check_gamma(gamma)
        results = []
        for epoch in range(start_epoch, self.config.outer_epochs):
            self.epoch = epoch
            G, objective = self.gamma_gradient(gamma)
            check_spread(G, f"G after outer epoch {epoch}")
            gamma = gamma_step(gamma, G, self.config.alpha)
            if self.config.target_kind == "gamma" or epoch + 1 < self.config.outer_epochs:
                check_zero_weights(gamma, epoch)
            log.info("pds epoch %d: objective sum_t J(theta_t) = %.6f, proxy loss %s, G std %.3g, gamma zeros %d",
                     epoch, objective, _loss_span(self.proxy_loss), G.std(), int((gamma == 0).sum()))
            results.append(EpochResult(G, objective, gamma, dict(self.proxy_loss)))
            if on_epoch is not None:
                on_epoch(epoch, results[-1])
        return results

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

    def _my_chunks(self, ids: np.ndarray) -> list[np.ndarray]:
        """This rank's micro-batches of `ids`: every world-th chunk of micro_batch ids."""
        size = self.config.micro_batch
        chunks = [ids[i : i + size] for i in range(0, len(ids), size)]
        return chunks[self.rank :: self.world]

    def _micro_batches(self, ids: np.ndarray, gamma: np.ndarray) -> Iterator[tuple[torch.Tensor, torch.Tensor, np.ndarray]]:
        """(tokens, weights s_t * gamma_n, ids) per micro-batch of this rank's share of one step's batch."""
        scale = len(self.proxy) / len(ids)
        dtype = _dtype(self.theta0)
        for chunk in self._my_chunks(ids):
            weights = torch.as_tensor(gamma[chunk] * scale, dtype=dtype, device=self.device)
            yield self.proxy[chunk].to(self.device), weights, chunk

    def _all_reduce(self, params: Params, *scalars: float) -> tuple[Params, list[float]]:
        """Sums of `params` and `scalars` over the ranks (as they are with one rank)."""
        if self.world == 1:
            return params, list(scalars)
        import torch.distributed as dist

        values = list(params.values())
        flat = torch.cat([v.reshape(-1) for v in values]
                         + [torch.tensor(scalars, dtype=values[0].dtype, device=values[0].device)])
        dist.all_reduce(flat)
        out, offset = {}, 0
        for name, v in params.items():
            out[name] = flat[offset : offset + v.numel()].view_as(v)
            offset += v.numel()
        return out, flat[offset:].tolist()

    def _all_reduce_array(self, values: np.ndarray) -> np.ndarray:
        if self.world == 1:
            return values
        import torch.distributed as dist

        tensor = torch.as_tensor(values, device=self.device)
        dist.all_reduce(tensor)
        return tensor.cpu().numpy()

    def _store(self, theta: Params) -> Params:
        return {k: v.cpu() for k, v in theta.items()} if self.config.offload_trajectory else theta

    def _load(self, theta: Params) -> Params:
        return {k: v.to(self.device) for k, v in theta.items()}

    def _check_gamma(self, gamma: np.ndarray) -> np.ndarray:
        gamma = np.asarray(gamma, dtype=np.float64)
        if gamma.shape != (len(self.proxy),):
            raise DselError(f"PDS solve: gamma has shape {gamma.shape} but the proxy set has {len(self.proxy)} windows")
        return gamma


# ----- from G to the scorer's target -------------------------------------------------------------
def check_spread(values: np.ndarray, what: str) -> None:
    """Refuse values with (near-)zero spread over the proxy set: the scorer would fit a constant."""
    values = np.asarray(values, dtype=np.float64)
    std, largest = float(values.std()), float(np.abs(values).max())
    if not np.isfinite(std) or not std > 1e-6 * largest:
        raise DselError(f"PDS solve: {what} has no spread over the {len(values)} proxy windows (std {std:.3g}, "
                        f"max |value| {largest:.3g}); the target loss does not respond to the proxy data: raise "
                        "solver.lr or solver.steps, or check that target and proxy share a tokenizer")


def check_descent(proxy_loss: dict[int, float], epoch: int, lr: float) -> None:
    """Refuse an inner training whose proxy loss rises between two steps where it is tracked.

    G differentiates the target loss along the inner trajectory. Within the stable step-size range (S)GD
    lowers the whole weighted proxy loss at every tracked step (measured on the quickstart prior: monotone at
    lr 0.05 and 0.1 in full-batch and SGD mode); beyond it the loss bumps up (lr 0.2: +0.2% for one step),
    the trajectory oscillates, and G follows the oscillation, not the data: the Spearman between two solver
    seeds falls from 0.97 at lr 0.1 to 0.29 at lr 0.2 and -0.30 at lr 0.5. Tracked at every step in
    full-batch mode, at the scored steps of the fixed-step SGD estimator, not with score_every=0. A rise
    within fp32 rounding (DESCENT_TOLERANCE, relative) is not counted."""
    steps = sorted(proxy_loss)
    for before, after in zip(steps, steps[1:]):
        if proxy_loss[after] > proxy_loss[before] * (1 + DESCENT_TOLERANCE):
            raise DselError(f"PDS solve: the inner training does not descend: its proxy loss rose from "
                            f"{proxy_loss[before]:.4f} at step {before} to {proxy_loss[after]:.4f} at step {after} "
                            f"in outer epoch {epoch}, so G would follow an unstable trajectory; lower solver.lr "
                            f"(now {lr})")


def _loss_span(proxy_loss: dict[int, float]) -> str:
    if not proxy_loss:
        return "not tracked (score_every=0)"
    first, last = min(proxy_loss), max(proxy_loss)
    return f"{proxy_loss[first]:.4f} (step {first}) -> {proxy_loss[last]:.4f} (step {last})"


def zscore(values: np.ndarray) -> np.ndarray:
    values = np.asarray(values, dtype=np.float64)
    return (values - values.mean()) / values.std()


def gamma_step(gamma: np.ndarray, G: np.ndarray, alpha: float) -> np.ndarray:
    """project(gamma + alpha/N * z(G)): a step in units of G's spread, so alpha is free of N and scale."""
    return project_to_simplex(gamma + alpha / len(G) * zscore(G))


def check_zero_weights(gamma: np.ndarray, epoch: int) -> None:
    """Refuse a projected gamma that zeroes more than half of the proxy windows."""
    zeros = int((gamma == 0).sum())
    if zeros > ZERO_WEIGHT_LIMIT * len(gamma):
        raise DselError(f"PDS solve: {zeros} of {len(gamma)} proxy windows have weight 0 after outer epoch {epoch} "
                        "(more than half); lower solver.alpha or solver.outer_epochs, or use "
                        "solver.target_kind=zscore")


def scorer_target(kind: TargetKind, G: np.ndarray, gamma: np.ndarray, clip: float) -> np.ndarray:
    """What the data scorer is fitted to, one value per proxy window (float64)."""
    if kind == "zscore":
        check_spread(G, "G")
        return np.clip(zscore(G), -clip, clip)
    check_spread(gamma, "gamma")
    return zscore(gamma)


def pad_examples(examples) -> tuple[torch.Tensor, np.ndarray]:
    """Target examples (a 2-D array of windows or a list of 1-D token arrays) as [M, longest] padded
    with PAD, and their lengths."""
    if isinstance(examples, (np.ndarray, torch.Tensor)) and np.ndim(examples) == 2:
        array = np.asarray(examples, dtype=np.int64)
        return torch.as_tensor(array), np.full(len(array), array.shape[1], dtype=np.int64)
    lengths = np.array([len(e) for e in examples], dtype=np.int64)
    out = np.full((len(examples), int(lengths.max(initial=0))), PAD, dtype=np.int64)
    for row, example in enumerate(examples):
        out[row, : len(example)] = example
    return torch.as_tensor(out), lengths


def _rank_and_world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


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
    if config.score_every < 0:
        raise DselError(f"PDS solve: solver.score_every must be 0 (exact) or a step interval, got {config.score_every}")
    for name in ("lr", "alpha", "clip"):
        if not getattr(config, name) > 0:
            raise DselError(f"PDS solve: solver.{name} must be positive, got {getattr(config, name)}")


def _dtype(params: Params) -> torch.dtype:
    return next(iter(params.values())).dtype
