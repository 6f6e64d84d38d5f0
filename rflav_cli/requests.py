"""What each subcommand can be asked, checked without importing torch.

The command line builds one of these requests from its flags and checks it here first, so a
bad value is reported in a fraction of a second instead of after the heavy imports.
"""

from __future__ import annotations

import ipaddress
import json
import math
import numbers
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from .config import (
    FLAV_SIZES,
    FPS,
    RELEASED_FLAV_CONFIG,
    VAE_DOWNSCALE,
    default_guidance_scale,
    flav_config_problem,
)
from .errors import FileFormatError, RflavError, UsageError
from .files import stdout_unusable, unwritable_reason
from .hub import PRESETS, is_repo_id, read_side_file  # huggingface_hub, not torch
from .samples import Sample, read_sidecar, refuse_if_running

DEVICE_RE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")  # what --device accepts
STDOUT = "-"  # --output - : the MP4 goes to standard output (media.STDOUT)


# ----------------------------------------------------------------------------------------
# rflav generate
# ----------------------------------------------------------------------------------------


GENERATE_DEFAULT_PRESET = "dance"
GENERATE_DEFAULT_SECONDS = 10.0
GENERATE_DTYPES = ("auto", "fp32", "bf16", "fp16")
MAX_SEED = 2**63 - 1  # torch generators take a signed 64-bit seed
# One file holds at most a week: a length past that is a typo (or an overflow), and an endless
# stream is --forever's.
GENERATE_MAX_SECONDS = 7 * 24 * 3600
GENERATE_MAX_FRAMES = GENERATE_MAX_SECONDS * FPS


@dataclass
class GenerateRequest:
    """Everything `rflav generate` can be asked; defaults match the CLI's."""

    model: str | None = None
    label: str | None = None  # --class: a preset name or a class of the checkpoint
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
    tf32: bool = True  # CUDA fp32: TensorFloat-32 products, as the reference runs
    compile: bool | None = None  # None: decided from the device and the length
    output: Path | str | None = None  # a str keeps a trailing "/", which makes it a folder; "-": stdout
    overwrite: bool = False
    wav: bool = False
    quiet: bool = False
    griffin_lim: bool = False  # make the sound with Griffin-Lim, not the checkpoint's vocoder


def check_device(device: str) -> None:
    """A --device value as every command accepts it (whether it is there is torch's to say)."""
    if not DEVICE_RE.fullmatch(device):
        raise UsageError(
            f"unknown {{device}} {device!r}: use auto, cuda (or cuda:N), mps or cpu", params=("device",)
        )


def check_dtype(dtype: str, device: str) -> None:
    """A --dtype value, and the one combination known bad before the device is looked at."""
    if dtype not in GENERATE_DTYPES:
        raise UsageError(f"unknown {{dtype}} {dtype!r}: use {', '.join(GENERATE_DTYPES)}", params=("dtype",))
    if dtype == "fp16" and device == "cpu":
        raise UsageError("{dtype} fp16 is not supported on CPU: use bf16 or fp32", params=("dtype",))


def _finite(value: float, at_least: float, strictly: bool) -> bool:
    return math.isfinite(value) and (value > at_least if strictly else value >= at_least)


def is_whole_number(value: object) -> bool:
    """An int (numpy's included), not a bool nor a float such as 2.0."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_seed(seed: object, param: str = "seed", limit: int = MAX_SEED) -> int:
    """A seed as torch's generators take it: a whole number from 0 to `limit`."""
    if not is_whole_number(seed) or not 0 <= seed <= limit:  # type: ignore[operator]
        raise UsageError(
            f"{{{param}}} must be from 0 to {limit} (a whole number), got {seed!r}", params=(param,)
        )
    return int(seed)  # type: ignore[call-overload]


def check_frames(frames: object, param: str = "frames") -> int:
    """A number of frames to generate: a whole number from 1 to GENERATE_MAX_FRAMES."""
    if not is_whole_number(frames) or not 1 <= frames <= GENERATE_MAX_FRAMES:  # type: ignore[operator]
        raise UsageError(
            f"{{{param}}} must be a whole number from 1 to {GENERATE_MAX_FRAMES} (a week), got {frames!r}",
            params=(param,),
        )
    return int(frames)  # type: ignore[call-overload]


def guidance_scale_used(req: GenerateRequest) -> float | None:
    """The guidance a request gets: its own, the default of its --audio/--video, or None without either."""
    if req.guidance_scale is not None:
        return req.guidance_scale
    return default_guidance_scale(req.audio_input, req.video_input)


