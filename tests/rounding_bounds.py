"""How far a float32 (or float64) FVD, KVD or FAD may lie from its exact value, from the
magnitudes of what it is computed from.

Tests compare our float32 metrics with the MM-Diffusion evaluator's float32 outputs, recorded
on another machine. Both are roundings of the same exact value (computed here in float64 from
the same float32 features), and how they round depends on the CPU, the BLAS/LAPACK build, the
thread count and the SIMD width, none of which the protocol fixes. So a test checks that each
value lies within a bound of the exact one, where the bound scales with the unit roundoff
``unit`` (2**-24 for float32) times the size of the terms the metric is a difference of, never
with one machine's last digits. Each bound is also far below what a change of the protocol
moves the value by; the tests check that too (see ``kvd_variant`` and ``frechet_variant``).

KVD (unbiased cubic-kernel MMD²) is ``A_f + A_r − 2·C``, three means of kernel values
``(x·y/d + 1)³`` of similar size, so it is a small difference of large terms. Each mean is a
float32 number holding its own rounding: the dot products (d terms each, in whatever order the
BLAS kernel adds them), the cube (which triples the relative error of ``x·y/d + 1``), numpy's
pairwise sum of the kernel values and the final division, each a few units in the last place
of the mean. Hence ``|error| <= KVD_C · unit · (|A_f| + |A_r| + 2·|C|)`` with ``KVD_C = 4``.
Measured: over the fixture cases, 300 row and feature-column permutations each (which reorder
every sum), the OpenBLAS kernels Haswell, SkylakeX, Zen, Sandybridge and Prescott
(``OPENBLAS_CORETYPE``) and torch/MKL or einsum products instead of numpy's, the largest error
was 1.64 · unit · (|A_f| + |A_r| + 2·|C|).

Fréchet distance (FVD; FAD is it × 10⁴) is ``|μf − μr|² + tr Σf + tr Σr − 2·tr √M`` with
``M = √Σf Σr √Σf``, each square root from a float32 SVD. Two parts:

* the terms: FD is a difference of terms that add up to
  ``T = |μf − μr|² + tr Σf + tr Σr + 2·tr √M``; means, covariances, traces and the SVD's
  backward error (eigenvalues of M moved by a few units of ``unit·‖M‖``) give
  ``FRECHET_C · unit · T`` with ``FRECHET_C = 8``;
* the square-root conditioning: M's entries carry rounding of about
  ``ε = unit · ‖Σf‖₂ · ‖Σr‖₂``, and tr √M turns a perturbation ε of an eigenvalue λ into
  ``√(λ + ε) − √λ``: ``ε/(2√λ)`` for large λ, but ``√ε`` for the zero eigenvalues a covariance
  of N ≤ d samples has (its noise singular values get square-rooted, the evaluator's SVD
  convention, unless they fall below ``SVD_SQRT_EPS``). Different directions round
  independently, and the SVD square root of a noise direction takes either sign, so the
  directions add in quadrature: ``2 · √(Σ_i (g(λ_i + ε) − g(λ_i))²)`` over all d eigenvalues
  λ_i of Σf·Σr, g being the evaluator's root (√s, or s below ``SVD_SQRT_EPS``).

Measured: over the fixture cases (full rank, and N < d in 400 and 1024 dimensions), 20 row and
feature-column permutations each under ``MKL_CBWR=COMPATIBLE`` and ``AVX2``,
``ATEN_CPU_CAPABILITY=default`` and ``avx2``, and one and two threads, the largest error was
0.36 of this bound.

The protocol changes the tests try land far outside: for the fixture features, biased
covariances move the Fréchet distance by 7 to 800 bounds and dropping its mean term by 6 to
5000; KVD moves by 12 or more bounds with gamma off by 10 % and by 40 or more with a biased
estimator, another degree or no constant term; letterboxing without antialias moves FVD by 15
and KVD by 70 bounds.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from rflav_cli.metrics.frechet import SVD_SQRT_EPS

UNIT32 = 2.0**-24  # unit roundoff of float32 (half its machine epsilon)
UNIT64 = 2.0**-53  # unit roundoff of float64
KVD_C = 4
FRECHET_C = 8

# An I3D input value is 2·(bilinear mix of four pixels in [0, 1]) − 1 in float32: a few
# roundings of numbers at most 1, so any implementation lies within 8 units of roundoff of the
# exact value (the vectorised and the scalar CPU kernels differ by 4 units at most) and two lie
# within 16 units. Means and standard deviations of such values move by as much at most.
I3D_INPUT_TOL = 16 * UNIT32

# I3D's logits and pooled features pass through ~20 sequential convolutions and BatchNorms, so
# their rounding is a multiple of the unit roundoff times the size of the values: measured
# against a float64 run, 12 units × max |value| at most (vectorised, scalar and older-ISA DNNL
# kernels, one or two threads). Two float32 runs agree within I3D_OUTPUT_C units × max |value|.
I3D_OUTPUT_C = 256


def _f64(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=np.float64).reshape(len(x), -1)


def _kernel(x: np.ndarray, y: np.ndarray, degree: int, gamma: float, coef0: float) -> np.ndarray:
    return (x @ y.T * gamma + coef0) ** degree


def kvd_terms(
    fake: Any,
    real: Any,
    *,
    degree: int = 3,
    gamma: float | None = None,
    coef0: float = 1.0,
    biased: bool = False,
) -> tuple[float, float, float]:
    """The exact (float64) means A_f, A_r and C whose ``A_f + A_r − 2·C`` is the MMD²."""
    xf, xr = _f64(fake), _f64(real)
    gamma = 1.0 / xf.shape[1] if gamma is None else gamma
    m, n = len(xf), len(xr)
    k_ff, k_rr = _kernel(xf, xf, degree, gamma, coef0), _kernel(xr, xr, degree, gamma, coef0)
    k_fr = _kernel(xf, xr, degree, gamma, coef0)
    if biased:
        return k_ff.mean(), k_rr.mean(), k_fr.mean()
    return (
        (k_ff.sum() - np.trace(k_ff)) / (m * (m - 1)),
        (k_rr.sum() - np.trace(k_rr)) / (n * (n - 1)),
        k_fr.mean(),
    )


def kvd_variant(fake: Any, real: Any, **change: Any) -> float:
    """The exact KVD, or that of a changed protocol (degree, gamma, coef0, biased)."""
    within_f, within_r, across = kvd_terms(fake, real, **change)
    return within_f + within_r - 2 * across


def kvd_bound(fake: Any, real: Any, unit: float = UNIT32) -> float:
    """Largest distance of a KVD computed with unit roundoff `unit` from the exact value."""
    within_f, within_r, across = kvd_terms(fake, real)
    return KVD_C * unit * (abs(within_f) + abs(within_r) + 2 * abs(across))


def _centred_factor(x: np.ndarray, biased: bool) -> np.ndarray:
    """R with RᵀR = the covariance of x (unbiased, or biased: divided by N)."""
    a = (x - x.mean(axis=0)) / np.sqrt(len(x) - (0 if biased else 1))
    return np.linalg.qr(a, mode="r")


def frechet_parts(fake: Any, real: Any, biased: bool = False) -> dict[str, Any]:
    """Exact (float64) pieces of the Fréchet distance: mean term, traces, the singular values of
    Rf·Rrᵀ (their squares are the nonzero eigenvalues of Σf·Σr) and the spectral norms."""
    xf, xr = _f64(fake), _f64(real)
    rf, rr = _centred_factor(xf, biased), _centred_factor(xr, biased)
    diff = xf.mean(axis=0) - xr.mean(axis=0)
    return {
        "mean": float(diff @ diff),
        "trace_f": float((rf * rf).sum()),
        "trace_r": float((rr * rr).sum()),
        "roots": np.linalg.svd(rf @ rr.T, compute_uv=False),
        "dim": xf.shape[1],
        "norm_f": float(np.linalg.norm(rf, 2) ** 2),
        "norm_r": float(np.linalg.norm(rr, 2) ** 2),
    }


def frechet_variant(fake: Any, real: Any, *, biased: bool = False, mean_term: bool = True) -> float:
    """The exact Fréchet distance, or that of a changed protocol (biased covariances, no mean term)."""
    p = frechet_parts(fake, real, biased)
    return (p["mean"] if mean_term else 0.0) + p["trace_f"] + p["trace_r"] - 2 * float(p["roots"].sum())


def _evaluator_root(s: np.ndarray) -> np.ndarray:
    return np.where(s < SVD_SQRT_EPS, s, np.sqrt(np.maximum(s, 0.0)))


def frechet_bound(fake: Any, real: Any, unit: float = UNIT32) -> float:
    """Largest distance of a Fréchet distance computed with unit roundoff `unit` (the evaluator's
    SVD algorithm) from the exact value."""
    p = frechet_parts(fake, real)
    roots = p["roots"]
    terms = p["mean"] + p["trace_f"] + p["trace_r"] + 2 * float(roots.sum())
    eigen = np.zeros(p["dim"])
    eigen[: len(roots)] = roots**2
    noise = unit * p["norm_f"] * p["norm_r"]
    # Noise singular values spread over orders of magnitude around `noise`; where that comes
    # within a factor 100 of SVD_SQRT_EPS (float32), count every noise direction as rooted.
    root = np.sqrt if 100 * noise > SVD_SQRT_EPS else _evaluator_root
    conditioning = np.sqrt(((root(eigen + noise) - root(eigen)) ** 2).sum())
    return FRECHET_C * unit * terms + 2 * float(conditioning)
