"""Alignment losses on plain tensors (spec §3–§6), looked up by name.

Public functions (sequence-level inputs are sums of response-token log-probabilities,
shape [N]; prompt and padding tokens already masked out):

* :func:`f_grpo_loss` — on-policy f-GRPO (spec §4).
* :func:`fdo_loss` — offline f-divergence optimisation on aligned / unaligned samples (§3).
* :func:`f_hal_loss` — ``λ·FDO + (1 − λ)·f-GRPO`` (§5).
* :func:`grpo_loss` — the token-level clipped-ratio GRPO baseline (§6).
* :func:`dpo_loss` — the sigmoid DPO baseline (§6).

Each returns a :class:`LossOutput`: the differentiable scalar ``loss`` and a dict of float
``metrics``. The registry :data:`LOSSES` maps a configuration name to an adapter taking a
:class:`LossInputs` (what the trainer has after a rollout) and a :class:`LossConfig`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from fgrpo_pipeline.algorithms.advantages import check_group_layout
from fgrpo_pipeline.algorithms.divergences import DIVERGENCES, Divergence, get_divergence
from fgrpo_pipeline.algorithms.registry import Registry

WEIGHT_SCHEMES = ("uniform", "snis")
GRPO_AGGREGATIONS = ("grpo", "dr_grpo", "dapo")
# (choice) how f-HAL weighs its two terms; see f_hal_loss.
HAL_SCALINGS = ("paper", "balanced")


@dataclass
class LossOutput:
    """A scalar loss with a gradient path, and float diagnostics for logging."""

    loss: Tensor
    metrics: dict[str, float] = field(default_factory=dict)
    # The weighted parts whose sum is ``loss`` (f-HAL: online, offline), so that the trainer
    # can log each part's gradient norm; empty for single-term losses.
    terms: dict[str, Tensor] = field(default_factory=dict)


# --------------------------------------------------------------------------- checks


def _check_beta(beta: float) -> None:
    if not (isinstance(beta, (int, float)) and beta > 0 and beta < float("inf")):
        raise ValueError(f"beta must be a finite number > 0, got {beta!r}")


def _check_lam(lam: float) -> None:
    if not (isinstance(lam, (int, float)) and 0.0 <= lam <= 1.0):
        raise ValueError(f"lam (λ) must lie in [0, 1], got {lam!r}")


def _check_choice(value: str, valid: tuple[str, ...], what: str) -> None:
    if value not in valid:
        raise ValueError(f"unknown {what} {value!r}; valid: {', '.join(valid)}")


def _check_same_shape(**tensors: Tensor | None) -> None:
    given = {name: t for name, t in tensors.items() if t is not None}
    shapes = {name: tuple(t.shape) for name, t in given.items()}
    if len(set(shapes.values())) > 1:
        listed = ", ".join(f"{name}{list(shape)}" for name, shape in shapes.items())
        raise ValueError(f"shape mismatch: {listed}")


def _check_flat(name: str, t: Tensor) -> None:
    if t.dim() != 1:
        raise ValueError(
            f"{name} must be a flat [N] tensor of sequence log-probs, got shape {list(t.shape)}"
        )


def _resolve(divergence: Divergence | str) -> Divergence:
    return divergence if isinstance(divergence, Divergence) else get_divergence(divergence)


# (choice) |r_θ| bound: exp(r − 1) (KL) overflows float32 near r = 89; 50 leaves a margin.
DEFAULT_REWARD_BOUND = 50.0
# GRPO's token log-ratios are clamped to ±this before exp (e^20 ≈ 5e8, far outside any clip).
MAX_TOKEN_LOG_RATIO = 20.0


def bounded(score: Tensor, bound: float | None) -> Tensor:
    """``score`` clamped to ``[−bound, bound]`` in value, with its gradient passed straight
    through (identity), so a saturated sequence is still pushed the right way. ``None``: as is.
    """
    if bound is None:
        return score
    return score + (score.clamp(-bound, bound) - score).detach()


def _check_bound(bound: float | None) -> None:
    if bound is not None and not (isinstance(bound, (int, float)) and 0 < bound < float("inf")):
        raise ValueError(f"reward_bound must be a finite number > 0 or None, got {bound!r}")


# A mean's denominator: a number of samples, pairs or tokens (see Count in _denominator).
Count = float | int | Tensor


def _denominator(count: Count | None, local: float, name: str) -> float:
    """``count`` (a given denominator, e.g. the mean count over data-parallel ranks) as a
    float, or the ``local`` count when none is given."""
    if count is None:
        return float(local)
    value = float(count.item() if isinstance(count, Tensor) else count)
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be a finite count ≥ 0, got {count!r}")
    return value


def _mean_or_zero(x: Tensor) -> float:
    return x.mean().item() if x.numel() else 0.0


# --------------------------------------------------------------------------- f-GRPO


def _snis_weights(scores: Tensor, side: Tensor) -> Tensor:
    """Softmax of ``scores`` within each group's side (rows [n_groups, G], side mask)."""
    masked = torch.where(side, scores, torch.full_like(scores, float("-inf")))
    weights = torch.softmax(masked, dim=1)
    # A group with no member on this side yields NaN rows from softmax(−inf…): zero them.
    return torch.where(side, torch.nan_to_num(weights, nan=0.0), torch.zeros_like(weights))


def _effective_sample_size(weights: Tensor, side: Tensor) -> float:
    """Mean over groups with a non-empty side of 1/Σw² (1 = one-hot, n = uniform)."""
    present = side.any(dim=1)
    if not present.any():
        return 0.0
    ess = 1.0 / (weights[present] ** 2).sum(dim=1)
    return ess.mean().item()


