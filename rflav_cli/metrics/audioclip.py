"""The audio head of AudioCLIP (ESResNeXt-FBSP), the feature network of the FAD protocol.

It reproduces the embeddings MM-Diffusion's evaluator computes with
``AudioCLIP-Full-Training.pt``, including the behaviour of that evaluator that changes the
numbers:

* the network is never put in eval mode there, so every BatchNorm normalises with the
  statistics of the current batch (a batch of one is an error, and an embedding depends on
  the other clips in its batch);
* the input in [-1, 1] goes through the int16-to-float rescale ``((x + 32768)·2)/65535 − 1``
  in float32, which leaves a quiet signal with a DC offset and coarse quantisation;
* the learnable FBSP filterbank is rebuilt in float32 on every call;
* the reference numbers come from a CPU run, and the front end's weak bins depend on the
  float32 product's rounding, so the front end always runs on the CPU (the ResNeXt trunk runs
  on the module's device).

The front end frames the signal (1654-sample periodic Blackman-Harris window, hop 561, zero
padding split front/back), zero-pads each frame to 2048 and applies the filterbank (1025
complex bins). Bins 0-1022 form three 341-bin bands, the "colour" channels of a
ResNeXt-50 32x4d with attention gates; its pooled 2048-d output is projected to 1024.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .weights import check_weights, read_tensor_file

__all__ = [
    "AUDIOCLIP_PREFIX",
    "AUDIOCLIP_SAMPLE_RATE",
    "AUDIOCLIP_SAMPLES",
    "AudioCLIPAudio",
    "load_audioclip_audio",
    "rescale_like_int16",
]

AUDIOCLIP_PREFIX = "audio."  # the head's keys inside AudioCLIP-Full-Training.pt
AUDIOCLIP_SAMPLE_RATE = 44_100
AUDIOCLIP_SAMPLES = 70_560  # 1.6 s at 44.1 kHz, the clip length of the protocol
EMBED_DIM = 1024

N_FFT = 2048
WIN_LENGTH = 1654
HOP_LENGTH = 561
N_BINS = N_FFT // 2 + 1
N_BANDS = 3  # input channels of the ResNeXt stem
POWER_FLOOR = 1e-18  # replaces zero power before log10
_FBSP_EPS = 1e-8
_BLACKMAN_HARRIS = (0.35875, 0.48829, 0.14128, 0.01168)


def rescale_like_int16(audio: Tensor) -> Tensor:
    """``((x + 32768)·2)/65535 − 1`` in float32: the evaluator maps [-1, 1] audio with an int16
    range rescale, which collapses it to a few hundred levels around +1/65535 (kept on purpose)."""
    return (audio.float() + 32768.0) * 2.0 / 65535.0 - 1.0


def periodic_blackman_harris(length: int) -> Tensor:
    """4-term Blackman-Harris window, periodic (the first `length` points of length + 1), float32."""
    angle = np.linspace(-np.pi, np.pi, length + 1)[:length]
    window = np.zeros(length)
    for order, coeff in enumerate(_BLACKMAN_HARRIS):
        window += coeff * np.cos(order * angle)
    return torch.from_numpy(window).float()


class BatchStatNorm2d(nn.BatchNorm2d):
    """BatchNorm2d that always normalises with the current batch's statistics (biased variance).

    The stored running statistics are kept for checkpoint compatibility but never used or
    updated, whatever the module's train/eval mode.
    """

    def forward(self, x: Tensor) -> Tensor:
        return F.batch_norm(x, None, None, self.weight, self.bias, True, 0.0, self.eps)


def _linspace(start: float, end: float, steps: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """``torch.linspace`` as its vectorised CPU kernel computes it, on every CPU.

    That kernel rounds each point once, as a fused multiply-add: ``start + step·i`` for the
    first half and ``end − step·(steps − 1 − i)`` for the rest, with ``step`` rounded to
    ``dtype``. The scalar kernel (CPUs without AVX2) rounds twice and moves 40 % of the float32
    points by one unit, which the phases ``fc·t`` (up to ~3200 rad) turn into other filter
    taps. Here the products and sums are exact in float64 (a 24-bit step times an index below
    2**28, added to ±1), then rounded once to ``dtype``.
    """
    if dtype == torch.float64 or steps < 2:
        return torch.linspace(start, end, steps, dtype=dtype, device=device)
    step = torch.tensor(end - start, dtype=dtype) / (steps - 1)
    index = torch.arange(steps, dtype=torch.float64)
    rising = start + step.double() * index
    falling = end - step.double() * (steps - 1 - index)
    return torch.where(index < steps // 2, rising, falling).to(dtype).to(device)


class FBSPFilterbank(nn.Module):
    """Learnable complex filterbank ("Frequency B-Spline"), one sinc-windowed complex
    exponential per output bin, parametrised by centre ``fc``, bandwidth ``fb`` and shape ``m``."""

    def __init__(self, out_features: int = N_BINS) -> None:
        super().__init__()
        self.m = nn.Parameter(torch.zeros(out_features))
        self.fb = nn.Parameter(torch.ones(out_features))
        self.fc = nn.Parameter(torch.arange(out_features, dtype=torch.float32))
        # The original has no bias but keeps an empty parameter under this name.
        self.bias = nn.Parameter(torch.empty(0))

    def filters(self, in_features: int, dtype: torch.dtype, device: torch.device) -> Tensor:
        """(out, in, 2) real/imaginary filter taps, normalised by sqrt(in)."""
        # float32 throughout on purpose: the rounding of fc·t (phases up to ~3200 rad) is part
        # of the reference numbers. Shapes mirror the reference so that the same elements take
        # the same (vectorised or scalar) code paths.
        t = math.pi * _linspace(-1.0, 1.0, in_features, dtype, device).reshape(1, -1) + _FBSP_EPS
        m, fb, fc = (p.to(device).reshape(-1, 1) for p in (self.m, self.fb, self.fc))
        carrier_re, carrier_im = torch.cos(fc * t), -torch.sin(fc * t)
        arg = fb * t / (m + _FBSP_EPS)
        sinc = torch.where(arg == 0, torch.ones_like(arg), torch.sin(arg) / arg)
        # sinc ** m for a real, possibly negative base: |sinc|^m · e^(i·m·arg(sinc)).
        magnitude_sq = torch.sqrt(sinc * sinc).square()
        phase = m * torch.atan2(torch.zeros_like(sinc), sinc)
        envelope = torch.pow(magnitude_sq, 0.5 * m)
        env_re, env_im = envelope * torch.cos(phase), envelope * torch.sin(phase)
        gain = fb.sqrt()
        taps = torch.stack(
            (
                gain * (env_re * carrier_re - env_im * carrier_im),
                gain * (env_re * carrier_im + env_im * carrier_re),
            ),
            dim=-1,
        )
        return taps / (in_features**0.5)

    def forward(self, frames: Tensor) -> Tensor:
        """Real frames (..., in) -> complex spectrum (..., out, 2)."""
        taps = self.filters(frames.shape[-1], frames.dtype, frames.device)
        return torch.stack((F.linear(frames, taps[..., 0]), F.linear(frames, taps[..., 1])), dim=-1)


class Bottleneck(nn.Module):
    """ResNeXt bottleneck: 1x1, grouped 3x3 (carries the stride), 1x1 expansion x4, residual."""

    def __init__(
        self, in_channels: int, planes: int, stride: int, groups: int = 32, group_width: int = 4
    ) -> None:
        super().__init__()
        width = planes * group_width // 64 * groups
        out_channels = planes * 4
        self.conv1 = nn.Conv2d(in_channels, width, 1, bias=False)
        self.bn1 = BatchStatNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, groups=groups, bias=False)
        self.bn2 = BatchStatNorm2d(width)
        self.conv3 = nn.Conv2d(width, out_channels, 1, bias=False)
        self.bn3 = BatchStatNorm2d(out_channels)
        self.downsample = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                BatchStatNorm2d(out_channels),
            )

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return F.relu(out + shortcut)


class AttentionGate(nn.Module):
    """sigmoid(BN(pointwise(depthwise(max-pool of x to `size`)))): a multiplicative gate."""

    def __init__(self, in_channels: int, out_channels: int, kernel: tuple[int, int]) -> None:
        super().__init__()
        padding = (kernel[0] // 2, kernel[1] // 2)
        self.conv_depth = nn.Conv2d(in_channels, in_channels, kernel, padding=padding, groups=in_channels)
        self.conv_point = nn.Conv2d(in_channels, out_channels, 1)
        self.bn = BatchStatNorm2d(out_channels)

    def forward(self, x: Tensor, size: Sequence[int]) -> Tensor:
        x = F.adaptive_max_pool2d(x, tuple(size))
        return torch.sigmoid(self.bn(self.conv_point(self.conv_depth(x))))


def _stage(in_channels: int, planes: int, blocks: int, stride: int) -> nn.Sequential:
    layers = [Bottleneck(in_channels, planes, stride)]
    layers += [Bottleneck(planes * 4, planes, 1) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


class AudioCLIPAudio(nn.Module):
    """ESResNeXt-FBSP audio encoder. ``forward`` maps (B, L) or (B, 1, L) audio in [-1, 1] at
    44.1 kHz (L = 70560 in the protocol), on any device, to raw (B, 1024) embeddings on the
    module's device, B >= 2.

    Its state dict is the ``audio.*`` part of ``AudioCLIP-Full-Training.pt`` without the prefix.
    """

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("window", periodic_blackman_harris(WIN_LENGTH))
        self.conv1 = nn.Conv2d(N_BANDS, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = BatchStatNorm2d(64)
        self.layer1 = _stage(64, 64, 3, 1)
        self.att1 = AttentionGate(64, 256, (3, 1))
        self.layer2 = _stage(256, 128, 4, 2)
        self.att2 = AttentionGate(256, 512, (1, 5))
        self.layer3 = _stage(512, 256, 6, 2)
        self.att3 = AttentionGate(512, 1024, (3, 1))
        self.layer4 = _stage(1024, 512, 3, 2)
        self.att4 = AttentionGate(1024, 2048, (1, 5))
        self.att5 = AttentionGate(2048, 2048, (3, 5))
        self.fc = nn.Linear(2048, EMBED_DIM)
        self.fbsp = FBSPFilterbank(N_BINS)

    @staticmethod
    def _as_batch(audio: Tensor) -> Tensor:
        if audio.dim() == 3 and audio.shape[1] == 1:
            audio = audio[:, 0]
        if audio.dim() != 2:
            raise ValueError(
                f"AudioCLIP expects audio of shape (B, L) or (B, 1, L), got {tuple(audio.shape)}"
            )
        return audio

    def log_power(self, audio: Tensor) -> Tensor:
        """Front end: (B, L) audio in [-1, 1] -> (B, 1, 3, 341, frames) power in dB, on the CPU.

        The quiet, offset signal leaves most bins as float32 cancellation residue of the
        filterbank product, so they depend on the GEMM's summation order: a GPU product moved
        them by tens of dB and the embeddings by ~0.2 on average, while CPUs agree closely.
        The front end therefore always runs on the CPU, whatever the module's device.
        """
        x = rescale_like_int16(self._as_batch(audio).cpu())
        batch, length = x.shape
        frames_n = 1 if length <= WIN_LENGTH else 1 + math.ceil((length - WIN_LENGTH) / HOP_LENGTH)
        pad = (frames_n - 1) * HOP_LENGTH + WIN_LENGTH - length
        if pad > 0:
            x = F.pad(x, (pad // 2, pad - pad // 2))
        frames = x.unfold(-1, WIN_LENGTH, HOP_LENGTH) * self.window.cpu()
        extra = N_FFT - WIN_LENGTH
        frames = F.pad(frames, (extra // 2, extra - extra // 2))
        spec = self.fbsp(frames).transpose(-2, -3)  # (B, bins, frames, 2)
        band = N_BINS // N_BANDS
        spec = spec[:, : band * N_BANDS].reshape(batch, N_BANDS, band, *spec.shape[-2:])
        power = spec[..., 0] ** 2 + spec[..., 1] ** 2
        power = torch.where(power > 0.0, power, torch.full_like(power, POWER_FLOOR))
        return torch.log10(power.reshape(batch, 1, N_BANDS, band, -1)).mul(10.0)

    def pooled_features(self, x_db: Tensor) -> Tensor:
        """(B, 1, 3, 341, frames) dB spectrogram -> attention-pooled (B, 2048) features, the
        input of the final projection."""
        x = x_db[:, 0].to(self.conv1.weight.device)
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 3, stride=2, padding=1)
        for stage, gate in (
            (self.layer1, self.att1),
            (self.layer2, self.att2),
            (self.layer3, self.att3),
            (self.layer4, self.att4),
        ):
            y = stage(x)
            x = y * gate(x, y.shape[-2:])
        pooled = F.adaptive_avg_pool2d(x, (1, 1))
        return torch.flatten(pooled * self.att5(x, pooled.shape[-2:]), 1)

    def forward(self, audio: Tensor) -> Tensor:
        """(B, L) or (B, 1, L) audio in [-1, 1] -> raw (B, 1024) embeddings (batch statistics)."""
        return self.fc(self.pooled_features(self.log_power(audio)))


# Entries that may be absent from a checkpoint: constructor values equal the original's.
_OPTIONAL_SUFFIXES = ("num_batches_tracked",)
_OPTIONAL_KEYS = frozenset({"window", "fbsp.bias"})


def load_audioclip_audio(path: str | Path) -> AudioCLIPAudio:
    """Build the audio head from the ``audio.*`` entries of ``AudioCLIP-Full-Training.pt``.

    The image and text towers in the file are ignored. Running BatchNorm statistics are loaded
    but unused (see :class:`BatchStatNorm2d`); the model is frozen.
    """
    path = Path(path)
    full = read_tensor_file(path, "AudioCLIP weights")
    state = {k[len(AUDIOCLIP_PREFIX) :]: v for k, v in full.items() if k.startswith(AUDIOCLIP_PREFIX)}
    model = AudioCLIPAudio()
    check_weights(
        model,
        state,
        path,
        f"the AudioCLIP audio head under '{AUDIOCLIP_PREFIX}*'",
        optional=lambda key: key in _OPTIONAL_KEYS or key.endswith(_OPTIONAL_SUFFIXES),
        shown_prefix=AUDIOCLIP_PREFIX,
    )
    model.load_state_dict(state, strict=False)
    return model.eval().requires_grad_(False)
