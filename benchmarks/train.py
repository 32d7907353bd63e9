"""Training steps of the torch backend vs the megatron-core backend at TP/PP layouts: time, tokens/s, MFU, memory.

The torch backend (one process: the dsel GPT with its fused linear-CE head, torch.optim.AdamW)
and the megatron backend at each `--layouts` TP/PP (under torchrun, world = TP*PP, DP = 1:
GPTModel with the local or TE spec, megatron DDP and optimizer) take AdamW steps (clip 1.0) on
the same GPT and the same random batch. MFU is the model's training FLOPs
(GPTConfig.flops_per_token(training=True)) per second over the peak of the devices used: on
GPUs, bf16 at 800 TFLOP/s (the dense matmul rate measured on an H100) per GPU; on a CPU, fp32
and the rate of a large matmul measured here with all cores (the ranks share those cores, so
a CPU row's MFU is against the whole machine).

Peak memory per rank (`--report-memory`): on GPUs the CUDA allocator's peak, on a CPU the
process's peak RSS (VmHWM) minus its RSS once torch and megatron are imported, so the column
is what the model, its gradients, the optimizer and the step added. `--build-only` times and
measures only building each rank's model (no optimizer, no step): for models whose training
state does not fit the machine (the 1B preset on a small CPU box); the torch row then builds
the full dsel GPT, which is what every rank used to do before sharding.

  python benchmarks/train.py                                      # CPU: small-cpu preset; GPU: pds-160m
  python benchmarks/train.py --preset tiny --layouts 1/1,2/1,1/2 --report-memory --out train_cpu.json
  python benchmarks/train.py --config configs/pretrain-1b-tp-pp.yaml --build-only --report-memory --layouts 1/1,2/1,1/2
"""
import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# benchmarks/kernels.py would shadow the kernels package the models import: keep this folder off sys.path.
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

import torch  # noqa: E402

from dsel.benchmarking import matmul_flops, measure  # noqa: E402
from dsel.io import write_json  # noqa: E402
from dsel.models.config import preset  # noqa: E402
from dsel.train.config import ParallelConfig, TrainConfig  # noqa: E402

H100_BF16_PEAK = 800e12
ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", help="model preset (default: pds-160m on GPU, small-cpu on CPU)")
    parser.add_argument("--config", help="take the model of this dsel train config instead (its preset and model "
                                         "overrides), e.g. configs/pretrain-1b-tp-pp.yaml")
    parser.add_argument("--seq-len", type=int, help="override the preset's context length")
    parser.add_argument("--batch-size", type=int, help="sequences per step (default: 16 on GPU, 8 on CPU)")
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per backend (median reported)")
    parser.add_argument("--layouts", default="1/1", help="megatron TP/PP layouts, comma-separated (world = TP*PP)")
    parser.add_argument("--report-memory", action="store_true", help="print the peak memory per rank")
    parser.add_argument("--build-only", action="store_true", help="only build each rank's model (no training step)")
    parser.add_argument("--out", default="train_benchmark.json", help="JSON results")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # internal: a torchrun rank's job (JSON file)
    return parser.parse_args(argv)


def parse_layouts(text: str) -> list[tuple[int, int]]:
    try:
        layouts = [tuple(int(x) for x in item.split("/")) for item in text.split(",")]
    except ValueError:
        layouts = []
    if not layouts or any(len(lay) != 2 or min(lay) < 1 for lay in layouts):
        raise SystemExit(f"--layouts {text!r}: expected TP/PP pairs such as 1/1,2/1,1/2")
    return layouts


def train_config(batch_size: int, precision: str, out: str, tp: int = 1, pp: int = 1) -> TrainConfig:
    """The step's settings (the data path is unused: the benchmark feeds random tokens)."""
    return TrainConfig(data=["<random tokens>"], out=out, steps=1, batch_size=batch_size, lr=1e-4, min_lr=1e-5,
                       grad_clip=1.0, precision=precision, parallel=ParallelConfig(tp=tp, pp=pp))


