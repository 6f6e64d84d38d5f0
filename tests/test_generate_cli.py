"""`rflav generate` against bad input and faults: vocoder choice, --class on unconditional
checkpoints, interrupted runs, --output names, checks before torch, guidance noise seeding."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import tiny
import torch
from typer.testing import CliRunner

from rflav_cli.cli import app
from rflav_cli.errors import RflavError
from rflav_cli.flow import Guide, _GuideState
from rflav_cli.hub import write_side_file
from rflav_cli.pipeline import Pipeline
from rflav_cli.requests import GenerateRequest, generate_model_and_label, generate_output_paths

pytestmark = pytest.mark.skipif(shutil.which("ffprobe") is None, reason="needs ffprobe to inspect outputs")

FAST = ("--device", "cpu", "--dtype", "fp32", "--quiet")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ckpt")
    return {"model": tiny.build_tiny_model(root / "model"), "vae": tiny.build_tiny_vae(root / "vae")}


def run_cli(*args: str, env: dict | None = None):
    return CliRunner().invoke(app, list(args), env=env, catch_exceptions=False)


def one_error_line(result, exit_code: int = 2) -> str:
    assert result.exit_code == exit_code, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rflav: error: ") and "Traceback" not in result.output, (
        lines
    )
    return lines[0]


def video_frames(path: Path) -> int:
    out = subprocess.run(
        [
            "ffprobe",
            "-v",
            "error",
            "-count_frames",
            "-select_streams",
            "v:0",
            "-show_entries",
            "stream=nb_read_frames",
            "-of",
            "csv=p=0",
            str(path),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    return int(out.stdout.strip().split(",")[0])


def has_audio(path: Path) -> bool:
    out = subprocess.run(
        [
            "ffprobe",
            "-v",
            "error",
            "-select_streams",
            "a:0",
            "-show_entries",
            "stream=codec_name",
            "-of",
            "csv=p=0",
            str(path),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout.strip() == "aac"


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# ---------------------------------------------------------------------------------------- vocoder


def test_missing_or_incomplete_vocoder_is_an_error_naming_the_way_out(ckpt, tmp_path):
    bare = copy_model(ckpt["model"], tmp_path / "bare")
    shutil.rmtree(bare / "vocoder")  # as checkpoints trained with --vocoder none by older versions
    half = copy_model(ckpt["model"], tmp_path / "half")
    (half / "vocoder" / "vocoder.pt").unlink()
    for folder, what in (
        (bare, f"{bare} has no vocoder/"),
        (half, f"{half / 'vocoder'} is incomplete: it lacks vocoder.pt"),
    ):
        out = tmp_path / f"{folder.name}.mp4"
        line = one_error_line(
            run_cli(
                "generate",
                "--model",
                str(folder),
                "--vae",
                str(ckpt["vae"]),
                "--frames",
                "2",
                "-o",
                str(out),
                *FAST,
            )
        )
        assert what in line and "--griffin-lim" in line
        assert not out.exists() and not out.with_suffix(".json").exists()
    # The library says the same with the parameter's name.
    with pytest.raises(RflavError, match=r"has no vocoder/.*pass griffin_lim"):
        Pipeline.from_pretrained(str(bare), vae=str(ckpt["vae"]), device="cpu", dtype="fp32")


def test_griffin_lim_when_asked_or_declared_and_the_sidecar_says_which(ckpt, tmp_path):
    bare = copy_model(ckpt["model"], tmp_path / "bare")
    shutil.rmtree(bare / "vocoder")
    asked = tmp_path / "asked.mp4"
    result = run_cli(
        "generate",
        "--model",
        str(bare),
        "--vae",
        str(ckpt["vae"]),
        "--frames",
        "3",
        "--griffin-lim",
        "-o",
        str(asked),
        *FAST,
    )
    assert result.exit_code == 0, result.output
    side = json.loads(asked.with_suffix(".json").read_text())
    assert side["vocoder"] == "griffin-lim" and side["vocoder_source"] is None
    assert video_frames(asked) == 3 and has_audio(asked)

    # A checkpoint whose rflav.json says it has no neural vocoder needs no flag.
    declared = copy_model(bare, tmp_path / "declared")
    write_side_file(declared, {"audio_scale": tiny.TINY_SCALE, "vocoder": "griffin-lim"})
    pipe = Pipeline.from_pretrained(str(declared), vae=str(ckpt["vae"]), device="cpu", dtype="fp32")
    assert pipe.vocoder_name == "griffin-lim" and pipe.vocoder_source is None

    # The neural vocoder is the default, and recorded with its folder.
    pipe = Pipeline.from_pretrained(str(ckpt["model"]), vae=str(ckpt["vae"]), device="cpu", dtype="fp32")
    assert pipe.vocoder_name == "hifigan" and pipe.vocoder_source == str(ckpt["model"] / "vocoder")
    # ... unless Griffin-Lim is asked for.
    pipe = Pipeline.from_pretrained(
        str(ckpt["model"]), vae=str(ckpt["vae"]), device="cpu", dtype="fp32", griffin_lim=True
    )
    assert pipe.vocoder_name == "griffin-lim"

    odd = copy_model(bare, tmp_path / "odd")
    write_side_file(odd, {"audio_scale": tiny.TINY_SCALE, "vocoder": "wavenet"})
    line = one_error_line(
        run_cli(
            "generate",
            "--model",
            str(odd),
            "--vae",
            str(ckpt["vae"]),
            "--frames",
            "2",
            "-o",
            str(tmp_path / "odd.mp4"),
            *FAST,
        )
    )
    assert str(odd / "rflav.json") in line and "'wavenet'" in line


def test_hub_checkpoint_without_cached_vocoder_says_griffin_lim(ckpt, tmp_path):
    """Offline, a Hub checkpoint whose vocoder files are not cached is an error (not Griffin-Lim)."""
    cache = tmp_path / "hub"
    snapshot = tiny.install_in_hf_cache(ckpt["model"], cache, "someone/no-vocoder")
    shutil.rmtree(snapshot / "vocoder")
    env = {"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    line = one_error_line(
        run_cli(
            "generate",
            "--model",
            "someone/no-vocoder",
            "--vae",
            str(ckpt["vae"]),
            "--frames",
            "2",
            "-o",
            str(tmp_path / "h.mp4"),
            *FAST,
            env=env,
        )
    )
    assert "vocoder/config.json" in line and "someone/no-vocoder" in line and "--griffin-lim" in line


# ---------------------------------------------------------------------------------------- --class


def test_class_on_an_unconditional_checkpoint_is_refused(ckpt, tmp_path):
    for label in ("dance", "piano"):
        out = tmp_path / f"{label}.mp4"
        line = one_error_line(
            run_cli(
                "generate",
                "--model",
                str(ckpt["model"]),
                "--vae",
                str(ckpt["vae"]),
                "--class",
                label,
                "--frames",
                "2",
                "-o",
                str(out),
                *FAST,
            )
        )
        assert f"--class {label}: this checkpoint is unconditional" in line
        assert not out.exists() and not out.with_suffix(".json").exists()
    assert "--model" not in line  # the preset hint is for preset names only
    line = one_error_line(
        run_cli(
            "generate",
            "--model",
            str(ckpt["model"]),
            "--vae",
            str(ckpt["vae"]),
            "--class",
            "dance",
            "--frames",
            "2",
            "-o",
            str(tmp_path / "d.mp4"),
            *FAST,
        )
    )
    assert "without --model, or with --model dance" in line
    pipe = Pipeline.from_pretrained(str(ckpt["model"]), vae=str(ckpt["vae"]), device="cpu", dtype="fp32")
    with pytest.raises(RflavError, match="label dance: this checkpoint is unconditional"):
        pipe.generate(num_frames=1, label="dance")
    # A preset name is the preset alone, or as --model and --class together.
    assert generate_model_and_label(GenerateRequest(label="dance")) == ("dance", None)
    assert generate_model_and_label(GenerateRequest(model="dance", label="dance")) == ("dance", None)
    assert generate_model_and_label(GenerateRequest(model="x/y", label="dance")) == ("x/y", "dance")


# ---------------------------------------------------------------------------------------- interruption


def _poll_frames(
    partial_glob, folder: Path, at_least: int, proc: subprocess.Popen, timeout: float = 300
) -> None:
    """Wait until the partial MP4 being written holds at least `at_least` frames."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, proc.communicate()
        for partial in folder.glob(partial_glob):
            try:
                if partial.read_bytes().count(b"moof") >= 1 and video_frames(partial) >= at_least:
                    return
            except (OSError, subprocess.CalledProcessError, ValueError):
                pass
        time.sleep(0.3)
    raise AssertionError("no frames were written in time")


