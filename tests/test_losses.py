"""Behaviour of the alignment losses: gradient signs, reductions, baselines, bad input."""

import math
import re
from dataclasses import fields
from pathlib import Path

import pytest
import torch
import yaml

from fgrpo_pipeline.algorithms.advantages import group_advantages
from fgrpo_pipeline.algorithms.divergences import divergence_names
from fgrpo_pipeline.algorithms.losses import (
    LOSS_OPTIONS,
    LOSSES,
    LossConfig,
    LossInputs,
    PreferenceInputs,
    dpo_loss,
    f_grpo_loss,
    f_hal_loss,
    fdo_loss,
    get_loss,
    grpo_loss,
    loss_names,
)

DIVERGENCES = divergence_names()
G = 4


def _batch(seed=0, n_groups=3, flat_group=True):
    """Sequence log-probs near the reference, rewards with one flat group."""
    gen = torch.Generator().manual_seed(seed)
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.3, 0.9, 0.1, 0.5, 1.0, 1.0, 1.0, 1.0])
    if not flat_group:
        rewards[-1] = 0.0
    rewards = rewards[: n_groups * G]
    ref = -5.0 + torch.randn(n_groups * G, generator=gen, dtype=torch.float64)
    logps = (ref + 0.5 * torch.randn(n_groups * G, generator=gen, dtype=torch.float64)).clone()
    return logps.requires_grad_(True), ref, rewards.double()


def _loop_estimate(critic, conj, adv, w=None):
    """The divergence estimate the loss optimises, by loops: per group with both sides,
    the |a|·w-weighted mean of g(s) over a > 0 minus that of f*(g(s)) over a < 0; the mean
    over those groups."""
    w = torch.ones_like(adv) if w is None else w
    estimates = []
    for start in range(0, len(adv), G):
        rows = range(start, start + G)
        pos = [i for i in rows if adv[i] > 0]
        neg = [i for i in rows if adv[i] < 0]
        if not pos or not neg:
            continue
        wp = [abs(adv[i].item()) * w[i].item() for i in pos]
        wn = [abs(adv[i].item()) * w[i].item() for i in neg]
        e_pos = sum(x * critic[i].item() for x, i in zip(wp, pos, strict=True)) / sum(wp)
        e_neg = sum(x * conj[i].item() for x, i in zip(wn, neg, strict=True)) / sum(wn)
        estimates.append(e_pos - e_neg)
    return sum(estimates) / len(estimates)


@pytest.mark.parametrize("weights", ["uniform", "snis"])
@pytest.mark.parametrize("name", DIVERGENCES)
def test_f_grpo_gradient_signs(name, weights):
    logps, ref, rewards = _batch()
    adv = group_advantages(rewards, G)
    out = f_grpo_loss(logps, ref, adv, divergence=name, beta=0.1, group_size=G, weights=weights)
    out.loss.backward()
    grad = logps.grad
    # descent moves logps by −grad: aligned up, unaligned down
    pos, neg = adv > 0, adv < 0
    if weights == "uniform":
        assert (grad[pos] < 0).all()
        assert (grad[neg] > 0).all()
    else:  # snis concentrates each side's weight; no row may move the wrong way
        assert (grad[pos] <= 0).all() and (grad[pos] < 0).any()
        assert (grad[neg] >= 0).all() and (grad[neg] > 0).any()
    # the flat group (last four rewards all 1) contributes exactly nothing
    assert torch.equal(grad[-G:], torch.zeros(G, dtype=grad.dtype))
    assert torch.isfinite(out.loss)


@pytest.mark.parametrize("name", DIVERGENCES)
def test_f_grpo_value_matches_the_formula(name):
    from fgrpo_pipeline.algorithms.divergences import get_divergence

    logps, ref, rewards = _batch(flat_group=False)
    adv = group_advantages(rewards, G)
    beta = 0.1
    out = f_grpo_loss(logps, ref, adv, divergence=name, beta=beta, group_size=G)
    div = get_divergence(name)
    s = beta * (logps - ref)
    psi = torch.where(adv > 0, div.link(s), div.conjugate_of_link(s))
    expected = -(1 + 1 / beta) * (adv * psi).view(-1, G).sum(1).mean()
    torch.testing.assert_close(out.loss, expected)
    assert out.metrics["divergence_estimate"] == pytest.approx(
        _loop_estimate(div.link(s), div.conjugate_of_link(s), adv)
    )


