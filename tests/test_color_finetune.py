"""The conditional model's fine-tuning: masked padding (checked by autograd), falling target loss."""
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():  # must precede the first Triton call
    os.environ.setdefault("TRITON_INTERPRET", "1")

from dsel.color.finetune import finetune_model, masked_mean_loss  # noqa: E402
from dsel.train.schedule import lr_at  # noqa: E402
from dsel.color.target import epoch_batches, padded_batch, split_documents  # noqa: E402
from _color_util import tiny_gpt  # noqa: E402


def unpadded_loss(model, pieces) -> torch.Tensor:
    """Mean next-token loss over all targets of the pieces, each run alone with full logits."""
    total = sum(F.cross_entropy(model(p[None, :-1])[0], p[1:], reduction="sum") for p in pieces)
    return total / sum(len(p) - 1 for p in pieces)


def test_padded_batch_gives_the_unpadded_gradient(kernel_backend):
    pieces = [torch.randint(0, 64, (n,), generator=torch.Generator().manual_seed(n)) for n in (9, 3, 6, 2)]
    want_model, model = tiny_gpt(0), tiny_gpt(0)
    unpadded_loss(want_model, pieces).backward()
    for pad_id in (0, 63):
        model.zero_grad()
        tokens, mask = padded_batch(pieces, pad_id)
        loss = masked_mean_loss(model, tokens, mask)
        loss.backward()
        torch.testing.assert_close(loss, unpadded_loss(want_model, pieces).detach())
        for (name, p), q in zip(model.named_parameters(), want_model.parameters()):
            torch.testing.assert_close(p.grad, q.grad, msg=name)


def test_target_loss_decreases():
    rng = np.random.default_rng(0)
    docs = [np.tile(rng.permutation(np.arange(8, 16)), 4) for _ in range(16)]
    pieces = split_documents(docs, 17)
    model = tiny_gpt(0)
    tokens, mask = padded_batch(pieces)
    before = masked_mean_loss(model, tokens, mask).item()
    batches = [b for epoch in range(4) for b in epoch_batches(pieces, 8, 0, epoch)]
    losses = finetune_model(model, batches, len(batches), lr=3e-3)
    after = masked_mean_loss(model, tokens, mask).item()
    assert len(losses) == len(batches) and after < 0.7 * before
    assert not model.training


def test_epoch_batches_cover_every_piece_once():
    pieces = split_documents([np.arange(n) + 1 for n in (5, 12, 1, 7)], 4)
    assert [len(p) for p in pieces] == [4, 4, 4, 4, 4, 3]  # the 1-token tail and document predict nothing
    seen = sorted(tuple(row[: int(m.sum()) + 1].tolist()) for t, mk in epoch_batches(pieces, 3, 0, 1)
                  for row, m in zip(t, mk))
    assert seen == sorted(tuple(p.tolist()) for p in pieces)


@pytest.mark.parametrize("step,want", [(0, 0.25), (3, 1.0), (4, 1.0), (6.5, 0.55), (9, 0.1)])
def test_lr_schedule_warmup_then_cosine(step, want):
    assert lr_at(step, total=10, lr=1.0, warmup=4, min_ratio=0.1) == pytest.approx(want)
