"""Score engine: scores vs a direct computation, shards and resume, coverage checks, per-document scores."""
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest

from dsel.errors import DselError
from dsel.io import read_json
from dsel.score.commands import open_windows
from dsel.score.engine import merge_scores, read_scores, score_windows, write_doc_scores
from tests._score_util import EOD, FakeScorer, make_corpus, open_corpus, reference_scores

WINDOW = 7


@pytest.fixture
def corpus(tmp_path):
    prefix = tmp_path / "corpus"
    docs = make_corpus(prefix)
    return prefix, docs


def table_dict(path):
    return pq.read_table(path).to_pydict()


def test_scores_match_direct_computation(corpus, tmp_path):
    prefix, docs = corpus
    windows = open_corpus(prefix, WINDOW)
    path = score_windows(windows, FakeScorer(), tmp_path / "out", batch_size=4, shard_size=10, meta={"run": "a"})
    table = pq.read_table(path)
    assert table.schema.names == ["window", "doc", "doc_id", "tokens", "total", "first"]
    assert [str(t) for t in table.schema.types] == ["int64", "int64", "string", "int64", "float", "float"]
    stream = np.concatenate(docs)
    n = len(stream) // WINDOW
    expected = reference_scores(stream[: n * WINDOW].reshape(n, WINDOW))
    got = table.to_pydict()
    np.testing.assert_array_equal(got["window"], np.arange(n))
    np.testing.assert_array_equal(np.array(got["total"], dtype=np.float32), expected["total"])
    np.testing.assert_array_equal(np.array(got["first"], dtype=np.float32), expected["first"])
    owner = np.concatenate([np.full(len(d), k) for k, d in enumerate(docs)])[np.arange(n) * WINDOW]
    np.testing.assert_array_equal(got["doc"], owner)
    assert got["doc_id"] == [f"doc-{k}" for k in owner]
    assert set(got["tokens"]) == {WINDOW}
    info = read_json(tmp_path / "out" / "scores.json")
    assert info["num_windows"] == n and info["num_shards"] == -(-n // 10) and info["meta"] == {"run": "a"}
    assert info["stats"]["tokens"] == n * WINDOW
    assert info["stats"]["columns"]["total"]["mean"] == pytest.approx(expected["total"].astype(np.float64).mean())
    assert (tmp_path / "out" / "hist-total.png").read_bytes()[:4] == b"\x89PNG"
    marker = read_json(tmp_path / "out" / "shards" / "shard-000001.json")
    assert (marker["start"], marker["stop"]) == (10, 20)
    assert marker["stats"]["first"]["max"] == float(expected["first"][10:20].max())


def test_doc_scores_are_token_weighted_means(corpus, tmp_path):
    prefix, docs = corpus
    windows = open_corpus(prefix, WINDOW)
    score_windows(windows, FakeScorer(), tmp_path / "out", batch_size=8)
    doc_table = pq.read_table(tmp_path / "out" / "doc_scores.parquet").to_pydict()
    scores = table_dict(tmp_path / "out" / "scores.parquet")
    owner = np.concatenate([np.full(len(d), k) for k, d in enumerate(docs)])
    n = len(windows)
    weight, total = {}, {}
    for w in range(n):  # naive: every scored token gives its window's score to its document
        for d in owner[w * WINDOW : (w + 1) * WINDOW]:
            weight[d] = weight.get(d, 0) + 1
            total[d] = total.get(d, 0.0) + scores["total"][w]
    assert doc_table["doc"] == sorted(weight)
    assert doc_table["doc_id"] == [f"doc-{d}" for d in sorted(weight)]
    assert doc_table["tokens"] == [weight[d] for d in sorted(weight)]
    np.testing.assert_allclose(doc_table["total"], [total[d] / weight[d] for d in sorted(weight)], rtol=1e-6)
    before = pq.read_table(tmp_path / "out" / "doc_scores.parquet")
    (tmp_path / "out" / "doc_scores.parquet").unlink()
    assert pq.read_table(write_doc_scores(tmp_path / "out")).equals(before)


def test_domains_from_sidecar_give_per_domain_stats(corpus, tmp_path):
    prefix, docs = corpus
    domains = ["web" if k % 3 else "code" for k in range(len(docs))]
    (tmp_path / "corpus.domains.jsonl").write_text("".join(f'"{d}"\n' for d in domains))
    windows = open_corpus(prefix, WINDOW)
    score_windows(windows, FakeScorer(), tmp_path / "out", batch_size=8)
    table = table_dict(tmp_path / "out" / "scores.parquet")
    assert table["domain"] == [domains[d] for d in table["doc"]]
    by_domain = read_json(tmp_path / "out" / "scores.json")["stats"]["domains"]
    for name in ("web", "code"):
        values = np.array([t for t, d in zip(table["total"], table["domain"]) if d == name], dtype=np.float64)
        assert by_domain[name]["count"] == len(values)
        assert by_domain[name]["columns"]["total"]["mean"] == pytest.approx(values.mean())


def test_resume_after_a_crash_scores_only_unfinished_shards(corpus, tmp_path):
    prefix, _ = corpus
    windows = open_corpus(prefix, WINDOW)
    clean = score_windows(windows, FakeScorer(), tmp_path / "clean", batch_size=3, shard_size=6)
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="killed"):
        score_windows(windows, FakeScorer(fail_after=5), out, batch_size=3, shard_size=6)
    finished = sorted(p.name for p in (out / "shards").glob("shard-*.json"))
    assert finished == ["shard-000000.json", "shard-000001.json"]  # 2 batches per shard, died in shard 2
    assert not (out / "scores.parquet").exists()
    (out / "shards" / ".shard-000002.npz.tmp-424242").write_bytes(b"half a shard")  # left by a kill -9
    shutil.copy(out / "shards" / "shard-000000.npz", out / "shards" / "shard-000003.npz")  # file, no marker
    resumed = FakeScorer()
    path = score_windows(windows, resumed, out, batch_size=5)  # batch size may change; shard size is the job's
    unfinished = len(windows) - 12
    assert resumed.calls == sum(-(-min(6, unfinished - s) // 5) for s in range(0, unfinished, 6))
    assert not list((out / "shards").glob(".*tmp*"))
    assert pq.read_table(path).equals(pq.read_table(clean))
    again = FakeScorer()
    score_windows(windows, again, out, batch_size=5)
    assert again.calls == 0


def test_explicit_ranks_without_process_group(corpus, tmp_path):
    prefix, _ = corpus
    windows = open_corpus(prefix, WINDOW)
    single = score_windows(windows, FakeScorer(), tmp_path / "one", batch_size=4, shard_size=5)
    out = tmp_path / "two"
    score_windows(windows, FakeScorer(), out, batch_size=4, shard_size=5, rank=1, world_size=2)
    assert not (out / "scores.parquet").exists()
    markers = sorted(int(p.stem[-6:]) for p in (out / "shards").glob("shard-*.json"))
    assert markers and all(k % 2 == 1 for k in markers)
    path = score_windows(windows, FakeScorer(), out, batch_size=4, shard_size=5, rank=0, world_size=2)
    assert pq.read_table(path).equals(pq.read_table(single))
    late = tmp_path / "late"  # rank 0 first: it cannot merge, rank 1 does not, `merge_scores` does
    score_windows(windows, FakeScorer(), late, batch_size=4, shard_size=5, rank=0, world_size=2)
    score_windows(windows, FakeScorer(), late, batch_size=4, shard_size=5, rank=1, world_size=2)
    assert not (late / "scores.parquet").exists()
    assert pq.read_table(merge_scores(late)).equals(pq.read_table(single))


def test_merge_names_a_missing_or_duplicated_shard(corpus, tmp_path):
    prefix, _ = corpus
    windows = open_corpus(prefix, WINDOW)
    out = tmp_path / "out"
    score_windows(windows, FakeScorer(), out, batch_size=4, shard_size=8)
    shards = out / "shards"
    n_shards = read_json(out / "scores.json")["num_shards"]
    for suffix in ("npz", "json"):
        shutil.copy(shards / f"shard-000001.{suffix}", shards / f"shard-{n_shards:06d}.{suffix}")
    with pytest.raises(DselError, match=f"shard-{n_shards:06d}.npz: window 8 is scored twice .*shard-000001.npz"):
        merge_scores(out)
    for suffix in ("npz", "json"):
        (shards / f"shard-{n_shards:06d}.{suffix}").unlink()
    merge_scores(out)
    (shards / "shard-000002.json").unlink()
    with pytest.raises(DselError, match=r"shard-000002.npz: missing or unfinished \(windows \[16, 24\)"):
        merge_scores(out)
    shutil.copy(shards / "shard-000001.json", shards / "shard-000002.json")
    (shards / "shard-000002.npz").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(DselError, match="shard-000002.npz: not a readable shard"):
        merge_scores(out)
    (shards / "shard-000002.json").unlink()
    (shards / "shard-000002.npz").rename(tmp_path / "x.npz")
    shutil.copy(shards / "shard-000001.json", shards / "shard-000002.json")
    with pytest.raises(DselError, match="shard-000002.npz: shard file .*not found"):
        merge_scores(out)


def test_another_scoring_config_is_refused(corpus, tmp_path):
    prefix, _ = corpus
    windows = open_corpus(prefix, WINDOW)
    out = tmp_path / "out"
    score_windows(windows, FakeScorer(), out, batch_size=4, meta={"model": "a"})
    with pytest.raises(DselError, match="job.json: shards of another scoring config .*meta"):
        score_windows(windows, FakeScorer(), out, batch_size=4, meta={"model": "b"})
    with pytest.raises(DselError, match="another scoring config .*window 7 -> 5"):
        score_windows(open_corpus(prefix, 5), FakeScorer(), out, batch_size=4, meta={"model": "a"})
    with pytest.raises(DselError, match="shard_size 256 -> 3"):
        score_windows(windows, FakeScorer(), out, batch_size=4, shard_size=3, meta={"model": "a"})
    (out / "shards" / "job.json").unlink()  # markers still carry the old fingerprint
    with pytest.raises(DselError, match="shard-000000.json: written by another scoring config"):
        score_windows(windows, FakeScorer(), out, batch_size=4, meta={"model": "b"})


def test_bad_scorer_output_and_tokens_are_reported(corpus, tmp_path):
    prefix, _ = corpus
    windows = open_corpus(prefix, WINDOW)

    class Wrong(FakeScorer):
        def __init__(self, change):
            super().__init__()
            self.change = change

        def __call__(self, tokens):
            return self.change(super().__call__(tokens))

    cases = [
        (lambda s: {"total": s["total"]}, "returned columns"),
        (lambda s: {**s, "first": s["first"][:1]}, "shape"),
        (lambda s: {**s, "total": s["total"].clone().fill_(float("nan"))}, "non-finite 'total' score .* window 0"),
    ]
    for k, (change, message) in enumerate(cases):
        with pytest.raises(DselError, match=message):
            score_windows(windows, Wrong(change), tmp_path / f"out{k}", batch_size=4)
    with pytest.raises(DselError, match="past the scorer's vocabulary of 100"):
        score_windows(windows, FakeScorer(vocab_size=100), tmp_path / "vocab", batch_size=4)


def test_open_windows_inputs(corpus, tmp_path):
    prefix, docs = corpus
    assert len(open_windows(str(prefix), WINDOW, "uint16")) == len(np.concatenate(docs)) // WINDOW
    assert len(open_windows(f"{prefix}.bin", WINDOW, "uint16")) == len(np.concatenate(docs)) // WINDOW
    with pytest.raises(DselError, match="nowhere: corpus not found"):
        open_windows(str(tmp_path / "nowhere"), WINDOW, "uint16")
    with pytest.raises(DselError, match="less than one window"):
        open_windows(str(prefix), 10**6, "uint16")
    raw = tmp_path / "tokens.npy"
    np.concatenate(docs).astype(np.uint16).tofile(raw)
    (tmp_path / "tokens.meta.json").write_text(
        f'{{"vocab_size": 500, "tokenizer": "t", "tokenizer_sha256": "x", "dtype": "uint16", "eod_id": {EOD}}}')
    memmap = open_windows(str(raw), WINDOW, "uint16")
    np.testing.assert_array_equal(memmap.doc_of_window, open_corpus(prefix, WINDOW).doc_of_window)
    path = score_windows(memmap, FakeScorer(), tmp_path / "raw", batch_size=4)
    assert "doc_id" not in pq.read_table(path).schema.names


def test_merge_reopens_a_relative_corpus_from_anywhere(corpus, tmp_path, monkeypatch):
    prefix, docs = corpus
    monkeypatch.chdir(tmp_path)
    score_windows(open_windows("corpus", WINDOW, "uint16"), FakeScorer(), "out", batch_size=4)
    first = pq.read_table(tmp_path / "out" / "scores.parquet")
    monkeypatch.chdir(tmp_path / "out")
    (tmp_path / "out" / "scores.parquet").unlink()
    assert pq.read_table(merge_scores(tmp_path / "out")).equals(first)
    owner = np.concatenate([np.full(len(d), k) for k, d in enumerate(docs)])[: first.num_rows * WINDOW]
    assert read_json(tmp_path / "out" / "scores.json")["num_documents"] == len(np.unique(owner))


def test_scorer_columns_must_not_clash_with_table_columns(corpus, tmp_path):
    prefix, _ = corpus

    class Clash(FakeScorer):
        columns = ["tokens"]

    with pytest.raises(DselError, match=r"scorer columns \['tokens'\] must be distinct"):
        score_windows(open_corpus(prefix, WINDOW), Clash(), tmp_path / "out", batch_size=4)


def test_read_scores_checks_file_and_columns(corpus, tmp_path):
    prefix, _ = corpus
    path = score_windows(open_corpus(prefix, WINDOW), FakeScorer(), tmp_path / "out", batch_size=4)
    assert read_scores(tmp_path / "out", ["total"]).equals(read_scores(path))
    with pytest.raises(DselError, match="has no column pds; it has window, doc, doc_id, tokens, total, first"):
        read_scores(path, ["pds"])
    with pytest.raises(DselError, match="score table .*not found"):
        read_scores(tmp_path / "nothing")
    (tmp_path / "bad.parquet").write_text("not parquet")
    with pytest.raises(DselError, match="bad.parquet: not a readable parquet file"):
        read_scores(tmp_path / "bad.parquet")
