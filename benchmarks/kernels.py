"""Fused linear + cross-entropy (and its JVP) vs torch with materialised logits, Liger, CCE.

For each (V, d, N) it times the per-token loss forward, forward+backward, and the JVP, and records
the peak extra memory of each (GPU: the CUDA allocator's peak; CPU: the process's peak RSS after
resetting it via /proc/self/clear_refs). Liger-Kernel and Cut Cross-Entropy columns appear only
when those packages import. Prints a table with ratios and writes JSON.

  python benchmarks/kernels.py                          # GPU sizes on CUDA, small sizes on CPU
  python benchmarks/kernels.py --vocab 8192 --dim 256 --tokens 1024 --out kernels_cpu.json
Targets (GPU): peak memory >= 10x below torch; time <= best of torch/Liger/CCE; JVP <= 2x forward.
"""
import argparse
import os
import sys

# This script shares its name with the package it measures: keep its own folder off sys.path.
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import kernels  # noqa: E402
from dsel.benchmarking import measure  # noqa: E402
from dsel.io import write_json  # noqa: E402

GPU_DEFAULTS = dict(vocab=[32768, 50304, 128256], dim=[768, 1024, 2048], tokens=[16384, 65536])
CPU_DEFAULTS = dict(vocab=[8192, 32000], dim=[256], tokens=[1024])


def torch_loss(h, W, y):
    """Baseline: logits materialised in the input dtype, then per-token F.cross_entropy."""
    return F.cross_entropy(h @ W.T, y, reduction="none").float()


def torch_jvp(h, dh, W, dW, y):
    """Baseline JVP: torch.func.jvp through the materialised-logits loss."""
    return torch.func.jvp(lambda a, b: torch_loss(a, b, y), (h, W), (dh, dW))


def optional_implementations():
    """Per-token loss functions of the anchor libraries that are installed, by column name."""
    found = {}
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
        liger = LigerFusedLinearCrossEntropyLoss(reduction="none")
        found["liger"] = lambda h, W, y: liger(W, h, y)
    except ImportError:
        pass
    try:
        from cut_cross_entropy import linear_cross_entropy as cce
        found["cce"] = lambda h, W, y: cce(h, W, y, reduction="none")
    except ImportError:
        pass
    return found


def with_backward(loss_fn, h, W, y, g):
    """A closure running loss_fn forward and backward with per-token upstream grads g."""
    def run():
        a, b = h.detach().requires_grad_(), W.detach().requires_grad_()
        torch.autograd.grad((loss_fn(a, b, y) * g).sum(), (a, b))
    return run


def bench_case(V, d, N, dtype, device, repeats):
    """All columns for one shape: {impl: {mode: (seconds, bytes)}}."""
    gen = torch.Generator(device=device).manual_seed(0)
    h = torch.randn(N, d, device=device, dtype=dtype, generator=gen)
    W = torch.randn(V, d, device=device, dtype=dtype, generator=gen) * d ** -0.5
    dh, dW = torch.randn_like(h), torch.randn_like(W) * d ** -0.5
    y = torch.randint(0, V, (N,), device=device, generator=gen)
    g = torch.rand(N, device=device, generator=gen)
    impls = {"torch": torch_loss, "dsel": kernels.linear_cross_entropy, **optional_implementations()}
    results = {}
    for name, loss_fn in impls.items():
        try:
            results[name] = {"forward": measure(lambda: loss_fn(h, W, y), device, repeats),
                             "fwd+bwd": measure(with_backward(loss_fn, h, W, y, g), device, repeats)}
        except Exception as e:  # an anchor library may not support this shape/dtype/reduction
            if name in ("torch", "dsel"):
                raise
            print(f"skipping {name} at V={V} d={d} N={N}: {type(e).__name__}: {str(e)[:120]}")
    results["torch"]["jvp"] = measure(lambda: torch_jvp(h, dh, W, dW, y), device, repeats)
    results["dsel"]["jvp"] = measure(lambda: kernels.linear_cross_entropy_jvp(h, dh, W, dW, y), device, repeats)
    return results


def ratios(results):
    """The target ratios: memory vs torch, time vs the best anchor, JVP vs forward."""
    ours = results["dsel"]
    out = {}
    for mode in ("forward", "fwd+bwd", "jvp"):
        others = [r[mode] for name, r in results.items() if name != "dsel" and mode in r]
        best = min(t for t, _ in others)
        out[f"{mode}_time_vs_best"] = ours[mode][0] / best
        torch_mem, our_mem = results["torch"][mode][1], ours[mode][1]
        out[f"{mode}_mem_torch_over_dsel"] = (torch_mem / max(our_mem, 1)) if torch_mem is not None else None
    out["jvp_over_forward"] = ours["jvp"][0] / ours["forward"][0]
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
    p.add_argument("--vocab", type=int, nargs="+")
    p.add_argument("--dim", type=int, nargs="+")
    p.add_argument("--tokens", type=int, nargs="+")
    p.add_argument("--dtype", choices=["bf16", "fp32"], default=None,
                   help="input dtype (default bf16 on GPU, fp32 on CPU)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default="kernels_bench.json")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    defaults = GPU_DEFAULTS if device.type == "cuda" else CPU_DEFAULTS
    dtype_name = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    dtype = torch.bfloat16 if dtype_name == "bf16" else torch.float32
    rows = []
    print(f"device={device} dtype={dtype_name} backend={kernels.backend_name(torch.empty(0, device=device))} "
          f"(time = median of {args.repeats}; memory = peak extra MiB)")
    for V in args.vocab or defaults["vocab"]:
        for d in args.dim or defaults["dim"]:
            for N in args.tokens or defaults["tokens"]:
                results = bench_case(V, d, N, dtype, device, args.repeats)
                r = ratios(results)
                print_row(V, d, N, results, r)
                rows.append(dict(vocab=V, dim=d, tokens=N, dtype=dtype_name, device=str(device), ratios=r,
                                 results={k: {m: dict(seconds=t, peak_bytes=b) for m, (t, b) in v.items()}
                                          for k, v in results.items()}))
    write_json(args.out, dict(rows=rows))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
