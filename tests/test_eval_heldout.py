"""`dsel eval loss`: held-out loss per validation set against cross-entropy of the model's logits."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from _eval_util import tiny_checkpoint, tokenized_slice
from dsel.cli import main
from dsel.data.indexed import IndexedDataset
from dsel.models.checkpoint import load_model


def reference_loss(model, prefix: str, window: int, max_windows: int) -> float:
    """Mean cross-entropy of materialised logits over consecutive windows of the token stream."""
    stream = np.concatenate([np.asarray(s, dtype=np.int64) for s in IndexedDataset(prefix)])
    count = min(max_windows, len(stream) // window)
    tokens = torch.from_numpy(stream[: count * window].reshape(count, window))
    with torch.no_grad():
        logits = model(tokens[:, :-1]).double()
    return float(F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()))


def test_eval_loss_per_domain_matches_logits(tmp_path):
    meta = tokenized_slice(tmp_path, "pool", docs=80)
    tokenized_slice(tmp_path, "science", docs=20, tokenizer=meta["tokenizer"])
    tokenized_slice(tmp_path, "legal", docs=20, tokenizer=meta["tokenizer"])
    checkpoint = tiny_checkpoint(tmp_path / "model", meta)
    out = tmp_path / "loss.json"
    main(["eval", "loss", f"checkpoint={checkpoint}", "batch_size=3", "max_batches=3", f"out={out}",
          f"data={{science: {tmp_path / 'science'}, legal: {tmp_path / 'legal'}}}"])
    result = json.loads(out.read_text())
    model, _ = load_model(checkpoint)
    assert result["window"] == 33 and set(result["losses"]) == {"science", "legal"}
    for name in ("science", "legal"):
        row = result["losses"][name]
        assert row["windows"] == 9 and row["tokens"] == 9 * 32
        assert row["loss"] == pytest.approx(reference_loss(model, str(tmp_path / name), 33, 9), rel=1e-5)


def test_eval_loss_refuses_data_of_another_tokenizer(tmp_path, capsys):
    meta = tokenized_slice(tmp_path, "pool", docs=80)
    checkpoint = tiny_checkpoint(tmp_path / "model", {**meta, "vocab_size": 300})
    with pytest.raises(SystemExit) as e:
        main(["eval", "loss", f"checkpoint={checkpoint}", f"data={{pool: {tmp_path / 'pool'}}}"])
    assert e.value.code == 2
    assert "tokenized with another tokenizer" in capsys.readouterr().err
