"""What each subcommand can be asked, checked without importing torch.

The command line builds one of these requests from its flags and checks it here first, so a
bad value is reported in a fraction of a second instead of after the heavy imports.
"""

from __future__ import annotations


# ----------------------------------------------------------------------------------------
# rflav generate
# ----------------------------------------------------------------------------------------

import math  # noqa: E402 - each subcommand's section keeps its own imports
import os  # noqa: E402
import re  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

from .config import FPS  # noqa: E402
from .errors import UsageError  # noqa: E402

GENERATE_DEFAULT_PRESET = "dance"
GENERATE_DEFAULT_SECONDS = 10.0
GENERATE_DTYPES = ("auto", "fp32", "bf16", "fp16")
_GENERATE_DEVICE_RE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")
_MAX_SEED = 2**63 - 1   # torch generators take a signed 64-bit seed


@dataclass
class GenerateRequest:
    """Everything `rflav generate` can be asked; defaults match the CLI's."""

    model: str | None = None
    label: str | None = None            # --class: a preset name or a class of the checkpoint
    vae: str | None = None
    revision: str | None = None
    offline: bool = False
    audio_scale: float | None = None
    seconds: float | None = None
    frames: int | None = None
    forever: bool = False
    num_samples: int = 1
    batch_size: int = 1
    seed: int = 0
    steps: int = 2
    cfg_scale: float | None = None
    guidance_scale: float | None = None
    audio_input: Path | None = None
    video_input: Path | None = None
    device: str = "auto"
    dtype: str = "auto"
    compile: bool | None = None         # None: decided from the device and the length
    output: Path | str | None = None    # a str keeps a trailing "/", which makes it a folder
    overwrite: bool = False
    wav: bool = False
    quiet: bool = False
    griffin_lim: bool = False           # make the sound with Griffin-Lim, not the checkpoint's vocoder


def _finite(value: float, at_least: float, strictly: bool) -> bool:
    return math.isfinite(value) and (value > at_least if strictly else value >= at_least)


def check_generate_request(req: GenerateRequest) -> None:
    """Every check of a generate request that needs neither torch nor the model: bad values
    fail here with one line (UsageError) before anything heavy is imported."""
    if req.steps < 1:
        raise UsageError(f"{{steps}} must be at least 1, got {req.steps}", params=("steps",))
    if req.num_samples < 1:
        raise UsageError(f"{{num_samples}} must be at least 1, got {req.num_samples}", params=("num_samples",))
    if req.batch_size < 1:
        raise UsageError(f"{{batch_size}} must be at least 1, got {req.batch_size}", params=("batch_size",))
    limit = _MAX_SEED - (req.num_samples - 1)   # sample i uses seed + i
    if not 0 <= req.seed <= limit:
        raise UsageError(f"{{seed}} must be from 0 to {limit}, got {req.seed}", params=("seed",))
    if req.audio_scale is not None and not _finite(req.audio_scale, 0, strictly=True):
        raise UsageError(f"{{audio_scale}} must be a positive number, got {req.audio_scale}", params=("audio_scale",))
    if req.cfg_scale is not None and not _finite(req.cfg_scale, 0, strictly=False):
        raise UsageError(f"{{cfg_scale}} must be a number >= 0, got {req.cfg_scale}", params=("cfg_scale",))
    if req.guidance_scale is not None:
        if not _finite(req.guidance_scale, 0, strictly=False):
            raise UsageError(f"{{guidance_scale}} must be a number >= 0, got {req.guidance_scale}",
                             params=("guidance_scale",))
        if req.audio_input is None and req.video_input is None:
            raise UsageError("{guidance_scale} only applies with {audio_input} or {video_input}",
                             params=("guidance_scale", "audio_input", "video_input"))
    if req.audio_input is not None and req.video_input is not None:
        raise UsageError("give either {audio_input} or {video_input}, not both", params=("audio_input", "video_input"))
    if req.forever and req.num_samples > 1:
        raise UsageError("{forever} writes one stream: drop {num_samples}", params=("forever", "num_samples"))
    generate_frame_count(req, None)
    if not _GENERATE_DEVICE_RE.fullmatch(req.device):
        raise UsageError(f"unknown {{device}} {req.device!r}: use auto, cuda (or cuda:N), mps or cpu",
                         params=("device",))
    if req.dtype not in GENERATE_DTYPES:
        raise UsageError(f"unknown {{dtype}} {req.dtype!r}: use {', '.join(GENERATE_DTYPES)}", params=("dtype",))
    if req.dtype == "fp16" and req.device == "cpu":
        raise UsageError("{dtype} fp16 is not supported on CPU: use bf16 or fp32", params=("dtype",))
    _check_model(req)
    for param, path in (("audio_input", req.audio_input), ("video_input", req.video_input)):
        if path is not None and not Path(path).is_file():
            what = "a folder, not a media file" if Path(path).is_dir() else "no such file"
            raise UsageError(f"{{{param}}} {path}: {what}", params=(param,))
    model_name, _ = generate_model_and_label(req)
    generate_output_paths(req, model_name, [req.seed + i for i in range(req.num_samples)])


