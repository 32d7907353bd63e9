"""One PMP solver step (forward + backward) with forward-mode grad·lambda vs per-example backward passes.

A solver step at inner step t does: the gamma-weighted training gradient (theta_{t+1}), the target
gradient grad J, the Hessian-vector product of the weighted training loss with the co-state, and
grad l(x_n)·lambda for every proxy example n of the batch. dsel gets all the dot products from one
forward-mode (JVP) pass over the batch with the fused loss-head JVP; the naive solver runs one
backward pass per example and dots each gradient with lambda. Both share everything else, use
the same model and batch, and their dot products are checked to agree.

Also reports what the whole solve costs next to one pretraining run: the measured step time
divided by the time of one plain training step (forward + backward) on the same batch gives a
multiplier m; solver FLOPs ~= outer_epochs * T * m * 6 * proxy_params * tokens_per_step, against
6 * target_params * pretraining_tokens.

  python benchmarks/pmp.py                       # CPU-sized model; pds-160m on GPU
  python benchmarks/pmp.py --batch 64 --out pmp.json
Target: >= 20x faster than the per-example loop. The step's other parts (the weighted gradient, grad J and
the HVP) cost the same in both, so the step's ratio is bounded by their share; the table shows both.
"""
import argparse
import os
import sys

sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

import numpy as np  # noqa: E402
import torch  # noqa: E402

from dsel.benchmarking import measure  # noqa: E402
from dsel.io import write_json  # noqa: E402
from dsel.models.config import GPTConfig, preset  # noqa: E402
from dsel.models.gpt import GPT  # noqa: E402
from dsel.pds.functional import axpy, zeros_like  # noqa: E402
from dsel.pds.solver import PMPSolver, SolverConfig  # noqa: E402

CPU_MODEL = GPTConfig(vocab_size=4096, seq_len=128, n_layer=2, n_head=4, d_model=128)


def naive_dots(solver, theta, ids, co_state):
    """grad l(x_n)·lambda by one backward pass per example."""
    out = np.zeros(len(ids))
    one = torch.ones(1, dtype=next(iter(theta.values())).dtype, device=solver.device)
    for j, n in enumerate(ids):
        grad, _ = solver.lm.gradient(theta, solver.proxy[n:n + 1].to(solver.device), one)
        out[j] = float(sum((grad[k] * co_state[k]).sum() for k in grad))
    return out


def fused_dots(solver, theta, ids, co_state):
    """grad l(x_n)·lambda for the batch by the solver's forward-mode pass."""
    out = np.zeros(solver.num_examples)
    solver.accumulate_dots(theta, 0, co_state, out)
    return out[ids] * len(ids) / solver.num_examples  # undo the solver's batch-to-epoch scale


def solver_step(solver, theta, gamma, dots_fn):
    """One inner step forward and its backward: theta_{t+1}, grad J, H lambda, every example's dot."""
    ids = solver.batches[0]
    theta_next = solver.step(theta, 0, gamma)
    _, co_state = solver.target_gradient(theta_next)
    dots = dots_fn(solver, theta, ids, co_state)
    hvp = solver.training_hvp(theta, 0, gamma, co_state)
    return dots, axpy(-solver.config.lr, hvp, co_state)


