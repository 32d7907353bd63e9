"""`dsel color finetune` (and friends) through the CLI on a corpus made by `dsel tokenize`."""
import json
import random

import pytest
import torch

from dsel.cli import main
from dsel.color.commands import ColorFinetuneConfig, run_finetune
from dsel.color.scorer import mean_token_losses
from dsel.color.target import padded_batch
from dsel.config import load_config
from dsel.data.indexed import IndexedDataset
from dsel.data.meta import read_meta
from dsel.errors import DselError
from dsel.models.checkpoint import load_model, save_model
from _color_util import tiny_gpt

TOPIC = "the cat sat on a mat and the dog ran to the park".split()
OTHER = "markets rallied as bond yields fell while central banks held rates".split()


def write_jsonl(path, words, n, seed):
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            f.write(json.dumps({"text": " ".join(rng.choices(words, k=rng.randint(8, 30)))}) + "\n")
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tokenized two-topic corpus, a target jsonl of one topic, and a tiny random prior."""
    root = tmp_path_factory.mktemp("color")
    write_jsonl(root / "corpus.jsonl", TOPIC + OTHER, 80, seed=0)
    write_jsonl(root / "target.jsonl", TOPIC, 24, seed=1)
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
          "batch_size=4", "device=cpu"])
    _, meta = load_model(out)
    assert meta["tokenizer_sha256"] == read_meta(setup / "corpus")["tokenizer_sha256"]
    assert meta["finetune"]["steps"] == 3 * 6 and meta["finetune"]["last_loss"] < meta["finetune"]["first_loss"]
    assert target_loss(out, setup / "target") < target_loss(setup / "prior", setup / "target") - 0.3


def finetune_config(setup, **settings):
    settings = {"prior": setup / "prior", "out": setup / "unused", "device": "cpu", **settings}
    return load_config(ColorFinetuneConfig, None, [f"{k}={v}" for k, v in settings.items()])


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
    return [f"train.preset=tiny", f"train.steps={steps}", "train.batch_size=4", "train.lr=0.003", "train.device=cpu"] + [
        f"train.model.{k}={v}" for k, v in model.items()]


def test_train_prior_trains_on_a_random_slice(setup):
    pytest.importorskip("dsel.train.torch_backend")  # until the train stage lands on main
    out = setup / "prior-run"
    main(["color", "train-prior", f"corpus={setup / 'corpus'}", f"out={out}", "fraction=0.5", "seed=3",
          *tiny_train_settings(setup, 30)])
    corpus, sliced = IndexedDataset(setup / "corpus"), IndexedDataset(out / "slice")
    assert sliced.num_documents == 40
    docs = {tuple(corpus[i].tolist()) for i in range(len(corpus))}
    assert all(tuple(sliced[i].tolist()) in docs for i in range(len(sliced)))
    assert read_meta(out / "slice")["tokenizer_sha256"] == read_meta(setup / "corpus")["tokenizer_sha256"]
    model, meta = load_model(out / "model")
    assert model.config.d_model == 32 and meta["tokenizer_sha256"] == read_meta(setup / "corpus")["tokenizer_sha256"]
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 30 and losses[-1] < losses[0]


def test_train_prior_refuses_data_and_out_in_train(setup):
    pytest.importorskip("dsel.train.torch_backend")  # until the train stage lands on main
    from dsel.color.commands import ColorTrainPriorConfig, run_train_prior

    cfg = load_config(ColorTrainPriorConfig, None, [f"corpus={setup / 'corpus'}", f"out={setup / 'x'}", "train.data=[a]"])
    with pytest.raises(DselError, match="train.data: set by color train-prior"):
        run_train_prior(cfg)
    cfg = load_config(ColorTrainPriorConfig, None, [f"corpus={setup / 'corpus'}", f"out={setup / 'x'}", "fraction=0"])
    with pytest.raises(DselError, match="fraction must be in"):
        run_train_prior(cfg)
