"""Triton kernels for linear + cross-entropy: per-token loss, its JVP, and the logits gradient.

Forward and JVP: one sweep over the vocabulary per block of tokens, with running max, running
sum of exponentials and (JVP) a running sum of exp(z_v - max) * z'_v, where
z = h W^T and z' = dh W^T + h dW^T come from tl.dot with fp32 accumulation (bf16 operands on
tensor cores, fp32 operands as TF32 or exact IEEE fp32); nothing of size [N, V] is written. The
vocabulary is split across programs (grid axis 1) so small token counts still fill the GPU; the
per-split partials [splits, N] are merged with a log-sum-exp in torch.

Backward: per vocabulary chunk, a kernel recomputes the logits tile by tile and writes only
d loss / d logits = g (softmax - onehot) for that chunk, in the input dtype; two cuBLAS matmuls
turn it into that chunk's rows of grad W (written once, in place) and its share of grad h. The
chunk buffer [N, chunk] is sized like the hidden states, not fixed.

Every launch goes through `_launch`, which picks the tile shape from `configs(variant)`: on
GPU by timing each candidate once per (variant, token-count bucket, V, d) after compiling them all
concurrently (`compile_candidates`), or the one pinned by
DSEL_KERNEL_CONFIG=<i> (the i-th of each list; 0 = the first). tests/test_kernels_compile.py
compiles every (variant, config) pair for sm_90a and sm_80 and checks shared memory, spills and
tensor-core instructions, so only configs that launch are listed.

With TRITON_INTERPRET=1 set before Triton is imported, every launch runs in the Triton
interpreter (CPU tensors in the tests; CUDA tensors too, copied to the host): its tl.dot
mis-multiplies bf16 (it multiplies the raw uint16 bits), so there UPCAST casts dot operands to fp32
first and the tiles are small. Triton decides interpreted-or-compiled for the whole process at
import (its own library functions follow the flag), so the two cannot be mixed.
Reference: kernels/linear_ce.py (ReferenceBackend).
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch._C._functorch import get_unwrapped, is_functorch_wrapped_tensor
from torch._functorch.pyfunctorch import temporarily_clear_interpreter_stack
from triton.runtime.interpreter import InterpretedFunction

from dsel.errors import DselError
from kernels.linear_ce import IGNORE_INDEX

MIN_BACKWARD_BUFFER_BYTES = 64 << 20  # the d logits chunk holds at least this much (or all of [N, V])
INTERPRETER_BLOCKS = dict(BLOCK_N=16, BLOCK_V=32, BLOCK_D=16)
CONFIG_ENV = "DSEL_KERNEL_CONFIG"


@triton.jit
def _vocab_sweep(h_ptr, w_ptr, dh_ptr, dw_ptr, y_ptr,
                 max_ptr, sumexp_ptr, tsum_ptr, zy_ptr, dzy_ptr,
                 N, V, D, v_per_split, stride_h, stride_w,
                 HAS_DH: tl.constexpr, HAS_DW: tl.constexpr,
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
            if UPCAST:
                h = h.to(tl.float32)
                w = w.to(tl.float32)
            z = tl.dot(h, w, z, input_precision=PRECISION)
            if HAS_DH:
                dh = tl.load(dh_ptr + h_off, mask=h_mask, other=0.0)
                if UPCAST:
                    dh = dh.to(tl.float32)
                dz = tl.dot(dh, w, dz, input_precision=PRECISION)
            if HAS_DW:
                dw = tl.load(dw_ptr + w_off, mask=w_mask, other=0.0)
                if UPCAST:
                    dw = dw.to(tl.float32)
                dz = tl.dot(h, dw, dz, input_precision=PRECISION)
        z = tl.where(col_ok[None, :], z, float("-inf"))
        new_max = tl.maximum(run_max, tl.max(z, axis=1))
        scale = tl.exp(run_max - new_max)
        e = tl.exp(z - new_max[:, None])
        run_sum = run_sum * scale + tl.sum(e, axis=1)
        hit = (cols[None, :] == y[:, None]) & col_ok[None, :]
        z_y += tl.sum(tl.where(hit, z, 0.0), axis=1)
        if HAS_DH or HAS_DW:
            run_t = run_t * scale + tl.sum(e * dz, axis=1)
            dz_y += tl.sum(tl.where(hit, dz, 0.0), axis=1)
        run_max = new_max
    out = pid_s * N + rows
    tl.store(max_ptr + out, run_max, mask=row_ok)
    tl.store(sumexp_ptr + out, run_sum, mask=row_ok)
    tl.store(zy_ptr + out, z_y, mask=row_ok)
    if HAS_DH or HAS_DW:
        tl.store(tsum_ptr + out, run_t, mask=row_ok)
        tl.store(dzy_ptr + out, dz_y, mask=row_ok)


@triton.jit
def _logits_grad(h_ptr, w_ptr, y_ptr, lse_ptr, g_ptr, out_ptr,
                 N, V, D, v_offset, stride_h, stride_w, stride_out,
                 UPCAST: tl.constexpr, PRECISION: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr):
    """out[n, v] = g_n (softmax(h_n W^T)_(v_offset + v) - [v_offset + v == y_n]) for one tile of a
    vocabulary chunk (w_ptr points at the chunk's first row, lse is over the whole vocabulary)."""
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
        if UPCAST:
            h = h.to(tl.float32)
            w = w.to(tl.float32)
        z = tl.dot(h, w, z, input_precision=PRECISION)
    y = tl.load(y_ptr + rows, mask=row_ok, other=-100).to(tl.int32)
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    g = tl.load(g_ptr + rows, mask=row_ok, other=0.0)
    p = tl.exp(z - lse[:, None])
    d = g[:, None] * (p - tl.where((cols + v_offset)[None, :] == y[:, None], 1.0, 0.0))
    d = tl.where((y != -100)[:, None], d, 0.0)
    out_off = rows.to(tl.int64)[:, None] * stride_out + cols[None, :]
    tl.store(out_ptr + out_off, d.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


KERNELS = {"sweep": _vocab_sweep, "grad": _logits_grad}
INTERPRETED = isinstance(_vocab_sweep, InterpretedFunction)  # TRITON_INTERPRET=1 at import


@dataclass(frozen=True)
class Variant:
    """One compiled form of a kernel: which kernel, operand dtype, dot precision, tangent flags."""

    kernel: str  # "sweep" (forward / JVP) or "grad" (backward logits gradient)
    dtype: str  # "bf16" or "fp32" (fp16, which dsel does not use, takes bf16's tiles unchecked)
    precision: str = "tf32"  # tl.dot input precision for fp32 operands: "tf32" or "ieee"
    has_dh: bool = False
    has_dw: bool = False

    @property
    def name(self) -> str:
        tangents = "+".join(t for t, on in (("dh", self.has_dh), ("dw", self.has_dw)) if on)
        mode = f"jvp[{tangents}]" if tangents else ("fwd" if self.kernel == "sweep" else "grad")
        precision = f"-{self.precision}" if self.dtype == "fp32" else ""
        return f"{self.kernel}-{mode}-{self.dtype}{precision}"

    @property
    def tensor_cores(self) -> bool:
        """Whether this variant must compile to tensor-core instructions (all but exact fp32)."""
        return self.dtype != "fp32" or self.precision == "tf32"

    def constexprs(self) -> dict:
        extra = dict(HAS_DH=self.has_dh, HAS_DW=self.has_dw) if self.kernel == "sweep" else {}
        return dict(extra, UPCAST=False, PRECISION=self.precision if self.dtype == "fp32" else "tf32")


# Tile shapes (BLOCK_N, BLOCK_V, BLOCK_D, warps, stages) per (kernel, operand dtype / precision,
# JVP: tangent tiles and a second accumulator beside the logits). Each entry fits 166,912 B of
# shared memory (sm_80; sm_90: 232,448) and compiles without register spills for both; the JVP
# lists hold for each tangent set. tests/test_kernels_compile.py checks every entry.
_CONFIGS = {
    ("sweep", "bf16", False): [(128, 128, 64, 8, 3), (64, 256, 64, 8, 3), (64, 128, 64, 4, 4)],
    ("sweep", "bf16", True): [(64, 128, 32, 8, 3), (64, 64, 32, 4, 3)],
    ("sweep", "tf32", False): [(128, 128, 32, 8, 3), (64, 128, 32, 4, 3)],
    ("sweep", "tf32", True): [(64, 128, 16, 8, 3), (64, 64, 32, 8, 3)],
    ("sweep", "ieee", False): [(64, 64, 32, 4, 2), (32, 64, 32, 4, 2)],
    ("sweep", "ieee", True): [(64, 64, 16, 8, 2), (32, 64, 16, 4, 2)],
    ("grad", "bf16", False): [(128, 128, 64, 8, 3), (64, 128, 64, 4, 4)],
    ("grad", "tf32", False): [(128, 128, 32, 8, 3), (64, 128, 32, 4, 3)],
    ("grad", "ieee", False): [(64, 64, 32, 4, 2), (32, 64, 32, 4, 2)],
}


@functools.lru_cache(maxsize=None)
def configs(variant: Variant) -> tuple[triton.Config, ...]:
    """The tile shapes the launcher may pick for this variant (the first is the default)."""
    kind = variant.precision if variant.dtype == "fp32" else "bf16"
    jvp = variant.has_dh or variant.has_dw
    return tuple(triton.Config(dict(BLOCK_N=n, BLOCK_V=v, BLOCK_D=d), num_warps=w, num_stages=s)
            for n, v, d, w, s in _CONFIGS[(variant.kernel, kind, jvp)])


def variants() -> list[Variant]:
    """Every variant a launch can reach: bf16 and fp32 (TF32 and IEEE), forward, each tangent set, backward."""
    out = []
    for dtype, precision in (("bf16", "tf32"), ("fp32", "tf32"), ("fp32", "ieee")):
        for has_dh, has_dw in ((False, False), (True, True), (True, False), (False, True)):
            out.append(Variant("sweep", dtype, precision, has_dh, has_dw))
        out.append(Variant("grad", dtype, precision))
    return out


def signature(variant: Variant) -> dict:
    """Triton argument types of the variant's kernel (pointer dtypes follow the operand dtype)."""
    p = "*bf16" if variant.dtype == "bf16" else "*fp32"
    if variant.kernel == "grad":
        return dict(h_ptr=p, w_ptr=p, y_ptr="*i64", lse_ptr="*fp32", g_ptr="*fp32", out_ptr=p,
                    N="i32", V="i32", D="i32", v_offset="i32", stride_h="i32", stride_w="i32", stride_out="i32")
    return dict(h_ptr=p, w_ptr=p, dh_ptr=p, dw_ptr=p, y_ptr="*i64", max_ptr="*fp32", sumexp_ptr="*fp32",
                tsum_ptr="*fp32", zy_ptr="*fp32", dzy_ptr="*fp32", N="i32", V="i32", D="i32",
                v_per_split="i32", stride_h="i32", stride_w="i32")


def _precision(tensor) -> str:
    """tl.dot input precision of fp32 operands: TF32 where torch's own fp32 matmuls may use it
    (torch.set_float32_matmul_precision('high'), e.g. dsel.device.tf32_matmuls), else exact."""
    if tensor.is_cuda and torch.get_float32_matmul_precision() != "highest":
        return "tf32"
    return "ieee"


def variant_for(kernel: str, tensor, has_dh=False, has_dw=False) -> Variant:
    """The variant a launch on these operands uses."""
    dtype = "fp32" if tensor.dtype == torch.float32 else "bf16"
    return Variant(kernel, dtype, _precision(tensor) if dtype == "fp32" else "tf32", has_dh, has_dw)


_CHOSEN: dict = {}  # (variant, token bucket, V, d) -> chosen config


def _pinned_index():
    """DSEL_KERNEL_CONFIG as an int (None = autotune)."""
    value = os.environ.get(CONFIG_ENV, "").strip()
    if value in ("", "auto"):
        return None
    if not value.isdigit():
        raise DselError(f"{CONFIG_ENV}={value!r}: expected 'auto' or a config index (0 = each list's first)")
    return int(value)


def _choose(variant: Variant, key: tuple, run, compile_all) -> triton.Config:
    """The config for this launch: pinned, cached, or the fastest candidate timed once for this key
    (after `compile_all(candidates)` has compiled them all at once)."""
    candidates = configs(variant)
    pinned = _pinned_index()
    if pinned is not None:
        return candidates[min(pinned, len(candidates) - 1)]
    key = (variant,) + key
    if key not in _CHOSEN:
        if len(candidates) == 1:
            _CHOSEN[key] = candidates[0]
        else:
            compile_all(candidates)
            times = [triton.testing.do_bench(lambda c=c: run(c), warmup=5, rep=20) for c in candidates]
            _CHOSEN[key] = candidates[times.index(min(times))]
    return _CHOSEN[key]


def launch_options(variant: Variant, config: triton.Config) -> dict:
    """The keyword arguments of a compiled launch (constexprs, tiles, warps, stages): what a warm-up
    must pass too for its kernel to be the one the launch finds in Triton's cache."""
    return dict(variant.constexprs(), **config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages)


def compile_candidates(variant: Variant, candidates, args_for, workers=None) -> list:
    """Compile every candidate config of the variant's kernel at once; the compiled kernels, in order.

    Each `kernel.warmup(*args_for(config), ...)` goes to Triton's AsyncCompileMode, which runs the
    compiler in a thread pool: the MLIR passes and the ptxas subprocesses of different configs
    overlap, so tuning waits about for the longest compile instead of their sum. `args_for(config)`
    gives the launch's positional arguments (tensors, or torch dtypes standing in for them as in
    Triton's warmup); the kernels land in the JIT cache under the key the launches then look up.
    kernels/compile_check.py runs this same path for sm_90a on a CPU machine.
    """
    from concurrent.futures import ThreadPoolExecutor

    from triton.runtime._async_compile import AsyncCompileMode, FutureKernel

    kernel = KERNELS[variant.kernel]
    workers = workers or max(1, min(len(candidates), os.cpu_count() or 1))
    with ThreadPoolExecutor(workers) as pool, AsyncCompileMode(pool):
        pending = [kernel.warmup(*args_for(c), grid=(1,), **launch_options(variant, c)) for c in candidates]
    return [k.result() if isinstance(k, FutureKernel) else k for k in pending]  # else: compiled before


def tuning_key(n_tokens: int, vocab_size: int, dim: int) -> tuple:
    """The autotune cache key beside the variant: the token count's bucket (the next power of two, at
    least 16: varying batch sizes tune a few times, not per call) and the exact V and d (fixed per model)."""
    return 1 << max(4, (max(n_tokens, 1) - 1).bit_length()), vocab_size, dim


def _launch(name: str, variant: Variant, n_tokens: int, shape_key: tuple, prepare):
    """Run kernel `name` compiled with the chosen config, or interpreted with small tiles.

    `prepare(meta)` returns (grid, args, outputs) for a config's meta-parameters (it allocates any
    buffer whose shape depends on the tiles); the outputs of the run that counts are returned.
    """
    kernel = KERNELS[name]
    if INTERPRETED:
        grid, args, outputs = prepare(INTERPRETER_BLOCKS)
        kernel[grid](*args, **dict(variant.constexprs(), UPCAST=True, **INTERPRETER_BLOCKS))
        return outputs

    def run(config):
        grid, args, outputs = prepare(config.kwargs)
        kernel[grid](*args, **launch_options(variant, config))
        return outputs

    compile_all = lambda candidates: compile_candidates(variant, candidates, lambda c: prepare(c.kwargs)[1])
    return run(_choose(variant, tuning_key(n_tokens, *shape_key), run, compile_all))


def _vocab_splits(num_tokens, vocab_size, block_n, block_v, device):
    """(splits, vocabulary entries per split) so that token blocks x splits fill the GPU about twice
    over; compiled, a split is a whole number of BLOCK_V. Under the interpreter split edges fall
    inside a block on purpose, so the tests exercise that masking."""
    if INTERPRETED:
        splits = min(3, triton.cdiv(vocab_size, block_v))
        return splits, triton.cdiv(vocab_size, splits)
    programs = 2 * torch.cuda.get_device_properties(device).multi_processor_count
    splits = max(1, min(triton.cdiv(programs, triton.cdiv(num_tokens, block_n)), triton.cdiv(vocab_size, 1024)))
    per_split = triton.cdiv(triton.cdiv(vocab_size, splits), block_v) * block_v
    return triton.cdiv(vocab_size, per_split), per_split


def vocab_sweep(h, W, y, dh=None, dW=None):
    """(loss, lse, tangent or None), all fp32 [N]: one fused sweep over the vocabulary."""
    N, D = h.shape
    V = W.shape[0]
    h, W, y = h.contiguous(), W.contiguous(), y.contiguous()
    dh = None if dh is None else dh.to(h.dtype).contiguous()
    dW = None if dW is None else dW.to(W.dtype).contiguous()
    jvp = dh is not None or dW is not None
    variant = variant_for("sweep", h, dh is not None, dW is not None)

    def prepare(meta):
        splits, per_split = _vocab_splits(N, V, meta["BLOCK_N"], meta["BLOCK_V"], h.device)
        parts = torch.empty(5 if jvp else 3, splits, N, dtype=torch.float32, device=h.device)
        tsum, dz_y = (parts[3], parts[4]) if jvp else (parts[2], parts[2])
        args = (h, W, h if dh is None else dh, W if dW is None else dW, y,
                parts[0], parts[1], tsum, parts[2], dz_y, N, V, D, per_split, h.stride(0), W.stride(0))
        return (triton.cdiv(N, meta["BLOCK_N"]), splits), args, parts

    parts = _launch("sweep", variant, N, (V, D), prepare)
    run_max, run_sum, z_y = parts[0], parts[1], parts[2]
    top = run_max.max(dim=0).values
    weights = torch.exp(run_max - top)
    total = (run_sum * weights).sum(0)
    lse = top + torch.log(total)
    valid = y != IGNORE_INDEX
    loss = torch.where(valid, lse - z_y.sum(0), 0.0)
    tangent = None
    if jvp:
        tangent = torch.where(valid, (parts[3] * weights).sum(0) / total - parts[4].sum(0), 0.0)
    return loss, lse, tangent


def logits_grad(h, W, y, lse, g, out, v_offset):
    """Write g (softmax - onehot) into out [N, chunk] (input dtype) for the vocabulary chunk W
    [chunk, d] that starts at entry v_offset (lse over the whole vocabulary), tile by tile."""
    N, D = h.shape
    V = W.shape[0]

    def prepare(meta):
        grid = (triton.cdiv(N, meta["BLOCK_N"]), triton.cdiv(V, meta["BLOCK_V"]))
        return grid, (h, W, y, lse, g, out, N, V, D, v_offset, h.stride(0), W.stride(0), out.stride(0)), None

    _launch("grad", variant_for("grad", h), N, (V, D), prepare)


def backward_chunk_columns(num_tokens, vocab_size, dim, element_size, budget_bytes=None, round_to=256):
    """Vocabulary entries per backward chunk: a d logits buffer [N, chunk] of about twice the
    hidden states' bytes (at least MIN_BACKWARD_BUFFER_BYTES), a multiple of `round_to`."""
    if budget_bytes is None:
        budget_bytes = max(2 * num_tokens * dim * element_size, MIN_BACKWARD_BUFFER_BYTES)
    cols = max(1, budget_bytes // (max(num_tokens, 1) * element_size))
    if cols >= vocab_size:
        return vocab_size
    return max(round_to, cols // round_to * round_to) if round_to > 1 else cols


def _plain(tensor):
    """The plain tensor under torch.func wrappers: a custom jvp receives wrapped tensors, and a
    Triton launch needs real storage (the tangent returned is lifted back by torch.func)."""
    while tensor is not None and is_functorch_wrapped_tensor(tensor):
        tensor = get_unwrapped(tensor)
    return tensor


class TritonBackend:
    """Backend (see kernels/linear_ce.py) running the Triton kernels.

    `budget_bytes` caps the backward's d logits chunk (default: see backward_chunk_columns).
    """

    def __init__(self, budget_bytes=None):
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
        """Per vocabulary chunk: d logits, then grad W rows (written in place) and grad h (summed)."""
        weight_dtype = W.dtype
        h, Wh, y = h.contiguous(), W.to(h.dtype).contiguous(), y.contiguous()
        (N, D), V = h.shape, W.shape[0]
        cols = backward_chunk_columns(N, V, D, h.element_size(), self.budget_bytes,
                                      round_to=1 if INTERPRETED else 256)
        g = torch.where(y != IGNORE_INDEX, g.float(), 0.0).contiguous()
        buf = torch.empty(N, cols, dtype=h.dtype, device=h.device)
        grad_W = torch.empty(V, D, dtype=weight_dtype, device=W.device)
        # grad h sums over chunks: in place when it is fp32 or there is one chunk, else an fp32 sum
        direct = h.dtype == torch.float32 or cols >= V
        grad_h = torch.zeros(N, D, dtype=h.dtype if direct else torch.float32, device=h.device)
        for v0 in range(0, V, cols):
            v1 = min(v0 + cols, V)
            part, W_chunk = buf[:, : v1 - v0], Wh[v0:v1]
            logits_grad(h, W_chunk, y, lse, g, part, v0)
            if weight_dtype == h.dtype:
                torch.mm(part.T, h, out=grad_W[v0:v1])
            else:
                grad_W[v0:v1] = part.T @ h
            if direct:
                grad_h.addmm_(part, W_chunk)
            else:
                grad_h += part @ W_chunk
        return grad_h.to(h.dtype), grad_W