def check_generate_request(req: GenerateRequest) -> None:
    """Every check of a generate request that needs neither torch nor the model: bad values
    fail here with one line (UsageError) before anything heavy is imported."""
    if req.steps < 1:
        raise UsageError(f"{{steps}} must be at least 1, got {req.steps}", params=("steps",))
    if req.num_samples < 1:
        raise UsageError(
            f"{{num_samples}} must be at least 1, got {req.num_samples}", params=("num_samples",)
        )
    if req.batch_size < 1:
        raise UsageError(f"{{batch_size}} must be at least 1, got {req.batch_size}", params=("batch_size",))
    check_seed(req.seed, limit=MAX_SEED - (req.num_samples - 1))  # sample i uses seed + i
    if req.audio_scale is not None and not _finite(req.audio_scale, 0, strictly=True):
        raise UsageError(
            f"{{audio_scale}} must be a positive number, got {req.audio_scale}", params=("audio_scale",)
        )
    if req.cfg_scale is not None and not _finite(req.cfg_scale, 0, strictly=False):
        raise UsageError(f"{{cfg_scale}} must be a number >= 0, got {req.cfg_scale}", params=("cfg_scale",))
    if req.guidance_scale is not None:
        if not _finite(req.guidance_scale, 0, strictly=False):
            raise UsageError(
                f"{{guidance_scale}} must be a number >= 0, got {req.guidance_scale}",
                params=("guidance_scale",),
            )
        if req.audio_input is None and req.video_input is None:
            raise UsageError(
                "{guidance_scale} only applies with {audio_input} or {video_input}",
                params=("guidance_scale", "audio_input", "video_input"),
            )
    if req.audio_input is not None and req.video_input is not None:
        raise UsageError(
            "give either {audio_input} or {video_input}, not both", params=("audio_input", "video_input")
        )
    if req.forever and req.num_samples > 1:
        raise UsageError("{forever} writes one stream: drop {num_samples}", params=("forever", "num_samples"))
    given = "audio_input" if req.audio_input is not None else "video_input" if req.video_input else None
    if req.forever and given is not None:
        # The input sets the length: an endless stream would go on without it.
        raise UsageError(
            f"{{forever}} cannot be combined with {{{given}}}, whose length sets the output's: drop "
            "{forever} (or give {seconds} for a part of the input)",
            params=("forever", given, "seconds"),
        )
    if req.output is not None and not str(req.output).strip():
        raise UsageError(
            "{output} is empty: give a file name (NAME.mp4), a folder (NAME/) or - for standard output",
            params=("output",),
        )
    _check_stdout_output(req)
    generate_frame_count(req, None)
    check_device(req.device)
    check_dtype(req.dtype, req.device)
    model_name, _ = generate_model_and_label(req)
    _check_model(req, model_name)
    for param, path in (("audio_input", req.audio_input), ("video_input", req.video_input)):
        if path is not None and not Path(path).is_file():
            what = "a folder, not a media file" if Path(path).is_dir() else "no such file"
            raise UsageError(f"{{{param}}} {path}: {what}", params=(param,))
    generate_output_paths(req, model_name, [req.seed + i for i in range(req.num_samples)])


def _check_stdout_output(req: GenerateRequest) -> None:
    """`--output -` streams one MP4 to standard output: nothing that needs files or several streams."""
    if req.output is None or str(req.output) != STDOUT:
        return
    if req.num_samples > 1:
        raise UsageError(
            f"{{output}} - streams one video to standard output: drop {{num_samples}} {req.num_samples} "
            "(or give a folder)",
            params=("output", "num_samples"),
        )
    if req.wav:
        raise UsageError(
            "{wav} writes a file next to the MP4, and {output} - has none: drop {wav} (or give a file name)",
            params=("wav", "output"),
        )
    problem = stdout_unusable()
    if problem:
        raise UsageError(f"{{output}} -: {problem}", params=("output",))


def class_index(label: str | int, names: Sequence[str], count: int) -> int | None:
    """Which of a model's `count` classes (named `names`, maybe not at all) `label` means, as
    --class reads it: an index in range first, then a name; None for neither."""
    if isinstance(label, int) or (isinstance(label, str) and label.isdigit()):
        if 0 <= int(label) < count:
            return int(label)
    return list(names).index(label) if label in names else None


def check_revision(model: str, revision: str | None) -> None:
    """A revision names a commit of a Hub repo: refused for a packaged preset or a local folder."""
    if revision is None:
        return
    preset = PRESETS.get(model)
    if preset.packaged_folder is not None if preset else Path(model).expanduser().is_dir():
        what = f"the {model} preset ships with rflav" if preset else f"{{model}} {model} is a local folder"
        raise UsageError(
            f"{{revision}} applies to Hub repos, and {what}: drop {{revision}}", params=("revision", "model")
        )


def _check_model(req: GenerateRequest, model_name: str) -> None:
    """The checkpoint named (a preset, a folder, a repo id) and what it cannot take: --revision
    off the Hub, --vae for a model that works in pixel space."""
    check_revision(model_name, req.revision)
    preset = PRESETS.get(model_name)
    if preset is not None and preset.packaged_folder is None:
        return  # a Hub checkpoint: its rflav.json is read once downloaded (Pipeline.from_pretrained)
    folder = preset.packaged_folder if preset is not None else Path(model_name).expanduser()
    if folder is not None and folder.is_dir():
        if req.vae is not None and read_side_file(folder).get("pixel_space"):
            raise UsageError(
                f"{{vae}} {req.vae}: {model_name} works in pixel space and uses no VAE: drop {{vae}}",
                params=("vae",),
            )
        return
    if folder is not None and folder.exists():
        raise UsageError(
            f"{{model}} {model_name} is a file: pass the checkpoint's folder (config.json, "
            "model.safetensors, vocoder/)",
            params=("model",),
        )
    if not is_repo_id(model_name):
        raise UsageError(
            f"{{model}} {model_name}: not a preset ({', '.join(PRESETS)}), a local folder "
            "or a Hub repo id (org/name)",
            params=("model",),
        )


def generate_model_and_label(req: GenerateRequest) -> tuple[str, str | None]:
    """The checkpoint to load and the class to ask it for. `--class dance` alone means the
    dance preset; with --model it names a class of that checkpoint (`--model dance --class
    dance` is the preset too)."""

    if req.model is None:
        if req.label is None:
            return GENERATE_DEFAULT_PRESET, None
        if req.label in PRESETS:
            return req.label, None
        raise UsageError(
            f"unknown class {req.label!r}: choose one of {', '.join(PRESETS)} "
            "(or pass {model} CHECKPOINT to use the classes of a class-conditional checkpoint)",
            params=("model",),
        )
    if req.label in PRESETS and req.label == req.model:
        return req.model, None
    return req.model, req.label


