"""The `rflav` command line: one thin function per subcommand over the Python API."""

from __future__ import annotations

import errno
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Literal, Optional, TypeVar

import typer
from rich.console import Console

from . import __version__, hub
from .config import FLAV_SIZES
from .errors import RflavError
from .requests import (
    DriftRequest,
    EvalRequest,
    GenerateRequest,
    ServeRequest,
    TrainConfig,
    check_drift_request,
    check_eval_request,
    check_generate_request,
    check_prepare_request,
    check_serve_request,
    check_train_config,
    parse_metrics,
)

app = typer.Typer(
    name="rflav",
    help="Generate, train and evaluate R-FLAV rolling audio-video models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)

_state = {"debug": False}
T = TypeVar("T")


def _flag(param: str) -> str:
    """The command-line flag of a library parameter named in an error message."""
    return _FLAGS.get(param, "--" + param.replace("_", "-"))


# Library parameters whose flag is not simply --name-with-dashes.
_FLAGS = {"label": "--class", "audio_input": "--audio", "video_input": "--video", "compile": "--compile"}


def _run(action: Callable[[], T]) -> T:
    """Run a command; expected failures become one line on stderr and exit code 2."""
    # Library errors, plus the OS's word on a path the user gave (no such file, no permission).
    expected: tuple[type[BaseException], ...] = (RflavError, FileNotFoundError, PermissionError)
    try:
        return action()
    except expected as err:
        if _state["debug"]:
            raise
        rank = _rank()
        if rank and not (isinstance(err, RflavError) and err.per_process):
            raise typer.Exit(2) from None  # the same in every process: rank 0 says it
        text = err.render(_flag) if isinstance(err, RflavError) else str(err)
        message = text.strip().splitlines()[0] if text.strip() else type(err).__name__
        typer.echo(f"rflav: error{f' (rank {rank})' if rank else ''}: {message}", err=True)
        raise typer.Exit(2) from None
    except KeyboardInterrupt:
        typer.echo("rflav: interrupted", err=True)
        raise typer.Exit(130) from None
    except Exception as err:
        if _state["debug"] or not _disk_full(err):
            raise
        where = f" writing {err.filename}" if getattr(err, "filename", None) else ""
        message = f"no space left on the device{where}: free some space or write elsewhere"
        typer.echo(f"rflav: error: {message}", err=True)
        raise typer.Exit(1) from None


def _rank() -> int:
    """This process's rank under torchrun (0 without it): rank 0 alone reports results."""
    return int(os.environ.get("RANK", "0")) if int(os.environ.get("WORLD_SIZE", "1")) > 1 else 0


def _disk_full(err: BaseException) -> bool:
    """A full disk or quota, as the OS says it or as a library that writes files passes it on
    (safetensors' errors carry the OS's text)."""
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return "No space left on device" in str(err) or "Disk quota exceeded" in str(err)


def _fail(message: str) -> None:
    typer.echo(f"rflav: error: {message}", err=True)
    raise typer.Exit(2)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"rflav {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks instead of one-line errors."),
) -> None:
    """Generate, train and evaluate R-FLAV rolling audio-video models."""
    _state["debug"] = debug


