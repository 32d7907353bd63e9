"""Settings of the CoLoR scorer, shared by `dsel color score` and the scorer registry (no torch import)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from dsel.config import option

Precision = Literal["auto", "bf16", "fp32"]


@dataclass(kw_only=True)
class ColorScorerConfig:
    """The models scored together: the scorer settings of `dsel color score` and of the registry."""

    prior: Optional[str] = option(None, "prior model checkpoint (trained on a random slice of the corpus)")
    cond: Optional[str] = option(None, "conditional model checkpoint (the prior fine-tuned on target data)")
    models: dict[str, str] = option({}, "more models scored in the same pass, name: checkpoint (column loss_<name>)")
    micro_batch: int = option(16, "rows per forward pass; fixed so scores do not depend on batch_size")
    precision: Precision = option("auto", "auto = bf16 autocast on GPU, fp32 on CPU")
