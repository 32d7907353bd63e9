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
  python benchmarks/pmp.py --mode ranks --ranks 1,2 --steps 2  # a solve's step time on 1 vs 2 torchrun ranks
  python benchmarks/pmp.py --mode stability --prior runs/quickstart/prior/model \
      --proxy runs/quickstart/pds/proxy/proxy --target-data runs/quickstart/tokenize/target \
      --target 32 --steps 20 --batch 16      # rank agreement of 2 solver seeds

Rank stability: in SGD mode the batch order is random, so two solver seeds give two G's; the Spearman
correlation between them says how much of a window's score is the window and how much the draw. The
exact estimator (score_every=0: each window only at the steps it was drawn, scaled by N/|B|) is
compared with the fixed-step one (every window at every k-th step, the official estimator).
Target: >= 20x faster than the per-example loop. The step's other parts (the weighted gradient, grad J and
the HVP) cost the same in both, so the step's ratio is bounded by their share; the table shows both.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

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
    solver.accumulate_dots(theta, 0, co_state, out, np.full(solver.num_examples, 1.0 / solver.num_examples))
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
    p.add_argument("--mode", choices=["step", "ranks", "stability", "rank-worker"], default="step")
    p.add_argument("--ranks", default="1,2", help="--mode ranks: the process counts to compare")
    p.add_argument("--prior", help="--mode stability: proxy LM checkpoint (e.g. the quickstart prior)")
    p.add_argument("--proxy", help="--mode stability: proxy data prefix")
    p.add_argument("--target-data", help="--mode stability: target data prefix or jsonl")
    p.add_argument("--seeds", default="0,1", help="--mode stability: the two solver seeds")
    p.add_argument("--score-every", type=int, default=5, help="--mode stability: k of the fixed-step estimator")
    p.add_argument("--lr", type=float, default=0.1, help="inner learning rate (--mode stability, ranks; the solver default)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=32, help="proxy windows per inner step")
    p.add_argument("--micro-batch", type=int, default=16)
    p.add_argument("--target", type=int, default=8, help="target windows (--mode stability: examples, 0 = all)")
    p.add_argument("--model", default=None, help="a preset name (default: pds-160m on GPU, a small model on CPU)")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--steps", type=int, default=100, help="T of the full solve (for the cost estimate)")
    p.add_argument("--outer-epochs", type=int, default=5)
    p.add_argument("--proxy-windows", type=int, default=163840, help="paper: 163,840 windows of 1024 tokens")
    p.add_argument("--pretrain-params", type=float, default=1.7e9, help="paper: 1.7B model")
    p.add_argument("--pretrain-tokens", type=float, default=50e9, help="paper: 50B tokens")
    p.add_argument("--out", default="benchmarks/pmp.json")
    args = p.parse_args(argv)
    if args.mode != "step":
        return {"ranks": rank_scaling, "stability": rank_stability, "rank-worker": rank_worker}[args.mode](args)
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


# ----- rank stability ------------------------------------------------------------------------------
def rank_stability(args):
    """Spearman between the G of two solver seeds (SGD mode), exact vs fixed-step estimator."""
    from dsel.color.scorer import ScoredModel
    from dsel.errors import DselError
    from dsel.models.checkpoint import load_model
    from dsel.pds.commands import SolveConfig, load_target_examples, load_tokens
    from dsel.pds.fit import spearman

    model, meta = load_model(args.prior, args.device)
    lm = ScoredModel("proxy", model, args.prior, meta)
    window = model.config.seq_len + 1
    proxy = load_tokens(args.proxy, window, 0, "uint16", lm)
    target = load_target_examples(SolveConfig(model=args.prior, proxy=args.proxy, target=args.target_data,
                                              num_target=args.target), window, lm)
    seeds = [int(x) for x in args.seeds.split(",")]
    rows = {}
    for name, every in (("exact (score_every=0)", 0), (f"fixed-step (score_every={args.score_every})", args.score_every)):
        start = time.perf_counter()
        G = []
        try:
            for seed in seeds:
                cfg = SolverConfig(steps=args.steps, lr=args.lr, batch_size=args.batch, score_every=every,
                                   seed=seed, micro_batch=args.micro_batch)
                G.append(PMPSolver(model, proxy, target, cfg, device=args.device, show_progress=False)
                         .gamma_gradient(np.full(len(proxy), 1.0 / len(proxy)))[0])
        except DselError as refused:  # e.g. an lr beyond the stable range: the solve stops, so no ranks to compare
            rows[name] = {"refused": str(refused), "seconds": time.perf_counter() - start}
            continue
        rows[name] = {"spearman_between_seeds": spearman(G[0], G[1]), "seconds": time.perf_counter() - start,
                      "zero_windows": int(sum((g == 0).sum() for g in G))}
    print(f"rank stability: {len(proxy)} proxy windows of {window} tokens, {len(target)} target examples, "
          f"T={args.steps}, batch {args.batch}, lr {args.lr}, seeds {seeds}")
    print(f"{'estimator':<36}{'Spearman(seed a, seed b)':>26}{'seconds':>10}")
    for name, row in rows.items():
        if "refused" in row:
            print(f"{name:<36}{'refused by the solve':>26}{row['seconds']:>10.1f}  ({row['refused']})")
        else:
            print(f"{name:<36}{row['spearman_between_seeds']:>26.3f}{row['seconds']:>10.1f}")
    write_json(args.out, {"mode": "stability", "settings": vars(args), "estimators": rows})
    return rows


# ----- 1 vs N ranks ---------------------------------------------------------------------------------
def rank_worker(args):
    """Under torchrun: time one outer epoch of a solve (T=args.steps) and write G and the time (rank 0)."""
    import torch.distributed as dist

    from dsel.score.commands import start_distributed

    device, created = start_distributed(args.device)
    config = preset(args.model) if args.model else CPU_MODEL
    torch.manual_seed(0)
    model = GPT(config).to(device)
    rng = np.random.default_rng(0)
    proxy = rng.integers(0, config.vocab_size, size=(args.batch, config.seq_len + 1))
    target = rng.integers(0, config.vocab_size, size=(args.target, config.seq_len + 1))
    cfg = SolverConfig(steps=args.steps, lr=args.lr, micro_batch=args.micro_batch)
    solver = PMPSolver(model, proxy, target, cfg, device=device, show_progress=False)
    gamma = np.full(args.batch, 1.0 / args.batch)
    solver.gamma_gradient(gamma)  # warm-up
    start = time.perf_counter()
    G, _ = solver.gamma_gradient(gamma)
    seconds = (time.perf_counter() - start) / args.steps
    if solver.rank == 0:
        write_json(args.out, {"ranks": solver.world, "seconds_per_step": seconds, "G": G.tolist()})
    if created:
        dist.destroy_process_group()


def rank_scaling(args):
    """Launch rank_worker under torchrun for each rank count; print step time, speed-up and G agreement."""
    counts = [int(x) for x in args.ranks.split(",")]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for n in counts:
            out = os.path.join(tmp, f"ranks{n}.json")
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
                   os.path.abspath(__file__), "--mode", "rank-worker", "--out", out, "--device", args.device,
                   "--batch", str(args.batch), "--micro-batch", str(args.micro_batch), "--target", str(args.target),
                   "--steps", str(args.steps), "--lr", str(args.lr), *(["--model", args.model] if args.model else [])]
            env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // n)), "DSEL_PROGRESS": "0"}
            subprocess.run(cmd, check=True, env=env)
            results[n] = json.loads(open(out).read())
    base = results[counts[0]]
    print(f"solve step (forward + backward of one inner step, {args.batch} windows, micro-batch {args.micro_batch}, "
          f"device {args.device})")
    print(f"{'ranks':<8}{'s / step':>10}{'speed-up':>10}{'max |G - G_1| / max |G_1|':>28}")
    rows = {}
    for n, r in results.items():
        G, G1 = np.asarray(r["G"]), np.asarray(base["G"])
        rows[n] = {"seconds_per_step": r["seconds_per_step"], "speedup": base["seconds_per_step"] / r["seconds_per_step"],
                   "G_relative_difference": float(np.abs(G - G1).max() / np.abs(G1).max())}
        print(f"{n:<8}{r['seconds_per_step']:>10.3f}{rows[n]['speedup']:>10.2f}{rows[n]['G_relative_difference']:>28.1e}")
    write_json(args.out, {"mode": "ranks", "settings": vars(args), "ranks": rows})
    return rows


if __name__ == "__main__":
    main()