@app.command()
def generate(
    label: Optional[str] = typer.Option(
        None,
        "--class",
        "-c",
        help=(
            "Alone: the preset to run (dance, landscape, or ball: small, no download). With --model: a "
            "class of that class-conditional checkpoint (name or index)."
        ),
    ),
    model: Optional[str] = typer.Option(
        None,
        "--model",
        "-m",
        help=(
            "Checkpoint: a preset, a Hub repo id (org/name) or a local folder (config.json, "
            "model.safetensors, vocoder/, rflav.json) [default: dance]."
        ),
    ),
    vae: Optional[str] = typer.Option(
        None,
        "--vae",
        help=(
            "SD-VAE: a Hub repo id or a local folder [default: the checkpoint's, else "
            "stabilityai/sd-vae-ft-ema]."
        ),
    ),
    revision: Optional[str] = typer.Option(
        None, "--revision", help="Hub revision (branch, tag or commit) of --model; not for local folders."
    ),
    audio_scale: Optional[float] = typer.Option(
        None,
        "--audio-scale",
        help="Mel scale the checkpoint was trained with [default: from its rflav.json; presets know theirs].",
    ),
    seconds: Optional[float] = typer.Option(
        None,
        "--seconds",
        "-s",
        help="Length in seconds, up to a week [default: 10, or the --audio/--video length, also the most].",
    ),
    frames: Optional[int] = typer.Option(
        None, "--frames", "-n", help="Length in frames (10 per second), instead of --seconds."
    ),
    forever: bool = typer.Option(
        False,
        "--forever",
        help="Generate until Ctrl-C or SIGTERM, then finalise the file (exit 0). Not with --audio/--video.",
    ),
    num_samples: int = typer.Option(
        1,
        "--num-samples",
        help=(
            "Number of videos; sample i uses seed + i. Rerunning the same command makes only the samples "
            "not yet complete; under torchrun each process makes its share."
        ),
    ),
    batch_size: int = typer.Option(
        1, "--batch-size", help="Samples generated together (faster, more memory)."
    ),
    seed: int = typer.Option(
        0,
        "--seed",
        help="Seed of the first sample (0 to 2**63-1); a seed gives the same video on every device.",
    ),
    steps: int = typer.Option(2, "--steps", help="Model evaluations per frame (more: slower, finer)."),
    cfg_scale: Optional[float] = typer.Option(
        None,
        "--cfg-scale",
        help=(
            "Classifier-free guidance scale, >= 0 (class-conditional checkpoints only) [default: 1, no "
            "guidance]."
        ),
    ),
    audio: Optional[Path] = typer.Option(
        None,
        "--audio",
        help=(
            "Audio-to-video: generate a video for this sound (its first channel, resampled to 16 kHz, is "
            "re-encoded into the output)."
        ),
    ),
    video: Optional[Path] = typer.Option(
        None,
        "--video",
        help=(
            "Video-to-audio: generate a soundtrack for this video (resampled to 10 fps and letterboxed to "
            "the model's frame size, then re-encoded into the output)."
        ),
    ),
    guidance_scale: Optional[float] = typer.Option(
        None,
        "--guidance-scale",
        help="Strength of --audio/--video guidance, >= 0 [default: 1 for audio, 2 for video].",
    ),
    device: str = typer.Option(
        "auto", "--device", help="auto, cuda, cuda:N, mps or cpu [auto: CUDA, else MPS, else CPU]."
    ),
    dtype: str = typer.Option(
        "auto",
        "--dtype",
        help="auto, fp32, bf16 or fp16 [auto: bf16 on CUDA and on CPUs with native bf16, else fp32].",
    ),
    tf32: bool = typer.Option(
        True,
        "--tf32/--no-tf32",
        help=(
            "With --dtype fp32 on CUDA: matrix products in TensorFloat-32, as the reference code runs; "
            "--no-tf32 for full float32."
        ),
    ),
    compile_model: Optional[bool] = typer.Option(
        None,
        "--compile/--no-compile",
        help=(
            "Compile the transformer blocks (CUDA graphs on GPUs): a few seconds more to start, faster "
            "frames after that [default: on for CUDA and 20 s or more]."
        ),
    ),
    output: Optional[str] = typer.Option(
        None,
        "--output",
        "-o",
        metavar="PATH",
        help=(
            "NAME.mp4 (a name without a suffix gets .mp4; other suffixes are refused: MP4 only), or a "
            "folder (an existing one, or PATH/) for NAME-seedS.mp4 files; several samples always go into a "
            "folder; - streams the MP4 to standard output (| ffplay -), no .json. A long run (--forever, "
            "over a minute) is playable under its name while it grows [default: MODEL-seedS.mp4, or "
            "MODEL-samples/]."
        ),
    ),
    overwrite: bool = typer.Option(
        False,
        "--overwrite",
        help="Replace existing outputs (MP4, .json, .wav), complete samples of the same command included.",
    ),
    wav: bool = typer.Option(False, "--wav", help="Also write the audio as a 16-bit WAV next to each MP4."),
    griffin_lim: bool = typer.Option(
        False,
        "--griffin-lim",
        help=(
            "Make the sound with Griffin-Lim instead of the checkpoint's neural vocoder (needed for "
            "checkpoints without vocoder/ whose rflav.json does not say so; lower quality)."
        ),
    ),
    offline: bool = typer.Option(
        False, "--offline", help="Use only files already in the Hugging Face cache."
    ),
    as_json: bool = typer.Option(
        False, "--json", help="Print the summary of each MP4 as JSON on stdout (no progress display)."
    ),
    quiet: bool = typer.Option(
        False,
        "--quiet",
        "-q",
        help="No progress display and no closing line (errors and interruptions are still reported).",
    ),
) -> None:
    """Generate videos with sound from a checkpoint, streamed to MP4.

    A fixed-length run stopped by Ctrl-C or SIGTERM finalises what it wrote (playable, its .json
    says interrupted), says so on stderr and exits 130 (143 for SIGTERM); --forever ends that way
    with exit 0.
    """

    request = GenerateRequest(
        model=model,
        label=label,
        vae=vae,
        revision=revision,
        offline=offline,
        audio_scale=audio_scale,
        seconds=seconds,
        frames=frames,
        forever=forever,
        num_samples=num_samples,
        batch_size=batch_size,
        seed=seed,
        steps=steps,
        cfg_scale=cfg_scale,
        guidance_scale=guidance_scale,
        audio_input=audio,
        video_input=video,
        device=device,
        dtype=dtype,
        tf32=tf32,
        compile=compile_model,
        output=output,
        overwrite=overwrite,
        wav=wav,
        quiet=quiet or as_json,
        griffin_lim=griffin_lim,
    )
    if as_json and output == "-":
        _fail("--json prints on standard output, where --output - sends the video: drop --json")
    _run(lambda: check_generate_request(request))  # bad values fail here, before torch is imported

    def go():
        from .generate import GenerationInterrupted, run_generate

        try:
            return run_generate(request, Console(stderr=True)), None
        except GenerationInterrupted as stopped:
            return stopped.summaries, stopped

    summaries, stopped = _run(go)
    if as_json and _rank() == 0:
        typer.echo(json.dumps(summaries if len(summaries) != 1 else summaries[0], indent=2))
    elif not quiet and stopped is None:
        for s in summaries:
            note = " (stopped)" if s["interrupted"] else ""
            if s["output"] == "-":
                typer.echo(
                    f"streamed {s['frames']} frames, {s['seconds']:.1f} s to standard output{note}", err=True
                )
            else:
                typer.echo(f"wrote {s['output']}: {s['frames']} frames, {s['seconds']:.1f} s{note}", err=True)
    if stopped is not None:
        typer.echo(f"rflav: {stopped}", err=True)  # even with --quiet: the outputs are short
        raise typer.Exit(stopped.exit_code)


