"""Compiled Triton kernels on a real GPU against the torch reference (skipped without CUDA).

Every config of every variant is launched once (DSEL_KERNEL_CONFIG pins it), on a shape off the
tile grid, for the loss, the JVP (both tangents; each single tangent with the first config) and
the backward; then the autotuned
path, the bf16 head under autocast, and the absence of host syncs after tuning.
"""
import pytest
import torch

import kernels
import kernels.linear_ce_triton as K
from dsel.device import tf32_matmuls
from kernels.linear_ce import LinearCrossEntropyFunction, ReferenceBackend
from _kernels_util import make_case

pytestmark = pytest.mark.gpu

SHAPE = (301, 264, 5003, [100, 1, 200])  # tokens, d, vocab: none a multiple of the tiles
PRECISIONS = [(torch.bfloat16, False, 2e-2), (torch.float32, False, 1e-4), (torch.float32, True, 5e-3)]
ALL_CONFIGS = range(max(len(K.configs(v)) for v in K.variants()))


def _case(dtype):
    return make_case(*SHAPE, dtype=dtype, device="cuda")


def _close(got, want, tol):
    torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol)


@pytest.mark.parametrize("index", ALL_CONFIGS)
@pytest.mark.parametrize("dtype,tf32,tol", PRECISIONS, ids=["bf16", "fp32", "tf32"])
def test_every_config_matches_the_reference(monkeypatch, index, dtype, tf32, tol):
    monkeypatch.setenv(K.CONFIG_ENV, str(index))
    monkeypatch.setenv("DSEL_KERNELS", "triton")
    c = _case(dtype)
    h, W, y, dh, dW = c["hidden"], c["weight"], c["targets"], c["d_hidden"], c["d_weight"]
    ref = ReferenceBackend()
    with tf32_matmuls(False):
        ref_loss, _ = ref.forward(h, W, y)
        pairs = ((dh, dW), (dh, None), (None, dW)) if index == 0 else ((dh, dW),)  # one-tangent sets: config 0
        ref_tangents = [ref.jvp(h, a, W, b, y)[1] for a, b in pairs]
        ref_grads = ref.backward(h, W, y, None, c["upstream"].cuda())
    with tf32_matmuls(tf32):
        loss = kernels.linear_cross_entropy(h, W, y)
        tangents = [kernels.linear_cross_entropy_jvp(h, a, W, b, y)[1] for a, b in pairs]
        hh, WW = h.clone().requires_grad_(), W.clone().requires_grad_()
        budget = 1000 * SHAPE[0] * h.element_size()  # several vocabulary chunks, the last one short
        out = LinearCrossEntropyFunction.apply(hh, WW, y, K.TritonBackend(budget_bytes=budget))[0]
        grads = torch.autograd.grad((out * c["upstream"].cuda()).sum(), (hh, WW))
    _close(loss, ref_loss, tol)
    for got, want in zip(tangents, ref_tangents):
        _close(got, want, 10 * tol)  # tangents sum signed terms: absolute error grows with |z'|
    for got, want in zip(grads, ref_grads):
        assert got.dtype == dtype
        _close(got, want, tol)


def test_autotuned_launches_match_and_then_never_sync(monkeypatch):
    monkeypatch.delenv(K.CONFIG_ENV, raising=False)
    c = _case(torch.bfloat16)
    h, W, y = c["hidden"], c["weight"], c["targets"]
    want = ReferenceBackend().forward(h, W, y)[0]
    _close(kernels.linear_cross_entropy(h, W, y), want, 2e-2)  # tunes this shape
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss = kernels.linear_cross_entropy(h, W, y)
        kernels.linear_cross_entropy_jvp(h, c["d_hidden"], W, c["d_weight"], y)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    _close(loss, want, 2e-2)


def test_bad_target_raises_on_the_device(monkeypatch):
    c = _case(torch.float32)
    y = c["targets"].clone()
    y[3] = SHAPE[2]
    with pytest.raises(RuntimeError):
        kernels.linear_cross_entropy(c["hidden"], c["weight"], y)
        torch.cuda.synchronize()


def test_gpt_head_runs_bf16_under_autocast_and_matches_fp32(monkeypatch):
    from dsel.models.config import preset
    from dsel.models.gpt import GPT

    seen = []
    real = kernels.linear_cross_entropy
    monkeypatch.setattr(kernels, "linear_cross_entropy",
                        lambda h, W, y, **kw: (seen.append((h.dtype, W.dtype)), real(h, W, y, **kw))[1])
    model = GPT(preset("tiny")).cuda()
    tokens = torch.randint(0, model.config.vocab_size, (4, 33), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        bf16 = model.sequence_losses(tokens)
    fp32 = model.sequence_losses(tokens)
    assert seen == [(torch.bfloat16, torch.bfloat16), (torch.float32, torch.float32)]
    _close(bf16, fp32, 3e-2)
