"""Watching `rflav generate` while it runs: `-o -` into a player, and a --forever file that is
playable under its name while it grows. Runs the packaged `ball` model (no download)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from rflav_cli.cli import app
from rflav_cli.requests import GenerateRequest, generate_output_paths

pytestmark = pytest.mark.skipif(shutil.which("ffprobe") is None, reason="needs ffprobe to inspect outputs")

BALL = ("--model", "ball", "--device", "cpu", "--dtype", "fp32")


def rflav(*args: str, cwd: Path, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "rflav_cli", *args], cwd=cwd, env=env, **kwargs)


def ffprobe_counts(source: str, stdin=None) -> dict[str, dict]:
    """Decoded frames and audio packets (ffprobe counts them by decoding) per stream type."""
    res = subprocess.run(
        ["ffprobe", "-v", "error", "-count_frames", "-show_streams", "-of", "json", source],
        stdin=stdin,
        capture_output=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr
    return {s["codec_type"]: s for s in json.loads(res.stdout)["streams"]}


def test_stdout_pipes_into_a_player(tmp_path):
    gen = rflav("generate", *BALL, "--seconds", "3", "-o", "-", cwd=tmp_path, stdout=subprocess.PIPE)
    streams = ffprobe_counts("pipe:0", stdin=gen.stdout)
    gen.stdout.close()
    assert gen.wait(timeout=120) == 0
    video, audio = streams["video"], streams["audio"]
    assert (video["codec_name"], int(video["nb_read_frames"])) == ("h264", 30)
    assert audio["codec_name"] == "aac" and int(audio["nb_read_frames"]) >= 3 * 16000 // 1024
    assert list(tmp_path.iterdir()) == []  # no file, no sidecar .json


def test_player_quitting_ends_the_run_cleanly(tmp_path):
    gen = rflav(
        "generate",
        *BALL,
        "--forever",
        "-o",
        "-",
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert len(gen.stdout.read(20_000)) == 20_000  # the player watched a little, then quits
    gen.stdout.close()
    assert gen.wait(timeout=60) == 0
    err = gen.stderr.read().decode()
    assert "Traceback" not in err and "error" not in err, err
    assert "to standard output" in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "extra, message",
    [
        (("--num-samples", "2"), "--output - streams one video to standard output: drop --num-samples 2"),
        (("--wav",), "--wav writes a file next to the MP4, and --output - has none"),
        (("--json",), "--json prints on standard output, where --output - sends the video"),
    ],
)
def test_stdout_refuses_what_needs_files(extra, message):
    result = CliRunner().invoke(app, ["generate", *BALL, "-o", "-", *extra])
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rflav: error: ") and message in lines[0], lines


def test_closed_stdout_is_one_line_before_any_work(tmp_path):
    res = subprocess.run(
        ["sh", "-c", f'exec "{sys.executable}" -m rflav_cli generate --model ball -o - >&-'],
        cwd=tmp_path,
        capture_output=True,
        timeout=120,
    )
    lines = res.stderr.decode().strip().splitlines()
    assert res.returncode == 2 and lines == [
        "rflav: error: --output -: standard output is closed: pipe it into a player (| ffplay -) "
        "or a file (> NAME.mp4)"
    ]
    assert list(tmp_path.iterdir()) == []


def test_dash_is_stdout_and_dot_slash_dash_a_file():
    assert generate_output_paths(GenerateRequest(output="-"), "ball", [0]) == [Path("-")]
    assert generate_output_paths(GenerateRequest(output="./-"), "ball", [0]) == [Path("-.mp4")]


def test_forever_file_plays_under_its_name_while_it_grows(tmp_path):
    out = tmp_path / "live.mp4"
    gen = rflav("generate", *BALL, "--forever", "-q", "-o", str(out), cwd=tmp_path, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while not out.exists():
            assert gen.poll() is None and time.monotonic() < deadline, "the file never got its name"
            time.sleep(0.1)
        # The final name is the growing file itself (a second name of the temporary file).
        partial = [p for p in tmp_path.iterdir() if p.name.startswith(".live.mp4.")]
        assert len(partial) == 1 and os.path.samefile(out, partial[0])
        growing = int(ffprobe_counts(str(out))["video"]["nb_read_frames"])
        assert growing >= 1
        sidecar = out.with_suffix(".json")  # the summary comes at the end; before, at most "running"
        assert not sidecar.exists() or json.loads(sidecar.read_text())["status"] == "running"
    finally:
        gen.send_signal(signal.SIGINT)
        rc = gen.wait(timeout=60)
    assert rc == 0, gen.stderr.read().decode()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["live.json", "live.mp4"]
    summary = json.loads(out.with_suffix(".json").read_text())
    final = ffprobe_counts(str(out))
    assert int(final["video"]["nb_read_frames"]) == summary["frames"] >= growing
    assert "audio" in final