def rss_kib(field: str = "VmRSS") -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def peak_bytes_since(baseline_kib: int, device: torch.device) -> int:
    """Peak memory of this process beyond `baseline_kib` of RSS (CPU), or the CUDA allocator's peak."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated()
    return max(0, rss_kib("VmHWM") - baseline_kib) * 1024


def timed(fn, device, repeats: int, build_only: bool) -> float:
    """Median seconds of fn() (one warm-up first); a build is timed once, as it happens."""
    if build_only:
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start
    return measure(fn, device, repeats)[0]


# ---------------------------------------------------------------------------------------------
# The torch backend, in this process


def torch_row(config, tokens, cfg, device, repeats: int, build_only: bool) -> dict:
    from dsel.models.gpt import GPT
    from dsel.train import torch_backend

    baseline = rss_kib()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    if build_only:
        seconds = timed(lambda: GPT(config).to(device), device, repeats, True)
    else:
        model = GPT(config).to(device).train()
        optimizer = torch_backend.make_optimizer(model, cfg)
        step = lambda: torch_backend.train_step(model, optimizer, [(tokens, None)], cfg.lr, cfg.grad_clip,  # noqa: E731
                                                device, cfg.precision)
        seconds = timed(step, device, repeats, False)
    return {"backend": "torch", "tp": 1, "pp": 1, "world": 1, "seconds": seconds,
            "peak_memory_bytes": [peak_bytes_since(baseline, device)]}


# ---------------------------------------------------------------------------------------------
# The megatron backend, one torchrun per layout


def megatron_rank(job: dict) -> dict:
    """One rank's build (and steps) of the megatron model at job's layout -> its seconds and peak memory."""
    from megatron.core import parallel_state

    from dsel.models.config import GPTConfig
    from dsel.train.megatron import backend, model as megatron_model, shards

    config = GPTConfig(**job["model"])
    cfg = train_config(job["batch_size"], job["precision"], job["out"], job["tp"], job["pp"])
    device = backend.compute_device() if torch.cuda.is_available() else torch.device("cpu")
    megatron_model.init_parallel(cfg.parallel.tp, cfg.parallel.pp)
    megatron_model.seed_everything(cfg.seed)
    bf16 = backend.use_bf16(cfg)
    baseline = rss_kib()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    holder = {}

    def build():
        holder["model"] = backend.build_parallel_model(cfg, config, bf16)

    if job["build_only"]:
        seconds = timed(build, device, job["repeats"], True)
    else:
        build()
        ddps = backend.wrap_ddp(holder["model"], cfg)
        optimizer = backend.make_optimizer(ddps, cfg, bf16)
        tokens = torch.randint(0, config.vocab_size, (cfg.batch_size, config.seq_len + 1),
                               generator=torch.Generator().manual_seed(0))
        micro = [backend.rank_rows(tokens, None, 1, device)]
        seconds = timed(lambda: backend.train_step(ddps, optimizer, micro, cfg.lr, cfg, config.seq_len), device,
                        job["repeats"], False)
    row = {"rank": torch.distributed.get_rank(), "seconds": seconds,
           "params": shards.parameter_count(holder["model"]), "peak_memory_bytes": peak_bytes_since(baseline, device)}
    parallel_state.destroy_model_parallel()
    return row


def megatron_row(config, tp: int, pp: int, args, batch_size: int, precision: str, tmp: str) -> dict:
    """Run one layout under torchrun (tp*pp processes) and combine the ranks' reports."""
    job = {"model": dataclasses.asdict(config), "tp": tp, "pp": pp, "batch_size": batch_size,
           "precision": precision, "repeats": args.repeats, "build_only": args.build_only,
           "out": tmp, "report": str(Path(tmp) / f"ranks-{tp}-{pp}")}
    job_file = Path(tmp) / f"job-{tp}-{pp}.json"
    job_file.write_text(json.dumps(job))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(tp * pp),
           str(Path(__file__).resolve()), "--worker", str(job_file)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    if not torch.cuda.is_available():
        env.update(OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 1) // (tp * pp))), CUDA_VISIBLE_DEVICES="")
    done = subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if done.returncode != 0:
        raise SystemExit(f"megatron tp={tp} pp={pp} failed:\n{done.stderr[-3000:]}")
    ranks = sorted((json.loads(p.read_text()) for p in Path(tmp).glob(f"ranks-{tp}-{pp}.*.json")),
                   key=lambda r: r["rank"])
    return {"backend": "megatron", "tp": tp, "pp": pp, "world": tp * pp, "seconds": max(r["seconds"] for r in ranks),
            "params_per_rank": [r["params"] for r in ranks], "peak_memory_bytes": [r["peak_memory_bytes"] for r in ranks]}


