"""`rflav generate` end to end on tiny release-layout checkpoints, checked with ffprobe."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import tiny
import torch
from typer.testing import CliRunner

from rflav_cli import audio as audio_lib
from rflav_cli.cli import app
from rflav_cli.flow import rolling_sample
from rflav_cli.models.flav import FLAV
from rflav_cli.pipeline import Pipeline

pytestmark = pytest.mark.skipif(shutil.which("ffprobe") is None, reason="needs ffprobe to inspect outputs")

AAC_FRAME_SECONDS = 1024 / 16000


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ckpt")
    return {"model": tiny.build_tiny_model(root / "model"), "vae": tiny.build_tiny_vae(root / "vae")}


def run_cli(*args: str, env: dict | None = None):
    runner = CliRunner()
    return runner.invoke(app, list(args), env=env, catch_exceptions=False)


def ffprobe(path: Path) -> dict:
    out = subprocess.run(
        [
            "ffprobe",
            "-v",
            "error",
            "-count_frames",
            "-show_streams",
            "-show_format",
            "-of",
            "json",
            str(path),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    info = json.loads(out.stdout)
    streams = {s["codec_type"]: s for s in info["streams"]}
    return {"video": streams.get("video"), "audio": streams.get("audio"), "format": info["format"]}


def decode_frames(path: Path) -> np.ndarray:
    raw = subprocess.run(
        [
            "ffmpeg",
            "-v",
            "error",
            "-i",
            str(path),
            "-fps_mode",
            "passthrough",
            "-f",
            "rawvideo",
            "-pix_fmt",
            "rgb24",
            "-",
        ],
        capture_output=True,
        check=True,
    ).stdout
    return np.frombuffer(raw, np.uint8).reshape(-1, 256, 256, 3)


def decode_audio(path: Path) -> np.ndarray:
    raw = subprocess.run(
        [
            "ffmpeg",
            "-v",
            "error",
            "-i",
            str(path),
            "-map",
            "0:a:0",
            "-f",
            "f32le",
            "-ac",
            "1",
            "-ar",
            "16000",
            "-",
        ],
        capture_output=True,
        check=True,
    ).stdout
    return np.frombuffer(raw, np.float32)


def check_mp4(path: Path, frames: int) -> dict:
    info = ffprobe(path)
    v, a = info["video"], info["audio"]
    assert v["codec_name"] == "h264" and v["pix_fmt"] == "yuv420p"
    assert (v["width"], v["height"]) == (256, 256)
    assert v["r_frame_rate"] == "10/1"
    assert int(v["nb_read_frames"]) == frames
    assert a["codec_name"] == "aac" and a["sample_rate"] == "16000" and a["channels"] == 1
    assert abs(float(a["duration"]) - float(v["duration"])) <= AAC_FRAME_SECONDS + 1e-6
    assert abs(float(v["duration"]) - frames / 10) < 1e-6
    return info


def test_generate_from_local_folder(ckpt, tmp_path):
    out = tmp_path / "clip.mp4"
    result = run_cli(
        "generate",
        "--model",
        str(ckpt["model"]),
        "--vae",
        str(ckpt["vae"]),
        "--seconds",
        "1.2",
        "--output",
        str(out),
        "--wav",
        "--quiet",
        "--device",
        "cpu",
        "--dtype",
        "fp32",
    )
    assert result.exit_code == 0, result.output
    check_mp4(out, 12)
    side = json.loads(out.with_suffix(".json").read_text())
    assert side["frames"] == 12 and side["seconds"] == 1.2 and side["seed"] == 0 and side["steps"] == 2
    assert side["dtype"] == "float32" and side["device"] == "cpu" and len(side["model_sha256"]) == 64
    wav = subprocess.run(
        ["ffprobe", "-v", "error", "-show_streams", "-of", "json", str(out.with_suffix(".wav"))],
        capture_output=True,
        text=True,
        check=True,
    )
    stream = json.loads(wav.stdout)["streams"][0]
    assert int(stream["duration_ts"]) == 12 * 1600 and stream["sample_rate"] == "16000"
    assert not list(tmp_path.glob(".*partial*"))


def test_generate_from_offline_hf_cache(ckpt, tmp_path):
    cache = tmp_path / "hub"
    tiny.install_in_hf_cache(ckpt["model"], cache, "someone/tiny-flav")
    tiny.install_in_hf_cache(ckpt["vae"], cache, "someone/tiny-vae")
    env = {"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    out = tmp_path / "hub.mp4"
    result = run_cli(
        "generate",
        "--model",
        "someone/tiny-flav",
        "--vae",
        "someone/tiny-vae",
        "--frames",
        "7",
        "-o",
        str(out),
        "--json",
        "--device",
        "cpu",
        "--dtype",
        "fp32",
        env=env,
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert (
        summary["model"] == "someone/tiny-flav"
        and summary["revision"] == "0123456789abcdef0123456789abcdef01234567"
    )
    check_mp4(out, 7)
    # A repo that is not cached fails in one line naming repo, file and the local-folder fix.
    missing = run_cli(
        "generate", "--model", "someone/absent", "--frames", "3", "-o", str(tmp_path / "x.mp4"), env=env
    )
    assert missing.exit_code == 2
    assert (
        "someone/absent" in missing.stderr
        and "--model" in missing.stderr
        and "Traceback" not in missing.output
    )


def test_same_seed_same_frames_and_seed_plus_i(ckpt, tmp_path):
    args = [
        "--model",
        str(ckpt["model"]),
        "--vae",
        str(ckpt["vae"]),
        "--frames",
        "5",
        "--quiet",
        "--device",
        "cpu",
        "--dtype",
        "fp32",
    ]
    assert run_cli("generate", *args, "--seed", "3", "-o", str(tmp_path / "a.mp4")).exit_code == 0
    assert run_cli("generate", *args, "--seed", "3", "-o", str(tmp_path / "b.mp4")).exit_code == 0
    result = run_cli(
        "generate",
        *args,
        "--seed",
        "2",
        "--num-samples",
        "2",
        "--batch-size",
        "2",
        "-o",
        str(tmp_path / "many"),
    )
    assert result.exit_code == 0, result.output
    a, b = decode_frames(tmp_path / "a.mp4"), decode_frames(tmp_path / "b.mp4")
    assert np.array_equal(a, b)
    assert a.shape[0] == 5
    # Sample i of a batch uses seed + i: it matches seed 3 generated alone up to float
    # rounding of the batched maths (seen through a lossy encode), unlike seed 2.
    same = np.abs(a.astype(float) - decode_frames(tmp_path / "many" / "model-seed3.mp4")).mean()
    other = np.abs(a.astype(float) - decode_frames(tmp_path / "many" / "model-seed2.mp4")).mean()
    assert same < 0.5 and other > 10 * max(same, 0.1)


def test_stream_audio_equals_whole_clip_vocoding(ckpt):
    """Streaming vocoding inside the pipeline gives the waveform of vocoding the full mel."""
    pipe = Pipeline.from_pretrained(str(ckpt["model"]), vae=str(ckpt["vae"]), device="cpu", dtype="fp32")
    frames = list(pipe.generate(num_frames=9, seeds=[5]))
    streamed = np.concatenate([f.audio[0] for f in frames])
    assert streamed.shape == (9 * 1600,)

    cfg = pipe.model.config
    g = torch.Generator().manual_seed(5)
    v0 = torch.randn((1, cfg.predict_frames, 4, 32, 32), generator=g)
    a0 = torch.randn((1, cfg.predict_frames, 1, 256, 10), generator=g)

    def noise():
        return torch.randn((1, 4, 32, 32), generator=g), torch.randn((1, 1, 256, 10), generator=g)

    with torch.no_grad():
        sampler = rolling_sample(lambda v, a, t: pipe.model(v, a, t), v0, a0, steps=2, noise=noise)
        mel = torch.cat([next(sampler)[1] for _ in range(9)], dim=-1)[:, 0]  # (1, 256, 90)
        whole = pipe.vocoder(audio_lib.denormalize_log_mel(mel, pipe.audio_scale))[0, 0].numpy()
    assert np.abs(streamed - whole).max() <= 1e-4
    video = np.stack([f.video[0] for f in frames])
    assert video.shape == (9, 256, 256, 3) and video.dtype == np.uint8


def _make_tone(path: Path, seconds: float) -> None:
    subprocess.run(
        [
            "ffmpeg",
            "-v",
            "error",
            "-f",
            "lavfi",
            "-i",
            f"sine=frequency=440:duration={seconds}",
            "-ar",
            "44100",
            "-ac",
            "2",
            str(path),
        ],
        check=True,
    )


def test_audio_to_video_keeps_the_given_audio(ckpt, tmp_path):
    tone = tmp_path / "tone.wav"
    _make_tone(tone, 0.8)
    out = tmp_path / "a2v.mp4"
    result = run_cli(
        "generate",
        "--model",
        str(ckpt["model"]),
        "--vae",
        str(ckpt["vae"]),
        "--audio",
        str(tone),
        "-o",
        str(out),
        "--quiet",
        "--device",
        "cpu",
        "--dtype",
        "fp32",
        "--wav",
    )
    assert result.exit_code == 0, result.output
    check_mp4(out, 8)  # the input's length sets the duration
    given = subprocess.run(
        [
            "ffmpeg",
            "-v",
            "error",
            "-i",
            str(tone),
            "-af",
            "pan=mono|c0=c0",
            "-f",
            "f32le",
            "-ar",
            "16000",
            "-",
        ],
        capture_output=True,
        check=True,
    ).stdout
    given = np.frombuffer(given, np.float32)
    written = decode_audio(out.with_suffix(".wav"))
    n = min(len(given), len(written))
    assert np.abs(written[:n] - given[:n]).max() < 2 / 32767


def test_video_to_audio_keeps_the_given_video(ckpt, tmp_path):
    src = tmp_path / "src.mp4"
    subprocess.run(
        [
            "ffmpeg",
            "-v",
            "error",
            "-f",
            "lavfi",
            "-i",
            "testsrc=size=256x256:rate=10:duration=0.6",
            "-pix_fmt",
            "yuv420p",
            "-c:v",
            "libx264",
            "-crf",
            "10",
            str(src),
        ],
        check=True,
    )
    out = tmp_path / "v2a.mp4"
    result = run_cli(
        "generate",
        "--model",
        str(ckpt["model"]),
        "--vae",
        str(ckpt["vae"]),
        "--video",
        str(src),
        "-o",
        str(out),
        "--quiet",
        "--device",
        "cpu",
        "--dtype",
        "fp32",
    )
    assert result.exit_code == 0, result.output
    check_mp4(out, 6)
    diff = np.abs(decode_frames(out).astype(float) - decode_frames(src).astype(float)).mean()
    assert diff < 6.0  # the same picture, up to two lossy encodes


def test_sigint_during_forever_leaves_a_playable_file(ckpt, tmp_path):
    out = tmp_path / "forever.mp4"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "rflav_cli",
            "generate",
            "--model",
            str(ckpt["model"]),
            "--vae",
            str(ckpt["vae"]),
            "--forever",
            "-o",
            str(out),
            "--quiet",
            "--device",
            "cpu",
            "--dtype",
            "fp32",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    deadline = time.time() + 120
    while time.time() < deadline and not any(tmp_path.glob(".forever*partial*")):
        time.sleep(0.2)
    time.sleep(4)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr.decode()
    side = json.loads(out.with_suffix(".json").read_text())
    assert side["interrupted"] is True and side["frames"] >= 1
    check_mp4(out, side["frames"])


BAD = [
    (["--class", "ballet"], "unknown class 'ballet'"),
    (["--seconds", "0"], "--seconds must be a positive number"),
    (["--seconds", "-2.5"], "--seconds must be a positive number"),
    (["--steps", "0"], "--steps must be at least 1"),
    (["--frames", "3", "--output", "{tmp}/a-file/x.mp4"], "cannot write to"),
]


@pytest.mark.parametrize("args,message", BAD)
def test_bad_input_exits_2_with_one_line(ckpt, tmp_path, args, message):
    (tmp_path / "a-file").write_text("not a folder")
    result = run_cli("generate", *[a.replace("{tmp}", str(tmp_path)) for a in args])
    assert result.exit_code == 2
    assert message in result.stderr
    assert "Traceback" not in result.output and len(result.stderr.strip().splitlines()) == 1


def test_seconds_not_a_number_exits_2():
    result = run_cli("generate", "--seconds", "soon")
    assert result.exit_code == 2 and "--seconds" in result.output


def test_unknown_class_of_class_conditional_checkpoint(tmp_path):
    model = tiny.build_tiny_model(tmp_path / "cond", num_classes=2, class_names=["drums", "piano"])
    vae = tiny.build_tiny_vae(tmp_path / "vae")
    result = run_cli(
        "generate",
        "--model",
        str(model),
        "--vae",
        str(vae),
        "--class",
        "violin",
        "--frames",
        "2",
        "-o",
        str(tmp_path / "c.mp4"),
        "--device",
        "cpu",
    )
    assert result.exit_code == 2 and "drums, piano" in result.stderr
    no_class = ["--frames", "2", "-o", str(tmp_path / "n.mp4"), "--device", "cpu"]
    result = run_cli("generate", "--model", str(model), "--vae", str(vae), *no_class)
    assert result.exit_code == 2
    assert "class-conditional: pass --class with one of drums, piano" in result.stderr
    assert not (tmp_path / "n.mp4").exists()
    result = run_cli(
        "generate",
        "--model",
        str(model),
        "--vae",
        str(vae),
        "--class",
        "piano",
        "--cfg-scale",
        "2",
        "--frames",
        "2",
        "-o",
        str(tmp_path / "c.mp4"),
        "--device",
        "cpu",
        "--quiet",
    )
    assert result.exit_code == 0, result.output
    check_mp4(tmp_path / "c.mp4", 2)


def test_input_without_the_needed_stream(ckpt, tmp_path):
    tone = tmp_path / "tone.wav"
    _make_tone(tone, 0.3)
    result = run_cli(
        "generate", "--model", str(ckpt["model"]), "--video", str(tone), "-o", str(tmp_path / "o.mp4")
    )
    assert result.exit_code == 2 and "has no video stream" in result.stderr


def test_never_overwrites(ckpt, tmp_path):
    out = tmp_path / "exists.mp4"
    out.write_bytes(b"keep me")
    result = run_cli("generate", "--model", str(ckpt["model"]), "--frames", "2", "-o", str(out))
    assert result.exit_code == 2 and "--overwrite" in result.stderr
    assert out.read_bytes() == b"keep me"


def test_no_ffmpeg_anywhere(monkeypatch, tmp_path):
    import rflav_cli.media as media

    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("RFLAV_FFMPEG", raising=False)
    monkeypatch.setitem(sys.modules, "imageio_ffmpeg", None)
    if hasattr(media.find_ffmpeg, "cache_clear"):
        media.find_ffmpeg.cache_clear()
    try:
        result = run_cli("generate", "--frames", "2", "-o", str(tmp_path / "o.mp4"))
    finally:
        if hasattr(media.find_ffmpeg, "cache_clear"):
            media.find_ffmpeg.cache_clear()
    assert result.exit_code == 2 and "ffmpeg" in result.stderr


def test_compiled_stream_matches_eager(tmp_path):
    """--compile (torch.compile of the transformer blocks) changes speed, not output."""
    model = tiny.build_tiny_model(tmp_path / "cls", num_classes=3, class_names=["a", "b", "c"])
    vae = tiny.build_tiny_vae(tmp_path / "vae")
    runs = {}
    for compiled in (False, True):
        pipe = Pipeline.from_pretrained(
            str(model),
            vae=str(vae),
            device="cpu",
            dtype="fp32",
            compile=compiled,
            compile_in_background=False,
        )
        runs[compiled] = list(pipe.generate(num_frames=5, seeds=[0, 1], label="b", cfg_scale=2.0))
    assert len(runs[True]) == 5 and pipe.model.blocks_compiled
    # The compiled blocks are not sub-modules: the state dict keeps the release keys.
    assert set(pipe.model.state_dict()) == set(FLAV.from_pretrained(model).state_dict())
    for eager, fast in zip(runs[False], runs[True]):
        assert np.abs(eager.video.astype(int) - fast.video.astype(int)).max() <= 1  # float rounding only
        assert np.abs(eager.audio - fast.audio).max() <= 1e-4
    # The two samples differ: the compiled graph did not collapse the batch.
    assert np.abs(runs[True][-1].video[0].astype(int) - runs[True][-1].video[1]).mean() > 1

    out = tmp_path / "c.mp4"
    result = run_cli(
        "generate",
        "--model",
        str(model),
        "--vae",
        str(vae),
        "--class",
        "b",
        "--frames",
        "3",
        "--device",
        "cpu",
        "--dtype",
        "fp32",
        "--compile",
        "--json",
        "-o",
        str(out),
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["compiled"] is True
    assert int(ffprobe(out)["video"]["nb_read_frames"]) == 3


def test_background_compile_takes_over_mid_stream(tmp_path, monkeypatch):
    """Compiling on a thread (the default): the first frames come from the eager blocks without
    waiting for the compiler, the compiled blocks take over once ready, and the stream is the
    eager one up to float rounding."""
    model = tiny.build_tiny_model(tmp_path / "m")
    vae = tiny.build_tiny_vae(tmp_path / "vae")
    load = partial(Pipeline.from_pretrained, str(model), vae=str(vae), device="cpu", dtype="fp32")
    eager = list(load().generate(num_frames=8, seeds=[0, 1]))

    served: list[str] = []  # which blocks ran each full-window forward of the sampling thread
    run_blocks = FLAV._run_blocks

    def traced(self, blocks, *inputs):
        if threading.current_thread() is threading.main_thread() and inputs[0].shape[1] == self.window:
            served.append("eager" if blocks is self.blocks else "compiled")
        return run_blocks(self, blocks, *inputs)

    monkeypatch.setattr(FLAV, "_run_blocks", traced)
    pipe = load(compile=True)
    generation = pipe.generate(num_frames=8, seeds=[0, 1])
    streamed = [next(generation)]
    assert set(served) == {"eager"}  # no compiler before the first frame is out
    assert not pipe.model.wait_compiled(timeout=0)
    before = len(served)
    streamed.append(next(generation))  # its first full-window step starts the compiler
    assert served[before] == "eager" and pipe.model.wait_compiled(timeout=600)
    streamed += list(generation)
    assert served[-1] == "compiled" and pipe.compile
    assert len(streamed) == 8
    for a, b in zip(eager, streamed):
        assert np.abs(a.video.astype(int) - b.video.astype(int)).max() <= 1  # float rounding only
        assert np.abs(a.audio - b.audio).max() <= 1e-4


def test_decoding_and_vocoding_run_on_the_output_stream(ckpt, monkeypatch):
    """On CUDA, decode and vocoder work is queued on a second stream (overlapping the next
    frames' sampling). Checked here with a stand-in stream: every decode, vocoder push and
    the final flush happen inside it, after it waited for the sampling stream, with the
    sampler's tensors marked as used by it; the frames are those of the plain path."""
    pipe = Pipeline.from_pretrained(str(ckpt["model"]), vae=str(ckpt["vae"]), device="cpu", dtype="fp32")
    plain = list(pipe.generate(num_frames=4, seeds=[3]))

    log: list[str] = []
    inside = [False]

    class StandInStream:
        device = torch.device("cpu")

        def wait_stream(self, other):
            log.append(f"wait:{other}")

    class OnStream:
        def __init__(self, stream):
            pass

        def __enter__(self):
            inside[0] = True

        def __exit__(self, *exc):
            inside[0] = False

    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: "sampling")
    monkeypatch.setattr(torch.cuda, "stream", OnStream)
    monkeypatch.setattr(
        torch.Tensor, "record_stream", lambda self, stream: log.append("record"), raising=False
    )

    generation = pipe.generate(num_frames=4, seeds=[3])
    generation._output_stream = StandInStream()

    def traced(name, fn):
        def call(*args):
            log.append(name if inside[0] else f"{name} OUTSIDE")
            return fn(*args)

        return call

    generation._decode = traced("decode", generation._decode)
    generation._vocoder.push = traced("push", generation._vocoder.push)
    generation._vocoder.flush = traced("flush", generation._vocoder.flush)
    streamed = list(generation)

    assert not [entry for entry in log if "OUTSIDE" in entry]
    assert log.count("decode") == 4 and log.count("push") == 4 and log.count("flush") == 1
    assert log.count("record") == 8  # video and audio of each frame
    first_decode = log.index("decode")
    assert log[first_decode - 3 : first_decode] == ["wait:sampling", "record", "record"]
    for a, b in zip(plain, streamed):
        assert np.array_equal(a.video, b.video) and np.array_equal(a.audio, b.audio)


