"""One training step of the torch backend vs the megatron-core backend on the same model: tokens/s and MFU.

Both backends take an AdamW step (grad clip 1.0) on the same GPT and the same random batch:
the torch backend's dsel GPT (fused linear-CE head) with torch.optim.AdamW, and megatron-core's
GPTModel (TP=PP=DP=1, local or TE layer spec) with its DDP wrapper and optimizer. MFU is the
model's training FLOPs (GPTConfig.flops_per_token(training=True)) per second over a peak:
on a GPU, bf16 and 800 TFLOP/s (the dense bf16 matmul rate measured on an H100); on a CPU,
fp32 and the rate of a large fp32 matmul measured here in the same run (megatron runs through
dsel.train.megatron.shim there).

  python benchmarks/train.py                                # CPU: small-cpu preset; GPU: pds-160m
  python benchmarks/train.py --preset tiny --batch-size 4 --repeats 3 --out train_cpu.json
Reports tokens/s, TFLOP/s and MFU per backend and the ratio megatron / torch.
"""
import argparse
import contextlib
import dataclasses
import os
import sys
import tempfile

# benchmarks/kernels.py would shadow the kernels package the models import: keep this folder off sys.path.
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

import torch  # noqa: E402

from dsel.benchmarking import matmul_flops, measure  # noqa: E402
from dsel.io import write_json  # noqa: E402
from dsel.models.config import preset  # noqa: E402
from dsel.train.config import TrainConfig  # noqa: E402

H100_BF16_PEAK = 800e12


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", help="model preset (default: pds-160m on GPU, small-cpu on CPU)")
    parser.add_argument("--seq-len", type=int, help="override the preset's context length")
    parser.add_argument("--batch-size", type=int, help="sequences per step (default: 16 on GPU, 8 on CPU)")
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per backend (median reported)")
    parser.add_argument("--out", default="train_benchmark.json", help="JSON results")
    return parser.parse_args(argv)


def train_config(batch_size: int, precision: str, out: str) -> TrainConfig:
    """The step's settings (the data path is unused: the benchmark feeds random tokens)."""
    return TrainConfig(data=["<random tokens>"], out=out, steps=1, batch_size=batch_size, lr=1e-4, min_lr=1e-5,
                       grad_clip=1.0, precision=precision)


def torch_step(config, tokens, cfg, device):
    """A closure running one torch-backend step (dsel GPT + AdamW)."""
    from dsel.models.gpt import GPT
    from dsel.train import torch_backend

    model = GPT(config).to(device).train()
    optimizer = torch_backend.make_optimizer(model, cfg)
    return lambda: torch_backend.train_step(model, optimizer, [(tokens, None)], cfg.lr, cfg.grad_clip, device,
                                            cfg.precision)


@contextlib.contextmanager
def megatron_world():
    """A one-process megatron world (TP=PP=DP=1), torn down afterwards with the CPU shim."""
    from megatron.core import parallel_state

    from dsel.train.megatron import model as megatron_model, shim

    megatron_model.init_parallel(1, 1)
    try:
        yield
    finally:
        parallel_state.destroy_model_parallel()
        torch.distributed.destroy_process_group()
        shim.deactivate()


def megatron_step(config, tokens, cfg, device):
    """A closure running one megatron-backend step (GPTModel + DDP + megatron optimizer); needs megatron_world."""
    from dsel.models.gpt import GPT
    from dsel.train.megatron import backend, model as megatron_model

    megatron_model.seed_everything(cfg.seed)
    bf16 = backend.use_bf16(cfg)
    ddp = backend.wrap_ddp(backend.build_parallel_model(cfg, GPT(config), bf16), cfg)
    optimizer = backend.make_optimizer(ddp, cfg, bf16)
    micro = [backend.rank_rows(tokens, None, 1, device)]
    return lambda: backend.train_step(ddp, optimizer, micro, cfg.lr, cfg, config.seq_len)


def run(args) -> dict:
    on_gpu = torch.cuda.is_available()
    device = torch.device("cuda" if on_gpu else "cpu")
    overrides = {"seq_len": args.seq_len} if args.seq_len else {}
    config = preset(args.preset or ("pds-160m" if on_gpu else "small-cpu"), **overrides)
    batch_size = args.batch_size or (16 if on_gpu else 8)
    peak = H100_BF16_PEAK if on_gpu else matmul_flops(torch.device("cpu"))
    tokens = torch.randint(0, config.vocab_size, (batch_size, config.seq_len + 1), device=device)
    flops_per_token = config.flops_per_token(training=True)
    rows = []
    with tempfile.TemporaryDirectory() as out:
        cfg = train_config(batch_size, "bf16" if on_gpu else "fp32", out)
        backends = (("torch", torch_step, contextlib.nullcontext), ("megatron", megatron_step, megatron_world))
        for name, make, world in backends:
            torch.manual_seed(0)
            with world():
                seconds, peak_bytes = measure(make(config, tokens, cfg, device), device, args.repeats)
            tokens_per_s = batch_size * config.seq_len / seconds
            rows.append({"backend": name, "step_s": seconds, "tokens_per_s": tokens_per_s,
                         "tflops": tokens_per_s * flops_per_token / 1e12,
                         "mfu": tokens_per_s * flops_per_token / peak, "peak_memory_bytes": peak_bytes})
    speed = {r["backend"]: r["tokens_per_s"] for r in rows}
    return {"device": torch.cuda.get_device_name() if on_gpu else "cpu", "precision": cfg.precision,
            "model": dataclasses.asdict(config), "batch_size": batch_size, "flops_per_token": flops_per_token,
            "peak_flops": peak, "peak_source": "H100 bf16 dense (800 TFLOP/s)" if on_gpu else "measured fp32 matmul",
            "rows": rows, "ratio_megatron_over_torch": speed["megatron"] / speed["torch"]}


def print_table(result: dict) -> None:
    print(f"device {result['device']} ({result['precision']}), {result['model']['n_layer']} layers "
          f"d={result['model']['d_model']} seq={result['model']['seq_len']} batch={result['batch_size']}, "
          f"peak {result['peak_flops'] / 1e12:.2f} TFLOP/s ({result['peak_source']})")
    print(f"{'backend':<10}{'step ms':>10}{'tokens/s':>12}{'TFLOP/s':>10}{'MFU':>8}")
    for r in result["rows"]:
        print(f"{r['backend']:<10}{r['step_s'] * 1e3:>10.1f}{r['tokens_per_s']:>12.0f}{r['tflops']:>10.3f}"
              f"{r['mfu']:>8.1%}")
    print(f"ratio megatron/torch tokens/s: {result['ratio_megatron_over_torch']:.2f}")


def main(argv=None) -> dict:
    args = parse_args(argv)
    result = run(args)
    print_table(result)
    write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