@app.command()
def serve(
    model: Optional[list[str]] = typer.Option(
        None,
        "--model",
        "-m",
        metavar="<str>",
        help=(
            "Checkpoint to offer (preset, Hub repo id or local folder); repeat for several, the page offers "
            "them by name [default: dance]."
        ),
    ),
    vae: Optional[str] = typer.Option(
        None,
        "--vae",
        help=(
            "SD-VAE: a Hub repo id or a local folder [default: each checkpoint's, else "
            "stabilityai/sd-vae-ft-ema]."
        ),
    ),
    audio_scale: Optional[float] = typer.Option(
        None, "--audio-scale", help="Mel scale of the checkpoints [default: from their rflav.json]."
    ),
    device: str = typer.Option(
        "auto",
        "--device",
        help=(
            "auto, cuda, cuda:N, mps or cpu [auto: CUDA, else MPS, else CPU]; auto or cuda with several GPUs "
            "loads each model once per GPU, cuda:N uses GPU N only."
        ),
    ),
    dtype: str = typer.Option(
        "auto",
        "--dtype",
        help="auto, fp32, bf16 or fp16 [auto: bf16 on CUDA and on CPUs with native bf16, else fp32].",
    ),
    compile_model: Optional[bool] = typer.Option(
        None,
        "--compile/--no-compile",
        help=(
            "Compile the transformer blocks (CUDA graphs on GPUs) at start, before the first viewer: "
            "faster frames [default: on for CUDA, off elsewhere]."
        ),
    ),
    steps: int = typer.Option(2, "--steps", help="Model evaluations per frame (more: slower, finer)."),
    host: str = typer.Option(
        "127.0.0.1",
        "--host",
        help=(
            "Address to listen on; anything but this machine's own (127.0.0.1, ::1) lets others in: use "
            "--token."
        ),
    ),
    port: int = typer.Option(8000, "--port", help="Port to listen on (0: any free one, printed)."),
    max_streams: Optional[int] = typer.Option(
        None,
        "--max-streams",
        help=(
            "Generations running at once, each new one on the least busy GPU; more viewers are told the "
            "server is busy [default: one per GPU with --device auto or cuda, else 1]."
        ),
    ),
    token: Optional[str] = typer.Option(
        None,
        "--token",
        help=(
            "Shared secret clients must give (?token=... in the page and stream URLs, or an Authorization: "
            "Bearer header)."
        ),
    ),
    offline: bool = typer.Option(
        False, "--offline", help="Use only files already in the Hugging Face cache."
    ),
) -> None:
    """Serve a web page to generate and watch live; each stream is also a URL for any player."""
    request = ServeRequest(
        models=list(model) if model else ServeRequest().models,
        vae=vae,
        audio_scale=audio_scale,
        device=device,
        dtype=dtype,
        compile=compile_model,
        steps=steps,
        offline=offline,
        host=host,
        port=port,
        max_streams=max_streams,
        token=token,
    )
    _run(lambda: check_serve_request(request))  # before torch is imported

    def go() -> None:
        from .serve import run_serve

        run_serve(request)

    _run(go)


