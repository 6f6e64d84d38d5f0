"""Fréchet distance and KVD against the MM-Diffusion evaluator's own outputs (metrics_math fixture)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
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


def scipy_frechet(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64), b.astype(np.float64)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    d = a.mean(0) - b.mean(0)
    return float(d @ d + np.trace(s1) + np.trace(s2)
                 - 2 * np.trace(scipy.linalg.sqrtm(s1 @ s2).real))


@pytest.mark.parametrize("case", CASES)
def test_float32_frechet_matches_evaluator(mm, float32_fd, case):
    _, res = mm
    # README §4: the float32 SVD path reproduces to ~7e-6 relative across thread counts.
    assert float32_fd[case] == pytest.approx(res[case]["frechet_mmdiff_float32"], rel=2e-5)
    assert float32_fd[case] == pytest.approx(res[case]["frechet_scipy_float64"], rel=2e-5)


@pytest.mark.parametrize("case", ("video", "fullrank"))
def test_float64_run_of_the_same_algorithm_matches_evaluator(mm, case):
    t, res = mm
    got = frechet_distance(t[f"{case}.fake"], t[f"{case}.real"], dtype=torch.float64).item()
    assert got == pytest.approx(res[case]["frechet_mmdiff_float64"], rel=1e-9)


@pytest.mark.parametrize("case", CASES)
def test_float64_reference_matches_evaluator_and_scipy(mm, case):
    t, res = mm
    fake, real = t[f"{case}.fake"], t[f"{case}.real"]
    ref = frechet_distance_f64(fake, real)
    # The evaluator's algorithm run in float64 is the tight target; scipy's sqrtm of a
    # singular Σ1Σ2 (N < d) carries ~5e-8 relative error of its own.
    assert ref == pytest.approx(res[case]["frechet_mmdiff_float64"], rel=1e-9)
    assert ref == pytest.approx(res[case]["frechet_scipy_float64"], rel=1e-7)
    if case == "fullrank":
        assert ref == pytest.approx(scipy_frechet(fake.numpy(), real.numpy()), rel=1e-10)
    assert frechet_distance_f64(real, fake) == pytest.approx(ref, rel=1e-12)


def test_fad_scaling_case(mm, float32_fd):
    _, res = mm
    assert float32_fd["audio"] * 1e4 == pytest.approx(res["audio"]["fad_x1e4_mmdiff_float32"], rel=1e-5)


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
    np.testing.assert_allclose(seen[0].numpy(), np.cov(fake.numpy().astype(np.float64), rowvar=False),
                               rtol=0, atol=1e-5)


def test_inputs_are_not_modified(mm):
    t, _ = mm
    fake, real = t["fullrank.fake"].clone(), t["fullrank.real"].clone()
    frechet_distance(fake, real)
    assert torch.equal(fake, t["fullrank.fake"]) and torch.equal(real, t["fullrank.real"])


@pytest.mark.parametrize("case", ("video", "fullrank"))
def test_kvd_matches_evaluator(mm, case):
    t, res = mm
    fake, real = t[f"{case}.fake"], t[f"{case}.real"]
    assert polynomial_mmd(fake, real) == pytest.approx(res[case]["kvd_mmdiff_float32"], abs=1e-7)
    assert polynomial_mmd(fake, real, dtype=np.float64) == pytest.approx(
        res[case]["kvd_mmdiff_float64"], rel=1e-10)


def test_kernel_is_cubic_in_scaled_dot_product():
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((5, 7)), rng.standard_normal((4, 7))
    expected = np.array([[(xi @ yj / 7 + 1) ** 3 for yj in y] for xi in x])
    np.testing.assert_allclose(polynomial_kernel(x, y), expected, rtol=1e-13)


def test_identical_sets():
    """FVD(X, X) ≈ 0 up to float32 SVD noise; KVD(X, X) is the estimator's exact −(2/m)·gap.

    Numerically: the float32 FVD of a set with itself is below 1e-4·tr Σ for N < d (noise
    singular values get square-rooted) and below 1e-5·tr Σ for a full-rank covariance
    (float32 cancellation of tr 2Σ against 2·tr √…, each ≈ 2·tr Σ); the
    float64 reference is below 1e-12·tr Σ. The unbiased MMD² of a set with itself is not 0:
    it equals −(2/m)·(mean of diag K − mean of off-diagonal K), O(1/m).
    """
    rng = np.random.default_rng(7)
    low_rank = (0.5 * rng.standard_normal((70, 400))).astype(np.float32)
    full_rank = (rng.standard_normal((300, 32)) @ rng.standard_normal((32, 32))).astype(np.float32)
    for x, bound in ((low_rank, 1e-4), (full_rank, 1e-5)):
        tr = np.trace(np.cov(x, rowvar=False))
        assert abs(frechet_distance(x, x).item()) < bound * tr
        assert abs(frechet_distance_f64(x, x)) < 1e-12 * tr

        k = polynomial_kernel(x.astype(np.float64), x.astype(np.float64))
        m = len(x)
        gap = np.diagonal(k).mean() - (k.sum() - np.trace(k)) / (m * (m - 1))
        assert polynomial_mmd(x, x, dtype=np.float64) == pytest.approx(-2 / m * gap, rel=1e-9)


def test_kvd_near_zero_for_same_distribution_and_not_for_shifted():
    rng = np.random.default_rng(3)
    a, b = rng.standard_normal((2, 400, 16))
    same = polynomial_mmd(a, b, dtype=np.float64)
    shifted = polynomial_mmd(a, b + 0.5, dtype=np.float64)
    assert abs(same) < 0.05 * shifted
