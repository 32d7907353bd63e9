"""Triton kernels for linear + cross-entropy: per-token loss, its JVP, and the logits gradient.

Forward and JVP: one sweep over the vocabulary per block of tokens, with running max, running
sum of exponentials and (JVP) a running sum of exp(z_v - max) * z'_v, where
z = h W^T and z' = dh W^T + h dW^T come from bf16 tl.dot with fp32 accumulation; nothing of size
[N, V] is written. The vocabulary is split across programs (grid axis 1) so small token counts still
fill the GPU; the per-split partials [splits, N] are merged with a log-sum-exp in torch.

Backward: per token chunk, a kernel recomputes the logits tile by tile and writes only
d loss / d logits = g (softmax - onehot) in the input dtype; two cuBLAS matmuls turn it into the
gradients of h and W. Chunks keep that buffer a small fraction of [N, V].

Reference: kernels/linear_ce.py (ReferenceBackend). CPU tensors run under TRITON_INTERPRET=1, whose
tl.dot mis-multiplies bf16 (it multiplies the raw uint16 bits), so there UPCAST casts dot operands
to fp32 first; on GPU the dots take bf16 directly.
"""
import torch
import triton
import triton.language as tl
from torch._C._functorch import get_unwrapped, is_functorch_wrapped_tensor
from torch._functorch.pyfunctorch import temporarily_clear_interpreter_stack

from kernels.linear_ce import IGNORE_INDEX

BACKWARD_BUDGET_BYTES = 1 << 30  # d logits bytes one backward chunk may hold
INTERPRETER_BLOCKS = dict(BLOCK_N=16, BLOCK_V=32, BLOCK_D=16)