def test_f_grpo_is_invariant_to_group_order_and_scales_with_groups():
    logps, ref, rewards = _batch(flat_group=False)
    adv = group_advantages(rewards, G)
    base = f_grpo_loss(logps, ref, adv, divergence="kl", group_size=G).loss
    perm = torch.tensor([4, 5, 6, 7, 0, 1, 2, 3, 8, 9, 10, 11])
    swapped = f_grpo_loss(logps[perm], ref[perm], adv[perm], divergence="kl", group_size=G).loss
    torch.testing.assert_close(base, swapped)


def test_snis_weights_and_effective_sample_size():
    logps, ref, rewards = _batch(flat_group=False)
    adv = group_advantages(rewards, G)
    out = f_grpo_loss(
        logps, ref, adv, divergence="kl", group_size=G, weights="snis", rewards=rewards
    )
    # ESS lies between 1 (one-hot) and the side size (here at most 3 of 4)
    assert 1.0 <= out.metrics["ess_aligned"] <= 3.0
    assert 1.0 <= out.metrics["ess_unaligned"] <= 3.0
    # with equal old log-probs and equal rewards within a side, snis is uniform 1/n
    flat_old = torch.zeros_like(logps)
    equal = torch.tensor([1.0, 1.0, 0.0, 0.0] * 3, dtype=torch.float64)
    adv = group_advantages(equal, G)
    out = f_grpo_loss(
        logps,
        ref,
        adv,
        divergence="kl",
        group_size=G,
        weights="snis",
        old_logps=flat_old,
        rewards=equal,
    )
    assert out.metrics["ess_aligned"] == pytest.approx(2.0)
    uniform = f_grpo_loss(logps, ref, adv, divergence="kl", group_size=G).loss
    torch.testing.assert_close(out.loss, uniform / 2)


@pytest.mark.parametrize("name", DIVERGENCES)
def test_authors_surrogate_has_the_same_first_step_gradient(name):
    logps, ref, rewards = _batch(flat_group=False)
    adv = group_advantages(rewards, G)
    default = f_grpo_loss(logps, ref, adv, divergence=name, group_size=G).loss
    (grad_default,) = torch.autograd.grad(default, logps)
    authors = f_grpo_loss(
        logps,
        ref,
        adv,
        divergence=name,
        group_size=G,
        old_logps=logps.detach(),
        old_ratio_coef=1.0,
    ).loss
    (grad_authors,) = torch.autograd.grad(authors, logps)
    torch.testing.assert_close(grad_authors, grad_default)


@pytest.mark.parametrize("name", DIVERGENCES)
def test_fdo_raises_chosen_and_lowers_rejected(name):
    gen = torch.Generator().manual_seed(1)
    chosen = torch.randn(5, generator=gen, dtype=torch.float64).requires_grad_(True)
    rejected = torch.randn(3, generator=gen, dtype=torch.float64).requires_grad_(True)
    out = fdo_loss(
        chosen,
        torch.zeros(5, dtype=torch.float64),
        rejected,
        torch.zeros(3, dtype=torch.float64),
        divergence=name,
        beta=0.1,
    )
    out.loss.backward()
    assert (chosen.grad < 0).all()
    assert (rejected.grad > 0).all()
    assert out.metrics["divergence_estimate"] == pytest.approx(-out.loss.item())


def test_fdo_estimate_approaches_divergence_at_its_optimum():
    """Maximising −L_FDO over free per-response scores recovers D_f(P‖Q) (spec §3)."""
    from fgrpo_pipeline.algorithms.divergences import f_divergence

    p = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    q = torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64)
    for name in ("kl", "pearson", "jensen_shannon"):
        scores = torch.zeros(3, dtype=torch.float64, requires_grad=True)
        opt = torch.optim.Adam([scores], lr=0.05)
        from fgrpo_pipeline.algorithms.divergences import get_divergence

        div = get_divergence(name)
        for _ in range(3000):
            loss = -(p * div.link(scores)).sum() + (q * div.conjugate_of_link(scores)).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
        assert -loss.item() == pytest.approx(f_divergence(p, q, div).item(), abs=1e-4)


