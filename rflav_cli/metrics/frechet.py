"""Fréchet distance between two sets of features (FVD, FAD).

:func:`frechet_distance` follows the MM-Diffusion evaluator operation by operation, in the
precision of its inputs (float32 for the protocol's numbers). Its matrix square roots come
from an SVD, so the result is not symmetric in its arguments: the first set must be the
generated ("fake") one, the second the reference ("real") one.

:func:`frechet_distance_f64` is an independent float64 reference without matrix square
roots (a nuclear norm), to judge how far the protocol's float32 value is from the exact one.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

__all__ = ["frechet_distance", "frechet_distance_f64", "SVD_SQRT_EPS"]

# Singular values below this are kept as they are instead of being square-rooted (the
# TF-GAN convention the evaluator inherits).
SVD_SQRT_EPS = 1e-10


def _as_2d_tensor(x: Any, dtype: torch.dtype | None) -> torch.Tensor:
    t = torch.as_tensor(x)
    if dtype is not None:
        t = t.to(dtype)
    if not t.is_floating_point():
        raise TypeError(f"features must be floating point, got {t.dtype}")
    if t.dim() < 2 or t.shape[0] < 2:
        raise ValueError(f"need at least 2 feature vectors as (N, ...), got shape {tuple(t.shape)}")
    # A private copy: the covariance below centres its argument in place.
    return t.detach().flatten(start_dim=1).clone()


def _covariance_(features: torch.Tensor) -> torch.Tensor:
    """Unbiased covariance of (N, d) features; centres ``features`` in place."""
    by_dim = features.t()  # (d, N): the evaluator centres and multiplies this view
    by_dim -= by_dim.mean(dim=1, keepdim=True)
    return (1.0 / (features.shape[0] - 1)) * by_dim.matmul(by_dim.t())


def _svd_sqrt(mat: torch.Tensor) -> torch.Tensor:
    """Square root of a PSD matrix as U·diag(s')·Vᵀ, with s' = √s except for s < eps."""
    u, s, vh = torch.linalg.svd(mat, full_matrices=False)
    roots = torch.where(s < SVD_SQRT_EPS, s, s.sqrt())
    return u.matmul(torch.diag(roots)).matmul(vh)


def frechet_distance(fake: Any, real: Any, *, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Fréchet distance of (N, ...) ``fake`` to (M, ...) ``real`` features, as the evaluator does.

    ``‖μf − μr‖² + tr Σf + tr Σr − 2·tr √(√Σf · Σr · √Σf)``, each √ from an SVD, computed in
    ``dtype`` (default: the inputs' own, float32 for the protocol). Returns a 0-d tensor.
    Inputs are not modified.
    """
    xf = _as_2d_tensor(fake, dtype)
    xr = _as_2d_tensor(real, dtype)
    if xf.dtype != xr.dtype or xf.shape[1] != xr.shape[1]:
        raise ValueError(f"feature sets differ: {xf.dtype} {tuple(xf.shape)} vs {xr.dtype} {tuple(xr.shape)}")
    # Means first: the covariance step centres the tensors in place.
    mu_f, mu_r = xf.mean(dim=0), xr.mean(dim=0)
    cov_f, cov_r = _covariance_(xf), _covariance_(xr)
    root_f = _svd_sqrt(cov_f)
    cross = _svd_sqrt(root_f.matmul(cov_r.matmul(root_f))).trace()
    spread = (cov_f + cov_r).trace() - 2.0 * cross
    return spread + ((mu_f - mu_r) ** 2).sum()


def _centred_factor(x: np.ndarray) -> np.ndarray:
    """R of the QR factorisation of the centred, 1/√(N−1)-scaled data: Σ = RᵀR."""
    a = (x - x.mean(axis=0)) / np.sqrt(x.shape[0] - 1)
    return np.linalg.qr(a, mode="r")


def frechet_distance_f64(fake: Any, real: Any) -> float:
    """Float64 reference Fréchet distance, symmetric and free of matrix square roots.

    With Σf = AfᵀAf and Σr = ArᵀAr (A: centred data / √(N−1)), the eigenvalues of ΣfΣr are
    the squared singular values of Af·Arᵀ, so ``tr √(Σf Σr)`` is the nuclear norm of
    Af·Arᵀ, computed as that of Rf·Rrᵀ from the QR factors (A = QR). Rank-deficient
    covariances (fewer samples than dimensions) need no special care.
    """
    xf = np.asarray(torch.as_tensor(fake).detach().cpu().flatten(start_dim=1), dtype=np.float64)
    xr = np.asarray(torch.as_tensor(real).detach().cpu().flatten(start_dim=1), dtype=np.float64)
    if xf.shape[0] < 2 or xr.shape[0] < 2 or xf.shape[1] != xr.shape[1]:
        raise ValueError(f"need two (N>=2, d) feature sets, got {xf.shape} and {xr.shape}")
    rf, rr = _centred_factor(xf), _centred_factor(xr)
    cross = np.linalg.svd(rf @ rr.T, compute_uv=False).sum()
    diff = xf.mean(axis=0) - xr.mean(axis=0)
    return float(diff @ diff + (rf * rf).sum() + (rr * rr).sum() - 2.0 * cross)
