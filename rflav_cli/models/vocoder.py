"""HiFi-GAN generator (mel → waveform) compatible with the R-FLAV ``vocoder/`` checkpoints.

The released vocoder is stored as ``vocoder/config.json`` plus ``vocoder/vocoder.pt``, a torch
pickle ``{"generator": state_dict}`` whose convolutions carry weight-norm parameters
(``*.weight_g``, ``*.weight_v``). Here every convolution holds a plain weight: weight norm is
folded once at load time and unfolded again when saving, so files stay loadable by the
original R-FLAV code.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Mapping
from fractions import Fraction
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import torchaudio
from torch import Tensor, nn

from ..audio import mel_filterbank
from ..config import HOP_LENGTH, N_FFT, WIN_LENGTH
from ..errors import FileFormatError
from ..files import REDOWNLOAD, atomic_write, read_json_object
from ..hub import ResolveError, is_repo_id, local_folder
from ..tensorfiles import load_tensor_file, state_dict_mismatch

__all__ = [
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "CheckpointFormatError",
    "HiFiGAN",
    "StreamingVocoder",
    "fold_weight_norm",
]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "vocoder.pt"
HUB_SUBFOLDER = "vocoder"

RESBLOCK_SLOPE = 0.1  # leaky-ReLU slope inside the generator
FINAL_SLOPE = 0.01  # the activation before conv_post uses torch's default slope
EDGE_KERNEL = 7  # kernel size of conv_pre and conv_post

_REQUIRED_KEYS = (
    "resblock",
    "upsample_rates",
    "upsample_kernel_sizes",
    "upsample_initial_channel",
    "resblock_kernel_sizes",
    "resblock_dilation_sizes",
    "num_mels",
)


class CheckpointFormatError(FileFormatError):
    """A vocoder checkpoint cannot be read or does not fit the configured generator."""


def _positive_ints(value: object) -> bool:
    return (
        isinstance(value, list)
        and bool(value)
        and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)
    )


def _config_problem(config: Mapping[str, Any]) -> str | None:
    """What in a vocoder config would not build a generator (None: nothing)."""
    missing = [k for k in _REQUIRED_KEYS if k not in config]
    if missing:
        return f"lacks the key(s) {', '.join(missing)}"

    def shown(key: str) -> str:
        text = json.dumps(config[key], default=repr)
        return text if len(text) <= 40 else text[:37] + "..."

    if str(config["resblock"]) not in ("1", "2"):
        return f'resblock must be "1" or "2", got {shown("resblock")}'
    for key in ("upsample_rates", "upsample_kernel_sizes", "resblock_kernel_sizes"):
        if not _positive_ints(config[key]):
            return f"{key} must be a list of positive integers, got {shown(key)}"
    for key in ("upsample_initial_channel", "num_mels"):
        value = config[key]
        if not (isinstance(value, int) and not isinstance(value, bool) and value > 0):
            return f"{key} must be a positive integer, got {shown(key)}"
    rates, kernels = config["upsample_rates"], config["upsample_kernel_sizes"]
    if len(rates) != len(kernels):
        return "upsample_rates and upsample_kernel_sizes differ in length"
    if any(k < u for u, k in zip(rates, kernels)):
        return "each upsample_kernel_sizes entry must be at least its upsample_rates entry"
    if config["upsample_initial_channel"] >> len(rates) < 1:
        channels = config["upsample_initial_channel"]
        return f"upsample_initial_channel {channels} is too small for {len(rates)} upsamplings"
    dilations = config["resblock_dilation_sizes"]
    if not (isinstance(dilations, list) and all(_positive_ints(d) for d in dilations)):
        return (
            "resblock_dilation_sizes must be a list of lists of positive integers, "
            f"got {shown('resblock_dilation_sizes')}"
        )
    if len(dilations) != len(config["resblock_kernel_sizes"]):
        return "resblock_kernel_sizes and resblock_dilation_sizes differ in length"
    return None


def _same_padding(kernel_size: int, dilation: int = 1) -> int:
    return (kernel_size * dilation - dilation) // 2


def _upsample_padding(kernel_size: int, rate: int) -> tuple[int, int]:
    """(padding, output_padding) making a transposed conv produce exactly ``rate`` × its input."""
    if (kernel_size - rate) % 2 == 0:
        return (kernel_size - rate) // 2, 0
    return (kernel_size - rate) // 2 + 1, 1


def _conv_reach(conv: nn.Conv1d) -> tuple[int, int]:
    """Input samples to the left/right of an output sample that a stride-1 conv reads."""
    span = conv.dilation[0] * (conv.kernel_size[0] - 1)
    return conv.padding[0], span - conv.padding[0]


class _ResBlock1(nn.Module):
    """Per dilation: two convs (dilated, then plain) with a residual connection."""

    def __init__(self, channels: int, kernel_size: int, dilations: list[int]) -> None:
        super().__init__()
        self.convs1 = nn.ModuleList(
            nn.Conv1d(channels, channels, kernel_size, dilation=d, padding=_same_padding(kernel_size, d))
            for d in dilations
        )
        self.convs2 = nn.ModuleList(
            nn.Conv1d(channels, channels, kernel_size, padding=_same_padding(kernel_size)) for _ in dilations
        )

    def forward(self, x: Tensor) -> Tensor:
        for dilated, plain in zip(self.convs1, self.convs2):
            h = dilated(F.leaky_relu(x, RESBLOCK_SLOPE))
            x = x + plain(F.leaky_relu(h, RESBLOCK_SLOPE))
        return x

    def reach(self) -> tuple[int, int]:
        convs = [*self.convs1, *self.convs2]
        return sum(_conv_reach(c)[0] for c in convs), sum(_conv_reach(c)[1] for c in convs)


class _ResBlock2(nn.Module):
    """Per dilation: one dilated conv with a residual connection."""

    def __init__(self, channels: int, kernel_size: int, dilations: list[int]) -> None:
        super().__init__()
        self.convs = nn.ModuleList(
            nn.Conv1d(channels, channels, kernel_size, dilation=d, padding=_same_padding(kernel_size, d))
            for d in dilations
        )

    def forward(self, x: Tensor) -> Tensor:
        for conv in self.convs:
            x = x + conv(F.leaky_relu(x, RESBLOCK_SLOPE))
        return x

    def reach(self) -> tuple[int, int]:
        return sum(_conv_reach(c)[0] for c in self.convs), sum(_conv_reach(c)[1] for c in self.convs)


class HiFiGAN(nn.Module):
    """HiFi-GAN generator: log-mel ``(B, num_mels, F)`` → waveform ``(B, 1, F·hop)`` in [-1, 1].

    Built from the dict of ``vocoder/config.json``; keys other than the architecture ones are
    kept (and saved back) but unused. Parameter names equal the original generator's once
    weight norm is removed.
    """

    def __init__(self, config: Mapping[str, Any]) -> None:
        super().__init__()
        missing = [k for k in _REQUIRED_KEYS if k not in config]
        if missing:
            raise ValueError(f"vocoder config lacks the key(s) {', '.join(missing)}")
        resblock = str(config["resblock"])
        if resblock not in ("1", "2"):
            raise ValueError(f'vocoder config: resblock must be "1" or "2", got {config["resblock"]!r}')
        rates = [int(u) for u in config["upsample_rates"]]
        kernels = [int(k) for k in config["upsample_kernel_sizes"]]
        if len(rates) != len(kernels):
            raise ValueError("vocoder config: upsample_rates and upsample_kernel_sizes differ in length")
        res_kernels = [int(k) for k in config["resblock_kernel_sizes"]]
        res_dilations = [[int(d) for d in ds] for ds in config["resblock_dilation_sizes"]]
        if len(res_kernels) != len(res_dilations):
            raise ValueError(
                "vocoder config: resblock_kernel_sizes and resblock_dilation_sizes differ in length"
            )
        channels = int(config["upsample_initial_channel"])
        self.config = dict(config)  # kept whole so save_pretrained writes back every key
        self.num_mels = int(config["num_mels"])
        self.upsample_rates = rates
        self.num_kernels = len(res_kernels)

        # Registration order fixes the state-dict key order; it follows the original generator.
        self.conv_pre = nn.Conv1d(self.num_mels, channels, EDGE_KERNEL, padding=EDGE_KERNEL // 2)
        self.ups = nn.ModuleList()
        for i, (u, k) in enumerate(zip(rates, kernels)):
            padding, output_padding = _upsample_padding(k, u)
            self.ups.append(
                nn.ConvTranspose1d(
                    channels >> i,
                    channels >> (i + 1),
                    k,
                    u,
                    padding=padding,
                    output_padding=output_padding,
                )
            )
        block = _ResBlock1 if resblock == "1" else _ResBlock2
        self.resblocks = nn.ModuleList(
            block(channels >> (i + 1), k, ds)
            for i in range(len(rates))
            for k, ds in zip(res_kernels, res_dilations)
        )
        self.conv_post = nn.Conv1d(channels >> len(rates), 1, EDGE_KERNEL, padding=EDGE_KERNEL // 2)

    @property
    def hop_length(self) -> int:
        """Waveform samples per mel frame."""
        return math.prod(self.upsample_rates)

    @property
    def receptive_field(self) -> tuple[int, int]:
        """(left, right) in mel frames: the samples of frame t depend only on frames
        t − left … t + right (with the convs' zero padding at the ends of the whole mel)."""
        left, right = map(Fraction, _conv_reach(self.conv_pre))
        rate = 1  # samples per mel frame at the current layer
        for i, up in enumerate(self.ups):
            k, u, p = up.kernel_size[0], up.stride[0], up.padding[0]
            rate *= u
            # Output j reads the inputs n with 0 <= j + p - n*u < k.
            left += Fraction(k - 1 - p, rate)
            right += Fraction(p, rate)
            blocks = self.resblocks[i * self.num_kernels : (i + 1) * self.num_kernels]
            left += Fraction(max(b.reach()[0] for b in blocks), rate)
            right += Fraction(max(b.reach()[1] for b in blocks), rate)
        lo, hi = _conv_reach(self.conv_post)
        left += Fraction(lo, rate)
        right += Fraction(hi, rate)
        return math.ceil(left), math.ceil(right)

    def forward(self, mel: Tensor) -> Tensor:
        x = self.conv_pre(mel)
        for i, up in enumerate(self.ups):
            x = up(F.leaky_relu(x, RESBLOCK_SLOPE))
            blocks = self.resblocks[i * self.num_kernels : (i + 1) * self.num_kernels]
            acc = blocks[0](x)
            for block in blocks[1:]:
                acc = acc + block(x)
            x = acc / self.num_kernels
        x = self.conv_post(F.leaky_relu(x, FINAL_SLOPE))
        return torch.tanh(x)

    # --- checkpoints -------------------------------------------------------------------------

    def weight_norm_state_dict(self) -> dict[str, Tensor]:
        """The state dict in the original's weight-norm form (``bias, weight_g, weight_v`` per
        conv): weight_g = ‖w‖ over every dim but 0, weight_v = w."""
        out: dict[str, Tensor] = {}
        for name, module in self.named_modules():
            if not isinstance(module, (nn.Conv1d, nn.ConvTranspose1d)):
                continue
            w = module.weight.detach()
            out[f"{name}.bias"] = module.bias.detach()
            out[f"{name}.weight_g"] = torch.linalg.vector_norm(w, dim=tuple(range(1, w.dim())), keepdim=True)
            out[f"{name}.weight_v"] = w
        return out

    @classmethod
    def from_pretrained(
        cls,
        folder: str | Path,
        dtype: torch.dtype | None = None,
        revision: str | None = None,
    ) -> HiFiGAN:
        """Load ``config.json`` + ``vocoder.pt`` from a folder (or its ``vocoder/`` subfolder),
        or from the ``vocoder/`` subfolder of a Hugging Face Hub repo id."""
        folder = _resolve_folder(folder, revision)
        config_path, weights_path = folder / CONFIG_NAME, folder / WEIGHTS_NAME
        config = read_json_object(config_path, "vocoder config", error=CheckpointFormatError)
        problem = _config_problem(config)
        if problem is not None:
            raise CheckpointFormatError(f"{config_path} (vocoder config) {problem}: fix it, {REDOWNLOAD}")
        model = cls(config)
        state = load_tensor_file(
            weights_path, "vocoder weights", error=CheckpointFormatError, unwrap="generator"
        )
        try:
            model.load_state_dict(state)
        except CheckpointFormatError as e:
            raise CheckpointFormatError(f"{weights_path}: {e}: {REDOWNLOAD}") from None
        model.eval()
        if dtype is not None:
            model.to(dtype)
        return model

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False):  # type: ignore[override]
        """Like ``nn.Module.load_state_dict`` but accepts weight-norm keys and, when strict,
        reports every missing, unexpected and mis-shaped key in one message."""
        state_dict = fold_weight_norm(state_dict)
        if strict:
            mismatch = state_dict_mismatch({k: v.shape for k, v in self.state_dict().items()}, state_dict)
            if mismatch:
                raise CheckpointFormatError(
                    f"vocoder weights do not match its config.json ({mismatch.describe()})"
                )
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def save_pretrained(self, folder: str | Path) -> None:
        """Write ``config.json`` and ``vocoder.pt`` (``{"generator": weight-norm state dict}``),
        each atomically, in the layout the original R-FLAV code loads."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        state = {k: v.to("cpu", torch.float32).contiguous() for k, v in self.weight_norm_state_dict().items()}
        atomic_write(
            folder / CONFIG_NAME, lambda tmp: Path(tmp).write_text(json.dumps(self.config, indent=2))
        )
        atomic_write(folder / WEIGHTS_NAME, lambda tmp: torch.save({"generator": state}, tmp))


def fold_weight_norm(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Replace each ``X.weight_g`` / ``X.weight_v`` pair by ``X.weight = g·v/‖v‖`` (norm over
    every dim but 0, as torch's weight_norm with its default dim=0). Other keys pass through."""
    out: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        if key.endswith(".weight_v"):
            continue
        if not key.endswith(".weight_g"):
            out[key] = value
            continue
        prefix = key[: -len("_g")]
        v = state_dict.get(prefix + "_v")
        if v is None:
            raise CheckpointFormatError(f"vocoder weights have {key} without {prefix}_v")
        g = value
        if g.dim() != v.dim() or g.shape[0] != v.shape[0] or g.numel() != v.shape[0]:
            raise CheckpointFormatError(
                f"vocoder weights: {key} {tuple(g.shape)} does not fit {prefix}_v {tuple(v.shape)}"
            )
        norm = torch.linalg.vector_norm(v, dim=tuple(range(1, v.dim())), keepdim=True)
        out[prefix] = v * (g / norm)
    orphans = [k for k in state_dict if k.endswith(".weight_v") and k[:-2] + "_g" not in state_dict]
    if orphans:
        raise CheckpointFormatError(
            f"vocoder weights have {', '.join(orphans)} without the matching weight_g"
        )
    return out


