"""Properties every f-divergence of spec §2 must satisfy."""

import math

import pytest
import torch

from fgrpo_pipeline.algorithms.divergences import (
    divergence_names,
    f_divergence,
    get_divergence,
    variational_bound,
)

NAMES = ["kl", "reverse_kl", "pearson", "hellinger", "jensen_shannon", "total_variation"]
T_GRID = torch.logspace(-3, 3, 401, dtype=torch.float64)
R_GRID = torch.linspace(-50, 50, 2001, dtype=torch.float64)


def test_registry_has_exactly_the_six_names():
    assert divergence_names() == NAMES


def test_unknown_name_lists_valid_ones():
    with pytest.raises(ValueError, match="unknown divergence 'chi2'") as err:
        get_divergence("chi2")
    for name in NAMES:
        assert name in str(err.value)


@pytest.mark.parametrize("name", NAMES)
def test_f_vanishes_at_one(name):
    assert get_divergence(name).f(torch.tensor(1.0, dtype=torch.float64)).item() == pytest.approx(
        0.0, abs=1e-12
    )


@pytest.mark.parametrize("name", NAMES)
def test_f_is_convex_on_a_grid(name):
    f = get_divergence(name).f
    t = torch.linspace(1e-3, 20, 4001, dtype=torch.float64)
    values = f(t)
    # Midpoint convexity on every consecutive triple of an evenly spaced grid.
    second_difference = values[:-2] - 2 * values[1:-1] + values[2:]
    assert (second_difference >= -1e-12).all()
    # And for random far-apart pairs.
    gen = torch.Generator().manual_seed(0)
    a, b = torch.rand(2, 500, generator=gen, dtype=torch.float64) * 50
    lam = torch.rand(500, generator=gen, dtype=torch.float64)
    assert (f(lam * a + (1 - lam) * b) <= lam * f(a) + (1 - lam) * f(b) + 1e-9).all()


@pytest.mark.parametrize("name", NAMES)
def test_link_is_increasing_and_inside_conjugate_domain(name):
    div = get_divergence(name)
    r = torch.linspace(-30, 30, 3001, dtype=torch.float64)
    s = div.link(r)
    assert (torch.diff(s) >= 0).all()
    assert (torch.diff(s)[torch.abs(r[1:]) < 10] > 0).all()
    low, high = div.conjugate_domain
    assert (s >= low).all() and (s <= high).all()
    assert torch.isfinite(div.conjugate(s)).all()


@pytest.mark.parametrize("name", NAMES)
def test_fenchel_young_inequality(name):
    div = get_divergence(name)
    s = div.link(torch.linspace(-8, 8, 161, dtype=torch.float64)).unsqueeze(1)
    t = T_GRID.unsqueeze(0)
    gap = div.conjugate(s) - (s * t - div.f(t))
    assert (gap >= -1e-9 * (1 + torch.abs(s * t))).all()


@pytest.mark.parametrize("name", NAMES)
def test_fenchel_young_is_tight_at_the_derivative(name):
    """f*(f'(t)) = t·f'(t) − f(t): the supremum is attained at t."""
    div = get_divergence(name)
    t = torch.logspace(-2, 2, 101, dtype=torch.float64)
    t = t[torch.abs(t - 1) > 1e-6]  # total variation's f' jumps at 1
    s = div.f_prime(t)
    torch.testing.assert_close(div.conjugate(s), s * t - div.f(t), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name", NAMES)
def test_conjugate_of_link_matches_composition(name):
    div = get_divergence(name)
    r = torch.linspace(-20, 20, 801, dtype=torch.float64)
    composed = div.conjugate(div.link(r))
    closed = div.conjugate_of_link(r)
    finite = torch.isfinite(composed)
    assert finite.float().mean() > 0.9
    torch.testing.assert_close(closed[finite], composed[finite], rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_values_and_gradients_finite_for_large_scores(name, dtype):
    div = get_divergence(name)
    r = R_GRID.to(dtype).clone().requires_grad_(True)
    total = div.link(r).sum() + div.conjugate_of_link(r).sum()
    total.backward()
    assert torch.isfinite(div.link(r)).all()
    assert torch.isfinite(div.conjugate_of_link(r)).all()
    assert torch.isfinite(r.grad).all()


@pytest.mark.parametrize("name", NAMES)
def test_link_inverse_round_trips(name):
    div = get_divergence(name)
    r = torch.linspace(-5, 5, 101, dtype=torch.float64)
    torch.testing.assert_close(div.link_inverse(div.link(r)), r, rtol=1e-7, atol=1e-7)


def _random_distributions(seed: int, k: int = 7):
    gen = torch.Generator().manual_seed(seed)
    p = torch.rand(k, generator=gen, dtype=torch.float64) + 0.05
    q = torch.rand(k, generator=gen, dtype=torch.float64) + 0.05
    return p / p.sum(), q / q.sum()


def _optimal_critic(div, p, q):
    """r* = g⁻¹(f'(P/Q)), kept finite where f' sits on the edge of the link's range (TV)."""
    s = div.f_prime(p / q)
    low, high = div.link_range
    margin = 1e-12
    s = torch.clamp(s, min=low + margin if math.isfinite(low) else None, max=high - margin)
    return div.link_inverse(s)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("seed", range(5))
def test_variational_bound_is_tight_at_the_optimal_critic(name, seed):
    div = get_divergence(name)
    p, q = _random_distributions(seed)
    exact = f_divergence(p, q, div)
    assert exact > 0
    bound = variational_bound(p, q, _optimal_critic(div, p, q), div)
    assert bound.item() == pytest.approx(exact.item(), abs=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_random_critics_never_exceed_the_divergence(name):
    div = get_divergence(name)
    gen = torch.Generator().manual_seed(123)
    for seed in range(10):
        p, q = _random_distributions(seed)
        exact = f_divergence(p, q, div)
        critics = torch.randn(200, p.numel(), generator=gen, dtype=torch.float64) * 3
        bounds = torch.stack([variational_bound(p, q, c, div) for c in critics])
        assert (bounds <= exact + 1e-10).all()
        # the optimum is strictly better than typical random critics
        assert bounds.max() < variational_bound(p, q, _optimal_critic(div, p, q), div) + 1e-10


def test_f_divergence_of_identical_distributions_is_zero():
    p, _ = _random_distributions(0)
    for name in NAMES:
        assert f_divergence(p, p, name).item() == pytest.approx(0.0, abs=1e-12)
