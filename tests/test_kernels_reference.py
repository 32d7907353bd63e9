"""The plain-torch reference path (CPU default) against full-logits torch autograd."""
import pytest
import torch

import kernels
from dsel.errors import DselError
from kernels.linear_ce import LinearCrossEntropyFunction, ReferenceBackend
from _kernels_util import (SHAPES, brute_grads, brute_loss, brute_sequence_dots, brute_sequence_losses,
                           make_case, tol)

DTYPES = [torch.float32, torch.bfloat16]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_loss_per_token_and_per_sequence(shape, dtype):
    c = make_case(*shape, dtype=dtype)
    loss = kernels.linear_cross_entropy(c["hidden"], c["weight"], c["targets"])
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, brute_loss(c["hidden"], c["weight"], c["targets"]), rtol=1e-5, atol=1e-5)
    per_seq = kernels.linear_cross_entropy(c["hidden"], c["weight"], c["targets"], seq_ids=c["seq_ids"],
                                           num_seqs=c["num_seqs"])
    expected = brute_sequence_losses(c["hidden"], c["weight"], c["targets"], c["seq_ids"], c["num_seqs"])
    torch.testing.assert_close(per_seq, expected, rtol=1e-5, atol=1e-5)


def assert_grads_match_autograd(c, h, W, loss, dtype):
    """The gradients of sum(upstream * loss) w.r.t. the leaves h, W: in their dtype, equal to autograd's
    through the full logits."""
    grad_h, grad_W = torch.autograd.grad((loss * c["upstream"]).sum(), (h, W))
    assert grad_h.dtype == dtype and grad_W.dtype == dtype
    want_h, want_W = brute_grads(c["hidden"], c["weight"], c["targets"], c["upstream"])
    rtol, atol = tol(dtype)
    torch.testing.assert_close(grad_h.float(), want_h, rtol=rtol, atol=atol)
    torch.testing.assert_close(grad_W.float(), want_W, rtol=rtol, atol=atol)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("budget", [3 * 67, 1 << 20])  # many token chunks, one chunk
def test_gradients_match_autograd(shape, dtype, budget):
    c = make_case(*shape, dtype=dtype)
    h = c["hidden"].clone().requires_grad_()
    W = c["weight"].clone().requires_grad_()
    loss = LinearCrossEntropyFunction.apply(h, W, c["targets"], ReferenceBackend(budget))[0]
    assert_grads_match_autograd(c, h, W, loss, dtype)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_jvp_equals_per_sequence_gradient_dot_tangent(shape, dtype):
    c = make_case(*shape, dtype=dtype)
    loss, tangent = kernels.linear_cross_entropy_jvp(c["hidden"], c["d_hidden"], c["weight"], c["d_weight"],
                                                     c["targets"], seq_ids=c["seq_ids"], num_seqs=c["num_seqs"])
    want_loss, want_dots = brute_sequence_dots(c)
    torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(tangent, want_dots, rtol=1e-4, atol=1e-5)


def test_jvp_with_only_one_tangent_and_chunking():
    c = make_case(*SHAPES[0])
    y = c["targets"]
    for dh, dW in ((c["d_hidden"], None), (None, c["d_weight"]), (None, None)):
        _, want = torch.func.jvp(lambda h, W: brute_loss(h, W, y), (c["hidden"], c["weight"]),
                                 (c["d_hidden"] if dh is not None else torch.zeros_like(c["hidden"]),
                                  c["d_weight"] if dW is not None else torch.zeros_like(c["weight"])))
        _, tangent = kernels.linear_cross_entropy_jvp_reference(c["hidden"], dh, c["weight"], dW, y, budget=250)
        torch.testing.assert_close(tangent, want, rtol=1e-4, atol=1e-5)