def generate_frame_count(
    req: GenerateRequest, given_frames: int | None, given_param: str | None = None
) -> int | None:
    """Frames to generate (None: until stopped); `given_frames` is the length of the input that
    `given_param` (--audio/--video) gave, which a length asked for must not exceed."""
    chosen = [name for name, value in (("seconds", req.seconds), ("frames", req.frames)) if value is not None]
    if req.forever and chosen:
        raise UsageError(
            f"{{forever}} cannot be combined with {{{chosen[0]}}}", params=("forever", chosen[0])
        )
    if len(chosen) > 1:
        raise UsageError("give either {seconds} or {frames}, not both", params=("seconds", "frames"))
    if req.forever:
        return None
    if req.seconds is not None:
        seconds = req.seconds
        number = isinstance(seconds, numbers.Real) and not isinstance(seconds, bool)
        if not (number and _finite(seconds, 0, strictly=True) and seconds <= GENERATE_MAX_SECONDS):
            raise UsageError(
                f"{{seconds}} must be a positive number of at most {GENERATE_MAX_SECONDS} (a week), "
                f"got {seconds!r}",
                params=("seconds",),
            )
        frames = max(1, round(seconds * FPS))
    elif req.frames is not None:
        frames = check_frames(req.frames)
    else:
        return given_frames if given_frames is not None else round(GENERATE_DEFAULT_SECONDS * FPS)
    if given_frames is not None and frames > given_frames:
        # Past its end the output would hold generated sound (or pictures) in place of the input's.
        asked, param = chosen[0], given_param or "audio_input"
        name = getattr(req, param, None)
        raise UsageError(
            f"{{{asked}}} {getattr(req, asked)} asks for {frames} frames, and {{{param}}}"
            f"{f' {name}' if name is not None else ''} lasts {given_frames} frames "
            f"({given_frames / FPS:g} s): ask for at most that, or leave {{{asked}}} out to follow the "
            "whole input",
            params=(asked, param),
        )
    return frames


def output_is_folder(req: GenerateRequest) -> bool:
    """--output names a folder: one that exists, or a path ending in "/"."""
    if req.output is None or str(req.output) == STDOUT:
        return False
    raw = str(req.output)
    return Path(raw).expanduser().is_dir() or raw.endswith(("/", os.sep))


def generate_output_paths(req: GenerateRequest, model_name: str, seeds: list[int]) -> list[Path]:
    """The MP4 of each seed, checked: never an existing file unless overwriting, always in a
    writable place.

    --output is a file when it ends in .mp4 (any other suffix is refused: the writer makes MP4
    only) or has no suffix (.mp4 is added); it is a folder when it exists as one or ends in
    "/". Several samples always go into a folder, as NAME-seedS.mp4. "-" is standard output
    (returned as Path("-"); a file of that name is ./-)."""
    if req.output is not None and str(req.output) == STDOUT:
        return [Path(STDOUT)]
    stem = Path(model_name.rstrip("/")).name or "rflav"
    names = [f"{stem}-seed{s}.mp4" for s in seeds]
    raw = None if req.output is None else str(req.output)
    if raw is None:
        paths = [Path(f"{stem}-samples") / n for n in names] if len(seeds) > 1 else [Path(names[0])]
    else:
        out = Path(raw).expanduser()
        if output_is_folder(req):
            paths = [out / n for n in names]
        elif out.suffix.lower() not in ("", ".mp4"):
            raise UsageError(
                f"{{output}} {raw}: rflav writes MP4 files only: give a name ending in .mp4, or a folder",
                params=("output",),
            )
        elif len(seeds) > 1:
            if out.suffix:
                raise UsageError(
                    f"{{num_samples}} {len(seeds)} writes several files: give {{output}} a folder, not {raw}",
                    params=("num_samples", "output"),
                )
            paths = [out / n for n in names]
        else:
            paths = [out if out.suffix else out.with_name(out.name + ".mp4")]
    # A sample with an rflav sidecar may be this command's, to skip or finish: decided once the
    # model is loaded (samples.sample_state). An endless stream is never resumed.
    resumable = not req.forever and raw != STDOUT
    for seed, path in zip(seeds, paths):
        written = [path, path.with_suffix(".json")] + ([path.with_suffix(".wav")] if req.wav else [])
        for target in written:
            if target.is_dir():  # --overwrite replaces files, never a folder
                raise UsageError(
                    f"{target} is a folder, and this run writes a file of that name: rename or remove the "
                    "folder, or choose another {output}",
                    params=("output",),
                )
        side = read_sidecar(path.with_suffix(".json"))
        refuse_if_running(Sample(seed - seeds[0], seed, path), side)
        targets = [] if resumable and side is not None else written
        for target in targets:
            if target.exists() and not req.overwrite:
                raise UsageError(
                    f"{target} already exists: choose another {{output}} or pass {{overwrite}}",
                    params=("output", "overwrite"),
                )
        if unwritable_reason(path.parent):
            raise UsageError(
                f"cannot write to {path.parent}: choose a writable {{output}}", params=("output",)
            )
    return paths


# ----------------------------------------------------------------------------------------
# rflav serve
# ----------------------------------------------------------------------------------------


SERVE_DEFAULT_HOST = "127.0.0.1"
SERVE_DEFAULT_PORT = 8000


@dataclass
class ServeRequest:
    """Everything `rflav serve` can be asked; defaults match the CLI's."""

    models: list[str] = field(default_factory=lambda: [GENERATE_DEFAULT_PRESET])
    vae: str | None = None
    audio_scale: float | None = None
    device: str = "auto"
    dtype: str = "auto"
    compile: bool | None = None  # None: on for CUDA, off elsewhere (an endless stream: runtime.auto_compile)
    steps: int = 2
    offline: bool = False
    host: str = SERVE_DEFAULT_HOST
    port: int = SERVE_DEFAULT_PORT
    max_streams: int | None = None  # None: one per device streams run on (every GPU for auto or cuda)
    token: str | None = None


