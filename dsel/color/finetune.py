"""The conditional model: the prior fine-tuned on target data (one epoch, AdamW, lr 1e-3).

CoLoR-Filter's conditional model is the prior after one pass over the downstream/target data.
Target documents are short and few, so they are trained on as padded, loss-masked batches (see
dsel.color.target) rather than packed windows: no token is trained on padding and no document
is predicted from another one.
"""
from __future__ import annotations

import logging
from typing import Iterable

import torch

from dsel.color.scorer import next_token_losses
from dsel.io import progress
from dsel.train.schedule import lr_at

log = logging.getLogger(__name__)


def masked_mean_loss(model: torch.nn.Module, tokens: torch.Tensor, loss_mask: torch.Tensor,
                     precision: str = "auto") -> torch.Tensor:
    """Mean next-token loss over the unmasked targets of a padded batch (tokens [B, L], mask [B, L-1])."""
    losses = next_token_losses(model, tokens, loss_mask, precision)
    return losses.sum() / loss_mask.sum().clamp(min=1)


def finetune_model(model: torch.nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], total_steps: int,
                   lr: float = 1e-3, weight_decay: float = 0.0, warmup: int = 0, min_lr_ratio: float = 1.0,
                   grad_clip: float = 1.0, device: str | torch.device = "cpu", precision: str = "auto") -> list[float]:
    """Train `model` in place with AdamW over `batches` of (tokens, loss_mask); returns the step losses."""
    device = torch.device(device)
    model.to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=weight_decay)
    losses = []
    for step, (tokens, loss_mask) in enumerate(progress(batches, total=total_steps, desc="finetune", unit="step")):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, total_steps, lr, warmup, min_lr_ratio)
        loss = masked_mean_loss(model, tokens.to(device), loss_mask.to(device), precision)
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
