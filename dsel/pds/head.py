"""The LM head as the PMP solver needs it: per-token losses and their directional derivatives.

The hidden states [N, d] and head weight [V, d] come from the proxy model; the loss of token n is
the cross-entropy of logits h_n W^T against its target. Three uses:
- `head_losses`: first-order training gradients (fused kernel: no [N, V] logits held);
- `head_losses_twice_differentiable`: the Hessian-vector product needs a double backward, which
  only plain torch ops provide, so logits are materialised per micro-batch there;
- `head_losses_jvp`: loss and tangent sum_v (p_v - y_v)(h_n.dW_v + dh_n.W_v) for grad l . lambda
  (the fused `kernels.linear_cross_entropy_jvp`).
The fused kernels compute in fp32; fp64 (the solver's exactness tests) runs in plain torch.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

import kernels

IGNORE_INDEX = kernels.IGNORE_INDEX


def head_losses_twice_differentiable(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-token cross-entropy with logits materialised (0 where the target is ignored)."""
    return F.cross_entropy(hidden @ weight.T, targets, reduction="none", ignore_index=IGNORE_INDEX)


def head_losses(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-token cross-entropy: the fused kernel, or plain torch in fp64."""
    if hidden.dtype == torch.float64:
        return head_losses_twice_differentiable(hidden, weight, targets)
    return kernels.linear_cross_entropy(hidden, weight, targets)


def head_losses_jvp(hidden, d_hidden, weight, d_weight, targets) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss[N], tangent[N]) of the per-token loss along (d_hidden, d_weight)."""
    if hidden.dtype == torch.float64:
        return _head_losses_jvp_fp64(hidden, d_hidden, weight, d_weight, targets)
    return kernels.linear_cross_entropy_jvp(hidden, d_hidden, weight, d_weight, targets)


def _head_losses_jvp_fp64(hidden, d_hidden, weight, d_weight, targets) -> tuple[torch.Tensor, torch.Tensor]:
    """The head JVP in fp64 by torch.func.jvp through plain cross-entropy (logits materialised)."""
    return torch.func.jvp(
        lambda h, w: head_losses_twice_differentiable(h, w, targets), (hidden, weight), (d_hidden, d_weight)
    )