def _side_estimates(
    critic: Tensor, conj: Tensor, advantages: Tensor, w: Tensor, grid: tuple[int, int]
) -> tuple[Tensor, Tensor]:
    """Per group: ``Σ_{a>0} ν·g(s) − Σ_{a<0} ν·f*(g(s))`` with ``ν ∝ |a|·w`` normalised to
    sum to 1 within each side, and whether the group has both sides (reward spread).

    The loss's ``Σ_i a_i ψ_i`` is this difference with unnormalised weights ``|a|·w``, so
    this is the variational divergence estimate the loss optimises (spec §3 form, between
    the advantage-weighted aligned and unaligned responses of the group). Rows with a = 0
    carry no weight; a group without both sides gives 0."""
    mag = (advantages.abs() * w).view(grid)
    adv = advantages.view(grid)
    pos, neg = adv > 0, adv < 0

    def side_mean(values: Tensor, side: Tensor) -> Tensor:
        weight = torch.where(side, mag, torch.zeros_like(mag))
        total = weight.sum(dim=1, keepdim=True)
        nu = weight / total.clamp(min=torch.finfo(mag.dtype).tiny)
        return (nu * torch.where(side, values.view(grid), torch.zeros_like(mag))).sum(dim=1)

    both = pos.any(dim=1) & neg.any(dim=1)
    estimate = side_mean(critic, pos) - side_mean(conj, neg)
    return torch.where(both, estimate, torch.zeros_like(estimate)), both


def f_grpo_loss(
    logps: Tensor,
    ref_logps: Tensor,
    advantages: Tensor,
    *,
    divergence: Divergence | str,
    beta: float = 0.1,
    group_size: int,
    weights: str = "uniform",
    old_logps: Tensor | None = None,
    rewards: Tensor | None = None,
    old_ratio_coef: float | None = None,
    reward_bound: float | None = DEFAULT_REWARD_BOUND,
    scaling: str = "paper",
    drop_zero_spread: bool = False,
    group_count: Count | None = None,
    sampling_logps: Tensor | None = None,
) -> LossOutput:
    """On-policy f-GRPO loss (spec §4).

    With ``s_i = β(logps_i − ref_logps_i)``: ``ψ_i = w⁺·g(s_i)`` if ``a_i > 0`` else
    ``w⁻·f*(g(s_i))``, and ``L = −(1 + 1/β) · mean over groups of Σ_i a_i ψ_i``.

    ``weights`` **(choice)**: ``uniform`` (w = 1) or ``snis`` — a softmax within each side of
    each group of ``r_j − log q(y_j)`` (aligned) or ``−r_j − log q(y_j)`` (unaligned),
    where ``r_j`` is ``rewards`` if given, else the advantage, and ``q`` the distribution the
    responses were drawn from: ``sampling_logps`` if given (sequence log-probs, e.g. π_old
    corrected for a rollout engine's numerics), else ``old_logps``, which defaults to
    ``logps`` detached (one optimiser step per rollout batch).

    ``old_ratio_coef`` (γ) switches to the authors' surrogate: ``s_i += γ(logps_i −
    old_logps_i)`` without the ``(1 + 1/β)`` prefactor. With ``old_logps == logps`` and γ = 1
    its gradient equals the default's; the two differ only when a batch is reused.

    ``reward_bound`` **(choice)** bounds ``s_i`` in value (:func:`bounded`) so that the
    conjugate terms stay finite when the policy has drifted far from the reference.

    ``scaling`` **(choice)**: ``paper`` is the form above; ``balanced`` replaces it by
    ``−mean over groups with reward spread of [Σ_{a>0} ν g(s) − Σ_{a<0} ν f*(g(s))]``, with
    ``ν ∝ |a|·w`` normalised to sum to 1 within each side of a group: per-sample means on
    each side and factor 1, the form of :func:`fdo_loss` (f-HAL's ``hal_scaling``).

    ``drop_zero_spread``: the mean over groups counts only groups with reward spread (their
    a = 0 rows add nothing to the sum), as DAPO's dynamic sampling does. ``group_count``: what
    the sum over groups is divided by instead (data-parallel ranks: the mean count over the
    ranks). The metric ``divergence_estimate`` is the estimate the loss optimises: the
    ``balanced`` bracket above, averaged over the groups with spread.
    """
    div = _check_f_grpo_options(divergence, beta, weights, scaling, reward_bound)
    n_groups = _check_f_grpo_tensors(
        logps, ref_logps, advantages, group_size, old_logps, rewards, sampling_logps
    )
    old = logps.detach() if old_logps is None else old_logps.detach()
    score, prefactor = _f_grpo_score(logps, ref_logps, old, beta, old_ratio_coef, reward_bound)
    critic, conj = div.link(score), div.conjugate_of_link(score)
    grid = (n_groups, group_size)
    log_q = old if sampling_logps is None else sampling_logps.detach()
    w, ess = _f_grpo_weights(weights, score, advantages, rewards, log_q, grid)
    loss, metrics = _f_grpo_objective(
        critic, conj, score, advantages, w, grid, scaling, drop_zero_spread, group_count, prefactor
    )
    return LossOutput(loss=loss, metrics=metrics | ess)


def _check_f_grpo_options(
    divergence: Divergence | str,
    beta: float,
    weights: str,
    scaling: str,
    reward_bound: float | None,
) -> Divergence:
    """:func:`f_grpo_loss`'s option checks; the divergence."""
    _check_beta(beta)
    _check_bound(reward_bound)
    div = _resolve(divergence)
    _check_choice(weights, WEIGHT_SCHEMES, "weights")
    _check_choice(scaling, HAL_SCALINGS, "scaling")
    return div