def test_sigint_during_a_fixed_length_run_exits_130_and_says_what_was_written(ckpt, tmp_path):
    out = tmp_path / "short.mp4"
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
            "--frames",
            "3000",
            "-o",
            str(out),
            *FAST,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        _poll_frames(".short.mp4*partial*", tmp_path, 10, proc)  # one fragment (a second) on disk
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, stderr.decode()
    side = json.loads(out.with_suffix(".json").read_text())
    assert side["interrupted"] is True and side["frames_requested"] == 3000 and 10 <= side["frames"] < 3000
    lines = stderr.decode().strip().splitlines()
    assert lines == [
        f"rflav: interrupted: {side['frames']} of 3000 frames written to {out} "
        "(finalised and playable; its .json says interrupted)"
    ], lines
    assert stdout == b""
    assert video_frames(out) == side["frames"] and has_audio(out)
    assert not list(tmp_path.glob(".*partial*"))


def test_sigterm_in_a_later_batch_says_which_samples_are_missing(ckpt, tmp_path, monkeypatch):
    """In process: SIGTERM while the second of three samples is written → exit 143; the first
    is complete, the second short (and playable), the third never started."""
    from rflav_cli import generate as gen

    write = gen._Outputs.write
    count = {"frames": 0}

    def write_then_signal(self, frame):
        write(self, frame)
        count["frames"] += 1
        if count["frames"] == 6 + 2:  # frame 2 of the second sample
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(gen._Outputs, "write", write_then_signal)
    result = run_cli(
        "generate",
        "--model",
        str(ckpt["model"]),
        "--vae",
        str(ckpt["vae"]),
        "--frames",
        "6",
        "--num-samples",
        "3",
        "-o",
        str(tmp_path / "many"),
        "--json",
        *FAST,
    )
    assert result.exit_code == 143, result.output
    first, second = json.loads(result.stdout)
    assert (first["frames"], first["interrupted"]) == (6, False)
    assert second["interrupted"] is True and 2 <= second["frames"] < 6
    assert result.stderr.strip() == (
        f"rflav: interrupted: {second['frames']} of 6 frames written to "
        f"{tmp_path / 'many' / 'model-seed1.mp4'} "
        "(finalised and playable; its .json says interrupted); 1 complete sample before; "
        "1 of 3 samples not generated"
    )
    assert video_frames(tmp_path / "many" / "model-seed1.mp4") == second["frames"]
    assert not (tmp_path / "many" / "model-seed2.mp4").exists()


