"""ColorScorer against materialised logits + F.cross_entropy, batch-size invariance, bad input."""
import os

import pytest
import torch

if not torch.cuda.is_available():  # must precede the first Triton call
    os.environ.setdefault("TRITON_INTERPRET", "1")

from dsel.color.commands import check_data_matches  # noqa: E402
from dsel.color.scorer import ColorScorer, ScoredModel, mean_token_losses  # noqa: E402
from dsel.errors import DselError  # noqa: E402
from _color_util import plain_mean_losses, random_windows, tiny_gpt  # noqa: E402


def test_mean_token_losses_match_plain_cross_entropy(kernel_backend):
    model, tokens = tiny_gpt(), random_windows(5, 17)
    lengths = torch.tensor([17, 2, 9, 16, 5])
    torch.testing.assert_close(mean_token_losses(model, tokens), plain_mean_losses(model, tokens))
    torch.testing.assert_close(mean_token_losses(model, tokens, lengths), plain_mean_losses(model, tokens, lengths))


def test_scorer_columns_match_plain_torch(kernel_backend):
    prior, cond = tiny_gpt(0), tiny_gpt(1)
    tokens = random_windows(7, 17)
    scores = ColorScorer({"prior": prior, "cond": cond}, micro_batch=4)(tokens)
    want_prior, want_cond = plain_mean_losses(prior, tokens), plain_mean_losses(cond, tokens)
    assert set(scores) == {"loss_prior", "loss_cond", "color"}
    torch.testing.assert_close(scores["loss_prior"], want_prior)
    torch.testing.assert_close(scores["loss_cond"], want_cond)
    torch.testing.assert_close(scores["color"], want_prior - want_cond)
    assert all(v.dtype == torch.float32 and v.shape == (7,) for v in scores.values())


def test_extra_models_and_conditional_only_columns():
    tokens = random_windows(3, 9)
    scorer = ColorScorer({"cond": tiny_gpt(1), "rho": tiny_gpt(2)}, micro_batch=2)
    assert scorer.columns == ["loss_cond", "loss_rho"]
    torch.testing.assert_close(scorer(tokens)["loss_rho"], plain_mean_losses(tiny_gpt(2), tokens))


def test_scores_bitwise_identical_across_batch_sizes():
    scorer = ColorScorer({"prior": tiny_gpt(0), "cond": tiny_gpt(1)}, micro_batch=4)
    tokens = random_windows(11, 17)
    whole = scorer(tokens)
    for batch_size in (1, 3, 4, 7):
        parts = [scorer(tokens[i:i + batch_size]) for i in range(0, len(tokens), batch_size)]
        for column, values in whole.items():
            assert torch.equal(torch.cat([p[column] for p in parts]), values), (column, batch_size)


def test_length_packed_scores_equal_per_sequence_scores():
    scorer = ColorScorer({"prior": tiny_gpt(0), "cond": tiny_gpt(1)}, micro_batch=4)
    lengths = [17, 3, 12, 2, 17, 8, 5, 11, 16, 9]
    sequences = [random_windows(1, n, seed=i)[0] for i, n in enumerate(lengths)]
    packed = scorer.score_sequences(sequences, max_tokens=40)
    for i, seq in enumerate(sequences):
        alone = {name: mean_token_losses(m.model, seq[None]) for name, m in zip(("prior", "cond"), scorer.models)}
        torch.testing.assert_close(packed["loss_prior"][i:i + 1], alone["prior"])
        torch.testing.assert_close(packed["loss_cond"][i:i + 1], alone["cond"])
    torch.testing.assert_close(packed["color"], packed["loss_prior"] - packed["loss_cond"])
    with pytest.raises(DselError, match="at least 2 tokens"):
        scorer.score_sequences([sequences[0], sequences[0][:1]])


def test_different_vocabularies_name_the_checkpoint():
    models = {"prior": ScoredModel("prior", tiny_gpt(0), "ckpt/prior"),
              "cond": ScoredModel("cond", tiny_gpt(1, vocab_size=128), "ckpt/cond")}
    with pytest.raises(DselError, match="ckpt/cond.*128"):
        ColorScorer(models)


def test_different_tokenizers_name_the_checkpoints():
    models = {"prior": ScoredModel("prior", tiny_gpt(0), "ckpt/prior", {"tokenizer_sha256": "aa"}),
              "cond": ScoredModel("cond", tiny_gpt(1), "ckpt/cond", {"tokenizer_sha256": "bb"})}
    with pytest.raises(DselError, match="ckpt/prior.*ckpt/cond"):
        ColorScorer(models)


def test_window_longer_than_context_is_refused():
    scorer = ColorScorer({"prior": ScoredModel("prior", tiny_gpt(0, seq_len=16), "ckpt/prior")})
    scorer.check_window(17)  # 16 inputs predict 16 targets: fits
    with pytest.raises(DselError, match="ckpt/prior.*longer than the context"):
        scorer.check_window(18)
    with pytest.raises(DselError, match="longer than the context"):
        scorer(random_windows(2, 18))
    with pytest.raises(DselError, match="at least 2 tokens"):
        scorer.check_window(1)


def test_bad_token_ids_and_shapes_are_refused():
    scorer = ColorScorer({"prior": ScoredModel("prior", tiny_gpt(0), "ckpt/prior")})
    with pytest.raises(DselError, match="outside the vocabulary.*ckpt/prior"):
        scorer(torch.full((2, 5), 64))
    with pytest.raises(DselError, match="shape"):
        scorer(torch.zeros(5, dtype=torch.long))


def test_corpus_with_another_tokenizer_is_refused(tmp_path):
    prefix = tmp_path / "corpus"
    meta = {"vocab_size": 64, "tokenizer": "tok.model", "tokenizer_sha256": "aa", "dtype": "uint16", "eod_id": 0}
    from dsel.data.meta import write_meta

    write_meta(prefix, meta)
    same = ColorScorer({"prior": ScoredModel("prior", tiny_gpt(0), "ckpt/prior", {"tokenizer_sha256": "aa"})})
    check_data_matches(str(prefix), same.models)
    other = ColorScorer({"prior": ScoredModel("prior", tiny_gpt(0), "ckpt/prior", {"tokenizer_sha256": "bb"})})
    with pytest.raises(DselError, match="ckpt/prior.*tokenizer_sha256"):
        check_data_matches(str(prefix), other.models)
