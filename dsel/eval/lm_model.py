"""lm-eval model `dsel`: a dsel GPT checkpoint (or a transformers folder) plus its tokenizer (dsel.data.tokenizer).

Importing this module registers the model with lm-eval (`@register_model("dsel")`); lm-eval has
no plugin discovery, so `python -m dsel.eval.lm_eval` / `dsel eval lm-eval` import it first:

    python -m dsel.eval.lm_eval --model dsel --model_args checkpoint=runs/x/model --tasks dsel_science_facts

Documents were trained with an EOD token after each one, so EOD is the prefix token that opens an
empty context and the token that ends a generation. Contexts longer than the model's context
length keep their last tokens.
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from dsel.errors import DselError
from dsel.io import progress

log = logging.getLogger(__name__)


def pick_device(device: str) -> torch.device:
    """dsel's device rule, except that lm-eval's command line asks for cuda by default: fall back to the CPU."""
    from dsel.device import resolve_device

    if device.startswith("cuda") and not torch.cuda.is_available():
        log.warning("device=%s requested but no GPU is available: evaluating on the CPU", device)
        device = "cpu"
    return resolve_device(device)


@register_model("dsel")
class DselLM(TemplateLM):
    """loglikelihood, loglikelihood_rolling and greedy generate_until for a dsel GPT checkpoint."""

    def __init__(self, checkpoint: str, tokenizer: str | None = None, device: str = "cpu", batch_size: int | str = 16,
                 max_gen_toks: int = 64, **kwargs):
        super().__init__()
        from dsel.data.meta import tokenizer_mismatch
        from dsel.data.tokenizer import load_tokenizer
        from dsel.models.checkpoint import load_model

        device = pick_device(str(device))
        model, meta = load_model(checkpoint, device)
        if not hasattr(model, "head_weight") or model.arch != "gpt":
            raise DselError(f"{checkpoint}: holds a '{model.arch}' model; lm-eval needs a GPT language model")
        tokenizer = tokenizer or meta.get("tokenizer")
        if not tokenizer:
            raise DselError(f"{checkpoint}: checkpoint records no tokenizer; pass --model_args tokenizer=PATH")
        self.model = model.eval()
        self.sp = load_tokenizer(tokenizer)
        key = tokenizer_mismatch(meta, self.sp.identity())
        if key:
            raise DselError(f"{tokenizer}: not the tokenizer {checkpoint} was trained with ({key} "
                            f"{self.sp.identity()[key]!r}, the checkpoint's {meta[key]!r})")
        if self.sp.vocab_size > model.config.vocab_size:
            raise DselError(f"{tokenizer}: {self.sp.vocab_size} tokens do not fit the model's vocabulary of "
                            f"{model.config.vocab_size}")
        self._device = device
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 16  # lm-eval may pass "auto"
        self.max_gen_toks = int(max_gen_toks)
        self.max_length = model.config.seq_len

    @property
    def eot_token_id(self) -> int:
        return self.sp.eod_id

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.sp.encode([string])[0]

    def tok_decode(self, tokens) -> str:
        return self.sp.decode(tokens)

    @torch.no_grad()
    def continuation_logprobs(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """(sum of log p(continuation | context), whether greedy decoding yields it) per token pair.

        Sequences are cut to the model's context from the left, batched longest first and padded
        on the right (causal attention keeps padding out of every scored position).
        """
        results: list[tuple[float, bool] | None] = [None] * len(pairs)
        order = sorted(range(len(pairs)), key=lambda i: -len(pairs[i][0]) - len(pairs[i][1]))
        for start in range(0, len(order), self.batch_size):
            batch = order[start:start + self.batch_size]
            inputs = [(pairs[i][0] + pairs[i][1])[-(self.max_length + 1):][:-1] for i in batch]
            width = max(len(x) for x in inputs)
            tokens = torch.full((len(batch), width), self.eot_token_id, dtype=torch.long)
            for row, x in enumerate(inputs):
                tokens[row, :len(x)] = torch.tensor(x)
            logprobs = F.log_softmax(self.model(tokens.to(self.device)).float(), dim=-1).cpu()
            for row, i in enumerate(batch):
                continuation = torch.tensor(pairs[i][1])
                end = len(inputs[row])
                rows = logprobs[row, end - len(continuation):end]
                total = rows.gather(1, continuation[:, None]).sum().item()
                results[i] = (total, bool((rows.argmax(dim=-1) == continuation).all()))
        return results

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        pairs = [(context, continuation) for _, context, continuation in requests]
        if any(not 0 < len(c) <= self.max_length for _, c in pairs):
            raise DselError(f"lm-eval asked for a continuation of 0 or more than {self.max_length} tokens")
        return self.continuation_logprobs(pairs)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of whole strings, scored in disjoint windows of the model's context."""
        totals = []
        for request in progress(requests, desc="loglikelihood_rolling", disable=disable_tqdm):
            windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                self.tok_encode(request.args[0]), self.prefix_token_id, self.max_length, context_len=1)]
            totals.append(sum(logprob for logprob, _ in self.continuation_logprobs(windows)))
        return totals

    @torch.no_grad()
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy continuation of each context until a stop string, EOD or max_gen_toks tokens (KV-cached decoding)."""
        from dsel.models.generate import greedy_generate

        outputs = []
        for request in progress(requests, desc="generate_until", disable=disable_tqdm):
            context, gen_kwargs = request.args
            until = gen_kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            generated = greedy_generate(self.model, self.tok_encode(context) or [self.prefix_token_id],
                                        int(gen_kwargs.get("max_gen_toks", self.max_gen_toks)),
                                        stop=lambda ids: any(stop in self.tok_decode(ids) for stop in until),
                                        eos_id=self.eot_token_id)
            text = self.tok_decode(generated)
            for stop in until:
                text = text.split(stop)[0]
            outputs.append(text)
        return outputs
