"""Random batches of training windows from a directory of dolma token files: dsel vs OLMo's reader.

All rows read the same windows (each file cut into its own windows of seq_len+1 tokens, its tail
dropped) with the hot page cache:
  - dsel directory: Windows.batch over the directory as one corpus (dsel.data.dolma, one native
    gather per run of windows in one file, GIL released);
  - dsel one file: Windows.batch over the same tokens written as one file (the cost of many files);
  - OLMo MemMapDataset: its __getitem__ logic per window (find the file in the offsets, read the
    window's bytes, np.frombuffer, to int64), batched by a list comprehension as its DataLoader does.
Prints windows/s, GB/s and dsel's speed-up over OLMo's reader, and writes JSON.

  python benchmarks/dolma.py --tokens 200_000_000 --files 64 --out dolma.json
"""
import argparse
import os
import sys
import tempfile

sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

import numpy as np  # noqa: E402

from dsel.benchmarking import read_rate  # noqa: E402
from dsel.data.corpus import open_corpus  # noqa: E402
from dsel.data.windows import Windows  # noqa: E402
from dsel.io import write_json  # noqa: E402

VOCAB = 50304


class OlmoMemMapReader:
    """OLMo's MemMapDataset read path: per-file instance offsets, one byte-range read per instance."""

    def __init__(self, paths, window, dtype=np.uint16):
        self.paths, self.window, self.dtype = paths, window, np.dtype(dtype)
        counts = [os.path.getsize(p) // (self.dtype.itemsize * window) for p in paths]
        self.offsets = np.concatenate([[0], np.cumsum(counts)])

    def __getitem__(self, index):
        for i, (start, end) in enumerate(zip(self.offsets[:-1], self.offsets[1:])):
            if start <= index < end:
                nbytes = self.dtype.itemsize * self.window
                with open(self.paths[i], "rb") as f:
                    f.seek(int(index - start) * nbytes)
                    return np.frombuffer(f.read(nbytes), dtype=self.dtype).astype(np.int64)
        raise IndexError(index)


def write_files(folder, num_tokens, num_files, seed=0):
    """`num_files` headerless uint16 token files of uneven sizes summing to about `num_tokens`."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, 3, size=num_files) * (num_tokens // (1.5 * num_files))
    paths = []
    for k, size in enumerate(sizes.astype(np.int64)):
        path = os.path.join(folder, f"part-{k:05d}.npy")
        rng.integers(1, VOCAB, size=int(size), dtype=np.uint16).tofile(path)
        paths.append(path)
    return paths


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=50_000_000, help="corpus size in tokens")
    parser.add_argument("--files", type=int, default=64, help="token files in the directory")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--batches", type=int, default=64, help="distinct random batches, cycled")
    parser.add_argument("--seconds", type=float, default=3.0, help="minimum time per measurement")
    parser.add_argument("--out", default="benchmarks/dolma.json")
    args = parser.parse_args(argv)
    window = args.seq_len + 1

    with tempfile.TemporaryDirectory() as tmp:
        folder = os.path.join(tmp, "dolma")
        os.mkdir(folder)
        paths = write_files(folder, args.tokens, args.files)
        ours = Windows(open_corpus(folder), window)
        single_path = os.path.join(tmp, "single.npy")
        with open(single_path, "wb") as f:  # the same windows back to back in one file
            for stream in ours.streams:
                f.write(stream[: len(stream) // window * window].tobytes())
        single = Windows(open_corpus(single_path), window)
        olmo = OlmoMemMapReader(paths, window)
        rng = np.random.default_rng(0)
        batches = [rng.integers(0, len(ours), size=args.batch_size) for _ in range(args.batches)]
        out = np.empty((args.batch_size, window), dtype=np.int64)
        expected = np.stack([olmo[int(i)] for i in batches[0]])
        np.testing.assert_array_equal(ours.batch(batches[0]), expected)
        np.testing.assert_array_equal(single.batch(batches[0]), expected)
        results = {
            "dsel directory": read_rate(lambda ids: ours.batch(ids, out), batches, window, args.seconds),
            "dsel one file": read_rate(lambda ids: single.batch(ids, out), batches, window, args.seconds),
            "OLMo MemMapDataset": read_rate(lambda ids: np.stack([olmo[int(i)] for i in ids]), batches, window,
                                       args.seconds),
        }
    report(results, args, len(ours))


def report(results, args, num_windows):
    ours = results["dsel directory"][0]
    print(f"random batches of {args.batch_size} x {args.seq_len + 1} tokens from {args.files} dolma files "
          f"({num_windows:,} windows), hot cache")
    print(f"{'reader':<24}{'windows/s':>14}{'GB/s':>10}{'dsel directory speed-up':>26}")
    for name, (windows, gbs) in results.items():
        print(f"{name:<24}{windows:>14,.0f}{gbs:>10.2f}{ours / windows:>25.1f}x")
    write_json(args.out, {
        "settings": vars(args), "cpu_count": os.cpu_count(), "num_windows": num_windows,
        "results": {k: {"windows_per_s": v[0], "gb_per_s": v[1]} for k, v in results.items()},
        "speedup_vs_olmo": ours / results["OLMo MemMapDataset"][0],
        "directory_over_one_file": ours / results["dsel one file"][0],
    })


if __name__ == "__main__":
    main()
