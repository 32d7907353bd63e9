"""The registered scorers (pds, color) with real tiny checkpoints through `dsel score`, against the models."""
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from dsel.cli import main
from dsel.models.checkpoint import save_model
from dsel.models.config import GPTConfig
from dsel.models.gpt import GPT
from dsel.models.scorer import Scorer
from tests._score_util import make_corpus, open_corpus

WINDOW = 9
CONFIG = GPTConfig(vocab_size=500, seq_len=WINDOW, n_layer=1, n_head=2, d_model=32)


@pytest.fixture
def corpus(tmp_path):
    make_corpus(tmp_path / "corpus", num_docs=25)
    return tmp_path / "corpus"


def score(corpus, out, scorer, **settings):
    main(["score", f"corpus={corpus}", f"window={WINDOW}", f"scorer={scorer}", f"out={out}", "batch_size=5",
          "shard_size=12", "device=cpu", *[f"settings.{k}={v}" for k, v in settings.items()]])
    return pq.read_table(out / "scores.parquet").to_pydict()


def test_pds_scorer_through_dsel_score(corpus, tmp_path):
    torch.manual_seed(0)
    model = Scorer(CONFIG).eval()
    save_model(tmp_path / "scorer", model, {"window": WINDOW})
    table = score(corpus, tmp_path / "out", "pds", model=tmp_path / "scorer")
    tokens = torch.from_numpy(open_corpus(corpus, WINDOW).batch(np.arange(len(table["window"]))))
    with torch.no_grad():
        expected = model(tokens).float().numpy()
    np.testing.assert_allclose(table["pds"], expected, rtol=1e-5, atol=1e-6)
    main(["pds", "score", f"model={tmp_path / 'scorer'}", f"corpus={corpus}", f"out={tmp_path / 'pds'}", "device=cpu"])
    via_pds = pq.read_table(tmp_path / "pds" / "scores.parquet").column("pds")
    np.testing.assert_allclose(via_pds, table["pds"], rtol=1e-5, atol=1e-6)  # another batch size: up to rounding


def test_color_scorer_through_dsel_score(corpus, tmp_path):
    torch.manual_seed(1)
    prior, cond = GPT(CONFIG).eval(), GPT(CONFIG).eval()
    save_model(tmp_path / "prior", prior, {})
    save_model(tmp_path / "cond", cond, {})
    table = score(corpus, tmp_path / "out", "color", prior=tmp_path / "prior", cond=tmp_path / "cond", precision="fp32")
    tokens = torch.from_numpy(open_corpus(corpus, WINDOW).batch(np.arange(len(table["window"]))))
    with torch.no_grad():  # reference: plain logits + cross-entropy, no fused kernel
        losses = {name: torch.nn.functional.cross_entropy(m(tokens[:, :-1]).transpose(1, 2), tokens[:, 1:],
                                                          reduction="none").mean(1)
                  for name, m in (("prior", prior), ("cond", cond))}
    np.testing.assert_allclose(table["loss_prior"], losses["prior"], rtol=1e-5)
    np.testing.assert_allclose(table["loss_cond"], losses["cond"], rtol=1e-5)
    np.testing.assert_allclose(table["color"], np.array(table["loss_prior"]) - np.array(table["loss_cond"]), atol=1e-6)
    main(["color", "score", f"corpus={corpus}", f"prior={tmp_path / 'prior'}", f"cond={tmp_path / 'cond'}",
          f"window={WINDOW}", "precision=fp32", f"out={tmp_path / 'color'}", "device=cpu"])
    # fixed micro-batches make CoLoR scores independent of batch and shard sizes: bitwise equal
    assert pq.read_table(tmp_path / "color" / "scores.parquet").column("color").to_pylist() == table["color"]