def test_f_hal_interpolates_and_reduces_exactly():
    logps, ref, rewards = _batch(flat_group=False)
    adv = group_advantages(rewards, G)
    chosen = torch.tensor([-1.0, -2.0], dtype=torch.float64, requires_grad=True)
    rejected = torch.tensor([-3.0, -1.5, -2.5], dtype=torch.float64, requires_grad=True)
    zeros2, zeros3 = torch.zeros(2, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
    args = (logps, ref, adv, chosen, zeros2, rejected, zeros3)
    kw = {"divergence": "jensen_shannon", "beta": 0.1, "group_size": G}
    online = f_grpo_loss(logps, ref, adv, **kw).loss
    offline = fdo_loss(chosen, zeros2, rejected, zeros3, divergence="jensen_shannon").loss
    assert torch.equal(f_hal_loss(*args, lam=0.0, **kw).loss, online)
    assert torch.equal(f_hal_loss(*args, lam=1.0, **kw).loss, offline)
    mixed = f_hal_loss(*args, lam=0.3, **kw)
    torch.testing.assert_close(mixed.loss, 0.3 * offline + 0.7 * online)
    assert "online/divergence_estimate" in mixed.metrics
    assert "offline/implicit_reward_chosen" in mixed.metrics
    # the pure cases need only their own inputs
    f_hal_loss(logps, ref, adv, None, None, None, None, lam=0.0, **kw)
    f_hal_loss(None, None, None, chosen, zeros2, rejected, zeros3, lam=1.0, **kw)


@pytest.mark.parametrize("lam", [-0.1, 1.5, float("nan")])
def test_f_hal_rejects_lambda_outside_unit_interval(lam):
    logps, ref, rewards = _batch()
    with pytest.raises(ValueError, match=r"lam \(λ\) must lie in \[0, 1\]"):
        f_hal_loss(
            logps,
            ref,
            group_advantages(rewards, G),
            None,
            None,
            None,
            None,
            divergence="kl",
            lam=lam,
            group_size=G,
        )


# --------------------------------------------------------------------------- GRPO


def _token_batch(seed=0, n=8, t=6):
    gen = torch.Generator().manual_seed(seed)
    logps = (-2 + torch.randn(n, t, generator=gen, dtype=torch.float64)).requires_grad_(True)
    lengths = torch.tensor([6, 3, 5, 1, 6, 2, 4, 6])[:n]
    mask = (torch.arange(t).unsqueeze(0) < lengths.unsqueeze(1)).double()
    rewards = torch.tensor([1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0, 1.0], dtype=torch.float64)[:n]
    return logps, mask, group_advantages(rewards, 4), lengths


def test_grpo_one_step_value_is_zero_and_gradient_is_policy_gradient():
    logps, mask, adv, lengths = _token_batch()
    out = grpo_loss(logps, logps.detach(), adv, mask)
    assert out.loss.item() == pytest.approx(0.0, abs=1e-12)
    (grad,) = torch.autograd.grad(out.loss, logps)
    # unclipped policy gradient: −mean_i (1/|y_i|) Σ_t a_i ∇ log π(y_it)
    surrogate = -((adv.unsqueeze(1) * logps * mask).sum(1) / lengths).mean()
    (expected,) = torch.autograd.grad(surrogate, logps)
    torch.testing.assert_close(grad, expected)
    assert out.metrics["clip_fraction"] == 0.0


def test_grpo_aggregations_differ_as_documented():
    logps, mask, adv, lengths = _token_batch()
    n, t = logps.shape
    a = adv
    values = {
        agg: grpo_loss(logps, logps.detach(), adv, mask, aggregation=agg).loss.item()
        for agg in ("grpo", "dr_grpo", "dapo")
    }
    # at ratio 1 each token's loss is −a_i
    assert values["grpo"] == pytest.approx(-a.mean().item(), abs=1e-12)
    assert values["dr_grpo"] == pytest.approx(-(a * lengths).sum().item() / (n * t))
    assert values["dapo"] == pytest.approx(-(a * lengths).sum().item() / lengths.sum().item())
    assert values["dr_grpo"] != pytest.approx(values["dapo"])
    dr_long = grpo_loss(
        logps, logps.detach(), adv, mask, aggregation="dr_grpo", max_completion_length=12
    ).loss.item()
    assert dr_long == pytest.approx(values["dr_grpo"] / 2)


def test_grpo_clipping_stops_gradient_beyond_the_trust_region():
    logps, mask, adv, _ = _token_batch()
    old = logps.detach() - 1.0  # ratio e ≈ 2.7 > 1 + ε everywhere
    out = grpo_loss(logps, old, adv, mask)
    (grad,) = torch.autograd.grad(out.loss, logps)
    pos = adv > 0
    assert torch.equal(grad[pos], torch.zeros_like(grad[pos]))  # clipped: no push further
    assert (grad[adv < 0][mask[adv < 0].bool()] > 0).all()  # still pulled back down
    assert out.metrics["clip_fraction"] > 0


def test_grpo_k3_kl_is_zero_at_reference_and_pulls_back():
    logps, mask, adv, _ = _token_batch()
    zero_adv = torch.zeros_like(adv)
    at_ref = grpo_loss(logps, logps.detach(), zero_adv, mask, ref_logps=logps.detach(), kl_coef=0.1)
    assert at_ref.metrics["kl_k3"] == pytest.approx(0.0, abs=1e-12)
    above_ref = grpo_loss(
        logps, logps.detach(), zero_adv, mask, ref_logps=logps.detach() - 0.5, kl_coef=0.1
    )
    assert above_ref.metrics["kl_k3"] > 0
    (grad,) = torch.autograd.grad(above_ref.loss, logps)
    assert (grad[mask.bool()] > 0).all()  # descent lowers logps back toward the reference


def test_dpo_sign_and_pairing():
    chosen = torch.tensor([-1.0, -2.0], requires_grad=True)
    rejected = torch.tensor([-1.0, -2.0], requires_grad=True)
    out = dpo_loss(chosen, torch.zeros(2), rejected, torch.zeros(2), beta=0.1)
    out.loss.backward()
    assert (chosen.grad < 0).all() and (rejected.grad > 0).all()
    assert out.loss.item() == pytest.approx(torch.log(torch.tensor(2.0)).item())
    with pytest.raises(ValueError, match="shape mismatch"):
        dpo_loss(chosen, torch.zeros(2), rejected[:1], torch.zeros(1))


# --------------------------------------------------------------------------- registry


def test_loss_registry_names_and_unknown():
    assert loss_names() == ["f_grpo", "fdo", "f_hal", "grpo", "dpo"]
    with pytest.raises(ValueError, match="unknown loss 'ppo'.*f_grpo, fdo, f_hal, grpo, dpo"):
        get_loss("ppo")


def _loss_inputs(with_offline=False):
    logps, mask, adv, _ = _token_batch()
    rewards = torch.tensor([1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0, 1.0], dtype=torch.float64)
    offline = None
    if with_offline:
        offline = PreferenceInputs(
            torch.tensor([-3.0], dtype=torch.float64, requires_grad=True),
            torch.tensor([-3.0], dtype=torch.float64),
            torch.tensor([-2.0], dtype=torch.float64, requires_grad=True),
            torch.tensor([-2.0], dtype=torch.float64),
        )
    return LossInputs(
        logps=logps,
        ref_logps=logps.detach() + 0.1,
        old_logps=logps.detach(),
        mask=mask,
        advantages=adv,
        rewards=rewards,
        group_size=4,
        offline=offline,
    )


@pytest.mark.parametrize("name", ["f_grpo", "fdo", "f_hal", "grpo", "dpo"])
def test_every_registered_loss_moves_aligned_up_on_rollouts(name):
    inputs = _loss_inputs(with_offline=name == "f_hal")
    pearson = {"divergence": "pearson"} if name in LOSS_OPTIONS["divergence"] else {}
    config = LossConfig(name=name, lam=0.5, **pearson)
    out = get_loss(name)(inputs, config)
    (grad,) = torch.autograd.grad(out.loss, inputs.logps)
    seq_grad = (grad * inputs.mask).sum(1)
    pos, neg = inputs.advantages > 0, inputs.advantages < 0
    assert (seq_grad[pos] < 0).all() if name != "dpo" else (seq_grad[pos] <= 0).all()
    assert (seq_grad[neg] > 0).all() if name != "dpo" else (seq_grad[neg] >= 0).all()
    assert seq_grad.abs().sum() > 0
    assert all(isinstance(v, float) for v in out.metrics.values())


def test_f_hal_adapter_requires_offline_batch():
    with pytest.raises(ValueError, match="needs an offline preference minibatch"):
        get_loss("f_hal")(_loss_inputs(), LossConfig(name="f_hal", lam=0.5))


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"name": "ppo"}, "unknown loss 'ppo' \\(parameter 'loss'\\)"),
        ({"divergence": "chi"}, "unknown divergence 'chi' \\(parameter 'divergence'\\)"),
        ({"beta": 0.0}, "beta must be a finite number > 0"),
        ({"lam": 2.0}, "lam \\(λ\\) must lie in \\[0, 1\\]"),
        ({"weights": "is"}, "unknown weights 'is'"),
        ({"aggregation": "sum"}, "unknown aggregation 'sum'"),
    ],
)
def test_loss_config_rejects_bad_parameters(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LossConfig(**kwargs)


# A valid value other than the default for every option of LossConfig.
NON_DEFAULT = {
    "divergence": "hellinger",
    "beta": 0.2,
    "weights": "snis",
    "lam": 0.3,
    "epsilon": 0.1,
    "kl_coef": 0.05,
    "aggregation": "dapo",
    "reward_bound": None,
    "hal_scaling": "balanced",
    "epsilon_high": 0.28,
    "drop_zero_spread": True,
}


def test_the_option_table_covers_every_option_and_names_registered_losses():
    options = {f.name for f in fields(LossConfig)} - {"name"}
    assert set(LOSS_OPTIONS) == options == set(NON_DEFAULT)
    for losses in LOSS_OPTIONS.values():
        assert set(losses) <= set(LOSSES.names())


@pytest.mark.parametrize(
    ("option", "loss"),
    [(option, loss) for option in LOSS_OPTIONS for loss in loss_names()],
)
def test_an_option_is_refused_for_a_loss_that_ignores_it(option, loss):
    value = NON_DEFAULT[option]
    if loss in LOSS_OPTIONS[option]:
        assert getattr(LossConfig(name=loss, **{option: value}), option) == value
    else:
        message = rf"{option}={re.escape(repr(value))} applies to loss .* only, not '{loss}'"
        with pytest.raises(ValueError, match=message):
            LossConfig(name=loss, **{option: value})
    # the default is accepted by every loss (the parameter files set every option)
    LossConfig(name=loss, **{option: getattr(LossConfig(), option)})


CONF = Path(__file__).resolve().parents[1] / "conf" / "base"


def _shipped_block(file: str, block: str) -> dict:
    """A block of a conf/base parameter file, its ``${globals:...}`` values replaced by those
    of conf/base/globals.yml."""
    shipped = yaml.safe_load((CONF / "globals.yml").read_text())

    def resolve(value):
        if isinstance(value, dict):
            return {k: resolve(v) for k, v in value.items()}
        if isinstance(value, list):
            return [resolve(v) for v in value]
        found = re.fullmatch(r"\$\{globals:(\w+)\}", value) if isinstance(value, str) else None
        return shipped[found.group(1)] if found else value

    return resolve(yaml.safe_load((CONF / file).read_text())[block])


@pytest.mark.parametrize("loss", ["f_grpo", "f_hal", "fdo", "grpo", "dpo"])
def test_the_shipped_training_parameters_run_every_loss(loss):
    """``kedro run --params "training.loss=<loss>"`` over parameters_training.yml (and the
    safety setting's) passes no option the loss would ignore."""
    from fgrpo_pipeline.pipelines.safety_training.params import SafetyTrainingParams
    from fgrpo_pipeline.pipelines.training.params import TrainingParams

    for file, block, cls in (
        ("parameters_training.yml", "training", TrainingParams),
        ("parameters_safety_training.yml", "safety_training", SafetyTrainingParams),
    ):
        config = cls.from_params({**_shipped_block(file, block), "loss": loss}).config
        assert config.loss.name == loss


def test_f_grpo_bad_inputs():
    logps, ref, rewards = _batch()
    adv = group_advantages(rewards, G)
    with pytest.raises(ValueError, match="shape mismatch"):
        f_grpo_loss(logps, ref[:-1], adv, divergence="kl", group_size=G)
    with pytest.raises(ValueError, match="not divisible by group_size=5"):
        f_grpo_loss(logps, ref, adv, divergence="kl", group_size=5)
    with pytest.raises(ValueError, match="unknown divergence"):
        f_grpo_loss(logps, ref, adv, divergence="kls", group_size=G)
    with pytest.raises(ValueError, match="advantages must be finite"):
        f_grpo_loss(logps, ref, adv * float("nan"), divergence="kl", group_size=G)
    with pytest.raises(ValueError, match="flat"):
        f_grpo_loss(logps.view(3, 4), ref.view(3, 4), adv.view(3, 4), divergence="kl", group_size=G)
    with pytest.raises(ValueError, match="at least one chosen and one rejected"):
        fdo_loss(logps[:0], ref[:0], logps, ref, divergence="kl")


# --------------------------------------------------------------------------- data parallel


def _two_rank_batch():
    """4 groups of G = 4 with ragged lengths; the ranks' halves differ in aligned, unaligned
    and token counts, and in how many groups have a reward spread."""
    gen = torch.Generator().manual_seed(3)
    n, t = 16, 6
    lengths = torch.tensor([6, 2, 5, 1, 3, 6, 4, 2, 1, 1, 6, 5, 2, 3, 4, 6])
    mask = (torch.arange(t) < lengths.unsqueeze(1)).double()
    logps = (-1.0 + 0.3 * torch.randn(n, t, generator=gen, dtype=torch.float64)) * mask
    rewards = torch.tensor(
        [1, 1, 1, 0, 1, 0, 1, 1, 0, 0, 0, 1, 0, 0, 0, 0], dtype=torch.float64
    )  # rank 0: 5 aligned of 8, two groups with spread; rank 1: 1 of 8, one group
    return LossInputs(
        logps=logps.requires_grad_(True),
        ref_logps=(logps.detach() + 0.05 * torch.randn(n, t, generator=gen)) * mask,
        old_logps=(logps.detach() + 0.02 * torch.randn(n, t, generator=gen)) * mask,
        mask=mask,
        advantages=group_advantages(rewards, G),
        rewards=rewards,
        group_size=G,
    )


def _rank_share(inputs: LossInputs, rank: int, ranks: int) -> LossInputs:
    rows = slice(rank * len(inputs.rewards) // ranks, (rank + 1) * len(inputs.rewards) // ranks)
    return LossInputs(
        logps=inputs.logps[rows],
        ref_logps=inputs.ref_logps[rows],
        old_logps=inputs.old_logps[rows],
        mask=inputs.mask[rows],
        advantages=inputs.advantages[rows],
        rewards=inputs.rewards[rows],
        group_size=inputs.group_size,
    )


def _losses_on_ranks(loss_fn, inputs: LossInputs, config: LossConfig, ranks: int = 2):
    """Each rank's loss as data-parallel training computes it. ``rank_mean`` stands for the
    all-reduce: a first pass records every rank's counts in call order (each rank asks for the
    same counts), the second is given their means."""
    shares = [_rank_share(inputs, r, ranks) for r in range(ranks)]
    counts: list[list[float]] = [[] for _ in shares]
    for share, seen in zip(shares, counts, strict=True):
        share.rank_mean = lambda count, seen=seen: seen.append(count.item()) or count
        loss_fn(share, config)
    means = [sum(column) / ranks for column in zip(*counts, strict=True)]
    for share in shares:
        given = iter(means)
        share.rank_mean = lambda count, given=given: torch.tensor(next(given))
    return [loss_fn(share, config).loss for share in shares]


@pytest.mark.parametrize(
    ("name", "options"),
    [
        ("grpo", {"aggregation": "dapo", "kl_coef": 0.1}),
        ("grpo", {"aggregation": "dr_grpo"}),
        ("grpo", {"aggregation": "grpo"}),
        ("fdo", {"divergence": "kl"}),
        ("fdo", {"divergence": "hellinger"}),
        ("dpo", {}),
        ("f_grpo", {"divergence": "pearson", "weights": "snis"}),
    ],
)
def test_data_parallel_ranks_average_to_the_whole_batch_loss_and_gradient(name, options):
    # DDP averages the ranks' gradients: that average must be the whole batch's gradient,
    # also where the ranks hold different numbers of tokens, aligned samples or pairs.
    inputs, config = _two_rank_batch(), LossConfig(name=name, **options)
    loss_fn = get_loss(name)
    whole = loss_fn(inputs, config).loss
    (whole_grad,) = torch.autograd.grad(whole, inputs.logps)
    ranks = _losses_on_ranks(loss_fn, inputs, config)
    averaged = sum(ranks) / len(ranks)
    (averaged_grad,) = torch.autograd.grad(averaged, inputs.logps)
    assert averaged.item() == pytest.approx(whole.item(), rel=1e-12, abs=1e-12)
    torch.testing.assert_close(averaged_grad, whole_grad, rtol=1e-10, atol=1e-12)
    # the local normalisation (each rank's own counts) would not: the test can tell
    if name in ("fdo", "dpo") or options.get("aggregation") == "dapo":
        local = sum(loss_fn(_rank_share(inputs, r, 2), config).loss for r in range(2)) / 2
        assert local.item() != pytest.approx(whole.item(), rel=1e-6)


@pytest.mark.parametrize("name", ["fdo", "dpo"])
def test_a_rank_whose_groups_are_all_flat_still_takes_part(name):
    # rank 1's groups have no reward spread, so no preference: its loss is a zero with a graph
    # (DDP needs every rank in backward) and the average is still the whole batch's loss
    inputs = _two_rank_batch()
    inputs.rewards[8:] = 0.0
    inputs.advantages = group_advantages(inputs.rewards, G)
    config = LossConfig(name=name, divergence="kl")
    ranks = _losses_on_ranks(get_loss(name), inputs, config)
    assert all(loss.requires_grad for loss in ranks) and ranks[1].item() == 0.0
    whole = get_loss(name)(inputs, config).loss
    assert (sum(ranks) / 2).item() == pytest.approx(whole.item(), rel=1e-12)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda x: fdo_loss(x, x, x, x, divergence="kl", chosen_count=-1), "chosen_count"),
        (lambda x: dpo_loss(x, x, x, x, pair_count=float("nan")), "pair_count"),
    ],
)
def test_given_counts_are_checked(call, message):
    with pytest.raises(ValueError, match=f"{message} must be a finite count"):
        call(torch.zeros(2, dtype=torch.float64))