def _forward_configs():
    """H100-oriented tile shapes for the vocabulary sweep (autotuned per d, V, tangent flags)."""
    shapes = [(128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (64, 256, 64, 8, 4), (128, 128, 128, 8, 3),
              (64, 128, 64, 4, 4), (256, 128, 64, 8, 3)]
    return [triton.Config(dict(BLOCK_N=n, BLOCK_V=v, BLOCK_D=d), num_warps=w, num_stages=s)
            for n, v, d, w, s in shapes]


@triton.jit
def _dot(a, b, acc, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """acc + a @ b with fp32 accumulation (operands cast to fp32 under the interpreter)."""
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def _vocab_sweep_kernel(h_ptr, w_ptr, dh_ptr, dw_ptr, y_ptr,
                        max_ptr, sumexp_ptr, tsum_ptr, zy_ptr, dzy_ptr,
                        N, V, D, v_per_split, stride_h, stride_w,
                        HAS_DH: tl.constexpr, HAS_DW: tl.constexpr, JVP: tl.constexpr,
                        UPCAST: tl.constexpr, PRECISION: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr):
    """Partials over one vocabulary split for BLOCK_N tokens: max, sum exp, sum exp*z', z_y, z'_y."""
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    y = tl.load(y_ptr + rows, mask=row_ok, other=-100).to(tl.int32)
    h_rows = rows.to(tl.int64)[:, None] * stride_h  # int64: N * d may pass 2**31
    run_max = tl.full([BLOCK_N], float("-inf"), tl.float32)
    run_sum = tl.zeros([BLOCK_N], tl.float32)
    run_t = tl.zeros([BLOCK_N], tl.float32)
    z_y = tl.zeros([BLOCK_N], tl.float32)
    dz_y = tl.zeros([BLOCK_N], tl.float32)
    v_begin = pid_s * v_per_split
    v_end = tl.minimum(V, v_begin + v_per_split)
    for v0 in range(v_begin, v_end, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_ok = cols < v_end
        z = tl.zeros([BLOCK_N, BLOCK_V], tl.float32)
        dz = tl.zeros([BLOCK_N, BLOCK_V], tl.float32)
        for k0 in range(0, D, BLOCK_D):
            ks = k0 + tl.arange(0, BLOCK_D)
            k_ok = ks < D
            h_off = h_rows + ks[None, :]
            h_mask = row_ok[:, None] & k_ok[None, :]
            w_off = cols.to(tl.int64)[None, :] * stride_w + ks[:, None]
            w_mask = col_ok[None, :] & k_ok[:, None]
            h = tl.load(h_ptr + h_off, mask=h_mask, other=0.0)
            w = tl.load(w_ptr + w_off, mask=w_mask, other=0.0)
            z = _dot(h, w, z, UPCAST, PRECISION)
            if HAS_DH:
                dz = _dot(tl.load(dh_ptr + h_off, mask=h_mask, other=0.0), w, dz, UPCAST, PRECISION)
            if HAS_DW:
                dz = _dot(h, tl.load(dw_ptr + w_off, mask=w_mask, other=0.0), dz, UPCAST, PRECISION)
        z = tl.where(col_ok[None, :], z, float("-inf"))
        new_max = tl.maximum(run_max, tl.max(z, axis=1))
        scale = tl.exp(run_max - new_max)
        e = tl.exp(z - new_max[:, None])
        run_sum = run_sum * scale + tl.sum(e, axis=1)
        hit = (cols[None, :] == y[:, None]) & col_ok[None, :]
        z_y += tl.sum(tl.where(hit, z, 0.0), axis=1)
        if JVP:
            run_t = run_t * scale + tl.sum(e * dz, axis=1)
            dz_y += tl.sum(tl.where(hit, dz, 0.0), axis=1)
        run_max = new_max
    out = pid_s * N + rows
    tl.store(max_ptr + out, run_max, mask=row_ok)
    tl.store(sumexp_ptr + out, run_sum, mask=row_ok)
    tl.store(zy_ptr + out, z_y, mask=row_ok)
    if JVP:
        tl.store(tsum_ptr + out, run_t, mask=row_ok)
        tl.store(dzy_ptr + out, dz_y, mask=row_ok)


@triton.jit
def _logits_grad_kernel(h_ptr, w_ptr, y_ptr, lse_ptr, g_ptr, out_ptr,
                        N, V, D, stride_h, stride_w, stride_out,
                        UPCAST: tl.constexpr, PRECISION: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr):
    """out[n, v] = g_n (softmax(h_n W^T)_v - [v == y_n]) for one [BLOCK_N, BLOCK_V] tile."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    row_ok = rows < N
    col_ok = cols < V
    h_rows = rows.to(tl.int64)[:, None] * stride_h
    w_cols = cols.to(tl.int64)[None, :] * stride_w
    z = tl.zeros([BLOCK_N, BLOCK_V], tl.float32)
    for k0 in range(0, D, BLOCK_D):
        ks = k0 + tl.arange(0, BLOCK_D)
        k_ok = ks < D
        h = tl.load(h_ptr + h_rows + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptr + w_cols + ks[:, None], mask=col_ok[None, :] & k_ok[:, None], other=0.0)
        z = _dot(h, w, z, UPCAST, PRECISION)
    y = tl.load(y_ptr + rows, mask=row_ok, other=-100).to(tl.int32)
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    g = tl.load(g_ptr + rows, mask=row_ok, other=0.0)
    p = tl.exp(z - lse[:, None])
    d = g[:, None] * (p - tl.where(cols[None, :] == y[:, None], 1.0, 0.0))
    d = tl.where((y != -100)[:, None], d, 0.0)
    out_off = rows.to(tl.int64)[:, None] * stride_out + cols[None, :]
    tl.store(out_ptr + out_off, d.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


_vocab_sweep_tuned = triton.autotune(configs=_forward_configs(), key=["V", "D", "HAS_DH", "HAS_DW"])(
    _vocab_sweep_kernel)
_logits_grad_tuned = triton.autotune(configs=_forward_configs(), key=["V", "D"])(_logits_grad_kernel)


def _precision(tensor):
    """tl.dot input precision: fp32 inputs get tf32 only where torch's own matmuls may use it."""
    if tensor.dtype != torch.float32 or (tensor.is_cuda and torch.backends.cuda.matmul.allow_tf32):
        return "tf32"
    return "ieee"


def _vocab_splits(num_tokens, vocab_size, device):
    """(splits, vocabulary entries per split) so that token blocks x splits fill the GPU about
    twice over; on GPU a split is a whole number of the largest BLOCK_V. Under the interpreter
    split edges fall inside a block on purpose, so the tests exercise that masking."""
    if device.type != "cuda":
        splits = min(3, triton.cdiv(vocab_size, INTERPRETER_BLOCKS["BLOCK_V"]))
        return splits, triton.cdiv(vocab_size, splits)
    programs = 2 * torch.cuda.get_device_properties(device).multi_processor_count
    splits = max(1, min(triton.cdiv(programs, triton.cdiv(num_tokens, 128)), triton.cdiv(vocab_size, 1024)))
    per_split = triton.cdiv(triton.cdiv(vocab_size, splits), 256) * 256
    return triton.cdiv(vocab_size, per_split), per_split


def _launch(kernel_tuned, kernel_plain, grid, *args, **constexprs):
    """Autotuned launch on GPU; fixed small tiles under the interpreter (CPU tensors)."""
    if args[0].is_cuda:
        kernel_tuned[grid](*args, UPCAST=False, **constexprs)
    else:
        kernel_plain[grid(INTERPRETER_BLOCKS)](*args, UPCAST=True, **constexprs, **INTERPRETER_BLOCKS)


def vocab_sweep(h, W, y, dh=None, dW=None):
    """(loss, lse, tangent or None), all fp32 [N]: one fused sweep over the vocabulary."""
    N, D = h.shape
    V = W.shape[0]
    h, W, y = h.contiguous(), W.contiguous(), y.contiguous()
    dh = None if dh is None else dh.to(h.dtype).contiguous()
    dW = None if dW is None else dW.to(W.dtype).contiguous()
    jvp = dh is not None or dW is not None
    splits, v_per_split = _vocab_splits(N, V, h.device)
    parts = torch.empty(5 if jvp else 3, splits, N, dtype=torch.float32, device=h.device)
    run_max, run_sum, z_y = parts[0], parts[1], parts[2]
    tsum, dz_y = (parts[3], parts[4]) if jvp else (z_y, z_y)
    grid = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), splits)
    _launch(_vocab_sweep_tuned, _vocab_sweep_kernel, grid,
            h, W, h if dh is None else dh, W if dW is None else dW, y,
            run_max, run_sum, tsum, z_y, dz_y, N, V, D, v_per_split, h.stride(0), W.stride(0),
            HAS_DH=dh is not None, HAS_DW=dW is not None, JVP=jvp, PRECISION=_precision(h))
    top = run_max.max(dim=0).values
    weights = torch.exp(run_max - top)
    total = (run_sum * weights).sum(0)
    lse = top + torch.log(total)
    valid = y != IGNORE_INDEX
    loss = torch.where(valid, lse - z_y.sum(0), 0.0)
    tangent = torch.where(valid, (tsum * weights).sum(0) / total - dz_y.sum(0), 0.0) if jvp else None
    return loss, lse, tangent


def logits_grad(h, W, y, lse, g, out):
    """Write g (softmax - onehot) for these tokens into out [n, V] (input dtype), tile by tile."""
    N, D = h.shape
    V = W.shape[0]
    grid = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), triton.cdiv(V, meta["BLOCK_V"]))
    _launch(_logits_grad_tuned, _logits_grad_kernel, grid,
            h, W, y, lse, g, out, N, V, D, h.stride(0), W.stride(0), out.stride(0), PRECISION=_precision(h))


