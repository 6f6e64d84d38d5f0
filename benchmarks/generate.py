"""End-to-end generation speed and memory.

    python benchmarks/generate.py --size FLAV-B/1 --device cuda --dtype bf16 --frames 200
    python benchmarks/generate.py --memory            # flat-memory check with a tiny model

Without --model, a random-weight checkpoint of the requested size is built in a temporary
folder (release layout, full SD-VAE and HiFi-GAN configs), so the figures are those of the
real architecture. Prints time to first frame, steady-state frames/s and real-time factor
(sampling + VAE decode + vocoder + MP4 muxing), peak GPU memory and peak resident memory.
The measuring is `rflav_cli.bench.time_generation` (also `rflav bench`).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rflav_cli.bench import time_generation  # noqa: E402
from rflav_cli.runtime import auto_compile, pick_device  # noqa: E402


def run(args: argparse.Namespace) -> dict:
    if args.defaults:  # what `rflav generate` does when no flag says otherwise
        device = pick_device(args.device)
        args.compile = False
        args.background_compile = auto_compile(device, args.frames)
    r = time_generation(
        args.model,
        "tiny" if args.tiny else args.size,
        vae=args.vae,
        device=args.device,
        dtype=args.dtype,
        batch_size=args.batch_size,
        steps=args.steps,
        frames=args.frames,
        mux=not args.no_mux,
        compile=args.compile or args.background_compile,
        compile_in_background=args.background_compile,
        cuda_graph=args.cuda_graph,
        overlap=not args.no_overlap,
        profile=args.profile,
    )
    return {
        "impl": "rflav",
        "compiled": "background" if args.background_compile else bool(args.compile),
        "cuda_graph": args.cuda_graph,
        "mux": not args.no_mux,
        "device": r.device,
        "model": r.model,
        "dtype": r.dtype,
        "batch_size": r.batch_size,
        "steps": r.steps,
        "frames": r.frames,
        "load_s": round(r.load_s, 2),
        "first_frame_s": round(r.first_frame_s, 3),
        "steady_frames_per_s": round(r.steady_frames_per_s, 2),
        "real_time_factor": round(r.real_time_factor, 2),
        "total_s": round(r.total_s, 2),
        "peak_gpu_mem_gb": None if r.peak_gpu_mem_gb is None else round(r.peak_gpu_mem_gb, 2),
        "peak_rss_mb": round(r.peak_rss_mb, 1),
    }


def memory_check(args: argparse.Namespace) -> None:
    """Peak RSS of a short and a six-times-longer tiny run, each in a fresh process."""
    rows = []
    for frames in (args.frames, 6 * args.frames):
        cmd = [
            sys.executable,
            __file__,
            "--tiny",
            "--device",
            "cpu",
            "--dtype",
            "fp32",
            "--frames",
            str(frames),
            "--json",
        ]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    short, long = rows
    print(
        f"tiny model, cpu: {short['frames']} frames peak RSS {short['peak_rss_mb']} MB; "
        f"{long['frames']} frames peak RSS {long['peak_rss_mb']} MB; "
        f"ratio {long['peak_rss_mb'] / short['peak_rss_mb']:.3f} (target ≤ 1.1)"
    )


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
    p.add_argument(
        "--compile", action="store_true", help="compile the rolling step (the first frame waits for it)"
    )
    p.add_argument(
        "--background-compile",
        action="store_true",
        help="compile on a thread while eager frames stream (generate's default way of compiling)",
    )
    p.add_argument(
        "--defaults",
        action="store_true",
        help="compile or not as `rflav generate` decides by default (overrides --compile)",
    )
    p.add_argument(
        "--cuda-graph",
        action="store_true",
        help="uncompiled: replay each full-window model call as a CUDA graph of the eager kernels",
    )
    p.add_argument("--no-overlap", action="store_true", help="CUDA: decode and vocode on the sampling stream")
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
