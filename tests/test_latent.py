"""Latent separation: hidden states, Gaussian fits, Bhattacharyya distance and PCA."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch
from matplotlib.figure import Figure

from fgrpo_pipeline.models.policy import build_char_tokenizer, build_tiny_policy
from fgrpo_pipeline.reporting.plots import latent_scatter
from fgrpo_pipeline.safety.latent import (
    bhattacharyya_distance,
    bhattacharyya_gaussian,
    gaussian_fit,
    last_prompt_hidden_states,
    latent_projection,
    pca_2d,
)


def random_spd(d: int, generator: torch.Generator) -> torch.Tensor:
    a = torch.randn(d, d, generator=generator, dtype=torch.float64)
    return a @ a.T + 0.5 * torch.eye(d, dtype=torch.float64)


def gaussian_sample(mu: torch.Tensor, cov: torch.Tensor, n: int, generator: torch.Generator):
    z = torch.randn(n, len(mu), generator=generator, dtype=torch.float64)
    return mu + z @ torch.linalg.cholesky(cov).T


@pytest.fixture(scope="module")
def policy():
    return build_tiny_policy(build_char_tokenizer(), seed=0)


# --- closed form and sample estimate -------------------------------------------------------


def test_closed_form_matches_the_one_dimensional_formula():
    mu1, mu2, var1, var2 = 0.3, 2.1, 0.5, 2.0
    expected = (mu1 - mu2) ** 2 / (4 * (var1 + var2)) + 0.5 * math.log(
        (var1 + var2) / (2 * math.sqrt(var1 * var2))
    )
    got = bhattacharyya_gaussian(
        torch.tensor([mu1], dtype=torch.float64),
        torch.tensor([[var1]], dtype=torch.float64),
        torch.tensor([mu2], dtype=torch.float64),
        torch.tensor([[var2]], dtype=torch.float64),
    )
    assert got == pytest.approx(expected, rel=1e-12)


def test_closed_form_of_a_diagonal_case_is_the_sum_over_coordinates():
    mu1, mu2 = torch.tensor([0.0, 1.0]), torch.tensor([2.0, -1.0])
    var1, var2 = torch.tensor([1.0, 3.0]), torch.tensor([4.0, 0.5])
    per_coordinate = [
        bhattacharyya_gaussian(
            mu1[i : i + 1], var1[i].reshape(1, 1), mu2[i : i + 1], var2[i].reshape(1, 1)
        )
        for i in range(2)
    ]
    got = bhattacharyya_gaussian(mu1, torch.diag(var1), mu2, torch.diag(var2))
    assert got == pytest.approx(sum(per_coordinate), rel=1e-12)


def test_sample_estimate_converges_to_the_closed_form_of_the_true_parameters():
    generator = torch.Generator().manual_seed(0)
    d, n = 3, 20_000
    mu1 = torch.tensor([0.0, 1.0, -0.5], dtype=torch.float64)
    mu2 = torch.tensor([1.0, 0.0, 0.5], dtype=torch.float64)
    cov1, cov2 = random_spd(d, generator), random_spd(d, generator)
    x1 = gaussian_sample(mu1, cov1, n, generator)
    x2 = gaussian_sample(mu2, cov2, n, generator)
    truth = bhattacharyya_gaussian(mu1, cov1, mu2, cov2)
    assert truth > 0.05
    assert bhattacharyya_distance(x1, x2, ridge=1e-6) == pytest.approx(truth, rel=0.05, abs=0.01)


def test_gaussian_fit_is_the_mean_and_unbiased_covariance():
    x = torch.tensor([[1.0, 2.0], [3.0, 0.0], [5.0, 4.0]])
    mean, cov = gaussian_fit(x)
    assert mean.dtype == cov.dtype == torch.float64
    torch.testing.assert_close(mean, torch.tensor([3.0, 2.0], dtype=torch.float64))
    torch.testing.assert_close(cov, torch.cov(x.T).to(torch.float64))


# --- properties of the distance ------------------------------------------------------------


def cloud(n: int = 200, d: int = 4, shift: float = 0.0, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=generator) + shift


def test_identical_sets_are_at_distance_zero():
    x = cloud()
    assert bhattacharyya_distance(x, x.clone()) == pytest.approx(0.0, abs=1e-10)


def test_distance_is_symmetric():
    x1, x2 = cloud(seed=1), cloud(n=150, shift=0.7, seed=2) * 2.0
    assert bhattacharyya_distance(x1, x2) == pytest.approx(bhattacharyya_distance(x2, x1))


def test_distance_grows_with_mean_separation():
    base, other = cloud(seed=1), cloud(seed=2)
    distances = [bhattacharyya_distance(base, other + shift) for shift in (0.0, 0.5, 1.0, 2.0)]
    assert distances == sorted(distances)
    assert distances[-1] > distances[0] + 1.0


def test_ridge_is_relative_to_the_scale_of_the_data():
    # float64 so that scaling by 1000 is exact up to rounding far below the tolerance.
    x1 = cloud(n=20, d=30, seed=1).double()
    x2 = cloud(n=20, d=30, shift=0.3, seed=2).double()
    assert bhattacharyya_distance(x1 * 1000, x2 * 1000) == pytest.approx(
        bhattacharyya_distance(x1, x2), rel=1e-9
    )


def test_distance_is_finite_with_fewer_samples_than_dimensions():
    x1, x2 = cloud(n=8, d=64, seed=1), cloud(n=8, d=64, shift=1.0, seed=2)
    distance = bhattacharyya_distance(x1, x2)
    assert math.isfinite(distance)
    assert distance > 0


@pytest.mark.parametrize("ridge", [0.0, -0.1, float("nan")])
def test_non_positive_ridge_is_rejected(ridge):
    with pytest.raises(ValueError, match="ridge"):
        bhattacharyya_distance(cloud(), cloud(seed=1), ridge=ridge)


def test_bad_shapes_are_rejected_with_the_problem_named():
    with pytest.raises(ValueError, match="same dimension"):
        bhattacharyya_distance(cloud(d=3), cloud(d=4))
    with pytest.raises(ValueError, match="2-D"):
        bhattacharyya_distance(torch.zeros(10), cloud(d=1))
    with pytest.raises(ValueError, match="at least 2 rows"):
        gaussian_fit(torch.zeros(1, 3))
    with pytest.raises(ValueError, match="2-D"):
        gaussian_fit(torch.zeros(4, 3, 2))
    with pytest.raises(ValueError, match="cov2 must have shape"):
        bhattacharyya_gaussian(torch.zeros(2), torch.eye(2), torch.zeros(2), torch.eye(3))
    with pytest.raises(ValueError, match="means"):
        bhattacharyya_gaussian(torch.zeros(2), torch.eye(2), torch.zeros(3), torch.eye(2))


def test_non_positive_definite_covariance_is_rejected():
    singular = torch.tensor([[1.0, 1.0], [1.0, 1.0]])
    with pytest.raises(ValueError, match="positive definite"):
        bhattacharyya_gaussian(torch.zeros(2), singular, torch.zeros(2), torch.eye(2))
    with pytest.raises(ValueError, match="symmetric"):
        bhattacharyya_gaussian(
            torch.zeros(2), torch.tensor([[1.0, 0.5], [0.0, 1.0]]), torch.zeros(2), torch.eye(2)
        )


# --- hidden states of a real tiny policy ---------------------------------------------------


def test_hidden_state_of_a_prompt_does_not_depend_on_left_padding(policy):
    short, long = "12+7=", "Natalia sold 48 clips in April and half as many in May."
    alone = last_prompt_hidden_states(policy, [short])
    batched = last_prompt_hidden_states(policy, [short, long, "3*4="])
    assert batched.shape == (3, policy.model.config.hidden_size)
    assert batched.dtype == torch.float32
    torch.testing.assert_close(batched[0], alone[0], atol=1e-5, rtol=0)
    # Batches split by batch_size give the same vectors.
    torch.testing.assert_close(
        last_prompt_hidden_states(policy, [short, long, "3*4="], batch_size=2),
        batched,
        atol=1e-5,
        rtol=0,
    )
    assert not torch.allclose(batched[0], batched[1])


@pytest.mark.parametrize("training", [True, False])
def test_model_mode_is_restored(policy, training):
    policy.model.train(training)
    last_prompt_hidden_states(policy, ["1+1="])
    assert policy.model.training is training
    policy.model.eval()


# --- PCA and the projection table ----------------------------------------------------------


def test_pca_2d_finds_the_dominant_direction_of_an_elongated_cloud():
    generator = torch.Generator().manual_seed(0)
    direction = torch.tensor([1.0, 2.0, -2.0, 0.0, 0.0]) / 3.0
    along = 10.0 * torch.randn(500, 1, generator=generator)
    x = along * direction + 0.1 * torch.randn(500, 5, generator=generator) + 7.0
    projected = pca_2d(x)
    assert projected.shape == (500, 2)
    torch.testing.assert_close(
        projected.mean(dim=0), torch.zeros(2, dtype=torch.float64), atol=1e-9, rtol=0
    )
    # PC1 is the coordinate along the elongated direction, up to a sign.
    correlation = torch.corrcoef(torch.stack([projected[:, 0], along.squeeze(1).double()]))
    assert correlation[0, 1].abs() > 0.999
    assert projected[:, 0].var() > 100 * projected[:, 1].var()


def test_pca_2d_sign_is_deterministic():
    x = cloud(n=50, d=6, seed=3)
    torch.testing.assert_close(pca_2d(x), pca_2d(x.flip(0)).flip(0))
    # Negated data has the same (sign-fixed) axes, so its coordinates are negated.
    torch.testing.assert_close(pca_2d(-x), -pca_2d(x))


def test_latent_projection_and_scatter(policy):
    harmful = last_prompt_hidden_states(policy, ["how to build a bomb", "steal a car", "hack"])
    benign = last_prompt_hidden_states(policy, ["bake bread", "plant a tree", "12+7=", "hi"])
    hidden = {"base": (harmful, benign), "lam=0": (harmful + 1.0, benign * 2.0)}
    table = latent_projection(hidden)
    assert list(table.columns) == ["model", "safety", "pc1", "pc2", "bhattacharyya"]
    assert len(table) == 2 * 7
    assert table.groupby("model", sort=False)["safety"].value_counts().to_dict() == {
        ("base", "harmful"): 3,
        ("base", "benign"): 4,
        ("lam=0", "harmful"): 3,
        ("lam=0", "benign"): 4,
    }
    base = table[table["model"] == "base"]
    assert base["bhattacharyya"].nunique() == 1
    assert base["bhattacharyya"].iloc[0] == pytest.approx(bhattacharyya_distance(harmful, benign))
    assert table[["pc1", "pc2"]].notna().all().all()

    fig = latent_scatter(table)
    assert isinstance(fig, Figure)
    assert [ax.get_title() for ax in fig.axes] == [
        f"{model}  D_B = {table[table['model'] == model]['bhattacharyya'].iloc[0]:.2f}"
        for model in ("base", "lam=0")
    ]
    assert all(ax.get_xlabel() == "PC1" and ax.get_ylabel() == "PC2" for ax in fig.axes)
    assert len(fig.legends) == 1
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["harmful", "benign"]


def test_latent_projection_of_nothing_is_an_empty_table():
    table = latent_projection({})
    assert isinstance(table, pd.DataFrame)
    assert list(table.columns) == ["model", "safety", "pc1", "pc2", "bhattacharyya"]
    assert table.empty
