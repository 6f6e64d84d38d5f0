"""Constants of the R-FLAV media format and the FLAV model size table.

Every number that defines the data the released checkpoints were trained on lives here,
so the rest of the package never repeats a magic constant.
"""

from __future__ import annotations

import json
import math

# --- media -----------------------------------------------------------------------------
FPS = 10  # video frames per second
SAMPLE_RATE = 16_000  # audio samples per second (mono)
SAMPLES_PER_FRAME = SAMPLE_RATE // FPS  # 1600 audio samples per video frame
IMAGE_SIZE = 256  # frames are letterboxed to IMAGE_SIZE x IMAGE_SIZE

# --- mel front end (HiFi-GAN / Auffusion conventions) ----------------------------------
N_FFT = 2048
HOP_LENGTH = 160
WIN_LENGTH = 1024
N_MELS = 256
F_MIN = 0.0
F_MAX = 8000.0
MEL_FRAMES_PER_FRAME = SAMPLES_PER_FRAME // HOP_LENGTH  # 10 mel columns per video frame
PEAK_LEVEL = 0.95  # waveforms are peak-normalised to this before the mel
LOG_MEL_MIN = 1e-5  # log(max(mel, 1e-5)); also the low end of the normalisation
LOG_MEL_MAX = 200.0  # high end of the [0, 1] normalisation of log-mel

# --- sampling ----------------------------------------------------------------------------
# The guidance of --audio / --video when --guidance-scale is not given (Pipeline.generate).
AUDIO_GUIDANCE_DEFAULT = 1.0
VIDEO_GUIDANCE_DEFAULT = 2.0


def default_guidance_scale(audio_input: object, video_input: object) -> float | None:
    """The guidance applied to a given --audio or --video when none is asked; None without either."""
    if audio_input is not None:
        return AUDIO_GUIDANCE_DEFAULT
    if video_input is not None:
        return VIDEO_GUIDANCE_DEFAULT
    return None


# --- latents -----------------------------------------------------------------------------
LATENT_SCALE = 0.18215  # SD-VAE latent scaling used by the reference pipeline
LATENT_CHANNELS = 4
VAE_DOWNSCALE = 8  # 256x256 frame -> 32x32 latent

# --- rectified flow ----------------------------------------------------------------------
FLOW_T_SCALE = 1000.0  # model time t_rf = t * (FLOW_T_SCALE - FLOW_T_EPS) + FLOW_T_EPS
FLOW_T_EPS = 1.0

# --- FLAV sizes: name -> (depth, hidden_size, num_heads, patch_size) -----------------------
FLAV_SIZES: dict[str, dict[str, int]] = {}
for _patch in (2, 4, 8):
    FLAV_SIZES[f"FLAV-S/{_patch}"] = dict(depth=12, hidden_size=384, num_heads=6, patch_size=_patch)
    FLAV_SIZES[f"FLAV-B/{_patch}"] = dict(depth=12, hidden_size=768, num_heads=12, patch_size=_patch)
    FLAV_SIZES[f"FLAV-L/{_patch}"] = dict(depth=20, hidden_size=1024, num_heads=16, patch_size=_patch)
    FLAV_SIZES[f"FLAV-XL/{_patch}"] = dict(depth=28, hidden_size=1152, num_heads=16, patch_size=_patch)
FLAV_SIZES["FLAV-B/1"] = dict(depth=12, hidden_size=768, num_heads=12, patch_size=1)
FLAV_SIZES["FLAV-L/1"] = dict(depth=24, hidden_size=1024, num_heads=16, patch_size=1)
del _patch

# The configuration of the released checkpoints (FLAV-B/1 over SD-VAE latents, 10-frame window).
RELEASED_FLAV_CONFIG: dict[str, object] = {
    "audio_fr": SAMPLE_RATE,
    "causal_attn": True,
    "class_dropout_prob": 0.1,
    "depth": 12,
    "grad_ckpt": False,
    "hidden_size": 768,
    "in_channels": 4,
    "latent_size": 32,
    "mlp_ratio": 4.0,
    "n_mels": N_MELS,
    "num_classes": 0,
    "num_heads": 12,
    "patch_size": 1,
    "predict_frames": 10,
}

# Types and ranges of the FLAV config keys (config.json, --model-config).
_POSITIVE_INT_FIELDS = {
    "latent_size",
    "patch_size",
    "in_channels",
    "hidden_size",
    "depth",
    "num_heads",
    "predict_frames",
    "n_mels",
    "audio_fr",
}
FLAV_FLOAT_FIELDS = {"mlp_ratio", "class_dropout_prob"}
_BOOL_FIELDS = {"grad_ckpt", "causal_attn"}


def flav_config_problem(name: str, value: object) -> str | None:
    """What is wrong with the value of FLAV config key ``name`` (None: nothing). Shared by
    checkpoint loading and `rflav train --model-config`, without importing torch."""
    shown = json.dumps(value, default=repr)
    shown = shown if len(shown) <= 40 else shown[:37] + "..."
    is_int = isinstance(value, int) and not isinstance(value, bool)
    if name in _BOOL_FIELDS:
        return None if isinstance(value, bool) else f"{name} must be true or false, got {shown}"
    if name in FLAV_FLOAT_FIELDS:
        if not (is_int or isinstance(value, float)) or not math.isfinite(value):
            return f"{name} must be a number, got {shown}"
        if name == "mlp_ratio" and value <= 0:
            return f"mlp_ratio must be positive, got {shown}"
        if name == "class_dropout_prob" and not 0 <= value < 1:
            return f"class_dropout_prob must be in [0, 1), got {shown}"
        return None
    if not is_int:
        return f"{name} must be an integer, got {shown}"
    if name in _POSITIVE_INT_FIELDS and value <= 0:
        return f"{name} must be a positive integer, got {shown}"
    if name == "num_classes" and value < 0:
        return f"num_classes must be 0 (unconditional) or more, got {shown}"
    return None