def _check_f_grpo_tensors(
    logps: Tensor,
    ref_logps: Tensor,
    advantages: Tensor,
    group_size: int,
    old_logps: Tensor | None,
    rewards: Tensor | None,
    sampling_logps: Tensor | None,
) -> int:
    """:func:`f_grpo_loss`'s input checks; the number of groups."""
    _check_flat("logps", logps)
    _check_same_shape(
        logps=logps,
        ref_logps=ref_logps,
        advantages=advantages,
        old_logps=old_logps,
        rewards=rewards,
        sampling_logps=sampling_logps,
    )
    n_groups = check_group_layout(logps.numel(), group_size, "logps")
    if not torch.isfinite(advantages).all():
        raise ValueError("advantages must be finite (NaN/inf found)")
    return n_groups


def _f_grpo_score(
    logps: Tensor,
    ref_logps: Tensor,
    old: Tensor,
    beta: float,
    old_ratio_coef: float | None,
    reward_bound: float | None,
) -> tuple[Tensor, float]:
    """The bounded implicit reward ``s = β(logps − ref)`` (``+ γ(logps − old)`` with the
    authors' surrogate) and the loss's prefactor (``1 + 1/β``; 1 with the surrogate)."""
    score = beta * (logps - ref_logps)
    prefactor = 1.0 + 1.0 / beta
    if old_ratio_coef is not None:
        score = score + old_ratio_coef * (logps - old)
        prefactor = 1.0
    return bounded(score, reward_bound), prefactor


def _f_grpo_weights(
    weights: str,
    score: Tensor,
    advantages: Tensor,
    rewards: Tensor | None,
    log_q: Tensor,
    grid: tuple[int, int],
) -> tuple[Tensor, dict[str, float]]:
    """Per-row side weights [N] (``uniform``: 1; ``snis``: a softmax within each side of each
    group of ``±r − log q``) and, for snis, each side's effective sample size."""
    if weights != "snis":
        return torch.ones_like(score), {}
    side_pos, side_neg = (advantages > 0).view(grid), (advantages < 0).view(grid)
    r = (rewards if rewards is not None else advantages).detach().view(grid)
    log_q = log_q.view(grid)
    w_pos = _snis_weights(r - log_q, side_pos)
    w_neg = _snis_weights(-r - log_q, side_neg)
    ess = {
        "ess_aligned": _effective_sample_size(w_pos, side_pos),
        "ess_unaligned": _effective_sample_size(w_neg, side_neg),
    }
    return (w_pos + w_neg).reshape(-1), ess


def _f_grpo_objective(
    critic: Tensor,
    conj: Tensor,
    score: Tensor,
    advantages: Tensor,
    w: Tensor,
    grid: tuple[int, int],
    scaling: str,
    drop_zero_spread: bool,
    group_count: Count | None,
    prefactor: float,
) -> tuple[Tensor, dict[str, float]]:
    """The loss, minus the mean over groups (``group_count``, or the groups with spread when
    ``balanced`` or ``drop_zero_spread``) of the per-group estimate (``balanced``) or of
    ``prefactor · Σ_i a_i ψ_i`` (``paper``), and its metrics."""
    estimates, spread = _side_estimates(critic, conj, advantages, w, grid)
    n_spread = int(spread.sum().item())
    count = n_spread if scaling == "balanced" or drop_zero_spread else grid[0]
    denominator = _denominator(group_count, count, "group_count")
    denominator = denominator or 1.0  # no group with spread: the sum is 0 as well
    if scaling == "balanced":
        loss = -estimates.sum() / denominator
    else:
        psi = torch.where(advantages > 0, w * critic, w * conj)
        per_group = (advantages * psi).view(grid).sum(dim=1)
        loss = -prefactor * per_group.sum() / denominator
    implicit, aligned, unaligned = score.detach(), advantages > 0, advantages < 0
    metrics = {
        "divergence_estimate": estimates.detach().sum().item() / max(n_spread, 1),
        "implicit_reward_aligned": _mean_or_zero(implicit[aligned]),
        "implicit_reward_unaligned": _mean_or_zero(implicit[unaligned]),
        "frac_aligned": aligned.float().mean().item(),
    }
    if drop_zero_spread:
        metrics["dropped_groups"] = float(grid[0] - n_spread)
    return loss, metrics


# --------------------------------------------------------------------------- FDO / f-HAL


def fdo_loss(
    chosen_logps: Tensor,
    chosen_ref_logps: Tensor,
    rejected_logps: Tensor,
    rejected_ref_logps: Tensor,
    *,
    divergence: Divergence | str,
    beta: float = 0.1,
    reward_bound: float | None = DEFAULT_REWARD_BOUND,
    chosen_count: Count | None = None,
    rejected_count: Count | None = None,
) -> LossOutput:
    """Offline FDO loss (spec §3): ``−E_{D⁺}[g(r_θ)] + E_{D⁻}[f*(g(r_θ))]``.

    Chosen (aligned) and rejected (unaligned) samples need not be paired: their counts may
    differ. ``−loss`` is the variational estimate of ``D_f(D⁺‖D⁻)``.

    ``chosen_count`` / ``rejected_count``: what each side's sum is divided by (default: its
    number of samples here). Data-parallel ranks pass the mean count over the ranks, so that
    the average of their losses is the loss of the whole batch; a rank may then hold no
    sample of a side.
    """
    _check_beta(beta)
    div = _resolve(divergence)
    for name, t in (("chosen_logps", chosen_logps), ("rejected_logps", rejected_logps)):
        _check_flat(name, t)
    _check_same_shape(chosen_logps=chosen_logps, chosen_ref_logps=chosen_ref_logps)
    _check_same_shape(rejected_logps=rejected_logps, rejected_ref_logps=rejected_ref_logps)
    n_chosen = _denominator(chosen_count, chosen_logps.numel(), "chosen_count")
    n_rejected = _denominator(rejected_count, rejected_logps.numel(), "rejected_count")
    if n_chosen == 0 or n_rejected == 0:
        raise ValueError(
            f"fdo_loss needs at least one chosen and one rejected sample, got "
            f"{chosen_logps.numel()} chosen and {rejected_logps.numel()} rejected"
        )
    _check_bound(reward_bound)
    chosen_reward = bounded(beta * (chosen_logps - chosen_ref_logps), reward_bound)
    rejected_reward = bounded(beta * (rejected_logps - rejected_ref_logps), reward_bound)
    loss = (
        -div.link(chosen_reward).sum() / n_chosen
        + div.conjugate_of_link(rejected_reward).sum() / n_rejected
    )
    return LossOutput(
        loss=loss,
        metrics={
            "divergence_estimate": -loss.item(),
            "implicit_reward_chosen": _mean_or_zero(chosen_reward.detach()),
            "implicit_reward_rejected": _mean_or_zero(rejected_reward.detach()),
        },
    )


