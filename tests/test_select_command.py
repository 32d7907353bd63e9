"""`dsel select` end to end: a tiny corpus + score table -> indices, selection.json, histogram, Megatron data."""
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dsel.cli import main
from dsel.data.indexed import IndexedDataset, IndexedDatasetWriter
from dsel.data.memmap import write_memmap_tokens
from dsel.data.windows import Windows
from dsel.errors import DselError
from dsel.select.commands import SelectConfig, run_select
from dsel.config import from_dict

WINDOW = 8


@pytest.fixture
def corpus(tmp_path):
    """A Megatron corpus of random documents and a score table for its windows (like `dsel score` writes)."""
    rng = np.random.default_rng(0)
    prefix = tmp_path / "corpus"
    with IndexedDatasetWriter(prefix, np.uint16) as w:
        for _ in range(120):
            w.add_document(np.append(rng.integers(1, 5000, rng.integers(1, 30)), 0))
    windows = Windows(IndexedDataset(prefix), WINDOW)
    n = len(windows)
    order = rng.permutation(n)
    table = pa.table({
        "window": order.astype(np.int64),
        "doc": windows.doc_of_window[order],
        "doc_id": [f"d{d}" for d in windows.doc_of_window[order]],
        "tokens": np.full(n, WINDOW, dtype=np.int64),
        "domain": np.array(["web", "code"])[order % 2],
        "loss_prior": rng.normal(3, 1, n).astype(np.float32),
        "loss_cond": rng.normal(3, 1, n).astype(np.float32),
        "color": rng.normal(0, 1, n).astype(np.float32),
    })
    scores = tmp_path / "scores"
    scores.mkdir()
    pq.write_table(table, scores / "scores.parquet", row_group_size=50)
    (scores / "scores.json").write_text(json.dumps({"meta": {"window": WINDOW}, "rows": n}))
    return prefix, scores, windows, table


def run(**settings):
    return run_select(from_dict(SelectConfig, settings))


def test_select_writes_indices_json_histogram_and_data(corpus, tmp_path):
    prefix, scores, windows, table = corpus
    out = tmp_path / "out"
    main(["select", f"scores={scores}", f"corpus={prefix}", f"out={out}", "method=color", "column=color", "tau=4",
          "chunk_rows=40"])
    n = len(windows)
    color = table.column("color").to_numpy().astype(np.float64)
    window = table.column("window").to_numpy()
    expected = np.sort(window[np.lexsort((window, -color))[: round(n / 4)]])
    indices = np.load(out / "indices.npy")
    np.testing.assert_array_equal(indices, expected)
    assert indices.dtype == np.int64
    info = json.loads((out / "selection.json").read_text())
    assert info["k"] == len(expected) and info["pool"] == n and info["method"] == "color" and info["tau"] == 4
    assert info["tau_effective"] == pytest.approx(n / len(expected))
    assert info["threshold"] == color[np.isin(window, expected)].min()
    assert info["tokens_kept"] == WINDOW * len(expected) and info["window"] == WINDOW
    domain = table.column("domain").to_numpy(zero_copy_only=False)
    kept_web = int(np.sum(domain[np.isin(window, expected)] == "web"))
    assert info["domains"]["web"]["kept"] == kept_web and info["domains"]["web"]["kept_share"] == kept_web / len(expected)
    assert (out / "histogram.png").read_bytes()[:4] == b"\x89PNG"
    assert not list((out / "data").glob("part-*"))  # one copy of the tokens
    merged = IndexedDataset(out / "data" / "selected")
    assert len(merged) == len(expected) and merged.num_documents == len(expected)
    np.testing.assert_array_equal(merged.stream, np.concatenate([windows.tokens(int(i)) for i in expected]))
    np.testing.assert_array_equal(merged.stream.reshape(-1, WINDOW), windows.batch(expected, dtype=np.uint16))
    handoff = (out / "megatron_args.txt").read_text()  # the Megatron-LM hand-off (tests/test_megatron_args.py)
    assert f"--data-path {out / 'data' / 'selected'}\n" in handoff and f"--seq-length {WINDOW - 1}\n" in handoff