real_compile_blocks = FLAV.compile_blocks


def _generate_compiled(ckpt, out: Path):
    """`generate --compile` of 3 frames of the tiny checkpoint on the CPU."""
    return run_cli(
        "generate",
        "--model",
        str(ckpt["model"]),
        "--vae",
        str(ckpt["vae"]),
        "--frames",
        "3",
        "--device",
        "cpu",
        "--dtype",
        "fp32",
        "--compile",
        "--quiet",
        "-o",
        str(out),
    )


def test_compile_failure_is_one_line(ckpt, tmp_path, monkeypatch):
    """Without what torch.compile needs (e.g. no C++ compiler), --compile ends with one line
    that names the way out, and leaves no output behind."""
    from torch._dynamo.exc import BackendCompilerFailed

    def failing_compile(self, **kwargs):
        def block(*args):
            raise BackendCompilerFailed(
                lambda: None, RuntimeError("InvalidCxxCompiler: No working C++ compiler found"), None
            )

        real_compile_blocks(self, **kwargs)
        self._compiled_blocks = [block] * len(self.blocks)
        return self

    monkeypatch.setattr(FLAV, "compile_blocks", failing_compile)
    out = tmp_path / "c.mp4"
    result = _generate_compiled(ckpt, out)
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "--compile failed" in lines[0] and "without --compile" in lines[0]
    assert "C++ compiler" in lines[0] and not out.exists()