def test_torch_func_jvp_uses_the_fused_tangent():
    """linear_cross_entropy works inside torch.func.jvp (forward mode), e.g. behind a trunk."""
    c = make_case(*SHAPES[0])
    trunk = torch.randn(24, 24, generator=torch.Generator().manual_seed(1)) / 5
    d_trunk = torch.randn(24, 24, generator=torch.Generator().manual_seed(2)) / 5

    def sequence_losses(trunk_w, head_w, fn):
        hidden = torch.tanh(c["hidden"] @ trunk_w)
        return fn(hidden, head_w)

    fused = lambda h, W: kernels.linear_cross_entropy(h, W, c["targets"], seq_ids=c["seq_ids"],
                                                      num_seqs=c["num_seqs"])
    brute = lambda h, W: brute_sequence_losses(h, W, c["targets"], c["seq_ids"], c["num_seqs"])
    primals, tangents = (trunk, c["weight"]), (d_trunk, c["d_weight"])
    loss, tangent = torch.func.jvp(lambda t, W: sequence_losses(t, W, fused), primals, tangents)
    want_loss, want_tangent = torch.func.jvp(lambda t, W: sequence_losses(t, W, brute), primals, tangents)
    torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(tangent, want_tangent, rtol=1e-4, atol=1e-5)


def test_leading_dimensions_are_kept():
    c = make_case(*SHAPES[2])
    h, y = c["hidden"].view(4, 5, 40), c["targets"].view(4, 5)
    loss = kernels.linear_cross_entropy(h, c["weight"], y)
    assert loss.shape == (4, 5)
    torch.testing.assert_close(loss.view(-1), brute_loss(c["hidden"], c["weight"], c["targets"]))


def test_sequence_reduce_sum_mean_mask_and_empty_sequence():
    values = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    seq_ids = torch.tensor([0, 0, 2, 2, 2])
    mask = torch.tensor([True, False, True, True, False])
    sums = kernels.sequence_reduce(values, seq_ids, 3, mask=mask, mean=False)
    means = kernels.sequence_reduce(values, seq_ids, 3, mask=mask)
    torch.testing.assert_close(sums, torch.tensor([1.0, 0.0, 7.0]))
    torch.testing.assert_close(means, torch.tensor([1.0, 0.0, 3.5]))
    with pytest.raises(DselError, match=r"seq_ids must lie in \[0, 2\)"):
        kernels.sequence_reduce(values, seq_ids, 2)


def test_bad_inputs_raise_one_line_errors(monkeypatch):
    c = make_case(*SHAPES[0])
    bad = c["targets"].clone()
    bad[0] = 100
    with pytest.raises(DselError, match="target id 100 is outside the vocabulary"):
        kernels.linear_cross_entropy(c["hidden"], c["weight"], bad)
    with pytest.raises(DselError, match="shapes do not match"):
        kernels.linear_cross_entropy(c["hidden"][:, :5], c["weight"], c["targets"])
    with pytest.raises(DselError, match="d_weight has shape"):
        kernels.linear_cross_entropy_jvp(c["hidden"], None, c["weight"], c["d_weight"][:3], c["targets"])
    monkeypatch.setenv("DSEL_KERNELS", "cuda")
    with pytest.raises(DselError, match="DSEL_KERNELS='cuda' is not one of"):
        kernels.linear_cross_entropy(c["hidden"], c["weight"], c["targets"])


CPU_CANDIDATES = ["torch", "reference", "torch-lce"]


@pytest.mark.parametrize("candidate", CPU_CANDIDATES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_every_cpu_candidate_gives_the_full_logits_loss_and_gradients(monkeypatch, candidate, dtype):
    """Whichever CPU path the dispatcher picks, loss and gradients are those of full-logits autograd."""
    monkeypatch.setenv("DSEL_KERNELS", candidate)
    c = make_case(*SHAPES[0], dtype=dtype)
    h, W = c["hidden"].clone().requires_grad_(), c["weight"].clone().requires_grad_()
    loss = kernels.linear_cross_entropy(h, W, c["targets"])
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, brute_loss(c["hidden"], c["weight"], c["targets"]), rtol=1e-5, atol=1e-5)
    assert_grads_match_autograd(c, h, W, loss, dtype)


def test_torch_lce_chunks_and_under_torch_func_jvp_takes_the_reference(monkeypatch):
    """torch's chunked op in several chunks equals full logits; torch.func.jvp (which that op cannot
    differentiate) gets the reference's fused tangent instead of an error."""
    from kernels.linear_ce import torch_chunked_cross_entropy

    c = make_case(*SHAPES[0])
    torch.testing.assert_close(torch_chunked_cross_entropy(c["hidden"], c["weight"], c["targets"], budget=5 * 100),
                               brute_loss(c["hidden"], c["weight"], c["targets"]), rtol=1e-5, atol=1e-5)
    monkeypatch.setenv("DSEL_KERNELS", "torch-lce")
    fn = lambda h, W: kernels.linear_cross_entropy(h, W, c["targets"], seq_ids=c["seq_ids"], num_seqs=c["num_seqs"])
    loss, tangent = torch.func.jvp(fn, (c["hidden"], c["weight"]), (c["d_hidden"], c["d_weight"]))
    want_loss, want_dots = brute_sequence_dots(c)
    torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(tangent, want_dots, rtol=1e-4, atol=1e-5)


