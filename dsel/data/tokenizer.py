"""The one tokenizer interface: a Hugging Face tokenizer or a sentencepiece model, loaded from local files.

    tok = load_tokenizer("data/pool.model")              # sentencepiece model (what `dsel tokenize` trains)
    tok = load_tokenizer("gpt-neox/tokenizer.json")     # a Hugging Face tokenizer file
    tok = load_tokenizer("llama3/")                     # a save_pretrained folder (tokenizer.json + config)
    tok.encode(["some text"]) -> [[ids]]; tok.decode(ids); tok.vocab_size; tok.eod_id; tok.identity()

Hugging Face tokenizers are read with the `tokenizers` library (the Rust engine under transformers'
fast tokenizers): it reads every `tokenizer.json` labs release (GPT-NeoX, Llama-3, Mistral, OLMo),
encodes batches in parallel natively and imports in milliseconds, where transformers' AutoTokenizer
adds a heavy import and Python-side wrapping for the same ids. Documents are encoded without the
tokenizer's own special tokens (no BOS) and end with EOD, as sentencepiece documents do.

A tokenizer's identity is its kind, the sha256 of the file that maps text to ids (`tokenizer.json`
or the `.model`), its vocabulary size and its EOD id; datasets and checkpoints record it and every
stage where tokens meet a model compares it (dsel.data.meta.check_same_tokenizer).
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
from pathlib import Path
from typing import Iterable

from dsel.errors import DselError, file_error
from dsel.io import atomic_path, read_json, require_file

HF_FILE = "tokenizer.json"
SPM_FILE = "tokenizer.model"
# Tokens that end a document in common released tokenizers, used when no config names the EOS token.
KNOWN_EOS = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "<|eos|>")
SPM_MAX_SENTENCE_BYTES = 4192  # sentencepiece's max_sentence_length: longer sentences are dropped by its trainer


class Tokenizer:
    """What every stage uses: `encode(texts)`, `decode(ids)`, `vocab_size`, `eod_id`, `sha256`, `identity()`."""

    kind: str
    path: str  # what to pass to load_tokenizer again (a file or a folder)
    vocab_size: int
    eod_id: int

    def encode(self, texts: list[str]) -> list[list[int]]:
        raise NotImplementedError

    def decode(self, ids) -> str:
        raise NotImplementedError

    @property
    def ids_file(self) -> str:
        """The file that maps text to ids (its digest is the tokenizer's identity)."""
        raise NotImplementedError

    @property
    def sha256(self) -> str:
        return file_sha256(self.ids_file)

    def identity(self) -> dict:
        """The meta keys that identify the tokenizer (recorded in dataset and checkpoint meta)."""
        return {"tokenizer": str(Path(self.path).resolve()), "tokenizer_kind": self.kind,
                "tokenizer_sha256": self.sha256, "vocab_size": self.vocab_size, "eod_id": self.eod_id}


class SentencePieceTokenizer(Tokenizer):
    """A sentencepiece `.model` file; EOD is its EOS piece."""

    kind = "sentencepiece"

    def __init__(self, path: str | os.PathLike):
        import sentencepiece as spm

        self.path = str(require_file(path, "tokenizer model"))
        try:
            self._sp = spm.SentencePieceProcessor(model_file=self.path)
        except (RuntimeError, OSError) as e:
            raise file_error(self.path, f"not a sentencepiece model ({str(e).splitlines()[0]})") from None
        self.vocab_size: int = self._sp.get_piece_size()
        self.eod_id: int = self._sp.eos_id()
        if self.eod_id < 0:
            raise file_error(self.path, "the sentencepiece model has no EOS piece to use as end-of-document")

    @property
    def ids_file(self) -> str:
        return self.path

    def encode(self, texts: list[str]) -> list[list[int]]:
        return self._sp.encode(list(texts))

    def decode(self, ids) -> str:
        return self._sp.decode([int(i) for i in ids])


class HFTokenizer(Tokenizer):
    """A Hugging Face `tokenizer.json` (alone, or in a save_pretrained folder whose config names the EOS token)."""

    kind = "hf"

    def __init__(self, path: str | os.PathLike):
        from tokenizers import Tokenizer as RustTokenizer

        path = Path(path)
        self.path = str(path)
        self.folder = path if path.is_dir() else None
        self.file = require_file(path / HF_FILE if self.folder else path, "tokenizer file")
        try:
            self._tok = RustTokenizer.from_file(str(self.file))
        except Exception as e:  # the Rust side raises a bare Exception for a malformed file
            raise file_error(self.file, f"not a Hugging Face tokenizer file ({str(e).splitlines()[0]})") from None
        self.vocab_size: int = self._tok.get_vocab_size(with_added_tokens=True)
        self.eod_id: int = self._eos_id()

    @property
    def ids_file(self) -> str:
        return str(self.file)

    def _eos_id(self) -> int:
        """The EOS token's id: named by tokenizer_config.json / special_tokens_map.json, else a known EOS token."""
        for name in ("tokenizer_config.json", "special_tokens_map.json"):
            config = self.file.parent / name
            token = read_json(config).get("eos_token") if config.is_file() else None
            token = token.get("content") if isinstance(token, dict) else token
            if token:
                found = self._tok.token_to_id(token)
                if found is None:
                    raise file_error(config, f"eos_token {token!r} is not in the vocabulary of {self.file}")
                return found
        for token in KNOWN_EOS:
            found = self._tok.token_to_id(token)
            if found is not None:
                return found
        raise file_error(self.file, f"no end-of-document token: none of {', '.join(KNOWN_EOS)} is in the vocabulary "
                                    "and no tokenizer_config.json beside it names an eos_token")

    def encode(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def token(self, token_id: int) -> str:
        return self._tok.id_to_token(token_id)


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """A sentencepiece `.model`, a `tokenizer.json`, or a folder holding one (DselError naming what is missing)."""
    path = Path(path)
    if path.is_dir():
        if (path / HF_FILE).is_file():
            return HFTokenizer(path)
        if (path / SPM_FILE).is_file():
            return SentencePieceTokenizer(path / SPM_FILE)
        raise file_error(path, f"tokenizer folder has no {HF_FILE} (a Hugging Face fast tokenizer saved with "
                               f"save_pretrained) and no {SPM_FILE} (sentencepiece)")
    if not path.is_file():
        raise file_error(path, "tokenizer model not found (a sentencepiece .model, a tokenizer.json or a folder with one)")
    if path.suffix == ".json":
        return HFTokenizer(path)
    return SentencePieceTokenizer(path)


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ---- training a sentencepiece tokenizer ----

def sentence_pieces(text: str, max_bytes: int = SPM_MAX_SENTENCE_BYTES) -> Iterable[str]:
    """The non-empty lines of `text`, lines longer than `max_bytes` cut at whitespace into shorter pieces.

    sentencepiece's trainer silently drops sentences over its max_sentence_length, so a corpus of
    long single-line documents (one 5 MB document) would leave it nothing to train on.
    """
    for line in text.split("\n"):
        if not line.strip():
            continue
        if len(line.encode("utf-8")) <= max_bytes:
            yield line
            continue
        piece, size = [], 0
        for word in re.finditer(r"\S+\s*", line):
            chunk = word.group()
            length = len(chunk.encode("utf-8"))
            if piece and size + length > max_bytes:
                yield "".join(piece)
                piece, size = [], 0
            while length > max_bytes:  # one "word" longer than a sentence: hard cut
                head = chunk.encode("utf-8")[:max_bytes].decode("utf-8", errors="ignore")
                yield head
                chunk = chunk[len(head):]
                length = len(chunk.encode("utf-8"))
            piece.append(chunk)
            size += length
        if piece and "".join(piece).strip():
            yield "".join(piece)


def train_tokenizer(texts: Iterable[str], model_path: str | os.PathLike, vocab_size: int, model_type: str = "bpe",
                    threads: int = 1, source: str = "corpus") -> Tokenizer:
    """Train a sentencepiece model on `texts` (lines as sentences) and save it atomically as `model_path`."""
    import sentencepiece as spm

    count = [0]

    def sentences():
        for text in texts:
            for piece in sentence_pieces(text):
                count[0] += 1
                yield piece

    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=sentences(), model_writer=model, vocab_size=vocab_size, model_type=model_type,
            hard_vocab_limit=False, character_coverage=1.0, byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
            max_sentence_length=SPM_MAX_SENTENCE_BYTES, num_threads=max(1, threads), minloglevel=2,
        )
    except RuntimeError as e:
        if not count[0]:
            raise DselError(f"{source}: no text to train the tokenizer on") from None
        raise DselError(f"{source}: tokenizer training failed ({str(e).splitlines()[0]})") from None
    with atomic_path(model_path) as tmp:
        tmp.write_bytes(model.getvalue())
    return SentencePieceTokenizer(model_path)


# ---- writing a tokenizer that transformers loads ----

def save_for_transformers(tokenizer: Tokenizer, folder: str | os.PathLike, model_max_length: int) -> None:
    """Write `tokenizer` into `folder` so `AutoTokenizer.from_pretrained(folder)` encodes text to the same ids."""
    folder = Path(folder)
    if isinstance(tokenizer, HFTokenizer):
        shutil.copyfile(tokenizer.file, folder / HF_FILE)
        eos = tokenizer.token(tokenizer.eod_id)
    else:
        eos = sentencepiece_to_tokenizers(tokenizer, folder / HF_FILE)
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": eos, "bos_token": None,
              "model_max_length": model_max_length, "clean_up_tokenization_spaces": False}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


