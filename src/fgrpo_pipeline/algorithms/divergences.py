"""The six f-divergences of spec §2, each with its conjugate and link, in a registry.

For a convex ``f`` with ``f(1) = 0``, ``D_f(P‖Q) = E_Q[f(dP/dQ)]`` and, variationally,
``D_f(P‖Q) = sup_T E_P[T] − E_Q[f*(T)]``. The critic is written ``T = g(r)`` with a monotone
link ``g`` from a real score ``r`` (here the implicit reward r_θ) into ``dom f*``.

Every method is elementwise on torch tensors. ``conjugate_of_link(r)`` is the closed form
of ``f*(g(r))`` (softplus, never ``log(1 + exp)``): it stays finite, with finite gradients,
for |r| up to 50 where composing ``conjugate(link(r))`` can overflow or cancel.

Look one up with :func:`get_divergence`; add one with ``@DIVERGENCES.register("name")``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from fgrpo_pipeline.algorithms.registry import Registry

LN2 = math.log(2.0)


class Divergence:
    """An f-divergence: generator ``f``, conjugate ``f*``, link ``g`` and ``f*∘g``.

    ``conjugate_domain`` and ``link_range`` are the (low, high) bounds of ``dom f*`` and of
    the image of ``g``; the image of ``g`` lies inside ``dom f*``.
    """

    name: str = ""
    conjugate_domain: tuple[float, float] = (-math.inf, math.inf)
    link_range: tuple[float, float] = (-math.inf, math.inf)

    def f(self, t: Tensor) -> Tensor:
        """The generator ``f(t)`` for a density ratio ``t ≥ 0``."""
        raise NotImplementedError

    def f_prime(self, t: Tensor) -> Tensor:
        """``f'(t)`` (a subgradient where ``f`` has a kink): the optimal critic at ratio t."""
        raise NotImplementedError

    def conjugate(self, s: Tensor) -> Tensor:
        """``f*(s) = sup_t s·t − f(t)``; ``+inf`` outside ``dom f*``."""
        raise NotImplementedError

    def link(self, r: Tensor) -> Tensor:
        """The monotone link ``g(r)`` mapping a real score into ``dom f*``."""
        raise NotImplementedError

    def link_inverse(self, s: Tensor) -> Tensor:
        """``g⁻¹(s)``; values at the edge of the link's range map to ±inf."""
        raise NotImplementedError

    def conjugate_of_link(self, r: Tensor) -> Tensor:
        """Closed form of ``f*(g(r))``, numerically stable for large |r|."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"Divergence({self.name!r})"


DIVERGENCES: Registry[Divergence] = Registry("divergence")


def _register(cls: type[Divergence]) -> type[Divergence]:
    DIVERGENCES.register(cls.name)(cls())
    return cls


@_register
class KL(Divergence):
    """Kullback–Leibler: f(t) = t ln t, f*(s) = e^{s−1}, identity link."""

    name = "kl"

    def f(self, t):
        return torch.xlogy(t, t)

    def f_prime(self, t):
        return torch.log(t) + 1.0

    def conjugate(self, s):
        return torch.exp(s - 1.0)

    def link(self, r):
        return r

    def link_inverse(self, s):
        return s

    def conjugate_of_link(self, r):
        return torch.exp(r - 1.0)


@_register
class ReverseKL(Divergence):
    """Reverse KL: f(t) = −ln t, f*(s) = −1 − ln(−s) on s < 0, link −e^{−r}."""

    name = "reverse_kl"
    conjugate_domain = (-math.inf, 0.0)
    link_range = (-math.inf, 0.0)

    def f(self, t):
        return -torch.log(t)

    def f_prime(self, t):
        return -1.0 / t

    def conjugate(self, s):
        inside = s < 0
        value = -1.0 - torch.log(torch.where(inside, -s, torch.ones_like(s)))
        return torch.where(inside, value, torch.full_like(s, math.inf))

    def link(self, r):
        return -torch.exp(-r)

    def link_inverse(self, s):
        return -torch.log(-s)

    def conjugate_of_link(self, r):
        return r - 1.0


@_register
class Pearson(Divergence):
    """Pearson χ²: f(t) = (t − 1)², f*(s) = s + s²/4 for s ≥ −2 (else −1), identity link."""

    name = "pearson"

    def f(self, t):
        return (t - 1.0) ** 2

    def f_prime(self, t):
        return 2.0 * (t - 1.0)

    def conjugate(self, s):
        # dom f = [0, ∞): below s = −2 the supremum sits at t = 0, where it is −f(0) = −1.
        return torch.where(s >= -2.0, s + s * s / 4.0, torch.full_like(s, -1.0))

    def link(self, r):
        return r

    def link_inverse(self, s):
        return s

    def conjugate_of_link(self, r):
        return self.conjugate(r)


@_register
class SquaredHellinger(Divergence):
    """Squared Hellinger: f(t) = (√t − 1)², f*(s) = s/(1 − s) on s < 1, link 1 − e^{−r/2}."""

    name = "hellinger"
    conjugate_domain = (-math.inf, 1.0)
    link_range = (-math.inf, 1.0)

    def f(self, t):
        return (torch.sqrt(t) - 1.0) ** 2

    def f_prime(self, t):
        return 1.0 - 1.0 / torch.sqrt(t)

    def conjugate(self, s):
        inside = s < 1
        safe = torch.where(inside, s, torch.zeros_like(s))
        return torch.where(inside, safe / (1.0 - safe), torch.full_like(s, math.inf))

    def link(self, r):
        return -torch.expm1(-r / 2.0)

    def link_inverse(self, s):
        return -2.0 * torch.log1p(-s)

    def conjugate_of_link(self, r):
        return torch.expm1(r / 2.0)


@_register
class JensenShannon(Divergence):
    """Jensen–Shannon (GAN form): f(t) = t ln t − (1+t) ln((1+t)/2), link ln 2 − softplus(−r)."""

    name = "jensen_shannon"
    conjugate_domain = (-math.inf, LN2)
    link_range = (-math.inf, LN2)

    def f(self, t):
        return torch.xlogy(t, t) - (1.0 + t) * (torch.log1p(t) - LN2)

    def f_prime(self, t):
        return torch.log(2.0 * t / (1.0 + t))

    def conjugate(self, s):
        inside = s < LN2
        safe = torch.where(inside, s, torch.zeros_like(s))
        return torch.where(inside, -torch.log(2.0 - torch.exp(safe)), torch.full_like(s, math.inf))

    def link(self, r):
        return LN2 - F.softplus(-r)

    def link_inverse(self, s):
        # g(r) = ln(2σ(r)) ⇒ σ(r) = e^s / 2.
        half = torch.exp(s) / 2.0
        return torch.log(half) - torch.log1p(-half)

    def conjugate_of_link(self, r):
        return F.softplus(r) - LN2


@_register
class TotalVariation(Divergence):
    """Total variation: f(t) = ½|t − 1|, f*(s) = s on |s| ≤ ½, link σ(r) − ½."""

    name = "total_variation"
    conjugate_domain = (-0.5, 0.5)
    link_range = (-0.5, 0.5)

    def f(self, t):
        return 0.5 * torch.abs(t - 1.0)

    def f_prime(self, t):
        return 0.5 * torch.sign(t - 1.0)

    def conjugate(self, s):
        return torch.where(torch.abs(s) <= 0.5, s, torch.full_like(s, math.inf))

    def link(self, r):
        return torch.sigmoid(r) - 0.5

    def link_inverse(self, s):
        return torch.logit(s + 0.5)

    def conjugate_of_link(self, r):
        return torch.sigmoid(r) - 0.5


def get_divergence(name: str) -> Divergence:
    """The divergence registered as ``name``; ``ValueError`` listing valid names otherwise."""
    return DIVERGENCES.get(name)


def divergence_names() -> list[str]:
    return DIVERGENCES.names()


def f_divergence(p: Tensor, q: Tensor, divergence: Divergence | str) -> Tensor:
    """``D_f(P‖Q) = Σ_x q(x) f(p(x)/q(x))`` for discrete distributions with full support."""
    div = get_divergence(divergence) if isinstance(divergence, str) else divergence
    return torch.sum(q * div.f(p / q))


def variational_bound(
    p: Tensor, q: Tensor, critic_scores: Tensor, divergence: Divergence | str
) -> Tensor:
    """``E_P[g(r)] − E_Q[f*(g(r))]`` for a critic ``r`` over a discrete support (≤ D_f)."""
    div = get_divergence(divergence) if isinstance(divergence, str) else divergence
    return torch.sum(p * div.link(critic_scores)) - torch.sum(
        q * div.conjugate_of_link(critic_scores)
    )
