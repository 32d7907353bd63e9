"""megatron_args.txt: Megatron-LM's pretrain_gpt.py, given these arguments, draws the samples dsel train draws.

The reference is megatron-core's own dataset builder configured the way pretrain_gpt.py configures
it from its arguments (core_gpt_dataset_config_from_args: seed, seq_length, blend from --data-path,
split; num_samples = train_iters * global_batch_size).
"""
import json
from types import SimpleNamespace

import numpy as np
import pytest

pytest.importorskip("megatron.core")

from dsel.config import from_dict  # noqa: E402
from dsel.select import megatron_args  # noqa: E402
from dsel.train import torch_backend  # noqa: E402
from dsel.train.config import TrainConfig  # noqa: E402
from tests._train_util import write_counting_dataset  # noqa: E402

VOCAB, SEQ_LEN, SEED = 128, 16, 77


def parse(args: list[str]) -> SimpleNamespace:
    """The values Megatron-LM's argparse gives pretrain_gpt.py for our options (--data-path takes a list)."""
    values, key = {}, None
    for arg in args:
        if arg.startswith("--"):
            key = arg[2:].replace("-", "_")
            values[key] = []
        else:
            values[key].append(arg)
    return SimpleNamespace(data_path=values["data_path"], split=values["split"][0],
                           seq_length=int(values["seq_length"][0]), seed=int(values["seed"][0]),
                           mid_level_dataset_surplus=float(values.get("mid_level_dataset_surplus", ["0.005"])[0]))


def megatron_lm_train_samples(args: SimpleNamespace, num_samples: int, cache) -> np.ndarray:
    """Samples [num_samples, seq_length + 1] of the train dataset pretrain_gpt.py builds from `args` (its sizes:
    train_iters * global_batch_size samples, and none for the empty valid/test splits of --split 100,0,0)."""
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
    from megatron.core.datasets.utils import get_blend_from_list

    tokenizer = SimpleNamespace(vocab_size=VOCAB, eod=0, pad=VOCAB + 1, eos=0, unique_identifiers={"name": "t"})
    config = GPTDatasetConfig(random_seed=args.seed, sequence_length=args.seq_length,
                              mid_level_dataset_surplus=args.mid_level_dataset_surplus,
                              blend=get_blend_from_list(args.data_path), split=args.split, path_to_cache=str(cache),
                              tokenizer=tokenizer, reset_position_ids=False, reset_attention_mask=False,
                              eod_mask_loss=False)
    train, _, _ = BlendedMegatronDatasetBuilder(GPTDataset, [num_samples, 0, 0], lambda: True, config).build()
    rows = []
    for i in range(num_samples):
        sample = train[i]
        rows.append(np.append(np.asarray(sample["tokens"]), np.asarray(sample["labels"])[-1]))
    return np.stack(rows)


def dsel_train_samples(prefixes, num_samples: int, weights=None) -> np.ndarray:
    cfg = from_dict(TrainConfig, {"data": [str(p) for p in prefixes], "out": "unused", "steps": num_samples // 4,
                                  "batch_size": 4, "seed": SEED, "data_weights": weights})
    samples = torch_backend.training_samples(cfg, SEQ_LEN, VOCAB, num_samples)
    return samples.batch(np.arange(num_samples))


@pytest.mark.parametrize("num_samples", [24, 160])  # one epoch and several (the separately shuffled last epoch)
def test_megatron_lm_draws_dsel_train_samples(tmp_path, num_samples):
    prefix = write_counting_dataset(tmp_path / "data", vocab=VOCAB)
    path = megatron_args.write(tmp_path, [prefix], SEQ_LEN, seed=SEED)
    args = parse(megatron_args.read(path))
    assert args.seq_length == SEQ_LEN and args.data_path == [prefix] and args.split == "100,0,0"
    expected = dsel_train_samples([prefix], num_samples)
    np.testing.assert_array_equal(megatron_lm_train_samples(args, num_samples, tmp_path / "cache"), expected)


def test_another_seed_draws_other_samples(tmp_path):
    """The check above can fail: the seed written is the one that orders the samples."""
    prefix = write_counting_dataset(tmp_path / "data", vocab=VOCAB)
    args = parse(megatron_args.read(megatron_args.write(tmp_path, [prefix], SEQ_LEN, seed=SEED + 1)))
    assert not np.array_equal(megatron_lm_train_samples(args, 24, tmp_path / "cache"), dsel_train_samples([prefix], 24))