def _plain(tensor):
    """The plain tensor under torch.func wrappers: a custom jvp receives wrapped tensors, and a
    Triton launch needs real storage (the tangent returned is lifted back by torch.func)."""
    while tensor is not None and is_functorch_wrapped_tensor(tensor):
        tensor = get_unwrapped(tensor)
    return tensor


class TritonBackend:
    """Backend (see kernels/linear_ce.py) running the Triton kernels."""

    def __init__(self, budget_bytes=BACKWARD_BUDGET_BYTES):
        self.budget_bytes = budget_bytes

    def forward(self, h, W, y):
        loss, lse, _ = vocab_sweep(h, W.to(h.dtype), y)
        return loss, lse

    def jvp(self, h, dh, W, dW, y):
        with temporarily_clear_interpreter_stack():  # new tensors inside stay plain
            h, dh, W, dW, y = (_plain(t) for t in (h, dh, W, dW, y))
            loss, _, tangent = vocab_sweep(h, W.to(h.dtype), y, dh, dW)
        return loss, torch.zeros_like(loss) if tangent is None else tangent

    def backward(self, h, W, y, lse, g):
        weight_dtype = W.dtype
        h, W, y = h.contiguous(), W.to(h.dtype).contiguous(), y.contiguous()
        N, V = h.shape[0], W.shape[0]
        rows = max(1, min(N, self.budget_bytes // (V * h.element_size())))
        d_logits = torch.empty(rows, V, dtype=h.dtype, device=h.device)
        grad_h = torch.empty_like(h)
        grad_W = torch.zeros(W.shape, dtype=torch.float32, device=W.device)
        g = g.float().contiguous()
        for a in range(0, N, rows):
            b = min(a + rows, N)
            buf = d_logits[: b - a]
            logits_grad(h[a:b], W, y[a:b], lse[a:b], g[a:b], buf)
            torch.mm(buf, W, out=grad_h[a:b])
            grad_W += (buf.T @ h[a:b]).float()
        return grad_h, grad_W.to(weight_dtype)
