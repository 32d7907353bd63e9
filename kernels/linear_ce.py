"""Linear + cross-entropy per token, its gradient and its JVP, without [N, V] logits in memory.

This module holds the plain-torch reference (chunked over tokens, fp32 math) and the autograd
Function shared by the reference and the Triton kernels (`kernels/linear_ce_triton.py`). A backend
is any object with three methods:

    forward(h, W, y)            -> (loss[N] fp32, lse[N] fp32)
    backward(h, W, y, lse, g)   -> (grad_h like h, grad_W like W)     g = d total / d loss_n
    jvp(h, dh, W, dW, y)        -> (loss[N] fp32, tangent[N] fp32)    dh or dW may be None

with y = -100 marking ignored tokens (loss, tangent and gradient 0 there).
"""
import torch
import torch.nn.functional as F

from dsel.errors import DselError

IGNORE_INDEX = -100
LOGITS_BUDGET = 1 << 23  # fp32 logits elements one reference chunk may hold (32 MiB)


def check_inputs(hidden, weight, targets, d_hidden=None, d_weight=None):
    """Raise DselError on shapes or target ids the kernels cannot take (one readable line)."""
    if hidden.dim() != 2 or weight.dim() != 2 or targets.dim() != 1:
        raise DselError(f"linear_cross_entropy: expected hidden [N, d], weight [V, d], targets [N]; "
                        f"got {tuple(hidden.shape)}, {tuple(weight.shape)}, {tuple(targets.shape)}")
    if hidden.shape[1] != weight.shape[1] or hidden.shape[0] != targets.shape[0]:
        raise DselError(f"linear_cross_entropy: shapes do not match: hidden {tuple(hidden.shape)}, "
                        f"weight {tuple(weight.shape)}, targets {tuple(targets.shape)}")
    for name, tangent, primal in (("d_hidden", d_hidden, hidden), ("d_weight", d_weight, weight)):
        if tangent is not None and tangent.shape != primal.shape:
            raise DselError(f"linear_cross_entropy_jvp: {name} has shape {tuple(tangent.shape)}, "
                            f"expected {tuple(primal.shape)}")
    if targets.dtype not in (torch.int64, torch.int32):
        raise DselError(f"linear_cross_entropy: targets must be integer token ids, got {targets.dtype}")
    if targets.numel():
        bad = (targets >= weight.shape[0]) | ((targets < 0) & (targets != IGNORE_INDEX))
        if targets.is_cuda:  # a device-side assert: no host sync on every call
            torch._assert_async(~bad.any(), "linear_cross_entropy: a target id is outside the vocabulary")
        elif bool(bad.any()):
            raise DselError(f"linear_cross_entropy: target id {int(targets[bad][0])} is outside the "
                            f"vocabulary [0, {weight.shape[0]}) and is not the ignore index {IGNORE_INDEX}")


