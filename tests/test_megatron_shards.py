"""Per-rank construction without the full model: the lazy initial weights equal the torch backend's model."""
import dataclasses

import pytest
import torch

from dsel.config import from_dict
from dsel.errors import DselError
from dsel.models.checkpoint import save_model
from dsel.models.config import GPTConfig
from dsel.train import torch_backend
from dsel.train.config import TrainConfig

pytest.importorskip("megatron.core")

from dsel.train.megatron import convert, shards  # noqa: E402

CONFIG = {"vocab_size": 128, "seq_len": 16, "n_layer": 2, "d_model": 32, "n_head": 4, "n_query_groups": 2,
          "activation": "swiglu", "ffn_hidden": 64, "norm": "rmsnorm"}


def torch_model(tmp_path, seed=5):
    cfg = from_dict(TrainConfig, {"data": ["unused"], "out": str(tmp_path), "steps": 1, "arch": CONFIG, "seed": seed})
    return torch_backend.build_model(cfg)


def test_seeded_weights_are_the_torch_backend_init(tmp_path):
    """Drawn tensor by tensor from (seed, name): the very weights of the torch backend's model, and another seed
    gives others."""
    gpt = torch_model(tmp_path)
    lazy = shards.SeededWeights(gpt.config, seed=5)
    assert list(lazy) == list(gpt.state_dict())
    assert all(torch.equal(lazy[name], tensor) for name, tensor in gpt.state_dict().items())
    other = shards.SeededWeights(gpt.config, seed=6)
    assert not torch.equal(other["embedding.word_embeddings.weight"], gpt.embedding.word_embeddings.weight)


@pytest.mark.parametrize("tp_rank,tp,pp_rank,pp", [(1, 2, 0, 1), (0, 1, 1, 2)])
def test_rank_slices_from_lazy_and_full_state_agree(tmp_path, tp_rank, tp, pp_rank, pp):
    gpt = torch_model(tmp_path)
    save_model(tmp_path / "init", gpt)
    full = convert.to_megatron(gpt.state_dict(), gpt.config, tp_rank, tp, pp_rank, pp)
    for lazy in (shards.SeededWeights(gpt.config, 5), shards.checkpoint_weights(tmp_path / "init", gpt.config)):
        sliced = convert.to_megatron(lazy, gpt.config, tp_rank, tp, pp_rank, pp)
        assert sliced.keys() == full.keys() and all(torch.equal(sliced[k], full[k]) for k in full)


def test_init_of_another_architecture_is_one_line_error(tmp_path):
    gpt = torch_model(tmp_path)
    save_model(tmp_path / "init", gpt)
    wider = dataclasses.replace(GPTConfig(**CONFIG), d_model=64)
    with pytest.raises(DselError, match="init: checkpoint from another architecture: embedding.word_embeddings"):
        shards.checkpoint_weights(tmp_path / "init", wider)
