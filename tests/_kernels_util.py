"""Shared cases and brute-force oracles for the kernel tests: full logits + torch autograd."""
import torch
import torch.nn.functional as F

# (tokens, d, vocab, sequence lengths): V off the block grid, a one-token sequence, one token alone
SHAPES = [
    (37, 24, 100, [1, 12, 24]),
    (1, 16, 17, [1]),
    (20, 40, 67, [7, 1, 12]),
]


def make_case(tokens, d, vocab, lengths, dtype=torch.float32, seed=0, device="cpu"):
    """Random hidden/head/targets with some ignored tokens, sequence ids, and random tangents."""
    gen = torch.Generator().manual_seed(seed)
    rand = lambda *shape, scale=1.0: (torch.randn(*shape, generator=gen) * scale).to(dtype).to(device)
    targets = torch.randint(0, vocab, (tokens,), generator=gen)
    if tokens > 2:
        targets[torch.randperm(tokens, generator=gen)[: tokens // 5]] = -100
    seq_ids = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    return dict(hidden=rand(tokens, d), weight=rand(vocab, d, scale=d ** -0.5), targets=targets.to(device),
                seq_ids=seq_ids.to(device), num_seqs=len(lengths), d_hidden=rand(tokens, d),
                d_weight=rand(vocab, d, scale=d ** -0.5), upstream=torch.randn(tokens, generator=gen).to(device))


def brute_loss(hidden, weight, targets):
    """Per-token loss with the full [N, V] logits in fp32 and F.cross_entropy."""
    logits = hidden.float() @ weight.float().T
    return F.cross_entropy(logits, targets, ignore_index=-100, reduction="none")


def brute_grads(hidden, weight, targets, upstream):
    """d sum(upstream * loss) / d(hidden, weight) by torch autograd through the full logits."""
    h = hidden.detach().float().requires_grad_()
    W = weight.detach().float().requires_grad_()
    return torch.autograd.grad((brute_loss(h, W, targets) * upstream).sum(), (h, W))


def brute_sequence_losses(hidden, weight, targets, seq_ids, num_seqs):
    """Mean loss over each sequence's unmasked tokens (0 for a sequence with none)."""
    loss = brute_loss(hidden, weight, targets)
    out = []
    for s in range(num_seqs):
        keep = (seq_ids == s) & (targets != -100)
        out.append(loss[keep].mean() if keep.any() else loss.new_zeros(()))
    return torch.stack(out)


def brute_sequence_dots(case):
    """grad l(x_s) . (d_hidden, d_weight) for every sequence s, one torch.autograd.grad each."""
    h = case["hidden"].detach().float().requires_grad_()
    W = case["weight"].detach().float().requires_grad_()
    dh, dW = case["d_hidden"].float(), case["d_weight"].float()
    losses = brute_sequence_losses(h, W, case["targets"], case["seq_ids"], case["num_seqs"])
    dots = []
    for loss_s in losses:
        if not loss_s.requires_grad:
            dots.append(torch.zeros(()))
            continue
        gh, gW = torch.autograd.grad(loss_s, (h, W), retain_graph=True)
        dots.append((gh * dh).sum() + (gW * dW).sum())
    return losses.detach(), torch.stack(dots)


def tol(dtype):
    """(rtol, atol) for results computed from inputs of this dtype."""
    return (2e-2, 2e-2) if dtype == torch.bfloat16 else (1e-4, 1e-5)
