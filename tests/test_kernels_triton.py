"""Triton kernels (interpreted on CPU tensors, compiled on CUDA ones) against the plain-torch
reference and full-logits autograd."""
import os

import pytest
import torch

if not torch.cuda.is_available():  # CPU tensors need the interpreter, chosen when Triton is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

import kernels  # noqa: E402
from dsel.errors import DselError  # noqa: E402
from kernels.linear_ce import LinearCrossEntropyFunction  # noqa: E402
from _kernels_util import SHAPES, brute_grads, brute_loss, brute_sequence_dots, make_case, tol  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.bfloat16]


@pytest.fixture(autouse=True)
def force_triton(monkeypatch):
    monkeypatch.setenv("DSEL_KERNELS", "triton")


def _triton_backend(**kwargs):
    from kernels.linear_ce_triton import TritonBackend
    return TritonBackend(**kwargs)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_loss_matches_reference_and_full_logits(shape, dtype):
    c = make_case(*shape, dtype=dtype, device=DEVICE)
    loss = kernels.linear_cross_entropy(c["hidden"], c["weight"], c["targets"])
    ref = kernels.linear_cross_entropy_reference(c["hidden"], c["weight"], c["targets"])
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss, brute_loss(c["hidden"], c["weight"], c["targets"]), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_gradients_match_reference_and_autograd(shape, dtype):
    c = make_case(*shape, dtype=dtype, device=DEVICE)
    h = c["hidden"].clone().requires_grad_()
    W = c["weight"].clone().requires_grad_()
    budget = 7 * shape[0] * h.element_size()  # backward chunks of 7 vocabulary entries (last one shorter)
    loss = LinearCrossEntropyFunction.apply(h, W, c["targets"], _triton_backend(budget_bytes=budget))[0]
    grad_h, grad_W = torch.autograd.grad((loss * c["upstream"]).sum(), (h, W))
    assert grad_h.dtype == dtype and grad_W.dtype == dtype
    h_ref, W_ref = c["hidden"].clone().requires_grad_(), c["weight"].clone().requires_grad_()
    ref = kernels.linear_cross_entropy_reference(h_ref, W_ref, c["targets"])
    ref_h, ref_W = torch.autograd.grad((ref * c["upstream"]).sum(), (h_ref, W_ref))
    want_h, want_W = brute_grads(c["hidden"], c["weight"], c["targets"], c["upstream"])
    rtol, atol = tol(dtype)
    for got, ref_grad, want in ((grad_h, ref_h, want_h), (grad_W, ref_W, want_W)):
        torch.testing.assert_close(got.float(), ref_grad.float(), rtol=rtol, atol=atol)
        torch.testing.assert_close(got.float(), want, rtol=rtol, atol=atol)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_jvp_equals_per_sequence_gradient_dot_tangent(shape, dtype):
    c = make_case(*shape, dtype=dtype, device=DEVICE)
    args = (c["hidden"], c["d_hidden"], c["weight"], c["d_weight"], c["targets"])
    loss, tangent = kernels.linear_cross_entropy_jvp(*args, seq_ids=c["seq_ids"], num_seqs=c["num_seqs"])
    tok_loss, tok_tangent = kernels.linear_cross_entropy_jvp(*args)
    ref_loss, ref_tangent = kernels.linear_cross_entropy_jvp_reference(*args)
    want_loss, want_dots = brute_sequence_dots(c)
    torch.testing.assert_close(tok_loss, ref_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(tok_tangent, ref_tangent, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(loss, want_loss.to(loss.device), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(tangent, want_dots.to(loss.device), rtol=1e-4, atol=1e-5)


def test_jvp_with_one_tangent_missing():
    c = make_case(*SHAPES[2], device=DEVICE)
    for dh, dW in ((c["d_hidden"], None), (None, c["d_weight"]), (None, None)):
        _, got = kernels.linear_cross_entropy_jvp(c["hidden"], dh, c["weight"], dW, c["targets"])
        _, want = kernels.linear_cross_entropy_jvp_reference(c["hidden"], dh, c["weight"], dW, c["targets"])
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_torch_func_jvp_runs_the_fused_tangent_kernel():
    c = make_case(*SHAPES[0], device=DEVICE)
    fn = lambda h, W: kernels.linear_cross_entropy(h, W, c["targets"], seq_ids=c["seq_ids"], num_seqs=c["num_seqs"])
    loss, tangent = torch.func.jvp(fn, (c["hidden"], c["weight"]), (c["d_hidden"], c["d_weight"]))
    want_loss, want_dots = brute_sequence_dots(c)
    torch.testing.assert_close(loss, want_loss.to(loss.device), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(tangent, want_dots.to(loss.device), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("scale", [30.0, 1e-3])
def test_large_and_tiny_logits_match_full_logits(scale):
    """The online log-sum-exp stays exact when logits reach the hundreds or are all near 0."""
    c = make_case(*SHAPES[2], device=DEVICE)
    h = c["hidden"] * scale
    loss, tangent = kernels.linear_cross_entropy_jvp(h, c["d_hidden"], c["weight"], c["d_weight"], c["targets"])
    want_loss, want_tangent = torch.func.jvp(lambda a, b: brute_loss(a, b, c["targets"]), (h, c["weight"]),
                                             (c["d_hidden"], c["d_weight"]))
    assert torch.isfinite(loss).all() and torch.isfinite(tangent).all()
    torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(tangent, want_tangent, rtol=1e-4, atol=1e-4)


def test_interpreted_triton_never_multiplies_bf16_raw_and_auto_keeps_cuda_off_it(monkeypatch):
    """With TRITON_INTERPRET=1 every launch is interpreted, CUDA tensors included (a GPU host running
    the README's test command): dots are upcast (the interpreter's bf16 tl.dot multiplies raw bits),
    and `auto` sends CUDA tensors to the torch reference instead of the slow interpreter."""
    import kernels.linear_ce_triton as K

    if not K.INTERPRETED:
        pytest.skip("Triton was imported without TRITON_INTERPRET=1")
    c = make_case(*SHAPES[0], dtype=torch.bfloat16, device=DEVICE)
    loss = kernels.linear_cross_entropy(c["hidden"], c["weight"], c["targets"])  # forced triton
    torch.testing.assert_close(loss, brute_loss(c["hidden"], c["weight"], c["targets"]), rtol=1e-5, atol=1e-5)
    monkeypatch.setenv("DSEL_KERNELS", "auto")
    cuda_like = type("CudaTensor", (), {"is_cuda": True})()
    assert kernels.backend_name(cuda_like) == "reference"


def test_config_choice_is_pinned_or_compiled_together_then_timed_once_per_shape_bucket(monkeypatch):
    import triton.testing

    import kernels.linear_ce_triton as K

    variant = K.Variant("sweep", "bf16")
    candidates = K.configs(variant)
    events = []
    monkeypatch.setattr(triton.testing, "do_bench", lambda fn, **kw: (events.append("time"), fn())[1])
    monkeypatch.setattr(K, "_CHOSEN", {})
    speed = {id(c): t for c, t in zip(candidates, [3.0, 1.0, 2.0])}
    run = lambda c: speed[id(c)]
    compile_all = lambda configs: events.append(("compile", tuple(configs)))
    key = K.tuning_key(1000, 50304, 768)
    assert key == (1024, 50304, 768) and K.tuning_key(1, 17, 8) == (16, 17, 8)
    monkeypatch.setenv(K.CONFIG_ENV, "2")
    assert K._choose(variant, key, run, compile_all) is candidates[2] and not events
    monkeypatch.setenv(K.CONFIG_ENV, "99")  # past the end of a short list: its last entry
    assert K._choose(variant, key, run, compile_all) is candidates[-1]
    monkeypatch.setenv(K.CONFIG_ENV, "fast")
    with pytest.raises(DselError, match="DSEL_KERNEL_CONFIG"):
        K._choose(variant, key, run, compile_all)
    monkeypatch.delenv(K.CONFIG_ENV)
    assert K._choose(variant, key, run, compile_all) is candidates[1]  # the fastest
    assert events == [("compile", candidates)] + ["time"] * 3  # all compiled at once, before any timing
    assert K._choose(variant, key, run, compile_all) is candidates[1] and len(events) == 4  # cached
    K._choose(variant, K.tuning_key(2000, 50304, 768), run, compile_all)  # another token bucket: tuned again
    assert len(events) == 8


def test_backward_chunk_is_sized_like_the_hidden_states():
    from kernels.linear_ce_triton import MIN_BACKWARD_BUFFER_BYTES, backward_chunk_columns

    cols = backward_chunk_columns(8192, 131072, 4096, 2)  # 64 MiB hidden states -> 128 MiB chunk
    assert cols == 8192 and cols % 256 == 0
    assert backward_chunk_columns(100, 50304, 768, 2) == 50304  # small: the whole [N, V] in one chunk
    small = backward_chunk_columns(65536, 50304, 64, 4)
    assert small * 65536 * 4 <= MIN_BACKWARD_BUFFER_BYTES and small % 256 == 0
    assert backward_chunk_columns(37, 100, 24, 4, budget_bytes=7 * 37 * 4, round_to=1) == 7
