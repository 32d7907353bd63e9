"""The conditional model: the prior fine-tuned on target data (one epoch, AdamW, lr 1e-3).

CoLoR-Filter's conditional model is the prior after one pass over the downstream/target data, with
the optimizer reset and OLMo's warmup + cosine schedule. The batches (dsel.color.target) are
padded rows with a loss mask: dsel's `pieces` mask the padding out, the official `sft` rows keep
their pad targets in the loss (an all-true mask).
"""
from __future__ import annotations

import logging
from typing import Iterable

import torch

from dsel.device import autocast_for
from dsel.io import progress
from dsel.models.gpt import IGNORE_INDEX, squared_log_normaliser
from dsel.train.schedule import Schedule, lr_at

log = logging.getLogger(__name__)


def masked_mean_loss(model: torch.nn.Module, tokens: torch.Tensor, loss_mask: torch.Tensor,
                     precision: str = "auto", z_loss: float = 0.0) -> torch.Tensor:
    """Mean next-token loss over the unmasked targets of a padded batch (tokens [B, L], mask [B, L-1]),
    plus z_loss * mean logsumexp^2 over the same targets (OLMo's auxiliary loss)."""
    from kernels import linear_cross_entropy

    targets = tokens[:, 1:].masked_fill(~loss_mask, IGNORE_INDEX)
    with autocast_for(tokens.device, precision):
        hidden = model.hidden_states(tokens[:, :-1])
    head = model.head_weight.to(hidden.dtype)
    token = linear_cross_entropy(hidden, head, targets)
    loss = token.sum() / loss_mask.sum().clamp(min=1)
    if z_loss:
        loss = loss + z_loss * squared_log_normaliser(hidden, head, targets, token)
    return loss


def finetune_model(model: torch.nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], total_steps: int,
                   lr: float = 1e-3, weight_decay: float = 0.0, warmup: int = 0, min_lr_ratio: float = 1.0,
                   grad_clip: float = 1.0, device: str | torch.device = "cpu", precision: str = "auto",
                   adam_eps: float = 1e-8, z_loss: float = 0.0, schedule: Schedule = "cosine") -> list[float]:
    """Train `model` in place with a fresh AdamW over `batches` of (tokens, loss_mask); returns the step losses."""
    device = torch.device(device)
    model.to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), eps=adam_eps,
                                  weight_decay=weight_decay)
    losses = []
    for step, (tokens, loss_mask) in enumerate(progress(batches, total=total_steps, desc="finetune", unit="step")):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, total_steps, lr, warmup, min_lr_ratio, schedule)
        loss = masked_mean_loss(model, tokens.to(device), loss_mask.to(device), precision, z_loss)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        losses.append(loss.item())
    model.eval()
    if losses:
        log.info("finetuned %d steps: loss %.4f -> %.4f", len(losses), losses[0], losses[-1])
    return losses
