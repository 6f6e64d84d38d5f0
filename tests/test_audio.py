"""Mel front end against the original R-FLAV converter fixtures (tests/fixtures/mel.*)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rflav_cli.audio import (
    HOP_LENGTH,
    MEL_FRAMES_PER_FRAME,
    N_MELS,
    denormalize_log_mel,
    frames_to_mel,
    log_mel,
    mel_filterbank,
    mel_to_frames,
    normalize_log_mel,
)

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="module")
def ref() -> dict[str, torch.Tensor]:
    return load_file(FIXTURES / "mel.safetensors")


@pytest.fixture(scope="module")
def mel(ref: dict[str, torch.Tensor]) -> torch.Tensor:
    return log_mel(ref["in.wav"])


def test_filterbank_matches_librosa_slaney(ref: dict[str, torch.Tensor]) -> None:
    fb = mel_filterbank()
    assert fb.shape == ref["mel_basis"].shape == (N_MELS, 1025)
    torch.testing.assert_close(fb, ref["mel_basis"], atol=2e-6, rtol=0)
    assert torch.equal(fb != 0, ref["mel_basis"] != 0)


def test_log_mel_matches_reference_where_there_is_signal(
    ref: dict[str, torch.Tensor], mel: torch.Tensor
) -> None:
    spec = ref["out.spec"][0]
    assert mel.shape == spec.shape == (N_MELS, ref["in.wav"].numel() // HOP_LENGTH)
    # Bins above 1e-2 are far above float32 FFT round-off; there the reference is matched tightly.
    loud = spec > math.log(1e-2)
    assert loud.sum() > 5000
    torch.testing.assert_close(mel[loud], spec[loud], atol=1e-4, rtol=0)


def test_log_mel_matches_reference_in_quiet_bins(ref: dict[str, torch.Tensor], mel: torch.Tensor) -> None:
    # Quiet bins hold the int16 rounding noise of the test signal (|X| ~ 1e-4); float32 FFT
    # round-off differs between CPUs by ~1 % there, so the bound is looser. Without the 1e-9
    # inside the magnitude's sqrt, the error here reaches 0.13 (max) and 3e-3 (mean).
    err = (mel - ref["out.spec"][0]).abs()
    assert err.max() < 0.05
    assert err.mean() < 1e-3


def test_normalisation_matches_reference(ref: dict[str, torch.Tensor]) -> None:
    torch.testing.assert_close(normalize_log_mel(ref["out.spec"], 1.0), ref["out.norm"], atol=1e-5, rtol=0)
    torch.testing.assert_close(
        (normalize_log_mel(ref["out.spec"], 1.0) + 1) / 2, ref["out.norm01"], atol=1e-5, rtol=0
    )
    torch.testing.assert_close(
        denormalize_log_mel(ref["out.norm"], 1.0), ref["out.inv_spec"], atol=1e-5, rtol=0
    )


def test_normalisation_closed_form_and_scale() -> None:
    lo, hi = math.log(1e-5), math.log(200.0)
    x = torch.tensor([lo, (lo + hi) / 2, hi], dtype=torch.float64)
    a = normalize_log_mel(x, 3.5)
    torch.testing.assert_close(a, torch.tensor([-3.5, 0.0, 3.5], dtype=torch.float64))
    torch.testing.assert_close(denormalize_log_mel(a, 3.5), x)
    # Out-of-range model outputs are clamped back into [ln 1e-5, ln 200].
    clamped = denormalize_log_mel(torch.tensor([-10.0, 10.0]), 3.5)
    torch.testing.assert_close(clamped, torch.tensor([lo, hi], dtype=torch.float32))


def test_batched_equals_unbatched(ref: dict[str, torch.Tensor]) -> None:
    wav = ref["in.wav"]
    other = torch.sin(torch.arange(wav.numel()) * 0.05) * 0.1
    batched = log_mel(torch.stack([wav, other]))
    assert batched.shape == (2, N_MELS, wav.numel() // HOP_LENGTH)
    torch.testing.assert_close(batched[0], log_mel(wav), atol=1e-6, rtol=0)
    torch.testing.assert_close(batched[1], log_mel(other), atol=1e-6, rtol=0)


def test_peak_normalisation_makes_scale_irrelevant(ref: dict[str, torch.Tensor], mel: torch.Tensor) -> None:
    scaled = log_mel(ref["in.wav"] / 32768.0)
    loud = ref["out.spec"][0] > math.log(1e-2)
    torch.testing.assert_close(scaled[loud], mel[loud], atol=1e-4, rtol=0)


def test_all_zero_waveform_is_the_floor() -> None:
    out = log_mel(torch.zeros(2, 3200))
    assert out.shape == (2, N_MELS, 20)
    # sqrt(1e-9) times any filter's area (~0.13) stays under the 1e-5 clamp.
    assert torch.equal(out, torch.full_like(out, math.log(1e-5)))


def test_too_short_waveform_is_refused() -> None:
    with pytest.raises(ValueError, match="too short"):
        log_mel(torch.randn(900))


def test_frame_layout_ownership_and_round_trip() -> None:
    T = 3
    mel = torch.arange(2 * N_MELS * MEL_FRAMES_PER_FRAME * T, dtype=torch.float32).reshape(
        2, N_MELS, MEL_FRAMES_PER_FRAME * T
    )
    frames = mel_to_frames(mel)
    assert frames.shape == (2, T, 1, N_MELS, MEL_FRAMES_PER_FRAME)
    for k in range(T):
        assert torch.equal(frames[:, k, 0], mel[:, :, 10 * k : 10 * k + 10])
    assert torch.equal(frames_to_mel(frames), mel)
    # Unbatched layout too.
    assert torch.equal(frames_to_mel(mel_to_frames(mel[0])), mel[0])
    with pytest.raises(ValueError, match="multiple of 10"):
        mel_to_frames(mel[..., :-1])
