"""Hugging Face tokenizers and transformers models in dsel: tokenize, train, export and import, checked
against the `tokenizers` library and transformers' own models (equal ids, equal fp32 logits)."""
import gzip
import hashlib
import itertools
import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

from dsel.cli import main
from dsel.data.indexed import IndexedDataset
from dsel.data.meta import read_meta
from dsel.eval.lm_eval import TASKS_DIR
from dsel.models.checkpoint import load_model, save_model
from dsel.models.config import PRESETS, GPTConfig, settings_beyond_core
from dsel.models.gpt import GPT

BUNDLED = Path(__file__).resolve().parent.parent / "dsel" / "data" / "bundled"
EOS = "<|endoftext|>"


def bundled_texts(name: str = "pool", limit: int | None = None) -> list[str]:
    with gzip.open(BUNDLED / f"{name}.jsonl.gz", "rt") as f:
        return [json.loads(line)["text"] for line in itertools.islice(f, limit)]


def train_bpe(path: Path, texts: list[str], vocab_size: int = 300) -> Path:
    """A byte-level BPE tokenizer.json trained with the `tokenizers` library, EOS as its one special token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(path))
    return path


def cli_error(capsys, argv: list[str]) -> str:
    """Run the CLI expecting exit 2; its one stderr line."""
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert "Traceback" not in "\n".join(lines)
    return lines[-1]


def randomised(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter (norm weights and biases too) drawn at random, so a wrong mapping cannot hide."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.3)
    return model


def hf_logits(folder, tokens: torch.Tensor) -> torch.Tensor:
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, trust_remote_code=True).eval()
    with torch.no_grad():
        return model(tokens).logits


@pytest.fixture(scope="module")
def bpe(tmp_path_factory) -> Path:
    return train_bpe(tmp_path_factory.mktemp("bpe") / "tokenizer.json", bundled_texts(limit=400))


@pytest.fixture(scope="module")
def e2e(tmp_path_factory):
    """Must-show: a BPE tokenizer.json -> dsel tokenize (bundled pool) -> dsel train (vocab from data) -> export."""
    root = tmp_path_factory.mktemp("e2e")
    tok = train_bpe(root / "tokenizer.json", bundled_texts())
    main(["tokenize", f"input={BUNDLED / 'pool.jsonl.gz'}", f"output={root / 'pool'}", f"tokenizer={tok}", "workers=2"])
    main(["train", f"data=[{root / 'pool'}]", f"out={root / 'run'}", "preset=tiny", "steps=3", "batch_size=4",
          "device=cpu"])
    main(["export", "hf", f"model={root / 'run' / 'model'}", f"out={root / 'hf'}"])
    return root, tok


def test_hf_tokenizer_tokenize_train_export_same_logits(e2e):
    from tokenizers import Tokenizer

    root, tok = e2e
    reference = Tokenizer.from_file(str(tok))
    eos = reference.token_to_id(EOS)
    meta = read_meta(root / "pool")
    assert (meta["tokenizer_kind"], meta["eod_id"], meta["vocab_size"]) == ("hf", eos, reference.get_vocab_size())
    assert meta["tokenizer_sha256"] == hashlib.sha256(tok.read_bytes()).hexdigest()
    dataset = IndexedDataset(root / "pool")
    texts = bundled_texts()
    assert len(dataset) == len(texts)
    for i in (0, 1, len(texts) - 1):
        np.testing.assert_array_equal(dataset[i], reference.encode(texts[i], add_special_tokens=False).ids + [eos])

    model, ckpt_meta = load_model(root / "run" / "model")
    assert model.config.vocab_size == 384  # the tokenizer's 300 padded to a multiple of 128
    assert ckpt_meta["tokenizer_sha256"] == meta["tokenizer_sha256"]
    tokens = torch.from_numpy(dataset.stream[:2 * 48].astype(np.int64).reshape(2, 48))
    with torch.no_grad():
        ours = model(tokens)
    torch.testing.assert_close(hf_logits(root / "hf", tokens), ours, atol=1e-5, rtol=0)
    auto = transformers.AutoTokenizer.from_pretrained(root / "hf")
    assert auto.encode(texts[3], add_special_tokens=False) == list(dataset[3][:-1])
    assert auto.eos_token_id == eos


SHRUNK_PRESETS = {name: replace(cfg, vocab_size=320, seq_len=32, n_layer=2, d_model=8 * cfg.n_head)
                  for name, cfg in PRESETS.items()}
PRESET_ARCHS = dict(SHRUNK_PRESETS)
PRESET_ARCHS["llama-gqa"] = GPTConfig(vocab_size=320, seq_len=32, n_layer=2, n_head=4, n_query_groups=2, d_model=32,
                                      norm="rmsnorm", activation="swiglu", rope_base=500000.0)
PRESET_ARCHS["llama-bias-tied"] = replace(PRESET_ARCHS["llama-gqa"], bias=True, tie_embeddings=True, n_query_groups=None)
PRESET_ARCHS["neox-bias-tied"] = replace(PRESET_ARCHS["tiny"], bias=True, tie_embeddings=True)
# no native class: GPT-NeoX has no GQA; the CoLoR settings with GQA, biases and a tied head
PRESET_ARCHS["layernorm-gqa-tied"] = replace(PRESET_ARCHS["tiny"], n_query_groups=2, tie_embeddings=True)
PRESET_ARCHS["color-gqa-bias"] = replace(PRESET_ARCHS["color-150m"], n_query_groups=4, bias=True)
PRESET_ARCHS["layernorm-swiglu"] = replace(PRESET_ARCHS["tiny"], activation="swiglu")
# which transformers class each exports as (the mapping documented in dsel/models/hf.py)
EXPORTED_CLASS = {name: "GPTNeoXForCausalLM" for name in PRESET_ARCHS}
EXPORTED_CLASS.update({"llama-gqa": "LlamaForCausalLM", "llama-bias-tied": "LlamaForCausalLM",
                       "color-150m": "DselForCausalLM", "color-1b": "DselForCausalLM",
                       "layernorm-gqa-tied": "DselForCausalLM", "color-gqa-bias": "DselForCausalLM",
                       "layernorm-swiglu": "DselForCausalLM"})


def test_every_preset_has_an_expected_export_class():
    assert set(PRESETS) <= set(EXPORTED_CLASS)


@pytest.mark.parametrize("name", sorted(PRESET_ARCHS))
def test_export_and_import_give_equal_logits(name, bpe, tmp_path):
    """Every preset's architecture (sizes shrunk) and the other mappings: transformers' logits equal dsel's in
    fp32, and importing the export gives back the same dsel model. Architectures no native class computes
    export as DselForCausalLM with its modeling code in the folder (loaded with trust_remote_code=True)."""
    config = PRESET_ARCHS[name]
    model = randomised(GPT(config), seed=len(name))
    save_model(tmp_path / "ckpt", model, {"tokenizer": str(bpe)})
    main(["export", "hf", f"model={tmp_path / 'ckpt'}", f"out={tmp_path / 'hf'}"])
    hf_config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert hf_config["architectures"] == [EXPORTED_CLASS[name]]
    assert (tmp_path / "hf" / "model.safetensors").is_file()
    remote = EXPORTED_CLASS[name] == "DselForCausalLM"
    assert (tmp_path / "hf" / "modeling_dsel.py").is_file() == remote == ("auto_map" in hf_config)
    tokens = torch.randint(0, config.vocab_size, (2, config.seq_len), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model(tokens)
    torch.testing.assert_close(hf_logits(tmp_path / "hf", tokens), ours, atol=1e-5, rtol=0)
    imported, meta = load_model(tmp_path / "hf")
    assert imported.config == replace(config, ffn_hidden=config.ffn_size)  # the import states the MLP width
    with torch.no_grad():
        torch.testing.assert_close(imported(tokens), ours, atol=1e-6, rtol=0)
    assert meta["tokenizer"] == str(bpe)


def test_remote_code_export_generates_like_dsel(bpe, tmp_path):
    """transformers' generate on a DselForCausalLM export, with its KV cache and without, and with a left-padded
    batch, gives dsel's own greedy tokens."""
    from dsel.models.generate import greedy_generate

    config = replace(PRESET_ARCHS["color-gqa-bias"], seq_len=64)
    model = randomised(GPT(config), seed=5).eval()
    save_model(tmp_path / "ckpt", model, {"tokenizer": str(bpe)})
    main(["export", "hf", f"model={tmp_path / 'ckpt'}", f"out={tmp_path / 'hf'}"])
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", trust_remote_code=True,
                                                           dtype=torch.float32).eval()
    prompts = [[5, 17, 250, 3, 99, 41, 7, 8, 12], [60, 61, 62, 63]]
    settings = dict(max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)
    expected = [greedy_generate(model, p, 12, stop=lambda ids: False) for p in prompts]
    with torch.no_grad():
        for use_cache in (True, False):
            out = hf.generate(torch.tensor([prompts[0]]), use_cache=use_cache, **settings)
            assert out[0, len(prompts[0]):].tolist() == expected[0]
        width = max(map(len, prompts))  # left padding, as batched generation pads decoder-only models
        ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        out = hf.generate(ids, attention_mask=mask, **settings)
    assert [row[width:].tolist() for row in out] == expected


