"""Greedy generation (lm-eval's generate_until): KV-cached decoding vs rerunning the window per token.

Both decode the same model (random weights, a preset's architecture) from the same prompt for the
same number of tokens and must produce the same tokens; the baseline is what the dsel lm-eval
model did before: one full forward over the window for every generated token. Prints a table,
writes JSON and reports the speed ratio (dsel.benchmarking.measure: median of `--repeats` runs).

  python benchmarks/generate.py                                  # small-cpu, 96-token prompt, 32 new tokens
  python benchmarks/generate.py --device cuda --preset pds-160m --prompt 960 --new-tokens 64 --out gen_gpu.json
"""
import argparse
import os
import sys

# benchmarks/kernels.py would shadow the kernels package: keep this script's folder off sys.path.
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

import torch  # noqa: E402

from dsel.benchmarking import measure  # noqa: E402
from dsel.io import write_json  # noqa: E402
from dsel.models.config import preset  # noqa: E402
from dsel.models.generate import greedy_generate  # noqa: E402
from dsel.models.gpt import GPT  # noqa: E402


@torch.no_grad()
def rerun_window(model, prompt: list[int], new_tokens: int) -> list[int]:
    """Baseline: a forward over the last seq_len tokens for every generated token."""
    sequence = list(prompt)
    device = model.head_weight.device
    for _ in range(new_tokens):
        sequence.append(int(model(torch.tensor([sequence[-model.config.seq_len:]], device=device))[0, -1].argmax()))
    return sequence[len(prompt):]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--preset", default="small-cpu")
    p.add_argument("--prompt", type=int, default=96, help="prompt tokens")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default="benchmarks/generate.json")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = GPT(preset(args.preset, seq_len=max(preset(args.preset).seq_len, args.prompt + args.new_tokens)))
    model = model.to(device).eval()
    prompt = torch.randint(0, model.config.vocab_size, (args.prompt,)).tolist()
    cached = greedy_generate(model, prompt, args.new_tokens, stop=lambda ids: False)
    if cached != rerun_window(model, prompt, args.new_tokens):
        raise SystemExit("cached decoding produced other tokens than rerunning the window")
    rows = {}
    for name, fn in (("rerun window", lambda: rerun_window(model, prompt, args.new_tokens)),
                     ("kv cache", lambda: greedy_generate(model, prompt, args.new_tokens, stop=lambda ids: False))):
        seconds, peak = measure(fn, device, args.repeats)
        rows[name] = {"seconds": seconds, "tokens_per_s": args.new_tokens / seconds, "peak_bytes": peak}
    ratio = rows["kv cache"]["tokens_per_s"] / rows["rerun window"]["tokens_per_s"]
    print(f"{'decoder':<14}{'s':>10}{'new tokens/s':>14}   ({args.preset}, prompt {args.prompt}, {args.new_tokens} new, {device})")
    for name, row in rows.items():
        print(f"{name:<14}{row['seconds']:>10.4f}{row['tokens_per_s']:>14.1f}")
    print(f"ratios: kv cache / rerun window = {ratio:.2f}x")
    write_json(args.out, {"device": str(device), "preset": args.preset, "prompt": args.prompt,
                          "new_tokens": args.new_tokens, "rows": rows, "speed_ratio": ratio})
    return rows


if __name__ == "__main__":
    main()
