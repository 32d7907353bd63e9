"""Greedy decoding of a dsel GPT with a key/value cache: one new token's forward per step, not the whole window.

    tokens = greedy_generate(model, prompt_ids, max_new_tokens=64, stop=lambda ids: ...)

The cached step runs the model's own modules (norms, projections, MLP, head) and recomputes only
the attention over cached keys and values, so it gives the tokens a full forward of the window
gives (tested against it). Settings beyond the core GPT (dsel.models.config.CORE_FIELDS) that the
cached step also computes are listed in CACHED_SETTINGS (the CoLoR presets' QK-LayerNorm and
bias-free LayerNorm); a model with any other is decoded by rerunning the window, which is always right. When the sequence outgrows the context,
the window slides: the last `seq_len` tokens are prefilled again, exactly what rerunning the window
would see.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from dsel.models.config import GPTConfig, settings_beyond_core
from dsel.models.gpt import apply_rotary, rotary_frequencies

CACHED_SETTINGS = frozenset({"norm_bias", "qk_layernorm"})  # beyond the core GPT, reproduced by cached_forward


def supports_cache(config: GPTConfig) -> bool:
    """Whether the cached step computes what the model computes (no setting it does not reproduce in use)."""
    return set(settings_beyond_core(config)) <= CACHED_SETTINGS


def cached_forward(model, tokens: torch.Tensor, cache: list | None, offset: int) -> tuple[torch.Tensor, list]:
    """Logits of the last position of `tokens` [B, T] placed after `offset` cached positions, and the new cache."""
    config = model.config
    angles = rotary_frequencies(offset + tokens.shape[1], config.head_dim, config.rope_base, tokens.device)[offset:]
    x = model.embedding.word_embeddings(tokens)
    new_cache = []
    for i, layer in enumerate(model.decoder.layers):
        attention = layer.self_attention
        b, length, _ = x.shape
        per_group = attention.n_head // attention.groups
        qkv = attention.linear_qkv(layer.input_layernorm(x)).view(b, length, attention.groups,
                                                                  (per_group + 2) * attention.head_dim)
        q, k, v = qkv.split([per_group * attention.head_dim, attention.head_dim, attention.head_dim], dim=-1)
        if hasattr(attention, "q_layernorm"):  # over the full width, before the head split (as SelfAttention)
            q = attention.q_layernorm(q.reshape(b, length, -1))
            k = attention.k_layernorm(k.reshape(b, length, -1)).view(b, length, attention.groups, attention.head_dim)
        q = apply_rotary(q.reshape(b, length, attention.n_head, attention.head_dim), angles)
        k = apply_rotary(k, angles)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        if cache is not None:
            k, v = torch.cat([cache[i][0], k], dim=2), torch.cat([cache[i][1], v], dim=2)
        new_cache.append((k, v))
        if per_group > 1:
            k, v = k.repeat_interleave(per_group, dim=1), v.repeat_interleave(per_group, dim=1)
        if cache is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:  # new positions see every cached one and the new ones up to themselves
            mask = torch.ones(length, k.shape[2], dtype=torch.bool, device=x.device).tril(k.shape[2] - length)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        x = x + attention.linear_proj(out.transpose(1, 2).reshape(b, length, -1))
        x = x + layer.mlp(layer.pre_mlp_layernorm(x))
    hidden = model.decoder.final_layernorm(x[:, -1])
    return hidden @ model.head_weight.to(hidden.dtype).T, new_cache


@torch.no_grad()
def greedy_generate(model, prompt: list[int], max_new_tokens: int, stop: Callable[[list[int]], bool],
                    eos_id: int | None = None) -> list[int]:
    """Greedy tokens after `prompt` until `eos_id` (not returned), `stop(generated)` or `max_new_tokens`."""
    device = model.head_weight.device
    context = model.config.seq_len
    sequence, generated = list(prompt), []
    cached = supports_cache(model.config)
    cache, length = None, 0
    for _ in range(max_new_tokens):
        if cached and cache is not None and length < context:
            logits, cache = cached_forward(model, torch.tensor([sequence[-1:]], device=device), cache, length)
            length += 1
        elif cached:
            window = sequence[-context:]
            logits, cache = cached_forward(model, torch.tensor([window], device=device), None, 0)
            length = len(window)
        else:
            logits = model(torch.tensor([sequence[-context:]], device=device))[:, -1]
        token = int(logits[0].argmax())
        if token == eos_id:
            break
        generated.append(token)
        sequence.append(token)
        if stop(generated):
            break
    return generated