def test_a_failure_mid_run_leaves_no_partial_or_temporary_file(ckpt, tmp_path, monkeypatch):
    from rflav_cli.pipeline import Generation

    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    produce = Generation._produce_one
    calls = {"n": 0}

    def failing(self):
        calls["n"] += 1
        if calls["n"] == 4:
            raise RuntimeError("a bug in the middle of a run")
        produce(self)

    monkeypatch.setattr(Generation, "_produce_one", failing)
    out = tmp_path / "out" / "broken.mp4"
    with pytest.raises(RuntimeError, match="a bug"):
        run_cli(
            "generate",
            "--model",
            str(ckpt["model"]),
            "--vae",
            str(ckpt["vae"]),
            "--frames",
            "8",
            "--wav",
            "-o",
            str(out),
            *FAST,
        )
    assert list(tmp.iterdir()) == []
    assert list(out.parent.iterdir()) == []


def test_a_failing_endless_stream_keeps_what_it_made(ckpt, tmp_path, monkeypatch):
    """--forever has no length to fall short of: a failure keeps the stream so far, finalised."""
    from rflav_cli.pipeline import Generation

    produce = Generation._produce_one
    calls = {"n": 0}

    def failing(self):
        calls["n"] += 1
        if calls["n"] == 6:
            raise RuntimeError("a bug after a while")
        produce(self)

    monkeypatch.setattr(Generation, "_produce_one", failing)
    out = tmp_path / "stream.mp4"
    with pytest.raises(RuntimeError, match="a bug"):
        run_cli(
            "generate",
            "--model",
            str(ckpt["model"]),
            "--vae",
            str(ckpt["vae"]),
            "--forever",
            "-o",
            str(out),
            *FAST,
        )
    probe = subprocess.run(
        [
            "ffprobe",
            "-v",
            "error",
            "-count_frames",
            "-select_streams",
            "v:0",
            "-show_entries",
            "stream=nb_read_frames",
            "-of",
            "csv=p=0",
            str(out),
        ],
        capture_output=True,
        text=True,
    )
    assert probe.returncode == 0 and int(probe.stdout) >= 1


