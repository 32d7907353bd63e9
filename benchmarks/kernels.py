"""Fused linear + cross-entropy (and its JVP) vs torch with materialised logits, torch's own
chunked F.linear_cross_entropy, Liger-Kernel and Cut Cross-Entropy.

For each (V, d, N) it times the per-token loss forward, forward+backward, and the JVP, and records
the peak extra memory of each (GPU: the CUDA allocator's peak; CPU: the process's peak RSS after
resetting it via /proc/self/clear_refs), and the MFU of each against a bf16 matmul peak measured
in the same run (useful FLOPs: 2NVd forward, 6NVd forward+backward and JVP). The anchor columns
(`torch-lce`, `liger`, `cce`) appear when the package imports and runs the shape; the JSON says
why one is missing (Liger and CCE are Triton-on-CUDA only). Prints a table with ratios, writes JSON.

  python benchmarks/kernels.py                          # GPU: the targets' shapes; CPU: small sizes
  python benchmarks/kernels.py --vocab 8192 --dim 256 --tokens 1024 --out kernels_cpu.json
Targets (GPU, bf16, N=8192, d=4096, V=128k): forward time <= the best of torch / Liger / CCE;
memory >= 10x below materialised torch for forward and JVP; JVP <= 3.3x our forward and >= 3x
faster than torch.func.jvp over materialised logits.
"""
import argparse
import os
import sys

# This script shares its name with the package it measures: keep its own folder off sys.path.
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import kernels  # noqa: E402
from dsel.benchmarking import matmul_flops, measure  # noqa: E402
from dsel.io import write_json  # noqa: E402

GPU_SHAPES = [(50304, 768, 8192), (128256, 4096, 8192)]  # (V, d, N): a 160M-class head and an 8B-class one
CPU_SHAPES = [(8192, 256, 1024), (32000, 256, 1024)]
ANCHORS = ("torch-lce", "liger", "cce")


def torch_loss(h, W, y):
    """Baseline: logits materialised in the input dtype, then per-token F.cross_entropy."""
    return F.cross_entropy(h @ W.T, y, reduction="none").float()


def torch_jvp(h, dh, W, dW, y):
    """Baseline JVP: torch.func.jvp through the materialised-logits loss."""
    return torch.func.jvp(lambda a, b: torch_loss(a, b, y), (h, W), (dh, dW))


def torch_chunked_loss(h, W, y):
    """torch 2.13's built-in fused head: F.linear_cross_entropy on its chunked path."""
    return F.linear_cross_entropy(h, W, y, reduction="none", options=torch.nn.LinearCrossEntropyOptions()).float()


def optional_implementations(device):
    """({column: per-token loss fn} of the anchors that import, {column: why one is missing})."""
    found, missing = {}, {}
    if hasattr(F, "linear_cross_entropy"):
        found["torch-lce"] = torch_chunked_loss
    else:
        missing["torch-lce"] = f"torch {torch.__version__} has no F.linear_cross_entropy"
    if device.type != "cuda":
        missing.update(liger="Liger-Kernel runs Triton on CUDA tensors only", cce="Cut Cross-Entropy runs Triton on "
                       "CUDA tensors only")
        return found, missing
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
        liger = LigerFusedLinearCrossEntropyLoss(reduction="none")
        found["liger"] = lambda h, W, y: liger(W, h, y)
    except ImportError as e:
        missing["liger"] = f"liger-kernel not importable: {e}"
    try:
        from cut_cross_entropy import linear_cross_entropy as cce
        found["cce"] = lambda h, W, y: cce(h, W, y, reduction="none")
    except ImportError as e:
        missing["cce"] = f"cut-cross-entropy not importable: {e}"
    return found, missing


def with_backward(loss_fn, h, W, y, g):
    """A closure running loss_fn forward and backward with per-token upstream grads g."""
    def run():
        a, b = h.detach().requires_grad_(), W.detach().requires_grad_()
        torch.autograd.grad((loss_fn(a, b, y) * g).sum(), (a, b))
    return run