def test_auto_compile_policy():
    """Compiling pays off on GPUs for long streams; short clips, guided runs and CPUs stay eager."""
    from rflav_cli.runtime import AUTO_COMPILE_MIN_FRAMES, auto_compile

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert auto_compile(cuda, AUTO_COMPILE_MIN_FRAMES) and auto_compile(cuda, None)
    assert not auto_compile(cuda, AUTO_COMPILE_MIN_FRAMES - 1)
    assert not auto_compile(cuda, None, guided=True)
    assert not auto_compile(cpu, None) and not auto_compile(cpu, 10 * AUTO_COMPILE_MIN_FRAMES)


def _failing_compile(self, **kwargs):
    """compile_blocks whose compiled blocks fail the way torch.compile does without Triton."""
    from torch._dynamo.exc import BackendCompilerFailed

    def block(*args):
        raise BackendCompilerFailed(lambda: None, RuntimeError("triton not found"), None)

    real_compile_blocks(self, **kwargs)
    self._compiled_blocks = [block] * len(self.blocks)
    return self


def test_failed_automatic_compile_goes_on_eagerly(ckpt, tmp_path, monkeypatch):
    """When compiling was the default's choice and it fails, one line says so and the video is
    the one an eager run makes; --no-compile never tries."""
    from rflav_cli.media import read_video_frames

    monkeypatch.setattr("rflav_cli.generate.auto_compile", lambda *args, **kwargs: True)
    monkeypatch.setattr(FLAV, "compile_blocks", _failing_compile)
    common = (
        "generate",
        "--model",
        str(ckpt["model"]),
        "--vae",
        str(ckpt["vae"]),
        "--frames",
        "4",
        "--device",
        "cpu",
        "--dtype",
        "fp32",
        "--json",
    )
    auto, eager = tmp_path / "auto.mp4", tmp_path / "eager.mp4"
    result = run_cli(*common, "-o", str(auto))
    assert result.exit_code == 0, result.stderr
    lines = result.stderr.strip().splitlines()
    assert (
        len(lines) == 1
        and "compiling failed (RuntimeError: triton not found)" in lines[0]
        and "--no-compile" in lines[0]
    )
    assert json.loads(result.stdout)["compiled"] is False

    monkeypatch.setattr(FLAV, "compile_blocks", lambda self, *a, **k: pytest.fail("--no-compile compiled"))
    result = run_cli(*common, "--no-compile", "-o", str(eager))
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["compiled"] is False and result.stderr.strip() == ""
    ours, theirs = (np.stack(list(read_video_frames(p, size=64))) for p in (auto, eager))
    assert ours.shape[0] == 4 and np.array_equal(ours, theirs)


def test_a_compilation_still_running_when_the_samples_are_done_is_waited_for(ckpt, tmp_path, monkeypatch):
    """A short run can end before its background compilation: generate waits for it (its code is
    cached for the next runs) rather than exit under a compiling thread."""
    compiled: list[FLAV] = []

    def slow_compile(self, blocks, inference, *inputs):
        compiled.append(self)
        time.sleep(2)
        self._compiled_blocks = list(self.blocks)  # stands in for the compiled ones
        self._compiled_ready.set()

    monkeypatch.setattr(FLAV, "_compile_in_background", slow_compile)
    out = tmp_path / "c.mp4"
    result = _generate_compiled(ckpt, out)
    assert result.exit_code == 0, result.output
    (model,) = compiled
    assert not model.compiling and model.wait_compiled(timeout=0)
    assert int(ffprobe(out)["video"]["nb_read_frames"]) == 3
