"""`dsel color finetune` (and friends) through the CLI on a corpus made by `dsel tokenize`."""
import json
import random

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from dsel.cli import main
from dsel.color.commands import (ColorFinetuneConfig, ColorScoreConfig, ColorTrainPriorConfig, run_finetune, run_score,
                                 run_train_prior)
from dsel.color.scorer import ColorScorer, mean_token_losses
from dsel.color.target import padded_batch
from dsel.config import load_config
from dsel.data.indexed import IndexedDataset
from dsel.data.meta import read_meta, write_meta
from dsel.data.windows import Windows
from dsel.errors import DselError
from dsel.models.checkpoint import load_model, save_model
from _color_util import tiny_gpt

TOPIC = "the cat sat on a mat and the dog ran to the park".split()
OTHER = "markets rallied as bond yields fell while central banks held rates".split()


def write_jsonl(path, topics, n, seed):
    """n documents; document i draws its words from topics[i % len(topics)]."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(n):
            words = topics[i % len(topics)]
            f.write(json.dumps({"text": " ".join(rng.choices(words, k=rng.randint(8, 30)))}) + "\n")
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tokenized corpus (even documents on TOPIC, odd on OTHER), a target jsonl on TOPIC, a tiny random prior."""
    root = tmp_path_factory.mktemp("color")
    write_jsonl(root / "corpus.jsonl", [TOPIC, OTHER], 80, seed=0)
    write_jsonl(root / "target.jsonl", [TOPIC], 24, seed=1)
    main(["tokenize", f"input={root / 'corpus.jsonl'}", f"output={root / 'corpus'}", "vocab_size=320"])
    main(["tokenize", f"input={root / 'target.jsonl'}", f"output={root / 'target'}", f"tokenizer={root / 'corpus.model'}"])
    meta = {k: read_meta(root / "corpus")[k] for k in ("tokenizer", "tokenizer_sha256", "vocab_size")}
    save_model(root / "prior", tiny_gpt(0, vocab_size=meta["vocab_size"], seq_len=128), meta)  # 1 piece per doc
    return root


@torch.no_grad()
def target_loss(checkpoint, prefix) -> float:
    """Mean next-token loss of a model over the documents of a dataset."""
    model, _ = load_model(checkpoint)
    dataset = IndexedDataset(prefix)
    tokens, mask = padded_batch([torch.as_tensor(dataset[i].astype("int64")) for i in range(len(dataset))])
    return float(mean_token_losses(model, tokens, mask.sum(1) + 1).mean())


@pytest.mark.parametrize("target", ["target.jsonl", "target"])
def test_finetune_lowers_target_loss_and_records_it(setup, target):
    out = setup / f"cond-{target}"
    main(["color", "finetune", f"prior={setup / 'prior'}", f"target={setup / target}", f"out={out}", "epochs=3",
          "batch_size=4", "warmup=2", "device=cpu"])
    _, meta = load_model(out)
    assert meta["tokenizer_sha256"] == read_meta(setup / "corpus")["tokenizer_sha256"]
    assert meta["finetune"]["steps"] == 3 * 6 and meta["finetune"]["last_loss"] < meta["finetune"]["first_loss"]
    assert target_loss(out, setup / "target") < target_loss(setup / "prior", setup / "target") - 0.3


def finetune_config(setup, **settings):
    settings = {"prior": setup / "prior", "out": setup / "unused", "device": "cpu", **settings}
    return load_config(ColorFinetuneConfig, None, [f"{k}={v}" for k, v in settings.items()])


def test_finetune_reads_exponent_learning_rates(setup):
    assert finetune_config(setup, target="t.jsonl", lr="1e-4").lr == 1e-4  # YAML 1.1 reads 1e-4 as a string
    with pytest.raises(DselError, match="'lr' should be float"):
        finetune_config(setup, target="t.jsonl", lr="fast")


def test_finetune_refuses_another_tokenizer(setup):
    main(["tokenize", f"input={setup / 'target.jsonl'}", f"output={setup / 'other'}", "vocab_size=300"])
    with pytest.raises(DselError, match="other.model: not the tokenizer the prior"):
        run_finetune(finetune_config(setup, target=setup / "target.jsonl", tokenizer=setup / "other.model"))
    with pytest.raises(DselError, match="prior: model has (vocab_size|tokenizer_sha256)=.* but data .*other"):
        run_finetune(finetune_config(setup, target=setup / "other"))


def test_finetune_needs_a_tokenizer_for_text(setup):
    model, _ = load_model(setup / "prior")
    save_model(setup / "bare", model, {})
    with pytest.raises(DselError, match="bare: checkpoint records no tokenizer"):
        run_finetune(finetune_config(setup, prior=setup / "bare", target=setup / "target.jsonl"))


def tiny_train_settings(setup, steps):
    vocab = read_meta(setup / "corpus")["vocab_size"]
    model = {"vocab_size": vocab, "seq_len": 32, "n_layer": 1, "n_head": 2, "d_model": 32}
    return ["train.preset=tiny", f"train.steps={steps}", "train.batch_size=4", "train.lr=3e-3", "train.device=cpu"] + [
        f"train.model.{k}={v}" for k, v in model.items()]


