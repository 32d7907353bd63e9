"""Per-window mean token losses of several LMs in one pass, and the CoLoR score.

CoLoR-Filter ranks a window x by CoLoR(x) = L_prior(x) - L_cond(x): how much the mean per-token
cross-entropy drops when the prior is fine-tuned on target data. `ColorScorer` runs any number
of models over each batch of windows (prior + conditional for CoLoR, conditional alone for the
conditional-only baseline, a trained and a held-out model for RHO-style scores) and returns one
`loss_<name>` column per model, plus `color` when both a prior and a conditional model are given.

The loss head goes through `kernels.linear_cross_entropy`, which never materialises the
[tokens x vocab] logits. Batches are cut into micro-batches of one fixed shape, so a window's
score does not depend on the batch size it was scored with (same shapes -> same kernels -> same
bits).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

import torch

from dsel.color.target import length_mask, padded_batch
from dsel.color.config import ColorScorerConfig
from dsel.config import from_dict
from dsel.device import autocast_for
from dsel.errors import DselError


@dataclass(frozen=True)
class ScoredModel:
    """A model, the checkpoint it came from (named in error messages) and its checkpoint metadata."""

    name: str
    model: torch.nn.Module
    checkpoint: str = "<in memory>"
    meta: dict = field(default_factory=dict)

    @property
    def vocab_size(self) -> int:
        return self.model.config.vocab_size

    @property
    def context(self) -> int:
        return self.model.config.seq_len


def next_token_losses(model: torch.nn.Module, tokens: torch.Tensor, loss_mask: torch.Tensor | None = None,
                      precision: str = "auto") -> torch.Tensor:
    """Per-token next-token cross-entropy [B, L-1] (float32) of tokens [B, L]; 0 where loss_mask is False.

    The head is fused with the loss (kernels.linear_cross_entropy), so no [tokens x vocab]
    logits are materialised. Differentiable: the fine-tuning loop trains through it.
    """
    from kernels import IGNORE_INDEX, linear_cross_entropy

    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    if loss_mask is not None:
        targets = targets.masked_fill(~loss_mask, IGNORE_INDEX)
    with autocast_for(tokens.device, precision):
        hidden = model.hidden_states(inputs)
    return linear_cross_entropy(hidden, model.head_weight.to(hidden.dtype), targets)


def mean_token_losses(model: torch.nn.Module, tokens: torch.Tensor, lengths: torch.Tensor | None = None,
                      precision: str = "auto") -> torch.Tensor:
    """Mean next-token cross-entropy of each row of `tokens` [B, L] (float32 [B]).

    Row b predicts tokens[b, 1:lengths[b]] from the tokens before them; positions past a row's
    length are padding and are masked out of its mean.
    """
    if lengths is None:
        return next_token_losses(model, tokens, precision=precision).mean(1)
    mask = length_mask(lengths, tokens.shape[1])
    return next_token_losses(model, tokens, mask, precision).sum(1) / mask.sum(1).clamp(min=1)


class ColorScorer:
    """Scores batches of windows with N models in one pass: `loss_<name>` per model, plus `color`.

    `models` maps column names to models (or `ScoredModel`s); `color = loss_<prior> -
    loss_<cond>` is added when both `prior` and `cond` name models in it. Every batch is scored in
    micro-batches of exactly `micro_batch` rows (the last one padded), so scores are bitwise the
    same for any batch size.
    """

    def __init__(self, models: Mapping[str, torch.nn.Module | ScoredModel], prior: str | None = "prior",
                 cond: str | None = "cond", micro_batch: int = 16, device: str | torch.device = "cpu",
                 precision: str = "auto"):
        if not models:
            raise DselError("ColorScorer needs at least one model")
        if micro_batch < 1:
            raise DselError(f"micro_batch must be >= 1, got {micro_batch}")
        self.device = torch.device(device)
        self.models = [m if isinstance(m, ScoredModel) else ScoredModel(n, m) for n, m in models.items()]
        for entry in self.models:
            entry.model.to(self.device).eval()
        check_same_vocabulary(self.models)
        self.with_color = prior in models and cond in models
        self.prior, self.cond = prior, cond
        self.micro_batch = micro_batch
        self.precision = precision
        self.columns = [f"loss_{m.name}" for m in self.models] + (["color"] if self.with_color else [])

    @property
    def vocab_size(self) -> int:
        return self.models[0].vocab_size

    @property
    def checkpoints(self) -> list[tuple[str, dict]]:
        """(checkpoint, meta) of every model, for the corpus tokenizer check of `dsel score`."""
        return [(m.checkpoint, m.meta) for m in self.models]

    def check_window(self, window: int) -> None:
        """Raise a DselError naming the checkpoint if `window` tokens do not fit a model's context."""
        if window < 2:
            raise DselError(f"window must hold at least 2 tokens to have a next-token loss, got {window}")
        for m in self.models:
            if window - 1 > m.context:
                raise DselError(
                    f"{m.checkpoint}: window of {window} tokens ({window - 1} inputs) is longer than the "
                    f"context of model '{m.name}' (seq_len={m.context})"
                )

    @torch.no_grad()
    def __call__(self, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-window float32 scores [B] for a LongTensor [B, W] of windows (on the CPU)."""
        tokens = self._checked(tokens)
        out = {f"loss_{m.name}": self._score_model(m.model, tokens) for m in self.models}
        if self.with_color:
            out["color"] = out[f"loss_{self.prior}"] - out[f"loss_{self.cond}"]
        return out

    @torch.no_grad()
    def score_sequences(self, sequences: Sequence[torch.Tensor], max_tokens: int = 16384) -> dict[str, torch.Tensor]:
        """The same columns for sequences of different lengths, in the order given.

        Sequences are sorted by length and packed into batches of at most `max_tokens` padded
        tokens, so little compute goes to padding; the padding is masked out of every mean.
        """
        lengths = torch.tensor([len(s) for s in sequences], dtype=torch.long)
        if not len(sequences) or int(lengths.min()) < 2:
            raise DselError("score_sequences: every sequence needs at least 2 tokens to have a next-token loss")
        self.check_window(int(lengths.max()))
        out = {c: torch.empty(len(sequences), dtype=torch.float32) for c in self.columns}
        for rows in length_packed_batches(lengths, max_tokens):
            batch, _ = padded_batch([sequences[i] for i in rows.tolist()])
            batch = self._checked(batch)
            for m in self.models:
                out[f"loss_{m.name}"][rows] = mean_token_losses(m.model, batch, lengths[rows].to(self.device),
                                                                self.precision).cpu()
        if self.with_color:
            out["color"] = out[f"loss_{self.prior}"] - out[f"loss_{self.cond}"]
        return out

    def _checked(self, tokens: torch.Tensor) -> torch.Tensor:
        if tokens.dim() != 2:
            raise DselError(f"scorer expects a [batch, window] token tensor, got shape {tuple(tokens.shape)}")
        self.check_window(tokens.shape[1])
        tokens = tokens.to(self.device, torch.long)
        if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= self.vocab_size):
            raise DselError(
                f"token id {int(tokens.max())} is outside the vocabulary (size {self.vocab_size}) of "
                + ", ".join(m.checkpoint for m in self.models)
            )
        return tokens

    def _score_model(self, model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
        """Mean token losses of every row, computed in fixed-shape micro-batches."""
        chunks = []
        for start in range(0, tokens.shape[0], self.micro_batch):
            chunk = tokens[start:start + self.micro_batch]
            rows = chunk.shape[0]
            if rows < self.micro_batch:
                chunk = torch.cat([chunk, chunk[:1].expand(self.micro_batch - rows, -1)])
            chunks.append(mean_token_losses(model, chunk, precision=self.precision)[:rows])
        return torch.cat(chunks).cpu()


def check_same_vocabulary(models: Sequence[ScoredModel]) -> None:
    """Models scored together must share one tokenizer: same vocabulary size and tokenizer_sha256."""
    first = models[0]
    for other in models[1:]:
        if other.vocab_size != first.vocab_size:
            raise DselError(
                f"models have different vocabularies: '{first.name}' ({first.checkpoint}) has "
                f"vocab_size={first.vocab_size}, '{other.name}' ({other.checkpoint}) has {other.vocab_size}"
            )
    hashes = {m.checkpoint: m.meta.get("tokenizer_sha256") for m in models}
    if len({h for h in hashes.values() if h is not None}) > 1:
        listing = ", ".join(f"{path} (tokenizer {h})" for path, h in hashes.items())
        raise DselError(f"models were trained with different tokenizers: {listing}")


def length_packed_batches(lengths: torch.Tensor, max_tokens: int) -> list[torch.Tensor]:
    """Row indices grouped into batches of similar length, each at most `max_tokens` once padded."""
    order = torch.argsort(lengths, descending=True, stable=True)
    batches, current = [], []
    for i in order.tolist():
        longest = int(lengths[current[0]]) if current else int(lengths[i])
        if current and longest * (len(current) + 1) > max_tokens:
            batches.append(torch.tensor(current))
            current = []
        current.append(i)
    if current:
        batches.append(torch.tensor(current))
    return batches


def named_checkpoints(cfg: ColorScorerConfig) -> dict[str, str]:
    """name -> checkpoint of every model to score: prior, cond, then the extra models."""
    named = {k: v for k, v in (("prior", cfg.prior), ("cond", cfg.cond)) if v}
    for name, path in cfg.models.items():
        if name in named or not name.isidentifier():
            raise DselError(f"models: '{name}' is not a usable column name (an identifier other than prior/cond)")
        named[name] = path
    if not named:
        raise DselError("no models to score: set prior and/or cond (and optionally models)")
    return named


def load_scorer(cfg: ColorScorerConfig, device):
    """A ColorScorer over the checkpoints of `cfg`, refusing models with different vocabularies."""
    from dsel.models.checkpoint import load_model

    entries = {}
    for name, path in named_checkpoints(cfg).items():
        model, meta = load_model(path, device)
        entries[name] = ScoredModel(name, model, str(path), meta)
    return ColorScorer(entries, micro_batch=cfg.micro_batch, device=device, precision=cfg.precision)


def build_scorer(cfg: dict, device):
    """Registry builder for the "color" scorer (dsel.score.scorers): cfg holds ColorScorerConfig keys."""
    return load_scorer(from_dict(ColorScorerConfig, cfg, "scorer 'color'"), device)
