"""Megatron indexed datasets: bit-exact against megatron-core's own builder and reader, bad input."""
import struct

import numpy as np
import pytest
import torch
from megatron.core.datasets.indexed_dataset import IndexedDataset as MegatronIndexedDataset
from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

from dsel.data.indexed import IndexedDataset, IndexedDatasetWriter, best_dtype, merge_datasets, subset_dataset
from dsel.errors import DselError


def random_documents(seed, num_docs=40, vocab=1000, max_parts=3):
    """Documents as lists of sequences (most documents have one sequence, some several, some empty parts)."""
    rng = np.random.default_rng(seed)
    docs = []
    for _ in range(num_docs):
        parts = rng.integers(1, max_parts + 1)
        docs.append([rng.integers(0, vocab, size=rng.integers(0, 50)) for _ in range(parts)])
    return docs


def write_ours(prefix, docs, dtype):
    with IndexedDatasetWriter(prefix, dtype) as w:
        for doc in docs:
            if len(doc) == 1:
                w.add_document(doc[0])
            else:
                for seq in doc:
                    w.add_item(seq)
                w.end_document()


def write_megatron(prefix, docs, dtype):
    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=dtype)
    for doc in docs:
        for seq in doc:
            builder.add_item(torch.from_numpy(seq.astype(np.int64)))
        builder.end_document()
    builder.finalize(f"{prefix}.idx")


def file_bytes(prefix):
    return open(f"{prefix}.idx", "rb").read(), open(f"{prefix}.bin", "rb").read()


@pytest.mark.parametrize("dtype", [np.uint16, np.int32, np.uint8, np.int64])
def test_bytes_identical_to_megatron_builder(tmp_path, dtype):
    docs = random_documents(0, vocab=250)
    write_ours(tmp_path / "ours", docs, dtype)
    write_megatron(str(tmp_path / "meg"), docs, dtype)
    assert file_bytes(tmp_path / "ours") == file_bytes(tmp_path / "meg")


