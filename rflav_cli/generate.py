"""`rflav generate` as a library call: validate, load, stream frames into MP4 files.

The CLI only parses flags into :class:`GenerateRequest` and calls :func:`run_generate`.
"""

from __future__ import annotations

import hashlib
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from rich.console import Console
from rich.progress import Progress, ProgressColumn, Task
from rich.text import Text

from . import __version__
from .config import FPS, SAMPLE_RATE
from .errors import UsageError
from .files import atomic_write, write_json
from .hub import PRESETS
from .media import (
    STDOUT,
    OutputClosed,
    VideoWriter,
    WavWriter,
    find_ffmpeg,
    probe,
    read_audio,
    read_video_frames,
    remove_partials,
)
from .pipeline import AVFrame, Pipeline
from .progress import TextColumn, progress_bar
from .requests import (
    GenerateRequest,
    check_generate_request,
    generate_frame_count,
    generate_model_and_label,
    generate_output_paths,
    guidance_scale_used,
    output_is_folder,
)
from .runtime import (
    Dist,
    StopRequest,
    auto_compile,
    compile_failure_message,
    compile_skipped_message,
    init_distributed,
    is_compile_error,
    launched_by_torchrun,
    pick_dtype,
    rank_device,
    stop_on_signals,
)
from .samples import (
    COMPLETE,
    INCOMPLETE,
    MISSING,
    Sample,
    batches_of,
    refuse_if_running,
    sample_state,
    write_manifest,
    write_running_sidecar,
)

__all__ = ["GenerateRequest", "GenerationInterrupted", "run_generate", "validate"]


# ----------------------------------------------------------------------------------------
# Validation (before anything heavy is loaded)
# ----------------------------------------------------------------------------------------


def validate(req: GenerateRequest) -> tuple[torch.device, torch.dtype]:
    """Reject bad flags with one clear line (UsageError) before any model is loaded: the
    torch-free checks of :func:`check_generate_request`, then ffmpeg, the --audio/--video
    streams and the device. Returns the device and precision, resolved once for the run."""
    check_generate_request(req)
    find_ffmpeg()
    for param, path, stream in (
        ("audio_input", req.audio_input, "audio"),
        ("video_input", req.video_input, "video"),
    ):
        if path is None:
            continue
        info = probe(path)
        if not (info.has_audio if stream == "audio" else info.has_video):
            raise UsageError(f"{{{param}}} {path} has no {stream} stream", params=(param,))
    device = rank_device(req.device)  # under torchrun on GPUs, this process's own
    return device, pick_dtype(req.dtype, device)


# ----------------------------------------------------------------------------------------
# Progress
# ----------------------------------------------------------------------------------------


class _RateColumn(ProgressColumn):
    """frames/s and the real-time factor (video seconds per wall second)."""

    def render(self, task: Task) -> Text:
        if not task.fields.get("rate", True):
            return Text("")
        speed = task.finished_speed or task.speed
        if not speed:
            return Text("-- frames/s", style="progress.data.speed")
        return Text(f"{speed:5.2f} frames/s  {speed / FPS:4.2f}× real time", style="progress.data.speed")


def _progress(console: Console, quiet: bool) -> Progress:
    return progress_bar(
        TextColumn("{task.completed:>5.0f}/{task.fields[total_text]}"),
        _RateColumn(),
        console=console,
        enabled=not quiet,
    )


# ----------------------------------------------------------------------------------------
# Interruption
# ----------------------------------------------------------------------------------------


class GenerationInterrupted(KeyboardInterrupt):
    """A run stopped (Ctrl-C, SIGTERM) before it made everything it was asked for.

    What was generated is finalised, playable and has its sidecar (``"interrupted": true``);
    `summaries` are those of the files written. `exit_code` is 128 + the signal number."""

    def __init__(self, message: str, summaries: list[dict], signum: int = signal.SIGINT) -> None:
        super().__init__(message)
        self.message = message
        self.summaries = summaries
        self.exit_code = 128 + int(signum)

    def __str__(self) -> str:
        return self.message