def is_loopback_host(host: str) -> bool:
    """Whether listening on `host` keeps the server reachable from this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_serve_request(req: ServeRequest) -> None:
    """Every check of a serve request that needs neither torch nor the models."""
    if not req.models:
        raise UsageError("give at least one {model}", params=("model",))
    for model in req.models:
        _check_model(GenerateRequest(model=model), model)
    if req.audio_scale is not None and not _finite(req.audio_scale, 0, strictly=True):
        raise UsageError(
            f"{{audio_scale}} must be a positive number, got {req.audio_scale}", params=("audio_scale",)
        )
    check_device(req.device)
    check_dtype(req.dtype, req.device)
    if req.steps < 1:
        raise UsageError(f"{{steps}} must be at least 1, got {req.steps}", params=("steps",))
    if not req.host.strip():
        raise UsageError("{host} must not be empty", params=("host",))
    if not 0 <= req.port <= 65535:
        raise UsageError(
            f"{{port}} must be from 0 to 65535 (0: any free port), got {req.port}", params=("port",)
        )
    if req.max_streams is not None and req.max_streams < 1:
        raise UsageError(
            f"{{max_streams}} must be at least 1, got {req.max_streams}", params=("max_streams",)
        )
    if req.token is not None and (not req.token or req.token != req.token.strip() or len(req.token) < 8):
        raise UsageError("{token} must be at least 8 characters, without spaces around it", params=("token",))


# ----------------------------------------------------------------------------------------
# rflav train and rflav prepare
# ----------------------------------------------------------------------------------------


# Training derives every step's seed as (seed * 1_000_003 + step) * 4099 + rank (train.step_seed),
# which torch takes up to 2**64 - 1: below 2**32 that leaves room for 2e14 steps.
TRAIN_MAX_SEED = 2**32 - 1
TRAIN_DEFAULT_AUTOENCODER = "stabilityai/sd-vae-ft-ema"  # hub.VAE_REPO_ID (hub imports huggingface_hub)
TRAIN_WEIGHTINGS = ("logit_normal", "uniform")
MISSING_AUDIO_CHOICES = ("skip", "silence")
_MODEL_KEYS = tuple(RELEASED_FLAV_CONFIG)  # the FLAV constructor keys of config.json
_ARCHITECTURE_KEYS = tuple(k for k in _MODEL_KEYS if k != "grad_ckpt")


class TrainError(RflavError, ValueError):
    """A training request that cannot be served (bad data, incompatible resume, …)."""


@dataclass
class TrainConfig:
    """Everything `rflav train` can be asked; stored, resolved, in each checkpoint's training state.

    A field left None was not asked for. It takes, in this order, the resumed run's value, the
    value a given file implies (--model-config, the --init checkpoint, a latent cache made by
    `rflav prepare`), then the built-in default in TRAIN_DEFAULTS. A value that was asked for
    and contradicts one of those files is an error naming both."""

    data: str
    output: str = "runs/rflav"
    size: str | None = None  # FLAV-S/2 … FLAV-XL/8, FLAV-B/1, FLAV-L/1
    model_config: str | None = None  # JSON file with FLAV constructor keys
    init: str | None = None  # preset / repo id / folder to fine-tune
    autoencoder: str | None = None  # repo id, folder or "none" (pixel space)
    vocoder: str | None = None  # folder with config.json + vocoder.pt, "none" (Griffin-Lim); None: dance's
    image_size: int | None = None
    window: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    weight_decay: float | None = None
    grad_clip: float | None = None
    ema_decay: float | None = None
    max_steps: int | None = None
    save_every: int | None = None
    keep: int | None = None
    sample_every: int | None = None
    sample_frames: int | None = None
    log_every: int | None = None
    weighting: str | None = None
    audio_scale: float | None = None  # None after resolution too: estimated from the data
    missing_audio: str | None = None
    seed: int | None = None
    device: str | None = None
    grad_ckpt: bool | None = None
    compile: bool | None = None
    num_workers: int | None = None

    @property
    def pixel_space(self) -> bool:
        return (self.autoencoder or "").lower() == "none"


TRAIN_DEFAULTS: dict[str, Any] = dict(
    autoencoder=TRAIN_DEFAULT_AUTOENCODER,
    image_size=256,
    window=10,
    batch_size=8,
    lr=1e-4,
    weight_decay=0.02,
    grad_clip=1.0,
    ema_decay=0.9999,
    max_steps=100_000,
    save_every=1000,
    keep=3,
    sample_every=0,
    sample_frames=40,
    log_every=10,
    weighting="logit_normal",
    missing_audio="skip",
    seed=0,
    device="auto",
    grad_ckpt=False,
    compile=False,
    num_workers=2,
)
TRAIN_DEFAULT_SIZE = "FLAV-B/1"  # when neither --model-config nor --init gives the model

# Settings that define the model or the meaning of its inputs: a resumed run keeps them.
# Everything else (steps, learning rate, batch size, saving, data folder, vocoder, device,
# seed, loss weighting …) may change when a run is resumed, and the change is printed.
RESUME_FIXED = ("size", "model_config", "init", "autoencoder", "image_size", "window", "audio_scale")


@dataclass
class TrainFile:
    """Settings that a file given to `rflav train` implies: a FLAV config (constructor keys)
    and rflav.json-like facts (image_size, autoencoder, pixel_space, audio_scale)."""

    name: str  # how messages name it, e.g. "tiny.json"
    model: dict[str, Any]
    facts: dict[str, Any]


def _positive(cfg: TrainConfig, name: str, minimum: float = 1, strictly: bool = False) -> None:
    value = getattr(cfg, name)
    if value is None:
        return
    number_ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not number_ok or (value <= minimum if strictly else value < minimum):
        bound = f"greater than {minimum:g}" if strictly else f"at least {minimum:g}"
        raise UsageError(f"{{{name}}} must be {bound}, got {value}", params=(name,))


def check_output_folder(path: str | os.PathLike[str], param: str) -> None:
    """A folder to write in (made if missing): not a file, nor below one, and writable."""
    folder = Path(path).expanduser()
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"{{{param}}} {path} is a file: give a folder", params=(param,))
    reason = unwritable_reason(folder)
    if reason:
        made = "" if folder.exists() else " cannot be made"
        raise UsageError(f"{{{param}}} {path}{made}: {reason}", params=(param,))


def check_train_config(cfg: TrainConfig) -> None:
    """Checks of a train request that need neither torch nor the data: value ranges, choices,
    the flags that exclude each other, the --model-config and --vocoder files, and every flag
    given against the files given with it. Raises UsageError / TrainError / FileFormatError."""
    for name in (
        "image_size",
        "window",
        "batch_size",
        "max_steps",
        "save_every",
        "sample_frames",
        "log_every",
    ):
        _positive(cfg, name)
    for name in ("keep", "sample_every", "num_workers", "weight_decay"):
        _positive(cfg, name, minimum=0)
    if cfg.seed is not None:
        check_seed(cfg.seed, limit=TRAIN_MAX_SEED)
    for name in ("lr", "audio_scale", "grad_clip"):
        _positive(cfg, name, minimum=0, strictly=True)
    if cfg.ema_decay is not None and not (0 <= cfg.ema_decay < 1):
        raise UsageError(f"ema_decay must be in [0, 1), got {cfg.ema_decay}")
    if cfg.weighting is not None and cfg.weighting not in TRAIN_WEIGHTINGS:
        raise UsageError(
            f"unknown {{weighting}} {cfg.weighting!r}: use {' or '.join(TRAIN_WEIGHTINGS)}",
            params=("weighting",),
        )
    if cfg.missing_audio is not None and cfg.missing_audio not in MISSING_AUDIO_CHOICES:
        raise UsageError(
            f"unknown {{missing_audio}} {cfg.missing_audio!r}: use {' or '.join(MISSING_AUDIO_CHOICES)}",
            params=("missing_audio",),
        )
    if cfg.device is not None:
        check_device(cfg.device)
    if cfg.size is not None and cfg.size not in FLAV_SIZES:
        raise UsageError(
            f"unknown {{size}} {cfg.size!r}: choose one of {', '.join(FLAV_SIZES)}", params=("size",)
        )
    given = [name for name in ("size", "model_config", "init") if getattr(cfg, name) is not None]
    if len(given) > 1:
        raise UsageError(
            f"{{{given[0]}}} and {{{given[1]}}} both define the model: give one of them",
            params=tuple(given[:2]),
        )
    if not Path(cfg.data).exists():
        raise TrainError(
            f"{cfg.data}: no such folder: give the folder with train/ videos or a cache from `rflav prepare`"
        )
    check_output_folder(cfg.output, "output")
    check_vocoder_folder(cfg.vocoder)
    resolve_train_config(cfg, [read_model_config(cfg.model_config)] if cfg.model_config else [])


def check_vocoder_folder(vocoder: str | None) -> Path | None:
    """The vocoder folder asked for (None for the default or for "none"), checked."""
    if vocoder is None or vocoder.lower() == "none":
        return None
    folder = Path(vocoder).expanduser()
    if (folder / "vocoder").is_dir():
        folder = folder / "vocoder"
    missing = [name for name in ("config.json", "vocoder.pt") if not (folder / name).is_file()]
    if missing:
        raise TrainError(
            f"{{vocoder}} {vocoder}: no {' or '.join(missing)} there: give a folder with config.json "
            "and vocoder.pt (or a checkpoint with vocoder/), or none for Griffin-Lim",
            params=("vocoder",),
        )
    return folder


def read_model_config(path: str | os.PathLike[str]) -> TrainFile:
    """A --model-config file: a JSON object of FLAV constructor keys, checked."""
    path = Path(path)
    if not path.is_file():
        raise TrainError(f"{{model_config}} {path}: no such file", params=("model_config",))
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FileFormatError(
            f"{path} is not valid JSON ({exc}): fix it (keys as in a checkpoint's config.json)"
        ) from None
    if not isinstance(data, dict):
        raise FileFormatError(f"{path} must hold a JSON object of model settings (keys as in config.json)")
    unknown = sorted(set(data) - set(_MODEL_KEYS))
    if unknown:
        raise FileFormatError(
            f"{path}: unknown key {', '.join(unknown)}; the keys are {', '.join(_MODEL_KEYS)}"
        )
    for key, value in data.items():
        problem = flav_config_problem(key, value)
        if problem is not None:
            raise FileFormatError(f"{path}: {problem}")
    heads, hidden = data.get("num_heads"), data.get("hidden_size")
    if heads and hidden and hidden % heads:
        raise FileFormatError(f"{path}: hidden_size {hidden} is not a multiple of num_heads {heads}")
    return TrainFile(str(path), data, {})


def checkpoint_file(
    name: str, config: dict[str, Any], side: dict[str, Any], audio_scale: float | None
) -> TrainFile:
    """What an --init checkpoint implies: its config.json and its rflav.json (or preset)."""
    facts = {k: side[k] for k in ("image_size", "autoencoder", "pixel_space") if side.get(k) is not None}
    if audio_scale is not None:
        facts["audio_scale"] = audio_scale
    # Its grad_ckpt was a memory setting of its own training, not part of the model.
    return TrainFile(name, {k: v for k, v in config.items() if k in _ARCHITECTURE_KEYS}, facts)


def cache_file(name: str, header: dict[str, Any]) -> TrainFile:
    """What a latent cache from `rflav prepare` implies: its image size and autoencoder."""
    facts: dict[str, Any] = {"image_size": header.get("image_size"), "pixel_space": False}
    if header.get("autoencoder"):
        facts["autoencoder"] = header["autoencoder"]
    return TrainFile(name, {}, {k: v for k, v in facts.items() if v is not None})


def _same(name: str, a: Any, b: Any) -> bool:
    if name == "audio_scale":
        return math.isclose(float(a), float(b), rel_tol=1e-5)
    if (
        name in ("autoencoder", "data", "model_config", "vocoder", "init")
        and isinstance(a, str)
        and isinstance(b, str)
    ):
        if a.lower() == "none" or b.lower() == "none":
            return a.lower() == b.lower()
        return a == b or Path(a).expanduser().resolve() == Path(b).expanduser().resolve()
    return a == b


def _settle(name: str, asked: Any, found: list[tuple[Any, str]]) -> Any:
    """One setting: the value asked for, checked against what each file says; else the files'
    (which must agree); else None."""
    for value, where in found:
        if asked is not None and not _same(name, asked, value):
            raise TrainError(
                f"{{{name}}} {asked} contradicts {where}: leave {{{name}}} out to take the file's "
                "value, or make the two agree",
                params=(name,),
            )
    for (value, where), (other, other_where) in zip(found, found[1:]):
        if not _same(name, value, other):
            raise TrainError(f"{where} contradicts {other_where}: make them agree")
    if asked is not None:
        return asked
    return found[0][0] if found else None


def resolve_train_config(cfg: TrainConfig, files: list[TrainFile], defaults: bool = False) -> TrainConfig:
    """`cfg` with the settings that the given files imply filled in (and, with ``defaults``,
    every setting still unset taking its built-in default). A value asked for that contradicts
    a file, or two files that contradict each other, raise TrainError naming both."""
    pixel_found, names_found = [], []
    for f in files:
        if "in_channels" in f.model:
            channels = f.model["in_channels"]
            if channels not in (3, 4):
                raise FileFormatError(
                    f"in_channels {channels!r} in {f.name}: use 3 (pixel space) or 4 (VAE latents)"
                )
            pixel_found.append((channels == 3, f"in_channels {channels} in {f.name}"))
        if "pixel_space" in f.facts:
            pixel_found.append(
                (
                    bool(f.facts["pixel_space"]),
                    f"pixel_space {str(f.facts['pixel_space']).lower()} in {f.name}",
                )
            )
        if f.facts.get("autoencoder"):
            names_found.append((f.facts["autoencoder"], f"autoencoder {f.facts['autoencoder']} in {f.name}"))
    asked_pixel = None if cfg.autoencoder is None else cfg.pixel_space
    space = {True: "none (pixel space)", False: "a VAE (latent space)"}
    for pixel, where in pixel_found:
        if asked_pixel is not None and pixel != asked_pixel:
            raise TrainError(
                f"{{autoencoder}} {cfg.autoencoder} contradicts {where}, which means "
                f"{{autoencoder}} {space[pixel]}: leave {{autoencoder}} out or make them agree",
                params=("autoencoder",),
            )
    _settle("pixel_space", None, pixel_found)  # files must agree with each other
    pixel = asked_pixel if asked_pixel is not None else (pixel_found[0][0] if pixel_found else None)
    autoencoder = cfg.autoencoder
    if autoencoder is None and pixel:
        autoencoder = "none"
    elif not pixel:
        autoencoder = _settle("autoencoder", autoencoder, names_found)
    if autoencoder is None and defaults:
        autoencoder = TRAIN_DEFAULTS["autoencoder"]
    pixel = (autoencoder or "").lower() == "none"

    window_found, size_found, found = [], [], {}
    for f in files:
        if "predict_frames" in f.model:
            window_found.append(
                (f.model["predict_frames"], f"predict_frames {f.model['predict_frames']} in {f.name}")
            )
        if "latent_size" in f.model:
            latent = f.model["latent_size"]
            size_found.append(
                (latent if pixel else latent * VAE_DOWNSCALE, f"latent_size {latent} in {f.name}")
            )
        if "image_size" in f.facts:
            size_found.append((f.facts["image_size"], f"image_size {f.facts['image_size']} in {f.name}"))
        if "audio_scale" in f.facts:
            found.setdefault("audio_scale", []).append(
                (f.facts["audio_scale"], f"audio_scale {f.facts['audio_scale']:g} of {f.name}")
            )
    values = {
        "autoencoder": autoencoder,
        "window": _settle("window", cfg.window, window_found),
        "image_size": _settle("image_size", cfg.image_size, size_found),
        "audio_scale": _settle("audio_scale", cfg.audio_scale, found.get("audio_scale", [])),
        # A memory/speed knob, not a property of the model: a --model-config value is only a default.
        "grad_ckpt": cfg.grad_ckpt
        if cfg.grad_ckpt is not None
        else next((f.model["grad_ckpt"] for f in files if "grad_ckpt" in f.model), None),
    }
    out = replace(cfg, **values)
    if defaults:
        out = replace(out, **{k: v for k, v in TRAIN_DEFAULTS.items() if getattr(out, k) is None})
        if out.size is None and out.model_config is None and out.init is None:
            out = replace(out, size=TRAIN_DEFAULT_SIZE)
    _check_image_size(out, files)
    return out


def _check_image_size(cfg: TrainConfig, files: list[TrainFile]) -> None:
    if cfg.image_size is None:
        return
    if not cfg.pixel_space and cfg.image_size % VAE_DOWNSCALE:
        raise UsageError(
            f"{{image_size}} {cfg.image_size} must be a multiple of {VAE_DOWNSCALE} with a VAE "
            "(or train in pixel space with {autoencoder} none)",
            params=("image_size", "autoencoder"),
        )
    latent = cfg.image_size if cfg.pixel_space else cfg.image_size // VAE_DOWNSCALE
    patch = next((f.model["patch_size"] for f in files if "patch_size" in f.model), None)
    if patch is None and cfg.size is not None:
        patch = FLAV_SIZES[cfg.size]["patch_size"]
    if patch and latent % patch:
        raise UsageError(
            f"{{image_size}} {cfg.image_size} gives {latent}x{latent} latents, which patch size "
            f"{patch} does not divide: choose a multiple of {patch * VAE_DOWNSCALE}",
            params=("image_size",),
        )


def saved_train_config(saved: dict[str, Any]) -> TrainConfig:
    """The resolved TrainConfig stored in a checkpoint's training state (older runs included)."""
    data = dict(saved)
    if "model" in data and "size" not in data:  # before the size option was called --size
        data["size"] = data.pop("model")
    known = {f.name for f in fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in data.items() if k in known})


