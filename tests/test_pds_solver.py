"""The PMP solver against independent references: per-example autograd, reverse mode through the
unrolled training loop, finite differences, and store-all vs recompute-from-checkpoint."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from dsel.errors import DselError
from dsel.pds.functional import FunctionalLM
from dsel.pds.simplex import project_to_simplex
from dsel.pds.solver import PMPSolver, SolverConfig

from _pds_util import random_tokens, reference_losses, tiny_lm


def _random_vector(params, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=gen, dtype=v.dtype) for k, v in params.items()}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_example_dots_match_per_example_backward(dtype):
    """fp64 runs the plain-torch head (exact); fp32 runs the fused kernels.linear_cross_entropy_jvp."""
    model = tiny_lm(dtype=dtype)
    lm = FunctionalLM(model)
    params = lm.initial_params()
    vector = _random_vector(params)
    tokens = torch.as_tensor(random_tokens(5, 9))
    losses, dots = lm.example_dots(params, tokens, vector)
    own = {k.removeprefix("model."): v for k, v in params.items()}
    rel = 1e-9 if dtype == torch.float64 else 1e-4
    for n in range(len(tokens)):
        leaves = {k: v.clone().requires_grad_(True) for k, v in own.items()}
        loss = reference_losses(model, leaves, tokens[n : n + 1])[0]
        grads = torch.autograd.grad(loss, list(leaves.values()))
        expected = sum((g * vector[f"model.{k}"]).sum() for k, g in zip(leaves, grads))
        assert losses[n].item() == pytest.approx(loss.item(), rel=rel)
        assert dots[n].item() == pytest.approx(expected.item(), rel=rel, abs=rel * 1e-3)


def test_hvp_matches_autograd_functional():
    model = tiny_lm()
    lm = FunctionalLM(model)
    params = lm.initial_params()
    vector = _random_vector(params, seed=2)
    tokens = torch.as_tensor(random_tokens(3, 7, seed=3))
    weights = torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64)
    product = lm.hvp(params, tokens, weights, vector)
    names = list(params)

    def weighted_loss(*values):
        own = {k.removeprefix("model."): v for k, v in zip(names, values)}
        return (weights * reference_losses(model, own, tokens)).sum()

    with sdpa_kernel([SDPBackend.MATH]):
        _, expected = torch.autograd.functional.hvp(weighted_loss, tuple(params.values()), tuple(vector.values()))
    for name, e in zip(names, expected):
        torch.testing.assert_close(product[name], e, rtol=1e-9, atol=1e-12)


def _unrolled_objective(model, proxy, target, gamma, lr, batches, create_graph):
    """sum_{t=1..T} J(theta_t) by plain autograd through the unrolled weighted (S)GD loop."""
    params = {k: v.detach().clone().requires_grad_(True) for k, v in model.named_parameters()}
    objective = 0.0
    for ids in batches:
        weights = gamma[ids] * (len(proxy) / len(ids))
        loss = (weights * reference_losses(model, params, proxy[ids])).sum()
        grads = torch.autograd.grad(loss, list(params.values()), create_graph=create_graph)
        params = {k: p - lr * g for (k, p), g in zip(params.items(), grads)}
        if not create_graph:
            params = {k: p.detach().requires_grad_(True) for k, p in params.items()}
        objective = objective + reference_losses(model, params, target).mean()
    return objective


def _setup(batch_size=0, steps=3, checkpoint_every=1, n=6):
    model = tiny_lm(seed=4)
    proxy = random_tokens(n, 8, seed=5)
    target = random_tokens(3, 8, seed=6)
    cfg = SolverConfig(steps=steps, lr=0.3, batch_size=batch_size, micro_batch=4, checkpoint_every=checkpoint_every,
                       tf32=False)
    solver = PMPSolver(model, proxy, target, cfg, show_progress=False)
    gamma = np.random.default_rng(7).dirichlet(np.ones(n))
    return model, proxy, target, cfg, solver, gamma


@pytest.mark.parametrize("batch_size", [0, 4])
def test_gamma_gradient_matches_reverse_mode_through_unrolled_training(batch_size):
    model, proxy, target, cfg, solver, gamma = _setup(batch_size=batch_size)
    dots, objective = solver.gamma_gradient(gamma)
    gamma_t = torch.tensor(gamma, requires_grad=True)
    with sdpa_kernel([SDPBackend.MATH]):
        reference = _unrolled_objective(model, torch.as_tensor(proxy), torch.as_tensor(target), gamma_t,
                                        cfg.lr, solver.batches, create_graph=True)
        (d_gamma,) = torch.autograd.grad(reference, gamma_t)
    assert objective == pytest.approx(reference.item(), rel=1e-12)
    np.testing.assert_allclose(dots, -d_gamma.numpy() / cfg.lr, rtol=1e-8, atol=1e-12)
    if batch_size:  # examples outside every batch get no gradient
        unused = np.setdiff1d(np.arange(len(proxy)), np.concatenate(solver.batches))
        assert np.all(dots[unused] == 0)


def test_gamma_gradient_matches_finite_differences():
    model, proxy, target, cfg, solver, gamma = _setup()
    dots, _ = solver.gamma_gradient(gamma)
    eps = 1e-6

    def objective(g):
        return _unrolled_objective(model, torch.as_tensor(proxy), torch.as_tensor(target), torch.as_tensor(g),
                                   cfg.lr, solver.batches, create_graph=False).item()

    for n in (0, 3):
        e = np.zeros_like(gamma)
        e[n] = eps
        fd = (objective(gamma + e) - objective(gamma - e)) / (2 * eps)
        assert dots[n] == pytest.approx(-fd / cfg.lr, rel=1e-5)


def test_recompute_from_checkpoints_matches_store_all():
    results = []
    for k in (1, 2, 6):
        *_, solver, gamma = _setup(steps=5, checkpoint_every=k)
        kept = solver.forward(gamma)
        assert sorted(kept) == sorted({0, 5} | set(range(0, 6, k)))
        results.append(solver.backward(gamma, kept))
    for dots, objective in results[1:]:
        np.testing.assert_array_equal(dots, results[0][0])
        assert objective == results[0][1]


def test_solve_keeps_gamma_on_simplex_and_resumes():
    *_, solver, _ = _setup()
    solver.config.outer_epochs = 2
    solver.config.alpha = 0.05
    seen = []
    gamma = solver.solve(on_epoch=lambda e, g, obj: seen.append((e, g.copy(), obj)))
    assert [e for e, _, _ in seen] == [0, 1]
    assert gamma.sum() == pytest.approx(1.0) and gamma.min() >= 0
    assert not np.allclose(gamma, 1 / len(gamma))
    resumed = solver.solve(seen[0][1], start_epoch=1)
    np.testing.assert_allclose(resumed, gamma, rtol=1e-12)


def test_gamma_moves_toward_copies_of_target_data():
    """Proxy = copies of target windows (a counting pattern) + noise; gamma should favour the copies."""
    rng = np.random.default_rng(0)
    vocab, length = 13, 12
    target = np.stack([(np.arange(length) + o) % 6 for o in range(6)])
    noise = rng.integers(6, vocab, size=(6, length))
    proxy = np.concatenate([target, noise])
    cfg = SolverConfig(steps=4, lr=0.5, outer_epochs=3, alpha=0.02, micro_batch=12, tf32=False)
    solver = PMPSolver(tiny_lm(seed=1, vocab_size=vocab), proxy, target, cfg, show_progress=False)
    objectives = []
    gamma = solver.solve(on_epoch=lambda e, g, obj: objectives.append(obj))
    assert gamma[:6].sum() > 0.9
    assert objectives[-1] < objectives[0]


def test_nan_training_loss_names_the_step():
    model, proxy, target, cfg, _, gamma = _setup()
    with torch.no_grad():
        model.embed.weight[int(proxy[0, 0])] = float("nan")
    solver = PMPSolver(model, proxy, target, cfg, show_progress=False)
    with pytest.raises(DselError, match=r"loss is nan at inner step 0 of outer epoch 0"):
        solver.gamma_gradient(gamma)


def test_gamma_of_wrong_length_is_rejected():
    *_, solver, gamma = _setup()
    with pytest.raises(DselError, match="proxy set has 6 windows"):
        solver.gamma_gradient(gamma[:-1])


def _bisection_projection(v, iters=200):
    """Independent reference: the threshold tau with sum(max(v - tau, 0)) = 1, found by bisection."""
    lo, hi = v.min() - 1.0, v.max()
    for _ in range(iters):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if np.maximum(v - mid, 0).sum() > 1 else (lo, mid)
    return np.maximum(v - (lo + hi) / 2, 0)


@pytest.mark.parametrize("seed", range(4))
def test_simplex_projection_matches_bisection(seed):
    rng = np.random.default_rng(seed)
    v = rng.normal(scale=[0.01, 1, 10, 100][seed], size=50) + 1 / 50
    p = project_to_simplex(v)
    np.testing.assert_allclose(p, _bisection_projection(v), atol=1e-10)
    assert p.sum() == pytest.approx(1.0) and p.min() >= 0
    point_on_simplex = rng.dirichlet(np.ones(50))
    np.testing.assert_allclose(project_to_simplex(point_on_simplex), point_on_simplex, atol=1e-15)


def test_fp32_solver_with_fused_kernels_matches_fp64():
    model, proxy, target, cfg, solver, gamma = _setup()
    solver32 = PMPSolver(model.float(), proxy, target, cfg, show_progress=False)
    expected, objective = solver.gamma_gradient(gamma)
    dots, objective32 = solver32.gamma_gradient(gamma)
    np.testing.assert_allclose(dots, expected, rtol=1e-3, atol=1e-4 * np.abs(expected).max())
    assert objective32 == pytest.approx(objective, rel=1e-5)