def tiny_transformers_model(kind: str, folder: Path, tokenizer: Path, vocab: int = 300) -> torch.nn.Module:
    """A randomly initialised transformers Llama or GPT-NeoX (sequential residual) saved with its tokenizer."""
    common = dict(vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=64)
    if kind == "llama":
        hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common, num_key_value_heads=2))
    else:
        hf = transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(
            **common, use_parallel_residual=False, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                                    "partial_rotary_factor": 1.0}))
    hf = randomised(hf, seed=3).eval()
    hf.save_pretrained(folder)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tokenizer), eos_token=EOS)
    fast.save_pretrained(folder)
    return hf


@pytest.mark.parametrize("kind", ["llama", "gpt_neox"])
def test_import_transformers_folder_as_model_and_init(kind, bpe, tmp_path):
    """A transformers folder is a model= (same logits) and an init= of dsel train on data of its tokenizer."""
    hf = tiny_transformers_model(kind, tmp_path / "hf", bpe)
    tokens = torch.randint(0, 300, (2, 40), generator=torch.Generator().manual_seed(2))
    model, meta = load_model(tmp_path / "hf")
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), hf(tokens).logits, atol=1e-5, rtol=0)
    saved = (tmp_path / "hf" / "tokenizer.json").read_bytes()  # save_pretrained rewrites the file: its own digest
    assert meta["tokenizer_kind"] == "hf" and meta["tokenizer_sha256"] == hashlib.sha256(saved).hexdigest()

    corpus = tmp_path / "docs.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in bundled_texts(limit=60)))
    main(["tokenize", f"input={corpus}", f"output={tmp_path / 'data'}", f"tokenizer={tmp_path / 'hf'}", "workers=1"])
    main(["train", f"data=[{tmp_path / 'data'}]", f"out={tmp_path / 'ft'}", f"init={tmp_path / 'hf'}", "steps=2",
          "batch_size=2", "device=cpu", "lr=1e-4"])
    tuned, _ = load_model(tmp_path / "ft" / "model")
    assert tuned.config.vocab_size == 300 and tuned.config.n_query_groups == (2 if kind == "llama" else None)
    main(["eval", "loss", f"checkpoint={tmp_path / 'hf'}", f"data={{d: {tmp_path / 'data'}}}",
          f"out={tmp_path / 'loss.json'}", "device=cpu", "max_batches=1", "window=17"])
    assert json.loads((tmp_path / "loss.json").read_text())["losses"]["d"]["loss"] > 0


