"""transformers config of a dsel GPT exported with its own modeling code (`trust_remote_code=True`).

dsel copies this file and modeling_dsel.py into an export whose architecture no native transformers
class computes (e.g. the CoLoR-Filter presets: OLMo's full-width QK-LayerNorm, LayerNorm without a
bias). It imports nothing from dsel, so the folder loads wherever transformers does.
"""
from transformers import PretrainedConfig


class DselGPTConfig(PretrainedConfig):
    """A pre-norm decoder with rotary embeddings; the field names follow transformers where one exists."""

    model_type = "dsel_gpt"

    def __init__(
        self,
        vocab_size: int = 32000,
        max_position_embeddings: int = 512,
        num_hidden_layers: int = 12,
        num_attention_heads: int = 12,
        num_key_value_heads: int | None = None,
        hidden_size: int = 768,
        intermediate_size: int = 3072,
        hidden_act: str = "gelu",  # "gelu" (exact) or "swiglu"
        norm: str = "layernorm",  # "layernorm" or "rmsnorm"
        norm_eps: float = 1e-5,
        norm_bias: bool = True,  # a shift in every LayerNorm
        qk_layernorm: bool = False,  # a norm over the full query / key width before the head split and RoPE
        bias: bool = False,  # biases in the linear layers
        rope_theta: float = 10000.0,
        initializer_range: float = 0.02,
        tie_word_embeddings: bool = False,
        use_cache: bool = True,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.max_position_embeddings = max_position_embeddings
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads or num_attention_heads
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.hidden_act = hidden_act
        self.norm = norm
        self.norm_eps = norm_eps
        self.norm_bias = norm_bias
        self.qk_layernorm = qk_layernorm
        self.bias = bias
        self.rope_theta = rope_theta
        self.initializer_range = initializer_range
        self.use_cache = use_cache
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)
