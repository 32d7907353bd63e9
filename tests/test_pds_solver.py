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
from dsel.pds.solver import PMPSolver, SolverConfig, check_zero_weights, gamma_step, scorer_target

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


def _setup(batch_size=0, steps=3, checkpoint_every=1, n=6, score_every=0, target=None):
    model = tiny_lm(seed=4)
    proxy = random_tokens(n, 8, seed=5)
    target = random_tokens(3, 8, seed=6) if target is None else target
    cfg = SolverConfig(steps=steps, lr=0.3, batch_size=batch_size, micro_batch=4, checkpoint_every=checkpoint_every,
                       score_every=score_every, tf32=False)
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


def _unrolled_with_probes(model, proxy, target, gamma, lr, batches, scored_steps):
    """sum_t J(theta_t) of the unrolled SGD loop where step t in `scored_steps` also adds
    sum_n eps[t, n] * l(x_n) over ALL proxy windows: d/d eps[t, n] at 0 = -lr * grad l_n(theta_t) . lambda_{t+1}."""
    params = {k: v.detach().clone().requires_grad_(True) for k, v in model.named_parameters()}
    eps = torch.zeros(len(batches), len(proxy), dtype=torch.float64, requires_grad=True)
    objective = 0.0
    for t, ids in enumerate(batches):
        loss = (gamma[ids] * (len(proxy) / len(ids)) * reference_losses(model, params, proxy[ids])).sum()
        if t in scored_steps:
            loss = loss + (eps[t] * reference_losses(model, params, proxy)).sum()
        grads = torch.autograd.grad(loss, list(params.values()), create_graph=True)
        params = {k: p - lr * g for (k, p), g in zip(params.items(), grads)}
        objective = objective + reference_losses(model, params, target).mean()
    return objective, eps


@pytest.mark.parametrize("score_every", [1, 2, 5])
def test_fixed_step_estimator_matches_probes_in_the_unrolled_training(score_every):
    """SGD mode, score_every=k: G_n = sum_{t % k == 0} grad l_n(theta_t) . lambda_{t+1} for every window,
    drawn or not, against autograd through the unrolled loop with a zero-weight probe per window and step."""
    model, proxy, target, cfg, solver, gamma = _setup(batch_size=2, steps=5, score_every=score_every)
    assert solver.estimator == "fixed-step"
    dots, objective = solver.gamma_gradient(gamma)
    scored = set(range(0, cfg.steps, score_every))
    with sdpa_kernel([SDPBackend.MATH]):
        reference, eps = _unrolled_with_probes(model, torch.as_tensor(proxy), torch.as_tensor(target),
                                               torch.as_tensor(gamma), cfg.lr, solver.batches, scored)
        (d_eps,) = torch.autograd.grad(reference, eps)
    assert objective == pytest.approx(reference.item(), rel=1e-12)
    expected = -d_eps.numpy().sum(axis=0) / cfg.lr
    np.testing.assert_allclose(dots, expected, rtol=1e-8, atol=1e-12)
    assert np.all(dots != 0)  # every window is scored, also those never drawn at a scored step


def test_padded_target_examples_give_each_example_its_own_mean_loss():
    """J = mean over examples of each one's mean token loss; padding changes neither J nor G."""
    lengths = (8, 5, 3)
    docs = [random_tokens(1, n, seed=10 + n)[0] for n in lengths]
    *_, padded, gamma = _setup(target=docs)
    model = padded.lm.trunk.model
    expected_j = np.mean([reference_losses(model, dict(model.named_parameters()),
                                           torch.as_tensor(d)[None]).item() for d in docs])
    j, _ = padded.target_gradient(padded.theta0)
    assert j == pytest.approx(expected_j, rel=1e-12)
    dots, objective = padded.gamma_gradient(gamma)
    # reference: the same solve with J as the mean of three single-example solvers' J (no padding anywhere)
    singles = [_setup(target=d[None])[4] for d in docs]
    per_doc = [s.gamma_gradient(gamma) for s in singles]
    np.testing.assert_allclose(dots, np.mean([d for d, _ in per_doc], axis=0), rtol=1e-9)
    assert objective == pytest.approx(np.mean([o for _, o in per_doc]), rel=1e-12)


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
    seen = []
    results = solver.solve(on_epoch=lambda e, r: seen.append((e, r.gamma.copy(), r.objective)))
    gamma = results[-1].gamma
    assert [e for e, _, _ in seen] == [0, 1]
    assert gamma.sum() == pytest.approx(1.0) and gamma.min() >= 0
    assert not np.allclose(gamma, 1 / len(gamma))
    resumed = solver.solve(seen[0][1], start_epoch=1)
    np.testing.assert_allclose(resumed[-1].gamma, gamma, rtol=1e-12)
    np.testing.assert_allclose(resumed[-1].G, results[-1].G, rtol=1e-12)


