"""Held-out loss of a checkpoint on tokenized validation sets: one number per domain."""
from __future__ import annotations

from dsel.data.corpus import open_corpus, sidecar_prefix
from dsel.data.meta import check_same_tokenizer
from dsel.data.windows import Windows
from dsel.errors import file_error


def validation_windows(prefix: str, window: int, vocab_size: int) -> Windows:
    """Windows of a validation corpus (dsel.data.corpus), refusing token ids past the model's vocabulary."""
    windows = Windows(open_corpus(prefix), window)
    largest = max(int(stream.max()) for stream in windows.streams)
    if largest >= vocab_size:
        raise file_error(prefix, f"token id {largest} is past the model's vocabulary of {vocab_size}; "
                                 "data and model use different tokenizers")
    return windows


def heldout_loss(model, windows: Windows, batch_size: int = 16, max_batches: int = 0, device="cpu") -> dict:
    """Mean next-token loss over the first `max_batches` batches (0 = all windows): {loss, stderr, windows, tokens}.

    `stderr` is the standard error of that mean over windows (sample std / sqrt(windows); 0 for one window).
    """
    import math

    from dsel.train.torch_backend import window_losses

    losses = window_losses(model, windows, windows.window, batch_size, device, max_batches or None, precision="fp32")
    stderr = float(losses.std(ddof=1) / math.sqrt(len(losses))) if len(losses) > 1 else 0.0
    return {"loss": float(losses.mean()), "stderr": stderr, "windows": len(losses),
            "tokens": len(losses) * (windows.window - 1)}


def heldout_losses(model, datasets: dict[str, str], window: int, batch_size: int = 16, max_batches: int = 0,
                   device="cpu", checkpoint: str = "model", meta: dict | None = None) -> dict[str, dict]:
    """heldout_loss on every named validation dataset (name -> corpus path), each checked to share the
    tokenizer of the checkpoint's `meta` first."""
    for prefix in datasets.values():
        check_same_tokenizer(checkpoint, meta or {}, sidecar_prefix(prefix))
    return {name: heldout_loss(model, validation_windows(prefix, window, model.config.vocab_size), batch_size,
                               max_batches, device)
            for name, prefix in datasets.items()}