def test_selected_data_carries_the_corpus_tokenizer_meta(corpus, tmp_path):
    from dsel.data.meta import read_meta, write_meta

    prefix, scores, _, _ = corpus
    write_meta(prefix, {"vocab_size": 5000, "tokenizer": "t.model", "tokenizer_sha256": "abc", "dtype": "uint16",
                        "eod_id": 0, "num_documents": 120, "num_tokens": 1})
    run(scores=str(scores), corpus=str(prefix), out=str(tmp_path / "out"), method="topk", fraction=0.5,
        column="color")
    meta = read_meta(tmp_path / "out" / "data" / "selected")
    selected = IndexedDataset(tmp_path / "out" / "data" / "selected")
    assert meta["tokenizer_sha256"] == "abc" and meta["vocab_size"] == 5000
    assert meta["num_tokens"] == selected.num_tokens and meta["selected_from"] == str(prefix)


def test_kept_parquet_and_docids_beside_the_selection(corpus, tmp_path):
    from dsel.data.docids import read_doc_ids, read_document_strings, write_doc_ids, write_document_strings

    prefix, scores, windows, table = corpus
    write_doc_ids(prefix, [f"src{d}" for d in range(120)])
    write_document_strings(f"{prefix}.domains.jsonl", ["ab"[d % 2] for d in range(120)])
    out = run(scores=str(scores), corpus=str(prefix), out=str(tmp_path / "o"), method="topk", fraction=0.25,
              column="color")
    indices = np.load(out / "indices.npy")
    kept = pq.read_table(out / "kept.parquet").to_pydict()
    docs = windows.doc_of_window[indices]
    assert kept["window"] == indices.tolist() and kept["doc"] == docs.tolist()
    assert kept["doc_id"] == [f"src{d}" for d in docs] and kept["domain"] == ["ab"[d % 2] for d in docs]
    by_window = dict(zip(table.column("window").to_pylist(), table.column("color").to_pylist()))
    assert kept["color"] == [by_window[w] for w in indices.tolist()] and "text" not in kept  # no tokenizer at hand
    assert read_doc_ids(out / "data" / "selected", expected=len(indices)) == [f"src{d}" for d in docs]
    assert read_document_strings(out / "data" / "selected.domains.jsonl") == ["ab"[d % 2] for d in docs]


