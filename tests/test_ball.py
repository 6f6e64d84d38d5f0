"""The `ball` checkpoint that ships inside the package: offline, fast, and the sound follows
the picture (scored by the toy example's own pitch-vs-height agreement)."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from rflav_cli.hub import PRESETS, resolve_model

pytestmark = pytest.mark.skipif(shutil.which("ffprobe") is None, reason="needs ffprobe to inspect outputs")

ROOT = Path(__file__).resolve().parents[1]
MAX_PACKAGED_BYTES = 20 * 1024 * 1024


def _score_module():
    spec = importlib.util.spec_from_file_location("toy_score", ROOT / "examples" / "toy_av" / "score.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _refused_endpoint() -> str:
    """An address on this machine where nothing listens: any Hub request is refused."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def _offline_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_HOME=str(tmp_path / "hf"), HF_ENDPOINT=_refused_endpoint())
    return env


def _rflav(*args: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "rflav_cli", *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
    )


def _ffprobe(path: Path) -> dict:
    out = subprocess.run(
        ["ffprobe", "-v", "error", "-count_frames", "-show_streams", "-of", "json", str(path)],
        capture_output=True,
        text=True,
        check=True,
    )
    return {s["codec_type"]: s for s in json.loads(out.stdout)["streams"]}


def test_ball_ships_inside_the_package():
    preset = PRESETS["ball"]
    folder = preset.packaged_folder
    assert folder is not None and folder.is_relative_to(ROOT / "rflav_cli")
    size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    assert size <= MAX_PACKAGED_BYTES
    resolved = resolve_model("ball", need_vocoder=False)
    assert resolved.folder == folder and resolved.preset == "ball"
    side = json.loads((folder / "rflav.json").read_text())
    assert side["vocoder"] == "griffin-lim" and side["audio_scale"] > 0 and side["pixel_space"] is True


def test_generate_ball_offline(tmp_path):
    """The README's first command, with the Hub unreachable: an MP4 of 5 s with sound."""
    proc = _rflav("generate", "--class", "ball", "--seconds", "5", env=_offline_env(tmp_path), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "ball-seed0.mp4"
    streams = _ffprobe(out)
    assert int(streams["video"]["nb_read_frames"]) == 50
    assert int(streams["video"]["width"]) == int(streams["video"]["height"]) == 32
    assert int(streams["audio"]["sample_rate"]) == 16000
    assert abs(float(streams["audio"]["duration"]) - 5.0) < 0.1
    sidecar = json.loads(out.with_suffix(".json").read_text())
    assert sidecar["vocoder"] == "griffin-lim" and sidecar["frames"] == 50


def test_ball_sound_follows_the_picture(tmp_path):
    """8 clips of 5 s: the pitch tracks the ball's height (agreement ≥ 0.6), while pairing each
    video with another clip's sound does not (baseline near 0)."""
    env = _offline_env(tmp_path)
    proc = _rflav(
        "generate",
        "--class",
        "ball",
        "--seconds",
        "5",
        "--num-samples",
        "8",
        "--batch-size",
        "8",
        "-o",
        "clips",
        "-q",
        env=env,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    score = _score_module()
    files = sorted((tmp_path / "clips").glob("*.mp4"))
    assert len(files) == 8
    heights = [score.ball_heights(f) for f in files]
    assert all(np.isfinite(h).mean() > 0.9 for h in heights), "the ball is missing from frames"
    sounds = [score.pitches(f, len(h)) for f, h in zip(files, heights)]
    matched = np.mean([score.correlation(h, s) for h, s in zip(heights, sounds)])
    # The baseline pairs each video with every other clip's sound (56 pairs, steadier than one
    # shuffle): periodic heights and pitches of unrelated clips correlate by chance only.
    shuffled = np.mean(
        [
            score.correlation(heights[i], sounds[j])
            for i in range(len(files))
            for j in range(len(files))
            if i != j
        ]
    )
    assert matched >= 0.6, f"agreement {matched:.3f}"
    assert abs(shuffled) < 0.2, f"baseline {shuffled:.3f}"