def training_step(solver, theta, gamma):
    """The yardstick: one weighted forward + backward of the batch (what pretraining does per step)."""
    grad = zeros_like(theta)
    for tokens, weights, _ in solver._micro_batches(solver.batches[0], gamma):
        grad = axpy(1.0, solver.lm.gradient(theta, tokens, weights)[0], grad)
    return grad


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=32, help="proxy windows per inner step")
    p.add_argument("--micro-batch", type=int, default=16)
    p.add_argument("--target", type=int, default=8, help="target windows")
    p.add_argument("--model", default=None, help="a preset name (default: pds-160m on GPU, a small model on CPU)")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--steps", type=int, default=100, help="T of the full solve (for the cost estimate)")
    p.add_argument("--outer-epochs", type=int, default=5)
    p.add_argument("--proxy-windows", type=int, default=163840, help="paper: 163,840 windows of 1024 tokens")
    p.add_argument("--pretrain-params", type=float, default=1.7e9, help="paper: 1.7B model")
    p.add_argument("--pretrain-tokens", type=float, default=50e9, help="paper: 50B tokens")
    p.add_argument("--out", default="benchmarks/pmp.json")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    config = preset(args.model) if args.model else (preset("pds-160m") if device.type == "cuda" else CPU_MODEL)
    torch.manual_seed(0)
    model = GPT(config).to(device)
    rng = np.random.default_rng(0)
    proxy = rng.integers(0, config.vocab_size, size=(args.batch, config.seq_len + 1))
    target = rng.integers(0, config.vocab_size, size=(args.target, config.seq_len + 1))
    solver = PMPSolver(model, proxy, target, SolverConfig(steps=1, micro_batch=args.micro_batch, lr=0.1),
                       device=device, show_progress=False)
    theta, gamma = solver.theta0, np.full(args.batch, 1.0 / args.batch)

    ids = solver.batches[0]
    _, co_state = solver.target_gradient(theta)  # any parameter-shaped vector serves as lambda
    fused, naive = fused_dots(solver, theta, ids, co_state), naive_dots(solver, theta, ids, co_state)
    agreement = float(np.abs(fused - naive).max() / max(np.abs(naive).max(), 1e-30))
    timings = {
        "dsel step (JVP dots)": measure(lambda: solver_step(solver, theta, gamma, fused_dots), device, args.repeats),
        "naive step (per-example backward)": measure(lambda: solver_step(solver, theta, gamma, naive_dots), device,
                                                     args.repeats),
        "dsel dots only": measure(lambda: fused_dots(solver, theta, ids, co_state), device, args.repeats),
        "naive dots only": measure(lambda: naive_dots(solver, theta, ids, co_state), device, args.repeats),
        "training step (fwd+bwd)": measure(lambda: training_step(solver, theta, gamma), device, args.repeats),
    }
    report(args, config, device, timings, agreement)


def report(args, config, device, timings, agreement):
    ours, naive, dots, naive_dots_time, train = (timings[k][0] for k in timings)
    multiplier = ours / train
    tokens_per_step = args.proxy_windows * (config.seq_len + 1)
    solver_flops = args.outer_epochs * args.steps * multiplier * 6 * config.num_params() * tokens_per_step
    pretrain_flops = 6 * args.pretrain_params * args.pretrain_tokens
    print(f"device={device} model: {config.n_layer} layers, d={config.d_model}, V={config.vocab_size}, "
          f"{config.num_params() / 1e6:.1f}M params; batch {args.batch} x {config.seq_len + 1} tokens")
    print(f"{'':<36}{'seconds':>10}{'peak MiB':>10}")
    for name, (seconds, peak) in timings.items():
        print(f"{name:<36}{seconds:>10.3f}{'n/a' if peak is None else f'{peak / 2**20:.0f}':>10}")
    print(f"speed-up over the naive solver step: {naive / ours:.1f}x; on the per-example dot products alone: "
          f"{naive_dots_time / dots:.1f}x (they agree to {agreement:.1e})")
    print(f"solver step = {multiplier:.1f} training steps; full solve (T={args.steps}, {args.outer_epochs} epochs, "
          f"{args.proxy_windows} windows) = {100 * solver_flops / pretrain_flops:.1f}% of pretraining "
          f"{args.pretrain_params / 1e9:.1f}B params on {args.pretrain_tokens / 1e9:.0f}B tokens")
    write_json(args.out, {
        "device": str(device), "settings": vars(args), "model": config.__dict__,
        "timings": {k: {"seconds": t, "peak_bytes": m} for k, (t, m) in timings.items()},
        "speedup_vs_naive": naive / ours, "dots_speedup_vs_naive": naive_dots_time / dots, "dot_relative_error": agreement,
        "step_over_training_step": multiplier, "solve_fraction_of_pretraining": solver_flops / pretrain_flops,
    })


if __name__ == "__main__":
    main()
