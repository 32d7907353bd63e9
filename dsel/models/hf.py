"""Hugging Face transformers models <-> dsel GPT checkpoints: export for lm-eval/vLLM, import as init or model.

    export_hf("runs/pretrain/model", "hf/my-model")   # config.json + model.safetensors + tokenizer, loads with
                                                      # AutoModelForCausalLM / AutoTokenizer.from_pretrained
    read_model_config("hf/SmolLM-135M")               # dsel.models.checkpoint reads a transformers folder too

Which architecture a dsel GPT becomes (all exact: the same logits in fp32):

    dsel GPTConfig                                  transformers
    norm=rmsnorm, activation=swiglu (any GQA)       LlamaForCausalLM   (model_type "llama")
    norm=layernorm, activation=gelu, no GQA         GPTNeoXForCausalLM (model_type "gpt_neox", sequential residual,
                                                                        rotary on the whole head)
    anything else: qk_layernorm, norm_bias=False,   DselForCausalLM    (model_type "dsel_gpt", modeling code shipped
    layernorm with GQA, rmsnorm with gelu, ...                          in the folder: trust_remote_code=True)

Presets: tiny, small-cpu, pds-160m, pds-scorer-125m and gpt-1b are layernorm/gelu and export as
GPT-NeoX; color-150m and color-1b (OLMo's full-width QK-LayerNorm, LayerNorm without a bias) have
no native transformers class and export as DselForCausalLM, whose code (dsel/models/hf_remote/)
is copied into the folder the way OLMo's hf_olmo shipped before transformers had OLMo: stock
transformers, lm-eval (`trust_remote_code=True`) and `generate` load it; vLLM does not.
The weights map one to one: megatron's fused grouped QKV is split into Llama's q/k/v projections (or
is already GPT-NeoX's per-head [q, k, v] layout), SwiGLU's stacked fc1 into gate and up
projections; GPT-NeoX's MLP always has biases, written as zeros when the dsel model has none;
DselForCausalLM keeps dsel's parameter names. Importing accepts the same three architectures and
refuses, in one line, what dsel's GPT cannot express (parallel residual, partial rotary, rope
scaling, a head size other than d_model / heads).
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from dsel.errors import DselError, file_error
from dsel.models.config import GPTConfig, settings_beyond_core

LLAMA, NEOX, DSEL = "llama", "gpt_neox", "dsel_gpt"
CLASSES = {LLAMA: "LlamaForCausalLM", NEOX: "GPTNeoXForCausalLM", DSEL: "DselForCausalLM"}
REMOTE_CODE = Path(__file__).with_name("hf_remote")  # DselForCausalLM's files, copied into its exports
REMOTE_FILES = ("configuration_dsel.py", "modeling_dsel.py")
DSEL_META = "dsel_meta.json"  # the exported checkpoint's dsel meta (tokenizer identity, provenance)


def is_hf_folder(path: str | os.PathLike) -> bool:
    """Whether `path` is a transformers model folder (its config.json has a model_type, not dsel's arch)."""
    config = Path(path) / "config.json"
    if not config.is_file():
        return False
    try:
        data = json.loads(config.read_text())
    except json.JSONDecodeError:
        return False
    return isinstance(data, dict) and "model_type" in data and "arch" not in data


# ---- architecture mapping -------------------------------------------------------------------

def hf_model_type(config: GPTConfig) -> str:
    """The transformers model_type that computes exactly what a dsel GPT of `config` computes: a native
    class where one does, else dsel's own (shipped as remote code)."""
    if settings_beyond_core(config):
        return DSEL
    if config.norm == "rmsnorm" and config.activation == "swiglu":
        return LLAMA
    if config.norm == "layernorm" and config.activation == "gelu" and config.kv_heads == config.n_head:
        return NEOX
    return DSEL


def hf_config(config: GPTConfig, model_type: str, eod_id: int | None):
    """The transformers config object of a dsel GPTConfig."""
    from transformers import GPTNeoXConfig, LlamaConfig

    common = dict(vocab_size=config.vocab_size, hidden_size=config.d_model, intermediate_size=config.ffn_size,
                  num_hidden_layers=config.n_layer, num_attention_heads=config.n_head,
                  max_position_embeddings=config.seq_len, initializer_range=config.init_std,
                  tie_word_embeddings=config.tie_embeddings, eos_token_id=eod_id, bos_token_id=None,
                  architectures=[CLASSES[model_type]])
    if model_type == DSEL:
        from dsel.models.hf_remote.configuration_dsel import DselGPTConfig

        return DselGPTConfig(**common, num_key_value_heads=config.kv_heads, hidden_act=config.activation,
                             norm=config.norm, norm_eps=config.norm_eps, norm_bias=config.norm_bias,
                             qk_layernorm=config.qk_layernorm, bias=config.bias, rope_theta=config.rope_base,
                             auto_map={"AutoConfig": "configuration_dsel.DselGPTConfig",
                                       "AutoModelForCausalLM": "modeling_dsel.DselForCausalLM"})
    if model_type == LLAMA:
        return LlamaConfig(**common, num_key_value_heads=config.kv_heads, head_dim=config.head_dim, hidden_act="silu",
                           rms_norm_eps=config.norm_eps, attention_bias=config.bias, mlp_bias=config.bias,
                           rope_parameters={"rope_type": "default", "rope_theta": config.rope_base})
    return GPTNeoXConfig(**common, hidden_act="gelu", layer_norm_eps=config.norm_eps, use_parallel_residual=False,
                         attention_bias=config.bias, hidden_dropout=0.0, attention_dropout=0.0,
                         rope_parameters={"rope_type": "default", "rope_theta": config.rope_base,
                                          "partial_rotary_factor": 1.0})


def gpt_config_from_hf(hf: dict, source: str | os.PathLike) -> GPTConfig:
    """The dsel GPTConfig of a transformers config.json dict (Llama or GPT-NeoX), refusing what dsel cannot run."""
    model_type = hf.get("model_type")
    if model_type not in CLASSES:
        raise file_error(source, f"transformers model_type {model_type!r} is not supported "
                                 f"(supported: {', '.join(CLASSES)}); dsel can import {', '.join(CLASSES.values())}")
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise file_error(source, f"rope type {rope_type!r} (rope scaling) is not supported; dsel uses plain rotary")
    theta = rope.get("rope_theta", hf.get("rope_theta", hf.get("rotary_emb_base", 10000.0)))
    d_model, n_head = hf["hidden_size"], hf["num_attention_heads"]
    common = dict(vocab_size=hf["vocab_size"], seq_len=hf.get("max_position_embeddings", 2048),
                  n_layer=hf["num_hidden_layers"], n_head=n_head, d_model=d_model,
                  ffn_hidden=hf["intermediate_size"], rope_base=float(theta), init_std=hf.get("initializer_range", 0.02),
                  tie_embeddings=bool(hf.get("tie_word_embeddings", False)))
    if model_type == DSEL:
        kv = hf.get("num_key_value_heads") or n_head
        return GPTConfig(**common, n_query_groups=None if kv == n_head else kv, activation=hf["hidden_act"],
                         norm=hf["norm"], norm_eps=hf["norm_eps"], norm_bias=bool(hf["norm_bias"]),
                         qk_layernorm=bool(hf["qk_layernorm"]), bias=bool(hf["bias"])).validate(str(source))
    if model_type == LLAMA:
        if hf.get("hidden_act", "silu") != "silu":
            raise file_error(source, f"hidden_act {hf['hidden_act']!r} is not supported (Llama import needs silu)")
        if hf.get("head_dim") not in (None, d_model // n_head):
            raise file_error(source, f"head_dim {hf['head_dim']} differs from hidden_size / num_attention_heads")
        if bool(hf.get("attention_bias", False)) != bool(hf.get("mlp_bias", False)):
            raise file_error(source, "attention_bias and mlp_bias differ; dsel has one bias setting for all layers")
        kv = hf.get("num_key_value_heads") or n_head
        return GPTConfig(**common, n_query_groups=None if kv == n_head else kv, activation="swiglu", norm="rmsnorm",
                         norm_eps=hf.get("rms_norm_eps", 1e-6), bias=bool(hf.get("attention_bias", False))).validate(str(source))
    if hf.get("use_parallel_residual", True):
        raise file_error(source, "use_parallel_residual=true (e.g. Pythia) is not supported; dsel's blocks are sequential")
    partial = rope.get("partial_rotary_factor", hf.get("rotary_pct", 1.0))
    if partial != 1.0:
        raise file_error(source, f"partial rotary ({partial}) is not supported; dsel rotates the whole head")
    if hf.get("hidden_act", "gelu") != "gelu":
        raise file_error(source, f"hidden_act {hf['hidden_act']!r} is not supported (GPT-NeoX import needs exact gelu)")
    return GPTConfig(**common, activation="gelu", norm="layernorm", norm_eps=hf.get("layer_norm_eps", 1e-5),
                     bias=bool(hf.get("attention_bias", True))).validate(str(source))


# ---- weights --------------------------------------------------------------------------------

def _layer_pairs(model_type: str, i: int) -> list[tuple[str, str]]:
    """(dsel name, transformers name) of the one-to-one tensors of layer i (norms, output projections)."""
    d = f"decoder.layers.{i}."
    if model_type == LLAMA:
        h = f"model.layers.{i}."
        return [(d + "input_layernorm.weight", h + "input_layernorm.weight"),
                (d + "pre_mlp_layernorm.weight", h + "post_attention_layernorm.weight"),
                (d + "self_attention.linear_proj.weight", h + "self_attn.o_proj.weight"),
                (d + "self_attention.linear_proj.bias", h + "self_attn.o_proj.bias"),
                (d + "mlp.linear_fc2.weight", h + "mlp.down_proj.weight"),
                (d + "mlp.linear_fc2.bias", h + "mlp.down_proj.bias")]
    h = f"gpt_neox.layers.{i}."
    return [(d + "input_layernorm." + p, h + "input_layernorm." + p) for p in ("weight", "bias")] + \
        [(d + "pre_mlp_layernorm." + p, h + "post_attention_layernorm." + p) for p in ("weight", "bias")] + \
        [(d + "self_attention.linear_qkv." + p, h + "attention.query_key_value." + p) for p in ("weight", "bias")] + \
        [(d + "self_attention.linear_proj." + p, h + "attention.dense." + p) for p in ("weight", "bias")] + \
        [(d + "mlp.linear_fc1." + p, h + "mlp.dense_h_to_4h." + p) for p in ("weight", "bias")] + \
        [(d + "mlp.linear_fc2." + p, h + "mlp.dense_4h_to_h." + p) for p in ("weight", "bias")]


def _top_pairs(model_type: str) -> list[tuple[str, str]]:
    if model_type == LLAMA:
        return [("embedding.word_embeddings.weight", "model.embed_tokens.weight"),
                ("decoder.final_layernorm.weight", "model.norm.weight"), ("output_layer.weight", "lm_head.weight")]
    return [("embedding.word_embeddings.weight", "gpt_neox.embed_in.weight"),
            ("decoder.final_layernorm.weight", "gpt_neox.final_layer_norm.weight"),
            ("decoder.final_layernorm.bias", "gpt_neox.final_layer_norm.bias"), ("output_layer.weight", "lm_head.weight")]


def _split_qkv(qkv: torch.Tensor, config: GPTConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Megatron's grouped QKV rows (per group: its query heads, its key head, its value head) -> q, k, v rows."""
    per_group = config.n_head // config.kv_heads
    grouped = qkv.reshape(config.kv_heads, per_group + 2, config.head_dim, *qkv.shape[1:])
    rest = qkv.shape[1:]
    return (grouped[:, :per_group].reshape(-1, *rest), grouped[:, per_group].reshape(-1, *rest),
            grouped[:, per_group + 1].reshape(-1, *rest))


def _join_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, config: GPTConfig) -> torch.Tensor:
    """The inverse of _split_qkv."""
    per_group, rest = config.n_head // config.kv_heads, q.shape[1:]
    q = q.reshape(config.kv_heads, per_group, config.head_dim, *rest)
    k, v = (t.reshape(config.kv_heads, 1, config.head_dim, *rest) for t in (k, v))
    return torch.cat([q, k, v], dim=1).reshape(-1, *rest)


def to_hf_state(state: dict[str, torch.Tensor], config: GPTConfig, model_type: str) -> dict[str, torch.Tensor]:
    """dsel GPT state dict -> transformers state dict (zero biases where GPT-NeoX has them and dsel has none)."""
    if model_type == DSEL:  # dsel's own names
        return {k: v.contiguous() for k, v in state.items()}
    out = {}
    for i in range(config.n_layer):
        pairs = _layer_pairs(model_type, i)
        if model_type == LLAMA:
            d, h = f"decoder.layers.{i}.", f"model.layers.{i}.self_attn."
            for p in ("weight", "bias") if config.bias else ("weight",):
                q, k, v = _split_qkv(state[d + "self_attention.linear_qkv." + p], config)
                out.update({h + "q_proj." + p: q, h + "k_proj." + p: k, h + "v_proj." + p: v})
                gate, up = state[d + "mlp.linear_fc1." + p].chunk(2, dim=0)
                out.update({f"model.layers.{i}.mlp.gate_proj.{p}": gate, f"model.layers.{i}.mlp.up_proj.{p}": up})
        for ours, theirs in pairs:
            if ours in state:
                out[theirs] = state[ours]
            elif ours.endswith(".bias"):
                weight = state[ours.removesuffix(".bias") + ".weight"]
                if model_type == NEOX and "mlp." in ours:  # GPT-NeoX's MLP always has biases
                    out[theirs] = torch.zeros(weight.shape[0], dtype=weight.dtype)
    for ours, theirs in _top_pairs(model_type):
        if ours in state:
            out[theirs] = state[ours]
    return {k: v.contiguous() for k, v in out.items()}


def from_hf_state(hf: dict[str, torch.Tensor], config: GPTConfig, model_type: str,
                  source: str | os.PathLike) -> dict[str, torch.Tensor]:
    """transformers state dict -> dsel GPT state dict (refusing GPT-NeoX MLP biases a bias-free dsel model lacks)."""
    if model_type == DSEL:  # dsel's own names; a tied head is the embedding
        return {k: v for k, v in hf.items() if not (config.tie_embeddings and k == "output_layer.weight")}
    hf = {("lm_head.weight" if k == "embed_out.weight" else k): v for k, v in hf.items()}  # older GPT-NeoX name

    def take(name: str) -> torch.Tensor:
        if name not in hf:
            raise file_error(source, f"transformers weights lack {name}")
        return hf[name]

    out = {}
    for i in range(config.n_layer):
        if model_type == LLAMA:
            d, h = f"decoder.layers.{i}.", f"model.layers.{i}."
            for p in ("weight", "bias") if config.bias else ("weight",):
                q, k, v = (take(f"{h}self_attn.{n}_proj.{p}") for n in "qkv")
                out[d + "self_attention.linear_qkv." + p] = _join_qkv(q, k, v, config)
                out[d + "mlp.linear_fc1." + p] = torch.cat([take(f"{h}mlp.gate_proj.{p}"), take(f"{h}mlp.up_proj.{p}")])
        for ours, theirs in _layer_pairs(model_type, i):
            is_linear_bias = ours.endswith(".bias") and "layernorm" not in ours
            if is_linear_bias and not config.bias:
                if theirs in hf and bool(hf[theirs].any()):
                    raise file_error(source, f"{theirs} is non-zero but the model has no attention biases; "
                                             "dsel has one bias setting for all layers")
                continue
            out[ours] = take(theirs)
    for ours, theirs in _top_pairs(model_type):
        if ours == "output_layer.weight" and config.tie_embeddings:
            continue
        out[ours] = take(theirs)
    return out


def read_hf_weights(folder: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Every tensor of a transformers folder: model.safetensors, its sharded index, or pytorch_model.bin."""
    from safetensors.torch import load_file

    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    try:
        if (folder / "model.safetensors").is_file():
            return load_file(folder / "model.safetensors")
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            return {k: v for shard in shards for k, v in load_file(folder / shard).items()}
        if (folder / "pytorch_model.bin").is_file():
            return torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True)
    except Exception as e:  # safetensors/torch raise several types for damaged files
        raise file_error(folder, f"transformers weights cannot be read ({type(e).__name__}: {str(e)[:120]})") from None
    raise file_error(folder, "transformers folder has no model.safetensors, model.safetensors.index.json "
                             "or pytorch_model.bin")


def read_hf_config(folder: str | os.PathLike) -> tuple[str, GPTConfig]:
    """(model_type, dsel GPTConfig) of a transformers folder."""
    from dsel.io import read_json

    hf = read_json(Path(folder) / "config.json")
    return hf.get("model_type"), gpt_config_from_hf(hf, Path(folder) / "config.json")


def load_hf_state(folder: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The dsel GPT state dict of a transformers folder."""
    model_type, config = read_hf_config(folder)
    return from_hf_state(read_hf_weights(folder), config, model_type, folder)


def hf_meta(folder: str | os.PathLike) -> dict:
    """The dsel meta of a transformers folder: what `export_hf` wrote, else its tokenizer's identity (if any)."""
    from dsel.data.tokenizer import HF_FILE, SPM_FILE, load_tokenizer
    from dsel.io import read_json

    folder = Path(folder)
    if (folder / DSEL_META).is_file():
        return read_json(folder / DSEL_META)
    if (folder / HF_FILE).is_file() or (folder / SPM_FILE).is_file():
        return {**load_tokenizer(folder).identity(), "imported_from": str(folder)}
    return {"imported_from": str(folder)}


# ---- export ---------------------------------------------------------------------------------

def export_hf(model_dir: str | os.PathLike, out: str | os.PathLike, tokenizer: str | None = None) -> Path:
    """Write the dsel GPT checkpoint `model_dir` as a transformers folder `out` (all checks before any write)."""
    from dsel.data.tokenizer import load_tokenizer, save_for_transformers
    from dsel.io import check_free_space
    from dsel.models.checkpoint import _replace_dir, checkpoint_bytes, load_model

    model, meta = load_model(model_dir)
    if getattr(model, "arch", None) != "gpt":
        raise file_error(model_dir, f"holds a '{model.arch}' model; only GPT language models export to transformers")
    model_type = hf_model_type(model.config)
    tokenizer_path = tokenizer or meta.get("tokenizer")
    if not tokenizer_path:
        raise file_error(model_dir, "checkpoint records no tokenizer; set tokenizer= (the one its data was tokenized with)")
    tok = load_tokenizer(tokenizer_path)
    if meta.get("tokenizer_sha256") not in (None, tok.sha256):
        raise file_error(tokenizer_path, f"is not the tokenizer {model_dir} was trained with (sha256 {tok.sha256[:12]}... "
                                         f"vs {meta['tokenizer_sha256'][:12]}...)")
    if tok.vocab_size > model.config.vocab_size:
        raise file_error(tokenizer_path, f"tokenizer has {tok.vocab_size} tokens but model {model_dir} has a vocabulary "
                                         f"of {model.config.vocab_size}")
    check_free_space(out, checkpoint_bytes(model.config), "the transformers folder")
    hf_model = build_hf_model(model, model_type, tok.eod_id)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        hf_model.save_pretrained(tmp, safe_serialization=True)
        if model_type == DSEL:
            for name in REMOTE_FILES:
                shutil.copyfile(REMOTE_CODE / name, tmp / name)
        save_for_transformers(tok, tmp, model.config.seq_len)
        (tmp / DSEL_META).write_text(json.dumps({**meta, "exported_from": str(model_dir)}, indent=2, sort_keys=True,
                                                default=str) + "\n")
        _replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def build_hf_model(model: torch.nn.Module, model_type: str, eod_id: int | None):
    """The transformers model (fp32, eval mode) holding `model`'s weights."""
    import transformers

    config = hf_config(model.config, model_type, eod_id)
    if model_type == DSEL:
        from dsel.models.hf_remote.modeling_dsel import DselForCausalLM as model_class
    else:
        model_class = getattr(transformers, CLASSES[model_type])
    hf_model = model_class(config)
    state = to_hf_state({k: v.detach().float().cpu() for k, v in model.state_dict().items()}, model.config, model_type)
    missing, unexpected = hf_model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (config.tie_word_embeddings and k in ("lm_head.weight", "output_layer.weight"))]
    if missing or unexpected:
        raise DselError(f"internal: transformers {CLASSES[model_type]} weights missing {missing[:3]}, "
                        f"unexpected {unexpected[:3]}")
    if config.tie_word_embeddings:
        hf_model.tie_weights()
    return hf_model.eval()