def _nan_checkpoint(folder: Path) -> Path:
    """The packaged ball model with every weight NaN, as a diverged training run saves it."""
    from safetensors.torch import load_file, save_file

    from rflav_cli.hub import PRESETS

    shutil.copytree(PRESETS["ball"].packaged_folder, folder)
    weights = load_file(folder / "model.safetensors")
    save_file({k: torch.full_like(v, float("nan")) for k, v in weights.items()}, folder / "model.safetensors")
    return folder


def test_a_checkpoint_with_nan_weights_is_one_line_and_leaves_no_file(tmp_path):
    model = _nan_checkpoint(tmp_path / "nan")
    for name, frames in (("x.mp4", "3"), ("long.mp4", "1000")):  # a long one is playable while it grows
        out = tmp_path / "out" / name
        line = one_error_line(
            run_cli("generate", "--model", str(model), "--frames", frames, "--wav", "-o", str(out), *FAST)
        )
        assert "the model produced NaN or infinite sound at frame 0" in line, line
        assert f"the weights of checkpoint {model} are probably not finite" in line
        assert not out.parent.exists() or list(out.parent.iterdir()) == []


def test_an_encoder_failing_at_the_end_leaves_no_file_of_the_batch(tmp_path, monkeypatch):
    """ffmpeg dies as the second sample of a batch is finalised: the first sample, published a
    moment before, goes too, and no temporary file or "running" sidecar is left."""
    from rflav_cli.media import VideoWriter

    close = VideoWriter.close

    def dying_close(self, **kwargs):
        if self.path is not None and "seed1" in self.path.name:
            self._proc.kill()
        return close(self, **kwargs)

    monkeypatch.setattr(VideoWriter, "close", dying_close)
    out = tmp_path / "out"
    args = ("--class", "ball", "--frames", "3", "--num-samples", "2", "--batch-size", "2", "--wav")
    line = one_error_line(run_cli("generate", *args, "-o", f"{out}/", *FAST))
    assert f"while writing {out / 'ball-seed1.mp4'}" in line and "kept" not in line, line
    assert sorted(p.name for p in out.iterdir()) == []