def f_hal_loss(
    logps: Tensor | None,
    ref_logps: Tensor | None,
    advantages: Tensor | None,
    chosen_logps: Tensor | None,
    chosen_ref_logps: Tensor | None,
    rejected_logps: Tensor | None,
    rejected_ref_logps: Tensor | None,
    *,
    divergence: Divergence | str,
    lam: float,
    beta: float = 0.1,
    group_size: int,
    weights: str = "uniform",
    old_logps: Tensor | None = None,
    rewards: Tensor | None = None,
    reward_bound: float | None = DEFAULT_REWARD_BOUND,
    hal_scaling: str = "paper",
    drop_zero_spread: bool = False,
    group_count: Count | None = None,
    sampling_logps: Tensor | None = None,
    chosen_count: Count | None = None,
    rejected_count: Count | None = None,
) -> LossOutput:
    """Hybrid f-HAL loss (spec §5): ``λ·L_FDO + (1 − λ)·L_f-GRPO`` with one f, g and β.

    At λ = 0 it is exactly :func:`f_grpo_loss` and the offline inputs may be ``None``; at
    λ = 1 exactly :func:`fdo_loss` and the on-policy inputs may be ``None``.

    ``hal_scaling`` **(choice)**: ``paper`` (default) takes both terms as the spec writes
    them. The on-policy term then carries the factor (1 + 1/β) and a sum over the G responses
    of a group, so at β = 0.1, G = 8 it outweighs the per-sample means of FDO by about two
    orders of magnitude and λ = 0.5 trains almost like λ = 0. ``balanced`` writes the
    on-policy term in FDO's form (:func:`f_grpo_loss` with ``scaling="balanced"``: per-sample
    means within each side of a group, weights ∝ |a|, factor 1), so both terms are
    differences of per-sample means of g and f*(g) and λ is the share of the gradient that
    comes from the offline data (up to how the two batches' gradients differ in size).

    The result's ``terms`` hold the weighted parts (``online`` = (1 − λ)·L_f-GRPO,
    ``offline`` = λ·L_FDO) when both are present, for logging their gradient norms.
    """
    _check_lam(lam)
    _check_beta(beta)
    div = _resolve(divergence)
    parts: list[tuple[float, str, LossOutput]] = []
    if lam < 1.0:
        online = _online_term(
            logps,
            ref_logps,
            advantages,
            divergence=div,
            beta=beta,
            group_size=group_size,
            weights=weights,
            old_logps=old_logps,
            rewards=rewards,
            reward_bound=reward_bound,
            scaling=hal_scaling,
            drop_zero_spread=drop_zero_spread,
            group_count=group_count,
            sampling_logps=sampling_logps,
        )
        parts.append((1.0 - lam, "online", online))
    if lam > 0.0:
        offline = _offline_term(
            (chosen_logps, chosen_ref_logps, rejected_logps, rejected_ref_logps),
            divergence=div,
            beta=beta,
            reward_bound=reward_bound,
            chosen_count=chosen_count,
            rejected_count=rejected_count,
        )
        parts.append((lam, "offline", offline))
    if len(parts) == 1:
        return parts[0][2]
    _check_choice(hal_scaling, HAL_SCALINGS, "hal_scaling")
    return _weighted_sum(parts)


def _online_term(
    logps: Tensor | None, ref_logps: Tensor | None, advantages: Tensor | None, **options: Any
) -> LossOutput:
    """f-HAL's on-policy term: :func:`f_grpo_loss` (its inputs must be given)."""
    if logps is None or ref_logps is None or advantages is None:
        raise ValueError("f_hal_loss with lam < 1 needs logps, ref_logps and advantages")
    return f_grpo_loss(logps, ref_logps, advantages, **options)


def _offline_term(inputs: tuple[Tensor | None, ...], **options: Any) -> LossOutput:
    """f-HAL's offline term: :func:`fdo_loss` of (chosen, chosen ref, rejected, rejected ref)."""
    if any(t is None for t in inputs):
        raise ValueError(
            "f_hal_loss with lam > 0 needs chosen/rejected policy and reference log-probs"
        )
    return fdo_loss(*inputs, **options)


