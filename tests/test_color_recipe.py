"""CoLoR-Filter's official recipe in dsel: OLMo's schedule, z-loss, QK-LayerNorm, bias-free LayerNorm,
the official fine-tune rows, and selections that train window by window."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dsel.color.finetune import finetune_model
from dsel.color.target import epoch_batches, sft_rows, stream_chunks
from dsel.data.indexed import IndexedDataset
from dsel.data.loader import GPTSampleLoader
from dsel.data.meta import write_meta
from dsel.data.windows import Windows
from dsel.errors import DselError
from dsel.models.config import preset
from dsel.models.gpt import GPT
from dsel.select.commands import SelectConfig, run_select
from dsel.train.schedule import lr_at
from dsel.train.torch_backend import training_samples
from _train_util import TINY_MODEL, tiny_config, write_counting_dataset


def official_cos_with_warmup(k, max_steps, lr, warmup, alpha_f=0.1):
    """color-filter-olmo olmo/optim.py CosWithWarmup.get_lr at global_step k (incremented before the step),
    written out from the official code: warmup from warmup_min_lr = 0.1 * lr."""
    eta_min = lr * alpha_f
    if k < warmup:
        warmup_min_lr = lr * 0.10
        return warmup_min_lr + (lr - warmup_min_lr) * min(k, warmup) / warmup
    if k >= max_steps:
        return eta_min
    return eta_min + (lr - eta_min) * (1 + math.cos(math.pi * (k - warmup) / (max_steps - warmup))) / 2


def test_finetune_schedule_is_the_official_formula(monkeypatch):
    """The lr each fine-tune step actually runs with equals OLMo's at update k = step + 1."""
    seen = []
    step = torch.optim.AdamW.step
    monkeypatch.setattr(torch.optim.AdamW, "step", lambda self, *a, **k: (seen.append(self.param_groups[0]["lr"]),
                                                                           step(self, *a, **k))[1])
    torch.manual_seed(0)
    model = GPT(preset("tiny", **TINY_MODEL))
    rows = [np.arange(i, i + 17) % 64 for i in range(30 * 2)]
    batches = list(epoch_batches(rows, 2, 0, seed=0))
    finetune_model(model, batches, len(batches), lr=1e-3, warmup=5, min_lr_ratio=0.1, schedule="olmo")
    assert len(seen) == 30
    for s in (0, 1, 3, 4, 5, 6, 17, 28, 29):
        assert seen[s] == pytest.approx(official_cos_with_warmup(s + 1, 30, 1e-3, 5)), s
    assert seen[0] == pytest.approx(1e-4 + 9e-4 / 5) and seen[-1] == pytest.approx(1e-4)
    # the paper's downstream run: 100 warmup steps of a longer fine-tune
    for s in (0, 49, 98, 99, 100, 500, 998, 999):
        assert lr_at(s, 1000, 1e-3, 100, 0.1, "olmo") == pytest.approx(official_cos_with_warmup(s + 1, 1000, 1e-3, 100))


def naive_forward(model: GPT, tokens: torch.Tensor) -> torch.Tensor:
    """Logits of a 1-group GPT written out head by head, with OLMo's full-width QK LayerNorm."""
    cfg = model.config
    hd, H = cfg.head_dim, cfg.n_head

    def layer_norm(x, norm):
        out = (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + cfg.norm_eps)
        out = out * norm.weight
        return out + norm.bias if norm.bias is not None else out

    def rope(x):  # x [L, hd]
        inv = 1.0 / (cfg.rope_base ** (torch.arange(0, hd, 2).float() / hd))
        ang = torch.outer(torch.arange(x.shape[0]).float(), inv)
        ang = torch.cat([ang, ang], -1)
        half = hd // 2
        rotated = torch.cat([-x[:, half:], x[:, :half]], -1)
        return x * ang.cos() + rotated * ang.sin()

    x = model.embedding.word_embeddings.weight[tokens[0]]
    L = x.shape[0]
    for layer in model.decoder.layers:
        att = layer.self_attention
        h = layer_norm(x, layer.input_layernorm)
        qkv = h @ att.linear_qkv.weight.T  # one group: [q heads | k | v]
        q, k, v = qkv[:, : H * hd], qkv[:, H * hd: (H + 1) * hd], qkv[:, (H + 1) * hd:]
        if cfg.qk_layernorm:
            q, k = layer_norm(q, att.q_layernorm), layer_norm(k, att.k_layernorm)
        heads = []
        for i in range(H):
            qi, ki = rope(q[:, i * hd:(i + 1) * hd]), rope(k)
            scores = qi @ ki.T / math.sqrt(hd) + torch.triu(torch.full((L, L), float("-inf")), 1)
            heads.append(torch.softmax(scores, -1) @ v)
        x = x + torch.cat(heads, -1) @ att.linear_proj.weight.T
        h = layer_norm(x, layer.pre_mlp_layernorm)
        x = x + F.gelu(h @ layer.mlp.linear_fc1.weight.T) @ layer.mlp.linear_fc2.weight.T
    return layer_norm(x, model.decoder.final_layernorm) @ model.head_weight.T


