"""A functional view of the proxy LM: losses, gradients, HVPs and JVPs at explicit parameters.

The solver moves the parameters along a trajectory theta_0..theta_T without touching the module,
so everything here takes `params` (a dict name -> tensor) and calls the module through
`torch.func.functional_call`. The module only has to expose the contract of dsel.models.gpt.GPT:
`hidden_states(tokens[B, L]) -> [B, L, d]` and `head_weight -> [V, d]`.

A window of W tokens gives W-1 predictions (inputs tokens[:, :-1], targets tokens[:, 1:]); the
loss of an example is the mean over them, as in `GPT.sequence_losses`. Target examples of unequal
length are right-padded with PAD: padding is never a target, so each example's loss is the mean
over its own tokens.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from dsel.pds.head import IGNORE_INDEX, head_losses, head_losses_jvp, head_losses_twice_differentiable

Params = dict[str, torch.Tensor]
PAD = -1  # right padding of target examples


class _Trunk(nn.Module):
    """Wraps the LM so that one functional call returns (hidden states, head weight)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model.hidden_states(tokens), self.model.head_weight


class FunctionalLM:
    """Per-example losses of a causal LM and their derivatives, evaluated at given parameters."""

    def __init__(self, model: nn.Module):
        self.trunk = _Trunk(model).eval()

    def initial_params(self) -> Params:
        """Detached copies of the module's parameters (tied weights appear once)."""
        return {name: p.detach().clone() for name, p in self.trunk.named_parameters()}

    def example_losses(self, params: Params, tokens: torch.Tensor, twice_differentiable: bool = False) -> torch.Tensor:
        """Mean next-token loss of each window over its non-padding targets: [B]."""
        inputs, targets = split_padded(tokens)
        hidden, weight = torch.func.functional_call(self.trunk, params, (inputs,))
        losses = head_losses_twice_differentiable if twice_differentiable else head_losses
        per_token = losses(hidden.flatten(0, 1), weight, targets.flatten()).view(targets.shape)
        if tokens.min() != PAD:
            return per_token.mean(dim=1)
        return per_token.sum(dim=1) / (targets != IGNORE_INDEX).sum(dim=1).clamp(min=1)

    def gradient(self, params: Params, tokens: torch.Tensor, weights: torch.Tensor) -> tuple[Params, torch.Tensor]:
        """Gradient of sum_n weights_n * l_n at `params`, and the per-example losses."""
        leaves = _leaves(params)
        losses = self.example_losses(leaves, tokens)
        grads = torch.autograd.grad((weights * losses).sum(), list(leaves.values()))
        return dict(zip(leaves, grads)), losses.detach()

    def hvp(self, params: Params, tokens: torch.Tensor, weights: torch.Tensor, vector: Params) -> Params:
        """Hessian of sum_n weights_n * l_n at `params` times `vector` (double backward)."""
        leaves = _leaves(params)
        with sdpa_kernel([SDPBackend.MATH]):
            losses = self.example_losses(leaves, tokens, twice_differentiable=True)
            grads = torch.autograd.grad((weights * losses).sum(), list(leaves.values()), create_graph=True)
            product = torch.autograd.grad(grads, list(leaves.values()), grad_outputs=[vector[k] for k in leaves])
        return dict(zip(leaves, product))

    def example_dots(self, params: Params, tokens: torch.Tensor, vector: Params) -> tuple[torch.Tensor, torch.Tensor]:
        """(l_n, grad l_n . vector) for every window n, by one forward-mode pass over the batch."""
        inputs, targets = tokens[:, :-1], tokens[:, 1:]

        def trunk(p: Params):
            return torch.func.functional_call(self.trunk, p, (inputs,))

        with torch.no_grad(), sdpa_kernel([SDPBackend.MATH]):
            (hidden, weight), (d_hidden, d_weight) = torch.func.jvp(trunk, (params,), (vector,))
            loss, tangent = head_losses_jvp(
                hidden.flatten(0, 1), d_hidden.flatten(0, 1), weight, d_weight, targets.flatten()
            )
        return loss.view(targets.shape).mean(dim=1), tangent.view(targets.shape).mean(dim=1)


def split_padded(tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets) of windows [B, W]: PAD inputs become token 0 (they only follow real tokens,
    so a causal model never lets them change a real prediction), PAD targets are ignored."""
    if tokens.min() != PAD:
        return tokens[:, :-1], tokens[:, 1:]
    inputs, targets = tokens[:, :-1].clamp(min=0), tokens[:, 1:]
    return inputs, targets.masked_fill(targets == PAD, IGNORE_INDEX)


def axpy(alpha: float, x: Params, y: Params) -> Params:
    """alpha * x + y, key by key."""
    return {k: torch.add(y[k], x[k], alpha=alpha) for k in y}


def zeros_like(params: Params) -> Params:
    return {k: torch.zeros_like(v) for k, v in params.items()}


def all_finite(params: Params) -> bool:
    return all(bool(torch.isfinite(v).all()) for v in params.values())


def to_device(params: Params, device: torch.device | str) -> Params:
    return {k: v.to(device) for k, v in params.items()}


def _leaves(params: Params) -> Params:
    return {k: v.detach().requires_grad_(True) for k, v in params.items()}


def parameter_count(params: Params | Sequence[torch.Tensor]) -> int:
    values = params.values() if isinstance(params, dict) else params
    return sum(v.numel() for v in values)