def _weighted_sum(parts: list[tuple[float, str, LossOutput]]) -> LossOutput:
    """``Σ weight · loss`` of the (weight, tag, output) parts, each part's metrics under its
    tag, their weighted divergence estimate, and the weighted parts as ``terms``."""
    terms = {tag: weight * out.loss for weight, tag, out in parts}
    loss = terms["online"] + terms["offline"]
    metrics = {f"{tag}/{key}": value for _, tag, out in parts for key, value in out.metrics.items()}
    metrics["divergence_estimate"] = sum(
        weight * out.metrics["divergence_estimate"] for weight, _, out in parts
    )
    return LossOutput(loss=loss, metrics=metrics, terms=terms)


# --------------------------------------------------------------------------- baselines


def grpo_loss(
    logps: Tensor,
    old_logps: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    ref_logps: Tensor | None = None,
    epsilon: float = 0.2,
    epsilon_high: float | None = None,
    kl_coef: float = 0.0,
    aggregation: str = "grpo",
    max_completion_length: int | None = None,
    token_count: Count | None = None,
    sequence_count: Count | None = None,
    token_weights: Tensor | None = None,
) -> LossOutput:
    """Token-level clipped-ratio GRPO (spec §6) on per-token log-probs [N, T].

    Per token: ``−w·min(ρ·a, clip(ρ, 1 − ε, 1 + ε_high)·a) + kl_coef·k3`` with ``ρ =
    π_θ/π_old``, ``ε_high`` = ``epsilon_high`` or ε (DAPO's asymmetric clip when larger),
    ``w`` = ``token_weights`` (a detached per-token importance weight, e.g. the truncated
    correction of a rollout engine's numerics; default 1) and the k3 estimator ``k3 =
    e^{ref − logp} − (ref − logp) − 1``. ``aggregation``: ``grpo`` averages tokens within
    each sequence, then sequences; ``dr_grpo`` sums tokens and divides by
    N·``max_completion_length`` (the configured maximum, as Dr. GRPO and TRL do; default: T,
    the batch's width); ``dapo`` divides the sum by the batch's active-token count, or by
    ``token_count`` if given. ``sequence_count`` replaces N (both: data-parallel ranks pass
    the mean count over the ranks, so that the average of their losses is the whole batch's;
    rows whose mask is all 0 are then left out of the count by the caller).
    """
    high = _check_grpo_inputs(
        logps,
        old_logps,
        advantages,
        mask,
        ref_logps=ref_logps,
        epsilon=epsilon,
        epsilon_high=epsilon_high,
        kl_coef=kl_coef,
        aggregation=aggregation,
        max_completion_length=max_completion_length,
        token_weights=token_weights,
    )
    mask = mask.to(logps.dtype)
    # Clamped in value, gradient straight through: a far-off token cannot overflow exp.
    log_ratio = bounded(logps - old_logps.detach(), MAX_TOKEN_LOG_RATIO)
    ratio = torch.exp(log_ratio)
    adv = advantages.detach().unsqueeze(1)
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1.0 - epsilon, 1.0 + high) * adv
    per_token = -torch.minimum(unclipped, clipped)
    if token_weights is not None:
        per_token = per_token * token_weights.detach()
    kl = None
    if ref_logps is not None:
        delta = bounded(ref_logps.detach() - logps, MAX_TOKEN_LOG_RATIO)
        kl = torch.exp(delta) - delta - 1.0
        if kl_coef > 0:
            per_token = per_token + kl_coef * kl

    loss = _grpo_reduce(
        per_token,
        mask,
        aggregation,
        max_completion_length=max_completion_length,
        token_count=token_count,
        sequence_count=sequence_count,
    )
    active = mask.bool()
    is_clipped = ((ratio < 1 - epsilon) & (adv < 0)) | ((ratio > 1 + high) & (adv > 0))
    metrics = {"clip_fraction": _mean_or_zero(is_clipped[active].float())}
    if kl is not None:
        metrics["kl_k3"] = _mean_or_zero(kl.detach()[active])
    return LossOutput(loss=loss, metrics=metrics)


def _check_grpo_inputs(
    logps: Tensor,
    old_logps: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    ref_logps: Tensor | None,
    epsilon: float,
    epsilon_high: float | None,
    kl_coef: float,
    aggregation: str,
    max_completion_length: int | None,
    token_weights: Tensor | None,
) -> float:
    """:func:`grpo_loss`'s argument checks; the upper clip ε_high (ε when not given)."""
    _check_choice(aggregation, GRPO_AGGREGATIONS, "aggregation")
    if logps.dim() != 2:
        raise ValueError(f"grpo_loss takes per-token log-probs [N, T], got {list(logps.shape)}")
    _check_same_shape(
        logps=logps,
        old_logps=old_logps,
        mask=mask,
        ref_logps=ref_logps,
        token_weights=token_weights,
    )
    if advantages.shape != logps.shape[:1]:
        raise ValueError(
            f"shape mismatch: advantages{list(advantages.shape)} vs logps{list(logps.shape)}"
        )
    if kl_coef > 0 and ref_logps is None:
        raise ValueError("grpo_loss with kl_coef > 0 needs ref_logps")
    if not 0 < epsilon < 1:
        raise ValueError(f"epsilon must lie in (0, 1), got {epsilon!r}")
    high = epsilon if epsilon_high is None else epsilon_high
    if not 0 < high < float("inf"):
        raise ValueError(f"epsilon_high must be a finite number > 0, got {epsilon_high!r}")
    if max_completion_length is not None and max_completion_length < logps.shape[1]:
        raise ValueError(
            f"max_completion_length={max_completion_length} is shorter than the batch's "
            f"completions ({logps.shape[1]} tokens)"
        )
    return high


