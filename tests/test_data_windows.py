"""Token streams and windows: native gathers against plain numpy slicing, streaming, write_windows."""
import numpy as np
import pytest

from dsel.data.indexed import IndexedDataset, IndexedDatasetWriter
from dsel.data.loader import WindowStream
from dsel.data.memmap import MemmapTokens, write_memmap_tokens
from dsel.data.windows import Windows, write_windows
from dsel.errors import DselError

EOD = 0


def make_documents(seed=0, num_docs=30, vocab=3000):
    """Documents of random length, each ending with EOD (as `dsel tokenize` writes them)."""
    rng = np.random.default_rng(seed)
    return [np.append(rng.integers(1, vocab, size=rng.integers(1, 40)), EOD) for _ in range(num_docs)]


@pytest.fixture
def indexed(tmp_path):
    docs = make_documents()
    with IndexedDatasetWriter(tmp_path / "d", np.uint16) as w:
        for doc in docs:
            w.add_document(doc)
    return IndexedDataset(tmp_path / "d"), docs


def naive_doc_of_window(docs, window, num_windows):
    owner = np.concatenate([np.full(len(d), k) for k, d in enumerate(docs)])
    return owner[np.arange(num_windows) * window]


@pytest.mark.parametrize("window", [1, 7, 16])
def test_windows_over_indexed_dataset(indexed, window):
    ds, docs = indexed
    stream = np.concatenate(docs)
    w = Windows(ds, window)
    assert len(w) == len(stream) // window
    np.testing.assert_array_equal(w.tokens(3), stream[3 * window : 4 * window])
    ids = np.array([5, 0, len(w) - 1, 5])
    expected = np.stack([stream[i * window : (i + 1) * window] for i in ids])
    got = w.batch(ids)
    assert got.dtype == np.int64
    np.testing.assert_array_equal(got, expected)
    out = np.empty((len(ids), window), dtype=np.int32)
    assert w.batch(ids, out=out) is out
    np.testing.assert_array_equal(out, expected)
    np.testing.assert_array_equal(w.doc_of_window, naive_doc_of_window(docs, window, len(w)))


def test_windows_over_memmap(tmp_path):
    docs = make_documents(1)
    for dtype in (np.uint16, np.uint32):
        path = tmp_path / f"tokens.{np.dtype(dtype).name}"
        write_memmap_tokens(path, docs, dtype)
        src = MemmapTokens(path, dtype, eos_id=EOD)
        w = Windows(src, 8)
        stream = np.concatenate(docs)
        np.testing.assert_array_equal(src.stream, stream)
        np.testing.assert_array_equal(w.batch(np.arange(len(w))), stream[: len(w) * 8].reshape(-1, 8))
        np.testing.assert_array_equal(w.doc_of_window, naive_doc_of_window(docs, 8, len(w)))
        assert src.num_documents == len(docs)
    assert MemmapTokens(path, np.uint32).num_documents == 1


def test_memmap_bad_input(tmp_path):
    path = tmp_path / "odd.bin"
    path.write_bytes(b"\x01\x00\x02")
    with pytest.raises(DselError, match=r"odd\.bin: truncated"):
        MemmapTokens(path, np.uint16)
    with pytest.raises(DselError, match=r"missing\.bin: file not found"):
        MemmapTokens(tmp_path / "missing.bin", np.uint16)
    path.write_bytes(np.array([1, 2, 99], dtype=np.uint16).tobytes())
    with pytest.raises(DselError, match=r"odd\.bin: token id 99 at token 2"):
        MemmapTokens(path, np.uint16, vocab_size=50)


def test_window_errors(indexed):
    ds, _ = indexed
    w = Windows(ds, 4)
    with pytest.raises(DselError, match="out of range"):
        w.batch([len(w)])
    with pytest.raises(DselError, match="cannot gather uint16 tokens into a int8"):
        w.batch([0], out=np.empty((1, 4), dtype=np.int8))
    with pytest.raises(DselError, match="less than one window"):
        Windows(ds, ds.num_tokens + 1)


@pytest.mark.parametrize("prefetch", [0, 2])
def test_window_stream_covers_range_in_order(indexed, prefetch):
    ds, _ = indexed
    w = Windows(ds, 5)
    stream = WindowStream(w, batch_size=4, start=3, stop=len(w) - 2, prefetch=prefetch)
    batches = list(stream)
    assert len(batches) == len(stream)
    ids = np.concatenate([b[0] for b in batches])
    np.testing.assert_array_equal(ids, np.arange(3, len(w) - 2))
    np.testing.assert_array_equal(np.concatenate([b[1] for b in batches]), w.batch(ids))


def test_window_stream_stops_early_and_reports_errors(indexed):
    ds, _ = indexed
    w = Windows(ds, 2)
    for _ in WindowStream(w, batch_size=1, prefetch=2):
        break  # the producer thread must not hang
    with pytest.raises(DselError, match="bad range"):
        WindowStream(w, batch_size=1, start=5, stop=len(w) + 1)


def test_write_windows_one_document_each(indexed, tmp_path):
    ds, _ = indexed
    w = Windows(ds, 6)
    ids = [4, 1, 4, len(w) - 1]
    out = write_windows(w, ids, tmp_path / "sel")
    assert out.dtype == np.uint16 and out.num_documents == len(ids)
    for k, i in enumerate(ids):
        np.testing.assert_array_equal(out[k], w.tokens(i))
