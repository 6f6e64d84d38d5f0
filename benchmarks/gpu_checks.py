"""Checks of the fast paths on the machine they are meant for (CUDA), with random weights of
the released shapes:

1. compiled (`Pipeline(compile=True)`, CUDA graphs) vs eager output of the same seeds;
2. bf16 vs fp32 output, and decoding on a second stream (overlap) vs not, same seeds;
3. the per-frame cost of each stage: one model step over the window, VAE decode, vocoder.

    python benchmarks/gpu_checks.py --size FLAV-B/1 --device cuda
    python benchmarks/gpu_checks.py --size tiny --device cpu        # a quick run anywhere

Prints one JSON object per check.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rflav_cli.bench import build_random_checkpoint, device_name, timed_calls  # noqa: E402
from rflav_cli.models.vocoder import StreamingVocoder  # noqa: E402
from rflav_cli.pipeline import Pipeline  # noqa: E402


def frames_of(pipe: Pipeline, frames: int, seeds: list[int]) -> tuple[np.ndarray, np.ndarray]:
    out = list(pipe.generate(num_frames=frames, seeds=seeds))
    return np.stack([f.video for f in out]), np.stack([f.audio for f in out])


def compare(name: str, a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray]) -> dict:
    video = np.abs(a[0].astype(np.int16) - b[0].astype(np.int16))
    audio = np.abs(a[1] - b[1])
    # Per-frame video difference, to see whether differences grow along the stream.
    per_frame = video.reshape(video.shape[0], -1).mean(axis=1)
    return {
        "check": name,
        "video_max_levels": int(video.max()),
        "video_mean_levels": float(video.mean()),
        "video_mean_levels_first_last": [float(per_frame[0]), float(per_frame[-1])],
        "audio_max": float(audio.max()),
        "audio_rms_ratio": float(np.sqrt((audio**2).mean() / (b[1] ** 2).mean())),
    }


def median_ms(fn, device: torch.device, repeats: int = 10) -> float:
    return statistics.median(timed_calls(fn, device, repeats, warmup=2)[0]) * 1000


def stage_costs(pipe: Pipeline, batch: int) -> dict:
    cfg, device = pipe.model.config, pipe.device
    g = torch.Generator().manual_seed(0)
    v = torch.randn(
        batch, cfg.predict_frames, cfg.in_channels, cfg.latent_size, cfg.latent_size, generator=g
    ).to(device)
    a = torch.randn(batch, cfg.predict_frames, 1, cfg.n_mels, 10, generator=g).to(device)
    t = (torch.rand(batch, cfg.predict_frames, generator=g) * 999 + 1).to(device)
    velocity = pipe._velocity(None, batch, 1.0)
    latents = v[:, 0]
    vocoder = StreamingVocoder(pipe.vocoder)
    mel = torch.randn(batch, cfg.n_mels, 10, generator=g).to(device) - 5

    with torch.no_grad():
        step = median_ms(lambda: velocity(v, a, t), device)
        decode = median_ms(lambda: pipe.decode_latents(latents).numpy(), device)
        vocode = median_ms(lambda: vocoder.push(mel), device)
    return {
        "check": "stage cost per frame",
        "batch": batch,
        "compiled": pipe.compile,
        "dtype": str(pipe.dtype).removeprefix("torch."),
        "model_step_ms": round(step, 3),
        "model_steps_per_frame": 2,
        "vae_decode_ms": round(decode, 3),
        "vocoder_ms": round(vocode, 3),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="FLAV-B/1")
    p.add_argument("--device", default="cuda")
    p.add_argument("--frames", type=int, default=16)
    p.add_argument("--batch", default="1,16", help="batch sizes for the stage costs")
    args = p.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        model, vae = build_random_checkpoint(tmp, args.size)
        load = dict(vae=str(vae), device=args.device)
        eager = Pipeline.from_pretrained(str(model), dtype="bf16", **load)
        print(
            json.dumps({"device": device_name(eager.device), "torch": torch.__version__, "size": args.size})
        )
        seeds = [0, 1]
        reference = frames_of(eager, args.frames, seeds)

        serial = Pipeline.from_pretrained(str(model), dtype="bf16", overlap=False, **load)
        print(
            json.dumps(
                compare(
                    "overlap off vs on (bf16, eager; expect 0)",
                    frames_of(serial, args.frames, seeds),
                    reference,
                )
            ),
            flush=True,
        )
        del serial

        fp32 = Pipeline.from_pretrained(str(model), dtype="fp32", **load)
        print(
            json.dumps(compare("bf16 vs fp32 (eager)", reference, frames_of(fp32, args.frames, seeds))),
            flush=True,
        )
        del fp32

        start = time.perf_counter()
        compiled = Pipeline.from_pretrained(str(model), dtype="bf16", compile=True, **load)
        fast = frames_of(compiled, args.frames, seeds)
        print(
            json.dumps(
                {
                    **compare("compiled vs eager (bf16)", fast, reference),
                    "first_run_s_incl_compile": round(time.perf_counter() - start, 1),
                }
            ),
            flush=True,
        )

        for batch in [int(b) for b in args.batch.split(",")]:
            for pipe in (eager, compiled):
                print(json.dumps(stage_costs(pipe, batch)), flush=True)


if __name__ == "__main__":
    main()