def _grpo_reduce(
    per_token: Tensor,
    mask: Tensor,
    aggregation: str,
    *,
    max_completion_length: int | None,
    token_count: Count | None,
    sequence_count: Count | None,
) -> Tensor:
    """GRPO's token reduction (see :func:`grpo_loss`, ``aggregation``)."""
    n_rows = _denominator(sequence_count, per_token.shape[0], "sequence_count") or 1.0
    if aggregation == "grpo":
        return ((per_token * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)).sum() / n_rows
    if aggregation == "dr_grpo":
        length = max_completion_length or per_token.shape[1]
        return (per_token * mask).sum() / (n_rows * length)
    active = _denominator(token_count, mask.sum().item(), "token_count")
    return (per_token * mask).sum() / (active or 1.0)


def dpo_loss(
    chosen_logps: Tensor,
    chosen_ref_logps: Tensor,
    rejected_logps: Tensor,
    rejected_ref_logps: Tensor,
    *,
    beta: float = 0.1,
    pair_count: Count | None = None,
) -> LossOutput:
    """Sigmoid DPO: ``−log σ(β[(c − c_ref) − (r − r_ref)])`` over paired samples.

    ``pair_count``: what the sum over pairs is divided by (default: the number of pairs;
    data-parallel ranks pass the mean count over the ranks)."""
    _check_beta(beta)
    _check_same_shape(
        chosen_logps=chosen_logps,
        chosen_ref_logps=chosen_ref_logps,
        rejected_logps=rejected_logps,
        rejected_ref_logps=rejected_ref_logps,
    )
    n_pairs = _denominator(pair_count, chosen_logps.numel(), "pair_count")
    if n_pairs == 0:
        raise ValueError("dpo_loss needs at least one chosen/rejected pair")
    # log σ is stable at any margin: no bound needed.
    chosen_reward = beta * (chosen_logps - chosen_ref_logps)
    rejected_reward = beta * (rejected_logps - rejected_ref_logps)
    margin = chosen_reward - rejected_reward
    loss = -F.logsigmoid(margin).sum() / n_pairs
    return LossOutput(
        loss=loss,
        metrics={
            "implicit_reward_chosen": _mean_or_zero(chosen_reward.detach()),
            "implicit_reward_rejected": _mean_or_zero(rejected_reward.detach()),
            "reward_accuracy": _mean_or_zero((margin.detach() > 0).float()),
        },
    )


# --------------------------------------------------------------------------- engine mismatch


def truncated_importance_weights(
    old_logps: Tensor, engine_logps: Tensor, mask: Tensor, cap: float
) -> tuple[Tensor, dict[str, float]]:
    """Per-token ``min(π_old/π_engine, cap)`` [N, T] (1 where masked), detached, and its
    diagnostics: the mean ratio and the share of tokens capped, over the active tokens.

    π_old is the trainer's own log-probs of the sampled tokens; ``engine_logps`` those the
    rollout engine reported while sampling (vLLM's kernels round differently). The ratio
    corrects the gradient, an expectation under the engine's samples, towards π_old's;
    capping bounds its variance (truncated importance sampling)."""
    if not (isinstance(cap, (int, float)) and 1 <= cap < float("inf")):
        raise ValueError(f"importance-weight cap must be a finite number ≥ 1, got {cap!r}")
    _check_same_shape(old_logps=old_logps, engine_logps=engine_logps, mask=mask)
    active = mask.bool()
    log_ratio = (old_logps.detach() - engine_logps.detach()).clamp(
        -MAX_TOKEN_LOG_RATIO, MAX_TOKEN_LOG_RATIO
    )
    ratio = torch.where(active, torch.exp(log_ratio), torch.ones_like(log_ratio))
    weights = ratio.clamp(max=cap)
    return weights, {
        "is_ratio_mean": _mean_or_zero(ratio[active]),
        "is_frac_capped": _mean_or_zero((ratio[active] > cap).float()),
    }


# --------------------------------------------------------------------------- registry


@dataclass
class LossConfig:
    """The loss-selecting parameters (``training.loss`` block of parameters_training.yml)."""

    name: str = "f_grpo"
    divergence: str = "kl"
    beta: float = 0.1
    weights: str = "uniform"
    lam: float = 0.5
    epsilon: float = 0.2
    kl_coef: float = 0.0
    aggregation: str = "grpo"
    reward_bound: float | None = DEFAULT_REWARD_BOUND
    hal_scaling: str = "paper"
    epsilon_high: float | None = None
    drop_zero_spread: bool = False

    def __post_init__(self) -> None:
        LOSSES.check(self.name, "loss")
        _check_bound(self.reward_bound)
        DIVERGENCES.check(self.divergence, "divergence")
        _check_beta(self.beta)
        _check_lam(self.lam)
        _check_choice(self.weights, WEIGHT_SCHEMES, "weights")
        _check_choice(self.aggregation, GRPO_AGGREGATIONS, "aggregation")
        _check_choice(self.hal_scaling, HAL_SCALINGS, "hal_scaling")
        if not isinstance(self.drop_zero_spread, bool):
            raise ValueError(
                f"drop_zero_spread must be true or false, got {self.drop_zero_spread!r}"
            )
        if self.epsilon_high is not None and not (
            isinstance(self.epsilon_high, (int, float)) and 0 < self.epsilon_high < float("inf")
        ):
            raise ValueError(
                f"epsilon_high must be a finite number > 0 or null, got {self.epsilon_high!r}"
            )
        if not (isinstance(self.epsilon, (int, float)) and 0 < self.epsilon < 1):
            raise ValueError(f"epsilon must lie in (0, 1), got {self.epsilon!r}")
        if not (isinstance(self.kl_coef, (int, float)) and 0 <= self.kl_coef < float("inf")):
            raise ValueError(f"kl_coef must be a finite number ≥ 0, got {self.kl_coef!r}")
        check_options_apply(self)