# ------------------------------------------------ review defects (each failed before its fix)


def _grpo_inputs(width_pad=0, **extra):
    gen = torch.Generator().manual_seed(0)
    logps = -torch.rand(4, 3, generator=gen)
    mask = torch.tensor([[1.0, 1, 1], [1, 1, 0], [1, 0, 0], [1, 1, 1]])
    pad = torch.zeros(4, width_pad)
    return LossInputs(
        logps=torch.cat([logps, pad], 1).requires_grad_(True),
        ref_logps=torch.cat([logps - 0.2, pad], 1),
        old_logps=torch.cat([logps - 0.1, pad], 1),
        mask=torch.cat([mask, pad], 1),
        advantages=torch.tensor([1.0, -1.0, 0.9, -0.2]),
        rewards=torch.tensor([1.0, 0.0, 1.0, 0.0]),
        group_size=4,
        **extra,
    )


def test_dr_grpo_divides_by_the_configured_length_not_the_batch_width():
    cfg = LossConfig(name="grpo", aggregation="dr_grpo")
    narrow = get_loss("grpo")(_grpo_inputs(max_completion_length=8), cfg).loss
    wide = get_loss("grpo")(_grpo_inputs(width_pad=2, max_completion_length=8), cfg).loss
    torch.testing.assert_close(narrow, wide)  # the same sequences, padded wider
    inputs = _grpo_inputs()
    ratio = torch.exp(inputs.logps - inputs.old_logps).detach()
    adv = inputs.advantages.unsqueeze(1)
    per_token = -torch.minimum(ratio * adv, ratio.clamp(0.8, 1.2) * adv)
    torch.testing.assert_close(narrow, (per_token * inputs.mask).sum() / (4 * 8))
    with pytest.raises(ValueError, match="max_completion_length=2 is shorter"):
        get_loss("grpo")(_grpo_inputs(max_completion_length=2), cfg)