def _interrupted_message(summaries: list[dict], num_frames: int | None, num_samples: int) -> str:
    short = [s for s in summaries if s["interrupted"]]
    complete = len(summaries) - len(short)
    if short:
        files = ", ".join(s["output"] for s in short)
        total = "" if num_frames is None else f" of {num_frames}"
        if files == STDOUT:
            parts = [f"{short[0]['frames']}{total} frames streamed to standard output (finalised)"]
        else:
            parts = [
                f"{short[0]['frames']}{total} frames written to {files} (finalised and playable; "
                "its .json says interrupted)"
            ]
    else:
        parts = ["stopped before the first frame of " + ("the stream" if num_frames is None else "the batch")]
    if complete:
        parts.append(f"{complete} complete sample{'s' if complete > 1 else ''} before")
    if len(summaries) < num_samples:
        parts.append(f"{num_samples - len(summaries)} of {num_samples} samples not generated")
    return "interrupted: " + "; ".join(parts)


# ----------------------------------------------------------------------------------------
# Run
# ----------------------------------------------------------------------------------------


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# Runs longer than this write files that are playable under their final name while they grow.
LIVE_FILE_AFTER_FRAMES = 60 * FPS


def _is_stdout(path: Path) -> bool:
    return str(path) == STDOUT


class _Outputs:
    """The MP4 (and optional WAV) writers of one batch. `live`: files playable while they grow.
    A player that closes standard output ends the run: `reader_left` says so."""

    def __init__(self, paths: list[Path], wav: bool, overwrite: bool, size: int, live: bool = False) -> None:
        self.paths = paths
        self.videos: list[VideoWriter] = []
        self.wavs: list[WavWriter] = []
        self.reader_left = False
        try:
            for path in paths:
                if _is_stdout(path):
                    self.videos.append(VideoWriter(STDOUT, width=size, height=size))
                    continue
                path.parent.mkdir(parents=True, exist_ok=True)
                self.videos.append(VideoWriter(path, width=size, height=size, overwrite=overwrite, live=live))
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
        """Finish every file; when one cannot be finished, none is kept (a failed batch leaves
        no file, whole or partial) and its writer's error is raised."""
        closed: list[VideoWriter | WavWriter] = []
        for writer in [*self.videos, *self.wavs]:
            try:
                writer.close(keep_partial=False)  # a batch that fails leaves no file
                closed.append(writer)
            except OutputClosed:  # the player left before the end: nothing more to deliver
                self.reader_left = True
            except BaseException:
                self.abort()  # the writers not closed yet
                for done in closed:
                    if done.path is not None:
                        done.path.unlink(missing_ok=True)
                raise

    def abort(self) -> None:
        for writer in [*self.videos, *self.wavs]:
            writer.abort()


def run_generate(req: GenerateRequest, console: Console | None = None, *, alone: bool = False) -> list[dict]:
    """Generate every requested sample; return one summary per written MP4.

    Under torchrun the processes share the samples out; with `alone`, this process makes them
    all by itself and speaks to no other (one rank's sample during training).

    Ctrl-C or SIGTERM stops cleanly: the files being written are finalised. Ending a
    `forever` stream that way is its normal end; any other run that was stopped (or a stream
    stopped before its first frame) raises :class:`GenerationInterrupted` after finalising."""
    console = console or Console(stderr=True)
    device, dtype = validate(req)
    model_name, label = generate_model_and_label(req)

    given_audio = read_audio(req.audio_input) if req.audio_input is not None else None
    given_frames = None
    if given_audio is not None:
        if not given_audio.size:
            raise UsageError(
                f"{{audio_input}} {req.audio_input} holds no audio (its audio stream has no samples): "
                "give a file with sound",
                params=("audio_input",),
            )
        given_frames = max(1, round(len(given_audio) / SAMPLE_RATE * FPS))
    elif req.video_input is not None:
        duration = probe(req.video_input).duration
        given_frames = max(1, round(duration * FPS)) if duration else None
    given_param = "audio_input" if req.audio_input is not None else "video_input"
    num_frames = generate_frame_count(req, given_frames, given_param)
    seeds = [req.seed + i for i in range(req.num_samples)]
    paths = generate_output_paths(req, model_name, seeds)
    run = _Run(
        req=req,
        console=console,
        device=device,
        dtype=dtype,
        model_name=model_name,
        label=label,
        given_audio=given_audio,
        num_frames=num_frames,
        samples=[Sample(i, seed, path) for i, (seed, path) in enumerate(zip(seeds, paths))],
    )
    if alone:
        return _run_samples(run, Dist())
    if launched_by_torchrun() and (num_frames is None or _is_stdout(paths[0])):
        raise UsageError(
            "under torchrun, generate makes files of a fixed length: drop {forever} and give {output} "
            "a folder",
            params=("forever", "output"),
        )
    joins_group = launched_by_torchrun() and not dist.is_initialized()  # else a caller's (eval) group
    ranks = init_distributed(device, backend="gloo")  # small messages only; GPUs may be shared
    try:
        return _run_samples(run, ranks)
    finally:
        if joins_group and dist.is_initialized():
            dist.destroy_process_group()


