"""Audio-video agreement of toy clips: does the pitch follow the ball?

For every clip the ball's height per frame is read from the picture (the row of the bright
pixels) and the pitch per frame from the sound (the strongest frequency between 200 and
1800 Hz). The score of a clip is the correlation between the two series. The baseline pairs
each video with the audio of another clip (shuffled); a model that learned the link scores
clearly above it.

    python examples/toy_av/score.py generated/ [--seed 0]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from rflav_cli.config import SAMPLE_RATE, SAMPLES_PER_FRAME
from rflav_cli.media import probe, read_audio, read_video_frames


def ball_heights(path: Path) -> np.ndarray:
    size = probe(path).height
    heights = []
    for frame in read_video_frames(path, size=size):
        bright = frame.mean(axis=2) > 160
        rows = np.flatnonzero(bright.any(axis=1))
        heights.append(1 - rows.mean() / size if rows.size else np.nan)
    return np.asarray(heights)


def pitches(path: Path, frames: int) -> np.ndarray:
    audio = read_audio(path)
    window = np.hanning(SAMPLES_PER_FRAME)
    freqs = np.fft.rfftfreq(SAMPLES_PER_FRAME, 1 / SAMPLE_RATE)
    band = (freqs > 200) & (freqs < 1800)
    out = []
    for k in range(frames):
        chunk = audio[k * SAMPLES_PER_FRAME : (k + 1) * SAMPLES_PER_FRAME]
        if len(chunk) < SAMPLES_PER_FRAME:
            out.append(np.nan)
            continue
        spectrum = np.abs(np.fft.rfft(chunk * window))
        out.append(freqs[band][np.argmax(spectrum[band])])
    return np.asarray(out)


def correlation(a: np.ndarray, b: np.ndarray) -> float:
    n = min(len(a), len(b))
    a, b = a[:n], b[:n]
    ok = np.isfinite(a) & np.isfinite(b)
    if ok.sum() < 3 or np.std(a[ok]) == 0 or np.std(b[ok]) == 0:
        return 0.0
    return float(np.corrcoef(a[ok], b[ok])[0, 1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder", type=Path)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    files = sorted(args.folder.rglob("*.mp4"))
    if len(files) < 2:
        raise SystemExit(f"{args.folder}: need at least two MP4 files")
    heights = [ball_heights(f) for f in files]
    sounds = [pitches(f, len(h)) for f, h in zip(files, heights)]
    matched = [correlation(h, s) for h, s in zip(heights, sounds)]
    rng = np.random.default_rng(args.seed)
    order = rng.permutation(len(files))
    while len(files) > 1 and np.any(order == np.arange(len(files))):
        order = rng.permutation(len(files))
    shuffled = [correlation(heights[i], sounds[j]) for i, j in enumerate(order)]
    print(f"clips: {len(files)}")
    print(
        f"agreement (matched audio):  {np.mean(matched):+.3f} ± {np.std(matched) / np.sqrt(len(files)):.3f}"
    )
    print(
        f"baseline (shuffled audio): {np.mean(shuffled):+.3f} ± {np.std(shuffled) / np.sqrt(len(files)):.3f}"
    )


if __name__ == "__main__":
    main()
