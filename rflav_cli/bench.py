"""Speed benchmarks: one FLAV forward, and end-to-end streamed generation.

What `rflav bench` and the scripts in `benchmarks/` measure, as functions. Without a real
checkpoint, the weights are random but the shapes are those of the released architecture
(FLAV of a size, the full SD-VAE and HiFi-GAN), so the timings are the real ones.
"""

from __future__ import annotations

import copy
import os
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from . import __version__
from .config import FLAV_SIZES, FPS, RELEASED_FLAV_CONFIG
from .errors import UsageError
from .hub import PRESETS, resolve_model, write_side_file
from .media import VideoWriter
from .models.autoencoder import SD_VAE_CONFIG, AutoencoderKL
from .models.flav import FLAV, FLAVConfig
from .models.vocoder import HiFiGAN
from .pipeline import Pipeline
from .progress import progress_bar
from .runtime import (
    compile_failure_message,
    is_compile_error,
    pick_device,
    pick_dtype,
    tf32_scope,
    use_tf32,
)

TINY = "tiny"
SIZES: tuple[str, ...] = (TINY, *FLAV_SIZES)

RELEASED_VOCODER_CONFIG: dict[str, object] = {
    "resblock": "1",
    "upsample_rates": [5, 4, 4, 2],
    "upsample_kernel_sizes": [11, 8, 8, 4],
    "upsample_initial_channel": 512,
    "resblock_kernel_sizes": [3, 7, 11],
    "resblock_dilation_sizes": [[1, 3, 5], [1, 3, 5], [1, 3, 5]],
    "num_mels": 256,
    "sampling_rate": 16000,
}
# Same frame and mel sizes as the release (256×256 video, 256 mels), a fraction of the compute.
TINY_FLAV = dict(latent_size=32, patch_size=8, hidden_size=32, depth=1, num_heads=2, predict_frames=4)
TINY_VAE_CONFIG = {
    **SD_VAE_CONFIG,
    "block_out_channels": [8, 8, 16, 16],
    "layers_per_block": 1,
    "norm_num_groups": 4,
}
TINY_VOCODER_CONFIG = {
    **RELEASED_VOCODER_CONFIG,
    "upsample_initial_channel": 32,
    "resblock_kernel_sizes": [3],
    "resblock_dilation_sizes": [[1, 3, 5]],
}
WEIGHT_STD = 0.02  # a trained DiT's weight scale
STEADY_SKIP = 4  # steady-state rate: skip the first 1/STEADY_SKIP of the frames (pre-roll, warm-up)

StatusCallback = Callable[[str], None]
FrameCallback = Callable[[int], None]


# ----------------------------------------------------------------------------------------
# Validation and small helpers
# ----------------------------------------------------------------------------------------


def check_size(size: str) -> str:
    """`size` if it is tiny or a FLAV size name, else a UsageError listing the choices."""
    if size not in SIZES:
        raise UsageError(f"unknown size {size!r}: choose one of {', '.join(SIZES)}")
    return size


def check_positive(flag: str, value: int, minimum: int = 1, why: str = "") -> None:
    """UsageError naming `flag` when `value` is below `minimum`."""
    if value < minimum:
        raise UsageError(f"{flag} must be at least {minimum}{why}, got {value}")


def check_generation_request(
    size: str, model: str | None, device: str, dtype: str, batch_size: int, steps: int, frames: int
) -> None:
    """UsageError for a generation benchmark that cannot run, before any work is done."""
    check_positive("--frames", frames, 2, " (the steady rate needs two frames)")
    check_positive("--steps", steps)
    check_positive("--batch-size", batch_size)
    if model is None:
        check_size(size)
    pick_dtype(dtype, pick_device(device))


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so a wall-clock reading covers it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def timed_calls(
    fn: Callable[[], object], device: torch.device, repeats: int, warmup: int = 0
) -> tuple[list[float], object]:
    """Wall-clock seconds of `repeats` calls of `fn` after `warmup` untimed ones, the device
    synchronised around each call; and the last call's result."""
    for _ in range(warmup):
        fn()
    times, out = [], None
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        out = fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return times, out


