"""End to end on a synthetic mixture: CoLoR ranks the target domain's windows first."""
import numpy as np
import torch

from dsel.color.finetune import finetune_model
from dsel.color.scorer import ColorScorer
from dsel.color.target import epoch_batches, split_documents
from _color_util import tiny_gpt

DOMAINS, SPAN, WINDOW = 4, 16, 17  # domain k writes tokens [16k, 16k+16) from its own Markov chain


def domain_documents(domain: int, count: int, length: int, seed: int) -> list[np.ndarray]:
    """Documents of one domain: its fixed successor table, followed 80% of the time."""
    successor = np.random.default_rng(100 + domain).permutation(SPAN)
    rng = np.random.default_rng(seed)
    docs = []
    for _ in range(count):
        doc = [rng.integers(SPAN)]
        for _ in range(length - 1):
            doc.append(successor[doc[-1]] if rng.random() < 0.8 else rng.integers(SPAN))
        docs.append(np.array(doc) + domain * SPAN)
    return docs


def full_batches(windows: torch.Tensor, batch_size: int, steps: int, seed: int):
    """`steps` random batches of whole windows (every target trained on)."""
    rng = np.random.default_rng(seed)
    mask = torch.ones(batch_size, windows.shape[1] - 1, dtype=torch.bool)
    return [(windows[rng.integers(len(windows), size=batch_size)], mask) for _ in range(steps)]


def auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """P(score of a random positive > score of a random negative)."""
    pos, neg = scores[positive], scores[~positive]
    return float((pos[:, None] > neg[None, :]).mean())


def test_color_ranks_target_domain_first():
    """The prior's slice holds little target data, as a web corpus holds few books: the target
    domain stays hard for both models, so ranking by -L_cond alone fails while CoLoR's loss
    reduction finds it."""
    pool = np.stack([w for d in range(DOMAINS) for w in domain_documents(d, 64, WINDOW, seed=d)])
    domain = np.repeat(np.arange(DOMAINS), 64)
    prior_slice = np.stack([w for d in range(DOMAINS) for w in domain_documents(d, 4 if d == 0 else 128, WINDOW, 10 + d)])
    target = split_documents(domain_documents(0, 16, 64, seed=99), WINDOW)

    prior = tiny_gpt(0)
    finetune_model(prior, full_batches(torch.as_tensor(prior_slice), 16, 150, seed=0), 150, lr=3e-3, warmup=20,
                   min_lr_ratio=0.1)
    cond = tiny_gpt(0)
    cond.load_state_dict(prior.state_dict())
    finetune_model(cond, list(epoch_batches(target, 8, 0, seed=0)), len(target) // 8, lr=1e-3)

    scores = ColorScorer({"prior": prior, "cond": cond}, micro_batch=32)(torch.as_tensor(pool))
    color, is_target = scores["color"].numpy(), domain == 0
    top = np.argsort(-color, kind="stable")[: len(color) // DOMAINS]  # tau = 4
    assert is_target[top].mean() > 0.9
    assert auc(color, is_target) > 0.9
    assert auc(-scores["loss_cond"].numpy(), is_target) < 0.5