@app.command()
def download(
    which: str = typer.Argument("dance", help="dance, landscape or all."),
    to: Optional[Path] = typer.Option(
        None, "--to", help="Plain folder to put the files in (default: the Hugging Face cache)."
    ),
    revision: Optional[str] = typer.Option(None, "--revision", help="Hub revision of the model repo."),
) -> None:
    """Fetch checkpoints, vocoders and the SD-VAE ahead of time."""

    folders = _run(lambda: hub.download(which, to=to, revision=revision))
    for folder in folders:
        typer.echo(str(folder))


@app.command()
def train(
    data: Path = typer.Argument(
        ..., help="Folder with train/ (and test/) videos, or a cache made by `rflav prepare`."
    ),
    output: Path = typer.Option(
        Path("runs/rflav"),
        "--output",
        "-o",
        help=(
            "Run folder; the same command again resumes the run. Options left out then keep the run's "
            "values; the model, --image-size, --window, --autoencoder, --audio-scale and --init cannot "
            "change (give a new folder), the others can."
        ),
    ),
    size: Optional[str] = typer.Option(
        None,
        "--size",
        help=(
            "Model size: FLAV-S/2 … FLAV-XL/8, FLAV-B/1, FLAV-L/1 [default: FLAV-B/1, unless --model-config "
            "or --init gives the model]."
        ),
    ),
    old_size: Optional[str] = typer.Option(
        None, "--model", hidden=True, help="Old name of --size (train only)."
    ),
    model_config: Optional[Path] = typer.Option(
        None,
        "--model-config",
        help=(
            "JSON with FLAV constructor keys (as in a checkpoint's config.json); its predict_frames and "
            "latent_size set --window and --image-size."
        ),
    ),
    init: Optional[str] = typer.Option(
        None,
        "--init",
        help=(
            "Fine-tune: a preset (dance, landscape, ball), a repo id or a checkpoint folder (its window, "
            "size and audio scale are kept)."
        ),
    ),
    autoencoder: Optional[str] = typer.Option(
        None,
        "--autoencoder",
        help=(
            "SD-VAE repo id or folder, or none to train in pixel space [default: stabilityai/sd-vae-ft-ema, "
            "or what a latent cache or --init says]."
        ),
    ),
    vocoder: Optional[str] = typer.Option(
        None,
        "--vocoder",
        help=(
            "Vocoder folder (config.json, vocoder.pt) copied into every checkpoint, or none for Griffin-Lim "
            "[default: the dance checkpoint's, fetched once]."
        ),
    ),
    image_size: Optional[int] = typer.Option(
        None,
        "--image-size",
        min=1,
        help=(
            "Frames are letterboxed to this square size in pixels; a multiple of 8 with a VAE [default: "
            "256, or what --model-config, --init or a latent cache says]."
        ),
    ),
    window: Optional[int] = typer.Option(
        None,
        "--window",
        min=1,
        help=(
            "Frames per training clip, the rolling window [default: 10, or --model-config's / --init's "
            "predict_frames]."
        ),
    ),
    batch_size: Optional[int] = typer.Option(
        None, "--batch-size", min=1, help="Clips per step and device [default: 8]."
    ),
    lr: Optional[float] = typer.Option(None, "--lr", min=0.0, help="AdamW learning rate [default: 1e-4]."),
    max_steps: Optional[int] = typer.Option(
        None,
        "--max-steps",
        min=1,
        help="Train until this step, counting the steps already made by a resumed run [default: 100000].",
    ),
    save_every: Optional[int] = typer.Option(
        None,
        "--save-every",
        min=1,
        help="Write a checkpoint every N steps (and at the end, and on Ctrl-C) [default: 1000].",
    ),
    keep: Optional[int] = typer.Option(
        None, "--keep", min=0, help="Checkpoints kept, the newest (0: all) [default: 3]."
    ),
    sample_every: Optional[int] = typer.Option(
        None,
        "--sample-every",
        min=0,
        help="Write a sample MP4 into every N-th step's checkpoint (0: never) [default: 0].",
    ),
    weighting: Optional[Literal["logit_normal", "uniform"]] = typer.Option(
        None, "--weighting", help="Loss weighting over noise levels [default: logit_normal]."
    ),
    audio_scale: Optional[float] = typer.Option(
        None,
        "--audio-scale",
        help="Mel scale in model space [default: --init's, else the unit std of the training mel].",
    ),
    missing_audio: Optional[Literal["skip", "silence"]] = typer.Option(
        None,
        "--missing-audio",
        help="Videos without sound: skip them, or train on them with silence [default: skip].",
    ),
    seed: Optional[int] = typer.Option(
        None,
        "--seed",
        min=0,
        help="Seed of the initial weights, the data order and the noise, 0 to 2**32-1 [default: 0].",
    ),
    device: Optional[str] = typer.Option(
        None, "--device", help="auto, cuda, cuda:N, mps or cpu [default: auto]."
    ),
    grad_ckpt: Optional[bool] = typer.Option(
        None,
        "--grad-ckpt/--no-grad-ckpt",
        help="Gradient checkpointing: less memory, slower steps [default: off].",
    ),
    compile_model: Optional[bool] = typer.Option(
        None, "--compile/--no-compile", help="torch.compile the model [default: off]."
    ),
) -> None:
    """Train (or fine-tune) a rolling audio-video model; run under torchrun for several GPUs."""

    if old_size is not None:
        if size is not None:
            _fail("--model is the old name of --size: give only --size")
        if old_size not in FLAV_SIZES:
            _fail(
                f"train --model {old_size}: --model of train is now --size and takes a model size "
                f"({', '.join(FLAV_SIZES)}); to fine-tune a checkpoint use --init"
            )
        typer.echo(
            "rflav: note: train --model is now --size (the old name goes in the next release); "
            "to fine-tune a checkpoint use --init",
            err=True,
        )
        size = old_size
    cfg = TrainConfig(
        data=str(data),
        output=str(output),
        size=size,
        model_config=str(model_config) if model_config else None,
        init=init,
        autoencoder=autoencoder,
        vocoder=vocoder,
        image_size=image_size,
        window=window,
        batch_size=batch_size,
        lr=lr,
        max_steps=max_steps,
        save_every=save_every,
        keep=keep,
        sample_every=sample_every,
        weighting=weighting,
        audio_scale=audio_scale,
        missing_audio=missing_audio,
        seed=seed,
        device=device,
        grad_ckpt=grad_ckpt,
        compile=compile_model,
    )
    _run(lambda: check_train_config(cfg))  # before torch is imported: a bad value fails at once

    from .runtime import stop_on_signals
    from .train import TrainingInterrupted
    from .train import train as run_train

    def go():
        with stop_on_signals() as stop:
            try:
                return run_train(cfg, stop=stop, name_of=_flag), None
            except TrainingInterrupted as stopped:
                return stopped.checkpoint, stopped

    last, stopped = _run(go)
    if _rank() != 0:
        if stopped is not None:
            raise typer.Exit(stopped.exit_code)
        return
    if last is not None:
        typer.echo(f"checkpoint: {last}", err=True)
    if stopped is not None:
        typer.echo(f"rflav: {stopped}", err=True)
        raise typer.Exit(stopped.exit_code)


