"""CoLoR scoring throughput: ColorScorer (fused linear-CE) vs a plain torch scorer, same models.

Both scorers run the same two GPTs (a prior and a conditional model, random weights: speed does
not depend on them) over the same batch of random windows, in the same micro-batches and under
the same autocast (bf16 on GPU, fp32 on CPU). The only difference is the loss head: ColorScorer fuses the
head with the cross-entropy (kernels.linear_cross_entropy, Triton on GPU) and never holds the
[tokens x vocab] logits; the baseline materialises them and calls F.cross_entropy(reduction='none').
Prints a table, writes JSON, and reports the speed ratio, tokens/s (of the pool and per model),
MFU = forward FLOPs/token x per-model tokens/s / peak FLOP/s, and peak memory of one call
(dsel.benchmarking.measure: median time of `--repeats` calls after a warm-up).

  python benchmarks/score.py                          # color-150m on GPU, small-cpu on CPU
  python benchmarks/score.py --preset color-150m --batch-size 256 --micro-batch 64 --out score_gpu.json
  python benchmarks/score.py --vocab-size 50304        # CPU: a GPT-2-size head, past the plain-logits limit
Reference: the CoLoR code scores ~0.7M tokens/s per H100 for one 150M model (bf16 autocast).
"""
import argparse
import dataclasses
import os
import sys

# benchmarks/kernels.py would shadow the kernels package: keep this script's folder off sys.path.
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import kernels  # noqa: E402
from dsel.benchmarking import matmul_flops, measure  # noqa: E402
from dsel.color.scorer import ColorScorer  # noqa: E402
from dsel.device import autocast_for  # noqa: E402
from dsel.io import write_json  # noqa: E402
from dsel.models.config import preset  # noqa: E402
from dsel.models.gpt import GPT  # noqa: E402


class PlainTorchScorer:
    """Baseline: materialised logits + F.cross_entropy(reduction='none'), otherwise as ColorScorer."""

    def __init__(self, models: dict, micro_batch: int, device: torch.device, precision: str):
        self.models, self.micro_batch, self.device, self.precision = models, micro_batch, device, precision

    @torch.no_grad()
    def __call__(self, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        tokens = tokens.to(self.device)
        out = {f"loss_{name}": torch.cat([self.mean_losses(model, tokens[i:i + self.micro_batch])
                                          for i in range(0, len(tokens), self.micro_batch)]).cpu()
               for name, model in self.models.items()}
        out["color"] = out["loss_prior"] - out["loss_cond"]
        return out

    def mean_losses(self, model: GPT, tokens: torch.Tensor) -> torch.Tensor:
        with autocast_for(self.device, self.precision):
            logits = model(tokens[:, :-1])
            return F.cross_entropy(logits.transpose(1, 2), tokens[:, 1:], reduction="none").float().mean(1)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--preset", default=None, help="model preset (default color-150m on GPU, small-cpu on CPU)")
    p.add_argument("--window", type=int, default=None, help="tokens per window (default the preset's seq_len)")
    p.add_argument("--vocab-size", type=int, default=None, help="override the preset's vocabulary (the head's V)")
    p.add_argument("--batch-size", type=int, default=None, help="windows per scorer call (default 128 GPU, 16 CPU)")
    p.add_argument("--micro-batch", type=int, default=None, help="rows per forward (default 64 GPU, 8 CPU)")
    p.add_argument("--repeats", type=int, default=None, help="timed calls per scorer, median kept (default 10 GPU, 3 CPU)")
    p.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="peak for MFU (default: a matmul measured in this run: bf16 8192^3 on GPU, fp32 on CPU)")
    p.add_argument("--out", default="score_bench.json")
    args = p.parse_args(argv)

    device = torch.device(args.device)
    gpu = device.type == "cuda"
    preset_name = args.preset or ("color-150m" if gpu else "small-cpu")
    config = preset(preset_name)
    if args.vocab_size:
        config = dataclasses.replace(config, vocab_size=args.vocab_size)
    window = args.window or config.seq_len
    batch_size = args.batch_size or (128 if gpu else 16)
    micro_batch = args.micro_batch or (64 if gpu else 8)
    precision = args.precision if args.precision != "auto" else ("bf16" if gpu else "fp32")
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    if args.peak_tflops:
        peak, peak_source = args.peak_tflops, "given"
    elif gpu:
        peak, peak_source = matmul_flops(device, torch.bfloat16, size=8192) / 1e12, "measured bf16 matmul"
    else:
        peak, peak_source = matmul_flops(device, dtype) / 1e12, "measured matmul"

    models = {}
    for seed, name in enumerate(("prior", "cond")):
        torch.manual_seed(seed)
        models[name] = GPT(config).to(device).eval()
    batch = torch.randint(0, config.vocab_size, (batch_size, window), generator=torch.Generator().manual_seed(0))
    scorers = {"color": ColorScorer(models, micro_batch=micro_batch, device=device, precision=precision),
               "torch": PlainTorchScorer(models, micro_batch, device, precision)}
    repeats = args.repeats or (10 if gpu else 3)

    flops_per_token = config.flops_per_token()
    batch_tokens = batch_size * window
    print(f"device={device} preset={preset_name} window={window} batch={batch_size} "
          f"micro_batch={micro_batch} precision={precision} vocab={config.vocab_size} "
          f"kernels={kernels.backend_name(batch.to(device), micro_batch * (window - 1), config.vocab_size)} "
          f"params={config.num_params() / 1e6:.0f}M peak={peak:.1f} TFLOP/s ({peak_source})")
    print(f"{'scorer':<8} {'s/batch':>9} {'pool tok/s':>12} {'per-model tok/s':>16} {'MFU':>7} {'peak MiB':>9}")
    rows = {}
    for name, scorer in scorers.items():
        seconds, peak_bytes = measure(lambda: scorer(batch), device, repeats)
        per_model = batch_tokens * len(models) / seconds
        rows[name] = dict(seconds_per_batch=seconds, pool_tokens_per_s=batch_tokens / seconds,
                          per_model_tokens_per_s=per_model, mfu=flops_per_token * per_model / (peak * 1e12),
                          peak_mib=None if peak_bytes is None else peak_bytes / 2**20)
        mib = "n/a" if peak_bytes is None else f"{peak_bytes / 2**20:.0f}"
        print(f"{name:<8} {seconds:9.4f} {batch_tokens / seconds:12.0f} {per_model:16.0f} {rows[name]['mfu']:7.1%} {mib:>9}")
    speedup = rows["torch"]["seconds_per_batch"] / rows["color"]["seconds_per_batch"]
    scores = {name: scorer(batch) for name, scorer in scorers.items()}
    max_diff = max(float((scores["color"][c] - scores["torch"][c]).abs().max()) for c in scores["color"])
    print(f"speed ratio color/torch = {speedup:.2f}x  max |score difference| = {max_diff:.2e}")
    write_json(args.out, dict(device=str(device), preset=preset_name, model=vars(config), window=window,
                              batch_size=batch_size, micro_batch=micro_batch, precision=precision,
                              repeats=repeats, peak_tflops=peak, peak_source=peak_source,
                              flops_per_token=flops_per_token, rows=rows, speed_ratio=speedup,
                              max_abs_score_difference=max_diff))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