def test_cpu_dispatch_follows_the_calibrated_limits_per_mode(monkeypatch):
    monkeypatch.delenv("DSEL_KERNELS", raising=False)
    assert kernels.backend_name(torch.zeros(1), 1000, 4096) == "torch"
    assert kernels.backend_name(torch.zeros(1), 1 << 14, 1 << 12) == "reference"  # 2**26 logits > 2**25
    assert kernels.backend_name(torch.zeros(1), 1 << 14, 1 << 12, needs_grad=True) == "torch"  # <= 2**26
    assert kernels.backend_name(torch.zeros(1), 1 << 14, 1 << 13, needs_grad=True) == "reference"
    chosen = []
    real = kernels.cpu_backend
    monkeypatch.setattr(kernels, "cpu_backend", lambda *a: (chosen.append(real(*a)), chosen[-1])[1])
    monkeypatch.setattr(kernels, "PLAIN_LOGITS_LIMIT", 37 * 99)  # 37 tokens x 100 entries: above it
    c = make_case(*SHAPES[0])
    h = c["hidden"].clone().requires_grad_()
    with torch.no_grad():
        no_grad_loss = kernels.linear_cross_entropy(h, c["weight"], c["targets"])
    loss = kernels.linear_cross_entropy(h, c["weight"], c["targets"])
    assert chosen == ["reference", "torch"]  # scoring chunks; with a backward to follow, it materialises
    want = brute_loss(c["hidden"], c["weight"], c["targets"])
    torch.testing.assert_close(no_grad_loss, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-5)
    monkeypatch.setenv("DSEL_KERNELS", "triton")
    assert kernels.backend_name(torch.zeros(1)) == "triton"


def test_head_operands_follow_autocast():
    h, W = torch.randn(3, 4), torch.randn(5, 4, dtype=torch.float64)
    assert [t.dtype for t in kernels.head_operands(h, W)] == [torch.float32, torch.float32]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert [t.dtype for t in kernels.head_operands(h, W)] == [torch.bfloat16, torch.bfloat16]


def test_models_run_the_head_in_bf16_under_autocast(monkeypatch):
    """GPT.token_losses and the CoLoR scorer hand the fused head bf16 operands under bf16 autocast
    (the residual stream is fp32 there) and fp32 ones without it."""
    from dsel.color.scorer import next_token_losses
    from dsel.models.config import preset
    from dsel.models.gpt import GPT

    seen = []
    real = kernels.linear_cross_entropy

    def spy(hidden, weight, targets, **kw):
        seen.append((hidden.dtype, weight.dtype))
        return real(hidden, weight, targets, **kw)

    monkeypatch.setattr(kernels, "linear_cross_entropy", spy)
    model = GPT(preset("tiny"))
    tokens = torch.randint(0, model.config.vocab_size, (2, 9))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model.token_losses(tokens)
    next_token_losses(model, tokens, precision="bf16")
    next_token_losses(model, tokens, precision="fp32")
    assert seen == [(torch.bfloat16, torch.bfloat16)] * 2 + [(torch.float32, torch.float32)]


def test_forward_mode_under_torch_compile():
    """torch.func.jvp through the fused loss keeps its custom tangent when compiled (aot_eager)."""
    c = make_case(*SHAPES[2])

    def dots(h, W, dh, dW):
        fn = lambda a, b: kernels.linear_cross_entropy(a, b, c["targets"], seq_ids=c["seq_ids"],
                                                       num_seqs=c["num_seqs"])
        return torch.func.jvp(fn, (h, W), (dh, dW))

    loss, tangent = torch.compile(dots, backend="aot_eager")(c["hidden"], c["weight"], c["d_hidden"],
                                                              c["d_weight"])
    want_loss, want_dots = brute_sequence_dots(c)
    torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(tangent, want_dots, rtol=1e-4, atol=1e-5)