def test_gamma_step_is_free_of_the_scale_and_size_of_G():
    """alpha is in units of G's spread: scaling G, or repeating the proxy set, gives the same weights."""
    G = np.random.default_rng(0).normal(size=40)
    uniform = np.full(40, 1 / 40)
    step = gamma_step(uniform, G, 0.5)
    np.testing.assert_allclose(gamma_step(uniform, 1e-6 * G + 3.0, 0.5), step, rtol=1e-9)
    tiled = gamma_step(np.full(400, 1 / 400), np.tile(G, 10), 0.5)
    np.testing.assert_allclose(tiled[:40] * 10, step, rtol=1e-9)
    z = (G - G.mean()) / G.std()  # from uniform, the projection keeps (1 + alpha z) / N where it is positive
    kept = step > 0
    np.testing.assert_allclose(np.diff(step[kept]), np.diff((1 + 0.5 * z[kept]) / 40), atol=1e-12)
    assert set(np.nonzero(~kept)[0]) <= set(np.nonzero(z < -1 / 0.5 + 0.5)[0])


def test_zscore_target_is_standardised_and_clipped():
    G = np.concatenate([np.random.default_rng(1).normal(size=200), [40.0, -40.0]])
    target = scorer_target("zscore", G, np.full(202, 1 / 202), clip=3.0)
    expected = np.clip((G - G.mean()) / G.std(), -3, 3)
    np.testing.assert_allclose(target, expected, rtol=1e-12)
    assert target.max() == 3.0 and target.min() == -3.0
    gamma = np.random.default_rng(2).dirichlet(np.ones(202))
    np.testing.assert_allclose(scorer_target("gamma", G, gamma, 3.0), (gamma - gamma.mean()) / gamma.std())


def test_degenerate_outcomes_stop_with_the_setting_to_change():
    with pytest.raises(DselError, match="G has no spread over the 5 proxy windows.*solver.lr or solver.steps"):
        scorer_target("zscore", np.full(5, 0.3) + 1e-12 * np.arange(5), np.full(5, 0.2), 3.0)
    with pytest.raises(DselError, match="no spread"):
        scorer_target("zscore", np.zeros(5), np.full(5, 0.2), 3.0)
    gamma = np.zeros(10)
    gamma[:4] = 0.25
    with pytest.raises(DselError, match="6 of 10 proxy windows have weight 0 after outer epoch 2.*solver.alpha"):
        check_zero_weights(gamma, 2)
    check_zero_weights(np.where(np.arange(10) < 5, 0.2, 0.0), 0)  # exactly half is still allowed
    *_, solver, _ = _setup()
    solver.config.alpha, solver.config.target_kind = 50.0, "gamma"
    with pytest.raises(DselError, match="have weight 0 after outer epoch 0"):
        solver.solve()


def test_gamma_moves_toward_copies_of_target_data():
    """Proxy = copies of target windows (a counting pattern) + noise; gamma and G should favour the copies."""
    rng = np.random.default_rng(0)
    vocab, length = 13, 12
    target = np.stack([(np.arange(length) + o) % 6 for o in range(6)])
    noise = rng.integers(6, vocab, size=(6, length))
    proxy = np.concatenate([target, noise])
    cfg = SolverConfig(steps=4, lr=0.5, outer_epochs=3, alpha=0.5, micro_batch=12, tf32=False)
    solver = PMPSolver(tiny_lm(seed=1, vocab_size=vocab), proxy, target, cfg, show_progress=False)
    results = solver.solve()
    assert results[-1].gamma[:6].sum() > 0.6
    assert results[-1].objective < results[0].objective
    assert scorer_target("zscore", results[0].G, results[0].gamma, 3.0)[:6].min() > 0


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


@pytest.mark.parametrize("batch_size,score_every", [(0, 0), (2, 2)])
def test_proxy_loss_is_tracked_and_a_non_descending_inner_training_stops(batch_size, score_every, monkeypatch):
    """The gamma-weighted proxy loss is recorded where all of it is known (every step in full batch, the
    scored steps of the fixed-step estimator), equals the reference at theta_0, and a step size under which it
    does not fall stops the solve with one line naming solver.lr (full batch: before the backward pass)."""
    model, proxy, target, cfg, solver, gamma = _setup(batch_size=batch_size, steps=5, score_every=score_every)
    solver.gamma_gradient(gamma)
    expected_steps = range(5) if batch_size == 0 else range(0, 5, score_every)
    assert sorted(solver.proxy_loss) == list(expected_steps)
    with torch.no_grad():
        own = {k: v for k, v in model.named_parameters()}
        at_start = float((torch.as_tensor(gamma) * reference_losses(model, own, torch.as_tensor(proxy))).sum())
    assert solver.proxy_loss[0] == pytest.approx(at_start, rel=1e-10)
    assert solver.proxy_loss[max(solver.proxy_loss)] < at_start

    solver.config.lr = 60.0
    if batch_size == 0:
        monkeypatch.setattr(PMPSolver, "backward", lambda *a: pytest.fail("backward ran after a failed descent"))
    with pytest.raises(DselError, match=r"inner training does not descend: its proxy loss rose from .* in outer epoch 0.*lower solver.lr \(now 60"):
        solver.gamma_gradient(gamma)