def test_index_format_trains_the_same_samples_as_the_copy(corpus, tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset as MegatronIndexedDataset

    from dsel.data.loader import GPTSampleLoader

    prefix, scores, windows, _ = corpus
    copy = run(scores=str(scores), corpus=str(prefix), out=str(tmp_path / "copy"), method="gumbel", column="color")
    index = run(scores=str(scores), corpus=str(prefix), out=str(tmp_path / "index"), method="gumbel", column="color",
                format="index")
    copied, indexed = (IndexedDataset(d / "data" / "selected") for d in (copy, index))
    assert os.path.islink(indexed.bin_path) and os.path.realpath(indexed.bin_path) == os.path.realpath(f"{prefix}.bin")
    assert os.path.getsize(indexed.idx_path) == os.path.getsize(copied.idx_path)
    theirs = MegatronIndexedDataset(indexed.prefix)
    assert len(theirs) == len(copied)
    for i in range(len(copied)):
        np.testing.assert_array_equal(theirs[i], copied[i])
    indexed.check_tokens(5000)
    batches = [list(GPTSampleLoader(ds, 6, 4, seed=3, num_samples=40, prefetch=0)) for ds in (copied, indexed)]
    assert len(batches[0]) == 10
    for a, b in zip(*batches):
        np.testing.assert_array_equal(a, b)


def test_npy_scores_with_headerless_corpus_and_token_budget(tmp_path):
    rng = np.random.default_rng(1)
    docs = [np.append(rng.integers(1, 60000, rng.integers(1, 40)), 0) for _ in range(50)]
    write_memmap_tokens(tmp_path / "tokens.bin", docs, np.uint16)
    stream = np.concatenate(docs).astype(np.uint16)
    n = len(stream) // WINDOW
    scores = rng.normal(size=n).astype(np.float32)
    np.save(tmp_path / "s.npy", scores)
    out = run(scores=str(tmp_path / "s.npy"), corpus=str(tmp_path / "tokens.bin"), out=str(tmp_path / "o"),
              window=WINDOW, method="gumbel", token_budget=WINDOW * 10 + 3, seed=3)
    indices = np.load(out / "indices.npy")
    assert len(indices) == 10
    merged = IndexedDataset(out / "data" / "selected")
    np.testing.assert_array_equal(merged.stream, np.concatenate([stream[i * WINDOW:(i + 1) * WINDOW] for i in indices]))
    info = json.loads((out / "selection.json").read_text())
    assert info["tokens_kept"] == 10 * WINDOW <= info["token_budget"] and "domains" not in info


def test_random_without_column_and_no_corpus(corpus, tmp_path):
    _, scores, windows, _ = corpus
    out = run(scores=str(scores), out=str(tmp_path / "r"), method="random", fraction=0.5, materialise=False)
    info = json.loads((out / "selection.json").read_text())
    assert info["k"] == round(len(windows) / 2) and info["threshold"] is None and info["expression"] is None
    assert info["outputs"]["histogram"] is None and not (out / "data").exists()
    with pytest.raises(DselError, match="no corpus recorded .scores.json.; set corpus= or materialise=false"):
        run(scores=str(scores), out=str(tmp_path / "r"), method="random")


@pytest.mark.parametrize("settings,message", [
    (dict(fraction=1.5), "fraction=1.5: must be in (0, 1]"),
    (dict(fraction=0.0), "fraction=0.0: must be in (0, 1]"),
    (dict(method="color", tau=0.5), "tau=0.5: must be >= 1"),
    (dict(method="color", fraction=0.2), "set tau= instead of fraction="),
    (dict(column="nope"), "unknown score column 'nope'; valid columns: loss_prior, loss_cond, color"),
    (dict(column="loss_prior - nope"), "unknown score column 'nope'"),
    (dict(column="color + 1"), "expected 'name', '-name' or 'name_a - name_b'"),
    (dict(), "3 score columns (loss_prior, loss_cond, color); choose one with column="),
    (dict(method="color-batch", column="color", token_budget=100), "takes no token_budget"),
    (dict(column="color", fraction=0.5, token_budget=100), "set either fraction= or token_budget=, not both"),
    (dict(method="color", column="color", tau=16, token_budget=100), "both set the amount kept; set one"),
    (dict(method="topk", column="color", tau=4), "only method=color or color-batch keep 1/tau"),
    (dict(method="topk", column="color", token_budget=10**9), "token_budget=1000000000 is larger than the pool"),
    (dict(column="color", window=WINDOW + 1), f"window={WINDOW + 1}: the scores were computed on windows of {WINDOW} tokens"),
])
def test_bad_settings_are_one_line_errors(corpus, tmp_path, settings, message):
    prefix, scores, _, _ = corpus
    with pytest.raises(DselError, match=None) as e:
        run(scores=str(scores), corpus=str(prefix), out=str(tmp_path / "o"), **settings)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_bad_inputs_name_the_file(corpus, tmp_path):
    prefix, scores, windows, table = corpus
    with pytest.raises(DselError, match=f"{tmp_path / 'missing'}: score table not found"):
        run(scores=str(tmp_path / "missing"), corpus=str(prefix), out=str(tmp_path / "o"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DselError, match=f"{tmp_path / 'empty'}/scores.parquet: score table not found"):
        run(scores=str(tmp_path / "empty"), corpus=str(prefix), out=str(tmp_path / "o"))
    with pytest.raises(DselError, match="missing.npy: score file not found"):
        run(scores=str(tmp_path / "missing.npy"), corpus=str(prefix), window=WINDOW, out=str(tmp_path / "o"))
    with pytest.raises(DselError, match="nocorpus: corpus not found"):
        run(scores=str(scores), corpus=str(tmp_path / "nocorpus"), column="color", out=str(tmp_path / "o"))
    np.save(tmp_path / "short.npy", np.zeros(len(windows) - 1, dtype=np.float32))
    with pytest.raises(DselError, match=f"short.npy: {len(windows) - 1} scores but the corpus has {len(windows)} windows"):
        run(scores=str(tmp_path / "short.npy"), corpus=str(prefix), window=WINDOW, out=str(tmp_path / "o"))
    nan = np.zeros(len(windows), dtype=np.float32)
    nan[7] = np.nan
    np.save(tmp_path / "nan.npy", nan)
    with pytest.raises(DselError, match="nan.npy: score column 'score' is nan at window 7"):
        run(scores=str(tmp_path / "nan.npy"), corpus=str(prefix), window=WINDOW, out=str(tmp_path / "o"))
    (tmp_path / "bad.parquet").write_text("not parquet")
    with pytest.raises(DselError, match="bad.parquet: not a readable parquet table"):
        run(scores=str(tmp_path / "bad.parquet"), corpus=str(prefix), window=WINDOW, out=str(tmp_path / "o"))
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("change,message", [
    (lambda w: np.where(w == 3, 10**6, w), "window id 1000000 is outside the corpus's"),
    (lambda w: np.where(w == 3, 4, w), "window 3 has no score"),
])
def test_bad_window_ids_in_table(corpus, tmp_path, change, message):
    prefix, scores, windows, table = corpus
    window = change(table.column("window").to_numpy())
    pq.write_table(table.set_column(0, "window", pa.array(window)), scores / "scores.parquet", row_group_size=50)
    with pytest.raises(DselError, match=message):
        run(scores=str(scores), corpus=str(prefix), column="color", out=str(tmp_path / "o"))


def test_cli_exits_2_with_one_line(corpus, tmp_path, capsys):
    prefix, scores, _, _ = corpus
    with pytest.raises(SystemExit) as e:
        main(["select", f"scores={scores}", f"corpus={prefix}", "fraction=2"])
    assert e.value.code == 2
    assert capsys.readouterr().err.strip() == "dsel select: error: fraction=2.0: must be in (0, 1]"


class SumScorer:
    """A stand-in scorer: two columns computed from the tokens (no model needed)."""

    columns = ["loss_prior", "loss_cond"]

    def __call__(self, tokens):
        x = tokens.double()
        return {"loss_prior": (x % 97).mean(1).float(), "loss_cond": (x % 89).mean(1).float()}


def test_select_reads_the_score_engine_table(corpus, tmp_path):
    """The contract with `dsel score`: its scores.parquet + scores.json feed `dsel select` unchanged."""
    from dsel.score.engine import score_windows

    prefix, _, windows, _ = corpus
    (tmp_path / "corpus.domains.jsonl").write_text("".join(f'"{"web" if d % 3 else "code"}"\n' for d in range(120)))
    score_windows(windows, SumScorer(), tmp_path / "scored", batch_size=16, shard_size=40, rank=0, world_size=1)
    out = run(scores=str(tmp_path / "scored"), out=str(tmp_path / "o"), method="gumbel",  # corpus from scores.json
              column="loss_prior - loss_cond", fraction=0.25, seed=4)
    batch = windows.batch(np.arange(len(windows))).astype(np.float64)
    key = (batch % 97).mean(1).astype(np.float32).astype(np.float64) - (batch % 89).mean(1).astype(np.float32)
    from dsel.select.noise import gumbel
    key = key + 0.1 * gumbel(4, np.arange(len(windows)))
    expected = np.sort(np.lexsort((np.arange(len(windows)), -key))[: round(0.25 * len(windows))])
    np.testing.assert_array_equal(np.load(out / "indices.npy"), expected)
    info = json.loads((out / "selection.json").read_text())
    assert info["window"] == WINDOW and set(info["domains"]) == {"web", "code"} and info["corpus"] == str(prefix)
    np.testing.assert_array_equal(IndexedDataset(out / "data" / "selected").stream, windows.batch(expected, dtype=np.uint16).ravel())
    doc = windows.doc_of_window
    assert info["domains"]["code"]["kept"] == int(np.sum(doc[expected] % 3 == 0))
