"""Batches for scoring (`WindowStream`, windows in order) and training (`GPTSampleLoader`).

Both gather with the native loader into fresh numpy buffers, with the GIL released, on a
background thread that keeps `prefetch` batches ready; `torch.from_numpy(batch)` is zero-copy.

`GPTSampleLoader` reproduces megatron-core's `GPTDataset` sample for sample: the same document
shuffle (per epoch, numpy RandomState), the same sample index (helpers.cpp build_sample_idx,
seq_len+1 token windows sharing one token with the next) and the same sample shuffle, including
several epochs and the separately shuffled final epoch. Supported: the training-split
configuration (drop_last_partial_sequence=True, add_extra_token_to_sequence=True, no mock data);
masks and position ids are the caller's business (reset_position_ids / reset_attention_mask /
eod_mask_loss do not change which tokens a sample holds).
"""
from __future__ import annotations

import queue
import threading
from typing import Callable, Iterator, Sequence

import numpy as np

from dsel.errors import DselError
from dsel.data.indexed import IndexedDataset
from dsel.data.native import _C, native_errors
from dsel.data.windows import Windows


def prefetched(jobs: Sequence, make: Callable, depth: int) -> Iterator:
    """Yield make(job) for every job, computed `depth` ahead on a background thread."""
    if depth <= 0:
        for job in jobs:
            yield make(job)
        return
    ready: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def offer(item) -> bool:
        """Queue `item` unless the consumer has stopped (never blocks a stopped consumer's join)."""
        while not stop.is_set():
            try:
                ready.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce():
        try:
            for job in jobs:
                if not offer((make(job), None)):
                    return
        except BaseException as e:  # handed to the consumer, re-raised there
            offer((None, e))
            return
        offer((None, StopIteration()))

    worker = threading.Thread(target=produce, name="dsel-prefetch", daemon=True)
    worker.start()
    try:
        while True:
            item, error = ready.get()
            if isinstance(error, StopIteration):
                return
            if error is not None:
                raise error
            yield item
    finally:
        stop.set()
        worker.join()


