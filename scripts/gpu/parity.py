"""Compiled Triton kernels vs the torch reference at the sizes that matter (a step of validate.sh).

For each shape and precision (bf16; fp32 exact; fp32 with TF32) it compares the fused loss, the
gradients of hidden and weight, and the JVP tangent (both tangents) with kernels/linear_ce.py's
ReferenceBackend (fp32 math, TF32 off), and times the first (tuning + compiling) and, on GPU, a
second call. Error = max |got - want| / max |want|. Writes JSON; exit status 1 if any check fails.

  python scripts/gpu/parity.py --out parity.json
  python scripts/gpu/parity.py --dry-run --out parity.json   # toy sizes, CPU, Triton interpreter
"""
import argparse
import os
import sys
import time

import torch

import kernels
from dsel.device import tf32_matmuls
from dsel.io import write_json
from kernels.linear_ce import LinearCrossEntropyFunction, ReferenceBackend

# (tokens, d, vocab, precisions): a 160M-class and an 8B-class head; N*d > 2**31 for int64 offsets
SHAPES = [(8192, 768, 50304, ("bf16", "fp32", "tf32")), (8192, 4096, 128256, ("bf16", "fp32", "tf32")),
          (532480, 4096, 2048, ("bf16",))]
DRY_SHAPES = [(37, 24, 100, ("bf16", "fp32"))]
TOLERANCE = {"bf16": dict(loss=1e-3, tangent=1e-3, grad=2e-2), "fp32": dict(loss=1e-4, tangent=1e-4, grad=1e-4),
             "tf32": dict(loss=2e-2, tangent=2e-2, grad=2e-2)}


def relative_error(got, want) -> float:
    return float((got.float() - want.float()).abs().max() / want.float().abs().max().clamp_min(1e-12))


def timed(fn, device):
    """(result, seconds) of fn(), synchronised on GPU."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return out, time.perf_counter() - start


def check_shape(N, d, V, precision, device) -> list[dict]:
    """Loss, grads and JVP tangent of the Triton backend vs the reference for one shape/precision."""
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    gen = torch.Generator(device=device).manual_seed(0)
    h = torch.randn(N, d, device=device, dtype=dtype, generator=gen)
    W = (torch.randn(V, d, device=device, dtype=dtype, generator=gen) * d ** -0.5).to(dtype)
    dh = torch.randn(N, d, device=device, dtype=dtype, generator=gen)
    dW = (torch.randn(V, d, device=device, dtype=dtype, generator=gen) * d ** -0.5).to(dtype)
    y = torch.randint(0, V, (N,), device=device, generator=gen)
    y[::7] = kernels.IGNORE_INDEX
    g = torch.rand(N, device=device, generator=gen)
    ref = ReferenceBackend(budget=1 << 28 if device.type == "cuda" else 1 << 23)
    with tf32_matmuls(False):
        want_loss, _ = ref.forward(h, W, y)
        want_tangent = ref.jvp(h, dh, W, dW, y)[1]
        want_grads = ref.backward(h, W, y, None, g)
    rows = []
    tol = TOLERANCE[precision]
    base = dict(tokens=N, dim=d, vocab=V, precision=precision)

    def loss_fn():
        return kernels.linear_cross_entropy(h, W, y)

    def grads_fn():
        a, b = h.detach().requires_grad_(), W.detach().requires_grad_()
        from kernels.linear_ce_triton import TritonBackend
        out = LinearCrossEntropyFunction.apply(a, b, y, TritonBackend())[0]
        return torch.autograd.grad((out * g).sum(), (a, b))

    def jvp_fn():
        return kernels.linear_cross_entropy_jvp(h, dh, W, dW, y)[1]

    with tf32_matmuls(precision == "tf32"):
        for name, fn, want in (("loss", loss_fn, [want_loss]), ("jvp", jvp_fn, [want_tangent]),
                               ("grads", grads_fn, list(want_grads))):
            got, first = timed(fn, device)
            got, second = timed(fn, device) if device.type == "cuda" else (got, first)
            got = got if isinstance(got, (tuple, list)) else [got]
            errors = [relative_error(a, b) for a, b in zip(got, want)]
            limit = tol["grad" if name == "grads" else "tangent" if name == "jvp" else "loss"]
            rows.append(dict(base, check=name, errors=errors, tolerance=limit, ok=all(e <= limit for e in errors),
                             first_call_s=first, second_call_s=second))
            print(f"N={N:<7} d={d:<5} V={V:<7} {precision:<5} {name:<6} error {max(errors):.2e} "
                  f"(tol {limit:.0e}) {'ok' if rows[-1]['ok'] else 'FAIL'}  first {first:.2f}s second {second:.3f}s",
                  flush=True)
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dry-run", action="store_true", help="toy sizes on CPU under the Triton interpreter")
    p.add_argument("--out", default="parity.json")
    args = p.parse_args(argv)
    if args.dry_run and os.environ.get("TRITON_INTERPRET") != "1":
        sys.exit("parity --dry-run needs TRITON_INTERPRET=1 in the environment (set before Triton's import)")
    device = torch.device("cpu" if args.dry_run else "cuda")
    os.environ["DSEL_KERNELS"] = "triton"
    rows = []
    for N, d, V, precisions in DRY_SHAPES if args.dry_run else SHAPES:
        for precision in precisions:
            rows += check_shape(N, d, V, precision, device)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    ok = all(r["ok"] for r in rows)
    write_json(args.out, dict(device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu (interpreter)",
                              rows=rows, all_ok=ok))
    print(f"parity {'ok' if ok else 'FAILED'}: {sum(r['ok'] for r in rows)}/{len(rows)} checks; wrote {args.out}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
