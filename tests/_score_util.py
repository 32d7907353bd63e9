"""A tiny corpus and a model-free scorer for the score-engine tests (exact integer-valued scores)."""
from __future__ import annotations

import os
import sys

import numpy as np
import torch

from dsel.data.docids import write_doc_ids
from dsel.data.indexed import IndexedDataset, IndexedDatasetWriter
from dsel.data.windows import Windows

EOD = 0


def make_corpus(prefix, num_docs=40, vocab=500, seed=0, doc_ids=True, max_len=30):
    """A Megatron dataset of random documents ending with EOD, plus its doc-id sidecar; returns the docs."""
    rng = np.random.default_rng(seed)
    docs = [np.append(rng.integers(1, vocab, size=rng.integers(1, max_len)), EOD) for _ in range(num_docs)]
    with IndexedDatasetWriter(prefix, np.uint16) as writer:
        for doc in docs:
            writer.add_document(doc)
    if doc_ids:
        write_doc_ids(prefix, [f"doc-{i}" for i in range(num_docs)])
    return docs


def open_corpus(prefix, window):
    return Windows(IndexedDataset(prefix), window)


def reference_scores(tokens: np.ndarray) -> dict[str, np.ndarray]:
    """What FakeScorer gives, computed directly in numpy."""
    tokens = tokens.astype(np.int64)
    return {"total": (tokens.sum(1) % 997).astype(np.float32), "first": (tokens[:, 0] / 2).astype(np.float32)}


class FakeScorer:
    """Scores a window by its token sum mod 997 and half its first token; counts calls, can fail."""

    columns = ["total", "first"]

    def __init__(self, fail_after: int | None = None, vocab_size: int | None = None, exit_after: int | None = None):
        self.calls = 0
        self.fail_after, self.exit_after = fail_after, exit_after
        if vocab_size is not None:
            self.vocab_size = vocab_size

    def __call__(self, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        assert tokens.dtype == torch.long and tokens.device.type == "cpu"
        self.calls += 1
        if self.fail_after is not None and self.calls > self.fail_after:
            raise RuntimeError(f"scorer killed after {self.fail_after} batches")
        if self.exit_after is not None and self.calls > self.exit_after:
            os._exit(3)  # like a kill: no cleanup, no exception handling
        return {"total": (tokens.sum(1) % 997).float(), "first": tokens[:, 0].float() / 2}


BUILT: list[FakeScorer] = []


def build_fake_scorer(settings: dict, device) -> FakeScorer:
    """Registry-style builder (`scorer=tests._score_util:build_fake_scorer`); DSEL_TEST_EXIT_AFTER=k
    makes the process die after k batches without changing the scoring config."""
    exit_after = os.environ.get("DSEL_TEST_EXIT_AFTER")
    BUILT.append(FakeScorer(**settings, exit_after=int(exit_after) if exit_after else None))
    return BUILT[-1]


if __name__ == "__main__":  # torchrun -m tests._score_util PREFIX WINDOW OUT: the library API under torchrun
    from dsel.score.engine import score_windows

    prefix, window, out = sys.argv[1:]
    score_windows(open_corpus(prefix, int(window)), FakeScorer(), out, batch_size=3, shard_size=7)
