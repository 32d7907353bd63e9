"""Random batches of 2048-token training samples: dsel's native loader vs megatron-core vs numpy memmap.

All three read the same on-disk Megatron dataset with the hot page cache and return the same
[batch, seq_len+1] windows:
  - dsel: GPTSampleLoader.batch (C++ gather into one numpy buffer, GIL released), and its
    prefetching iterator (a background thread keeps batches ready);
  - megatron-core: GPTDataset.__getitem__ per sample (what its data loader calls);
  - numpy: fancy indexing of a np.memmap of the token stream at the same window starts.
Prints samples/s, GB/s and dsel's speed-up over each baseline, and writes JSON.

  python benchmarks/loader.py --tokens 200_000_000 --out loader.json
Targets: >= 20x megatron-core's __getitem__ path and >= 3x numpy memmap.
"""
import argparse
import os
import sys
import tempfile
import time

sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

import numpy as np  # noqa: E402

from dsel.benchmarking import read_rate  # noqa: E402
from dsel.data.indexed import IndexedDataset, IndexedDatasetWriter  # noqa: E402
from dsel.data.loader import GPTSampleLoader  # noqa: E402
from dsel.data.megatron_reference import megatron_gpt_dataset  # noqa: E402
from dsel.io import write_json  # noqa: E402

VOCAB, EOD = 50304, 0


def write_corpus(prefix, num_tokens, seed=0):
    """Documents of 200-4000 random tokens, each ending in EOD, until `num_tokens` are written."""
    rng = np.random.default_rng(seed)
    written = 0
    with IndexedDatasetWriter(prefix, np.uint16) as w:
        while written < num_tokens:
            doc = rng.integers(1, VOCAB, size=int(rng.integers(200, 4000)), dtype=np.uint16)
            doc[-1] = EOD
            w.add_document(doc)
            written += len(doc)
    return IndexedDataset(prefix)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=50_000_000, help="corpus size in tokens")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--batches", type=int, default=64, help="distinct random batches, cycled")
    parser.add_argument("--seconds", type=float, default=3.0, help="minimum time per measurement")
    parser.add_argument("--out", default="benchmarks/loader.json")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        dataset = write_corpus(os.path.join(tmp, "corpus"), args.tokens)
        ours = GPTSampleLoader(dataset, args.seq_len, args.batch_size, seed=1234)
        theirs = megatron_gpt_dataset(dataset.prefix, args.seq_len, 1234, None, np.arange(len(dataset), dtype=np.int32),
                                      tmp, VOCAB, EOD)
        stream = np.memmap(dataset.prefix + ".bin", dtype=np.uint16, mode="r")
        offsets = np.arange(args.seq_len + 1)
        rng = np.random.default_rng(0)
        batches = [rng.integers(0, ours.num_samples, size=args.batch_size) for _ in range(args.batches)]
        starts = [rng.integers(0, len(stream) - args.seq_len - 1, size=args.batch_size) for _ in range(args.batches)]
        out = np.empty((args.batch_size, args.seq_len + 1), dtype=np.int64)
        np.testing.assert_array_equal(ours.batch(batches[0]),
                                      np.stack([theirs._query_document_sample_shuffle_indices(i)[0] for i in batches[0]]))

        results = {
            "dsel batch": read_rate(lambda ids: ours.batch(ids, out), batches, args.seq_len + 1, args.seconds),
            "dsel prefetch": prefetch_rate(ours, args),
            "megatron-core __getitem__": read_rate(lambda ids: [theirs[int(i)] for i in ids], batches, args.seq_len + 1,
                                                   args.seconds),
            "numpy memmap": read_rate(lambda s: stream[s[:, None] + offsets].astype(np.int64), starts, args.seq_len + 1,
                                      args.seconds),
        }
    report(results, args)


def prefetch_rate(loader, args):
    """Samples/s of iterating the loader (prefetch thread) over consecutive shuffled samples."""
    start, done = time.perf_counter(), 0
    for batch in loader:
        done += len(batch)
        if time.perf_counter() - start >= args.seconds:
            break
    elapsed = time.perf_counter() - start
    return done / elapsed, done * (args.seq_len + 1) * 2 / elapsed / 1e9


def report(results, args):
    ours = results["dsel batch"][0]
    print(f"random batches of {args.batch_size} x {args.seq_len + 1} tokens, corpus {args.tokens:,} tokens, hot cache")
    print(f"{'loader':<28}{'samples/s':>14}{'GB/s':>10}{'dsel batch speed-up':>22}")
    for name, (samples, gbs) in results.items():
        print(f"{name:<28}{samples:>14,.0f}{gbs:>10.2f}{ours / samples:>21.1f}x")
    write_json(args.out, {
        "settings": vars(args), "cpu_count": os.cpu_count(),
        "results": {k: {"samples_per_s": v[0], "gb_per_s": v[1]} for k, v in results.items()},
        "speedup_vs_megatron": ours / results["megatron-core __getitem__"][0],
        "speedup_vs_numpy_memmap": ours / results["numpy memmap"][0],
    })


if __name__ == "__main__":
    main()