@dataclass
class _Run:
    """One `generate` request, resolved: what every step of the run reads."""

    req: GenerateRequest
    console: Console
    device: torch.device
    dtype: torch.dtype
    model_name: str
    label: str | None
    given_audio: np.ndarray | None
    num_frames: int | None
    samples: list[Sample]


def _run_samples(run: _Run, ranks: Dist) -> list[dict]:
    """Load the model, skip what a previous run of the same command completed, and make this
    rank's share of the rest; rank 0 gets every summary and writes the manifest."""
    req, console, device, dtype = run.req, run.console, run.device, run.dtype
    model_name, label, given_audio, num_frames = run.model_name, run.label, run.given_audio, run.num_frames
    samples = run.samples
    paths = [s.path for s in samples]
    quiet = req.quiet or not ranks.main

    with console.status(f"loading {model_name}", spinner="dots") if not quiet else _null():
        pipe = Pipeline.from_pretrained(
            model_name,
            vae=req.vae,
            revision=req.revision,
            offline=req.offline or None,
            audio_scale=req.audio_scale,
            device=device,
            torch_dtype=dtype,
            compile=_wants_compile(req, device, num_frames, given_audio is not None),
            # Compiling on our own initiative must not fail the run: say why and go on eagerly.
            on_compile_failure=None if req.compile else partial(_compile_failed, console),
            tf32=req.tf32,
            griffin_lim=req.griffin_lim,
        )
    _check_label(pipe, label, req)
    if req.vae is not None and pipe.vae is None:  # a Hub checkpoint says so once downloaded
        raise UsageError(
            f"{{vae}} {req.vae}: {model_name} works in pixel space and uses no VAE: drop {{vae}}",
            params=("vae",),
        )

    source = pipe.source
    weights_id = {"revision": source.revision} if source and source.revision else {}
    if source and not source.revision:
        weights_id = {"model_sha256": _sha256(Path(source.folder) / "model.safetensors")}
    settings = {
        "model": source.source if source else model_name,
        "vae": pipe.vae_source,
        "audio_scale": pipe.audio_scale,
        "class": label,
        "cfg_scale": req.cfg_scale,
        "steps": req.steps,
        "frames_requested": num_frames,
        "audio_input": str(req.audio_input) if req.audio_input else None,
        "video_input": str(req.video_input) if req.video_input else None,
        "guidance_scale": guidance_scale_used(req),
    }

    def identity(sample: Sample) -> dict:
        return {**settings, "seed": sample.seed}

    # A rerun of the same command makes only what is not complete (--overwrite: everything).
    states = {s.index: MISSING for s in samples}
    if num_frames is not None and not req.overwrite and not _is_stdout(paths[0]):
        states = {s.index: sample_state(s, identity(s)) for s in samples}
    elif not _is_stdout(paths[0]):
        for sample in samples:  # not even --overwrite takes the files of a live run
            refuse_if_running(sample)
    todo = [s for s in samples if states[s.index] != COMPLETE]
    if ranks.world > 1:
        dist.barrier()  # every rank has seen the files as they were before anyone writes
    folder = paths[0].parent if len(samples) > 1 or output_is_folder(req) else None
    if len(todo) < len(samples) and not quiet:
        console.print(
            f"{len(samples) - len(todo)} of {len(samples)} samples already complete in "
            f"{folder or paths[0]}: skipped (--overwrite makes them again)",
            markup=False,
            highlight=False,
        )
    all_batches = batches_of(todo, req.batch_size)

    summaries: list[dict] = []
    interrupted = False
    with stop_on_signals() as stop, _progress(console, quiet) as progress:
        overall = None
        if ranks.world > 1 and todo:
            overall = progress.add_task(
                f"{ranks.world} processes", total=len(todo), total_text=f"{len(todo)} samples", rate=False
            )
        done_everywhere = 0
        for first in range(0, len(all_batches), ranks.world):
            batch = all_batches[first + ranks.rank] if first + ranks.rank < len(all_batches) else []
            made = 0
            if batch:
                written = _make_batch(run, pipe, batch, states, identity, weights_id, progress, stop)
                summaries += written
                made = len(written)
                interrupted = stop.is_set() or any(w["interrupted"] for w in written)
            if interrupted:
                break
            if overall is not None:
                count = torch.tensor([made], device=device if dist.get_backend() == "nccl" else "cpu")
                dist.all_reduce(count)
                done_everywhere += int(count.item())
                progress.update(overall, completed=done_everywhere)
    if pipe.model.compiling and not interrupted:
        # The process would wait for the compiler at exit anyway (its code is cached for the
        # next runs): wait here, where the wait can say what it is for.
        with console.status("finishing the compilation for the next runs") if not quiet else _null():
            pipe.model.wait_compiled()
    if ranks.world > 1 and not interrupted:
        gathered: list = [None] * ranks.world
        dist.all_gather_object(gathered, summaries)
        summaries = (
            sorted((s for part in gathered for s in part), key=lambda s: s["seed"]) if ranks.main else []
        )
    if folder is not None and ranks.main and num_frames is not None:
        write_manifest(folder, samples)
    if interrupted and (num_frames is not None or not summaries):
        raise GenerationInterrupted(
            _interrupted_message(summaries, num_frames, len(todo)), summaries, stop.signum or signal.SIGINT
        )
    return summaries


