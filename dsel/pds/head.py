"""The LM head as the PMP solver needs it: per-token losses and their directional derivatives.

The hidden states [N, d] and head weight [V, d] come from the proxy model; the loss of token n is
the cross-entropy of logits h_n W^T against its target. Three uses:
- `head_losses`: first-order training gradients (fused kernel, no [N, V] logits on the GPU);
- `head_losses_twice_differentiable`: the Hessian-vector product needs a double backward, which
  only plain torch ops provide, so logits are materialised per micro-batch there;
- `head_losses_jvp`: loss and tangent sum_v (p_v - y_v)(h_n.dW_v + dh_n.W_v) for grad l . lambda.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def head_losses_twice_differentiable(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-token cross-entropy with logits materialised (0 where the target is ignored)."""
    return F.cross_entropy(hidden @ weight.T, targets, reduction="none", ignore_index=IGNORE_INDEX)


def head_losses(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-token cross-entropy through the fused kernel when it is available."""
    fused = _fused_kernels()
    if fused is None:
        return head_losses_twice_differentiable(hidden, weight, targets)
    return fused.linear_cross_entropy(hidden, weight, targets)


def head_losses_jvp(hidden, d_hidden, weight, d_weight, targets) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss[N], tangent[N]) of the per-token loss along (d_hidden, d_weight)."""
    fused = _fused_kernels()
    if fused is None:
        return head_losses_jvp_reference(hidden, d_hidden, weight, d_weight, targets)
    return fused.linear_cross_entropy_jvp(hidden, d_hidden, weight, d_weight, targets)


def head_losses_jvp_reference(hidden, d_hidden, weight, d_weight, targets) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain-torch head JVP with logits materialised: the reference for the fused kernel."""
    dtype = torch.promote_types(hidden.dtype, torch.float32)
    logits = (hidden @ weight.T).to(dtype)
    d_logits = (d_hidden @ weight.T + hidden @ d_weight.T).to(dtype)
    valid = targets != IGNORE_INDEX
    safe = torch.where(valid, targets, 0)
    lse = torch.logsumexp(logits, dim=-1)
    probs = torch.exp(logits - lse[:, None])
    loss = lse - logits.gather(1, safe[:, None]).squeeze(1)
    tangent = (probs * d_logits).sum(-1) - d_logits.gather(1, safe[:, None]).squeeze(1)
    zero = torch.zeros((), dtype=loss.dtype, device=loss.device)
    return torch.where(valid, loss, zero), torch.where(valid, tangent, zero)


def _fused_kernels():
    """The `kernels` package if it provides the fused head ops, else None (plain torch)."""
    try:
        import kernels
    except ImportError:
        return None
    if hasattr(kernels, "linear_cross_entropy") and hasattr(kernels, "linear_cross_entropy_jvp"):
        return kernels
    return None