def test_divergence_estimate_leaves_out_zero_spread_rows():
    logps, ref, rewards = _batch()  # the last group is flat
    adv = group_advantages(rewards, G)
    out = f_grpo_loss(logps, ref, adv, divergence="kl", group_size=G)
    spread = f_grpo_loss(logps[:-G], ref[:-G], adv[:-G], divergence="kl", group_size=G)
    assert out.metrics["divergence_estimate"] == pytest.approx(
        spread.metrics["divergence_estimate"]
    )


@pytest.mark.parametrize("name", DIVERGENCES)
def test_divergence_estimate_uses_the_snis_weights(name):
    from fgrpo_pipeline.algorithms.divergences import get_divergence

    logps, ref, rewards = _batch(flat_group=False)
    adv = group_advantages(rewards, G)
    out = f_grpo_loss(logps, ref, adv, divergence=name, group_size=G, weights="snis")
    div = get_divergence(name)
    s = (0.1 * (logps - ref)).detach()
    old = logps.detach()
    w = torch.zeros_like(adv)
    for start in range(0, len(adv), G):
        rows = slice(start, start + G)
        for side, sign in ((adv[rows] > 0, 1.0), (adv[rows] < 0, -1.0)):
            scores = sign * adv[rows] - old[rows]  # r_j is the advantage: no rewards given
            e = torch.where(side, scores.exp(), torch.zeros_like(scores))
            w[rows] += e / e.sum() if side.any() else 0.0
    expected = _loop_estimate(div.link(s), div.conjugate_of_link(s), adv, w)
    assert out.metrics["divergence_estimate"] == pytest.approx(expected, rel=1e-6)