@pytest.mark.parametrize("kind", ["native", "remote-code"])
def test_lm_eval_hf_runs_the_export_offline(kind, e2e, tmp_path):
    """Stock `lm_eval --model hf` on an exported folder, offline, scoring a bundled local task: the trained
    tiny model (GPT-NeoX) and a CoLoR-preset model (DselForCausalLM, trust_remote_code=True)."""
    root, tok = e2e
    folder, model_args = root / "hf", f"pretrained={root / 'hf'},dtype=float32"
    if kind == "remote-code":
        config = replace(PRESET_ARCHS["color-150m"], vocab_size=384, seq_len=64)
        save_model(tmp_path / "ckpt", randomised(GPT(config)), {"tokenizer": str(tok)})
        main(["export", "hf", f"model={tmp_path / 'ckpt'}", f"out={tmp_path / 'hf'}"])
        folder = tmp_path / "hf"
        model_args = f"pretrained={folder},dtype=float32,trust_remote_code=True"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    command = [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args", model_args,
               "--tasks", "dsel_science_facts", "--include_path", str(TASKS_DIR), "--limit", "8", "--device", "cpu",
               "--batch_size", "4", "--output_path", str(tmp_path / "results")]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads(next((tmp_path / "results").rglob("results_*.json")).read_text())
    assert results["n-samples"]["dsel_science_facts"]["effective"] == 8
    assert 0 <= results["results"]["dsel_science_facts"]["acc,none"] <= 1