@app.command()
def prepare(
    data: Path = typer.Argument(..., help="Folder with train/ (and test/) videos."),
    output: Optional[Path] = typer.Option(
        None,
        "--output",
        "-o",
        help="Cache folder to write (the same command again resumes it); `rflav train OUTPUT` trains on it.",
    ),
    old_output: Optional[Path] = typer.Option(None, "--out", hidden=True, help="Old name of --output."),
    autoencoder: str = typer.Option(
        "stabilityai/sd-vae-ft-ema",
        "--autoencoder",
        help="SD-VAE repo id or folder; recorded in the cache, so training takes it from there.",
    ),
    split: str = typer.Option(
        "train", "--split", help="Split folder of DATA to encode (train or test); written to OUTPUT/SPLIT."
    ),
    image_size: int = typer.Option(
        256,
        "--image-size",
        min=8,
        help="Frames are letterboxed to this square size in pixels, a multiple of 8.",
    ),
    batch_size: int = typer.Option(16, "--batch-size", min=1, help="Frames encoded together."),
    missing_audio: Literal["skip", "silence"] = typer.Option(
        "skip", "--missing-audio", help="Videos without sound: skip them, or keep them with silence."
    ),
    device: str = typer.Option("auto", "--device", help="auto, cuda, cuda:N, mps or cpu."),
) -> None:
    """Encode every frame once (VAE posterior) and every soundtrack's mel, for fast training."""

    if output is not None and old_output is not None:
        _fail("--out is the old name of --output: give only -o/--output")
    output = output if output is not None else old_output
    if output is None:
        _fail("missing option -o/--output: the cache folder to write")
    _run(lambda: check_prepare_request(image_size, batch_size, missing_audio, device, output))

    from .data import prepare_cache, scan_dataset
    from .models.autoencoder import AutoencoderKL
    from .runtime import pick_device

    def go():
        index = scan_dataset(data, split, missing_audio=missing_audio)
        typer.echo(index.summary(), err=True)
        dev = pick_device(device)
        vae = AutoencoderKL.from_pretrained(autoencoder).to(dev)
        return prepare_cache(
            index,
            output / split,
            vae,
            batch_size=batch_size,
            device=str(dev),
            image_size=image_size,
            autoencoder_id=autoencoder,
        )

    typer.echo(str(_run(go)))