def _resolve_folder(folder: str | Path, revision: str | None) -> Path:
    path = Path(folder)
    if path.is_dir():
        if not (path / CONFIG_NAME).is_file() and (path / HUB_SUBFOLDER / CONFIG_NAME).is_file():
            return path / HUB_SUBFOLDER
        return path
    if path.exists():
        raise ResolveError(
            f"{path} is a file: pass the folder holding {CONFIG_NAME} and {WEIGHTS_NAME} as the vocoder"
        )
    if not is_repo_id(str(folder)):
        raise FileNotFoundError(f"vocoder folder not found: {path} (nor is it a Hub repo id like owner/name)")
    files = [f"{HUB_SUBFOLDER}/{CONFIG_NAME}", f"{HUB_SUBFOLDER}/{WEIGHTS_NAME}"]
    # Hub failures (unreachable, no such repo) are one-line ResolveErrors naming the repo and file.
    return Path(local_folder(str(folder), files, revision=revision, flag="--vocoder")) / HUB_SUBFOLDER


class StreamingVocoder:
    """Vocode a mel stream chunk by chunk with output equal to vocoding the whole mel at once.

    Each ``push`` runs the generator on the new frames plus ``receptive_field`` frames of
    context on each side and returns only the samples whose whole receptive field has been
    seen. The stream start is vocoded without left context, so the convs' zero padding there
    matches the whole-mel run; ``flush`` does the same at the end. Memory stays bounded: only
    the left context and the frames not yet final are kept.
    """

    def __init__(self, vocoder: HiFiGAN) -> None:
        self.vocoder = vocoder
        self.left, self.right = vocoder.receptive_field
        self.hop = vocoder.hop_length
        self._reset()

    def _reset(self) -> None:
        self._buffer: Tensor | None = None  # mel frames [self._start, self._start + width)
        self._start = 0  # global index of the first buffered frame
        self._emitted = 0  # frames whose samples have been returned

    @property
    def buffered_frames(self) -> int:
        """Mel frames currently held (bounded by left + right context + the last chunk)."""
        return 0 if self._buffer is None else self._buffer.shape[-1]

    @property
    def frames_emitted(self) -> int:
        return self._emitted

    def push(self, mel_chunk: Tensor) -> Tensor:
        """Add ``(B, num_mels, f)`` log-mel frames; return the ``(B, samples)`` now final."""
        if mel_chunk.dim() != 3 or mel_chunk.shape[1] != self.vocoder.num_mels:
            raise ValueError(
                (
                    f"expected a mel chunk of shape (B, {self.vocoder.num_mels}, frames), got "
                    f"{tuple(mel_chunk.shape)}"
                )
            )
        param = next(itertools.chain(self.vocoder.parameters(), self.vocoder.buffers()))
        mel_chunk = mel_chunk.to(param.device, param.dtype)
        if self._buffer is None:
            self._buffer = mel_chunk
        else:
            if mel_chunk.shape[0] != self._buffer.shape[0]:
                raise ValueError(
                    f"batch size changed mid-stream: {self._buffer.shape[0]} → {mel_chunk.shape[0]}"
                )
            self._buffer = torch.cat([self._buffer, mel_chunk], dim=-1)
        total = self._start + self._buffer.shape[-1]
        return self._emit(total - self.right)

    def flush(self) -> Tensor:
        """Return the remaining samples at the end of the stream and reset for a new one."""
        if self._buffer is None:
            return torch.zeros(0, 0)
        out = self._emit(self._start + self._buffer.shape[-1])
        self._reset()
        return out

    @torch.no_grad()
    def _emit(self, upto: int) -> Tensor:
        assert self._buffer is not None
        batch = self._buffer.shape[0]
        if upto <= self._emitted:
            return self._buffer.new_zeros(batch, 0)
        # Buffer starts at frame 0 or exactly `left` frames before the first frame to emit.
        wav = self.vocoder(self._buffer)[:, 0]
        first = (self._emitted - self._start) * self.hop
        out = wav[:, first : (upto - self._start) * self.hop]
        self._emitted = upto
        keep_from = max(self._start, self._emitted - self.left)
        self._buffer = self._buffer[..., keep_from - self._start :]
        self._start = keep_from
        return out


