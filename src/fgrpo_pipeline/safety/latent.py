"""Latent separation of harmful and benign prompts (f-HAL, Figure 2).

For each anchor set the policy's last-layer hidden state at the last prompt token is taken,
a Gaussian is fitted to each set, and the Bhattacharyya distance between the two fits is
reported, together with a 2-D PCA projection for the scatter plot:

    D_B = 1/8 Δμᵀ Σ̄⁻¹ Δμ + 1/2 ln( det Σ̄ / sqrt(det Σ1 det Σ2) ),   Σ̄ = (Σ1 + Σ2) / 2.

Hidden sizes usually exceed the number of anchor prompts, so the sample covariances are
singular; :func:`bhattacharyya_distance` adds a ridge proportional to their mean variance.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import pandas as pd
import torch
from torch import Tensor

if TYPE_CHECKING:
    from fgrpo_pipeline.models.policy import Policy

DEFAULT_RIDGE = 0.01
LATENT_COLUMNS = ("model", "safety", "pc1", "pc2", "bhattacharyya")


def last_prompt_hidden_states(
    policy: Policy, prompts: list[str], *, batch_size: int = 256
) -> Tensor:
    """Last-layer hidden state at each prompt's last token, float32 on CPU, shape [n, hidden]."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
    model, tokenizer = policy.model, policy.tokenizer
    if tokenizer.padding_side != "left":
        # With right padding position -1 would be a pad token for all but the longest prompt.
        raise ValueError(f"the tokenizer must pad on the left, got {tokenizer.padding_side!r}")
    if not prompts:
        return torch.empty(0, model.config.hidden_size)
    device = next(model.parameters()).device
    was_training = model.training
    # eval(): dropout would make the representation of a prompt random.
    model.eval()
    chunks = []
    try:
        with torch.no_grad():
            for start in range(0, len(prompts), batch_size):
                encoded = tokenizer(
                    list(prompts[start : start + batch_size]),
                    padding=True,
                    return_tensors="pt",
                ).to(device)
                attention_mask = encoded["attention_mask"].long()
                # Positions from the attention mask, as ``generate`` derives them: Qwen2's
                # forward alone would count the left padding and shift every position.
                position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)
                output = model(
                    input_ids=encoded["input_ids"],
                    attention_mask=attention_mask,
                    position_ids=position_ids,
                    output_hidden_states=True,
                    use_cache=False,
                    # Only the hidden states are needed: skip the lm_head over all positions.
                    logits_to_keep=1,
                )
                chunks.append(output.hidden_states[-1][:, -1, :].float().cpu())
    finally:
        model.train(was_training)
    return torch.cat(chunks)


def _check_samples(x: Tensor, name: str = "x") -> None:
    if x.dim() != 2:
        raise ValueError(f"{name} must be 2-D [n, d], got shape {tuple(x.shape)}")
    if x.shape[0] < 2:
        raise ValueError(f"{name} needs at least 2 rows to fit a covariance, got {x.shape[0]}")
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} has non-finite entries")


def gaussian_fit(x: Tensor) -> tuple[Tensor, Tensor]:
    """Mean [d] and unbiased covariance [d, d] of the rows of ``x``, in float64."""
    _check_samples(x)
    x = x.to(torch.float64)
    mean = x.mean(dim=0)
    centred = x - mean
    cov = centred.T @ centred / (x.shape[0] - 1)
    return mean, cov


def _cholesky(cov: Tensor, name: str) -> Tensor:
    # A Cholesky factor both certifies positive definiteness and gives log det stably.
    if not torch.isfinite(cov).all():
        raise ValueError(f"{name} has non-finite entries")
    # Cholesky reads only the lower triangle, so an asymmetric input would pass silently.
    if not torch.allclose(cov, cov.T, rtol=0.0, atol=1e-8 * float(cov.abs().max())):
        raise ValueError(f"{name} must be symmetric")
    factor, info = torch.linalg.cholesky_ex(cov)
    if info.item() != 0 or not torch.isfinite(factor).all():
        raise ValueError(f"{name} must be positive definite (add a ridge to sample covariances)")
    return factor


def _logdet(factor: Tensor) -> Tensor:
    return 2.0 * factor.diagonal().log().sum()