def _num_clips(num_clips: int | None, num_old: int | None) -> int:
    """--num-clips of eval and drift, or its old name --num (kept for one release)."""
    if num_old is None:
        return 2048 if num_clips is None else num_clips
    if num_clips is not None:
        _fail("--num is the old name of --num-clips: give only --num-clips")
    typer.echo("rflav: note: --num is now --num-clips (the old name goes in the next release)", err=True)
    return num_old


# Options eval and drift share.
_LETTERBOX_ANTIALIAS = typer.Option(
    "on",
    "--letterbox-antialias",
    help="Antialias the 64×64 letterbox: on (torchvision >= 0.17) or off (torchvision <= 0.16).",
)
_I3D_WEIGHTS = typer.Option(
    None,
    "--i3d-weights",
    help=(
        "i3d_pretrained_400.pt, or a folder holding it, for FVD/KVD [default: $RFLAV_CACHE or "
        "~/.cache/rflav, downloaded once]."
    ),
)
_AUDIOCLIP_WEIGHTS = typer.Option(
    None,
    "--audioclip-weights",
    help=(
        "AudioCLIP-Full-Training.pt, or a folder holding it, for FAD [default: $RFLAV_CACHE or "
        "~/.cache/rflav, downloaded once]."
    ),
)


@app.command("eval")
def evaluate(
    real: Path = typer.Option(
        ...,
        "--real",
        help=(
            "Folder of real videos (searched recursively for .mp4, .avi, .gif and the kinds training "
            "takes: .mkv, .mov, .webm), or a statistics .npz written by --save-real-stats (its first "
            "--num-clips clips are used)."
        ),
    ),
    fake: Optional[Path] = typer.Option(
        None, "--fake", help="Folder of generated videos (or give --model to generate them now)."
    ),
    metrics: str = typer.Option(
        "fvd,kvd,fad",
        "--metrics",
        help=(
            "Comma list of fvd, kvd, fad. FVD and KVD need the I3D weights, FAD the AudioCLIP weights; only "
            "those are loaded."
        ),
    ),
    num_clips: Optional[int] = typer.Option(
        None,
        "--num-clips",
        min=2,
        help="16-frame clips per set; a set with more is sampled with --seed [default: 2048].",
    ),
    num_old: Optional[int] = typer.Option(None, "--num", hidden=True, min=2, help="Old name of --num-clips."),
    seed: int = typer.Option(
        0, "--seed", min=0, help="Seed of the clip selection when a set has more than --num-clips clips."
    ),
    clip_stride: int = typer.Option(
        1,
        "--clip-stride",
        min=1,
        help="Frames between the starts of consecutive 16-frame clips of a video (the protocol uses 1).",
    ),
    protocol: Literal["mmdiffusion"] = typer.Option(
        "mmdiffusion", "--protocol", help="Evaluation protocol: mmdiffusion (MM-Diffusion's evaluator)."
    ),
    letterbox_antialias: Literal["on", "off"] = _LETTERBOX_ANTIALIAS,
    allow_fewer: bool = typer.Option(
        False,
        "--allow-fewer",
        help="Use all clips of a set that has fewer than --num-clips (instead of stopping).",
    ),
    i3d_weights: Optional[str] = _I3D_WEIGHTS,
    audioclip_weights: Optional[str] = _AUDIOCLIP_WEIGHTS,
    save_real_stats: Optional[Path] = typer.Option(
        None, "--save-real-stats", help="Save the real set's features to this .npz, for a later --real."
    ),
    model: Optional[str] = typer.Option(
        None,
        "--model",
        "-m",
        help=(
            "Generate the fake set now from this checkpoint (preset, Hub repo id or local folder), instead "
            "of --fake."
        ),
    ),
    label: Optional[str] = typer.Option(
        None,
        "--class",
        help=(
            "With --model: generate only this class of a class-conditional checkpoint (name or index) "
            "[default: every class, sample i of class i mod the number of classes]."
        ),
    ),
    vae: Optional[str] = typer.Option(
        None,
        "--vae",
        help=(
            "With --model: the SD-VAE (Hub repo id or local folder) [default: the checkpoint's, else "
            "stabilityai/sd-vae-ft-ema]."
        ),
    ),
    num_samples: Optional[int] = typer.Option(
        None,
        "--num-samples",
        min=2,
        help="Videos to generate with --model, 16 frames each [default: --num-clips].",
    ),
    batch_size: Optional[int] = typer.Option(
        None, "--batch-size", min=1, help="Videos generated together with --model [default: 8]."
    ),
    fake_out: Optional[Path] = typer.Option(
        None,
        "--fake-out",
        help="Keep the videos generated with --model in this folder [default: a temporary folder].",
    ),
    device: str = typer.Option(
        "auto", "--device", help="auto, cuda, cuda:N, mps or cpu [auto: CUDA, else MPS, else CPU]."
    ),
    offline: bool = typer.Option(
        False, "--offline", help="Never download: weights must be given or already in the cache."
    ),
    as_json: bool = typer.Option(
        False, "--json", help="Print the result as JSON on stdout (no progress display)."
    ),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress display."),
) -> None:
    """FVD, KVD and FAD of generated videos against real ones (MM-Diffusion protocol)."""

    num_clips = _num_clips(num_clips, num_old)

    def build() -> EvalRequest:
        request = EvalRequest(
            real=real,
            fake=fake,
            metrics=parse_metrics(metrics),
            num_clips=num_clips,
            seed=seed,
            clip_stride=clip_stride,
            protocol=protocol,
            letterbox_antialias=letterbox_antialias == "on",
            allow_fewer=allow_fewer,
            i3d_weights=i3d_weights,
            audioclip_weights=audioclip_weights,
            save_real_stats=save_real_stats,
            device=device,
            offline=offline,
            model=model,
            label=label,
            vae=vae,
            num_samples=num_samples,
            batch_size=batch_size,
            fake_out=fake_out,
            quiet=quiet or as_json,
        )
        check_eval_request(request)  # bad values fail here, before torch is imported
        return request

    request = _run(build)

    def go() -> dict:
        from .evaluate import run_eval

        return run_eval(request, Console(stderr=True))

    result = _run(go)
    if _rank() != 0:
        return
    if as_json:
        typer.echo(json.dumps(result, indent=2))
    else:
        aa = "on" if result["letterbox_antialias"] else "off"
        typer.echo(
            f"protocol {result['protocol']} (letterbox antialias {aa}), "
            f"{result['fake']['clips']} fake vs {result['real']['clips']} real clips"
        )
        for name in ("fvd", "kvd", "fad"):
            if name in result:
                typer.echo(f"{name.upper()}: {result[name]:.6g}")


