"""Fréchet distance and KVD against the MM-Diffusion evaluator's own outputs (metrics_math fixture).

The evaluator's float32 numbers were recorded on another machine; ours and theirs are both
roundings of the exact value (the same algorithm in float64), so each is checked to lie within
a bound scaled to the float32 rounding of the quantity (see rounding_bounds), and each
deliberate change of the protocol is checked to move the value far outside that bound."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import rounding_bounds as rb
import scipy.linalg
import torch
from safetensors.torch import load_file

from rflav_cli.metrics import frechet
from rflav_cli.metrics.frechet import frechet_distance, frechet_distance_f64
from rflav_cli.metrics.kernel import polynomial_kernel, polynomial_mmd

FIXTURES = Path(__file__).parent / "fixtures"
CASES = ("video", "audio", "fullrank")


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread_module):
    """Metrics on one thread (see conftest.one_thread_module)."""


@pytest.fixture(scope="module")
def mm() -> tuple[dict[str, torch.Tensor], dict]:
    tensors = load_file(str(FIXTURES / "metrics_math.safetensors"))
    results = json.loads((FIXTURES / "metrics_math.json").read_text())["results"]
    return tensors, results


@pytest.fixture(scope="module")
def float32_fd(mm) -> dict[str, float]:
    """The float32 protocol value of each case, computed once (the 1024-d one takes a while)."""
    t, _ = mm
    return {c: frechet_distance(t[f"{c}.fake"], t[f"{c}.real"]).item() for c in CASES}


@pytest.fixture(scope="module")
def exact_fd(mm) -> dict[str, float]:
    """The protocol's exact value of each case: the evaluator's algorithm run in float64."""
    t, _ = mm
    return {c: frechet_distance(t[f"{c}.fake"], t[f"{c}.real"], dtype=torch.float64).item() for c in CASES}


@pytest.fixture(scope="module")
def fd_bounds(mm) -> dict[str, float]:
    """How far a float32 Fréchet distance of each case may lie from the exact value."""
    t, _ = mm
    return {c: rb.frechet_bound(t[f"{c}.fake"], t[f"{c}.real"]) for c in CASES}


def scipy_frechet(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64), b.astype(np.float64)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    d = a.mean(0) - b.mean(0)
    return float(d @ d + np.trace(s1) + np.trace(s2) - 2 * np.trace(scipy.linalg.sqrtm(s1 @ s2).real))


@pytest.mark.parametrize("case", CASES)
def test_float32_frechet_matches_evaluator(mm, float32_fd, exact_fd, fd_bounds, case):
    t, res = mm
    exact, bound = exact_fd[case], fd_bounds[case]
    # Ours and the evaluator's recorded float32 value, each a rounding of the exact value.
    assert abs(float32_fd[case] - exact) <= bound
    assert abs(res[case]["frechet_mmdiff_float32"] - exact) <= bound
    # Protocol changes move the value far outside: covariances divided by N instead of N − 1,
    # or the mean term left out (the smallest of these is 69 bounds here).
    fake, real = t[f"{case}.fake"], t[f"{case}.real"]
    reference = rb.frechet_variant(fake, real)
    assert abs(rb.frechet_variant(fake, real, biased=True) - reference) > 5 * bound
    assert abs(rb.frechet_variant(fake, real, mean_term=False) - reference) > 5 * bound


@pytest.mark.parametrize("case", ("video", "fullrank"))
def test_float64_run_of_the_same_algorithm_matches_evaluator(mm, exact_fd, case):
    t, res = mm
    # Both are float64 runs of the same algorithm, each within the float64 bound of the other's
    # exact value.
    bound = rb.frechet_bound(t[f"{case}.fake"], t[f"{case}.real"], unit=rb.UNIT64)
    assert abs(exact_fd[case] - res[case]["frechet_mmdiff_float64"]) <= 2 * bound


@pytest.mark.parametrize("case", CASES)
def test_float64_reference_matches_evaluator_and_scipy(mm, case):
    t, res = mm
    fake, real = t[f"{case}.fake"], t[f"{case}.real"]
    ref = frechet_distance_f64(fake, real)
    bound64 = rb.frechet_bound(fake, real, unit=rb.UNIT64)
    # The evaluator's algorithm run in float64 is the tight target (two float64 roundings of
    # the same value). scipy's sqrtm of a singular Σ1Σ2 (N < d) is not a rounding of it: its
    # Schur-based square root carries ~5e-8 relative error of its own, hence its own tolerance.
    assert abs(ref - res[case]["frechet_mmdiff_float64"]) <= 2 * bound64
    assert ref == pytest.approx(res[case]["frechet_scipy_float64"], rel=1e-7)
    if case == "fullrank":  # full rank: sqrtm is well conditioned, ~1e-14 relative here
        assert ref == pytest.approx(scipy_frechet(fake.numpy(), real.numpy()), rel=1e-10)
    assert abs(frechet_distance_f64(real, fake) - ref) <= 2 * bound64


def test_fad_scaling_case(mm, float32_fd, exact_fd, fd_bounds):
    _, res = mm
    bound = 1e4 * fd_bounds["audio"]
    assert abs(float32_fd["audio"] * 1e4 - 1e4 * exact_fd["audio"]) <= bound
    assert abs(res["audio"]["fad_x1e4_mmdiff_float32"] - 1e4 * exact_fd["audio"]) <= bound
    # Another scale (none, or ×1000) is far outside the bound.
    for scale in (1.0, 1e3):
        assert abs(scale * exact_fd["audio"] - res["audio"]["fad_x1e4_mmdiff_float32"]) > 5 * bound


def test_fake_is_the_first_argument_the_svd_root_is_taken_of(mm, monkeypatch):
    """tr √(√Σ_fake Σ_real √Σ_fake): the first square root is of the fake covariance (quirk 7)."""
    t, _ = mm
    fake, real = t["fullrank.fake"], t["fullrank.real"]
    seen: list[torch.Tensor] = []
    original = frechet._svd_sqrt

    def spy(mat: torch.Tensor) -> torch.Tensor:
        seen.append(mat.clone())
        return original(mat)

    monkeypatch.setattr(frechet, "_svd_sqrt", spy)
    frechet_distance(fake, real)
    assert len(seen) == 2
    x = fake.numpy().astype(np.float64)
    centred = np.abs(x - x.mean(axis=0))
    # A float32 covariance entry is a sum of N products of centred values, in any order: within
    # (N + 2)·unit·Σ|products|/(N − 1) of the exact entry (centring errors cancel to first order,
    # as centred columns sum to zero).
    bound = (len(x) + 2) * rb.UNIT32 * (centred.T @ centred) / (len(x) - 1)
    exact = np.cov(x, rowvar=False)
    assert np.all(np.abs(seen[0].numpy() - exact) <= bound)
    # The real set's covariance is far from it: the bound tells the arguments apart.
    assert np.abs(np.cov(real.numpy().astype(np.float64), rowvar=False) - exact).max() > 100 * bound.max()


def test_inputs_are_not_modified(mm):
    t, _ = mm
    fake, real = t["fullrank.fake"].clone(), t["fullrank.real"].clone()
    frechet_distance(fake, real)
    assert torch.equal(fake, t["fullrank.fake"]) and torch.equal(real, t["fullrank.real"])


@pytest.mark.parametrize("case", ("video", "fullrank"))
def test_kvd_matches_evaluator(mm, case):
    t, res = mm
    fake, real = t[f"{case}.fake"], t[f"{case}.real"]
    exact, bound = rb.kvd_variant(fake, real), rb.kvd_bound(fake, real)
    # Ours and the evaluator's float32 values: roundings of the exact value, each within the
    # float32 bound (the kernel means are ~1 here, KVD ~0.01-0.1, so the bound is ~1e-6).
    assert abs(polynomial_mmd(fake, real) - exact) <= bound
    assert abs(res[case]["kvd_mmdiff_float32"] - exact) <= bound
    bound64 = rb.kvd_bound(fake, real, unit=rb.UNIT64)
    assert abs(polynomial_mmd(fake, real, dtype=np.float64) - exact) <= 2 * bound64
    assert abs(res[case]["kvd_mmdiff_float64"] - exact) <= 2 * bound64
    # Protocol changes move KVD far outside the bound: the biased estimator, another degree,
    # gamma off by 10 %, no constant term (the smallest here is 1300 bounds).
    d = fake.shape[1]
    for change in (
        {"biased": True},
        {"degree": 2},
        {"degree": 4},
        {"gamma": 1.1 / d},
        {"gamma": 0.9 / d},
        {"coef0": 0.0},
    ):
        assert abs(rb.kvd_variant(fake, real, **change) - exact) > 5 * bound, change


def test_kernel_is_cubic_in_scaled_dot_product():
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((5, 7)), rng.standard_normal((4, 7))
    expected = np.array([[(xi @ yj / 7 + 1) ** 3 for yj in y] for xi in x])
    # Both sides round t = x·y/7 + 1 (7 products, a scaling, an addition) and its cube in
    # float64: each within 3t²·δt + 2·unit·|t|³ of the exact value, δt = 9·unit·(|x|·|y|/7 + 1).
    t = x @ y.T / 7 + 1
    delta_t = 9 * rb.UNIT64 * (np.abs(x) @ np.abs(y).T / 7 + 1)
    bound = 2 * (3 * t**2 * delta_t + 2 * rb.UNIT64 * np.abs(t) ** 3)
    assert np.all(np.abs(polynomial_kernel(x, y) - expected) <= bound)
    # The square (degree 2) is far outside.
    assert np.abs(t**2 - expected).max() > 1e6 * bound.max()


def test_identical_sets():
    """FVD(X, X) ≈ 0 up to float32 SVD noise; KVD(X, X) is the estimator's exact −(2/m)·gap.

    Numerically: the float32 FVD of a set with itself is only rounding (its exact value is 0),
    within the float32 bound of rounding_bounds: noise singular values get square-rooted for
    N < d, and tr 2Σ cancels against 2·tr √… for a full-rank covariance. The float64
    reference stays within the float64 bound. The unbiased MMD² of a set with itself is not 0:
    it equals −(2/m)·(mean of diag K − mean of off-diagonal K), O(1/m).
    """
    rng = np.random.default_rng(7)
    low_rank = (0.5 * rng.standard_normal((70, 400))).astype(np.float32)
    full_rank = (rng.standard_normal((300, 32)) @ rng.standard_normal((32, 32))).astype(np.float32)
    for x in (low_rank, full_rank):
        assert abs(frechet_distance(x, x).item()) <= rb.frechet_bound(x, x)
        assert abs(frechet_distance_f64(x, x)) <= rb.frechet_bound(x, x, unit=rb.UNIT64)
        # ...while a set and the same set shifted by 10 % of its spread are far apart.
        shifted = x + 0.1 * x.std(axis=0)
        assert frechet_distance_f64(x, shifted) > 5 * rb.frechet_bound(x, x)

        k = polynomial_kernel(x.astype(np.float64), x.astype(np.float64))
        m = len(x)
        gap = np.diagonal(k).mean() - (k.sum() - np.trace(k)) / (m * (m - 1))
        assert abs(polynomial_mmd(x, x, dtype=np.float64) - (-2 / m * gap)) <= 2 * rb.kvd_bound(
            x, x, unit=rb.UNIT64
        )


def test_kvd_near_zero_for_same_distribution_and_not_for_shifted():
    rng = np.random.default_rng(3)
    a, b = rng.standard_normal((2, 400, 16))
    same = polynomial_mmd(a, b, dtype=np.float64)
    shifted = polynomial_mmd(a, b + 0.5, dtype=np.float64)
    assert abs(same) < 0.05 * shifted