class WindowStream:
    """Windows [start, stop) in order, as `(ids int64[B], tokens [B, W])` batches (last may be short)."""

    def __init__(self, windows: Windows, batch_size: int, start: int = 0, stop: int | None = None, prefetch: int = 2,
                 dtype=np.int64):
        stop = len(windows) if stop is None else stop
        if batch_size <= 0 or not 0 <= start <= stop <= len(windows):
            raise DselError(f"WindowStream: bad range [{start}, {stop}) or batch size {batch_size} for {len(windows)} windows")
        self.windows, self.batch_size, self.start, self.stop = windows, batch_size, start, stop
        self.prefetch, self.dtype = prefetch, dtype

    def __len__(self) -> int:
        return -(-(self.stop - self.start) // self.batch_size)

    def __iter__(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        starts = range(self.start, self.stop, self.batch_size)
        return prefetched(starts, self._batch_at, self.prefetch)

    def _batch_at(self, first: int) -> tuple[np.ndarray, np.ndarray]:
        ids = np.arange(first, min(first + self.batch_size, self.stop), dtype=np.int64)
        return ids, self.windows.batch(ids, dtype=self.dtype)


def _num_epochs(tokens_per_epoch: int, seq_len: int, num_samples: int | None) -> int:
    """GPTDataset._get_num_epochs: epochs needed for num_samples windows of seq_len+1 tokens."""
    if num_samples is None:
        return 1
    needed = num_samples * seq_len + 1
    return max(1, -(-needed // tokens_per_epoch))


def _document_index(documents: np.ndarray, num_epochs: int, rng: np.random.RandomState, separate_final: bool) -> np.ndarray:
    """gpt_dataset._build_document_index: documents repeated per epoch, shuffled (int32)."""
    if not separate_final or num_epochs == 1:
        index = np.mgrid[0:num_epochs, 0 : len(documents)][1]
        index[:] = documents
        index = index.reshape(-1).astype(np.int32)
        rng.shuffle(index)
        return index
    first = _document_index(documents, num_epochs - 1, rng, False)
    last = _document_index(documents, 1, rng, False)
    return np.concatenate((first, last))


def _shuffle_index(num_samples: int, total: int, rng: np.random.RandomState) -> np.ndarray:
    """gpt_dataset._build_shuffle_index: [0, num_samples) shuffled, then [num_samples, total)."""
    dtype = np.uint32 if total < np.iinfo(np.uint32).max - 1 else np.int64
    first = np.arange(num_samples, dtype=dtype)
    rng.shuffle(first)
    if num_samples == total:
        return first
    last = np.arange(num_samples, total, dtype=dtype)
    rng.shuffle(last)
    return np.concatenate((first, last))


def build_gpt_indices(dataset: IndexedDataset, seq_len: int, seed: int, num_samples: int | None,
                      indices: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """megatron-core GPTDataset's (document_index, sample_index, shuffle_index), all int64.

    `indices` are the sequence ids the dataset exposes (megatron's split; default: all).
    """
    indices = np.arange(len(dataset), dtype=np.int32) if indices is None else np.asarray(indices)
    tokens_per_epoch = int(np.sum(dataset.sizes[indices]))
    if tokens_per_epoch <= 1:
        raise DselError(f"{dataset.prefix}: too few tokens ({tokens_per_epoch}) to build GPT samples")
    num_epochs = _num_epochs(tokens_per_epoch, seq_len, num_samples)
    separate_final = False
    if num_epochs > 1:
        sans_final = ((num_epochs - 1) * tokens_per_epoch - 1) // seq_len
        per_epoch = (tokens_per_epoch - 1) // seq_len
        separate_final = num_samples - sans_final < int(0.80 * per_epoch)
    rng = np.random.RandomState(seed)
    document_index = _document_index(indices, num_epochs, rng, separate_final)
    doc64 = document_index.astype(np.int64)
    with native_errors():
        sample_index = _C.build_sample_idx(dataset._native, doc64, seq_len, num_epochs, tokens_per_epoch)
    total = sample_index.shape[0] - 1
    shuffle_index = _shuffle_index(sans_final if separate_final else total, total, rng)
    return doc64, sample_index, shuffle_index.astype(np.int64)


class GPTSampleLoader:
    """Batches `[B, seq_len+1]` of megatron-core GPTDataset samples 0..num_samples-1, in order.

    `batch(ids)` gives random access; iteration starts at sample `start` (for resuming).
    """

    def __init__(self, dataset: IndexedDataset, seq_len: int, batch_size: int, seed: int, num_samples: int | None = None,
                 indices: np.ndarray | None = None, start: int = 0, prefetch: int = 2, dtype=np.int64):
        if seq_len <= 1 or batch_size <= 0:
            raise DselError(f"{dataset.prefix}: bad seq_len {seq_len} or batch size {batch_size}")
        self.dataset, self.seq_len, self.batch_size = dataset, seq_len, batch_size
        self.prefetch, self.dtype, self.start = prefetch, np.dtype(dtype), start
        self.document_index, self.sample_index, self.shuffle_index = build_gpt_indices(
            dataset, seq_len, seed, num_samples, indices)
        self.num_samples = len(self.shuffle_index) if num_samples is None else num_samples
        if not np.can_cast(dataset.dtype, self.dtype, "safe"):
            raise DselError(f"{dataset.prefix}: cannot gather {dataset.dtype} tokens into {self.dtype}")

    def __len__(self) -> int:
        return -(-(self.num_samples - self.start) // self.batch_size)

    def batch(self, ids: Sequence[int], out: np.ndarray | None = None) -> np.ndarray:
        """Samples `ids` (GPTDataset indices) into `out` ([B, seq_len+1]), GIL released."""
        ids = np.ascontiguousarray(ids, dtype=np.int64).reshape(-1)
        if out is None:
            out = np.empty((len(ids), self.seq_len + 1), dtype=self.dtype)
        with native_errors():
            _C.gather_samples(self.dataset._native, self.document_index, self.sample_index, self.shuffle_index, ids,
                              self.seq_len, out)
        return out

    def __iter__(self) -> Iterator[np.ndarray]:
        starts = range(self.start, self.num_samples, self.batch_size)
        make = lambda first: self.batch(np.arange(first, min(first + self.batch_size, self.num_samples)))
        return prefetched(starts, make, self.prefetch)


class WindowSampleLoader:
    """Training samples that are whole windows (of W = seq_len + 1 tokens): sample i is one window.

    A selection (`dsel select`) holds such windows, one per document; token files (OLMo/dolma) are
    cut into them file by file, as OLMo's MemMapDataset does. Megatron's sample index would cut the
    stream every seq_len tokens with one token shared between neighbours, so nearly every sample of
    a selection would join two unrelated windows; here each sample is exactly one window instead.
    Epoch e visits every window once in the order of a numpy RandomState(seed) permutation (drawn
    epoch after epoch), so the data position is a function of the sample id alone.
    `batch(ids)` has GPTSampleLoader's contract ([B, seq_len+1] int64).
    """

    def __init__(self, windows: Windows, seed: int, num_samples: int):
        self.windows, self.seq_len, self.num_samples = windows, windows.window - 1, num_samples
        count = len(windows)
        rng = np.random.RandomState(seed)
        epochs = -(-num_samples // count)
        self.epochs = epochs
        dtype = np.int32 if count < 2**31 else np.int64  # 4 bytes a sample at 1e8+ samples
        self.order = np.concatenate([rng.permutation(count).astype(dtype) for _ in range(epochs)])[:num_samples]

    def window_of(self, ids: Sequence[int]) -> np.ndarray:
        """The selected window (document id of the dataset) each sample id trains on."""
        return self.order[np.asarray(ids, dtype=np.int64)]

    def batch(self, ids: Sequence[int], out: np.ndarray | None = None) -> np.ndarray:
        """Samples `ids` ([B, seq_len+1] int64): the windows they stand for."""
        return self.windows.batch(self.window_of(ids), out)
