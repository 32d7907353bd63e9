"""`megatron_args.txt`: Megatron-LM arguments that train on a dsel dataset in dsel's sample order.

    python pretrain_gpt.py $(grep -v '^#' runs/select/megatron_args.txt) --train-iters 5000 \\
        --global-batch-size 512 --micro-batch-size 4 ...     # the model and optimizer arguments

`dsel train backend=megatron` and Megatron-LM's pretrain_gpt.py both draw training samples
from megatron-core's GPTDataset: given the same dataset prefix(es) and blend weights, the whole
dataset in the train split (`--split 100,0,0`), the same `--seq-length`, `--seed` and total
number of training samples, they build the same document shuffle, sample index and sample
shuffle, and read step s's samples [s*G, (s+1)*G) (G = global batch) in the same order. The
total is Megatron-LM's `--train-iters * --global-batch-size` (or `--train-samples`) and dsel's
`steps * batch_size * grad_accum`: set them equal (the shuffle depends on it, the file says so).
The tokenizer arguments point Megatron-LM at the tokenizer that made the tokens; they do not
change which samples are drawn.

One prefix trains on exactly that dataset. Several prefixes are a blend, weighted as dsel train weights
it (`data_weights`, or by token count when none are given; the weights are written out either way, since
Megatron-LM weighs an unweighted list otherwise); megatron-core's builder then builds each dataset for
ceil(ceil(N*w) * (1 + --mid-level-dataset-surplus)) samples, which dsel train's blend does too
(torch_backend.blend_dataset_sizes), so the surplus is written with its value.

A `dsel select` output of W-token windows is the exception: dsel train trains it window by window
(one sample = one selected window, dsel.data.loader.WindowSampleLoader), while megatron-core's
GPTDataset, and so pretrain_gpt.py, cuts the token stream every seq_len tokens (its samples join
neighbouring windows) and megatron-core 0.16 has no whole-document sampling pretrain_gpt.py can ask
for. The file then says in its header that Megatron-LM trains on the selected tokens, not on dsel
train's samples.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from dsel.data.indexed import IndexedDataset
from dsel.data.meta import meta_path, read_meta
from dsel.io import atomic_path
from dsel.train.torch_backend import MID_LEVEL_DATASET_SURPLUS, selection_window

FILE_NAME = "megatron_args.txt"
DEFAULT_SEED = 1234  # dsel train's default `seed`


def tokenizer_args(prefix: str) -> list[str]:
    """--tokenizer-type/--tokenizer-model of the dataset's tokenizer (from <prefix>.meta.json), or none."""
    if not os.path.isfile(meta_path(prefix)):
        return []
    path = Path(read_meta(prefix)["tokenizer"])
    model = path.parent if path.is_file() else path  # Megatron-LM loads HF tokenizers from their folder
    return ["--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", str(model),
            "--make-vocab-size-divisible-by", "128"]  # dsel pads the vocabulary to a multiple of 128


def megatron_args(prefixes: Sequence[str], seq_len: int, seed: int = DEFAULT_SEED,
                  weights: Sequence[float] | None = None, meta_from: str | None = None) -> list[str]:
    """The data arguments, one option (with its values) per item; the tokenizer is read from the meta of
    `meta_from` (default: the first prefix), for outputs still being built beside their final place."""
    if len(prefixes) == 1 and weights is None:
        lines = [f"--data-path {prefixes[0]}"]
    else:
        weights = weights or [IndexedDataset(p).num_tokens for p in prefixes]  # dsel train's default blend
        lines = [" ".join(["--data-path", *(str(x) for pair in zip(weights, prefixes) for x in pair)]),
                 f"--mid-level-dataset-surplus {MID_LEVEL_DATASET_SURPLUS}"]
    lines += ["--split 100,0,0", f"--seq-length {seq_len}", f"--max-position-embeddings {seq_len}", f"--seed {seed}"]
    tokenizer = tokenizer_args(str(meta_from or prefixes[0]))
    if tokenizer:
        lines += [" ".join(tokenizer[i : i + 2]) for i in range(0, len(tokenizer), 2)]
    return lines


def write(out: str | os.PathLike, prefixes: Sequence[str], seq_len: int, seed: int = DEFAULT_SEED,
          weights: Sequence[float] | None = None, meta_from: str | None = None) -> Path:
    """Write out/megatron_args.txt (atomically): comment lines, then one argument per line."""
    path = Path(out) / FILE_NAME
    window = selection_window(str(meta_from or prefixes[0]))
    if window is None:
        header = [
            "# Megatron-LM pretrain_gpt.py data arguments that draw the samples `dsel train backend=megatron` draws",
            f"# on this data (seq_len={seq_len}, seed={seed}). Also set --train-iters x --global-batch-size equal to "
            "dsel", "# train's steps x batch_size x grad_accum: the sample shuffle depends on the total."]
    else:
        header = [
            f"# Megatron-LM pretrain_gpt.py data arguments for this selection of {window}-token windows. They do NOT",
            "# draw dsel train's samples: dsel train trains a selection window by window, Megatron-LM's GPTDataset",
            f"# cuts the token stream every {seq_len} tokens (its samples join neighbouring windows, in its own order).",
            "# To train on exactly the selected windows in dsel's order, use dsel train backend=megatron."]
    header.append("# usage: python pretrain_gpt.py $(grep -v '^#' megatron_args.txt) <model and optimizer arguments>")
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(header + megatron_args(prefixes, seq_len, seed, weights, meta_from)) + "\n")
    return path


def read(path: str | os.PathLike) -> list[str]:
    """The argument list of a megatron_args.txt (comments dropped), as a shell would split it."""
    return " ".join(line for line in Path(path).read_text().splitlines() if not line.startswith("#")).split()