def _make_batch(
    run: _Run,
    pipe: Pipeline,
    batch: list[Sample],
    states: dict[int, str],
    identity: Callable[[Sample], dict],
    weights_id: dict,
    progress: Progress,
    stop: StopRequest,
) -> list[dict]:
    """Generate one batch of samples into their files; return their summaries (none when
    stopped before the first frame). A stop request ends the batch early, finalising its files."""
    req, num_frames, given_audio = run.req, run.num_frames, run.given_audio
    paths = [s.path for s in batch]
    to_stdout = _is_stdout(paths[0])
    description = (
        "standard output" if to_stdout else paths[0].name if len(paths) == 1 else f"{len(paths)} samples"
    )
    task = progress.add_task(
        description,
        total=num_frames,
        total_text=f"{'∞' if num_frames is None else num_frames} frames",
        rate=True,
    )
    video_iter = (
        read_video_frames(req.video_input, size=pipe.image_size) if req.video_input is not None else None
    )
    generation = pipe.generate(
        num_frames=num_frames,
        seeds=[s.seed for s in batch],
        steps=req.steps,
        label=run.label,
        cfg_scale=1.0 if req.cfg_scale is None else req.cfg_scale,
        audio=given_audio,
        video=video_iter,
        guidance_scale=req.guidance_scale,
    )
    live = num_frames is None or num_frames > LIVE_FILE_AFTER_FRAMES
    # Files of a sample this command started and did not finish are its own to replace.
    overwrite = req.overwrite or any(states[s.index] == INCOMPLETE for s in batch)
    sidecars_before: dict[Path, bytes | None] = {}
    began = time.perf_counter()
    written = 0
    failed = interrupted = False
    outputs: _Outputs | None = None
    try:
        if not to_stdout:
            for sample in batch:
                # Another run of the command may have started this sample since this one looked.
                refuse_if_running(sample)
                sample.path.parent.mkdir(parents=True, exist_ok=True)
                for target in (sample.path, sample.path.with_suffix(".wav")):
                    remove_partials(target)  # of a killed run that made this sample before
                sidecars_before[sample.sidecar] = _contents(sample.sidecar)
                write_running_sidecar(sample, identity(sample), __version__)
        outputs = _Outputs(paths, req.wav, overwrite, pipe.image_size, live)
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
    except OutputClosed:  # -o - and the player quit: the run ends there, normally
        if outputs is not None:
            outputs.reader_left = True
    except KeyboardInterrupt:  # a second Ctrl-C: keep what is written, at once
        interrupted = True
    except Exception as err:
        # A failed clip leaves no file behind, short or not; an endless stream keeps
        # (finalised) what it made before the failure: that may be hours of video.
        failed = num_frames is not None
        if is_compile_error(err):  # only when compiling was asked for: see on_compile_failure
            raise UsageError(compile_failure_message(err)) from err
        raise
    finally:
        kept = bool(written) and not failed and outputs is not None and not outputs.reader_left
        try:
            if kept and outputs is not None:
                outputs.close()
            elif outputs is not None:
                outputs.abort()
        except BaseException:
            kept = False
            raise
        finally:
            if not kept and not to_stdout:
                _put_back(batch, sidecars_before)  # only those this batch replaced
    progress.update(task, completed=written)
    wall = time.perf_counter() - began
    if not written:
        return []
    summaries = []
    for sample in batch:
        summary = {
            "output": str(sample.path),
            **identity(sample),
            **weights_id,
            "vocoder": pipe.vocoder_name,
            "vocoder_source": pipe.vocoder_source,
            "dtype": str(pipe.dtype).removeprefix("torch."),
            "device": str(pipe.device),
            "compiled": pipe.compile,
            "frames": written,
            "seconds": written / FPS,
            "wall_seconds": round(wall, 3),
            "interrupted": interrupted,
            "status": "interrupted" if interrupted else "complete",
            "rflav_version": __version__,
        }
        if not to_stdout:  # standard output has no place for a sidecar
            write_json(sample.sidecar, summary)
        summaries.append(summary)
    return summaries