def worker(job_file: str) -> None:
    """A torchrun rank: run megatron_rank and write its report."""
    from dsel.train.megatron import model as megatron_model

    megatron_model.quiet_megatron_warnings()
    job = json.loads(Path(job_file).read_text())
    row = megatron_rank(job)
    Path(f"{job['report']}.{row['rank']}.json").write_text(json.dumps(row))
    torch.distributed.destroy_process_group()


# ---------------------------------------------------------------------------------------------


def benchmark_model(args, on_gpu: bool):
    """The GPTConfig benchmarked: --config's model, or --preset's (with --seq-len)."""
    overrides = {"seq_len": args.seq_len} if args.seq_len else {}
    if args.config:
        from dsel.config import load_config

        return dataclasses.replace(load_config(TrainConfig, args.config).model_config(None, None), **overrides)
    return preset(args.preset or ("pds-160m" if on_gpu else "small-cpu"), **overrides)


def run(args) -> dict:
    on_gpu = torch.cuda.is_available()
    device = torch.device("cuda" if on_gpu else "cpu")
    config = benchmark_model(args, on_gpu)
    batch_size = args.batch_size or (16 if on_gpu else 8)
    precision = "bf16" if on_gpu else "fp32"
    peak = H100_BF16_PEAK if on_gpu else matmul_flops(device)
    flops_per_token = config.flops_per_token(training=True)
    tokens = torch.randint(0, config.vocab_size, (batch_size, config.seq_len + 1), device=device)
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        rows = [torch_row(config, tokens, train_config(batch_size, precision, tmp), device, args.repeats,
                          args.build_only)]
        rows += [megatron_row(config, tp, pp, args, batch_size, precision, tmp) for tp, pp in parse_layouts(args.layouts)]
    for r in rows:
        r["tokens_per_s"] = None if args.build_only else batch_size * config.seq_len / r["seconds"]
        devices = r["world"] if on_gpu else 1  # CPU ranks share the machine whose peak was measured
        r["tflops"] = None if args.build_only else r["tokens_per_s"] * flops_per_token / 1e12
        r["mfu"] = None if args.build_only else r["tokens_per_s"] * flops_per_token / (peak * devices)
    result = {"device": torch.cuda.get_device_name() if on_gpu else f"cpu ({os.cpu_count()} cores)",
              "precision": precision, "model": dataclasses.asdict(config), "num_params": config.num_params(),
              "batch_size": batch_size, "flops_per_token": flops_per_token, "peak_flops": peak,
              "peak_source": "H100 bf16 dense (800 TFLOP/s) per GPU" if on_gpu else "measured fp32 matmul, all cores",
              "build_only": args.build_only, "rows": rows}
    if not args.build_only:
        torch_speed = rows[0]["tokens_per_s"]
        result["ratios_megatron_over_torch"] = {f"{r['tp']}/{r['pp']}": r["tokens_per_s"] / torch_speed
                                                for r in rows[1:]}
    return result


def print_table(result: dict, report_memory: bool) -> None:
    what = "build of each rank's model" if result["build_only"] else "training step"
    print(f"device {result['device']} ({result['precision']}), {result['model']['n_layer']} layers "
          f"d={result['model']['d_model']} seq={result['model']['seq_len']} batch={result['batch_size']} "
          f"({result['num_params'] / 1e6:.1f}M params); {what}; peak {result['peak_flops'] / 1e12:.2f} TFLOP/s "
          f"({result['peak_source']})")
    header = f"{'backend':<10}{'tp/pp':>6}{'ms':>10}"
    header += "" if result["build_only"] else f"{'tokens/s':>12}{'TFLOP/s':>10}{'MFU':>8}"
    print(header + (f"  {'peak memory per rank (MiB)'}" if report_memory else ""))
    for r in result["rows"]:
        line = f"{r['backend']:<10}{r['tp']}/{r['pp']:<4}{r['seconds'] * 1e3:>10.1f}"
        if not result["build_only"]:
            line += f"{r['tokens_per_s']:>12.0f}{r['tflops']:>10.3f}{r['mfu']:>8.1%}"
        if report_memory:
            line += "  " + " ".join(f"{b / 2**20:.0f}" for b in r["peak_memory_bytes"])
        print(line)
    for layout, ratio in result.get("ratios_megatron_over_torch", {}).items():
        print(f"ratio megatron {layout} / torch tokens/s: {ratio:.2f}")


def main(argv=None) -> dict | None:
    args = parse_args(argv)
    if args.worker:
        worker(args.worker)
        return None
    result = run(args)
    print_table(result, args.report_memory)
    write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
