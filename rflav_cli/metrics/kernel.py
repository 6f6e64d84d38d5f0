"""Kernel distance between two sets of features (KVD), as the MM-Diffusion evaluator computes it.

Unbiased MMD² with the cubic polynomial kernel ``k(x, y) = (x·y / d + 1)³`` over the full
sets: no subsets, no ×1000. The evaluator gets it from scikit-learn's ``polynomial_kernel``
on float32 arrays, so every step runs in float32; ``dtype`` selects that precision.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

__all__ = ["polynomial_kernel", "polynomial_mmd", "KERNEL_DEGREE", "KERNEL_COEF0"]

KERNEL_DEGREE = 3
KERNEL_COEF0 = 1.0


def _as_matrix(x: Any, dtype: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    a = np.asarray(x)
    if a.ndim != 2:
        raise ValueError(f"features must be (N, d), got shape {a.shape}")
    return np.ascontiguousarray(a, dtype=dtype)


def polynomial_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Gram matrix ``(x·yᵀ / d + 1)³`` in the arrays' dtype, in the order scikit-learn uses."""
    gram = x @ y.T
    gram *= 1.0 / x.shape[1]
    gram += KERNEL_COEF0
    gram **= KERNEL_DEGREE
    return gram


def polynomial_mmd(fake: Any, real: Any, *, dtype: Any = np.float32) -> float:
    """Unbiased polynomial-kernel MMD² between (m, d) ``fake`` and (n, d) ``real`` features.

    ``(ΣK_ff − tr K_ff)/(m(m−1)) + (ΣK_rr − tr K_rr)/(n(n−1)) − 2·ΣK_fr/(mn)``, computed in
    ``dtype`` (float32 is the protocol's precision; float64 gives the exact value).
    """
    xf = _as_matrix(fake, dtype)
    xr = _as_matrix(real, dtype)
    m, n = xf.shape[0], xr.shape[0]
    if m < 2 or n < 2 or xf.shape[1] != xr.shape[1]:
        raise ValueError(f"need two (N>=2, d) feature sets, got {xf.shape} and {xr.shape}")
    k_ff = polynomial_kernel(xf, xf)
    k_rr = polynomial_kernel(xr, xr)
    k_fr = polynomial_kernel(xf, xr)
    # Scalars stay in ``dtype`` as in NumPy 2 (explicit, so NumPy 1 agrees).
    num = xf.dtype.type
    within_f = (k_ff.sum() - np.diagonal(k_ff).sum()) / num(m * (m - 1))
    within_r = (k_rr.sum() - np.diagonal(k_rr).sum()) / num(n * (n - 1))
    across = k_fr.sum() / num(m * n)
    return float(within_f + within_r - num(2) * across)