def sentencepiece_to_tokenizers(tokenizer: SentencePieceTokenizer, out: Path) -> str:
    """Convert a sentencepiece model to a `tokenizer.json` (transformers' converter); returns the EOS token."""
    try:
        converted = _spm_converter()(_SpmVocab(tokenizer)).converted()
    except ImportError as e:
        raise DselError(f"{tokenizer.path}: converting a sentencepiece model for transformers needs protobuf "
                        f"({str(e).strip().splitlines()[0]})") from None
    converted.post_processor = None  # documents carry no BOS, as in dsel's data
    converted.save(str(out))
    return tokenizer._sp.id_to_piece(tokenizer.eod_id)


def _spm_converter():
    """transformers' SpmConverter with byte fallback on, and an extractor returning (vocab, merges) as the
    converter's BPE branch expects (transformers 5's extractor returns a dict there)."""
    from transformers.convert_slow_tokenizer import SentencePieceExtractor, SpmConverter

    class Extractor(SentencePieceExtractor):
        def extract(self, vocab_scores=None, **kwargs):
            found = super().extract(None, **kwargs)
            return (found["vocab"], found["merges"]) if isinstance(found, dict) else found

    class Converter(SpmConverter):
        SpmExtractor = Extractor
        handle_byte_fallback = True

    return Converter


class _SpmVocab:
    """The slice of a slow tokenizer that transformers' SpmConverter reads."""

    def __init__(self, tokenizer: SentencePieceTokenizer):
        self.vocab_file = tokenizer.path
        self.add_prefix_space = True
        self.legacy = True