def test_grpo_uses_the_importance_weights_on_the_policy_term_only():
    cfg = LossConfig(name="grpo", kl_coef=0.0)
    weights = torch.full((4, 3), 0.5)
    half = get_loss("grpo")(_grpo_inputs(is_weights=weights), cfg).loss
    full = get_loss("grpo")(_grpo_inputs(), cfg).loss
    torch.testing.assert_close(half, 0.5 * full)
    kl = LossConfig(name="grpo", kl_coef=0.1)
    k_half = get_loss("grpo")(_grpo_inputs(is_weights=weights), kl).loss
    k_full = get_loss("grpo")(_grpo_inputs(), kl).loss
    torch.testing.assert_close(k_full - k_half, 0.5 * full)  # the KL term is not weighted


def test_truncated_importance_weights_cap_and_report():
    from fgrpo_pipeline.algorithms.losses import truncated_importance_weights

    old = torch.zeros(2, 3)
    engine = torch.tensor([[0.0, -1.0, 1.0], [-0.5, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1, 1], [1, 0, 0]])
    w, metrics = truncated_importance_weights(old, engine, mask, cap=2.0)
    expected = torch.tensor([[1.0, 2.0, math.exp(-1)], [math.exp(0.5), 1, 1]])
    torch.testing.assert_close(w, expected)
    assert metrics["is_frac_capped"] == pytest.approx(0.25)
    assert metrics["is_ratio_mean"] == pytest.approx(
        (1 + math.e + math.exp(-1) + math.exp(0.5)) / 4
    )
    with pytest.raises(ValueError, match="cap must be a finite number ≥ 1"):
        truncated_importance_weights(old, engine, mask, cap=0.5)


