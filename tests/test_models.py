"""The dsel GPT against a naive re-implementation, its loss paths, the scorer and checkpoints."""
import math
import shutil

import pytest
import torch
import torch.nn.functional as F

from dsel.errors import DselError
from dsel.models.checkpoint import load_model, read_model_config, save_model
from dsel.models.config import GPTConfig, preset
from dsel.models.gpt import GPT
from dsel.models.scorer import Scorer


def small_config(**overrides) -> GPTConfig:
    base = dict(vocab_size=97, seq_len=16, n_layer=2, n_head=4, d_model=32)
    return GPTConfig(**{**base, **overrides})


def naive_logits(model: GPT, tokens: torch.Tensor) -> torch.Tensor:
    """Token by token, head by head: explicit softmax attention and complex-number rotary embeddings."""
    c = model.config
    sd = {k: v.double() for k, v in model.state_dict().items()}
    norm = (lambda x, p: F.rms_norm(x, (c.d_model,), sd[p + ".weight"], c.norm_eps)) if c.norm == "rmsnorm" else (
        lambda x, p: F.layer_norm(x, (c.d_model,), sd[p + ".weight"], sd[p + ".bias"], c.norm_eps))
    b, n = tokens.shape
    hd, groups, per_group = c.head_dim, c.kv_heads, c.n_head // c.kv_heads
    freqs = 1.0 / c.rope_base ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd)

    def rotate(v, pos):  # pairs (i, i + hd/2) rotated by pos * freq_i
        z = torch.complex(v[: hd // 2], v[hd // 2:]) * torch.polar(torch.ones_like(freqs), pos * freqs)
        return torch.cat([z.real, z.imag])

    x = sd["embedding.word_embeddings.weight"][tokens]
    for i in range(c.n_layer):
        p = f"decoder.layers.{i}."
        h = norm(x, p + "input_layernorm")
        qkv = (h @ sd[p + "self_attention.linear_qkv.weight"].T).view(b, n, groups, (per_group + 2) * hd)
        out = torch.zeros(b, n, c.n_head * hd, dtype=torch.float64)
        for bi in range(b):
            for head in range(c.n_head):
                g, j = divmod(head, per_group)
                q = [rotate(qkv[bi, t, g, j * hd:(j + 1) * hd], t) for t in range(n)]
                k = [rotate(qkv[bi, t, g, per_group * hd:(per_group + 1) * hd], t) for t in range(n)]
                v = [qkv[bi, t, g, (per_group + 1) * hd:] for t in range(n)]
                for t in range(n):
                    scores = torch.stack([q[t] @ k[s] / math.sqrt(hd) for s in range(t + 1)])
                    out[bi, t, head * hd:(head + 1) * hd] = sum(w * v[s] for s, w in enumerate(scores.softmax(0)))
        x = x + out @ sd[p + "self_attention.linear_proj.weight"].T
        h = norm(x, p + "pre_mlp_layernorm") @ sd[p + "mlp.linear_fc1.weight"].T
        if c.activation == "swiglu":
            half = h.shape[-1] // 2
            h = F.silu(h[..., :half]) * h[..., half:]
        else:
            h = F.gelu(h)
        x = x + h @ sd[p + "mlp.linear_fc2.weight"].T
    x = norm(x, "decoder.final_layernorm")
    head = sd["embedding.word_embeddings.weight" if c.tie_embeddings else "output_layer.weight"]
    return x @ head.T


@pytest.mark.parametrize("overrides", [
    {},
    {"activation": "swiglu", "norm": "rmsnorm", "n_query_groups": 2},
    {"tie_embeddings": True, "n_query_groups": 1},
])
def test_logits_match_naive_implementation(overrides):
    torch.manual_seed(0)
    model = GPT(small_config(**overrides)).double()
    tokens = torch.randint(0, 97, (2, 7))
    torch.testing.assert_close(model(tokens), naive_logits(model, tokens), rtol=1e-9, atol=1e-9)


def test_parameter_names_follow_megatron_local_spec():
    names = set(GPT(small_config(activation="swiglu")).state_dict())
    assert {"embedding.word_embeddings.weight", "decoder.layers.1.self_attention.linear_qkv.weight",
            "decoder.layers.0.mlp.linear_fc1.weight", "decoder.final_layernorm.bias", "output_layer.weight"} <= names
    c = small_config(n_query_groups=2)
    assert GPT(c).decoder.layers[0].self_attention.linear_qkv.weight.shape == (2 * (2 + 2) * 8, 32)


def test_fused_losses_equal_cross_entropy_of_logits():
    torch.manual_seed(1)
    model = GPT(small_config()).double()
    tokens = torch.randint(0, 97, (3, 9))
    logits = model(tokens[:, :-1])
    expected = F.cross_entropy(logits.transpose(1, 2), tokens[:, 1:], reduction="none")
    torch.testing.assert_close(model.token_losses(tokens), expected.float())
    torch.testing.assert_close(model.sequence_losses(tokens), expected.mean(1).float())
    targets = tokens[:, 1:].clone()
    targets[0, 3:] = -100
    masked = model.sequence_losses(tokens, targets)
    torch.testing.assert_close(masked[0], expected[0, :3].mean().float())


def test_weighted_loss_gradient_is_weighted_sum_of_example_gradients():
    torch.manual_seed(2)
    model = GPT(small_config()).double()
    tokens = torch.randint(0, 97, (3, 8))
    weights = torch.tensor([0.5, 0.0, 2.0], dtype=torch.float64)
    grad = torch.autograd.grad(model.loss(tokens, weights), model.head_weight)[0]
    per_example = [torch.autograd.grad(model.loss(tokens[i:i + 1]), model.head_weight)[0] for i in range(3)]
    torch.testing.assert_close(grad, sum(w * g for w, g in zip(weights, per_example)))
    torch.testing.assert_close(model.loss(tokens), model.sequence_losses(tokens).mean())


def test_attention_is_causal():
    torch.manual_seed(3)
    model = GPT(small_config())
    tokens = torch.randint(0, 97, (1, 10))
    changed = tokens.clone()
    changed[0, 6:] = (changed[0, 6:] + 1) % 97
    torch.testing.assert_close(model.hidden_states(tokens)[:, :6], model.hidden_states(changed)[:, :6])


def test_checkpoint_round_trip(tmp_path):
    torch.manual_seed(4)
    model = GPT(small_config(activation="swiglu"))
    save_model(tmp_path / "ckpt", model, {"tokenizer_sha256": "abc"})
    save_model(tmp_path / "ckpt", model, {"tokenizer_sha256": "abc"})  # overwriting keeps one valid checkpoint
    loaded, meta = load_model(tmp_path / "ckpt")
    assert meta == {"tokenizer_sha256": "abc"} and read_model_config(tmp_path / "ckpt")[0] == "gpt"
    tokens = torch.randint(0, 97, (2, 8))
    torch.testing.assert_close(loaded(tokens), model(tokens))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_checkpoint_errors(tmp_path):
    with pytest.raises(DselError, match="checkpoint directory not found"):
        load_model(tmp_path / "missing")
    save_model(tmp_path / "a", GPT(small_config()))
    save_model(tmp_path / "b", GPT(small_config(d_model=64)))
    shutil.copy(tmp_path / "b" / "model.safetensors", tmp_path / "a" / "model.safetensors")
    with pytest.raises(DselError, match="checkpoint from another architecture: .* has shape"):
        load_model(tmp_path / "a")
    (tmp_path / "a" / "model.safetensors").write_bytes(b"not a checkpoint")
    with pytest.raises(DselError, match="cannot be read"):
        load_model(tmp_path / "a")


def test_checkpoint_of_torch_weights_still_loads(tmp_path):
    """Checkpoints written before safetensors hold model.pt: they load to the same model."""
    torch.manual_seed(3)
    model = GPT(small_config())
    save_model(tmp_path / "new", model)
    assert (tmp_path / "new" / "model.safetensors").is_file() and not (tmp_path / "new" / "model.pt").exists()
    old = tmp_path / "old"
    shutil.copytree(tmp_path / "new", old)
    (old / "model.safetensors").unlink()
    torch.save(model.state_dict(), old / "model.pt")
    tokens = torch.randint(0, model.config.vocab_size, (2, 9))
    torch.testing.assert_close(load_model(old)[0](tokens), model(tokens), rtol=0, atol=0)


def test_scorer_starts_from_gpt_trunk(tmp_path):
    torch.manual_seed(5)
    gpt = GPT(small_config())
    scorer = Scorer.from_gpt(gpt)
    tokens = torch.randint(0, 97, (3, 8))
    torch.testing.assert_close(scorer.trunk.hidden_states(tokens), gpt.hidden_states(tokens))
    expected = scorer.head(gpt.hidden_states(tokens).mean(1)).squeeze(-1)
    torch.testing.assert_close(scorer(tokens), expected)
    save_model(tmp_path / "s", scorer)
    loaded, _ = load_model(tmp_path / "s")
    assert isinstance(loaded, Scorer)
    torch.testing.assert_close(loaded(tokens), scorer(tokens))


def test_presets_validate_and_count_parameters():
    assert abs(preset("pds-160m").num_params() - 162e6) / 162e6 < 0.05
    with pytest.raises(DselError, match="not divisible"):
        GPT(small_config(n_head=5))


def test_pds_example_dots_through_gpt_equal_brute_force_autograd():
    """The PMP backward's per-example grad·lambda runs through the real GPT (forward mode, fp64)."""
    from dsel.pds.functional import FunctionalLM

    torch.manual_seed(6)
    model = GPT(small_config(activation="swiglu", n_query_groups=2)).double()
    lm = FunctionalLM(model)
    params = lm.initial_params()
    vector = {k: torch.randn_like(v) for k, v in params.items()}
    tokens = torch.randint(0, 97, (3, 9))
    _, dots = lm.example_dots(params, tokens, vector)
    for i in range(3):
        grads = torch.autograd.grad(model.loss(tokens[i:i + 1]), [p for _, p in lm.trunk.named_parameters()])
        expected = sum((g * vector[name]).sum() for (name, _), g in zip(lm.trunk.named_parameters(), grads))
        torch.testing.assert_close(dots[i].double(), expected.double(), rtol=1e-6, atol=1e-8)