@pytest.mark.parametrize("qk, norm_bias", [(True, False), (False, True), (True, True)])
def test_qk_layernorm_and_bias_free_layernorm_match_a_naive_model(qk, norm_bias):
    torch.manual_seed(0)
    model = GPT(preset("tiny", **TINY_MODEL, n_query_groups=1, qk_layernorm=qk, norm_bias=norm_bias))
    for p in model.parameters():  # move norms off their 1/0 init so their weights and biases matter
        p.data.add_(0.1 * torch.randn_like(p))
    names = [n for n, _ in model.named_parameters()]
    assert any("q_layernorm" in n for n in names) == qk
    assert any("layernorm.bias" in n for n in names) == norm_bias
    tokens = torch.randint(0, 64, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens)[0], naive_forward(model, tokens), atol=1e-4, rtol=1e-4)


def test_z_loss_is_olmo_softmax_auxiliary_loss():
    """loss(z_loss=c) = CE + c * mean(logsumexp(logits)^2), with the logits materialised as the reference."""
    torch.manual_seed(0)
    model = GPT(preset("tiny", **TINY_MODEL))
    tokens = torch.randint(0, 64, (3, 17))
    logits = model(tokens[:, :-1])
    reference = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()) + 1e-2 * logits.logsumexp(-1).pow(2).mean()
    loss = model.loss(tokens, z_loss=1e-2)
    torch.testing.assert_close(loss, reference, atol=1e-5, rtol=1e-5)
    grad = torch.autograd.grad(loss, model.head_weight)[0]
    ref_grad = torch.autograd.grad(reference, model.head_weight)[0]
    torch.testing.assert_close(grad, ref_grad, atol=1e-5, rtol=1e-4)


def test_sft_rows_are_the_official_collate():
    """No EOS, the last `length` tokens of a long example, right padding with pad targets in the loss."""
    rows = sft_rows([np.array([5, 6, 7]), np.arange(10, 20)], 6, pad_id=1)
    assert [r.tolist() for r in rows] == [[5, 6, 7, 1, 1, 1], [14, 15, 16, 17, 18, 19]]
    tokens, mask = next(epoch_batches(rows, 2, 0, seed=0, drop_last=True))
    assert mask.all() and tokens.shape == (2, 6)
    assert list(epoch_batches(rows * 2 + rows[:1], 2, 0, seed=0, drop_last=True)).__len__() == 2
    chunks = stream_chunks([np.array([1, 2, 0]), np.array([3, 4, 5, 0])], 3)
    assert [c.tolist() for c in chunks] == [[1, 2, 0], [3, 4, 5]]


def selected_dataset(tmp_path, window: int):
    """A random half of the windows of a counting corpus, through `dsel select` (materialised)."""
    corpus = write_counting_dataset(tmp_path / "corpus", num_docs=60)
    write_meta(corpus, {"vocab_size": 64, "tokenizer": "none", "tokenizer_sha256": "0", "dtype": "uint16",
                        "eod_id": 0})
    n = len(Windows(IndexedDataset(corpus), window))
    np.save(tmp_path / "scores.npy", np.random.default_rng(0).normal(size=n))
    out = run_select(SelectConfig(scores=str(tmp_path / "scores.npy"), corpus=corpus, window=window, method="topk",
                                  fraction=0.5, out=str(tmp_path / "select")))
    return str(out / "data" / "selected"), Windows(IndexedDataset(corpus), window), np.load(out / "indices.npy")


def test_every_training_sample_lies_inside_one_selected_window(tmp_path):
    data, corpus, kept = selected_dataset(tmp_path, window=TINY_MODEL["seq_len"] + 1)
    cfg = tiny_config(tmp_path, [data], steps=40, batch_size=4)
    samples = training_samples(cfg, TINY_MODEL["seq_len"], 64, 160)
    rows = samples.batch(np.arange(160))
    for i, row in enumerate(rows):  # sample i is exactly the corpus window the selection kept at its position
        np.testing.assert_array_equal(row, corpus.tokens(int(kept[samples.window_of([i])[0]])))
    assert sorted(samples.window_of(np.arange(len(kept)))) == list(range(len(kept)))  # one pass: each window once
    selected = {tuple(corpus.tokens(int(i)).tolist()) for i in kept}
    # megatron's packing of the same file (seq_len-token stride, shared token) joins windows: the test can fail
    packed = GPTSampleLoader(IndexedDataset(data), TINY_MODEL["seq_len"], 1, cfg.seed, num_samples=160, prefetch=0)
    assert sum(tuple(r.tolist()) in selected for r in packed.batch(np.arange(160))) < 16


def test_a_selection_of_another_window_length_is_refused(tmp_path):
    data, _, _ = selected_dataset(tmp_path, window=33)
    with pytest.raises(DselError, match="33-token windows cannot train as selected with seq_len=16"):
        training_samples(tiny_config(tmp_path, [data]), 16, 64, 32)


def test_megatron_backend_refuses_the_torch_only_recipe_options(tmp_path):
    for extra in (dict(z_loss=1e-4), dict(arch={**TINY_MODEL, "qk_layernorm": True}),
                  dict(arch={**TINY_MODEL, "norm_bias": False})):
        with pytest.raises(DselError, match="torch-backend features"):
            tiny_config(tmp_path, ["d"], backend="megatron", **extra)