def _shown(value: Any) -> str:
    if value is None:
        return "(none)"
    return f"{value:g}" if isinstance(value, float) else str(value)


def resume_train_config(
    cfg: TrainConfig, saved: dict[str, Any], saved_model: dict[str, Any], saved_audio_scale: float, where: str
) -> tuple[TrainConfig, list[tuple[str, str, str]]]:
    """The settings of a resumed run: the saved run's, with what this request asks for.

    A request that asks for another model or other inputs (RESUME_FIXED) raises TrainError
    listing every difference (saved → asked); the other changes are returned as
    (parameter, saved, asked) for the caller to print."""
    files = [read_model_config(cfg.model_config)] if cfg.model_config else []
    asked = resolve_train_config(cfg, files)
    before = saved_train_config(saved)
    if before.audio_scale is None:
        before = replace(before, audio_scale=saved_audio_scale)
    # The saved model is the authority on its window and input size (older runs stored the
    # --image-size default even when a latent cache set the size).
    latent = saved_model.get("latent_size")
    pixel = saved_model.get("in_channels") == 3
    before = replace(
        before,
        window=saved_model.get("predict_frames", before.window),
        image_size=before.image_size if latent is None else latent * (1 if pixel else VAE_DOWNSCALE),
    )
    differ: list[str] = []
    params: list[str] = []
    wanted: dict[str, Any] = {}
    if asked.size is not None:
        wanted = {k: v for k, v in FLAV_SIZES[asked.size].items()}
        source = f"{{size}} {asked.size}"
        params.append("size")
    elif files:
        wanted = {k: v for k, v in files[0].model.items() if k in _ARCHITECTURE_KEYS}
        source = f"{{model_config}} {cfg.model_config}"
        params.append("model_config")
    changed = [f"{k} {saved_model.get(k)} → {v}" for k, v in wanted.items() if saved_model.get(k) != v]
    if changed:
        differ.append(f"the model ({', '.join(changed)} with {source})")
    else:
        params.clear()
    for name in RESUME_FIXED:
        if name in ("size", "model_config"):
            continue
        now, then = getattr(asked, name), getattr(before, name)
        if now is not None and not (then is not None and _same(name, now, then)):
            differ.append(f"{{{name}}} {_shown(then)} → {_shown(now)}")
            params.append(name)
    if differ:
        params.append("output")
        raise TrainError(
            f"{where} was trained with other settings (saved → asked): {'; '.join(differ)}: to resume, "
            "repeat the saved values or leave those options out; to start a new run, give another "
            "{output}",
            params=tuple(params),
        )
    notes: list[tuple[str, str, str]] = []
    merged = before
    for f in fields(TrainConfig):
        name = f.name
        if name in RESUME_FIXED or name == "output":
            continue
        now, then = getattr(asked, name), getattr(before, name)
        if now is None:
            continue
        if not (then is not None and _same(name, now, then)):
            notes.append((name, _shown(then), _shown(now)))
        merged = replace(merged, **{name: now})
    merged = replace(merged, output=cfg.output)
    merged = resolve_train_config(merged, [], defaults=True)
    return merged, notes


