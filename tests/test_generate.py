"""KV-cached greedy decoding against rerunning the whole window for every token."""
import pytest
import torch

from dsel.models.config import GPTConfig
from dsel.models.generate import cached_forward, greedy_generate, supports_cache
from dsel.models.gpt import GPT

CONFIGS = {
    "gelu": GPTConfig(vocab_size=97, seq_len=16, n_layer=2, n_head=4, d_model=32),
    "swiglu-gqa-bias": GPTConfig(vocab_size=97, seq_len=16, n_layer=2, n_head=4, n_query_groups=2, d_model=32,
                                 activation="swiglu", norm="rmsnorm", bias=True, tie_embeddings=True),
    # the CoLoR presets' settings beyond the core GPT, with GQA so the key norm's width differs from the query's
    "qk-layernorm-no-norm-bias-gqa": GPTConfig(vocab_size=97, seq_len=16, n_layer=2, n_head=4, n_query_groups=2,
                                               d_model=32, norm_bias=False, qk_layernorm=True),
}


def sharp_model(config: GPTConfig) -> GPT:
    torch.manual_seed(0)
    model = GPT(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.5)
    return model


def rerun_greedy(model, prompt, steps, eos_id=None):
    """The reference: one forward over the last seq_len tokens per generated token."""
    sequence, generated = list(prompt), []
    for _ in range(steps):
        with torch.no_grad():
            token = int(model(torch.tensor([sequence[-model.config.seq_len:]]))[0, -1].argmax())
        if token == eos_id:
            break
        generated.append(token)
        sequence.append(token)
    return generated


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_cached_decoding_matches_rerunning_the_window(name):
    model = sharp_model(CONFIGS[name])
    assert supports_cache(model.config)
    prompt = torch.randint(0, 97, (9,), generator=torch.Generator().manual_seed(1)).tolist()
    # 14 new tokens after 9: the window slides past the 16-token context
    assert greedy_generate(model, prompt, 14, stop=lambda ids: False) == rerun_greedy(model, prompt, 14)
    stop_at = rerun_greedy(model, prompt, 14)[4]
    cut = greedy_generate(model, prompt, 14, stop=lambda ids: False, eos_id=stop_at)
    assert cut == rerun_greedy(model, prompt, 14, eos_id=stop_at)


@pytest.mark.parametrize("name", ["swiglu-gqa-bias", "qk-layernorm-no-norm-bias-gqa"])
def test_cached_step_logits_equal_the_full_forward(name):
    model = sharp_model(CONFIGS[name])
    tokens = torch.randint(0, 97, (1, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(tokens)
        _, cache = cached_forward(model, tokens[:, :8], None, 0)
        for position in range(8, 12):
            logits, cache = cached_forward(model, tokens[:, position:position + 1], cache, position)
            torch.testing.assert_close(logits, full[:, position], atol=1e-5, rtol=0)
