"""Tiny checkpoints in the exact release layout, built on the fly (nothing is downloaded)."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import torch

from rflav_cli.bench import TINY, TINY_VAE_CONFIG, TINY_VOCODER_CONFIG, flav_config
from rflav_cli.hub import write_side_file
from rflav_cli.models.autoencoder import AutoencoderKL
from rflav_cli.models.flav import FLAV
from rflav_cli.models.vocoder import HiFiGAN

TINY_SCALE = 3.5

# The shapes are bench's tiny checkpoint's; the weight draws below are the tests' own.
TINY_VOCODER = TINY_VOCODER_CONFIG
TINY_VAE = TINY_VAE_CONFIG


def _randomise(module: torch.nn.Module, seed: int, std: float = 0.05) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "norm" in name and p.dim() == 1:
                continue  # keep GroupNorm affine at 1/0
            p.copy_(torch.randn(p.shape, generator=g) * std)


def build_tiny_model(
    folder: Path,
    *,
    num_classes: int = 0,
    class_names: list[str] | None = None,
    window: int = 3,
    audio_scale: float | None = TINY_SCALE,
) -> Path:
    """FLAV (256 mels, 32×32 latents) + hop-160 HiFi-GAN in release layout, plus rflav.json."""
    model = FLAV(dataclasses.replace(flav_config(TINY, window), num_classes=num_classes))
    _randomise(model, 1)
    model.save_pretrained(folder)
    vocoder = HiFiGAN(TINY_VOCODER)
    _randomise(vocoder, 2, std=0.1)
    vocoder.save_pretrained(folder / "vocoder")
    side = {}
    if audio_scale is not None:
        side["audio_scale"] = audio_scale
    if class_names:
        side["class_names"] = class_names
    if side:
        write_side_file(folder, side)
    return folder


def build_tiny_vae(folder: Path) -> Path:
    vae = AutoencoderKL.from_config(TINY_VAE)
    _randomise(vae, 3)
    vae.save_pretrained(folder)
    return folder


def install_in_hf_cache(
    src: Path, cache: Path, repo_id: str, commit: str = "0123456789abcdef0123456789abcdef01234567"
) -> Path:
    """Lay a folder out as a Hugging Face cache entry (refs/main → snapshot)."""
    repo_dir = cache / ("models--" + repo_id.replace("/", "--"))
    (repo_dir / "refs").mkdir(parents=True, exist_ok=True)
    (repo_dir / "refs" / "main").write_text(commit)
    snapshot = repo_dir / "snapshots" / commit
    shutil.copytree(src, snapshot, dirs_exist_ok=True)
    return snapshot