@app.command()
def drift(
    fake: Path = typer.Option(
        ..., "--fake", help="Folder of long generated videos (at least 2, each 16 frames or more)."
    ),
    real: Path = typer.Option(
        ...,
        "--real",
        help=(
            "Folder of real videos (the kinds eval reads), or a statistics .npz written by eval "
            "--save-real-stats (its first --num-clips clips are used)."
        ),
    ),
    window: int = typer.Option(
        16, "--window", help="Frames per window: 16, the protocol's clip length (no other value is accepted)."
    ),
    stride: int = typer.Option(
        8, "--stride", min=1, help="Frames between window positions along the videos."
    ),
    metrics: str = typer.Option(
        "fvd,kvd,fad",
        "--metrics",
        help=(
            "Comma list of fvd, kvd, fad, computed at every window position. FVD and KVD need the I3D "
            "weights, FAD the AudioCLIP weights; only those are loaded."
        ),
    ),
    num_clips: Optional[int] = typer.Option(
        None,
        "--num-clips",
        min=2,
        help=(
            "Real clips to compare with, sampled with --seed when there are more (all of them if there are "
            "fewer) [default: 2048]."
        ),
    ),
    num_old: Optional[int] = typer.Option(None, "--num", hidden=True, min=2, help="Old name of --num-clips."),
    seed: int = typer.Option(
        0, "--seed", min=0, help="Seed of the real-clip selection when there are more than --num-clips."
    ),
    letterbox_antialias: Literal["on", "off"] = _LETTERBOX_ANTIALIAS,
    i3d_weights: Optional[str] = _I3D_WEIGHTS,
    audioclip_weights: Optional[str] = _AUDIOCLIP_WEIGHTS,
    output: Path = typer.Option(
        Path("drift"),
        "--output",
        "-o",
        metavar="PATH",
        help=(
            "Writes PATH.csv and PATH.png (a .csv or .png ending of PATH is dropped first; an existing "
            "folder gets drift.csv and drift.png)."
        ),
    ),
    device: str = typer.Option(
        "auto", "--device", help="auto, cuda, cuda:N, mps or cpu [auto: CUDA, else MPS, else CPU]."
    ),
    offline: bool = typer.Option(
        False, "--offline", help="Never download: weights must be given or already in the cache."
    ),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress display."),
) -> None:
    """Metrics over a sliding window along long generated videos, with a plot."""

    num_clips = _num_clips(num_clips, num_old)

    def build() -> DriftRequest:
        request = DriftRequest(
            fake=fake,
            real=real,
            window=window,
            stride=stride,
            num_clips=num_clips,
            seed=seed,
            metrics=parse_metrics(metrics),
            letterbox_antialias=letterbox_antialias == "on",
            i3d_weights=i3d_weights,
            audioclip_weights=audioclip_weights,
            device=device,
            offline=offline,
            output=output,
            quiet=quiet,
        )
        check_drift_request(request)  # bad values fail here, before torch is imported
        return request

    request = _run(build)

    def go() -> dict:
        from .evaluate import run_drift

        return run_drift(request, Console(stderr=True))

    out = _run(go)
    typer.echo(f"protocol {out['protocol']}: {out['positions']} window positions over {out['videos']} videos")
    typer.echo(out["csv"])
    typer.echo(out["png"])