# ---- bad input: one line, exit 2, nothing written ----

def test_tokenizer_folder_missing_its_file(tmp_path, capsys):
    folder = tmp_path / "tok"
    folder.mkdir()
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": EOS}))
    corpus = tmp_path / "c.jsonl"
    corpus.write_text('{"text": "hello"}\n')
    line = cli_error(capsys, ["tokenize", f"input={corpus}", f"out={tmp_path / 'out' / 'x'}", f"tokenizer={folder}"])
    assert f"{folder}: tokenizer folder has no tokenizer.json" in line
    assert not (tmp_path / "out").exists()


def test_unsupported_transformers_architecture(bpe, tmp_path, capsys):
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=300, n_embd=32, n_layer=1, n_head=4))
    gpt2.save_pretrained(tmp_path / "gpt2")
    line = cli_error(capsys, ["eval", "loss", f"checkpoint={tmp_path / 'gpt2'}", "data={d: nowhere}",
                              f"out={tmp_path / 'loss.json'}"])
    assert "config.json: transformers model_type 'gpt2' is not supported" in line
    pythia = transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(
        vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4))
    pythia.save_pretrained(tmp_path / "pythia")
    line = cli_error(capsys, ["train", "data=[nowhere]", f"out={tmp_path / 'run'}", f"init={tmp_path / 'pythia'}",
                              "steps=1"])
    assert "use_parallel_residual=true" in line
    assert not (tmp_path / "loss.json").exists() and not (tmp_path / "run").exists()


def test_model_and_tokenizer_vocabulary_mismatch(bpe, tmp_path, capsys):
    save_model(tmp_path / "ckpt", GPT(GPTConfig(vocab_size=256, seq_len=16, n_layer=1, n_head=2, d_model=16)), {})
    line = cli_error(capsys, ["export", "hf", f"model={tmp_path / 'ckpt'}", f"out={tmp_path / 'hf'}", f"tokenizer={bpe}"])
    assert f"{bpe}: tokenizer has 300 tokens but model {tmp_path / 'ckpt'} has a vocabulary of 256" in line
    assert not (tmp_path / "hf").exists()


def test_dataset_of_another_tokenizer_is_refused(e2e, tmp_path, capsys):
    """A tokenizer of the same vocabulary size, trained on other text: every command where its tokens meet the
    model refuses them, naming both sides."""
    root, _ = e2e
    other = train_bpe(tmp_path / "other.json", bundled_texts("target"))
    assert read_meta(root / "pool")["vocab_size"] == 300
    corpus = tmp_path / "docs.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in bundled_texts(limit=40)))
    main(["tokenize", f"input={corpus}", f"output={tmp_path / 'other'}", f"tokenizer={other}", "workers=1"])
    assert read_meta(tmp_path / "other")["vocab_size"] == 300
    model = root / "run" / "model"
    commands = {
        "eval": ["eval", "loss", f"checkpoint={model}", f"data={{v: {tmp_path / 'other'}}}", f"out={tmp_path / 'o1.json'}"],
        "train valid": ["train", f"data=[{root / 'pool'}]", f"valid={tmp_path / 'other'}", f"out={tmp_path / 'o2'}",
                        "steps=1", "preset=tiny"],
        "train init": ["train", f"data=[{tmp_path / 'other'}]", f"init={model}", f"out={tmp_path / 'o3'}", "steps=1"],
        "color score": ["color", "score", f"corpus={tmp_path / 'other'}", f"prior={model}", f"out={tmp_path / 'o4'}"],
        "score": ["score", f"corpus={tmp_path / 'other'}", "scorer=color", f"settings={{prior: {model}}}",
                  "window=33", f"out={tmp_path / 'o5'}"],
    }
    for name, argv in commands.items():
        line = cli_error(capsys, argv)
        assert "has tokenizer_sha256=" in line and str(tmp_path / "other") in line, (name, line)
        assert str(root) in line, (name, line)
    assert not any(p.name.startswith("o") for p in tmp_path.iterdir() if p.name not in ("other.json",)
                   and not p.name.startswith("other")), sorted(p.name for p in tmp_path.iterdir())


