"""Triton kernels, each with a plain-torch reference beside it, and the dispatcher between them.

Four implementations of the fused head: `triton` (the kernels: compiled for CUDA tensors, or
all launches interpreted when TRITON_INTERPRET=1 was set before Triton's import, which CPU
tensors need), `reference` (plain torch, logits chunked over tokens, recomputed in backward),
`torch` (plain torch with all [N, V] fp32 logits materialised) and `torch-lce` (torch's own
chunked F.linear_cross_entropy, torch >= 2.13). Forward-mode JVPs of `torch` and `torch-lce`
run the reference (torch's op has no forward mode). `auto` (default) runs compiled Triton on
CUDA tensors (the reference when Triton is interpreted) and on CPU the path `cpu_backend`
picks per shape and mode. The environment variable DSEL_KERNELS forces one of them;
DSEL_KERNEL_CONFIG pins the Triton tiles (kernels/linear_ce_triton.py).
"""
import importlib.util
import os

import torch
from torch._C._functorch import is_functorch_wrapped_tensor

from dsel.errors import DselError
from kernels.linear_ce import (IGNORE_INDEX, LinearCrossEntropyFunction, ReferenceBackend, check_inputs,
                               linear_cross_entropy_jvp_reference, linear_cross_entropy_reference,
                               plain_cross_entropy, torch_chunked_cross_entropy)
from kernels.sequence import sequence_reduce

__all__ = ["IGNORE_INDEX", "backend_name", "cpu_backend", "head_operands", "linear_cross_entropy",
           "linear_cross_entropy_jvp", "linear_cross_entropy_reference", "linear_cross_entropy_jvp_reference",
           "sequence_reduce"]

_MODES = ("auto", "triton", "reference", "torch", "torch-lce")

# CPU dispatch, calibrated on this project's 2-core CI VM (2026-12-02, fp32, shared with other jobs,
# so +-30% noise; timings of kernels.linear_ce's plain_cross_entropy, ReferenceBackend and
# F.linear_cross_entropy chunked as the reference, medians of 3-5 calls) at (N, d, V) =
# (1016, 128, 4096), (256, 768, 50304), (1016, 128, 50304) (with backward) and (4064, 128, 4096):
# - loss + grad: materialised torch was fastest at every shape, 1.1-2x ahead of both chunked
#   paths, which recompute the logits in backward (1016x128x50304: 2.1 s vs 3.9 s reference,
#   6.0 s torch-lce), so it runs while its logits stay within PLAIN_GRAD_LOGITS_LIMIT;
# - loss alone: the same matmul-bound work, within noise while the logits are a few chunks;
#   plain ahead at 256x768x50304 (12.9M logits: 0.64-0.87 s vs 0.89-1.19 s), the reference ahead
#   at 1016x128x50304 in 3 of 4 runs (51M: 0.72-1.29 s vs 1.18-1.63 s) and benchmarks/score.py
#   --vocab-size 50304 (that shape) 2.7x faster with it, so the switch sits at 2^25 logits;
# - torch-lce was never faster than the better of the two (forward 0.82 vs 0.68 s, 1.48 vs
#   1.29 s; on CPU its default chunking, a logits chunk the size of the hidden states, ran 20-40x
#   slower), so auto does not pick it on CPU; DSEL_KERNELS=torch-lce runs it.
# Above the limits the chunked reference holds 32 MiB of logits, less than materialised torch.
PLAIN_LOGITS_LIMIT = 1 << 25  # [N, V] elements (128 MiB fp32) up to which CPU materialises them for the loss
PLAIN_GRAD_LOGITS_LIMIT = 1 << 26  # the same with a gradient to take (256 MiB fp32, saved for backward)


def cpu_backend(num_tokens, vocab_size, needs_grad=False) -> str:
    """'torch' or 'reference': the faster CPU path for this many tokens x vocabulary entries, with
    or without a backward to follow (measurements above)."""
    limit = PLAIN_GRAD_LOGITS_LIMIT if needs_grad else PLAIN_LOGITS_LIMIT
    return "torch" if num_tokens * vocab_size <= limit else "reference"