# Which losses use each option of LossConfig: what their adapters below read (f_grpo is f_hal
# at λ = 0, so it reads what f_hal reads but λ). An option set to another value than its
# default for a loss not listed here would be silently ignored: LossConfig refuses it. A loss
# registered later uses none of them until it is added here.
LOSS_OPTIONS: dict[str, tuple[str, ...]] = {
    "divergence": ("f_grpo", "fdo", "f_hal"),
    # grpo's loss ignores β; the trainer's completions table logs β·log π/π_ref for every loss
    "beta": ("f_grpo", "fdo", "f_hal", "grpo", "dpo"),
    "weights": ("f_grpo", "f_hal"),
    "lam": ("f_hal",),
    "epsilon": ("grpo",),
    "kl_coef": ("grpo",),
    "aggregation": ("grpo",),
    "reward_bound": ("f_grpo", "fdo", "f_hal"),
    # also passed on by f_grpo's adapter (f_hal at λ = 0), but an f-HAL choice: f_hal only
    "hal_scaling": ("f_hal",),
    "epsilon_high": ("grpo",),
    # fdo and dpo already leave groups without reward spread out
    "drop_zero_spread": ("f_grpo", "f_hal", "grpo"),
}


def check_options_apply(config: LossConfig) -> None:
    """Refuse an option that ``config``'s loss would ignore (:data:`LOSS_OPTIONS`), unless it
    has its default value (parameter files set every option)."""
    defaults = {f.name: f.default for f in fields(LossConfig)}
    for option, losses in LOSS_OPTIONS.items():
        value = getattr(config, option)
        if config.name not in losses and value != defaults[option]:
            raise ValueError(
                f"{option}={value!r} applies to loss {', '.join(losses)} only, not "
                f"{config.name!r} (which ignores it; its default is {defaults[option]!r})"
            )


@dataclass
class PreferenceInputs:
    """Sequence log-probs of a preference minibatch: aligned (chosen) and unaligned sides."""

    chosen_logps: Tensor
    chosen_ref_logps: Tensor
    rejected_logps: Tensor
    rejected_ref_logps: Tensor
    # (prompts, completions) of each side, for logging what the loss saw; row i of both
    # sides is one pair when the draw was paired (DPO)
    chosen_texts: tuple[list[str], list[str]] | None = None
    rejected_texts: tuple[list[str], list[str]] | None = None


@dataclass
class LossInputs:
    """What the trainer holds after a rollout: per-token tensors [N, T] and per-row [N].

    ``offline`` is an off-policy preference minibatch (f-HAL, and FDO/DPO when given).

    ``rank_mean`` (data-parallel training): the mean over the ranks of a count tensor. DDP
    averages the ranks' gradients, so a loss that divides a sum by a count the ranks do not
    share (DAPO's tokens, the aligned and unaligned rollouts of FDO, the pairs of DPO) divides
    by the ranks' mean count: the average is then the loss of the whole batch. The default
    (one process) is the count itself.
    """

    logps: Tensor
    ref_logps: Tensor | None  # None: a loss that does not read π_ref (GRPO without KL)
    old_logps: Tensor
    mask: Tensor
    advantages: Tensor
    rewards: Tensor
    group_size: int
    offline: PreferenceInputs | None = None
    rank_mean: Callable[[Tensor], Tensor] = lambda count: count
    # the configured maximum completion length (sampling.max_new_tokens): Dr. GRPO's divisor
    max_completion_length: int | None = None
    # per-token truncated importance weights π_old/π_engine [N, T] (rollout-engine numerics
    # correction, see truncated_importance_weights); None = off
    is_weights: Tensor | None = None

    def spread_rows(self) -> Tensor:
        """Per row [N]: whether its group has reward spread (some a ≠ 0)."""
        nonzero = (self.advantages != 0).view(-1, self.group_size).any(dim=1)
        return nonzero.repeat_interleave(self.group_size)

    def sampling_logps(self) -> Tensor | None:
        """Sequence log-probs of the distribution the rollouts were drawn from, as π_old
        corrected by the importance weights (None without a correction)."""
        if self.is_weights is None:
            return None
        log_w = torch.log(self.is_weights.clamp(min=torch.finfo(self.is_weights.dtype).tiny))
        return self.sequence(self.old_logps) - self.sequence(log_w)

    def sequence(self, per_token: Tensor) -> Tensor:
        return (per_token * self.mask).sum(dim=1)

    def mean_over_ranks(self, local_count: float) -> float:
        """The mean over the data-parallel ranks of a count (this rank's, in one process)."""
        return self.rank_mean(torch.tensor(float(local_count), device=self.logps.device)).item()


LossFn = Callable[[LossInputs, LossConfig], LossOutput]
LOSSES: Registry[LossFn] = Registry("loss")


def get_loss(name: str) -> LossFn:
    """The registered loss adapter ``(LossInputs, LossConfig) -> LossOutput``."""
    return LOSSES.get(name)


def _online_preferences(inputs: LossInputs) -> PreferenceInputs:
    """Aligned rollouts (a > 0) as chosen, a < 0 as rejected (unpaired).

    Rows with a = 0 (groups without reward spread) carry no preference and are left out.
    """
    aligned, unaligned = inputs.advantages > 0, inputs.advantages < 0
    seq, ref = inputs.sequence(inputs.logps), inputs.sequence(inputs.ref_logps)
    return PreferenceInputs(seq[aligned], ref[aligned], seq[unaligned], ref[unaligned])


