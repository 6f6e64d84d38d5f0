"""`rflav eval` and `rflav drift` end to end, with the formula weights in the original file layouts."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys

import pytest
import torch
from typer.testing import CliRunner

import formula_weights
from conftest import FIXTURES
from rflav_cli.cli import app
from rflav_cli.media import find_ffmpeg


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    folder = tmp_path_factory.mktemp("weights")
    torch.save(formula_weights.formula_state_dict(FIXTURES / "i3d_keys.tsv"), folder / "i3d_pretrained_400.pt")
    audio = formula_weights.formula_state_dict(FIXTURES / "audioclip_audio_keys.tsv")
    audio["text.token_embedding.weight"] = torch.zeros(2, 2)   # other towers in the file are ignored
    torch.save(audio, folder / "AudioCLIP-Full-Training.pt")
    return ["--i3d-weights", str(folder / "i3d_pretrained_400.pt"),
            "--audioclip-weights", str(folder / "AudioCLIP-Full-Training.pt")]


def make_video(path, pattern: str, tone: float, seconds: float, audio: bool = True):
    cmd = [find_ffmpeg(), "-v", "error", "-y", "-f", "lavfi", "-i", f"{pattern}=size=96x64:rate=10:duration={seconds}"]
    if audio:
        cmd += ["-f", "lavfi", "-i", f"sine=frequency={tone}:duration={seconds}:sample_rate=44100", "-c:a", "aac"]
    cmd += ["-pix_fmt", "yuv420p", "-c:v", "libx264", "-shortest", str(path)]
    subprocess.run(cmd, check=True)
    return path


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    root = tmp_path_factory.mktemp("sets")
    (root / "real").mkdir()
    (root / "fake").mkdir()
    # 2.0 s at 10 fps: with --clip-stride 4, two 16-frame windows per video.
    make_video(root / "real" / "a.mp4", "testsrc", 440, 2.0)
    make_video(root / "fake" / "a.mp4", "smptebars", 220, 2.0)
    return root


def run(*args):
    return CliRunner().invoke(app, list(args), catch_exceptions=False)


def test_eval_json_stats_and_identical_sets(sets, weights, tmp_path):
    stats = tmp_path / "real.npz"
    common = ["eval", "--num", "2", "--clip-stride", "4", "--device", "cpu", "--json", *weights]
    result = run(*common, "--real", str(sets / "real"), "--fake", str(sets / "fake"), "--save-real-stats", str(stats))
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["protocol"] == "mmdiffusion" and out["letterbox_antialias"] is True
    assert out["real"]["clips"] == 2 and out["fake"]["clips"] == 2
    assert all(math.isfinite(out[k]) and out[k] != 0 for k in ("fvd", "kvd", "fad"))
    # The saved real features give the same numbers.
    again = json.loads(run(*common, "--real", str(stats), "--fake", str(sets / "fake")).stdout)
    for key in ("fvd", "kvd", "fad"):
        assert again[key] == pytest.approx(out[key], rel=1e-6)
    # A set against itself: FVD and FAD nearly vanish (two clips in 400 and 1024 dimensions leave
    # float32 square-root noise of ~0.1 %).
    same = json.loads(run(*common, "--real", str(stats), "--fake", str(sets / "real")).stdout)
    assert abs(same["fvd"]) < 1e-3 * out["fvd"]
    assert abs(same["fad"]) < 1e-2 * out["fad"]


def test_too_few_clips_is_refused_unless_allowed(sets, weights):
    args = ["eval", "--real", str(sets / "real"), "--fake", str(sets / "fake"), "--clip-stride", "4",
            "--metrics", "fvd", "--device", "cpu", *weights]
    refused = run(*args, "--num", "3")
    assert refused.exit_code == 2 and "real set has 2 clips but --num is 3" in refused.stderr
    allowed = run(*args, "--num", "3", "--allow-fewer", "--json")
    assert allowed.exit_code == 0 and json.loads(allowed.stdout)["real"]["clips"] == 2


def test_fad_needs_audio_and_names_the_file(sets, weights, tmp_path):
    (tmp_path / "fake").mkdir()
    make_video(tmp_path / "fake" / "mute.mp4", "testsrc", 0, 2.0, audio=False)
    make_video(tmp_path / "fake" / "ok.mp4", "testsrc", 300, 2.0)
    result = run("eval", "--real", str(sets / "real"), "--fake", str(tmp_path / "fake"), "--num", "2",
                 "--clip-stride", "4", "--device", "cpu", *weights)
    assert result.exit_code == 2 and "mute.mp4" in result.stderr and "FAD" in result.stderr


def test_missing_weights_offline(sets, tmp_path, monkeypatch):
    monkeypatch.setenv("RFLAV_CACHE", str(tmp_path / "empty"))
    result = run("eval", "--real", str(sets / "real"), "--fake", str(sets / "fake"), "--num", "2", "--offline",
                 "--device", "cpu")
    assert result.exit_code == 2
    assert "i3d_pretrained_400.pt" in result.stderr and "Traceback" not in result.output


def test_drift_writes_csv_and_png(sets, weights, tmp_path):
    (tmp_path / "long").mkdir()
    for i, pattern in enumerate(("testsrc", "smptebars")):
        make_video(tmp_path / "long" / f"{i}.mp4", pattern, 300 + 100 * i, 3.2)
    out = tmp_path / "drift"
    result = run("drift", "--fake", str(tmp_path / "long"), "--real", str(sets / "real"), "--stride", "8",
                 "--num", "2", "--device", "cpu", "--output", str(out), "--quiet", *weights)
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(open(out.with_suffix(".csv"))))
    assert [int(r["start_frame"]) for r in rows] == [0, 8, 16]     # 32 frames, 16-frame windows, stride 8
    assert {"fvd", "kvd", "fad", "video_feature_drift", "audio_feature_drift"} <= set(rows[0])
    assert float(rows[0]["video_feature_drift"]) == 0.0
    png = out.with_suffix(".png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_two_process_eval_gives_the_single_process_numbers(weights, tmp_path):
    # 2.5 s = 25 frames = 10 windows per set: two loader batches (8 + 2), one per rank.
    for name, pattern, tone in (("real", "testsrc", 440), ("fake", "smptebars", 220)):
        (tmp_path / name).mkdir()
        make_video(tmp_path / name / "one.mp4", pattern, tone, 2.5)
    args = ["eval", "--real", str(tmp_path / "real"), "--fake", str(tmp_path / "fake"), "--num-clips", "10",
            "--device", "cpu", "--json", *weights]
    single = json.loads(run(*args).stdout)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
           "-m", "rflav_cli", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    sharded = json.loads(out[out.index("\n{") + 1:] if not out.startswith("{") else out)  # gloo logs to stdout
    assert sharded["fvd"] == pytest.approx(single["fvd"], rel=1e-5)
    assert sharded["kvd"] == pytest.approx(single["kvd"], rel=1e-5)
    # One thread per process here, two in process: AudioCLIP rounds a little differently.
    assert sharded["fad"] == pytest.approx(single["fad"], rel=1e-4)