def backend_name(tensor, num_tokens=None, vocab_size=None, needs_grad=False) -> str:
    """'triton', 'reference', 'torch' or 'torch-lce': which implementation runs for this tensor (and,
    on CPU, this many tokens x vocabulary entries, with or without a gradient) under DSEL_KERNELS."""
    mode = os.environ.get("DSEL_KERNELS", "auto").strip().lower() or "auto"
    if mode not in _MODES:
        raise DselError(f"DSEL_KERNELS={mode!r} is not one of {', '.join(_MODES)}")
    if mode != "auto":
        return mode
    if tensor.is_cuda and importlib.util.find_spec("triton"):
        from kernels.linear_ce_triton import INTERPRETED
        return "reference" if INTERPRETED else "triton"  # the interpreter is for CPU tests only
    if num_tokens is None or vocab_size is None:
        return "torch"
    return cpu_backend(num_tokens, vocab_size, needs_grad)


def _backend(name, tensor):
    """The backend object (see kernels/linear_ce.py) of an implementation name, for this tensor."""
    if name == "triton":
        from kernels.linear_ce_triton import INTERPRETED, TritonBackend
        if not tensor.is_cuda and not INTERPRETED:
            raise DselError("DSEL_KERNELS=triton on CPU tensors needs TRITON_INTERPRET=1 in the environment "
                            "before Triton is first imported")
        return TritonBackend()
    return ReferenceBackend()


def head_operands(hidden, weight):
    """(hidden, weight) in the dtype the LM head runs in: the autocast dtype where autocast is on
    for hidden's device (bf16 operands on tensor cores; the kernels accumulate in fp32), else
    hidden's dtype. Under autocast the residual stream and the final norm stay fp32, so without
    this the head would run as an fp32 matmul."""
    device = hidden.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
    return hidden.to(dtype), weight.to(dtype)


def _flatten(hidden, targets):
    """hidden [..., d] and targets [...] as [N, d] and [N]."""
    return hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)


def _maybe_reduce(values, targets, seq_ids, num_seqs, mean):
    """values shaped like targets, or reduced per sequence when seq_ids is given."""
    if seq_ids is None:
        return values.view(targets.shape)
    if num_seqs is None:
        raise DselError("linear_cross_entropy: num_seqs is required with seq_ids")
    flat = targets.reshape(-1)
    return sequence_reduce(values, seq_ids.reshape(-1), num_seqs, mask=flat != IGNORE_INDEX, mean=mean)


def linear_cross_entropy(hidden, weight, targets, seq_ids=None, num_seqs=None, mean=True):
    """Per-token cross-entropy of hidden @ weight.T against targets, never holding [N, V] logits.

    hidden [..., d], weight [V, d], targets [...] long (-100 = ignored, loss 0 there).
    Returns fp32 loss shaped like targets, differentiable in hidden and weight (reverse and
    forward mode); with seq_ids [...] and num_seqs, the per-sequence mean (or sum) over
    unmasked tokens instead.
    """
    h, y = _flatten(hidden, targets)
    check_inputs(h, weight, y)
    needs_grad = torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad)
    name = backend_name(h, h.shape[0], weight.shape[0], needs_grad)
    if name == "torch-lce" and is_functorch_wrapped_tensor(h):  # torch.func: torch's op has no forward mode
        name = "reference"
    with torch.autocast(h.device.type, enabled=False):  # the operands' dtypes decide (head_operands)
        if name == "torch":
            loss = plain_cross_entropy(h, weight, y)
        elif name == "torch-lce":
            loss = torch_chunked_cross_entropy(h, weight, y)
        else:
            loss = LinearCrossEntropyFunction.apply(h, weight, y, _backend(name, h))[0]
    return _maybe_reduce(loss, targets, seq_ids, num_seqs, mean)


def linear_cross_entropy_jvp(hidden, d_hidden, weight, d_weight, targets, seq_ids=None, num_seqs=None,
                             mean=True):
    """(loss, tangent): per-token loss and its directional derivative along (d_hidden, d_weight).

    tangent_n = sum_v (p_nv - y_nv)(h_n . dW_v + dh_n . W_v), one vocabulary sweep, no logits
    held. d_hidden or d_weight may be None (zero tangent). Shapes and the optional per-sequence
    reduction as in linear_cross_entropy; both outputs are fp32.
    """
    h, y = _flatten(hidden, targets)
    dh = None if d_hidden is None else d_hidden.reshape(h.shape)
    check_inputs(h, weight, y, dh, d_weight)
    name = backend_name(h, h.shape[0], weight.shape[0])
    with torch.autocast(h.device.type, enabled=False):
        loss, tangent = _backend(name, h).jvp(h, dh, weight, d_weight, y)
    return (_maybe_reduce(loss, targets, seq_ids, num_seqs, mean),
            _maybe_reduce(tangent, targets, seq_ids, num_seqs, mean))