class GriffinLim(nn.Module):
    """Phase reconstruction for checkpoints without a neural vocoder (e.g. toy runs).

    The log-mel is mapped back to a linear magnitude by least squares through the slaney
    filterbank, then Griffin-Lim iterates STFT/ISTFT. Quality is far below HiFi-GAN, and it is
    not exactly local, so streaming it with a finite context gives a close, not identical, result.
    The defaults are the cheapest settings whose pitch on the toy example is as exact as with
    many more iterations and a wider context (benchmarks/RESULTS.md has the comparison): it runs
    at every output frame, so its cost is paid for the whole stream.
    """

    def __init__(self, num_mels: int = 256, iterations: int = 16, context_frames: int = 8) -> None:
        super().__init__()
        self.num_mels = num_mels
        self.iterations = iterations
        fb = mel_filterbank("cpu", torch.float32)
        self.register_buffer("inverse_fb", torch.linalg.pinv(fb), persistent=False)
        self.register_buffer("window", torch.hann_window(WIN_LENGTH), persistent=False)
        self._context = context_frames

    @property
    def hop_length(self) -> int:
        return HOP_LENGTH

    @property
    def receptive_field(self) -> tuple[int, int]:
        return self._context, self._context

    def forward(self, mel: Tensor) -> Tensor:
        """log-mel (B, n_mels, F) → waveform (B, 1, F·hop)."""
        frames = mel.shape[-1]
        magnitude = torch.clamp(self.inverse_fb @ torch.exp(mel.float()), min=0.0)
        wav = torchaudio.functional.griffinlim(
            magnitude,
            window=self.window,
            n_fft=N_FFT,
            hop_length=HOP_LENGTH,
            win_length=WIN_LENGTH,
            power=1.0,
            n_iter=self.iterations,
            momentum=0.99,
            length=(frames - 1) * HOP_LENGTH,
            rand_init=False,
        )
        # Frame k of the front end is centred half a hop after k·hop: shift by that, pad the end.
        wav = F.pad(wav, (HOP_LENGTH // 2, HOP_LENGTH - HOP_LENGTH // 2))
        return wav.clamp(-1.0, 1.0).unsqueeze(1)