def test_blend_is_written_with_weights_and_tokenizer(tmp_path):
    a = write_counting_dataset(tmp_path / "a", vocab=VOCAB)
    b = write_counting_dataset(tmp_path / "b", seed=1, vocab=VOCAB)
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "tokenizer.json").write_text("{}")
    meta = {"vocab_size": VOCAB, "tokenizer": str(tmp_path / "tok" / "tokenizer.json"), "tokenizer_sha256": "x",
            "dtype": "uint16", "eod_id": 0}
    (tmp_path / "a.meta.json").write_text(json.dumps(meta))
    args = megatron_args.read(megatron_args.write(tmp_path, [a, b], SEQ_LEN, weights=[0.25, 0.75]))
    assert args[:5] == ["--data-path", "0.25", a, "0.75", b]
    assert args[args.index("--tokenizer-model") + 1] == str(tmp_path / "tok")
    assert args[args.index("--tokenizer-type") + 1] == "HuggingFaceTokenizer"


@pytest.fixture
def one_process_group(tmp_path):
    """megatron's blend builder asks torch.distributed for the rank: a one-process gloo group."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


# 305..308 samples at 0.25: dataset a (77 samples an epoch) is asked for 77 samples + megatron's 0.5% surplus =
# 78, two epochs whose shuffle differs from one epoch's; at 24 and 160 samples the surplus changes nothing.
@pytest.mark.parametrize("num_samples,weights", [(24, [0.25, 0.75]), (160, [1.0, 2.0]), (305, [0.25, 0.75]),
                                                 (308, [0.25, 0.75]), (160, None)])
def test_megatron_lm_draws_dsel_train_blend(tmp_path, one_process_group, num_samples, weights):
    """A weighted blend (None: dsel train's default, by token count): the --data-path weights and
    --mid-level-dataset-surplus written make megatron-core's BlendedMegatronDatasetBuilder draw dsel train's samples."""
    a = write_counting_dataset(tmp_path / "a", vocab=VOCAB)
    b = write_counting_dataset(tmp_path / "b", seed=1, num_docs=30, vocab=VOCAB)
    args = parse(megatron_args.read(megatron_args.write(tmp_path, [a, b], SEQ_LEN, seed=SEED, weights=weights)))
    assert args.data_path[1::2] == [a, b] and args.mid_level_dataset_surplus == 0.005
    expected = dsel_train_samples([a, b], num_samples, weights)
    np.testing.assert_array_equal(megatron_lm_train_samples(args, num_samples, tmp_path / "cache"), expected)


def write_selection(prefix, num_windows: int = 30) -> str:
    """A `dsel select`-like output: documents of exactly seq_len + 1 tokens, its meta recording the window."""
    from dsel.data.indexed import IndexedDatasetWriter
    from dsel.data.meta import meta_path

    rng = np.random.default_rng(0)
    with IndexedDatasetWriter(prefix, np.uint16) as writer:
        for _ in range(num_windows):
            writer.add_document(rng.integers(1, VOCAB, SEQ_LEN + 1).astype(np.uint16))
    with open(meta_path(str(prefix)), "w") as f:
        json.dump({"window": SEQ_LEN + 1, "vocab_size": VOCAB, "tokenizer": "tok", "tokenizer_sha256": "x",
                   "dtype": "uint16", "eod_id": 0}, f)
    return str(prefix)


def test_selection_handoff_says_megatron_lm_does_not_draw_the_windows(tmp_path):
    """dsel train trains a selection window by window; pretrain_gpt.py's GPTDataset cuts the stream every seq_len
    tokens: the file says so, and it is so (megatron-core's samples are not whole windows, dsel train's all are)."""
    from dsel.data.indexed import IndexedDataset

    prefix = write_selection(tmp_path / "selected")
    path = megatron_args.write(tmp_path, [prefix], SEQ_LEN, seed=SEED)
    assert "do NOT\n# draw dsel train's samples" in path.read_text()
    windows = {tuple(row) for row in np.asarray(IndexedDataset(prefix).stream).reshape(-1, SEQ_LEN + 1)}
    megatron_lm = megatron_lm_train_samples(parse(megatron_args.read(path)), 24, tmp_path / "cache")
    assert all(tuple(row) in windows for row in dsel_train_samples([prefix], 24))
    assert sum(tuple(row) in windows for row in megatron_lm) < 24 // 2
    plain = megatron_args.write(tmp_path / "plain", [write_counting_dataset(tmp_path / "data", vocab=VOCAB)], SEQ_LEN)
    assert "NOT" not in plain.read_text()