@app.command()
def bench(
    size: str = typer.Option(
        "FLAV-B/1", "--size", help="Random-weight model: tiny, FLAV-S/2 … FLAV-XL/8, FLAV-B/1, FLAV-L/1."
    ),
    model: Optional[str] = typer.Option(
        None, "--model", "-m", help="Time a real checkpoint (preset, repo id or folder) instead."
    ),
    device: str = typer.Option("auto", "--device", help="auto, cuda, mps or cpu."),
    dtype: str = typer.Option("auto", "--dtype", help="auto, fp32, bf16 or fp16."),
    batch_size: int = typer.Option(1, "--batch-size", help="Samples generated together."),
    steps: int = typer.Option(2, "--steps", help="Model evaluations per frame."),
    frames: Optional[int] = typer.Option(
        None,
        "--frames",
        "-n",
        help="Frames to generate, the first quarter as warm-up [default: 50 on GPUs, 8 on CPUs].",
    ),
    compile_model: bool = typer.Option(
        False,
        "--compile",
        help="Compile the transformer blocks as generate --compile does, but before the first frame "
        "(generate compiles while the first frames stream), so the steady figures are the compiled ones.",
    ),
    forward_only: bool = typer.Option(False, "--forward-only", help="Only time one model forward."),
    no_mux: bool = typer.Option(False, "--no-mux", help="Leave MP4 writing out of the generation timing."),
    tf32: bool = typer.Option(
        True, "--tf32/--no-tf32", help="With --dtype fp32 on CUDA: TensorFloat-32 products, as generate uses."
    ),
    profile: Optional[Path] = typer.Option(
        None, "--profile", metavar="TRACE.json", help="Write a torch profiler trace of the generation."
    ),
    as_json: bool = typer.Option(
        False, "--json", help="Print one JSON object on stdout instead of the table."
    ),
) -> None:
    """Measure generation speed and memory on this machine (random weights unless --model)."""
    from .bench import bench_table, run_bench

    report = _run(
        lambda: run_bench(
            size=size,
            model=model,
            device=device,
            dtype=dtype,
            batch_size=batch_size,
            steps=steps,
            frames=frames,
            compile=compile_model,
            forward_only=forward_only,
            mux=not no_mux,
            tf32=tf32,
            profile=profile,
            console=Console(stderr=True),
        )
    )
    if as_json:
        typer.echo(json.dumps(report, indent=2))
    else:
        Console().print(bench_table(report))


def main() -> None:
    try:
        code = app(prog_name="rflav", standalone_mode=False)
    except typer.Exit as err:
        raise SystemExit(err.exit_code) from None
    except typer.Abort:
        typer.echo("rflav: interrupted", err=True)
        raise SystemExit(130) from None
    except Exception as err:
        # Typer's parser errors (click's, vendored or not): what is wrong, in one line.
        if not (hasattr(err, "format_message") and hasattr(err, "exit_code")):
            raise
        ctx = getattr(err, "ctx", None)
        if type(err).__name__ == "NoArgsIsHelpError" and ctx is not None:  # `rflav` alone
            typer.echo(ctx.get_help(), err=True)
        else:
            where = f" (see '{ctx.command_path} -h')" if ctx is not None else ""
            typer.echo(f"rflav: error: {_one_line(err.format_message()).rstrip('.')}{where}", err=True)
        raise SystemExit(err.exit_code) from None
    raise SystemExit(code if isinstance(code, int) else 0)


def _one_line(text: str) -> str:
    return " ".join(text.split())


if __name__ == "__main__":
    main()
