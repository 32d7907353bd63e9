"""Tokenizing a jsonl corpus into a Megatron dataset: `dsel tokenize` vs megatron-core's preprocess_data.py logic.

Both encode the same synthetic jsonl files with the same sentencepiece model (EOD after every
document) and write .bin/.idx; the outputs are checked to be byte-identical before timing counts.
  - dsel: `tokenize_corpus` (sharded over worker processes, resumable markers, then one merge);
  - megatron-core: tools/preprocess_data.py's loop (that script is not shipped in the wheel, so its
    logic is restated: a multiprocessing Pool imap over the lines with chunksize 32, json.loads +
    encode + EOD per document, written with megatron-core's own IndexedDatasetBuilder).
Prints documents/s and tokens/s at 1 and 2 workers and dsel's ratio to the baseline, and writes JSON.

  python benchmarks/tokenize.py --docs 40000 --files 8 --out tokenize.json
"""
import argparse
import json
import multiprocessing
import os
import random
import sys
import tempfile
import time

sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

import numpy as np  # noqa: E402
import torch  # noqa: E402
from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder  # noqa: E402  (imported before any timing)

from dsel.config import load_config  # noqa: E402
from dsel.data.tokenize import TokenizeConfig, tokenize_corpus  # noqa: E402
from dsel.io import write_json  # noqa: E402

WORDS = ("data selection keeps the useful tokens of a corpus while language models learn grammar facts "
         "and reasoning from science legal recipes travel sports software documents").split()


def write_corpus(root, docs, files, seed=0):
    """`files` jsonl files holding `docs` documents of 20-400 random words."""
    rng = random.Random(seed)
    os.makedirs(root, exist_ok=True)
    handles = [open(os.path.join(root, f"part-{k:03d}.jsonl"), "w") for k in range(files)]
    for i in range(docs):
        text = " ".join(rng.choices(WORDS, k=rng.randint(20, 400)))
        handles[i * files // docs].write(json.dumps({"id": i, "text": text}) + "\n")
    for h in handles:
        h.close()
    return sorted(os.path.join(root, n) for n in os.listdir(root))


class Encoder:
    """preprocess_data.py's Encoder: one json line -> token ids + EOD (tokenizer loaded per worker)."""

    def __init__(self, model):
        self.model = model

    def initializer(self):
        import sentencepiece as spm

        Encoder.sp = spm.SentencePieceProcessor(model_file=self.model)

    def encode(self, line):
        text = json.loads(line)["text"]
        ids = Encoder.sp.encode(text) + [Encoder.sp.eos_id()] if text.strip() else []
        return ids, len(line)


def megatron_preprocess(files, model, prefix, workers):
    """preprocess_data.py's main loop over `files`, one output dataset; returns (docs, tokens)."""
    encoder = Encoder(model)
    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=np.uint16)
    docs = tokens = 0
    with multiprocessing.get_context("fork").Pool(workers, initializer=encoder.initializer) as pool:
        for path in files:
            with open(path, encoding="utf-8") as fin:
                for ids, _ in pool.imap(encoder.encode, fin, 32):
                    if ids:
                        builder.add_document(torch.IntTensor(ids), [len(ids)])
                        docs += 1
                        tokens += len(ids)
    builder.finalize(f"{prefix}.idx")
    return docs, tokens


def dsel_tokenize(root, model, prefix, workers, shard_bytes):
    meta = tokenize_corpus(load_config(TokenizeConfig, None, [
        f"input={root}", f"out={prefix}", f"tokenizer={model}", f"workers={workers}", f"shard_bytes={shard_bytes}"]))
    return meta["num_documents"], meta["num_tokens"]


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def same_files(a, b):
    return all(open(f"{a}{ext}", "rb").read() == open(f"{b}{ext}", "rb").read() for ext in (".bin", ".idx"))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=40000)
    parser.add_argument("--files", type=int, default=8, help="jsonl files the documents are spread over")
    parser.add_argument("--vocab", type=int, default=4000)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--out", default="benchmarks/tokenize.json")
    args = parser.parse_args(argv)
    os.environ.setdefault("DSEL_PROGRESS", "0")
    with tempfile.TemporaryDirectory() as tmp:
        root = os.path.join(tmp, "corpus")
        files = write_corpus(root, args.docs, args.files)
        size = sum(os.path.getsize(f) for f in files)
        tokenize_corpus(load_config(TokenizeConfig, None, [f"input={files[0]}", f"out={tmp}/train",
                                                           f"vocab_size={args.vocab}", "train_docs=2000"]))
        model = f"{tmp}/train.model"
        shard_bytes = max(1, size // (4 * max(args.workers)))  # a few shards per worker
        rows = []
        for workers in args.workers:
            row = {"workers": workers}
            for name, run in (("megatron", lambda: megatron_preprocess(files, model, f"{tmp}/m{workers}", workers)),
                              ("dsel", lambda: dsel_tokenize(root, model, f"{tmp}/d{workers}", workers, shard_bytes))):
                seconds, (docs, tokens) = timed(run)
                row[name] = {"seconds": seconds, "docs_per_s": docs / seconds, "tokens_per_s": tokens / seconds,
                             "docs": docs, "tokens": tokens}
            if not same_files(f"{tmp}/m{workers}", f"{tmp}/d{workers}"):
                raise SystemExit("dsel and megatron-core outputs differ")
            row["dsel_over_megatron"] = row["dsel"]["tokens_per_s"] / row["megatron"]["tokens_per_s"]
            rows.append(row)
    print(f"tokenize {args.docs:,} documents in {args.files} jsonl files ({size / 2**20:.1f} MiB), "
          f"outputs byte-identical")
    print(f"{'workers':>8}{'tool':>10}{'docs/s':>12}{'tokens/s':>14}{'dsel/megatron':>15}")
    for row in rows:
        for name in ("megatron", "dsel"):
            r = row[name]
            ratio = f"{row['dsel_over_megatron']:.2f}x" if name == "dsel" else ""
            print(f"{row['workers']:>8}{name:>10}{r['docs_per_s']:>12,.0f}{r['tokens_per_s']:>14,.0f}{ratio:>15}")
    write_json(args.out, {"docs": args.docs, "files": args.files, "bytes": size, "cpu_count": os.cpu_count(),
                          "rows": rows})
    return rows


# Loaded from its file (tests/test_benchmarks.py) the module is not in sys.modules, so the worker pool
# could not pickle Encoder by name; register it under its name.
sys.modules.setdefault(__name__, type(sys)(__name__)).__dict__.update(globals())

if __name__ == "__main__":
    main()