def bhattacharyya_gaussian(mu1: Tensor, cov1: Tensor, mu2: Tensor, cov2: Tensor) -> float:
    """Closed-form Bhattacharyya distance between N(mu1, cov1) and N(mu2, cov2)."""
    mu1, mu2 = mu1.to(torch.float64), mu2.to(torch.float64)
    cov1, cov2 = cov1.to(torch.float64), cov2.to(torch.float64)
    if mu1.dim() != 1 or mu2.shape != mu1.shape:
        raise ValueError(
            f"means must be 1-D of equal length, got {tuple(mu1.shape)} and {tuple(mu2.shape)}"
        )
    d = mu1.shape[0]
    for name, cov in (("cov1", cov1), ("cov2", cov2)):
        if cov.shape != (d, d):
            raise ValueError(
                f"{name} must have shape {(d, d)} to match the means, got {tuple(cov.shape)}"
            )
    factor1 = _cholesky(cov1, "cov1")
    factor2 = _cholesky(cov2, "cov2")
    factor_mean = _cholesky((cov1 + cov2) / 2, "(cov1 + cov2) / 2")
    delta = (mu1 - mu2).unsqueeze(1)
    mahalanobis = (delta.T @ torch.cholesky_solve(delta, factor_mean)).squeeze()
    # ln(det Σ̄ / sqrt(det Σ1 det Σ2)) in log space: the determinants themselves under- or
    # overflow for hidden sizes in the hundreds.
    log_ratio = _logdet(factor_mean) - 0.5 * (_logdet(factor1) + _logdet(factor2))
    return float(mahalanobis / 8.0 + log_ratio / 2.0)


def bhattacharyya_distance(x1: Tensor, x2: Tensor, *, ridge: float = DEFAULT_RIDGE) -> float:
    """D_B between Gaussians fitted to the rows of ``x1`` and ``x2``, with a relative ridge.

    ``ridge * trace(Σ̄) / d`` (Σ̄ the mean of the two sample covariances) is added to both
    diagonals: relative to the mean variance so that the same ``ridge`` suits any scale of
    hidden states, and positive so that the covariances are invertible when n < d. If both
    sets have zero variance the scale falls back to 1.
    """
    if not (isinstance(ridge, int | float) and math.isfinite(ridge) and ridge > 0):
        raise ValueError(f"ridge must be a finite number > 0, got {ridge!r}")
    _check_samples(x1, "x1")
    _check_samples(x2, "x2")
    if x1.shape[1] != x2.shape[1]:
        raise ValueError(
            f"x1 and x2 must have the same dimension, got {x1.shape[1]} and {x2.shape[1]}"
        )
    mu1, cov1 = gaussian_fit(x1)
    mu2, cov2 = gaussian_fit(x2)
    d = cov1.shape[0]
    mean_variance = float(((cov1 + cov2) / 2).trace()) / d
    scale = mean_variance if mean_variance > 0 else 1.0
    shift = ridge * scale * torch.eye(d, dtype=torch.float64)
    return bhattacharyya_gaussian(mu1, cov1 + shift, mu2, cov2 + shift)


def pca_2d(x: Tensor) -> Tensor:
    """Projection [n, 2] (float64) of the centred rows of ``x`` on its first two principal axes.

    Each axis is signed so that its largest-magnitude loading is positive, which makes the
    plot reproducible (an SVD's signs are arbitrary).
    """
    _check_samples(x)
    if x.shape[1] < 2:
        raise ValueError(f"x needs at least 2 columns for a 2-D projection, got {x.shape[1]}")
    x = x.to(torch.float64)
    centred = x - x.mean(dim=0)
    _, _, vh = torch.linalg.svd(centred, full_matrices=False)
    components = vh[:2]
    largest = components.abs().argmax(dim=1)
    signs = components.gather(1, largest.unsqueeze(1)).sign()
    # A zero component (rank-1 data) has sign 0; keep it rather than erase the axis.
    signs[signs == 0] = 1.0
    return centred @ (components * signs).T


def latent_projection(hidden: dict[str, tuple[Tensor, Tensor]]) -> pd.DataFrame:
    """Per model: PCA of its harmful ∪ benign hidden states and its D_B, one row per prompt.

    ``hidden`` maps a model name to (harmful, benign) hidden states; the columns are
    ``model, safety, pc1, pc2, bhattacharyya``. Each model gets its own PCA because hidden
    spaces of different models are not comparable.
    """
    frames = []
    for model_name, (harmful, benign) in hidden.items():
        if harmful.dim() != 2 or benign.dim() != 2 or harmful.shape[1] != benign.shape[1]:
            raise ValueError(
                f"{model_name!r}: harmful and benign must be [n, d] with the same d, got "
                f"{tuple(harmful.shape)} and {tuple(benign.shape)}"
            )
        projected = pca_2d(torch.cat([harmful, benign]))
        frames.append(
            pd.DataFrame(
                {
                    "model": model_name,
                    "safety": ["harmful"] * len(harmful) + ["benign"] * len(benign),
                    "pc1": projected[:, 0].numpy(),
                    "pc2": projected[:, 1].numpy(),
                    "bhattacharyya": bhattacharyya_distance(harmful, benign),
                }
            )
        )
    if not frames:
        return pd.DataFrame({column: [] for column in LATENT_COLUMNS})
    return pd.concat(frames, ignore_index=True)[list(LATENT_COLUMNS)]
