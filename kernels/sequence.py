"""Per-token values -> per-sequence sums or means (torch scatter-add: differentiable, any device)."""
import torch

from dsel.errors import DselError


def sequence_reduce(values, seq_ids, num_seqs, mask=None, mean=True):
    """Sum (or mean over unmasked tokens) of values[N] grouped by seq_ids[N] in [0, num_seqs).

    Tokens with mask False count for nothing; a sequence without unmasked tokens gets 0.
    Returns float32 [num_seqs] (float64 if values are float64).
    """
    if values.shape != seq_ids.shape or values.dim() != 1:
        raise DselError(f"sequence_reduce: values {tuple(values.shape)} and seq_ids "
                        f"{tuple(seq_ids.shape)} must be the same 1-d shape")
    if seq_ids.numel() and (int(seq_ids.min()) < 0 or int(seq_ids.max()) >= num_seqs):
        raise DselError(f"sequence_reduce: seq_ids must lie in [0, {num_seqs}), got "
                        f"[{int(seq_ids.min())}, {int(seq_ids.max())}]")
    dtype = torch.float64 if values.dtype == torch.float64 else torch.float32
    values = values.to(dtype)
    weight = torch.ones_like(values) if mask is None else mask.to(dtype)
    totals = torch.zeros(num_seqs, dtype=dtype, device=values.device).index_add(0, seq_ids.long(), values * weight)
    if not mean:
        return totals
    counts = torch.zeros(num_seqs, dtype=dtype, device=values.device).index_add(0, seq_ids.long(), weight)
    return totals / counts.clamp(min=1)