def device_name(device: torch.device) -> str:
    """Human name of the device: the GPU model, or the CPU with its thread count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "mps":
        return "Apple MPS"
    return f"cpu ({torch.get_num_threads()} threads)"


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


def _randomise(module: torch.nn.Module, std: float, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)


# ----------------------------------------------------------------------------------------
# Random checkpoints of the released shapes
# ----------------------------------------------------------------------------------------


def flav_config(size: str, window: int | None = None) -> FLAVConfig:
    """The released FLAV configuration at another size (`tiny` or a FLAV size name)."""
    check_size(size)
    if size == TINY:
        config = {**RELEASED_FLAV_CONFIG, **TINY_FLAV}
    else:
        architecture = ("depth", "hidden_size", "num_heads", "patch_size")
        config = {
            **{k: v for k, v in RELEASED_FLAV_CONFIG.items() if k not in architecture},
            **FLAV_SIZES[size],
        }
    if window is not None:
        check_positive("window", window)
        config["predict_frames"] = window
    return FLAVConfig(**config)


def random_flav(size: str, window: int | None = None) -> FLAV:
    """A float32 FLAV of `size` with seeded random weights (std 0.02), in eval mode, on CPU."""
    model = FLAV(flav_config(size, window))
    _randomise(model, WEIGHT_STD)
    return model.eval()


def build_random_checkpoint(folder: str | Path, size: str) -> tuple[Path, Path]:
    """Write a random-weight checkpoint in the release layout: `folder/model` (FLAV of `size`,
    HiFi-GAN in `vocoder/`, `rflav.json`) and `folder/vae` (SD-VAE). `tiny` shrinks every
    network but keeps the frame and mel sizes. Returns (model folder, VAE folder)."""
    folder = Path(folder)
    tiny = check_size(size) == TINY
    model_dir, vae_dir = folder / "model", folder / "vae"
    random_flav(size).save_pretrained(model_dir)
    vocoder = HiFiGAN(TINY_VOCODER_CONFIG if tiny else RELEASED_VOCODER_CONFIG)
    _randomise(vocoder, 0.05)
    vocoder.save_pretrained(model_dir / "vocoder")
    write_side_file(model_dir, {"audio_scale": PRESETS["dance"].audio_scale})
    AutoencoderKL.from_config(TINY_VAE_CONFIG if tiny else SD_VAE_CONFIG).save_pretrained(vae_dir)
    return model_dir, vae_dir


# ----------------------------------------------------------------------------------------
# One forward
# ----------------------------------------------------------------------------------------


@dataclass
class ForwardResult:
    """Timing of one FLAV forward over the whole rolling window."""

    model: str  # "random FLAV-B/1" or the checkpoint given
    device: str  # device name
    dtype: str
    batch: int
    window: int
    steps: int  # model evaluations per frame, for frames_per_s
    compiled: bool
    tf32: bool  # float32 products in TensorFloat-32 (CUDA only)
    times_s: list[float]  # one per repeat, after a warm-up call
    median_s: float
    frames_per_s: float  # model only: batch / (steps × median)
    relative_error: float  # ‖y − y_fp32‖ / ‖y_fp32‖ over both outputs

    @property
    def forward_ms(self) -> float:
        return self.median_s * 1000

    def to_dict(self) -> dict:
        return {**asdict(self), "forward_ms": self.forward_ms}


def forward_inputs(config: FLAVConfig, batch: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """Seeded (video, audio, time) inputs of a full window."""
    g = torch.Generator().manual_seed(1)
    v = torch.randn(
        batch, config.predict_frames, config.in_channels, config.latent_size, config.latent_size, generator=g
    )
    a = torch.randn(batch, config.predict_frames, 1, config.n_mels, 10, generator=g)
    t = torch.rand(batch, config.predict_frames, generator=g) * 999 + 1
    return v.to(device), a.to(device), t.to(device)


def relative_error(outputs: tuple[torch.Tensor, ...], reference: tuple[torch.Tensor, ...]) -> float:
    """‖outputs − reference‖ / ‖reference‖ over all tensors together, in float32."""
    diff = torch.cat([(o.float() - r.float()).flatten() for o, r in zip(outputs, reference)])
    ref = torch.cat([r.float().flatten() for r in reference])
    return (diff.norm() / ref.norm()).item()


def time_forward(
    size: str = "FLAV-B/1",
    device: str = "auto",
    dtype: str = "auto",
    batch: int = 1,
    window: int | None = None,
    repeats: int = 3,
    compile: bool = False,
    *,
    steps: int = 2,
    model: str | None = None,
    reference: FLAV | None = None,
    tf32: bool = True,
) -> ForwardResult:
    """Median time of one forward of the whole window (after a warm-up call, CUDA synchronised
    around each call) and its relative error against float32 weights in full float32 (so that
    `tf32` on CUDA shows its own error).

    `model` (preset, repo id or folder) times a real checkpoint instead of random weights of
    `size`. `reference` reuses an already built float32 model (e.g. across dtypes); it must
    be on `device`."""
    check_positive("batch", batch)
    check_positive("repeats", repeats)
    check_positive("steps", steps)
    torch_device = pick_device(device)
    torch_dtype = pick_dtype(dtype, torch_device)
    use_tf32(torch_device, tf32)  # as the pipeline runs float32
    if reference is None:
        reference = _load_reference(size, window, model).to(torch_device)
    if window is not None and window != reference.window:
        raise ValueError(f"window {window} differs from the model's {reference.window}")
    name = f"random {size}" if model is None else model
    net = (
        reference
        if torch_dtype == torch.float32 and not compile
        else copy.deepcopy(reference).to(torch_dtype)
    )
    if compile:  # compiled as the pipeline compiles it (replayed as a CUDA graph on GPUs)
        net.compile_blocks()
    inputs = forward_inputs(reference.config, batch, torch_device)
    # A class-conditional checkpoint is timed on its first class.
    labels = torch.zeros(batch, dtype=torch.long, device=torch_device) if reference.num_classes else None

    with torch.no_grad():
        with tf32_scope(torch_device, enabled=False):  # the error is against full float32
            expected = reference(*inputs, labels)
        # Warm-up: eager caches; compiled, also the compilation and the CUDA graph's capture.
        times, out = timed_calls(
            lambda: net(*inputs, labels), torch_device, repeats, warmup=3 if compile else 1
        )
    median = statistics.median(times)
    return ForwardResult(
        model=name,
        device=device_name(torch_device),
        dtype=dtype_name(torch_dtype),
        batch=batch,
        window=reference.window,
        steps=steps,
        compiled=compile,
        tf32=tf32 and torch_device.type == "cuda" and torch_dtype == torch.float32,
        times_s=times,
        median_s=median,
        frames_per_s=batch / (steps * median),
        relative_error=relative_error(out, expected),
    )


def _load_reference(size: str, window: int | None, model: str | None) -> FLAV:
    if model is None:
        return random_flav(size, window)
    folder = resolve_model(model, need_vocoder=False).folder
    return FLAV.from_pretrained(folder, dtype=torch.float32).eval()


# ----------------------------------------------------------------------------------------
# End-to-end generation
# ----------------------------------------------------------------------------------------


@dataclass
class GenerationResult:
    """Streamed generation: sampling + VAE decode + vocoder (+ MP4 muxing when `muxed`)."""

    model: str
    device: str
    dtype: str
    batch_size: int
    steps: int
    frames: int  # frames requested per sample
    frames_generated: int  # frames that came out per sample
    load_s: float  # building the pipeline (weights read, moved, cast)
    first_frame_s: float  # start of generation → first frame out (includes the pre-roll)
    steady_frames_per_s: float  # all samples together, without the first quarter of the frames
    real_time_factor: float  # steady video seconds per wall second (frames/s ÷ 10)
    total_s: float  # start of generation → last frame out (and files closed)
    peak_gpu_mem_gb: float | None
    peak_rss_mb: float
    muxed: bool
    compiled: bool
    outputs: list[str] = field(default_factory=list)  # MP4s kept (with `video_dir`)

    def to_dict(self) -> dict:
        return asdict(self)


def steady_rate(stamps: list[float], batch_size: int) -> float:
    """Frames per second between frame arrival times, skipping the pre-roll and warm-up."""
    steady = stamps[len(stamps) // STEADY_SKIP :]
    if len(steady) < 2 or steady[-1] <= steady[0]:
        return float("nan")
    return (len(steady) - 1) * batch_size / (steady[-1] - steady[0])


def time_generation(
    model: str | None = None,
    size: str = "FLAV-B/1",
    *,
    vae: str | None = None,
    device: str = "auto",
    dtype: str = "auto",
    batch_size: int = 1,
    steps: int = 2,
    frames: int = 50,
    mux: bool = True,
    compile: bool = False,
    overlap: bool = True,
    tf32: bool = True,
    compile_in_background: bool = False,
    cuda_graph: bool = False,
    profile: str | Path | None = None,
    video_dir: str | Path | None = None,
    on_status: StatusCallback | None = None,
    on_frame: FrameCallback | None = None,
) -> GenerationResult:
    """Generate `frames` frames of `batch_size` samples through :class:`Pipeline` and time it.

    Without `model`, a random checkpoint of `size` is built in a temporary folder first (not
    timed). The clock starts after the weights are loaded. Each sample is written to an MP4
    (unless `mux` is False) in `video_dir`, or a temporary folder removed afterwards.
    `profile` writes a torch profiler trace of the generation (its overhead is in the timings).
    `on_status(text)` hears each stage, `on_frame(n)` each frame."""
    check_generation_request(size, model, device, dtype, batch_size, steps, frames)
    status = on_status or (lambda text: None)

    with tempfile.TemporaryDirectory(prefix="rflav-bench-") as tmp:
        model_dir, vae_dir = model, vae
        if model is None:
            status(f"building a random {size} checkpoint")
            model_dir, built_vae = build_random_checkpoint(Path(tmp) / "checkpoint", size)
            vae_dir = vae or str(built_vae)
        status(f"loading {model or 'random ' + size}")
        start = time.perf_counter()
        pipe = Pipeline.from_pretrained(
            str(model_dir),
            vae=vae_dir,
            device=device,
            dtype=dtype,
            compile=compile,
            compile_in_background=compile_in_background,
            cuda_graph=cuda_graph,
            overlap=overlap,
            tf32=tf32,
        )
        synchronize(pipe.device)
        load_s = time.perf_counter() - start
        if pipe.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(pipe.device)

        seeds = list(range(batch_size))
        out_dir = Path(video_dir) if video_dir is not None else Path(tmp)
        writers = []
        if mux:
            out_dir.mkdir(parents=True, exist_ok=True)
            writers = [
                VideoWriter(
                    out_dir / f"bench-{i}.mp4", overwrite=True, width=pipe.image_size, height=pipe.image_size
                )
                for i in seeds
            ]
        label = 0 if pipe.model.num_classes > 0 else None
        profiler = None
        if profile is not None:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if pipe.device.type == "cuda":
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            profiler = torch.profiler.profile(activities=activities)
        status(f"generating {frames} frames")
        stamps: list[float] = []
        try:
            if profiler is not None:
                profiler.__enter__()
            synchronize(pipe.device)
            start = time.perf_counter()
            # A frame reaches the host only when its GPU work is done, so its arrival time is honest.
            for frame in pipe.generate(num_frames=frames, seeds=seeds, steps=steps, label=label):
                for i, writer in enumerate(writers):
                    writer.write(frame.video[i : i + 1], frame.audio[i])
                stamps.append(time.perf_counter())
                if on_frame is not None:
                    on_frame(len(stamps))
            for writer in writers:
                writer.close()
            synchronize(pipe.device)
            end = time.perf_counter()
        except BaseException:
            for writer in writers:
                writer.abort()
            raise
        finally:
            if profiler is not None:
                profiler.__exit__(None, None, None)
        if profiler is not None:
            profiler.export_chrome_trace(str(profile))

        fps = steady_rate(stamps, batch_size)
        return GenerationResult(
            model=model or f"random {size}",
            device=device_name(pipe.device),
            dtype=dtype_name(pipe.dtype),
            batch_size=batch_size,
            steps=steps,
            frames=frames,
            frames_generated=len(stamps),
            load_s=load_s,
            first_frame_s=stamps[0] - start,
            steady_frames_per_s=fps,
            real_time_factor=fps / FPS,
            total_s=end - start,
            peak_gpu_mem_gb=torch.cuda.max_memory_allocated(pipe.device) / 1e9
            if pipe.device.type == "cuda"
            else None,
            peak_rss_mb=peak_rss_mb(),
            muxed=mux,
            compiled=compile,
            outputs=[str(w.path) for w in writers] if video_dir is not None else [],
        )


# ----------------------------------------------------------------------------------------
# `rflav bench`
# ----------------------------------------------------------------------------------------

FORWARD_REPEATS = 5


def run_bench(
    *,
    size: str = "FLAV-B/1",
    model: str | None = None,
    device: str = "auto",
    dtype: str = "auto",
    batch_size: int = 1,
    steps: int = 2,
    frames: int | None = None,
    compile: bool = False,
    forward_only: bool = False,
    mux: bool = True,
    profile: str | Path | None = None,
    console: Console | None = None,
    tf32: bool = True,
) -> dict:
    """What `rflav bench` does: end-to-end generation (unless `forward_only`), then one
    forward of the same model, with a progress display on `console` (stderr by default).
    Generation runs first so that the peak resident memory is that of generation. `frames`
    defaults to 50 on GPUs and 8 elsewhere (a CPU takes seconds per frame of FLAV-B/1)."""
    # Every check before any work, so bad input costs nothing and prints one line.
    if frames is None:
        frames = 50 if pick_device(device).type == "cuda" else 8
    check_generation_request(size, model, device, dtype, batch_size, steps, frames)
    if profile is not None:
        if forward_only:
            raise UsageError("--profile traces the generation; drop --forward-only")
        folder = Path(profile).expanduser().resolve().parent
        if not folder.is_dir():
            raise UsageError(f"--profile {profile}: its folder does not exist")
        if not os.access(folder, os.W_OK | os.X_OK):
            raise UsageError(f"--profile {profile}: no permission to write in {folder}")

    console = console or Console(stderr=True)
    # A light display thread: it shares the CPU being timed.
    progress = progress_bar(
        console=console, spinner=True, remaining=False, transient=True, refresh_per_second=4
    )
    with progress:
        task = progress.add_task("starting", total=None)

        def status(text: str) -> None:
            progress.update(task, description=text, total=None, completed=0)

        try:
            generation = None
            if not forward_only:

                def frame_done(done: int) -> None:
                    progress.update(task, total=frames, completed=done)

                generation = time_generation(
                    model,
                    size,
                    device=device,
                    dtype=dtype,
                    batch_size=batch_size,
                    steps=steps,
                    frames=frames,
                    mux=mux,
                    compile=compile,
                    tf32=tf32,
                    profile=profile,
                    on_status=status,
                    on_frame=frame_done,
                )
            status(f"timing one forward ({FORWARD_REPEATS} repeats)")
            forward = time_forward(
                size,
                device,
                dtype,
                batch=batch_size,
                repeats=FORWARD_REPEATS,
                compile=compile,
                steps=steps,
                model=model,
                tf32=tf32,
            )
        except Exception as err:
            if compile and is_compile_error(err):
                raise UsageError(compile_failure_message(err)) from err
            raise
    return {
        "model": forward.model,
        "device": forward.device,
        "dtype": forward.dtype,
        "batch_size": batch_size,
        "steps": steps,
        "compiled": compile,
        "forward": forward.to_dict(),
        "generation": generation.to_dict() if generation is not None else None,
        "peak_rss_mb": generation.peak_rss_mb if generation is not None else peak_rss_mb(),
        "torch": torch.__version__,
        "rflav": __version__,
    }


def bench_table(report: dict) -> Table:
    """The figures of :func:`run_bench` as a two-column table."""
    forward, generation = report["forward"], report["generation"]
    table = Table(title=f"rflav bench: {report['model']}", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column(justify="right")
    table.add_row("device", report["device"])
    table.add_row("dtype", report["dtype"] + (", compiled" if report["compiled"] else ""))
    table.add_row(
        f"forward (window {forward['window']}, batch {forward['batch']})", f"{forward['forward_ms']:.1f} ms"
    )
    table.add_row(f"model-only frames/s ({report['steps']} steps)", f"{forward['frames_per_s']:.3g}")
    table.add_row("error vs fp32", f"{forward['relative_error']:.1e}")
    if generation is not None:
        table.add_row("load", f"{generation['load_s']:.2f} s")
        table.add_row("time to first frame", f"{generation['first_frame_s']:.2f} s")
        table.add_row(
            f"steady frames/s ({generation['frames']} frames)", f"{generation['steady_frames_per_s']:.2f}"
        )
        table.add_row("real-time factor", f"{generation['real_time_factor']:.2f}×")
        gpu = generation["peak_gpu_mem_gb"]
        table.add_row("peak GPU memory", "—" if gpu is None else f"{gpu:.2f} GB")
    table.add_row("peak RSS", f"{report['peak_rss_mb']:.0f} MB")
    return table
