"""KL autoencoder (SD-VAE) with the exact parameter layout of diffusers' ``AutoencoderKL``.

R-FLAV encodes video frames with ``stabilityai/sd-vae-ft-ema``. This module rebuilds that network
in plain PyTorch so the published ``config.json`` + ``diffusion_pytorch_model.safetensors`` load
without extra dependencies, and so tiny VAEs can be written in the same layout for tests.
Latent scaling (``LATENT_SCALE``) is not applied here; the pipeline does it.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import FileFormatError
from ..files import REDOWNLOAD, atomic_write, read_json_object
from ..hub import local_folder
from ..tensorfiles import load_safetensors, save_safetensors, state_dict_mismatch

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
# Version of the diffusers config format the saved folders follow.
DIFFUSERS_FORMAT_VERSION = "0.42.1"

_FIX = "fix it, " + REDOWNLOAD
_NORM_EPS = 1e-6
_DOWN_BLOCK = "DownEncoderBlock2D"
_UP_BLOCK = "UpDecoderBlock2D"

# Config of stabilityai/sd-vae-ft-ema, the video VAE of the released R-FLAV models.
SD_VAE_CONFIG: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": [_DOWN_BLOCK] * 4,
    "up_block_types": [_UP_BLOCK] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "act_fn": "silu",
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 256,
    "scaling_factor": 0.18215,
    "use_quant_conv": True,
    "use_post_quant_conv": True,
    "mid_block_add_attention": True,
}

# Older diffusers files name the mid-block attention projections differently.
_LEGACY_ATTENTION_NAMES = {
    "query": "to_q",
    "key": "to_k",
    "value": "to_v",
    "proj_attn": "to_out.0",
}

# Config keys diffusers writes that only matter to its own pipelines; saved for compatibility.
_PASSIVE_CONFIG = {
    "shift_factor": None,
    "latents_mean": None,
    "latents_std": None,
    "force_upcast": True,
}

_ACTIVATIONS: dict[str, type[nn.Module]] = {
    "silu": nn.SiLU,
    "swish": nn.SiLU,
    "gelu": nn.GELU,
    "relu": nn.ReLU,
    "mish": nn.Mish,
}


class VAEFileError(FileFormatError):
    """A file of a VAE folder cannot be read or does not describe a valid network."""


class VAEWeightsError(VAEFileError):
    """A VAE weights file does not fit the architecture described by its config."""


# Keys whose constructor defaults describe another network than SD-VAE: a config must give them.
_REQUIRED_CONFIG = (
    "block_out_channels",
    "down_block_types",
    "up_block_types",
    "layers_per_block",
    "latent_channels",
)
_POSITIVE_INT_CONFIG = (
    "in_channels",
    "out_channels",
    "latent_channels",
    "layers_per_block",
    "norm_num_groups",
)
_BOOL_CONFIG = ("use_quant_conv", "use_post_quant_conv", "mid_block_add_attention")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _config_problem(config: dict[str, Any]) -> str | None:
    """What in a diffusers VAE config would not build a network (None: nothing)."""
    missing = [k for k in _REQUIRED_CONFIG if k not in config]
    if missing:
        return f"lacks the key(s) {', '.join(missing)}"
    for key in _POSITIVE_INT_CONFIG:
        if key in config and not (_is_int(config[key]) and config[key] > 0):
            return f"{key} must be a positive integer, got {json.dumps(config[key], default=repr)}"
    for key in _BOOL_CONFIG:
        if key in config and not isinstance(config[key], bool):
            return f"{key} must be true or false, got {json.dumps(config[key], default=repr)}"
    channels = config["block_out_channels"]
    if not (isinstance(channels, list) and channels and all(_is_int(c) and c > 0 for c in channels)):
        shown = json.dumps(channels, default=repr)
        return f"block_out_channels must be a list of positive integers, got {shown}"
    groups = config.get("norm_num_groups", 32)
    if any(c % groups for c in channels):
        return f"every block_out_channels entry must be divisible by norm_num_groups {groups}, got {channels}"
    for key, expected in (("down_block_types", _DOWN_BLOCK), ("up_block_types", _UP_BLOCK)):
        types = config[key]
        if not (
            isinstance(types, list) and len(types) == len(channels) and all(t == expected for t in types)
        ):
            shown = json.dumps(types, default=repr)
            return f"{key} must be {len(channels)} x {expected!r} (one per block_out_channels), got {shown}"
    act = config.get("act_fn", "silu")
    if not (isinstance(act, str) and act.lower() in _ACTIVATIONS):
        return f"act_fn must be one of {', '.join(sorted(_ACTIVATIONS))}, got {json.dumps(act, default=repr)}"
    scale = config.get("scaling_factor", 0.18215)
    if not ((_is_int(scale) or isinstance(scale, float)) and 0 < scale < float("inf")):
        return f"scaling_factor must be a positive number, got {json.dumps(scale, default=repr)}"
    return None


def _activation(name: str) -> nn.Module:
    try:
        return _ACTIVATIONS[name.lower()]()
    except KeyError:
        raise ValueError(f"unsupported act_fn {name!r}; use one of {sorted(_ACTIVATIONS)}") from None


def _group_norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=groups, num_channels=channels, eps=_NORM_EPS, affine=True)


class DiagonalGaussian:
    """Posterior N(mean, exp(logvar)) per latent element, from the 2*C encoder moments."""

    def __init__(self, moments: torch.Tensor) -> None:
        self.mean, logvar = moments.chunk(2, dim=1)
        # Same bounds as the original, so exp() can neither underflow to 0 nor overflow.
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """Draw mean + std * eps, with eps from ``generator`` (on its own device) if given."""
        noise_device = generator.device if generator is not None else self.mean.device
        noise = torch.randn(
            self.mean.shape, generator=generator, device=noise_device, dtype=self.mean.dtype
        ).to(self.mean.device)
        return self.mean + self.std * noise


class _ResnetBlock(nn.Module):
    """Pre-norm residual block: (GN, act, conv) x2 plus an optional 1x1 shortcut."""

    def __init__(self, in_ch: int, out_ch: int, groups: int, act_fn: str) -> None:
        super().__init__()
        self.norm1 = _group_norm(in_ch, groups)
        self.conv1 = nn.Conv2d(in_ch, out_ch, kernel_size=3, padding=1)
        self.norm2 = _group_norm(out_ch, groups)
        self.conv2 = nn.Conv2d(out_ch, out_ch, kernel_size=3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_ch, out_ch, kernel_size=1) if in_ch != out_ch else None
        self.act = _activation(act_fn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(self.act(self.norm1(x)))
        h = self.conv2(self.act(self.norm2(h)))
        skip = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return skip + h


class _Downsample(nn.Module):
    """Stride-2 3x3 conv after padding one zero row/column at the bottom/right only."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class _Upsample(nn.Module):
    """Nearest-neighbour x2 followed by a 3x3 conv."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _SelfAttention(nn.Module):
    """Single-head spatial self-attention with a residual connection."""

    def __init__(self, channels: int, groups: int) -> None:
        super().__init__()
        self.group_norm = _group_norm(channels, groups)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        # A list so the projection is named ``to_out.0`` like in diffusers.
        self.to_out = nn.ModuleList([nn.Linear(channels, channels)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        tokens = self.group_norm(x).reshape(b, c, h * w).transpose(1, 2)
        out = F.scaled_dot_product_attention(self.to_q(tokens), self.to_k(tokens), self.to_v(tokens))
        out = self.to_out[0](out).transpose(1, 2).reshape(b, c, h, w)
        return x + out


class _MidBlock(nn.Module):
    """resnet, then (attention, resnet); the attention is optional."""

    def __init__(self, channels: int, groups: int, act_fn: str, add_attention: bool) -> None:
        super().__init__()
        # Registered before ``resnets`` so state_dict order matches diffusers.
        self.attentions = nn.ModuleList([_SelfAttention(channels, groups)] if add_attention else [])
        self.resnets = nn.ModuleList([_ResnetBlock(channels, channels, groups, act_fn) for _ in range(2)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.resnets[0](x)
        for attention in self.attentions:
            x = attention(x)
        return self.resnets[1](x)


class _DownBlock(nn.Module):
    def __init__(
        self, in_ch: int, out_ch: int, n_layers: int, groups: int, act_fn: str, downsample: bool
    ) -> None:
        super().__init__()
        self.resnets = nn.ModuleList(
            [_ResnetBlock(in_ch if i == 0 else out_ch, out_ch, groups, act_fn) for i in range(n_layers)]
        )
        self.downsamplers = nn.ModuleList([_Downsample(out_ch)]) if downsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
        return x


class _UpBlock(nn.Module):
    def __init__(
        self, in_ch: int, out_ch: int, n_layers: int, groups: int, act_fn: str, upsample: bool
    ) -> None:
        super().__init__()
        self.resnets = nn.ModuleList(
            [_ResnetBlock(in_ch if i == 0 else out_ch, out_ch, groups, act_fn) for i in range(n_layers)]
        )
        self.upsamplers = nn.ModuleList([_Upsample(out_ch)]) if upsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x)
        return x


class _Encoder(nn.Module):
    """Image -> 2*latent_channels moments (mean and log-variance)."""

    def __init__(
        self,
        in_channels: int,
        latent_channels: int,
        channels: list[int],
        layers_per_block: int,
        groups: int,
        act_fn: str,
        mid_attention: bool,
    ) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, channels[0], kernel_size=3, padding=1)
        self.down_blocks = nn.ModuleList()
        prev = channels[0]
        for i, ch in enumerate(channels):
            last = i == len(channels) - 1
            self.down_blocks.append(_DownBlock(prev, ch, layers_per_block, groups, act_fn, not last))
            prev = ch
        self.mid_block = _MidBlock(channels[-1], groups, act_fn, mid_attention)
        self.conv_norm_out = _group_norm(channels[-1], groups)
        self.conv_act = _activation(act_fn)
        self.conv_out = nn.Conv2d(channels[-1], 2 * latent_channels, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(self.conv_act(self.conv_norm_out(x)))


class _Decoder(nn.Module):
    """Latent -> image; channels run in reverse and each up block has one extra resnet."""

    def __init__(
        self,
        latent_channels: int,
        out_channels: int,
        channels: list[int],
        layers_per_block: int,
        groups: int,
        act_fn: str,
        mid_attention: bool,
    ) -> None:
        super().__init__()
        reversed_channels = list(reversed(channels))
        self.conv_in = nn.Conv2d(latent_channels, reversed_channels[0], kernel_size=3, padding=1)
        # Registered before ``mid_block`` so state_dict order matches diffusers.
        self.up_blocks = nn.ModuleList()
        prev = reversed_channels[0]
        for i, ch in enumerate(reversed_channels):
            last = i == len(reversed_channels) - 1
            self.up_blocks.append(_UpBlock(prev, ch, layers_per_block + 1, groups, act_fn, not last))
            prev = ch
        self.mid_block = _MidBlock(reversed_channels[0], groups, act_fn, mid_attention)
        self.conv_norm_out = _group_norm(channels[0], groups)
        self.conv_act = _activation(act_fn)
        self.conv_out = nn.Conv2d(channels[0], out_channels, kernel_size=3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(self.conv_act(self.conv_norm_out(x)))


def _short_list(items: list[str], limit: int = 6) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" (+{len(items) - limit} more)" if len(items) > limit else "")


class AutoencoderKL(nn.Module):
    """SD-VAE: ``encode`` images in [-1, 1] to a Gaussian posterior, ``decode`` latents to images.

    Constructor arguments are the diffusers ``AutoencoderKL`` config keys; parameter names equal
    diffusers' ``state_dict()`` names, so its weight files load unchanged.
    """

    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 3,
        down_block_types: list[str] | tuple[str, ...] = (_DOWN_BLOCK,),
        up_block_types: list[str] | tuple[str, ...] = (_UP_BLOCK,),
        block_out_channels: list[int] | tuple[int, ...] = (64,),
        layers_per_block: int = 1,
        act_fn: str = "silu",
        latent_channels: int = 4,
        norm_num_groups: int = 32,
        sample_size: int | list[int] = 32,
        scaling_factor: float = 0.18215,
        use_quant_conv: bool = True,
        use_post_quant_conv: bool = True,
        mid_block_add_attention: bool = True,
    ) -> None:
        super().__init__()
        channels = list(block_out_channels)
        for kind, types, expected in (
            ("down_block_types", down_block_types, _DOWN_BLOCK),
            ("up_block_types", up_block_types, _UP_BLOCK),
        ):
            if len(types) != len(channels) or any(t != expected for t in types):
                raise ValueError(
                    f"{kind} must be {len(channels)} x {expected!r} (one per block_out_channels), "
                    f"got {list(types)}"
                )
        _activation(act_fn)  # fail early on an unknown activation name
        self.config: dict[str, Any] = {
            "in_channels": in_channels,
            "out_channels": out_channels,
            "down_block_types": list(down_block_types),
            "up_block_types": list(up_block_types),
            "block_out_channels": channels,
            "layers_per_block": layers_per_block,
            "act_fn": act_fn,
            "latent_channels": latent_channels,
            "norm_num_groups": norm_num_groups,
            "sample_size": sample_size,
            "scaling_factor": scaling_factor,
            "use_quant_conv": use_quant_conv,
            "use_post_quant_conv": use_post_quant_conv,
            "mid_block_add_attention": mid_block_add_attention,
        }
        arch = (channels, layers_per_block, norm_num_groups, act_fn, mid_block_add_attention)
        self.encoder = _Encoder(in_channels, latent_channels, *arch)
        self.decoder = _Decoder(latent_channels, out_channels, *arch)
        self.quant_conv = (
            nn.Conv2d(2 * latent_channels, 2 * latent_channels, kernel_size=1) if use_quant_conv else None
        )
        self.post_quant_conv = (
            nn.Conv2d(latent_channels, latent_channels, kernel_size=1) if use_post_quant_conv else None
        )

    @property
    def scaling_factor(self) -> float:
        return float(self.config["scaling_factor"])

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> AutoencoderKL:
        """Build from a diffusers config dict, ignoring keys that do not shape the network."""
        accepted = set(inspect.signature(cls.__init__).parameters) - {"self"}
        return cls(**{k: v for k, v in config.items() if k in accepted})

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        """Images (B, in_channels, H, W) in [-1, 1] -> posterior over (B, C, H/f, W/f) latents."""
        moments = self.encoder(x)
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        return DiagonalGaussian(moments)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Unscaled latents -> images, nominally in [-1, 1] (not clamped)."""
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    # --- diffusers folder layout ------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls,
        folder_or_repo_id: str | Path,
        dtype: torch.dtype | None = None,
        revision: str | None = None,
    ) -> AutoencoderKL:
        """Load ``config.json`` + ``diffusion_pytorch_model.safetensors`` from a folder or Hub repo.

        The model is returned in eval mode, in ``dtype`` (float32 when None).
        """
        folder = Path(folder_or_repo_id)
        if not folder.is_dir():
            folder = Path(
                local_folder(str(folder_or_repo_id), [CONFIG_NAME, WEIGHTS_NAME], revision=revision)
            )
        config_path, weights_path = folder / CONFIG_NAME, folder / WEIGHTS_NAME
        for path in (config_path, weights_path):
            if not path.exists():
                raise FileNotFoundError(
                    f"{path} not found: a VAE folder needs {CONFIG_NAME} and {WEIGHTS_NAME} "
                    "(diffusers layout)"
                )
        config = read_json_object(config_path, "VAE config", error=VAEFileError)
        problem = _config_problem(config)
        if problem is not None:
            raise VAEFileError(f"{config_path} (VAE config) {problem}: {_FIX}")
        # Build without allocating; the loaded tensors become the parameters.
        with torch.device("meta"):
            model = cls.from_config(config)
        state = _normalise_keys(load_safetensors(weights_path, "VAE weights", error=VAEFileError))
        _check_state(model, state, weights_path)
        odd = sorted(k for k, v in state.items() if not v.is_floating_point())
        if odd:
            raise VAEFileError(
                f"{weights_path} (VAE weights) holds non-float tensors ({_short_list(odd)}): {REDOWNLOAD}"
            )
        model.load_state_dict(state, strict=True, assign=True)
        return model.to(dtype or torch.float32).eval()

    def save_pretrained(self, folder: str | Path) -> Path:
        """Write ``config.json`` and ``diffusion_pytorch_model.safetensors`` (atomically)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        config = {
            "_class_name": "AutoencoderKL",
            "_diffusers_version": DIFFUSERS_FORMAT_VERSION,
            **self.config,
            **_PASSIVE_CONFIG,
        }
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        save_safetensors(tensors, folder / WEIGHTS_NAME)
        atomic_write(
            folder / CONFIG_NAME,
            lambda tmp: Path(tmp).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n"),
        )
        return folder


def _normalise_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename legacy mid-block attention keys and flatten 1x1-conv shaped projections."""
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        if ".mid_block.attentions." in key:
            *head, module, leaf = key.split(".")
            key = ".".join([*head, _LEGACY_ATTENTION_NAMES.get(module, module), leaf])
            if leaf == "weight" and tensor.ndim == 4:  # (C, C, 1, 1) -> (C, C)
                tensor = tensor.reshape(tensor.shape[0], tensor.shape[1])
        out[key] = tensor
    return out


def _check_state(model: nn.Module, state: dict[str, torch.Tensor], source: Path) -> None:
    """Raise one clear error listing missing, unexpected and mis-shaped keys."""
    mismatch = state_dict_mismatch({k: v.shape for k, v in model.state_dict().items()}, state)
    if mismatch:
        raise VAEWeightsError(
            f"{source} does not match the AutoencoderKL config next to it ({mismatch.describe()}); "
            "use the config.json that belongs to these weights"
        )
