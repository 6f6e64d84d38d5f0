"""End-to-end generation speed and memory.

    python benchmarks/generate.py --size FLAV-B/1 --device cuda --dtype bf16 --frames 200
    python benchmarks/generate.py --memory            # flat-memory check with a tiny model

Without --model, a random-weight checkpoint of the requested size is built in a temporary
folder (release layout, full SD-VAE and HiFi-GAN configs), so the figures are those of the
real architecture. Prints time to first frame, steady-state frames/s and real-time factor
(sampling + VAE decode + vocoder + MP4 muxing), peak GPU memory and peak resident memory.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rflav_cli.config import FPS, RELEASED_FLAV_CONFIG  # noqa: E402
from rflav_cli.hub import write_side_file  # noqa: E402
from rflav_cli.media import VideoWriter  # noqa: E402
from rflav_cli.models.autoencoder import SD_VAE_CONFIG, AutoencoderKL  # noqa: E402
from rflav_cli.models.flav import FLAV, FLAVConfig  # noqa: E402
from rflav_cli.models.vocoder import HiFiGAN  # noqa: E402
from rflav_cli.pipeline import Pipeline  # noqa: E402

RELEASED_VOCODER = {
    "resblock": "1", "upsample_rates": [5, 4, 4, 2], "upsample_kernel_sizes": [11, 8, 8, 4],
    "upsample_initial_channel": 512, "resblock_kernel_sizes": [3, 7, 11],
    "resblock_dilation_sizes": [[1, 3, 5], [1, 3, 5], [1, 3, 5]], "num_mels": 256, "sampling_rate": 16000,
}
TINY = dict(latent_size=32, patch_size=8, hidden_size=32, depth=1, num_heads=2, predict_frames=4)
TINY_VAE = {**SD_VAE_CONFIG, "block_out_channels": [8, 8, 16, 16], "layers_per_block": 1, "norm_num_groups": 4}
TINY_VOCODER = {**RELEASED_VOCODER, "upsample_initial_channel": 32, "resblock_kernel_sizes": [3],
                "resblock_dilation_sizes": [[1, 3, 5]]}


def _randomise(module: torch.nn.Module, std: float = 0.02) -> None:
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)


def build_checkpoint(folder: Path, size: str, tiny: bool) -> tuple[Path, Path]:
    config = FLAVConfig(**{**RELEASED_FLAV_CONFIG, **TINY}) if tiny else FLAVConfig.from_size(
        size, **{k: v for k, v in RELEASED_FLAV_CONFIG.items() if k not in ("depth", "hidden_size", "num_heads", "patch_size")})
    model = FLAV(config)
    _randomise(model)
    model.save_pretrained(folder / "model")
    vocoder = HiFiGAN(TINY_VOCODER if tiny else RELEASED_VOCODER)
    _randomise(vocoder, 0.05)
    vocoder.save_pretrained(folder / "model" / "vocoder")
    write_side_file(folder / "model", {"audio_scale": 3.5009668382765917})
    vae = AutoencoderKL.from_config(TINY_VAE if tiny else SD_VAE_CONFIG)
    vae.save_pretrained(folder / "vae")
    return folder / "model", folder / "vae"


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run(args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.model:
            model, vae = args.model, args.vae
        else:
            model, vae = build_checkpoint(tmp, args.size, args.tiny)
        t0 = time.perf_counter()
        pipe = Pipeline.from_pretrained(str(model), vae=str(vae) if vae else None, device=args.device, dtype=args.dtype)
        load_s = time.perf_counter() - t0
        if pipe.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        seeds = list(range(args.batch_size))
        writers = [VideoWriter(tmp / f"out{i}.mp4", overwrite=True) for i in seeds] if not args.no_mux else []
        profiler = None
        if args.profile:
            profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU] + (
                [torch.profiler.ProfilerActivity.CUDA] if pipe.device.type == "cuda" else []))
            profiler.__enter__()
        start = time.perf_counter()
        first = None
        stamps = []
        for frame in pipe.generate(num_frames=args.frames, seeds=seeds, steps=args.steps):
            for i, w in enumerate(writers):
                w.write(frame.video[i : i + 1], frame.audio[i])
            now = time.perf_counter()
            if first is None:
                first = now - start
            stamps.append(now)
        for w in writers:
            w.close()
        end = time.perf_counter()
        if profiler is not None:
            profiler.__exit__(None, None, None)
            profiler.export_chrome_trace(args.profile)
        steady = stamps[len(stamps) // 4 :]   # skip the pre-roll and warm-up
        steady_fps = (len(steady) - 1) * args.batch_size / (steady[-1] - steady[0]) if len(steady) > 1 else float("nan")
        result = {
            "device": torch.cuda.get_device_name() if pipe.device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
            "model": args.model or (f"random {args.size}" if not args.tiny else "random tiny"),
            "dtype": str(pipe.dtype).removeprefix("torch."),
            "batch_size": args.batch_size,
            "steps": args.steps,
            "frames": args.frames,
            "load_s": round(load_s, 2),
            "first_frame_s": round(first, 3),
            "steady_frames_per_s": round(steady_fps, 2),
            "real_time_factor": round(steady_fps / FPS, 2),
            "total_s": round(end - start, 2),
            "peak_gpu_mem_gb": round(torch.cuda.max_memory_allocated() / 1e9, 2) if pipe.device.type == "cuda" else None,
            "peak_rss_mb": round(peak_rss_mb(), 1),
        }
        return result


def memory_check(args: argparse.Namespace) -> None:
    """Peak RSS of a short and a six-times-longer tiny run, each in a fresh process."""
    rows = []
    for frames in (args.frames, 6 * args.frames):
        cmd = [sys.executable, __file__, "--tiny", "--device", "cpu", "--dtype", "fp32", "--frames", str(frames), "--json"]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    short, long = rows
    print(f"tiny model, cpu: {short['frames']} frames peak RSS {short['peak_rss_mb']} MB; "
          f"{long['frames']} frames peak RSS {long['peak_rss_mb']} MB; "
          f"ratio {long['peak_rss_mb'] / short['peak_rss_mb']:.3f} (target ≤ 1.1)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="FLAV-B/1")
    p.add_argument("--tiny", action="store_true", help="a tiny random model instead of --size")
    p.add_argument("--model", help="a real checkpoint (preset, repo id or folder) instead of random weights")
    p.add_argument("--vae")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--frames", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--no-mux", action="store_true", help="skip MP4 writing")
    p.add_argument("--profile", metavar="TRACE.json", help="write a torch profiler trace")
    p.add_argument("--memory", action="store_true", help="flat-memory check (tiny model, short vs 6x longer)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    if args.memory:
        memory_check(args)
        return
    result = run(args)
    print(json.dumps(result) if args.json else "\n".join(f"{k:>20}: {v}" for k, v in result.items()))


if __name__ == "__main__":
    main()
