"""The `rflav` command line: one thin function per subcommand over the Python API."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Optional, TypeVar

import typer
from rich.console import Console

from . import __version__

app = typer.Typer(
    name="rflav",
    help="Generate, train and evaluate R-FLAV rolling audio-video models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

_state = {"debug": False}
T = TypeVar("T")


def _run(action: Callable[[], T]) -> T:
    """Run a command; expected failures become one line on stderr and exit code 2."""
    from .hub import ResolveError
    from .media import MediaError
    from .models.flav import CheckpointMismatchError

    expected: tuple[type[BaseException], ...] = (ValueError, ResolveError, MediaError, CheckpointMismatchError,
                                                 FileNotFoundError, PermissionError)
    try:
        return action()
    except expected as err:
        if _state["debug"]:
            raise
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        typer.echo(f"rflav: error: {message}", err=True)
        raise typer.Exit(2) from None
    except KeyboardInterrupt:
        typer.echo("rflav: interrupted", err=True)
        raise typer.Exit(130) from None


def _version(value: bool) -> None:
    if value:
        typer.echo(f"rflav {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks instead of one-line errors."),
) -> None:
    """Generate, train and evaluate R-FLAV rolling audio-video models."""
    _state["debug"] = debug


@app.command()
def generate(
    label: Optional[str] = typer.Option(None, "--class", "-c", help="Preset (dance, landscape) or a class of a class-conditional --model."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Preset, Hub repo id or local release-layout folder."),
    vae: Optional[str] = typer.Option(None, "--vae", help="SD-VAE Hub repo id or folder [default: stabilityai/sd-vae-ft-ema]."),
    revision: Optional[str] = typer.Option(None, "--revision", help="Hub revision (branch, tag or commit) of --model."),
    audio_scale: Optional[float] = typer.Option(None, "--audio-scale", help="Mel scale of the checkpoint (presets know theirs)."),
    seconds: Optional[float] = typer.Option(None, "--seconds", "-s", help="Length in seconds [default: 10, or the --audio/--video length]."),
    frames: Optional[int] = typer.Option(None, "--frames", "-n", help="Length in frames (10 per second)."),
    forever: bool = typer.Option(False, "--forever", help="Generate until Ctrl-C or SIGTERM, then finalise the file."),
    num_samples: int = typer.Option(1, "--num-samples", help="Number of videos; sample i uses seed + i."),
    batch_size: int = typer.Option(1, "--batch-size", help="Samples generated together."),
    seed: int = typer.Option(0, "--seed", help="Seed of the first sample."),
    steps: int = typer.Option(2, "--steps", help="Model evaluations per frame."),
    cfg_scale: Optional[float] = typer.Option(None, "--cfg-scale", help="Classifier-free guidance (class-conditional checkpoints only)."),
    audio: Optional[Path] = typer.Option(None, "--audio", help="Audio-to-video: generate a video for this sound."),
    video: Optional[Path] = typer.Option(None, "--video", help="Video-to-audio: generate a soundtrack for this video."),
    guidance_scale: Optional[float] = typer.Option(None, "--guidance-scale", help="Strength of --audio/--video guidance [default: 1 for audio, 2 for video]."),
    device: str = typer.Option("auto", "--device", help="auto, cuda, mps or cpu."),
    dtype: str = typer.Option("auto", "--dtype", help="auto, fp32, bf16 or fp16."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Output MP4, or a folder for several samples."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace existing outputs."),
    wav: bool = typer.Option(False, "--wav", help="Also write the audio as WAV."),
    offline: bool = typer.Option(False, "--offline", help="Use only files already in the Hugging Face cache."),
    as_json: bool = typer.Option(False, "--json", help="Print a machine-readable summary on stdout."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress display."),
) -> None:
    """Generate videos with sound from a checkpoint, streamed to MP4."""
    from .generate import GenerateRequest, run_generate

    request = GenerateRequest(
        model=model, label=label, vae=vae, revision=revision, offline=offline, audio_scale=audio_scale,
        seconds=seconds, frames=frames, forever=forever, num_samples=num_samples, batch_size=batch_size, seed=seed,
        steps=steps, cfg_scale=cfg_scale, guidance_scale=guidance_scale, audio_input=audio, video_input=video,
        device=device, dtype=dtype, output=output, overwrite=overwrite, wav=wav, quiet=quiet or as_json,
    )
    summaries = _run(lambda: run_generate(request, Console(stderr=True)))
    if as_json:
        typer.echo(json.dumps(summaries if len(summaries) != 1 else summaries[0], indent=2))
    elif not quiet:
        for s in summaries:
            note = " (stopped early)" if s["interrupted"] else ""
            typer.echo(f"wrote {s['output']}: {s['frames']} frames, {s['seconds']:.1f} s{note}", err=True)


@app.command()
def download(
    which: str = typer.Argument("dance", help="dance, landscape or all."),
    to: Optional[Path] = typer.Option(None, "--to", help="Plain folder to put the files in (default: the Hugging Face cache)."),
    revision: Optional[str] = typer.Option(None, "--revision", help="Hub revision of the model repo."),
) -> None:
    """Fetch checkpoints, vocoders and the SD-VAE ahead of time."""
    from .hub import download as fetch

    folders = _run(lambda: fetch(which, to=to, revision=revision))
    for folder in folders:
        typer.echo(str(folder))


def main() -> None:
    app(prog_name="rflav")


if __name__ == "__main__":
    main()
