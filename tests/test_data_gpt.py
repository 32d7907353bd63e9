"""GPTSampleLoader against megatron-core's GPTDataset itself: same indices, same samples."""
import numpy as np
import pytest

from dsel.data.indexed import IndexedDataset, IndexedDatasetWriter
from dsel.data.loader import GPTSampleLoader
from dsel.data.megatron_reference import megatron_gpt_dataset
from dsel.errors import DselError

VOCAB, EOD = 500, 0


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    rng = np.random.default_rng(0)
    prefix = tmp_path_factory.mktemp("gpt") / "corpus"
    with IndexedDatasetWriter(prefix, np.uint16) as w:
        for _ in range(60):
            w.add_document(np.append(rng.integers(1, VOCAB, size=rng.integers(1, 60)), EOD))
    return IndexedDataset(prefix)


def megatron_dataset(ds, seq_len, seed, num_samples, indices, cache):
    return megatron_gpt_dataset(ds.prefix, seq_len, seed, num_samples, indices, cache, VOCAB, EOD)


# (seq_len, seed, num_samples, indices, epochs, separate final epoch) on a 1906-token corpus: one
# epoch; two epochs, final one shuffled with the rest (most of it used); 4 and 5 epochs, final one
# shuffled separately (few samples from it); a subset of sequences (a split), both ways.
CASES = [
    (32, 1234, None, None, 1, False),
    (32, 7, 40, None, 1, False),
    (32, 7, 110, None, 2, False),
    (16, 3, 400, None, 4, True),
    (64, 5, 120, None, 5, True),
    (24, 11, 140, np.arange(10, 50, dtype=np.int32), 3, True),
    (24, 11, 150, np.arange(10, 50, dtype=np.int32), 3, False),
]


@pytest.mark.parametrize("seq_len,seed,num_samples,indices,epochs,separate", CASES)
def test_same_samples_as_megatron(dataset, tmp_path, seq_len, seed, num_samples, indices, epochs, separate):
    exposed = np.arange(len(dataset), dtype=np.int32) if indices is None else indices
    theirs = megatron_dataset(dataset, seq_len, seed, num_samples, exposed, tmp_path)
    ours = GPTSampleLoader(dataset, seq_len, batch_size=8, seed=seed, num_samples=num_samples, indices=indices)
    assert len(ours.document_index) == epochs * len(exposed)
    if epochs > 1:  # a separate final epoch: samples before it are shuffled among themselves only
        before_final = ((epochs - 1) * int(dataset.sizes[exposed].sum()) - 1) // seq_len
        assert np.array_equal(np.sort(ours.shuffle_index[:before_final]), np.arange(before_final)) == separate
    np.testing.assert_array_equal(ours.document_index, theirs.document_index)
    np.testing.assert_array_equal(ours.sample_index, theirs.sample_index)
    np.testing.assert_array_equal(ours.shuffle_index, theirs.shuffle_index)
    expected = np.stack([theirs._query_document_sample_shuffle_indices(i)[0] for i in range(len(theirs))])
    np.testing.assert_array_equal(ours.batch(np.arange(len(theirs))), expected)
    sample = theirs[3]  # the public path: tokens and labels are the window shifted by one
    np.testing.assert_array_equal(sample["tokens"].numpy(), expected[3, :-1])
    np.testing.assert_array_equal(sample["labels"].numpy(), expected[3, 1:])
    streamed = np.concatenate(list(ours))
    assert len(streamed) == ours.num_samples
    np.testing.assert_array_equal(streamed, expected[: ours.num_samples])


def test_resume_start_and_dtype(dataset):
    full = GPTSampleLoader(dataset, 32, batch_size=5, seed=1, num_samples=50)
    resumed = GPTSampleLoader(dataset, 32, batch_size=5, seed=1, num_samples=50, start=20, dtype=np.int32, prefetch=0)
    got = np.concatenate(list(resumed))
    assert got.dtype == np.int32 and len(resumed) == 6
    np.testing.assert_array_equal(got, full.batch(np.arange(20, 50)))


def test_sample_out_of_range(dataset):
    loader = GPTSampleLoader(dataset, 32, batch_size=2, seed=0)
    with pytest.raises(DselError, match="out of range"):
        loader.batch([len(loader.shuffle_index)])