def test_megatron_reads_ours_and_we_read_megatrons(tmp_path):
    docs = random_documents(1)
    write_ours(tmp_path / "ours", docs, np.uint16)
    write_megatron(str(tmp_path / "meg"), docs, np.uint16)
    sequences = [seq for doc in docs for seq in doc]
    doc_index = np.cumsum([0] + [len(doc) for doc in docs])
    theirs = MegatronIndexedDataset(str(tmp_path / "ours"))
    ours = IndexedDataset(tmp_path / "meg")
    assert len(theirs) == len(ours) == len(sequences)
    np.testing.assert_array_equal(theirs.document_indices, doc_index)
    np.testing.assert_array_equal(ours.document_indices, doc_index)
    np.testing.assert_array_equal(ours.sizes, [len(s) for s in sequences])
    assert ours.dtype == np.uint16 and ours.num_tokens == sum(len(s) for s in sequences)
    for i, seq in enumerate(sequences):
        np.testing.assert_array_equal(theirs[i], seq)
        np.testing.assert_array_equal(ours[i], seq)
        np.testing.assert_array_equal(ours.get(i, offset=len(seq) // 2), theirs.get(i, offset=len(seq) // 2))
    np.testing.assert_array_equal(ours.stream, np.concatenate(sequences))
    assert ours.document_of_token([0]).tolist() == [0]


def test_merge_matches_megatron_add_index(tmp_path):
    parts = [random_documents(s, num_docs=10) for s in (2, 3, 4)]
    for k, docs in enumerate(parts):
        write_ours(tmp_path / f"p{k}", docs, np.uint16)
    merged = merge_datasets([tmp_path / f"p{k}" for k in range(3)], tmp_path / "merged")
    builder = IndexedDatasetBuilder(str(tmp_path / "meg.bin"), dtype=np.uint16)
    for k in range(3):
        builder.add_index(str(tmp_path / f"p{k}"))
    builder.finalize(str(tmp_path / "meg.idx"))
    assert file_bytes(tmp_path / "merged") == file_bytes(tmp_path / "meg")
    assert merged.num_documents == 30


def test_subset_picks_documents_in_order(tmp_path):
    docs = random_documents(5, num_docs=20)
    write_ours(tmp_path / "full", docs, np.int32)
    ids = [7, 3, 3, 19, 0]
    sub = subset_dataset(tmp_path / "full", ids, tmp_path / "sub")
    write_ours(tmp_path / "expected", [docs[i] for i in ids], np.int32)
    assert file_bytes(tmp_path / "sub") == file_bytes(tmp_path / "expected")
    assert sub.num_documents == len(ids)
    with pytest.raises(DselError, match="document id 20 out of range"):
        subset_dataset(tmp_path / "full", [20], tmp_path / "bad")


def test_best_dtype_follows_megatron():
    assert best_dtype(32000) == np.uint16 and best_dtype(65500) == np.int32 and best_dtype(128256) == np.int32


def test_writer_failure_leaves_previous_version(tmp_path):
    write_ours(tmp_path / "d", [[np.arange(5)]], np.uint16)
    before = file_bytes(tmp_path / "d")
    with pytest.raises(RuntimeError):
        with IndexedDatasetWriter(tmp_path / "d", np.uint16) as w:
            w.add_document([9, 9, 9])
            raise RuntimeError("killed")
    assert file_bytes(tmp_path / "d") == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.bin", "d.idx"]
    with pytest.raises(DselError, match="does not fit"):
        with IndexedDatasetWriter(tmp_path / "d", np.uint16) as w:
            w.add_document([70000])
    assert file_bytes(tmp_path / "d") == before


# ---- bad input: one DselError naming the file, never a crash ----

@pytest.fixture
def good(tmp_path):
    write_ours(tmp_path / "g", random_documents(6, num_docs=8), np.uint16)
    return tmp_path / "g"


def patch(path, offset, data):
    raw = bytearray(open(path, "rb").read())
    raw[offset : offset + len(data)] = data
    open(path, "wb").write(bytes(raw))


def truncate(path, size):
    raw = open(path, "rb").read()
    open(path, "wb").write(raw[:size])


def expect_error(prefix, suffix, words):
    with pytest.raises(DselError) as info:
        IndexedDataset(prefix)
    message = str(info.value)
    assert message.startswith(f"{prefix}{suffix}:") and "\n" not in message
    assert words in message


def test_missing_file(tmp_path):
    expect_error(tmp_path / "nothing", ".idx", "not found")


def test_wrong_magic(good):
    patch(f"{good}.idx", 0, b"NOTIDX\x00\x00\x00")
    expect_error(good, ".idx", "wrong magic")


def test_unknown_dtype_code(good):
    patch(f"{good}.idx", 17, bytes([9]))
    expect_error(good, ".idx", "unknown dtype code 9")


def test_truncated_idx_header(good):
    truncate(f"{good}.idx", 20)
    expect_error(good, ".idx", "truncated index")


def test_truncated_idx_body(good):
    truncate(f"{good}.idx", 34 + 10)
    expect_error(good, ".idx", "truncated index")


def test_truncated_bin(good):
    truncate(f"{good}.bin", 7)
    expect_error(good, ".bin", "past the end")


def test_offset_past_end(good):
    n = struct.unpack("<q", open(f"{good}.idx", "rb").read()[18:26])[0]
    patch(f"{good}.idx", 34 + 4 * n, struct.pack("<q", 10**9))  # first sequence pointer
    expect_error(good, ".bin", "past the end")


def test_corrupt_document_index(good):
    raw = open(f"{good}.idx", "rb").read()
    patch(f"{good}.idx", len(raw) - 8, struct.pack("<q", 999))
    expect_error(good, ".idx", "corrupt document index")


def test_token_past_vocab(tmp_path):
    write_ours(tmp_path / "v", [[np.array([1, 2, 3])], [np.array([4, 500, 6])]], np.uint16)
    IndexedDataset(tmp_path / "v", vocab_size=501)
    with pytest.raises(DselError, match=r"v\.bin: token id 500 at token 4 is outside the vocabulary \(size 500\)"):
        IndexedDataset(tmp_path / "v", vocab_size=500)
