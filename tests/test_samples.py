"""Many samples: the same files from one process or several (torchrun), a rerun that makes only
what is missing, and the manifest that lists every sample."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from rflav_cli.errors import UsageError
from rflav_cli.media import read_audio, read_video_frames
from rflav_cli.requests import GenerateRequest, generate_output_paths
from rflav_cli.samples import (
    COMPLETE,
    INCOMPLETE,
    MISSING,
    Sample,
    sample_state,
    write_manifest,
    writer_identity,
)

pytestmark = pytest.mark.skipif(shutil.which("ffprobe") is None, reason="needs ffmpeg to read outputs")

# The packaged model: no download, a few frames per second of CPU.
COMMAND = ("generate", "--class", "ball", "--quiet")


def _env() -> dict[str, str]:
    # One thread everywhere: torchrun gives each worker one, and the comparison is bit for bit.
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def _rflav(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "rflav_cli", *args],
        cwd=cwd,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _decoded(path: Path) -> tuple[np.ndarray, np.ndarray]:
    return np.stack(list(read_video_frames(path, size=32))), read_audio(path)


def _manifest(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "manifest.jsonl").read_text().splitlines()]


def _torchrun(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]
    command += ["--master-port", str(_free_port()), "-m", "rflav_cli", *args]
    return subprocess.run(command, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=600)


def test_two_processes_make_the_files_of_one(tmp_path):
    one = _rflav(*COMMAND, "--frames", "12", "--num-samples", "3", "-o", "one/", cwd=tmp_path)
    assert one.returncode == 0, one.stderr
    two = _torchrun(*COMMAND, "--frames", "12", "--num-samples", "3", "--json", "-o", "two/", cwd=tmp_path)
    assert two.returncode == 0, two.stderr[-3000:]
    # Standard output holds the results alone (the process group's own messages go elsewhere).
    assert [s["seed"] for s in json.loads(two.stdout)] == [0, 1, 2]
    for seed in range(3):
        name = f"ball-seed{seed}.mp4"
        (v1, a1), (v2, a2) = _decoded(tmp_path / "one" / name), _decoded(tmp_path / "two" / name)
        assert v1.shape == (12, 32, 32, 3) and np.array_equal(v1, v2)
        assert a1.size >= 12 * 1600 and np.array_equal(a1, a2)  # AAC pads to whole packets
        side = json.loads((tmp_path / "two" / name).with_suffix(".json").read_text())
        assert side["seed"] == seed and side["status"] == "complete"
    rows = _manifest(tmp_path / "two")
    assert [(r["index"], r["seed"], r["file"], r["status"], r["frames"]) for r in rows] == [
        (i, i, f"ball-seed{i}.mp4", "complete", 12) for i in range(3)
    ]


def test_two_processes_given_bad_input_say_it_once(tmp_path):
    two = _torchrun(*COMMAND, "--frames", "0", "-o", "two/", cwd=tmp_path)
    assert two.returncode != 0
    errors = [line for line in two.stderr.splitlines() if line.startswith("rflav: error")]
    assert len(errors) == 1 and "--frames" in errors[0], two.stderr[-3000:]


def test_a_rerun_makes_only_what_is_missing(tmp_path):
    args = (*COMMAND, "--frames", "30", "--num-samples", "4", "-o", "out/")
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, "-m", "rflav_cli", *args], cwd=tmp_path, env=_env(), stderr=subprocess.DEVNULL
    )
    try:  # kill it (no chance to clean up) once two samples are complete
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            done = [
                p for p in out.glob("*.json") if json.loads(p.read_text() or "{}").get("status") == "complete"
            ]
            if len(done) >= 2:
                break
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    complete = {
        p.with_suffix(".mp4").name: p.with_suffix(".mp4").stat()
        for p in out.glob("ball-seed*.json")
        if json.loads(p.read_text()).get("status") == "complete"
    }
    assert 2 <= len(complete) < 4, "the run was not stopped half-way"

    rerun = _rflav(*args, cwd=tmp_path)  # the same command
    assert rerun.returncode == 0, rerun.stderr
    for name, before in complete.items():  # untouched: not made again
        after = (out / name).stat()
        assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    rows = _manifest(out)
    assert [(r["seed"], r["status"], r["frames"]) for r in rows] == [(i, "complete", 30) for i in range(4)]
    for i in range(4):
        video, audio = _decoded(out / f"ball-seed{i}.mp4")
        assert video.shape[0] == 30 and audio.size >= 30 * 1600
    assert not list(out.glob(".*"))  # no temporary file left behind

    again = _rflav(*args, cwd=tmp_path)
    assert again.returncode == 0 and all(
        (out / n).stat().st_mtime_ns == s.st_mtime_ns for n, s in complete.items()
    )


def _sidecar(sample: Sample, identity: dict, **extra) -> None:
    sample.sidecar.write_text(json.dumps({**identity, "rflav_version": "x", **extra}))


def test_sample_states(tmp_path):
    identity = {"model": "m", "seed": 3, "frames_requested": 20, "steps": 2}
    sample = Sample(0, 3, tmp_path / "s.mp4")
    assert sample_state(sample, identity) == MISSING
    _sidecar(sample, identity, status="running")
    assert sample_state(sample, identity) == INCOMPLETE  # crashed while making it
    _sidecar(sample, identity, status="complete", frames=20)
    assert sample_state(sample, identity) == INCOMPLETE  # the summary without its MP4
    sample.path.write_bytes(b"mp4")
    assert sample_state(sample, identity) == COMPLETE
    _sidecar(sample, identity, status="interrupted", interrupted=True, frames=7)
    assert sample_state(sample, identity) == INCOMPLETE
    _sidecar(sample, identity, interrupted=False, frames=20)  # a sidecar from before the status key
    assert sample_state(sample, identity) == COMPLETE
    with pytest.raises(UsageError, match="other settings: steps 2 .asked: 4."):
        sample_state(sample, {**identity, "steps": 4})
    sample.sidecar.unlink()
    with pytest.raises(UsageError, match="not a sample of this command"):  # not ours: never replaced
        sample_state(sample, identity)

    rows = write_manifest(tmp_path, [sample, Sample(1, 4, tmp_path / "t.mp4")]).read_text().splitlines()
    assert [json.loads(r)["status"] for r in rows] == ["missing", "missing"]


def test_a_sample_a_live_process_makes_is_not_taken_over(tmp_path):
    identity = {"model": "m", "seed": 0, "frames_requested": 20, "steps": 2}
    sample = Sample(0, 0, tmp_path / "m-seed0.mp4")
    me = writer_identity()  # this test's process: alive
    assert me["pid"] == os.getpid() and me["host"] == socket.gethostname()
    _sidecar(sample, identity, status="running", **me)
    with pytest.raises(UsageError, match=f"m-seed0.mp4 is being made right now by process {os.getpid()} on"):
        sample_state(sample, identity)
    for overwrite in (False, True):  # --overwrite neither: the live run would fail at its end
        req = GenerateRequest(output=str(tmp_path) + "/", overwrite=overwrite)
        with pytest.raises(UsageError, match="being made right now"):
            generate_output_paths(req, "m", [0])

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    for leftover in (
        {**me, "pid": gone.pid},  # a killed run: its process is gone
        {**me, "pid_started": (me["pid_started"] or 0) + 1},  # its pid, reused by another process
        {**me, "host": me["host"] + "-elsewhere"},  # another machine's, not to be seen from here
        {},  # written before sidecars named their process
    ):
        _sidecar(sample, identity, status="running", **leftover)
        assert sample_state(sample, identity) == INCOMPLETE, leftover
    _sidecar(sample, identity, status="interrupted", interrupted=True, frames=3, **me)
    assert sample_state(sample, identity) == INCOMPLETE  # only a "running" sidecar is a live run's


def test_a_second_run_of_the_same_command_refuses_the_sample_the_first_is_making(tmp_path):
    args = (*COMMAND, "--seconds", "20")
    first = subprocess.Popen(
        [sys.executable, "-m", "rflav_cli", *args],
        cwd=tmp_path,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        sidecar = tmp_path / "ball-seed0.json"
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and first.poll() is None:
            if sidecar.exists() and '"running"' in sidecar.read_text():
                break
            time.sleep(0.05)
        side = json.loads(sidecar.read_text())
        assert side["status"] == "running" and side["pid"] == first.pid
        second = _rflav(*args, cwd=tmp_path)
        assert first.poll() is None, "the first run ended before the second looked"
        assert second.returncode == 2 and second.stderr.strip().splitlines() == [
            f"rflav: error: ball-seed0.mp4 is being made right now by process {first.pid} on this machine: "
            "wait for that run to end (or stop it), or choose another --output"
        ]
        assert first.wait(timeout=600) == 0, first.stderr.read()
    finally:
        if first.poll() is None:
            first.kill()
        first.communicate()
    side = json.loads(sidecar.read_text())
    assert side["status"] == "complete" and side["frames"] == 200 and "pid" not in side
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ball-seed0.json", "ball-seed0.mp4"]


@pytest.mark.parametrize("how", [("--forever", "-o", "x.mp4"), ("--frames", "5", "-o", "-")])
def test_torchrun_wants_files_of_a_fixed_length(tmp_path, how):
    env = {**_env(), "WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"}  # as torchrun sets them
    result = subprocess.run(
        [sys.executable, "-m", "rflav_cli", *COMMAND, *how],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2 and "under torchrun" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not list(tmp_path.iterdir())