def check_prepare_request(
    image_size: int,
    batch_size: int,
    missing_audio: str,
    device: str = "auto",
    output: str | os.PathLike[str] | None = None,
) -> None:
    """Checks of `rflav prepare` that need no torch (the VAE halves the image three times)."""
    check_device(device)
    if output is not None:
        check_output_folder(output, "output")
    if image_size < VAE_DOWNSCALE or image_size % VAE_DOWNSCALE:
        raise UsageError(
            f"{{image_size}} must be a positive multiple of {VAE_DOWNSCALE}, got {image_size}",
            params=("image_size",),
        )
    if batch_size < 1:
        raise UsageError(f"{{batch_size}} must be at least 1, got {batch_size}", params=("batch_size",))
    if missing_audio not in MISSING_AUDIO_CHOICES:
        raise UsageError(
            f"unknown {{missing_audio}} {missing_audio!r}: use {' or '.join(MISSING_AUDIO_CHOICES)}",
            params=("missing_audio",),
        )


# ----------------------------------------------------------------------------------------
# rflav eval and rflav drift
# ----------------------------------------------------------------------------------------


EVAL_PROTOCOLS = ("mmdiffusion",)
EVAL_METRICS = ("fvd", "kvd", "fad")
EVAL_VIDEO_METRICS = ("fvd", "kvd")  # computed from I3D features
EVAL_AUDIO_METRICS = ("fad",)  # computed from AudioCLIP features
EVAL_CLIP_FRAMES = 16  # metrics.protocol.CLIP_FRAMES (that module imports torch)
EVAL_DEFAULT_NUM_CLIPS = 2048
EVAL_DEFAULT_BATCH_SIZE = 8
STATS_SUFFIX = ".npz"