def _check_model(req: GenerateRequest) -> None:
    from .hub import PRESETS, is_repo_id   # huggingface_hub, not torch

    if req.model is None or req.model in PRESETS:
        return
    path = Path(req.model).expanduser()
    if path.is_dir():
        if req.revision is not None:
            raise UsageError(f"{{revision}} applies to Hub repos, and {{model}} {req.model} is a local folder: "
                             "drop {revision}", params=("revision", "model"))
        return
    if path.exists():
        raise UsageError(f"{{model}} {req.model} is a file: pass the checkpoint's folder (config.json, "
                         "model.safetensors, vocoder/)", params=("model",))
    if not is_repo_id(req.model):
        raise UsageError(f"{{model}} {req.model}: not a preset ({', '.join(PRESETS)}), a local folder "
                         "or a Hub repo id (org/name)", params=("model",))


def generate_model_and_label(req: GenerateRequest) -> tuple[str, str | None]:
    """The checkpoint to load and the class to ask it for. `--class dance` alone means the
    dance preset; with --model it names a class of that checkpoint (`--model dance --class
    dance` is the preset too)."""
    from .hub import PRESETS

    if req.model is None:
        if req.label is None:
            return GENERATE_DEFAULT_PRESET, None
        if req.label in PRESETS:
            return req.label, None
        raise UsageError(
            f"unknown class {req.label!r}: choose one of {', '.join(PRESETS)} "
            "(or pass {model} CHECKPOINT to use the classes of a class-conditional checkpoint)", params=("model",)
        )
    if req.label in PRESETS and req.label == req.model:
        return req.model, None
    return req.model, req.label


def generate_frame_count(req: GenerateRequest, given_frames: int | None) -> int | None:
    """Frames to generate (None: until stopped); `given_frames` is the --audio/--video length."""
    chosen = [name for name, value in (("seconds", req.seconds), ("frames", req.frames)) if value is not None]
    if req.forever and chosen:
        raise UsageError(f"{{forever}} cannot be combined with {{{chosen[0]}}}", params=("forever", chosen[0]))
    if len(chosen) > 1:
        raise UsageError("give either {seconds} or {frames}, not both", params=("seconds", "frames"))
    if req.forever:
        return None
    if req.seconds is not None:
        if not _finite(req.seconds, 0, strictly=True):
            raise UsageError(f"{{seconds}} must be a positive number, got {req.seconds}", params=("seconds",))
        return max(1, round(req.seconds * FPS))
    if req.frames is not None:
        if req.frames < 1:
            raise UsageError(f"{{frames}} must be at least 1, got {req.frames}", params=("frames",))
        return req.frames
    if given_frames is not None:
        return given_frames
    return round(GENERATE_DEFAULT_SECONDS * FPS)


def generate_output_paths(req: GenerateRequest, model_name: str, seeds: list[int]) -> list[Path]:
    """The MP4 of each seed, checked: never an existing file unless overwriting, always in a
    writable place.

    --output is a file when it ends in .mp4 (any other suffix is refused: the writer makes MP4
    only) or has no suffix (.mp4 is added); it is a folder when it exists as one or ends in
    "/". Several samples always go into a folder, as NAME-seedS.mp4."""
    stem = Path(model_name.rstrip("/")).name or "rflav"
    names = [f"{stem}-seed{s}.mp4" for s in seeds]
    raw = None if req.output is None else str(req.output)
    if raw is None:
        paths = [Path(f"{stem}-samples") / n for n in names] if len(seeds) > 1 else [Path(names[0])]
    else:
        out = Path(raw).expanduser()
        if out.is_dir() or raw.endswith(("/", os.sep)):
            paths = [out / n for n in names]
        elif out.suffix.lower() not in ("", ".mp4"):
            raise UsageError(f"{{output}} {raw}: rflav writes MP4 files only: give a name ending in .mp4, "
                             "or a folder", params=("output",))
        elif len(seeds) > 1:
            if out.suffix:
                raise UsageError(f"{{num_samples}} {len(seeds)} writes several files: give {{output}} a folder, "
                                 f"not {raw}", params=("num_samples", "output"))
            paths = [out / n for n in names]
        else:
            paths = [out if out.suffix else out.with_name(out.name + ".mp4")]
    for path in paths:
        targets = [path, path.with_suffix(".json")] + ([path.with_suffix(".wav")] if req.wav else [])
        for target in targets:
            if target.exists() and not req.overwrite:
                raise UsageError(f"{target} already exists: choose another {{output}} or pass {{overwrite}}",
                                 params=("output", "overwrite"))
        folder = path.parent
        existing = folder
        while not existing.exists():
            existing = existing.parent
        if not existing.is_dir() or not os.access(existing, os.W_OK):
            raise UsageError(f"cannot write to {folder}: choose a writable {{output}}", params=("output",))
    return paths
