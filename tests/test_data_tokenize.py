"""`dsel tokenize`: jsonl/parquet/text in, Megatron dataset + doc ids + meta out, checked against
sentencepiece itself and megatron-core's reader."""
import gzip
import hashlib
import json
import random

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import sentencepiece as spm
from megatron.core.datasets.indexed_dataset import IndexedDataset as MegatronIndexedDataset

from dsel.cli import main
from dsel.config import load_config
from dsel.data.docids import read_doc_ids
from dsel.data.indexed import IndexedDataset
from dsel.data.meta import read_meta
from dsel.data.tokenize import TokenizeConfig, load_tokenizer, tokenize_corpus
from dsel.errors import DselError

WORDS = "the quick brown fox jumps over a lazy dog while data selection picks useful tokens".split()


def texts(n, seed=0):
    rng = random.Random(seed)
    return [" ".join(rng.choices(WORDS, k=rng.randint(3, 40))) for _ in range(n)]


def config(**settings):
    return load_config(TokenizeConfig, None, [f"{k}={v}" for k, v in settings.items()])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A corpus tokenized by `dsel tokenize` with a tokenizer trained on the fly."""
    root = tmp_path_factory.mktemp("tok")
    docs = texts(120)
    with open(root / "corpus.jsonl", "w") as f:
        for i, text in enumerate(docs):
            f.write(json.dumps({"uid": f"u{i}", "text": text}) + "\n")
            if i == 5:
                f.write(json.dumps({"uid": "empty", "text": "   "}) + "\n")  # skipped
    main(["tokenize", f"input={root / 'corpus.jsonl'}", f"out={root / 'out/c'}", "vocab_size=320", "id_field=uid"])
    return root, docs


def test_jsonl_round_trip(trained):
    root, docs = trained
    prefix = root / "out/c"
    meta = read_meta(prefix)
    model = root / "out/c.model"
    sp = spm.SentencePieceProcessor(model_file=str(model))
    assert meta["tokenizer_sha256"] == hashlib.sha256(model.read_bytes()).hexdigest()
    assert meta["vocab_size"] == sp.get_piece_size() and meta["eod_id"] == sp.eos_id() and meta["dtype"] == "uint16"
    assert meta["num_documents"] == len(docs)
    assert read_doc_ids(prefix, expected=len(docs)) == [f"u{i}" for i in range(len(docs))]
    theirs = MegatronIndexedDataset(str(prefix))
    assert len(theirs) == len(docs) and meta["num_tokens"] == int(theirs.sequence_lengths.sum())
    for i, text in enumerate(docs):
        tokens = theirs[i]
        assert tokens[-1] == sp.eos_id()
        np.testing.assert_array_equal(tokens[:-1], sp.encode(text))
        assert sp.decode(tokens[:-1].tolist()) == text


def test_parquet_and_text_with_loaded_tokenizer_and_workers(trained, tmp_path):
    root, _ = trained
    model = str(root / "out/c.model")
    docs = texts(40, seed=1)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    pq.write_table(pa.table({"body": docs, "key": list(range(40))}), corpus / "a.parquet")
    with gzip.open(corpus / "b.txt.gz", "wt") as f:
        f.write("\n".join(docs[:10]) + "\n\n")
    outputs = {}
    for workers in (1, 2):
        out = tmp_path / f"w{workers}"
        tokenize_corpus(config(input=str(corpus), out=str(out), tokenizer=model, text_field="body",
                               id_field="key", workers=workers, chunk_docs=7))
        outputs[workers] = (open(f"{out}.idx", "rb").read(), open(f"{out}.bin", "rb").read())
    assert outputs[1] == outputs[2]
    ds = IndexedDataset(tmp_path / "w2", vocab_size=load_tokenizer(model).vocab_size)
    sp = spm.SentencePieceProcessor(model_file=model)
    expected = docs + docs[:10]
    assert len(ds) == len(expected)
    for i, text in enumerate(expected):
        np.testing.assert_array_equal(ds[i], sp.encode(text) + [sp.eos_id()])
    assert read_doc_ids(tmp_path / "w2") == [str(i) for i in range(40)] + [f"b.txt.gz:{k}" for k in range(10)]


def test_tokenizer_wrapper(trained):
    root, docs = trained
    tok = load_tokenizer(root / "out/c.model")
    encoded = tok.encode(docs[:3])
    assert [tok.decode(e) for e in encoded] == docs[:3]
    assert tok.eod_id == 2 and tok.vocab_size == read_meta(root / "out/c")["vocab_size"]


@pytest.mark.parametrize(
    "make_input,settings,message",
    [
        (lambda d: d / "missing.jsonl", {}, "missing.jsonl: input file not found"),
        (lambda d: _write(d / "empty.jsonl", "\n"), {}, "empty corpus"),
        (lambda d: _write(d / "bad.jsonl", '{"text": "ok"}\n{oops\n'), {}, "bad.jsonl: line 2 is not valid JSON"),
        (lambda d: _write(d / "nofield.jsonl", '{"body": "x"}\n'), {}, "nofield.jsonl: line 1 has no string field 'text'"),
        (lambda d: _write(d / "c.jsonl", '{"text": "x"}\n'), {"tokenizer": "nope.model"}, "nope.model: tokenizer model not found"),
        (lambda d: _write(d / "c.jsonl", '{"text": "x"}\n'), {"tokenizer": "__self__"}, "not a sentencepiece model"),
        (lambda d: _write(d / "c.csv", "x\n"), {}, "unknown input format"),
    ],
)
def test_bad_input_is_one_line_error(tmp_path, capsys, make_input, settings, message):
    path = make_input(tmp_path)
    settings = {k: (str(path) if v == "__self__" else v) for k, v in settings.items()}
    with pytest.raises(SystemExit) as info:
        main(["tokenize", f"input={path}", f"out={tmp_path / 'out/x'}"] + [f"{k}={v}" for k, v in settings.items()])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("dsel tokenize: error:") and message in err
    assert not (tmp_path / "out/x.bin").exists() and not (tmp_path / "out/x.idx").exists()


def _write(path, text):
    path.write_text(text)
    return path


def test_parquet_missing_column(tmp_path):
    pq.write_table(pa.table({"body": ["a b"]}), tmp_path / "a.parquet")
    with pytest.raises(DselError, match=r"a\.parquet: no column\(s\) text"):
        tokenize_corpus(config(input=str(tmp_path / "a.parquet"), out=str(tmp_path / "o"), vocab_size=300))