def test_a_failed_rerun_puts_the_sidecar_back(tmp_path, monkeypatch):
    """A sample that a rerun fails to remake keeps the file and sidecar it had, so that a later
    rerun makes it again: never this run's "running" sidecar."""
    from rflav_cli.pipeline import Generation

    out = tmp_path / "clip.mp4"
    args = ("generate", "--class", "ball", "--frames", "4", "-o", str(out), *FAST)
    assert run_cli(*args).exit_code == 0
    side = json.loads(out.with_suffix(".json").read_text())
    side.update(status="interrupted", interrupted=True, frames=2)  # as a stopped run leaves it
    out.with_suffix(".json").write_text(json.dumps(side))
    before = out.with_suffix(".json").read_bytes(), out.read_bytes()

    def failing(self):
        raise RuntimeError("a bug")

    monkeypatch.setattr(Generation, "_produce_one", failing)
    with pytest.raises(RuntimeError, match="a bug"):
        run_cli(*args)
    assert (out.with_suffix(".json").read_bytes(), out.read_bytes()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip.json", "clip.mp4"]
    monkeypatch.undo()
    assert run_cli(*args).exit_code == 0
    assert json.loads(out.with_suffix(".json").read_text())["status"] == "complete"


def test_vae_for_a_hub_checkpoint_in_pixel_space_is_refused_once_it_is_known(tmp_path):
    from rflav_cli.hub import PRESETS

    cache = tmp_path / "hub"
    tiny.install_in_hf_cache(PRESETS["ball"].packaged_folder, cache, "someone/ball")
    env = {"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    out = tmp_path / "out" / "x.mp4"
    args = ("generate", "--model", "someone/ball", "--frames", "2", "-o", str(out), *FAST)
    line = one_error_line(run_cli(*args, "--vae", "someone/vae", env=env))
    assert "--vae someone/vae: someone/ball works in pixel space and uses no VAE: drop --vae" in line
    assert not out.parent.exists()
    assert run_cli(*args, env=env).exit_code == 0 and video_frames(out) == 2


# ---------------------------------------------------------------------------------------- --audio, --video


def _tone(path: Path, seconds: float) -> Path:
    subprocess.run(
        ["ffmpeg", "-v", "error", "-f", "lavfi", "-i", f"sine=frequency=440:duration={seconds}", str(path)],
        check=True,
    )
    return path


def test_the_input_sets_the_length_and_its_guidance_is_recorded(tmp_path):
    tone = _tone(tmp_path / "tone.wav", 0.5)
    out = tmp_path / "a2v.mp4"
    args = ("generate", "--class", "ball", "--audio", str(tone), "-o", str(out), *FAST)
    line = one_error_line(run_cli(*args, "--seconds", "0.8"))
    assert f"--seconds 0.8 asks for 8 frames, and --audio {tone} lasts 5 frames (0.5 s)" in line, line
    line = one_error_line(run_cli(*args, "--frames", "6"))
    assert "--frames 6 asks for 6 frames" in line and "leave --frames out" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tone.wav"]

    assert run_cli(*args, "--frames", "3").exit_code == 0  # a part of the input
    assert video_frames(out) == 3
    side = json.loads(out.with_suffix(".json").read_text())
    assert side["guidance_scale"] == 1.0 and side["frames_requested"] == 3  # the default, as applied

    # A sidecar of an older version says null for the default: the same settings, not made again.
    side["guidance_scale"] = None
    out.with_suffix(".json").write_text(json.dumps(side))
    made = out.stat().st_mtime_ns
    assert run_cli(*args, "--frames", "3").exit_code == 0 and out.stat().st_mtime_ns == made


def test_an_audio_file_without_samples_is_refused(tmp_path):
    import wave

    empty = tmp_path / "empty.wav"
    with wave.open(str(empty), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
    line = one_error_line(
        run_cli("generate", "--class", "ball", "--audio", str(empty), "-o", str(tmp_path / "o"))
    )
    assert f"--audio {empty} holds no audio" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.wav"]


# ---------------------------------------------------------------------------------------- --output


def test_output_names(ckpt, tmp_path):
    args = ("generate", "--model", str(ckpt["model"]), "--vae", str(ckpt["vae"]), "--frames", "2", *FAST)
    line = one_error_line(run_cli(*args, "-o", str(tmp_path / "out.avi")))
    assert f"--output {tmp_path / 'out.avi'}: rflav writes MP4 files only" in line and "folder" in line
    assert not list(tmp_path.iterdir())

    # A name without a suffix is a file: .mp4 is added.
    result = run_cli(*args, "-o", str(tmp_path / "clip"))
    assert result.exit_code == 0, result.output
    assert video_frames(tmp_path / "clip.mp4") == 2
    side = json.loads((tmp_path / "clip.json").read_text())
    assert side["vocoder"] == "hifigan" and side["vocoder_source"] == str(ckpt["model"] / "vocoder")

    # A trailing "/" makes a folder, made if needed; an existing folder is one too.
    result = run_cli(*args, "-o", str(tmp_path / "new") + "/")
    assert result.exit_code == 0, result.output
    assert video_frames(tmp_path / "new" / "model-seed0.mp4") == 2

    req = GenerateRequest(output=str(tmp_path / "new"), seed=4)
    assert generate_output_paths(req, "m", [4]) == [tmp_path / "new" / "m-seed4.mp4"]
    req = GenerateRequest(output=str(tmp_path / "many"), num_samples=2)
    assert generate_output_paths(req, "m", [0, 1]) == [
        tmp_path / "many" / "m-seed0.mp4",
        tmp_path / "many" / "m-seed1.mp4",
    ]
    line = one_error_line(run_cli(*args, "--num-samples", "2", "-o", str(tmp_path / "x.mp4")))
    assert "--num-samples 2 writes several files: give --output a folder" in line


# ---------------------------------------------------------------------------------------- before torch


BEFORE_TORCH = [
    (["--seconds", "-1"], "--seconds must be a positive number"),
    (["-o", "out.avi"], "--output out.avi: rflav writes MP4 files only"),
    (["--device", "gpu"], "unknown --device 'gpu'"),
    (["--class", "ballet"], "unknown class 'ballet'"),
    (["--seed", "-1"], "--seed must be from 0 to"),
    (["--guidance-scale", "2"], "--guidance-scale only applies with --audio or --video"),
    (["--audio", "nowhere.wav"], "--audio nowhere.wav: no such file"),
    (["--seconds", "1e308"], "--seconds must be a positive number of at most 604800 (a week), got 1e+308"),
    (["--seconds", "inf"], "--seconds must be a positive number of at most 604800"),
    (["--seconds", "nan"], "--seconds must be a positive number of at most 604800"),
    (["--frames", "99999999999"], "--frames must be a whole number from 1 to 6048000"),
    (["--seed", str(2**64)], "--seed must be from 0 to 9223372036854775807"),
    (["-o", ""], "--output is empty: give a file name"),
    (["--class", "ball", "--vae", "x"], "--vae x: ball works in pixel space and uses no VAE: drop --vae"),
    (["--class", "ball", "--revision", "main"], "--revision applies to Hub repos, and the ball preset ships"),
    (["--forever", "--audio", "song.mp3"], "--forever cannot be combined with --audio"),
    (["--forever", "--video", "moves.mp4"], "--forever cannot be combined with --video"),
]

CHECK_BEFORE_TORCH = """
import json, sys
from typer.testing import CliRunner
from rflav_cli.cli import app
result = CliRunner().invoke(app, ["generate", *json.loads(sys.argv[1])])
print(json.dumps([result.exit_code, result.stderr, "torch" in sys.modules]))
"""


def _generate_in_fresh_process(args: list[str], cwd: Path) -> tuple[int, str, bool]:
    """`rflav generate ARGS`: exit code, stderr, and whether torch was imported."""
    out = subprocess.run(
        [sys.executable, "-c", CHECK_BEFORE_TORCH, json.dumps(args)],
        cwd=cwd,
        capture_output=True,
        text=True,
        check=True,
    )
    return tuple(json.loads(out.stdout))


def test_bad_values_are_reported_before_torch_is_imported(tmp_path):
    for args, message in BEFORE_TORCH:
        code, stderr, torch_imported = _generate_in_fresh_process(args, tmp_path)
        assert code == 2 and message in stderr and len(stderr.strip().splitlines()) == 1, (args, stderr)
        assert not torch_imported, args


@pytest.mark.parametrize("name", ["ball-seed0.mp4", "ball-seed0.json", "ball-seed0.wav"])
def test_an_output_name_taken_by_a_folder_is_refused_before_any_work(tmp_path, name):
    (tmp_path / name).mkdir()
    args = ["--class", "ball", "--frames", "3", "--wav", "--overwrite"]  # --overwrite replaces files only
    code, stderr, torch_imported = _generate_in_fresh_process(args, tmp_path)
    assert code == 2 and len(stderr.strip().splitlines()) == 1, stderr
    assert f"{name} is a folder, and this run writes a file of that name" in stderr
    assert not torch_imported
    assert [p.name for p in tmp_path.iterdir()] == [name]


def test_seeds_are_whole_numbers_that_torch_takes_as_given():
    from rflav_cli.errors import UsageError
    from rflav_cli.requests import TRAIN_MAX_SEED, TrainConfig, check_generate_request, check_train_config

    for seed in (-1, 2**63, 1.5):
        with pytest.raises(UsageError, match="seed must be from 0 to 9223372036854775807"):
            check_generate_request(GenerateRequest(model="ball", seed=seed))
    # Training multiplies its seed into each step's (train.step_seed), which torch takes below 2**64.
    assert TRAIN_MAX_SEED == 2**32 - 1
    for seed in (-1, 2**32, 99999999999999999999999):
        with pytest.raises(UsageError, match="seed must be from 0 to 4294967295"):
            check_train_config(TrainConfig(data="nowhere", seed=seed))
    from rflav_cli.train import step_seed

    torch.Generator().manual_seed(step_seed(TRAIN_MAX_SEED, 10**12, 1023))


def test_every_generate_option_has_help():
    import typer.main

    command = typer.main.get_command(app).commands["generate"]
    missing = [p.opts[0] for p in command.params if not (getattr(p, "help", None) or "").strip()]
    assert missing == []
    assert any("--griffin-lim" in p.opts for p in command.params)


# ---------------------------------------------------------------------------------------- guidance noise


def test_guidance_noise_comes_from_the_seeded_cpu_generator_on_any_device(ckpt, monkeypatch):
    """The guidance noise of --audio/--video is drawn from sample 0's CPU generator whatever the
    device: the pipeline keeps the generator off the CPU, and the guide draws on the generator's
    device before moving the noise to the frames'."""
    captured = []
    real_guide = Guide

    def recording_guide(*args, **kwargs):
        captured.append(real_guide(*args, **kwargs))
        return captured[-1]

    monkeypatch.setattr("rflav_cli.pipeline.Guide", recording_guide)
    pipe = Pipeline.from_pretrained(str(ckpt["model"]), vae=str(ckpt["vae"]), device="cpu", dtype="fp32")
    pipe.device = torch.device("meta")  # stands in for a GPU: nothing is computed here
    wave = np.zeros(3 * 1600, np.float32)
    pipe.generate(num_frames=2, seeds=[7, 8], audio=wave)
    generator = captured[0].generator
    assert generator is not None and generator.device.type == "cpu" and generator.initial_seed() == 7

    shape = (2, 1, 256, 10)
    frames = [torch.zeros(shape, device="meta") for _ in range(3)]
    state = _GuideState(Guide("audio", iter(frames), generator=torch.Generator().manual_seed(5)), window=3)
    assert all(n.device.type == "meta" and n.shape == shape for n in state.noise)

    on_cpu = _GuideState(
        Guide(
            "audio", iter([torch.zeros(shape) for _ in range(3)]), generator=torch.Generator().manual_seed(5)
        ),
        window=3,
    )
    reference = torch.Generator().manual_seed(5)
    for noise in on_cpu.noise:
        assert torch.equal(noise, torch.randn(shape, generator=reference))
