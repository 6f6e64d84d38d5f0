"""`rflav eval` and `rflav drift` end to end, with the formula weights in the original file layouts."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys

import formula_weights
import numpy as np
import pytest
import rounding_bounds
import tiny
import torch
from conftest import FIXTURES
from typer.testing import CliRunner

from rflav_cli.cli import app
from rflav_cli.hub import read_side_file, write_side_file
from rflav_cli.media import find_ffmpeg


@pytest.fixture(scope="module")
def i3d_file(tmp_path_factory):
    """I3D formula weights alone, in a folder of their own."""
    path = tmp_path_factory.mktemp("i3d") / "i3d_pretrained_400.pt"
    torch.save(formula_weights.formula_state_dict(FIXTURES / "i3d_keys.tsv"), path)
    return path


@pytest.fixture(scope="module")
def audioclip_file(tmp_path_factory):
    """AudioCLIP formula weights alone, in a folder of their own."""
    path = tmp_path_factory.mktemp("audioclip") / "AudioCLIP-Full-Training.pt"
    audio = formula_weights.formula_state_dict(FIXTURES / "audioclip_audio_keys.tsv")
    audio["text.token_embedding.weight"] = torch.zeros(2, 2)  # other towers in the file are ignored
    torch.save(audio, path)
    return path


@pytest.fixture(scope="module")
def weights(i3d_file, audioclip_file):
    return ["--i3d-weights", str(i3d_file), "--audioclip-weights", str(audioclip_file)]


@pytest.fixture
def no_cached_weights(tmp_path, monkeypatch):
    """An empty weights cache: with --offline, only weights given by path can be found."""
    monkeypatch.setenv("RFLAV_CACHE", str(tmp_path / "empty-cache"))


def make_video(path, pattern: str, tone: float, seconds: float, audio: bool = True):
    cmd = [
        find_ffmpeg(),
        "-v",
        "error",
        "-y",
        "-f",
        "lavfi",
        "-i",
        f"{pattern}=size=96x64:rate=10:duration={seconds}",
    ]
    if audio:
        cmd += [
            "-f",
            "lavfi",
            "-i",
            f"sine=frequency={tone}:duration={seconds}:sample_rate=44100",
            "-c:a",
            "aac",
        ]
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


COMMON = ["eval", "--num-clips", "2", "--clip-stride", "4", "--device", "cpu", "--json"]


@pytest.fixture(scope="module")
def full(sets, weights, tmp_path_factory):
    """All three metrics of the fake set against the real folder, with the real features saved."""
    stats = tmp_path_factory.mktemp("stats") / "real.npz"
    result = run(
        *COMMON,
        *weights,
        "--real",
        str(sets / "real"),
        "--fake",
        str(sets / "fake"),
        "--save-real-stats",
        str(stats),
    )
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout), stats


def test_eval_json_stats_and_identical_sets(sets, weights, full):
    out, stats = full
    assert out["protocol"] == "mmdiffusion" and out["letterbox_antialias"] is True
    assert out["real"]["clips"] == 2 and out["fake"]["clips"] == 2
    assert all(math.isfinite(out[k]) and out[k] != 0 for k in ("fvd", "kvd", "fad"))
    # The saved real features give the same numbers (same features, same computation).
    again = json.loads(run(*COMMON, *weights, "--real", str(stats), "--fake", str(sets / "fake")).stdout)
    for key in ("fvd", "kvd", "fad"):
        assert again[key] == pytest.approx(out[key], rel=1e-6)
    # A set against itself: the features are the saved ones again, so FVD and FAD are float32
    # rounding of an exact 0 (square-rooted noise: two clips in 400 and 1024 dimensions), within
    # the float32 bounds of those features; the two different sets are far outside them.
    same = json.loads(run(*COMMON, *weights, "--real", str(stats), "--fake", str(sets / "real")).stdout)
    with np.load(stats) as saved:
        video, audio = saved["video"], saved["audio"]
    for key, features, scale in (("fvd", video, 1.0), ("fad", audio, 1e4)):
        bound = scale * rounding_bounds.frechet_bound(features, features)
        assert abs(same[key]) <= bound, key
        assert out[key] > 5 * bound, key


def test_fad_alone_needs_no_i3d_weights(sets, audioclip_file, i3d_file, full, no_cached_weights, tmp_path):
    # No I3D weights anywhere (empty cache, downloads off): FAD runs on the AudioCLIP weights alone.
    stats = tmp_path / "audio-only.npz"
    result = run(
        *COMMON,
        "--metrics",
        "fad",
        "--offline",
        "--audioclip-weights",
        str(audioclip_file),
        "--real",
        str(sets / "real"),
        "--fake",
        str(sets / "fake"),
        "--save-real-stats",
        str(stats),
    )
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["metrics"] == ["fad"] and "fvd" not in out and "kvd" not in out
    assert out["fad"] == pytest.approx(full[0]["fad"], rel=1e-6)  # the same audio features as with all three
    with np.load(stats) as saved:
        assert saved["video"].shape == (2, 0) and saved["audio"].shape == (2, 1024)
    # Those statistics cannot serve FVD: one line saying how to recompute them.
    refused = run(
        *COMMON,
        "--metrics",
        "fvd",
        "--offline",
        "--real",
        str(stats),
        "--fake",
        str(sets / "fake"),
        "--i3d-weights",
        str(i3d_file),
    )
    assert refused.exit_code == 2, refused.output
    assert "holds no video features" in refused.stderr and "--metrics" in refused.stderr


def test_fvd_and_kvd_need_no_audioclip_weights(sets, i3d_file, full, no_cached_weights):
    result = run(
        *COMMON,
        "--metrics",
        "fvd,kvd",
        "--offline",
        "--i3d-weights",
        str(i3d_file),
        "--real",
        str(sets / "real"),
        "--fake",
        str(sets / "fake"),
    )
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["metrics"] == ["fvd", "kvd"] and "fad" not in out
    assert out["fvd"] == pytest.approx(full[0]["fvd"], rel=1e-6)
    assert out["kvd"] == pytest.approx(full[0]["kvd"], rel=1e-6)


def test_too_few_clips_is_refused_unless_allowed(sets, weights):
    args = [
        "eval",
        "--real",
        str(sets / "real"),
        "--fake",
        str(sets / "fake"),
        "--clip-stride",
        "4",
        "--metrics",
        "fvd",
        "--device",
        "cpu",
        *weights,
    ]
    refused = run(*args, "--num-clips", "3")
    assert refused.exit_code == 2 and "real set has 2 clips but --num-clips is 3" in refused.stderr
    # --num is the old name of --num-clips, kept for one release (and hidden from -h).
    allowed = run(*args, "--num", "3", "--allow-fewer", "--json")
    assert allowed.exit_code == 0 and json.loads(allowed.stdout)["real"]["clips"] == 2
    assert "--num is now --num-clips" in allowed.stderr
    help_text = run("eval", "-h").stdout
    assert "--num-clips" in help_text and "--num " not in help_text and "--num," not in help_text


def test_fad_needs_audio_and_names_the_file(sets, weights, tmp_path):
    (tmp_path / "fake").mkdir()
    make_video(tmp_path / "fake" / "mute.mp4", "testsrc", 0, 2.0, audio=False)
    make_video(tmp_path / "fake" / "ok.mp4", "testsrc", 300, 2.0)
    result = run(
        "eval",
        "--real",
        str(sets / "real"),
        "--fake",
        str(tmp_path / "fake"),
        "--num-clips",
        "2",
        "--clip-stride",
        "4",
        "--device",
        "cpu",
        *weights,
    )
    assert result.exit_code == 2 and "mute.mp4" in result.stderr and "FAD" in result.stderr


@pytest.mark.parametrize(
    "metrics,needed,not_needed",
    [
        ("fvd,kvd,fad", "i3d_pretrained_400.pt", None),
        ("fad", "AudioCLIP-Full-Training.pt", "i3d_pretrained_400.pt"),
        ("kvd", "i3d_pretrained_400.pt", "AudioCLIP-Full-Training.pt"),
    ],
)
def test_missing_weights_offline(sets, no_cached_weights, metrics, needed, not_needed):
    result = run(
        "eval",
        "--real",
        str(sets / "real"),
        "--fake",
        str(sets / "fake"),
        "--num-clips",
        "2",
        "--offline",
        "--device",
        "cpu",
        "--metrics",
        metrics,
    )
    assert result.exit_code == 2
    assert needed in result.stderr and "Traceback" not in result.output
    assert not_needed is None or not_needed not in result.stderr


def test_drift_writes_csv_and_png(sets, weights, tmp_path):
    (tmp_path / "long").mkdir()
    for i, pattern in enumerate(("testsrc", "smptebars")):
        make_video(tmp_path / "long" / f"{i}.mp4", pattern, 300 + 100 * i, 3.2)
    out = tmp_path / "drift"
    result = run(
        "drift",
        "--fake",
        str(tmp_path / "long"),
        "--real",
        str(sets / "real"),
        "--stride",
        "8",
        "--num-clips",
        "2",
        "--device",
        "cpu",
        "--output",
        str(out),
        "--quiet",
        *weights,
    )
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(open(out.with_suffix(".csv"))))
    assert [int(r["start_frame"]) for r in rows] == [0, 8, 16]  # 32 frames, 16-frame windows, stride 8
    assert {"fvd", "kvd", "fad", "video_feature_drift", "audio_feature_drift"} <= set(rows[0])
    assert float(rows[0]["video_feature_drift"]) == 0.0
    png = out.with_suffix(".png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


@pytest.mark.parametrize(
    "metrics,columns",
    [
        ("fad", {"fad", "audio_feature_drift"}),
        ("fvd,kvd", {"fvd", "kvd", "video_feature_drift"}),
    ],
)
def test_drift_loads_only_the_networks_its_metrics_need(
    sets, i3d_file, audioclip_file, no_cached_weights, tmp_path, metrics, columns
):
    (tmp_path / "long").mkdir()
    for i, pattern in enumerate(("testsrc", "smptebars")):
        make_video(tmp_path / "long" / f"{i}.mp4", pattern, 300 + 100 * i, 1.7)  # one window position
    given = (
        ["--audioclip-weights", str(audioclip_file)] if metrics == "fad" else ["--i3d-weights", str(i3d_file)]
    )
    # A .csv ending of --output names the CSV; the PNG goes beside it.
    result = run(
        "drift",
        "--fake",
        str(tmp_path / "long"),
        "--real",
        str(sets / "real"),
        "--num-clips",
        "2",
        "--metrics",
        metrics,
        "--offline",
        "--device",
        "cpu",
        "-o",
        str(tmp_path / "d.csv"),
        "-q",
        *given,
    )
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(open(tmp_path / "d.csv")))
    assert len(rows) == 1 and set(rows[0]) == {"position", "start_frame", "start_s", "videos"} | columns
    assert all(math.isfinite(float(rows[0][c])) for c in columns)
    assert (tmp_path / "d.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_eval_model_generates_and_needs_only_the_asked_networks(
    sets, audioclip_file, no_cached_weights, tmp_path
):
    # A tiny local checkpoint whose rflav.json names a local VAE: nothing is downloaded.
    model = tiny.build_tiny_model(tmp_path / "model")
    vae = tiny.build_tiny_vae(tmp_path / "vae")
    write_side_file(model, {**read_side_file(model), "autoencoder": str(vae)})
    generated = tmp_path / "generated"
    result = run(
        "eval",
        "--model",
        str(model),
        "--num-samples",
        "2",
        "--fake-out",
        str(generated),
        "--real",
        str(sets / "real"),
        "--num-clips",
        "2",
        "--clip-stride",
        "4",
        "--metrics",
        "fad",
        "--offline",
        "--device",
        "cpu",
        "--json",
        "--audioclip-weights",
        str(audioclip_file),
    )
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert sorted(p.name for p in generated.rglob("*.mp4")) == ["model-seed0.mp4", "model-seed1.mp4"]
    assert out["fake"]["clips"] == 2 and out["fake"]["generated"]["samples"] == 2
    assert math.isfinite(out["fad"]) and "fvd" not in out


def test_clips_generated_into_a_temporary_folder_are_removed(monkeypatch, tmp_path):
    from rflav_cli import evaluate

    made = tmp_path / "rflav-eval-fake-1"

    def generate(req, console):
        made.mkdir()
        (made / "model-seed0.mp4").write_bytes(b"clip")
        return made, {"samples": 1}

    monkeypatch.setattr(evaluate, "_generate_fake_set", generate)
    request = evaluate.EvalRequest(real=tmp_path, model="model")
    with pytest.raises(RuntimeError, match="stopped"):
        with evaluate._fake_folder(request, None) as (folder, _):
            assert folder == made and (folder / "model-seed0.mp4").is_file()
            raise RuntimeError("stopped")  # a failure while the clips are evaluated
    assert not made.exists()
    kept = evaluate.EvalRequest(real=tmp_path, model="model", fake_out=made)
    with evaluate._fake_folder(kept, None):
        pass
    assert (made / "model-seed0.mp4").is_file()  # --fake-out keeps them


@pytest.mark.parametrize(
    "args,message",
    [
        (["eval", "--metrics", "fvd,xyz"], "unknown metric 'xyz' in --metrics"),
        (["eval", "--metrics", " , "], "--metrics names no metric"),
        (["eval", "--letterbox-antialias", "maybe"], "--letterbox-antialias"),
        (["eval", "--protocol", "stylegan-v"], "--protocol"),
        (["eval", "--num-clips", "1"], "--num-clips"),
        (["eval", "--clip-stride", "0"], "--clip-stride"),
        (["eval", "--num-samples", "4"], "--num-samples only applies with --model"),
        (["eval", "--model", "dance"], "give either --fake"),
        (["eval", "--num", "3", "--num-clips", "4"], "--num is the old name of --num-clips"),
        (["eval", "--save-real-stats", "real.txt"], "must end in .npz"),
        (["eval", "--device", "gpu"], "unknown --device 'gpu'"),
        (["drift", "--window", "8"], "--window must be 16 frames"),
        (["drift", "--stride", "0"], "--stride"),
        (["drift", "--metrics", "fid"], "unknown metric 'fid'"),
    ],
)
def test_bad_flags_fail_in_one_line_before_torch_is_imported(tmp_path, args, message):
    (tmp_path / "real").mkdir()
    (tmp_path / "fake").mkdir()
    full_args = [*args, "--real", str(tmp_path / "real"), "--fake", str(tmp_path / "fake")]
    code = (
        "import sys, json\n"
        "from typer.testing import CliRunner\n"
        "from rflav_cli.cli import app\n"
        f"r = CliRunner().invoke(app, {full_args!r})\n"
        "print(json.dumps([r.exit_code, r.stderr, 'torch' in sys.modules]))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    exit_code, stderr, torch_imported = json.loads(proc.stdout.strip().splitlines()[-1])
    assert exit_code == 2 and message in stderr, stderr
    assert not torch_imported


def test_damaged_statistics_files_are_one_line_errors(sets, weights, full, tmp_path):
    good = full[1].read_bytes()
    cases = {
        "random.npz": os.urandom(4096),
        "truncated.npz": good[: len(good) // 2],
    }
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
    np.savez(
        tmp_path / "shapes.npz",
        video=np.zeros((2, 7), np.float32),
        audio=np.zeros((2, 1024), np.float32),
        meta=np.array(json.dumps({"protocol": "mmdiffusion", "letterbox_antialias": True})),
    )
    np.savez(tmp_path / "other.npz", features=np.zeros((2, 400), np.float32))
    expected = {
        "random.npz": "not a readable .npz",
        "truncated.npz": "not a readable .npz",
        "shapes.npz": "video features of shape (2, 7)",
        "other.npz": "no video, audio, meta",
    }
    for name, message in expected.items():
        result = run(*COMMON, *weights, "--real", str(tmp_path / name), "--fake", str(sets / "fake"))
        assert result.exit_code == 2, (name, result.output)
        line = result.stderr.strip()
        assert "\n" not in line and str(tmp_path / name) in line and message in line, (name, line)
        assert "--save-real-stats" in line
    # Statistics computed with the other letterbox setting are refused, saying which setting.
    off = run(
        *COMMON,
        *weights,
        "--real",
        str(full[1]),
        "--fake",
        str(sets / "fake"),
        "--letterbox-antialias",
        "off",
    )
    assert off.exit_code == 2 and "letterbox antialias on" in off.stderr


def test_two_process_eval_gives_the_single_process_numbers(weights, tmp_path):
    # 2.5 s = 25 frames = 10 windows per set: two loader batches (8 + 2), one per rank.
    for name, pattern, tone in (("real", "testsrc", 440), ("fake", "smptebars", 220)):
        (tmp_path / name).mkdir()
        make_video(tmp_path / name / "one.mp4", pattern, tone, 2.5)
    args = [
        "eval",
        "--real",
        str(tmp_path / "real"),
        "--fake",
        str(tmp_path / "fake"),
        "--num-clips",
        "10",
        "--device",
        "cpu",
        "--json",
        *weights,
    ]
    # Both runs on one thread per process: each rank computes whole loader batches, so every
    # feature, and so every score, is the single process's to the last bit on any CPU.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "rflav_cli", *args], capture_output=True, text=True, timeout=300, env=env
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    single = json.loads(proc.stdout)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        "29533",
        "-m",
        "rflav_cli",
        *args,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    sharded = json.loads(
        out[out.index("\n{") + 1 :] if not out.startswith("{") else out
    )  # gloo logs to stdout
    for key in ("fvd", "kvd", "fad"):
        assert sharded[key] == single[key], key