def bench_case(V, d, N, dtype, device, repeats):
    """All columns for one shape: ({impl: {mode: (seconds, bytes)}}, {anchor: why it has no column})."""
    gen = torch.Generator(device=device).manual_seed(0)
    h = torch.randn(N, d, device=device, dtype=dtype, generator=gen)
    W = torch.randn(V, d, device=device, dtype=dtype, generator=gen) * d ** -0.5
    dh, dW = torch.randn_like(h), torch.randn_like(W) * d ** -0.5
    y = torch.randint(0, V, (N,), device=device, generator=gen)
    g = torch.rand(N, device=device, generator=gen)
    anchors, missing = optional_implementations(device)
    impls = {"torch": torch_loss, "dsel": kernels.linear_cross_entropy, **anchors}
    results = {}
    for name, loss_fn in impls.items():
        try:
            results[name] = {"forward": measure(lambda: loss_fn(h, W, y), device, repeats),
                             "fwd+bwd": measure(with_backward(loss_fn, h, W, y, g), device, repeats)}
        except Exception as e:  # an anchor library may not support this device/shape/dtype/reduction
            if name in ("torch", "dsel"):
                raise
            missing[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
            print(f"no {name} column at V={V} d={d} N={N}: {missing[name]}")
    results["torch"]["jvp"] = measure(lambda: torch_jvp(h, dh, W, dW, y), device, repeats)
    results["dsel"]["jvp"] = measure(lambda: kernels.linear_cross_entropy_jvp(h, dh, W, dW, y), device, repeats)
    return results, missing


def useful_flops(V, d, N):
    """Matmul FLOPs each mode needs at the least: forward 1 matmul, fwd+bwd and JVP 3."""
    return {"forward": 2 * N * V * d, "fwd+bwd": 6 * N * V * d, "jvp": 6 * N * V * d}


def ratios(results):
    """The target ratios: memory vs torch, time vs the best other column, JVP vs forward and vs torch."""
    ours = results["dsel"]
    out = {}
    for mode in ("forward", "fwd+bwd", "jvp"):
        others = [r[mode] for name, r in results.items() if name != "dsel" and mode in r]
        best = min(t for t, _ in others)
        out[f"{mode}_time_vs_best"] = ours[mode][0] / best
        torch_mem, our_mem = results["torch"][mode][1], ours[mode][1]
        out[f"{mode}_mem_torch_over_dsel"] = (torch_mem / max(our_mem, 1)) if torch_mem is not None else None
    out["jvp_over_forward"] = ours["jvp"][0] / ours["forward"][0]
    out["jvp_speedup_vs_torch_func_jvp"] = results["torch"]["jvp"][0] / ours["jvp"][0]
    return out


def print_row(V, d, N, results, r):
    mib = lambda b: "n/a" if b is None else f"{b / 2**20:.1f}"
    for name, modes in results.items():
        cells = " ".join(f"{mode}={t * 1e3:8.2f}ms/{mib(m):>8}MiB" for mode, (t, m) in modes.items())
        print(f"V={V:<7} d={d:<5} N={N:<6} {name:<6} {cells}")
    print("  ratios: " + " ".join(f"{k}={'n/a' if v is None else f'{v:.2f}'}" for k, v in r.items()))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--vocab", type=int, nargs="+", help="with --dim and --tokens: their cross product "
                   "instead of the default shapes")
    p.add_argument("--dim", type=int, nargs="+")
    p.add_argument("--tokens", type=int, nargs="+")
    p.add_argument("--dtype", choices=["bf16", "fp32"], default=None,
                   help="input dtype (default bf16 on GPU, fp32 on CPU)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="peak for MFU (default: a bf16 matmul measured in this run, fp32 on CPU)")
    p.add_argument("--out", default="kernels_bench.json")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    dtype_name = args.dtype or ("bf16" if gpu else "fp32")
    dtype = torch.bfloat16 if dtype_name == "bf16" else torch.float32
    shapes = GPU_SHAPES if gpu else CPU_SHAPES
    if args.vocab or args.dim or args.tokens:
        pick = lambda given, i: given or sorted({s[i] for s in shapes})
        shapes = [(V, d, N) for V in pick(args.vocab, 0) for d in pick(args.dim, 1) for N in pick(args.tokens, 2)]
    peak_dtype = torch.bfloat16 if gpu else torch.float32
    peak = args.peak_tflops or matmul_flops(device, peak_dtype, size=8192 if gpu else 1024) / 1e12
    rows = []
    print(f"device={device} dtype={dtype_name} backend={kernels.backend_name(torch.empty(0, device=device))} "
          f"peak={peak:.1f} TFLOP/s ({'given' if args.peak_tflops else 'measured ' + str(peak_dtype)}) "
          f"(time = median of {args.repeats}; memory = peak extra MiB)")
    for V, d, N in shapes:
        results, missing = bench_case(V, d, N, dtype, device, args.repeats)
        r = ratios(results)
        flops = useful_flops(V, d, N)
        mfu = {name: {mode: flops[mode] / t / (peak * 1e12) for mode, (t, _) in modes.items()}
               for name, modes in results.items()}
        print_row(V, d, N, results, r)
        rows.append(dict(vocab=V, dim=d, tokens=N, dtype=dtype_name, device=str(device), ratios=r, mfu=mfu,
                         missing_columns=missing,
                         results={k: {m: dict(seconds=t, peak_bytes=b) for m, (t, b) in v.items()}
                                  for k, v in results.items()}))
    write_json(args.out, dict(peak_tflops=peak, peak_source="given" if args.peak_tflops else f"measured {peak_dtype}",
                              rows=rows))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
