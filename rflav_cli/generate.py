"""`rflav generate` as a library call: validate, load, stream frames into MP4 files.

The CLI only parses flags into :class:`GenerateRequest` and calls :func:`run_generate`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, Progress, ProgressColumn, Task, TextColumn, TimeElapsedColumn
from rich.text import Text

from . import __version__
from .config import FPS, SAMPLE_RATE
from .errors import UsageError
from .hub import PRESETS, is_repo_id
from .media import MediaError, VideoWriter, WavWriter, find_ffmpeg, probe, read_audio, read_video_frames
from .pipeline import (AVFrame, Pipeline, auto_compile, compile_failure_message, compile_failure_reason,
                       is_compile_error, pick_device, pick_dtype)


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
    compile: bool | None = None         # None: auto_compile decides from the device and length
    output: Path | None = None
    overwrite: bool = False
    wav: bool = False
    quiet: bool = False


DEFAULT_SECONDS = 10.0


# ----------------------------------------------------------------------------------------
# Validation (before anything heavy is loaded)
# ----------------------------------------------------------------------------------------


def _model_and_label(req: GenerateRequest) -> tuple[str, str | None]:
    """`--class dance` alone means the dance preset; with --model it names a class."""
    if req.model is None:
        if req.label is None:
            return "dance", None
        if req.label in PRESETS:
            return req.label, None
        raise UsageError(
            f"unknown class {req.label!r}: choose one of {', '.join(PRESETS)} "
            "(or pass --model CHECKPOINT to use the classes of a class-conditional checkpoint)"
        )
    if req.label in PRESETS and req.label == req.model:
        return req.model, None
    return req.model, req.label


def _frame_count(req: GenerateRequest, given_frames: int | None) -> int | None:
    chosen = [name for name, value in (("--seconds", req.seconds), ("--frames", req.frames)) if value is not None]
    if req.forever and chosen:
        raise UsageError(f"--forever cannot be combined with {chosen[0]}")
    if len(chosen) > 1:
        raise UsageError("give either --seconds or --frames, not both")
    if req.forever:
        return None
    if req.seconds is not None:
        if not math.isfinite(req.seconds) or req.seconds <= 0:
            raise UsageError(f"--seconds must be a positive number, got {req.seconds}")
        return max(1, round(req.seconds * FPS))
    if req.frames is not None:
        if req.frames < 1:
            raise UsageError(f"--frames must be at least 1, got {req.frames}")
        return req.frames
    if given_frames is not None:
        return given_frames
    return round(DEFAULT_SECONDS * FPS)


def _output_paths(req: GenerateRequest, name: str, seeds: list[int]) -> list[Path]:
    stem = Path(name.rstrip("/")).name or "rflav"
    if len(seeds) == 1:
        out = req.output or Path(f"{stem}-seed{seeds[0]}.mp4")
        if out.is_dir():
            out = out / f"{stem}-seed{seeds[0]}.mp4"
        elif out.suffix.lower() != ".mp4":
            out = out.with_name(out.name + ".mp4")
        paths = [out]
    else:
        folder = req.output or Path(f"{stem}-samples")
        if folder.suffix.lower() == ".mp4":
            raise UsageError(f"--num-samples {len(seeds)} writes several files: give --output a folder, not {folder}")
        paths = [folder / f"{stem}-seed{s}.mp4" for s in seeds]
    for path in paths:
        targets = [path, path.with_suffix(".json")] + ([path.with_suffix(".wav")] if req.wav else [])
        for target in targets:
            if target.exists() and not req.overwrite:
                raise UsageError(f"{target} already exists: choose another --output or pass --overwrite")
        folder = path.parent
        existing = folder
        while not existing.exists():
            existing = existing.parent
        if not existing.is_dir() or not os.access(existing, os.W_OK):
            raise UsageError(f"cannot write to {folder}: choose a writable --output")
    return paths


def validate(req: GenerateRequest) -> None:
    """Reject bad flags with one clear line (UsageError) before any model is loaded."""
    if req.steps < 1:
        raise UsageError(f"--steps must be at least 1, got {req.steps}")
    if req.num_samples < 1:
        raise UsageError(f"--num-samples must be at least 1, got {req.num_samples}")
    if req.batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {req.batch_size}")
    if req.audio_scale is not None and not (math.isfinite(req.audio_scale) and req.audio_scale > 0):
        raise UsageError(f"--audio-scale must be a positive number, got {req.audio_scale}")
    if req.audio_input is not None and req.video_input is not None:
        raise UsageError("give either --audio or --video, not both")
    if req.forever and req.num_samples > 1:
        raise UsageError("--forever writes one stream: drop --num-samples")
    if req.model is not None and req.model not in PRESETS and not Path(req.model).is_dir() and not is_repo_id(req.model):
        raise UsageError(f"--model {req.model}: not a preset ({', '.join(PRESETS)}), a local folder or a Hub repo id")
    try:
        find_ffmpeg()
    except MediaError as err:
        raise UsageError(str(err)) from None
    for flag, path, stream in (("--audio", req.audio_input, "audio"), ("--video", req.video_input, "video")):
        if path is None:
            continue
        if not Path(path).is_file():
            raise UsageError(f"{flag} {path}: no such file")
        info = probe(path)
        if not (info.has_audio if stream == "audio" else info.has_video):
            raise UsageError(f"{flag} {path} has no {stream} stream")
    pick_dtype(req.dtype, pick_device(req.device))


# ----------------------------------------------------------------------------------------
# Progress
# ----------------------------------------------------------------------------------------


class _RateColumn(ProgressColumn):
    """frames/s and the real-time factor (video seconds per wall second)."""

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        if not speed:
            return Text("-- frames/s", style="progress.data.speed")
        return Text(f"{speed:5.2f} frames/s  {speed / FPS:4.2f}× real time", style="progress.data.speed")


class _EtaColumn(ProgressColumn):
    def render(self, task: Task) -> Text:
        if task.total is None:
            return Text("Ctrl-C to stop", style="progress.remaining")
        remaining = task.time_remaining
        if remaining is None:
            return Text("ETA --:--", style="progress.remaining")
        minutes, secs = divmod(int(remaining), 60)
        hours, minutes = divmod(minutes, 60)
        return Text(f"ETA {hours:d}:{minutes:02d}:{secs:02d}", style="progress.remaining")


def _progress(console: Console, quiet: bool) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.completed:>5.0f}/{task.fields[total_text]} frames"),
        _RateColumn(),
        TimeElapsedColumn(),
        _EtaColumn(),
        console=console,
        disable=quiet,
        transient=False,
    )


# ----------------------------------------------------------------------------------------
# Stop requests (Ctrl-C, SIGTERM)
# ----------------------------------------------------------------------------------------


@contextmanager
def _stop_on_signals() -> Iterator[threading.Event]:
    """First Ctrl-C / SIGTERM asks for a clean stop; a second one interrupts at once."""
    stop = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def handler(signum, frame):
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


# ----------------------------------------------------------------------------------------
# Run
# ----------------------------------------------------------------------------------------


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


class _Outputs:
    """The MP4 (and optional WAV) writers of one batch."""

    def __init__(self, paths: list[Path], wav: bool, overwrite: bool, size: int) -> None:
        self.paths = paths
        self.videos: list[VideoWriter] = []
        self.wavs: list[WavWriter] = []
        try:
            for path in paths:
                path.parent.mkdir(parents=True, exist_ok=True)
                self.videos.append(VideoWriter(path, width=size, height=size, overwrite=overwrite))
                if wav:
                    self.wavs.append(WavWriter(path.with_suffix(".wav"), SAMPLE_RATE, overwrite=overwrite))
        except BaseException:
            self.abort()
            raise

    def write(self, frame: AVFrame) -> None:
        for i, writer in enumerate(self.videos):
            writer.write(frame.video[i : i + 1], frame.audio[i])
        for i, writer in enumerate(self.wavs):
            writer.write(frame.audio[i])

    def close(self) -> None:
        for writer in [*self.videos, *self.wavs]:
            writer.close()

    def abort(self) -> None:
        for writer in [*self.videos, *self.wavs]:
            writer.abort()


def run_generate(req: GenerateRequest, console: Console | None = None) -> list[dict]:
    """Generate every requested sample; return one summary per written MP4."""
    console = console or Console(stderr=True)
    validate(req)
    model_name, label = _model_and_label(req)

    given_audio = read_audio(req.audio_input) if req.audio_input is not None else None
    given_frames = None
    if given_audio is not None:
        given_frames = max(1, round(len(given_audio) / SAMPLE_RATE * FPS))
    elif req.video_input is not None:
        duration = probe(req.video_input).duration
        given_frames = max(1, round(duration * FPS)) if duration else None
    num_frames = _frame_count(req, given_frames)
    seeds = [req.seed + i for i in range(req.num_samples)]
    paths = _output_paths(req, model_name, seeds)

    with console.status(f"loading {model_name}", spinner="dots") if not req.quiet else _null():
        pipe = Pipeline.from_pretrained(model_name, vae=req.vae, revision=req.revision, offline=req.offline or None,
                                        audio_scale=req.audio_scale, device=req.device, dtype=req.dtype,
                                        compile=_wants_compile(req, num_frames, given_audio is not None))
    if pipe.model.num_classes <= 0 and req.cfg_scale is not None:
        raise UsageError("--cfg-scale only applies to class-conditional checkpoints; this one is unconditional")
    if pipe.model.num_classes > 0 and label is None:
        raise UsageError(
            "this checkpoint is class-conditional: pass --class with one of "
            + ", ".join(pipe.class_names or [str(i) for i in range(pipe.model.num_classes)])
        )
    pipe.class_index(label)  # unknown class names fail here, before any output is created

    source = pipe.source
    weights_id = {"revision": source.revision} if source and source.revision else {}
    if source and not source.revision:
        weights_id = {"model_sha256": _sha256(Path(source.folder) / "model.safetensors")}

    summaries: list[dict] = []
    with _stop_on_signals() as stop, _progress(console, req.quiet) as progress:
        for start in range(0, len(seeds), req.batch_size):
            batch_seeds = seeds[start : start + req.batch_size]
            batch_paths = paths[start : start + req.batch_size]
            description = batch_paths[0].name if len(batch_paths) == 1 else f"{len(batch_paths)} samples"
            task = progress.add_task(description, total=num_frames,
                                     total_text="∞" if num_frames is None else str(num_frames))
            while True:  # a second round only when compiling on our own initiative failed
                video_iter = (read_video_frames(req.video_input, size=pipe.image_size)
                              if req.video_input is not None else None)
                generation = pipe.generate(num_frames=num_frames, seeds=batch_seeds, steps=req.steps, label=label,
                                           cfg_scale=1.0 if req.cfg_scale is None else req.cfg_scale,
                                           audio=given_audio, video=video_iter, guidance_scale=req.guidance_scale)
                outputs = _Outputs(batch_paths, req.wav, req.overwrite, pipe.image_size)
                began = time.perf_counter()
                written = 0
                interrupted = retry = False
                try:
                    for frame in generation:
                        outputs.write(frame)
                        written += 1
                        progress.update(task, completed=written)
                        if stop.is_set():
                            interrupted = True
                            break
                    if interrupted:
                        for frame in generation.finish():
                            outputs.write(frame)
                            written += 1
                except KeyboardInterrupt:
                    interrupted = True
                except Exception as err:
                    if not (pipe.compile and is_compile_error(err)):
                        raise
                    if req.compile or written:
                        raise UsageError(compile_failure_message(err, asked=bool(req.compile))) from err
                    _without_compiling(pipe, err, console)
                    retry = True
                finally:
                    if written:
                        outputs.close()
                    else:
                        outputs.abort()
                if not retry:
                    break
            progress.update(task, completed=written)
            wall = time.perf_counter() - began
            for i, (seed, path) in enumerate(zip(batch_seeds, batch_paths)):
                if not written:
                    continue
                summary = {
                    "output": str(path),
                    "model": source.source if source else model_name,
                    **weights_id,
                    "vae": pipe.vae_source,
                    "audio_scale": pipe.audio_scale,
                    "class": label,
                    "cfg_scale": req.cfg_scale,
                    "seed": seed,
                    "steps": req.steps,
                    "dtype": str(pipe.dtype).removeprefix("torch."),
                    "device": str(pipe.device),
                    "compiled": pipe.compile,
                    "frames": written,
                    "seconds": written / FPS,
                    "wall_seconds": round(wall, 3),
                    "interrupted": interrupted,
                    "audio_input": str(req.audio_input) if req.audio_input else None,
                    "video_input": str(req.video_input) if req.video_input else None,
                    "guidance_scale": req.guidance_scale,
                    "rflav_version": __version__,
                }
                _write_json(path.with_suffix(".json"), summary)
                summaries.append(summary)
            if interrupted:
                break
    return summaries


def _wants_compile(req: GenerateRequest, num_frames: int | None, audio_given: bool) -> bool:
    if req.compile is not None:
        return req.compile
    return auto_compile(pick_device(req.device), num_frames, guided=audio_given or req.video_input is not None)


def _without_compiling(pipe: Pipeline, err: BaseException, console: Console) -> None:
    """Compiling was our choice, not the user's: say why it failed (--quiet hides progress, not
    this) and go on eagerly."""
    pipe.model.uncompile_blocks()
    pipe.compile = False
    console.print(f"compiling failed ({compile_failure_reason(err)}); continuing without it (--no-compile skips the attempt)",
                  markup=False, highlight=False, soft_wrap=True)


@contextmanager
def _null() -> Iterator[None]:
    yield

