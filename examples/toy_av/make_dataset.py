"""Synthesise a small audio-video dataset in which the sound depends on the picture.

A white ball bounces on a dark background; its height sets the pitch of a tone (higher ball,
higher pitch) and each bounce on the floor makes a click. Every clip has its own bounce period,
phase and colour of background, so a model must look at the picture to get the sound right.

    python examples/toy_av/make_dataset.py data/toy --train 64 --test 16 --seconds 4 --size 32
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np

from rflav_cli.config import FPS, SAMPLE_RATE, SAMPLES_PER_FRAME
from rflav_cli.media import VideoWriter

LOW_HZ, HIGH_HZ = 300.0, 1500.0


def ball_height(t: np.ndarray, period: float, phase: float) -> np.ndarray:
    """Height in [0, 1] of a ball bouncing with the given period (|sin| arcs)."""
    return np.abs(np.sin(math.pi * (t / period + phase)))


def render_clip(rng: np.random.Generator, seconds: float, size: int) -> tuple[np.ndarray, np.ndarray]:
    frames = int(round(seconds * FPS))
    period = rng.uniform(0.8, 2.0)
    phase = rng.uniform(0, 1)
    x = rng.uniform(0.25, 0.75)
    background = rng.uniform(0, 60, size=3)
    radius = max(2.0, size / 6)

    # Video: one frame per 0.1 s.
    t_video = np.arange(frames) / FPS
    heights = ball_height(t_video, period, phase)
    yy, xx = np.mgrid[0:size, 0:size]
    video = np.empty((frames, size, size, 3), np.uint8)
    for k, h in enumerate(heights):
        cy = (1 - h) * (size - 2 * radius) + radius
        disc = (yy - cy) ** 2 + (xx - x * size) ** 2 <= radius**2
        frame = np.broadcast_to(background, (size, size, 3)).copy()
        frame[disc] = 255
        video[k] = frame

    # Audio: tone whose pitch follows the height, plus a click at each bounce.
    t_audio = np.arange(frames * SAMPLES_PER_FRAME) / SAMPLE_RATE
    h_audio = ball_height(t_audio, period, phase)
    freq = LOW_HZ + (HIGH_HZ - LOW_HZ) * h_audio
    tone = 0.3 * np.sin(2 * math.pi * np.cumsum(freq) / SAMPLE_RATE)
    bounces = np.flatnonzero(np.diff(np.floor(t_audio / period + phase)) > 0) + 1
    clicks = np.zeros_like(tone)
    click = 0.6 * np.exp(-np.arange(400) / 60.0) * np.sign(np.sin(np.arange(400) * 0.9))
    for b in bounces:
        end = min(len(clicks), b + len(click))
        clicks[b:end] += click[: end - b]
    return video, np.clip(tone + clicks, -1, 1).astype(np.float32)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path)
    p.add_argument("--train", type=int, default=64)
    p.add_argument("--test", type=int, default=16)
    p.add_argument("--seconds", type=float, default=4.0)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    rng = np.random.default_rng(args.seed)
    for split, count in (("train", args.train), ("test", args.test)):
        folder = args.out / split
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(count):
            video, audio = render_clip(rng, args.seconds, args.size)
            with VideoWriter(
                folder / f"ball-{i:04d}.mp4", width=args.size, height=args.size, overwrite=True
            ) as w:
                w.write(video, audio)
    print(f"wrote {args.train} train and {args.test} test clips to {args.out}")


if __name__ == "__main__":
    main()