def _group_extreme_pairs(inputs: LossInputs) -> PreferenceInputs:
    """Per group with reward spread: its best response vs its worst (paired, for DPO)."""
    grid = (-1, inputs.group_size)
    rewards = inputs.rewards.view(grid)
    best, worst = rewards.argmax(dim=1), rewards.argmin(dim=1)
    keep = rewards.amax(dim=1) > rewards.amin(dim=1)
    offsets = torch.arange(rewards.shape[0]) * inputs.group_size
    chosen, rejected = (best + offsets)[keep], (worst + offsets)[keep]
    seq, ref = inputs.sequence(inputs.logps), inputs.sequence(inputs.ref_logps)
    return PreferenceInputs(seq[chosen], ref[chosen], seq[rejected], ref[rejected])


def _no_signal(inputs: LossInputs, **metrics: float) -> LossOutput:
    """A zero loss still connected to the graph, for batches with nothing to learn from."""
    return LossOutput(loss=(inputs.logps * 0.0).sum(), metrics=dict(metrics))


@LOSSES.register("f_grpo")
def _f_grpo(inputs: LossInputs, config: LossConfig) -> LossOutput:
    # f-HAL at λ = 0 is exactly f-GRPO (and needs no offline data).
    return _f_hal_at(inputs, config, lam=0.0)


def _group_count(inputs: LossInputs, config: LossConfig) -> float | None:
    """f-GRPO's divisor of the sum over groups when it is not the local group count:
    the groups with spread (balanced, or drop_zero_spread), as the ranks' mean."""
    if config.hal_scaling != "balanced" and not config.drop_zero_spread:
        return None
    spread = inputs.spread_rows().view(-1, inputs.group_size)[:, 0]
    return inputs.mean_over_ranks(spread.sum().item())


@LOSSES.register("fdo")
def _fdo(inputs: LossInputs, config: LossConfig) -> LossOutput:
    prefs = inputs.offline or _online_preferences(inputs)
    n_chosen = inputs.mean_over_ranks(prefs.chosen_logps.numel())
    n_rejected = inputs.mean_over_ranks(prefs.rejected_logps.numel())
    if n_chosen == 0 or n_rejected == 0:  # on every rank: the counts are the ranks' means
        return _no_signal(inputs, divergence_estimate=0.0)
    return fdo_loss(
        prefs.chosen_logps,
        prefs.chosen_ref_logps,
        prefs.rejected_logps,
        prefs.rejected_ref_logps,
        divergence=config.divergence,
        beta=config.beta,
        reward_bound=config.reward_bound,
        chosen_count=n_chosen,
        rejected_count=n_rejected,
    )


@LOSSES.register("f_hal")
def _f_hal(inputs: LossInputs, config: LossConfig) -> LossOutput:
    return _f_hal_at(inputs, config, lam=config.lam)


def _f_hal_at(inputs: LossInputs, config: LossConfig, lam: float) -> LossOutput:
    """f-HAL with ``config``'s options at ``lam`` (f-GRPO: λ = 0)."""
    if lam > 0 and inputs.offline is None:
        raise ValueError("loss f_hal with lam > 0 needs an offline preference minibatch")
    offline = inputs.offline
    return f_hal_loss(
        inputs.sequence(inputs.logps),
        inputs.sequence(inputs.ref_logps),
        inputs.advantages,
        offline.chosen_logps if offline else None,
        offline.chosen_ref_logps if offline else None,
        offline.rejected_logps if offline else None,
        offline.rejected_ref_logps if offline else None,
        divergence=config.divergence,
        lam=lam,
        beta=config.beta,
        group_size=inputs.group_size,
        weights=config.weights,
        old_logps=inputs.sequence(inputs.old_logps),
        rewards=inputs.rewards,
        reward_bound=config.reward_bound,
        hal_scaling=config.hal_scaling,
        drop_zero_spread=config.drop_zero_spread,
        group_count=_group_count(inputs, config) if lam < 1 else None,
        sampling_logps=inputs.sampling_logps() if config.weights == "snis" else None,
    )


@LOSSES.register("grpo")
def _grpo(inputs: LossInputs, config: LossConfig) -> LossOutput:
    mask, sequence_count, metrics = inputs.mask, None, {}
    if config.drop_zero_spread:
        # DAPO's dynamic sampling: groups without reward spread leave the loss and its counts
        keep = inputs.spread_rows()
        mask = mask * keep.unsqueeze(1).to(mask.dtype)
        sequence_count = inputs.mean_over_ranks(keep.sum().item())
        metrics["dropped_groups"] = float((~keep).sum().item() // inputs.group_size)
    out = grpo_loss(
        inputs.logps,
        inputs.old_logps,
        inputs.advantages,
        mask,
        ref_logps=inputs.ref_logps,
        epsilon=config.epsilon,
        epsilon_high=config.epsilon_high,
        kl_coef=config.kl_coef,
        aggregation=config.aggregation,
        max_completion_length=inputs.max_completion_length,
        token_count=inputs.mean_over_ranks(mask.sum().item())
        if config.aggregation == "dapo"
        else None,
        sequence_count=sequence_count,
        token_weights=inputs.is_weights,
    )
    out.metrics.update(metrics)
    return out


@LOSSES.register("dpo")
def _dpo(inputs: LossInputs, config: LossConfig) -> LossOutput:
    prefs = inputs.offline or _group_extreme_pairs(inputs)
    n_pairs = inputs.mean_over_ranks(prefs.chosen_logps.numel())
    if n_pairs == 0:
        return _no_signal(inputs, reward_accuracy=0.0)
    return dpo_loss(
        prefs.chosen_logps,
        prefs.chosen_ref_logps,
        prefs.rejected_logps,
        prefs.rejected_ref_logps,
        beta=config.beta,
        pair_count=n_pairs,
    )


def loss_names() -> list[str]:
    return LOSSES.names()