class EvalError(RflavError, ValueError):
    """Bad evaluation input (a set, a statistics file, the flags), reported as one line."""


def parse_metrics(text: str | Sequence[str]) -> tuple[str, ...]:
    """Metric names from a comma list ("fvd,fad") or a sequence: lower-cased, in the given order,
    each once."""
    items = text.split(",") if isinstance(text, str) else list(text)
    names: list[str] = []
    for item in items:
        name = str(item).strip().lower()
        if not name:
            continue
        if name not in EVAL_METRICS:
            raise UsageError(
                f"unknown metric {name!r} in {{metrics}}: choose from {', '.join(EVAL_METRICS)}",
                params=("metrics",),
            )
        if name not in names:
            names.append(name)
    if not names:
        raise UsageError(
            f"{{metrics}} names no metric: give a comma list of {', '.join(EVAL_METRICS)}",
            params=("metrics",),
        )
    return tuple(names)


@dataclass
class EvalRequest:
    """Everything `rflav eval` can be asked; defaults match the CLI's."""

    real: Path  # folder of real videos, or a statistics .npz
    fake: Path | None = None  # folder of generated videos (or model, below)
    metrics: tuple[str, ...] = EVAL_METRICS
    num_clips: int = EVAL_DEFAULT_NUM_CLIPS
    seed: int = 0  # seed of the clip selection when a set has more clips
    clip_stride: int = 1
    protocol: str = "mmdiffusion"
    letterbox_antialias: bool = True
    allow_fewer: bool = False
    i3d_weights: str | None = None
    audioclip_weights: str | None = None
    save_real_stats: Path | None = None
    device: str = "auto"
    offline: bool = False
    # Generate the fake set first from this checkpoint (instead of fake):
    model: str | None = None
    label: str | None = None  # one class of a class-conditional model (None: every class)
    vae: str | None = None  # the SD-VAE of a latent model whose rflav.json names none
    num_samples: int | None = None  # None: num_clips
    batch_size: int | None = None  # None: EVAL_DEFAULT_BATCH_SIZE
    gen_seed: int = 0
    fake_out: Path | None = None  # None: a temporary folder
    quiet: bool = False


