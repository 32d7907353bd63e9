"""Target data for the conditional model: jsonl texts or a tokenized dataset, as padded batches.

Target sets (a book, the few thousand examples of downstream tasks) are small. Three layouts
(`target_format`), all rows of at most `length` tokens:

    pieces  dsel's: each document (ending with EOD) cut into pieces; a batch pads its pieces to its
            longest one and masks the padding out of the loss (no padding trained on, no document
            predicted from another one).
    sft     the official downstream fine-tune (color-filter-olmo olmo/eval/downstream.py, sft
            collate): one row per document, no EOS, the last `length` tokens of a longer one,
            right-padded with the pad id to exactly `length`, every target (pad ones too) in the
            loss; the last partial batch is dropped (data.drop_last).
    chunks  the official Books fine-tune (an OLMo memmap dataset): the documents, each ending with
            EOD, concatenated and cut into rows of exactly `length` tokens (the tail dropped).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from dsel.errors import DselError, file_error
from dsel.io import require_file


def read_jsonl_texts(path: str | Path, text_key: str = "text") -> list[str]:
    """The `text_key` field of every line of a jsonl file, with errors naming file and line."""
    path = require_file(path, "target jsonl file")
    texts = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise file_error(path, f"line {lineno} is not valid JSON ({e.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get(text_key), str):
                raise file_error(path, f"line {lineno} has no string field '{text_key}'")
            texts.append(record[text_key])
    if not texts:
        raise file_error(path, "no documents (the file is empty)")
    return texts


def tokenize_texts(texts: Sequence[str], tokenizer) -> list[np.ndarray]:
    """Token ids of each text followed by the tokenizer's end-of-document id."""
    return [np.asarray(ids + [tokenizer.eod_id], dtype=np.int64) for ids in tokenizer.encode(list(texts))]


def dataset_documents(prefix: str) -> list[np.ndarray]:
    """Every document of a tokenized corpus (dsel.data.corpus) as one int64 token array."""
    from dsel.data.corpus import corpus_documents, open_corpus

    docs = [d.astype(np.int64) for d in corpus_documents(open_corpus(prefix)) if len(d)]
    if not docs:
        raise DselError(f"{prefix}: target dataset has no tokens")
    return docs


def split_documents(documents: Sequence[np.ndarray], length: int) -> list[np.ndarray]:
    """Cut documents into pieces of at most `length` tokens; pieces under 2 tokens predict nothing."""
    pieces = [doc[i:i + length] for doc in documents for i in range(0, len(doc), length)]
    return [p for p in pieces if len(p) >= 2]


def sft_rows(documents: Sequence[np.ndarray], length: int, pad_id: int) -> list[np.ndarray]:
    """Official SFT rows: each document's last `length` tokens, right-padded with `pad_id` to `length`."""
    rows = []
    for doc in documents:
        row = np.full(length, pad_id, dtype=np.int64)
        kept = doc[-length:]
        row[: len(kept)] = kept
        rows.append(row)
    return rows


def stream_chunks(documents: Sequence[np.ndarray], length: int) -> list[np.ndarray]:
    """The documents concatenated and cut into rows of exactly `length` tokens (OLMo memmap chunks)."""
    stream = np.concatenate(documents)
    return [stream[i:i + length] for i in range(0, len(stream) - length + 1, length)]


def length_mask(lengths: torch.Tensor, width: int) -> torch.Tensor:
    """Loss mask [B, width-1]: target position p (predicting token p+1) is real when p+1 < length."""
    return torch.arange(1, width, device=lengths.device)[None, :] < lengths[:, None]


def padded_batch(pieces: Sequence, pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens [B, L] right-padded with `pad_id`, and a loss mask [B, L-1] over real targets."""
    longest = max(len(p) for p in pieces)
    tokens = torch.full((len(pieces), longest), pad_id, dtype=torch.long)
    lengths = torch.tensor([len(p) for p in pieces])
    for row, piece in enumerate(pieces):
        tokens[row, : len(piece)] = torch.as_tensor(piece, dtype=torch.long)
    return tokens, length_mask(lengths, longest)


def epoch_batches(pieces: Sequence[np.ndarray], batch_size: int, pad_id: int,
                  seed: int, drop_last: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One epoch over `pieces` in a seeded random order, as padded, masked batches (`drop_last`: full ones only)."""
    order = np.random.default_rng(seed).permutation(len(pieces))
    stop = len(order) - len(order) % batch_size if drop_last else len(order)
    for start in range(0, stop, batch_size):
        yield padded_batch([pieces[i] for i in order[start:start + batch_size]], pad_id)


def check_token_range(pieces: Sequence[np.ndarray], vocab_size: int, source: str) -> None:
    """Refuse target tokens the model cannot embed (data tokenized with another tokenizer)."""
    top = max(int(p.max()) for p in pieces)
    if top >= vocab_size:
        raise DselError(f"{source}: token id {top} is past the model's vocabulary (size {vocab_size})")