def token_chunks(num_tokens, vocab_size, budget=LOGITS_BUDGET):
    """Token ranges [start, stop) whose fp32 logits fit in `budget` elements."""
    rows = max(1, budget // max(vocab_size, 1))
    return [(start, min(start + rows, num_tokens)) for start in range(0, num_tokens, rows)]


def _target_term(values, targets):
    """values[n, targets[n]] with 0 where the token is ignored."""
    valid = targets != IGNORE_INDEX
    picked = values.gather(1, targets.clamp(min=0).long()[:, None])[:, 0]
    return torch.where(valid, picked, torch.zeros_like(picked))


def plain_cross_entropy(h, W, y):
    """Per-token loss with all [N, V] logits materialised in fp32: plain torch autograd (both modes)."""
    return F.cross_entropy(h.float() @ W.float().T, y.long(), reduction="none", ignore_index=IGNORE_INDEX)


def torch_chunked_cross_entropy(h, W, y, budget=LOGITS_BUDGET):
    """Per-token loss by torch's own chunked head (F.linear_cross_entropy, torch >= 2.13), fp32 math:
    chunks of `budget` logits like the reference (its default chunks, logits the size of the hidden
    states, are 20-40x slower on CPU) and the 'accurate' policy (fp32 matmuls on CPU). Reverse mode only."""
    if not hasattr(F, "linear_cross_entropy"):
        raise DselError(f"DSEL_KERNELS=torch-lce needs torch >= 2.13 (F.linear_cross_entropy), this is "
                        f"{torch.__version__}")
    rows = min(max(1, budget // max(W.shape[0], 1)), max(h.shape[0], 1))
    options = torch.nn.LinearCrossEntropyOptions(acc_policy="accurate", chunking_method=None, batch_chunk_size=rows)
    return F.linear_cross_entropy(h.float(), W.float(), y.long(), reduction="none", ignore_index=IGNORE_INDEX,
                                  options=options)


class ReferenceBackend:
    """Plain torch, fp32 math, logits materialised one token chunk at a time.

    Its lse output is 0 at ignored tokens (its backward recomputes the softmax and needs no lse).
    """

    def __init__(self, budget=LOGITS_BUDGET):
        self.budget = budget

    def forward(self, h, W, y):
        W32 = W.float()
        loss = torch.empty(h.shape[0], dtype=torch.float32, device=h.device)
        lse = torch.empty_like(loss)
        for a, b in token_chunks(h.shape[0], W.shape[0], self.budget):
            logits = h[a:b].float() @ W32.T
            loss[a:b] = F.cross_entropy(logits, y[a:b].long(), reduction="none", ignore_index=IGNORE_INDEX)
            lse[a:b] = loss[a:b] + _target_term(logits, y[a:b])
        return loss, lse

    def backward(self, h, W, y, lse, g):
        W32 = W.float()
        grad_h = torch.empty_like(h)
        grad_W = torch.zeros_like(W32)
        g = torch.where(y != IGNORE_INDEX, g.float(), 0.0)
        for a, b in token_chunks(h.shape[0], W.shape[0], self.budget):
            h32 = h[a:b].float()
            d_logits = torch.softmax(h32 @ W32.T, dim=1)
            rows = torch.arange(b - a, device=h.device)
            valid = y[a:b] != IGNORE_INDEX
            d_logits[rows[valid], y[a:b][valid].long()] -= 1.0
            d_logits *= g[a:b, None]
            grad_h[a:b] = (d_logits @ W32).to(h.dtype)
            grad_W += d_logits.T @ h32
        return grad_h, grad_W.to(W.dtype)

    def jvp(self, h, dh, W, dW, y):
        W32 = W.float()
        dW32 = None if dW is None else dW.float()
        loss = torch.empty(h.shape[0], dtype=torch.float32, device=h.device)
        tangent = torch.zeros_like(loss)
        valid = y != IGNORE_INDEX
        for a, b in token_chunks(h.shape[0], W.shape[0], self.budget):
            h32 = h[a:b].float()
            log_p = torch.log_softmax(h32 @ W32.T, dim=1)
            loss[a:b] = -_target_term(log_p, y[a:b])
            d_logits = _tangent_logits(h32, None if dh is None else dh[a:b].float(), W32, dW32)
            if d_logits is None:
                continue
            expected = (log_p.exp_() * d_logits).sum(1)
            tangent[a:b] = torch.where(valid[a:b], expected, 0.0) - _target_term(d_logits, y[a:b])
        return loss, tangent


def _tangent_logits(h32, dh32, W32, dW32):
    """z' = dh W^T + h dW^T for one chunk (None when both tangents are absent)."""
    terms = []
    if dh32 is not None:
        terms.append(dh32 @ W32.T)
    if dW32 is not None:
        terms.append(h32 @ dW32.T)
    return None if not terms else sum(terms[1:], terms[0])


class LinearCrossEntropyFunction(torch.autograd.Function):
    """Per-token loss with reverse mode (recomputing blockwise) and forward mode (the JVP sweep).

    Outputs (loss, lse); lse is saved for backward and is not differentiable.
    """

    @staticmethod
    def forward(hidden, weight, targets, backend):
        return backend.forward(hidden, weight, targets)

    @staticmethod
    def setup_context(ctx, inputs, output):
        hidden, weight, targets, backend = inputs
        ctx.backend = backend
        ctx.mark_non_differentiable(output[1])
        ctx.save_for_backward(hidden, weight, targets, output[1])
        ctx.save_for_forward(hidden, weight, targets)

    @staticmethod
    def backward(ctx, grad_loss, _grad_lse):
        hidden, weight, targets, lse = ctx.saved_tensors
        grad_h, grad_W = ctx.backend.backward(hidden, weight, targets, lse, grad_loss.contiguous())
        return (grad_h if ctx.needs_input_grad[0] else None,
                grad_W if ctx.needs_input_grad[1] else None, None, None)

    @staticmethod
    def jvp(ctx, d_hidden, d_weight, _d_targets, _d_backend):
        hidden, weight, targets = ctx.saved_tensors
        _, tangent = ctx.backend.jvp(hidden, d_hidden, weight, d_weight, targets)
        return tangent, None


def linear_cross_entropy_reference(hidden, weight, targets, budget=LOGITS_BUDGET):
    """Per-token cross-entropy of (hidden @ weight.T) vs targets, fp32 [N]; plain torch, chunked."""
    check_inputs(hidden, weight, targets)
    return LinearCrossEntropyFunction.apply(hidden, weight, targets, ReferenceBackend(budget))[0]


def linear_cross_entropy_jvp_reference(hidden, d_hidden, weight, d_weight, targets, budget=LOGITS_BUDGET):
    """(loss[N], tangent[N]) with tangent_n = sum_v (p_v - y_v)(h_n.dW_v + dh_n.W_v); plain torch."""
    check_inputs(hidden, weight, targets, d_hidden, d_weight)
    return ReferenceBackend(budget).jvp(hidden, d_hidden, weight, d_weight, targets)