@dataclass
class DriftRequest:
    """Everything `rflav drift` can be asked; defaults match the CLI's."""

    fake: Path  # folder of long generated videos
    real: Path  # folder of real videos, or a statistics .npz
    window: int = EVAL_CLIP_FRAMES
    stride: int = 8
    num_clips: int = EVAL_DEFAULT_NUM_CLIPS
    seed: int = 0
    metrics: tuple[str, ...] = EVAL_METRICS
    letterbox_antialias: bool = True
    allow_fewer: bool = True
    i3d_weights: str | None = None
    audioclip_weights: str | None = None
    device: str = "auto"
    offline: bool = False
    output: Path = Path("drift")
    quiet: bool = False


def _at_least(value: int, minimum: int, param: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise UsageError(
            f"{{{param}}} must be an integer of at least {minimum}, got {value!r}", params=(param,)
        )


def is_stats_file(path: Path) -> bool:
    """Whether `path` names saved real-set statistics (an existing .npz file)."""
    return Path(path).is_file() and Path(path).suffix.lower() == STATS_SUFFIX


def _check_real(real: Path) -> None:
    path = Path(real)
    if path.is_dir() or is_stats_file(path):
        return
    what = "is a file but not a statistics .npz" if path.exists() else "no such folder or file"
    raise UsageError(
        f"{{real}} {real}: {what}: give a folder of real videos or a .npz written by {{save_real_stats}}",
        params=("real", "save_real_stats"),
    )


def _check_common(metrics: Sequence[str], device: str, seed: int, num_clips: int) -> None:
    parse_metrics(metrics)
    _at_least(num_clips, 2, "num_clips")
    _at_least(seed, 0, "seed")
    check_device(device)


def check_eval_request(req: EvalRequest) -> None:
    """Every check of an eval request that needs neither torch nor the videos: bad values and
    flags that exclude each other fail here with one line."""
    if req.protocol not in EVAL_PROTOCOLS:
        raise UsageError(
            f"unknown {{protocol}} {req.protocol!r}: only {', '.join(EVAL_PROTOCOLS)} is implemented",
            params=("protocol",),
        )
    _check_common(req.metrics, req.device, req.seed, req.num_clips)
    _at_least(req.clip_stride, 1, "clip_stride")
    _check_real(req.real)
    if req.fake is not None and req.model is not None:
        raise UsageError(
            "give either {fake} (generated videos) or {model} (a checkpoint to generate them from), not both",
            params=("fake", "model"),
        )
    if req.fake is None and req.model is None:
        raise UsageError(
            "give {fake} (a folder of generated videos) or {model} (a checkpoint to generate them from now)",
            params=("fake", "model"),
        )
    if req.fake is not None and not Path(req.fake).is_dir():
        what = (
            "is a file: give the folder that holds the generated videos"
            if Path(req.fake).exists()
            else "no such folder"
        )
        raise UsageError(f"{{fake}} {req.fake}: {what}", params=("fake",))
    if req.model is None:
        for param in ("num_samples", "batch_size", "fake_out", "label", "vae"):
            if getattr(req, param) is not None:
                raise UsageError(
                    f"{{{param}}} only applies with {{model}} (generating the fake set)",
                    params=(param, "model"),
                )
    else:
        if req.num_samples is not None:
            _at_least(req.num_samples, 2, "num_samples")
        if req.batch_size is not None:
            _at_least(req.batch_size, 1, "batch_size")
        if req.fake_out is not None and Path(req.fake_out).exists() and not Path(req.fake_out).is_dir():
            raise UsageError(f"{{fake_out}} {req.fake_out} is a file: give a folder", params=("fake_out",))
    if req.save_real_stats is not None:
        stats = Path(req.save_real_stats)
        if is_stats_file(req.real):
            raise UsageError(
                f"{{real}} {req.real} already is a statistics file: {{save_real_stats}} saves the "
                "features of a folder of real videos",
                params=("real", "save_real_stats"),
            )
        if stats.suffix.lower() != STATS_SUFFIX:
            raise UsageError(
                f"{{save_real_stats}} {stats}: the name must end in {STATS_SUFFIX} (so that {{real}} "
                "recognises it)",
                params=("save_real_stats", "real"),
            )
        if stats.is_dir():
            raise UsageError(
                f"{{save_real_stats}} {stats} is a folder: give a file name ending in {STATS_SUFFIX}",
                params=("save_real_stats",),
            )


def drift_output_paths(output: Path) -> tuple[Path, Path]:
    """The CSV and PNG that drift writes for `output`: OUTPUT.csv and OUTPUT.png, where a .csv or
    .png ending of OUTPUT is dropped first (any other ending stays part of the name), or
    drift.csv and drift.png inside OUTPUT when it is an existing folder."""
    out = Path(output).expanduser()
    if out.is_dir():
        out = out / "drift"
    elif out.suffix.lower() in (".csv", ".png"):
        out = out.with_suffix("")
    return out.with_name(out.name + ".csv"), out.with_name(out.name + ".png")


def check_drift_request(req: DriftRequest) -> None:
    """Every check of a drift request that needs neither torch nor the videos."""
    _check_common(req.metrics, req.device, req.seed, req.num_clips)
    if req.window != EVAL_CLIP_FRAMES:
        raise UsageError(
            f"{{window}} must be {EVAL_CLIP_FRAMES} frames for the mmdiffusion protocol, got {req.window}",
            params=("window",),
        )
    _at_least(req.stride, 1, "stride")
    _check_real(req.real)
    if not Path(req.fake).is_dir():
        what = (
            "is a file: give the folder that holds the long generated videos"
            if Path(req.fake).exists()
            else "no such folder"
        )
        raise UsageError(f"{{fake}} {req.fake}: {what}", params=("fake",))
    for path in drift_output_paths(req.output):
        if path.is_dir():
            raise UsageError(
                f"{{output}} would write {path}, which is a folder: choose another {{output}}",
                params=("output",),
            )