def test_train_prior_refuses_data_and_out_in_train(setup):

    cfg = load_config(ColorTrainPriorConfig, None, [f"corpus={setup / 'corpus'}", f"out={setup / 'x'}", "train.data=[a]"])
    with pytest.raises(DselError, match="train.data: set by color train-prior"):
        run_train_prior(cfg)
    cfg = load_config(ColorTrainPriorConfig, None, [f"corpus={setup / 'corpus'}", f"out={setup / 'x'}", "fraction=0"])
    with pytest.raises(DselError, match="fraction must be in"):
        run_train_prior(cfg)


def test_color_score_writes_the_scorers_values(setup):
    cond = setup / "cond-target"
    if not cond.is_dir():
        main(["color", "finetune", f"prior={setup / 'prior'}", f"target={setup / 'target'}", f"out={cond}", "device=cpu"])
    out = setup / "scores"
    main(["color", "score", f"corpus={setup / 'corpus'}", f"prior={setup / 'prior'}", f"cond={cond}", f"out={out}",
          "window=24", "batch_size=5", "micro_batch=4", "device=cpu"])
    table = pq.read_table(out / "scores.parquet").to_pydict()
    windows = Windows(IndexedDataset(setup / "corpus"), 24)
    assert table["window"] == list(range(len(windows)))
    scorer = ColorScorer({name: load_model(path)[0] for name, path in (("prior", setup / "prior"), ("cond", cond))},
                         micro_batch=4)
    direct = scorer(torch.from_numpy(windows.batch(np.arange(len(windows)))))
    for column in ("loss_prior", "loss_cond", "color"):  # same micro-batches -> the same bits
        assert np.array_equal(np.asarray(table[column], dtype=np.float32), direct[column].numpy()), column


def test_color_score_refuses_a_window_longer_than_the_context(setup):
    cfg = load_config(ColorScoreConfig, None, [f"corpus={setup / 'corpus'}", f"prior={setup / 'prior'}",
                                                f"out={setup / 'unused'}", "window=130", "device=cpu"])
    with pytest.raises(DselError, match="prior: window of 130 tokens .* longer than the context"):
        run_score(cfg)


def test_pipeline_ranks_target_topic_documents_first(setup):
    """train-prior -> finetune -> score through the CLI: windows of TOPIC documents get higher CoLoR."""
    run = setup / "pipeline"
    main(["color", "train-prior", f"corpus={setup / 'corpus'}", f"out={run / 'prior'}", "fraction=0.5", "seed=3",
          *tiny_train_settings(setup, 60)])
    corpus, sliced = IndexedDataset(setup / "corpus"), IndexedDataset(run / "prior/slice")
    assert sliced.num_documents == 40  # a random half of the documents, each one of the corpus
    assert {tuple(sliced[i]) for i in range(len(sliced))} <= {tuple(corpus[i]) for i in range(len(corpus))}
    _, prior_meta = load_model(run / "prior/model")
    assert prior_meta["tokenizer_sha256"] == read_meta(run / "prior/slice")["tokenizer_sha256"] == \
        read_meta(setup / "corpus")["tokenizer_sha256"]
    losses = [row["loss"] for row in map(json.loads, (run / "prior/log.jsonl").read_text().splitlines()) if "loss" in row]
    assert len(losses) == 60 and losses[-1] < losses[0]
    main(["color", "finetune", f"prior={run / 'prior/model'}", f"target={setup / 'target.jsonl'}", f"out={run / 'cond'}",
          "epochs=2", "batch_size=4", "device=cpu"])
    main(["color", "score", f"corpus={setup / 'corpus'}", f"prior={run / 'prior/model'}", f"cond={run / 'cond'}",
          f"out={run / 'scores'}", "window=8", "device=cpu"])
    table = pq.read_table(run / "scores" / "scores.parquet").to_pydict()
    color, on_topic = np.asarray(table["color"]), np.asarray(table["doc"]) % 2 == 0
    assert color[on_topic].mean() > color[~on_topic].mean() + 0.1


def test_color_score_reads_dolma_memmaps_and_checks_their_tokenizer(setup):
    """A headerless .bin with its meta scores like the Megatron dataset; another tokenizer is refused."""
    stream = IndexedDataset(setup / "corpus").stream
    stream.astype(np.uint16).tofile(setup / "flat.bin")
    meta = read_meta(setup / "corpus")
    write_meta(setup / "flat", meta)
    out = setup / "flat-scores"
    main(["color", "score", f"corpus={setup / 'flat.bin'}", f"prior={setup / 'prior'}", f"out={out}", "window=24",
          "device=cpu"])
    table = pq.read_table(out / "scores.parquet").to_pydict()
    windows = torch.from_numpy(stream[: len(stream) // 24 * 24].astype(np.int64).reshape(-1, 24))
    want = ColorScorer({"prior": load_model(setup / "prior")[0]})(windows)["loss_prior"].numpy()
    assert np.array_equal(np.asarray(table["loss_prior"], dtype=np.float32), want)

    write_meta(setup / "flat", {**meta, "tokenizer_sha256": "0" * 64})
    cfg = load_config(ColorScoreConfig, None, [f"corpus={setup / 'flat.bin'}", f"prior={setup / 'prior'}",
                                                f"out={setup / 'unused'}", "device=cpu"])
    with pytest.raises(DselError, match="prior: model has tokenizer_sha256=.* but data .*flat has"):
        run_score(cfg)
