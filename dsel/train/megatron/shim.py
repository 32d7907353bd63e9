"""Run megatron-core on a machine without a GPU (gloo process groups, CPU tensors).

megatron-core assumes CUDA in a handful of places that have nothing to do with the maths:
it asks for the current CUDA device, keeps its dropout RNG streams as CUDA generator states,
creates small bookkeeping tensors (token counts, norms, found-inf flags) with `device="cuda"`,
synchronises the device after pipeline exchanges, and tells fp32 parameters from 16-bit ones
by their type *name* (`'torch.cuda.FloatTensor'`). `activate()` routes exactly those calls to
the CPU (each patch below says where megatron needs it; without any one of them a TP/PP/DP run
fails).

It is a no-op when CUDA is available. Every call it reroutes, except the type-name query,
would raise on a machine without CUDA, so it does not change what working code computes. Call
it before building a megatron model; it is idempotent, and `deactivate()` restores the originals.
"""
from __future__ import annotations

import functools

import torch

_CPU = torch.device("cpu")
_FACTORIES = ("zeros", "ones", "tensor")  # the ones megatron calls with device="cuda"
_originals: list[tuple[object, str, object]] = []  # (owner, attribute, original value), in patch order


def needed() -> bool:
    """True when there is no usable GPU, i.e. when megatron-core needs the shim."""
    return not torch.cuda.is_available()


def activate() -> bool:
    """Install the CPU patches (once, and only without a GPU); returns whether they are active."""
    if _originals or not needed():
        return bool(_originals)
    _route_current_device()
    _route_cuda_factories()
    _route_rng_tracker()
    _skip_synchronize()
    _report_cuda_type_names()
    return True


def deactivate() -> None:
    """Undo every patch (for tests that share a process with code that expects plain torch)."""
    while _originals:
        owner, name, original = _originals.pop()
        setattr(owner, name, original)


def _patch(owner: object, name: str, value: object) -> None:
    """Replace `owner.name`, remembering the original for `deactivate`."""
    _originals.append((owner, name, getattr(owner, name)))
    setattr(owner, name, value)


def _is_cuda(device) -> bool:
    """Whether a `device=` argument names a CUDA device (a bare int is a CUDA ordinal)."""
    if isinstance(device, int) and not isinstance(device, bool):
        return True
    return isinstance(device, (str, torch.device)) and torch.device(device).type == "cuda"


def _route_current_device() -> None:
    """`torch.cuda.current_device()` -> the CPU device, and `tensor.cuda()` -> the tensor itself.

    megatron passes current_device() as `device=` when allocating buffers (rotary inv_freq, p2p
    shape tensors, grad buffers), and moves the tied embedding to `.cuda()` before all-reducing
    it between the first and the last pipeline stage.
    """
    _patch(torch.cuda, "current_device", lambda: _CPU)
    _patch(torch.Tensor, "cuda", lambda self, *args, **kwargs: self)  # `.cuda()` copies stay on the CPU


def _route_cuda_factories() -> None:
    """`torch.zeros(..., device="cuda")` and friends -> the same tensor on the CPU.

    The schedules (total token count), clip_grads (norm, overflow buffer), the optimizer
    (found-inf flag, loss scale) and the grad buffers create small tensors this way. Only the
    device is changed, so other calls of these functions behave exactly as before.
    """
    for name in _FACTORIES:
        original = getattr(torch, name)

        @functools.wraps(original)
        def on_cpu(*args, _original=original, **kwargs):
            if _is_cuda(kwargs.get("device")):
                kwargs["device"] = _CPU
            return _original(*args, **kwargs)

        _patch(torch, name, on_cpu)


def _route_rng_tracker() -> None:
    """megatron's RNG tracker saves/restores the CUDA generator; use the CPU generator instead.

    The tracker forks named RNG streams (tensor-parallel, data-parallel) around dropout and
    weight init; `dsel.train.megatron.model.seed_everything` fills it with CPU states.
    """
    from megatron.core.tensor_parallel import random

    _patch(random, "_get_cuda_rng_state", lambda *args, **kwargs: torch.get_rng_state())
    _patch(random, "_set_cuda_rng_state", lambda state, *args, **kwargs: torch.set_rng_state(state))


def _skip_synchronize() -> None:
    """`torch.cuda.synchronize()` (after pipeline p2p exchanges) has nothing to wait for on a CPU."""
    _patch(torch.cuda, "synchronize", lambda *args, **kwargs: None)


def _report_cuda_type_names() -> None:
    """`tensor.type()` of a CPU tensor -> its CUDA name ('torch.cuda.FloatTensor').

    The optimizer and clip_grads branch on these names to tell fp32 parameters/grads from
    fp16/bf16 ones (and assert on them). Only the no-argument form is changed; `type(dtype)`
    conversions behave as before.
    """
    original = torch.Tensor.type

    def type_name_as_cuda(self, dtype=None, non_blocking=False, **kwargs):
        if dtype is None and not kwargs:
            name = original(self)
            return name.replace("torch.", "torch.cuda.", 1) if self.device.type == "cpu" else name
        return original(self, dtype, non_blocking, **kwargs)

    _patch(torch.Tensor, "type", type_name_as_cuda)
