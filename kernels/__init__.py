"""Triton kernels, each with a plain-torch reference beside it, and the dispatcher between them.

The Triton kernel runs on CUDA tensors, the reference on everything else. Environment variable
DSEL_KERNELS overrides the choice: `triton` (CPU tensors need TRITON_INTERPRET=1, set before the
first Triton call), `reference`, or `auto` (default).
"""
import importlib.util
import os

from dsel.errors import DselError
from kernels.linear_ce import (IGNORE_INDEX, LinearCrossEntropyFunction, ReferenceBackend, check_inputs,
                               linear_cross_entropy_jvp_reference, linear_cross_entropy_reference)
from kernels.sequence import sequence_reduce

__all__ = ["IGNORE_INDEX", "backend_name", "linear_cross_entropy", "linear_cross_entropy_jvp",
           "linear_cross_entropy_reference", "linear_cross_entropy_jvp_reference", "sequence_reduce"]

_MODES = ("auto", "triton", "reference")


def backend_name(tensor) -> str:
    """'triton' or 'reference': which implementation runs for this tensor under DSEL_KERNELS."""
    mode = os.environ.get("DSEL_KERNELS", "auto").strip().lower() or "auto"
    if mode not in _MODES:
        raise DselError(f"DSEL_KERNELS={mode!r} is not one of {', '.join(_MODES)}")
    if mode == "auto":
        return "triton" if tensor.is_cuda and importlib.util.find_spec("triton") else "reference"
    return mode


def _backend(tensor):
    """The backend object (see kernels/linear_ce.py) for this tensor."""
    if backend_name(tensor) == "triton":
        if not tensor.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
            raise DselError("DSEL_KERNELS=triton on CPU tensors needs TRITON_INTERPRET=1 in the environment "
                            "before the first kernel call")
        from kernels.linear_ce_triton import TritonBackend
        return TritonBackend()
    return ReferenceBackend()


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
    loss = LinearCrossEntropyFunction.apply(h, weight, y, _backend(h))[0]
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
    loss, tangent = _backend(h).jvp(h, dh, weight, d_weight, y)
    return (_maybe_reduce(loss, targets, seq_ids, num_seqs, mean),
            _maybe_reduce(tangent, targets, seq_ids, num_seqs, mean))
