"""What writing the MP4 costs a sampler whose speed is set by the host: on a GPU, eager sampling
is a Python loop queueing small kernels, so anything that takes the interpreter away from it
(threads waking for the GIL, copies) slows every frame. Simulated here on the CPU by a loop of
small torch ops per frame, timed alone and while each frame (256×256 RGB, its 1,600 samples of
audio) goes through media.VideoWriter.

    python benchmarks/mux_overhead.py [--frames 150] [--ops 600] [--size 256] [--batch 1]

Prints frames/s without and with muxing and their ratio (alternating runs, median of each).
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

from rflav_cli.media import VideoWriter  # noqa: E402


def host_bound_step(x: torch.Tensor, ops: int) -> torch.Tensor:
    for _ in range(ops):  # small ops: the time is the interpreter's and the dispatcher's
        x = x * 0.999 + 0.001
    return x


def run(frames: int, ops: int, size: int, batch: int, mux: bool, folder: Path) -> float:
    rng = np.random.default_rng(0)
    video = rng.integers(0, 256, (frames, size, size, 3), dtype=np.uint8)
    audio = rng.uniform(-0.5, 0.5, (frames, 1600)).astype(np.float32)
    writers = [
        VideoWriter(folder / f"mux-{i}.mp4", width=size, height=size, overwrite=True)
        for i in range(batch if mux else 0)
    ]
    x = torch.zeros(64)
    start = time.perf_counter()
    for f in range(frames):
        x = host_bound_step(x, ops)
        for w in writers:
            w.write(video[f], audio[f])
    elapsed = time.perf_counter() - start  # the sampler's time; finishing the files is not in it
    for w in writers:
        w.close()
    return frames / elapsed


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--frames", type=int, default=150)
    p.add_argument(
        "--ops", type=int, default=600, help="small torch ops per frame (sets the host-bound rate)"
    )
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--batch", type=int, default=1, help="MP4 files written at once")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    torch.set_num_threads(1)
    plain, muxed = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.repeats):
            plain.append(run(args.frames, args.ops, args.size, args.batch, False, Path(tmp)))
            muxed.append(run(args.frames, args.ops, args.size, args.batch, True, Path(tmp)))
    a, b = statistics.median(plain), statistics.median(muxed)
    print(
        json.dumps(
            {"no_mux_fps": round(a, 1), "mux_fps": round(b, 1), "ratio": round(b / a, 3), **vars(args)}
        )
    )


if __name__ == "__main__":
    main()