def test_sentencepiece_model_exports_with_the_same_ids(tmp_path):
    """The default flow (a trained sentencepiece model) exports a tokenizer.json transformers encodes identically."""
    from _eval_util import tiny_checkpoint, tokenized_slice

    meta = tokenized_slice(tmp_path, "pool", docs=200, vocab_size=400)
    model_dir = tiny_checkpoint(tmp_path / "model", {**meta, "vocab_size": 512})
    main(["export", "hf", f"model={model_dir}", f"out={tmp_path / 'hf'}"])
    auto = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    from dsel.data.tokenizer import load_tokenizer

    ours = load_tokenizer(meta["tokenizer"])
    texts = bundled_texts("target", limit=30) + ["Ünïcödé  double  spaces\tand tabs ½ ﬁ", " lead", "emoji 🙂 x"]
    assert [auto.encode(t, add_special_tokens=False) for t in texts] == ours.encode(texts)
    assert auto.eos_token_id == ours.eod_id


def test_readme_tokenize_then_train_works_as_written(tmp_path, monkeypatch):
    """The README's Data and Train command lines, run verbatim (plus a short step count): the model's vocabulary
    comes from the data (the trained tokenizer's, padded to 128), not from the preset."""
    import shlex

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    lines = [line.split("#")[0].strip() for line in readme.splitlines()]
    tokenize = [line for line in lines if line.startswith("dsel tokenize input=") and "://" not in line
                and ("tokenizer=data/pool.model" in line or line.startswith("dsel tokenize input=corpus/*.jsonl.gz "))]
    train = next(line for line in lines if line.startswith("dsel train data=data/pool valid=data/valid"))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "pool.jsonl.gz").write_bytes((BUNDLED / "pool.jsonl.gz").read_bytes())
    for name, source in (("valid.jsonl", BUNDLED / "valid" / "science.jsonl.gz"), ("target.jsonl", BUNDLED / "target.jsonl.gz")):
        with gzip.open(source, "rt") as f:
            (tmp_path / name).write_text(f.read())
    assert len(tokenize) == 3, tokenize
    for line in tokenize:
        main([arg for arg in shlex.split(line)[1:]])
    main(shlex.split(train)[1:] + ["steps=2", "device=cpu"])
    model, _ = load_model(tmp_path / "runs" / "prior" / "model")
    data_vocab = read_meta(tmp_path / "data" / "pool")["vocab_size"]
    assert model.config.vocab_size == -(-data_vocab // 128) * 128 != PRESETS["small-cpu"].vocab_size


def test_one_long_document_trains_a_sentencepiece_model(tmp_path):
    """A corpus of one long single-line document (longer than sentencepiece's 4192-byte sentence limit, which its
    trainer silently drops): its text is cut at whitespace so the tokenizer trains on it."""
    words = bundled_texts(limit=60)
    corpus = tmp_path / "one.jsonl"
    corpus.write_text(json.dumps({"text": " ".join(words)}) + "\n")
    assert len(corpus.read_bytes()) > 10 * 4192
    main(["tokenize", f"input={corpus}", f"output={tmp_path / 'one'}", "vocab_size=600", "workers=1"])
    meta = read_meta(tmp_path / "one")
    assert meta["num_documents"] == 1 and meta["vocab_size"] == 600


def test_no_text_to_train_a_tokenizer_is_one_line(tmp_path, capsys):
    from dsel.data.tokenizer import train_tokenizer
    from dsel.errors import DselError

    with pytest.raises(DselError, match="corpus.jsonl: no text to train the tokenizer on"):
        train_tokenizer(iter(["  \n  "]), tmp_path / "t.model", 100, source="corpus.jsonl")
    assert not (tmp_path / "t.model").exists()