def _contents(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except OSError:
        return None


def _put_back(batch: list[Sample], sidecars_before: dict[Path, bytes | None]) -> None:
    """After a batch that made nothing: each sidecar as it was before (so an older MP4 that is
    still there keeps its own), or none; never this run's "running" one."""
    for sample in batch:
        if sample.sidecar not in sidecars_before:
            continue  # not reached: another run's, or as it was
        before = sidecars_before[sample.sidecar]
        if before is not None and sample.path.exists():
            atomic_write(sample.sidecar, lambda tmp, data=before: Path(tmp).write_bytes(data))
        else:
            sample.sidecar.unlink(missing_ok=True)


def _check_label(pipe: Pipeline, label: str | None, req: GenerateRequest) -> None:
    """--class and --cfg-scale against what the loaded checkpoint is, before any output exists."""
    if pipe.model.num_classes <= 0:
        if label is not None:
            preset = (
                f" (a preset name chooses the checkpoint only without {{model}}, or with {{model}} {label})"
                if label in PRESETS
                else ""
            )
            raise UsageError(
                f"{{label}} {label}: this checkpoint is unconditional: drop {{label}}{preset}",
                params=("label", "model"),
            )
        if req.cfg_scale is not None:
            raise UsageError(
                "{cfg_scale} only applies to class-conditional checkpoints; this one is unconditional",
                params=("cfg_scale",),
            )
        return
    pipe.class_index(label)  # a missing label or an unknown class name fails here


def _wants_compile(
    req: GenerateRequest, device: torch.device, num_frames: int | None, audio_given: bool
) -> bool:
    if req.compile is not None:
        return req.compile
    return auto_compile(device, num_frames, guided=audio_given or req.video_input is not None)


def _compile_failed(console: Console, reason: str) -> None:
    """Compiling was our choice, not the user's: say why it failed (--quiet hides progress, not
    this); the pipeline goes on eagerly."""
    console.print(
        compile_skipped_message(reason),
        markup=False,
        highlight=False,
        soft_wrap=True,
    )


@contextmanager
def _null() -> Iterator[None]:
    yield
