"""Mel front end of R-FLAV: waveform → log-mel, model-space normalisation and frame layout.

Matches the original R-FLAV audio pipeline (HiFi-GAN / Auffusion conventions) without librosa:
peak normalisation, reflect padding, an explicit STFT with ``sqrt(re² + im² + 1e-9)`` magnitude,
a slaney mel filterbank and ``log(max(x, 1e-5))``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import torchaudio
from torch import Tensor

from rflav_cli.config import (
    F_MAX,
    F_MIN,
    HOP_LENGTH,
    LOG_MEL_MAX,
    LOG_MEL_MIN,
    MEL_FRAMES_PER_FRAME,
    N_FFT,
    N_MELS,
    PEAK_LEVEL,
    SAMPLE_RATE,
    SAMPLES_PER_FRAME,
    WIN_LENGTH,
)

__all__ = [
    "HOP_LENGTH",
    "MEL_FRAMES_PER_FRAME",
    "N_FFT",
    "N_MELS",
    "SAMPLE_RATE",
    "SAMPLES_PER_FRAME",
    "WIN_LENGTH",
    "denormalize_log_mel",
    "frames_to_mel",
    "log_mel",
    "mel_filterbank",
    "mel_to_frames",
    "normalize_log_mel",
    "peak_normalize",
]

MAGNITUDE_EPS = 1e-9  # added to re² + im² before the sqrt, as the original front end does
PAD = (N_FFT - HOP_LENGTH) // 2  # reflect padding per side: N samples → N // hop frames
_LOG_MIN = math.log(LOG_MEL_MIN)
_LOG_MAX = math.log(LOG_MEL_MAX)

_filterbanks: dict[tuple[torch.device, torch.dtype], Tensor] = {}
_windows: dict[tuple[torch.device, torch.dtype], Tensor] = {}


def mel_filterbank(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> Tensor:
    """The ``(N_MELS, N_FFT // 2 + 1)`` slaney-scale, slaney-normalised mel filterbank (cached)."""
    key = (torch.device(device), dtype)
    if key not in _filterbanks:
        fb = torchaudio.functional.melscale_fbanks(
            N_FFT // 2 + 1, F_MIN, F_MAX, N_MELS, SAMPLE_RATE, norm="slaney", mel_scale="slaney"
        )
        _filterbanks[key] = fb.T.contiguous().to(device=key[0], dtype=dtype)
    return _filterbanks[key]


def _window(device: torch.device, dtype: torch.dtype) -> Tensor:
    key = (device, dtype)
    if key not in _windows:
        _windows[key] = torch.hann_window(WIN_LENGTH, device=device, dtype=dtype)
    return _windows[key]


def peak_normalize(wav: Tensor) -> Tensor:
    """Scale each clip (last dim) so that max |w| = PEAK_LEVEL; an all-zero clip stays zero."""
    peak = wav.abs().amax(dim=-1, keepdim=True)
    # Clips with no signal are left unscaled instead of dividing by zero.
    peak = torch.where(peak > torch.finfo(wav.dtype).tiny, peak, torch.ones_like(peak))
    return wav / peak * PEAK_LEVEL


def log_mel(wav: Tensor) -> Tensor:
    """Log-mel of a waveform: ``(N,)`` → ``(N_MELS, N // HOP_LENGTH)``,
    ``(B, N)`` → ``(B, N_MELS, N // HOP_LENGTH)``.

    The waveform's scale does not matter: each clip is peak-normalised first.
    """
    if wav.dim() not in (1, 2):
        raise ValueError(f"expected a waveform of shape (N,) or (B, N), got {tuple(wav.shape)}")
    if wav.shape[-1] <= PAD:
        raise ValueError(
            f"waveform too short for the mel front end: {wav.shape[-1]} samples, need more than {PAD}"
        )
    if not wav.is_floating_point():
        wav = wav.float()
    batched = wav.dim() == 2
    x = peak_normalize(wav if batched else wav[None])
    x = F.pad(x[:, None], (PAD, PAD), mode="reflect")[:, 0]
    spec = torch.stft(
        x,
        N_FFT,
        hop_length=HOP_LENGTH,
        win_length=WIN_LENGTH,
        window=_window(x.device, x.dtype),
        center=False,
        normalized=False,
        onesided=True,
        return_complex=True,
    )
    spec = torch.view_as_real(spec)
    magnitude = torch.sqrt(spec.pow(2).sum(-1) + MAGNITUDE_EPS)
    mel = torch.matmul(mel_filterbank(x.device, x.dtype), magnitude)
    mel = torch.log(torch.clamp(mel, min=LOG_MEL_MIN))
    return mel if batched else mel[0]


def normalize_log_mel(log_mel: Tensor, audio_scale: float) -> Tensor:
    """Log-mel → model space: map [ln 1e-5, ln 200] to [-1, 1], then multiply by ``audio_scale``."""
    s01 = (log_mel - _LOG_MIN) / (_LOG_MAX - _LOG_MIN)
    return audio_scale * (2 * s01 - 1)


def denormalize_log_mel(a: Tensor, audio_scale: float) -> Tensor:
    """Model space → log-mel (inverse of :func:`normalize_log_mel`, clamped to [ln 1e-5, ln 200])."""
    s01 = torch.clamp(a / audio_scale / 2 + 0.5, 0, 1)
    return s01 * (_LOG_MAX - _LOG_MIN) + _LOG_MIN


def mel_to_frames(mel: Tensor) -> Tensor:
    """``(…, n_mels, 10·T)`` → ``(…, T, 1, n_mels, 10)``: video frame k owns mel columns 10k … 10k+9."""
    *lead, n_mels, columns = mel.shape
    if columns % MEL_FRAMES_PER_FRAME:
        raise ValueError(
            f"mel has {columns} columns, not a multiple of {MEL_FRAMES_PER_FRAME} per video frame"
        )
    frames = mel.reshape(*lead, n_mels, columns // MEL_FRAMES_PER_FRAME, MEL_FRAMES_PER_FRAME)
    return frames.movedim(-2, -3).unsqueeze(-3)


def frames_to_mel(frames: Tensor) -> Tensor:
    """``(…, T, 1, n_mels, 10)`` → ``(…, n_mels, 10·T)`` (inverse of :func:`mel_to_frames`)."""
    if frames.dim() < 4 or frames.shape[-3] != 1:
        raise ValueError(
            f"expected frames of shape (..., T, 1, n_mels, {MEL_FRAMES_PER_FRAME}), got {tuple(frames.shape)}"
        )
    *lead, t, _, n_mels, width = frames.shape
    return frames.squeeze(-3).movedim(-3, -2).reshape(*lead, n_mels, t * width)
