"""dsel GPT <-> megatron-core GPTModel weight conversion: equal logits both ways, TP/PP shard round trips."""
import dataclasses

import pytest
import torch

pytest.importorskip("megatron.core")
gpt_module = pytest.importorskip("dsel.models.gpt")

from dsel.errors import DselError  # noqa: E402
from dsel.models.config import GPTConfig  # noqa: E402
from dsel.train.megatron import convert, model as megatron_model, shim  # noqa: E402

CONFIGS = {
    "gelu-layernorm-bias-untied": GPTConfig(vocab_size=128, seq_len=16, n_layer=2, n_head=4, d_model=32, bias=True),
    "swiglu-rmsnorm-tied-gqa": GPTConfig(vocab_size=128, seq_len=16, n_layer=2, n_head=4, n_query_groups=2, d_model=32,
                                         activation="swiglu", norm="rmsnorm", tie_embeddings=True, ffn_hidden=48),
}


@pytest.fixture(scope="module")
def single_rank(tmp_path_factory):
    """A one-process gloo group with megatron's parallel state (TP=PP=1)."""
    if not torch.distributed.is_initialized():
        store = tmp_path_factory.mktemp("dist") / "store"
        torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    megatron_model.init_parallel(1, 1)
    yield
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    torch.distributed.destroy_process_group()
    shim.deactivate()


def megatron_logits(model, tokens):
    """Logits of a megatron model (on the GPU when there is one) for CPU tokens, back on the CPU."""
    tokens = tokens.to(next(model.parameters()).device)
    return model(tokens, megatron_model.position_ids(tokens), None).float().cpu()


def megatron_shard(state, config):
    """A one-rank megatron state_dict (TE names when megatron builds with Transformer Engine)."""
    return convert.to_megatron(state, config, te=megatron_model.use_transformer_engine())


def perturbed(state):
    """Non-trivial norms and biases, so the test sees them."""
    return {k: v + 0.1 * torch.randn_like(v) if "layernorm" in k or k.endswith("bias") else v
            for k, v in state.items()}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_dsel_to_megatron_same_logits(single_rank, name):
    config = CONFIGS[name]
    torch.manual_seed(0)
    gpt = gpt_module.GPT(config)
    gpt.load_state_dict(perturbed(gpt.state_dict()))
    megatron_model.seed_everything(1)
    model = megatron_model.build_model(config)
    convert.load_shard(model, megatron_shard(gpt.state_dict(), config))
    tokens = torch.randint(0, config.vocab_size, (3, config.seq_len))
    with torch.no_grad():
        torch.testing.assert_close(megatron_logits(model, tokens), gpt(tokens), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_megatron_to_dsel_same_logits(single_rank, name):
    config = CONFIGS[name]
    megatron_model.seed_everything(2)
    model = megatron_model.build_model(config)
    model.load_state_dict(perturbed(model.state_dict()), strict=False)
    gpt = gpt_module.GPT(config)
    gpt.load_state_dict(convert.from_megatron([[convert.shard_state(model)]], config))
    tokens = torch.randint(0, config.vocab_size, (3, config.seq_len))
    with torch.no_grad():
        torch.testing.assert_close(gpt(tokens), megatron_logits(model, tokens), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2), (2, 2)])
@pytest.mark.parametrize("te", [False, True])
def test_shards_round_trip(name, tp, pp, te):
    config = CONFIGS[name]
    state = gpt_module.GPT(config).state_dict()
    shards = [[convert.to_megatron(state, config, t, tp, p, pp, te=te) for t in range(tp)] for p in range(pp)]
    back = convert.from_megatron(shards, config)
    assert back.keys() == state.keys()
    for key in state:
        torch.testing.assert_close(back[key], state[key], atol=0, rtol=0)
    stage_layers = {k.split(".")[2] for k in shards[-1][0] if k.startswith("decoder.layers.")}
    assert stage_layers == {str(i) for i in range(config.n_layer // pp)}  # renumbered from 0 on every stage


def test_tensor_parallel_slices_follow_megatron_layout():
    """Rank r of 2 gets whole query groups of qkv and [gate_r; up_r] of a swiglu fc1."""
    config = CONFIGS["swiglu-rmsnorm-tied-gqa"]
    state = gpt_module.GPT(config).state_dict()
    qkv = state["decoder.layers.0.self_attention.linear_qkv.weight"]
    fc1 = state["decoder.layers.0.mlp.linear_fc1.weight"]
    gate, up = fc1.chunk(2)
    rank1 = convert.to_megatron(state, config, tp_rank=1, tp=2)
    group_rows = qkv.shape[0] // config.kv_heads
    torch.testing.assert_close(rank1["decoder.layers.0.self_attention.linear_qkv.weight"], qkv[group_rows:])
    torch.testing.assert_close(rank1["decoder.layers.0.mlp.linear_fc1.weight"], torch.cat([gate[24:], up[24:]]))
    torch.testing.assert_close(rank1["decoder.layers.0.self_attention.linear_proj.weight"],
                               state["decoder.layers.0.self_attention.linear_proj.weight"][:, 16:])
    embedding = state["embedding.word_embeddings.weight"]
    torch.testing.assert_close(rank1["embedding.word_embeddings.weight"], embedding[64:])


def test_te_names_and_tied_output_on_last_stage():
    config = CONFIGS["swiglu-rmsnorm-tied-gqa"]
    state = gpt_module.GPT(config).state_dict()
    last = convert.to_megatron(state, config, pp_rank=1, pp=2, te=True)
    assert "decoder.layers.0.self_attention.linear_qkv.layer_norm_weight" in last
    assert "decoder.layers.0.mlp.linear_fc1.layer_norm_weight" in last
    assert not any(k.endswith("input_layernorm.weight") for k in last)
    torch.testing.assert_close(last["output_layer.weight"], state["embedding.word_embeddings.weight"])
    assert "embedding.word_embeddings.weight" not in last


def test_shape_mismatch_is_one_line_error(single_rank):
    config = CONFIGS["gelu-layernorm-bias-untied"]
    model = megatron_model.build_model(config)
    state = gpt_module.GPT(dataclasses.replace(config, d_model=64)).state_dict()
    with pytest.raises(DselError, match="word_embeddings.weight has shape"):
        convert.load_shard(model, megatron_shard(state, config))