def test_epsilon_high_widens_the_upper_clip_only():
    logps = torch.zeros(2, 1, requires_grad=True)
    old = torch.tensor([[-0.25], [0.25]])  # ratios e^0.25 ≈ 1.28 and e^-0.25 ≈ 0.78
    mask, adv = torch.ones(2, 1), torch.tensor([1.0, -1.0])
    sym = grpo_loss(logps, old, adv, mask, epsilon=0.2)
    wide = grpo_loss(logps, old, adv, mask, epsilon=0.2, epsilon_high=0.3)
    assert sym.metrics["clip_fraction"] == pytest.approx(1.0)
    assert wide.metrics["clip_fraction"] == pytest.approx(0.5)  # 1.28 < 1.3 is kept
    (grad,) = torch.autograd.grad(wide.loss, logps)
    assert grad[0, 0] < 0 and grad[1, 0] == 0  # the aligned token still pushed up


def test_grpo_drop_zero_spread_equals_the_loss_of_the_spread_groups_alone():
    gen = torch.Generator().manual_seed(1)
    logps = -torch.rand(8, 3, generator=gen)
    mask = torch.ones(8, 3)
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5, 0.0, 0.0, 0.0, 0.0])  # group 2 flat

    def inputs(rows):
        return LossInputs(
            logps=logps[rows],
            ref_logps=logps[rows] - 0.3,
            old_logps=logps[rows] - 0.1,
            mask=mask[rows],
            advantages=adv[rows],
            rewards=adv[rows],
            group_size=4,
            max_completion_length=3,
        )

    for aggregation in ("grpo", "dr_grpo", "dapo"):
        dropped = get_loss("grpo")(
            inputs(slice(None)),
            LossConfig(name="grpo", aggregation=aggregation, kl_coef=0.1, drop_zero_spread=True),
        )
        alone = get_loss("grpo")(
            inputs(slice(0, 4)), LossConfig(name="grpo", aggregation=aggregation, kl_coef=0.1)
        )
        torch.testing.assert_close(dropped.loss, alone.loss)
        assert dropped.metrics["dropped_groups"] == 1


@pytest.mark.parametrize("name", DIVERGENCES)
def test_balanced_f_hal_terms_are_per_sample_means_and_sum_to_the_loss(name):
    logps, ref, rewards = _batch()
    adv = group_advantages(rewards, G)
    gen = torch.Generator().manual_seed(3)
    c, r = -5 + torch.randn(5, generator=gen), -5 + torch.randn(7, generator=gen)
    offline = (c.clone().requires_grad_(True), c - 0.2, r.clone().requires_grad_(True), r + 0.1)
    out = f_hal_loss(
        logps, ref, adv, *offline, divergence=name, lam=0.3, group_size=G, hal_scaling="balanced"
    )
    torch.testing.assert_close(out.terms["online"] + out.terms["offline"], out.loss)
    online = f_grpo_loss(logps, ref, adv, divergence=name, group_size=G, scaling="balanced")
    # the balanced online term is minus the divergence estimate the metric reports
    assert online.loss.item() == pytest.approx(-online.metrics["divergence_estimate"])
    torch.testing.assert_close(out.terms["online"], 0.7 * online.loss)
    fdo = fdo_loss(*offline, divergence=name)
    torch.testing.assert_close(out.terms["offline"], 0.3 * fdo.loss)
