"""`rflav eval` and `rflav drift` end to end, with the formula weights in the original file layouts."""

from __future__ import annotations

import csv
import errno
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

from rflav_cli import evaluate
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
    made = tmp_path / "rflav-eval-fake-1"

    def generate(req, console, classes):
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
        (["eval", "--class", "a"], "--class only applies with --model"),
        (["eval", "--vae", "vae/"], "--vae only applies with --model"),
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


# ---------------------------------------------------------------------------------------- --model --class


@pytest.fixture(scope="module")
def class_model(tmp_path_factory):
    """A tiny checkpoint trained on class folders a and b, with a local VAE: nothing is downloaded."""
    root = tmp_path_factory.mktemp("classes")
    model = tiny.build_tiny_model(root / "model", num_classes=2, class_names=["a", "b"])
    vae = tiny.build_tiny_vae(root / "vae")
    write_side_file(model, {**read_side_file(model), "autoencoder": str(vae)})
    return model


def eval_model(model, sets, i3d_file, fake_out, *extra):
    return run(
        "eval",
        "--model",
        str(model),
        "--fake-out",
        str(fake_out),
        "--real",
        str(sets / "real"),
        "--num-clips",
        "2",
        "--clip-stride",
        "4",
        "--metrics",
        "fvd",
        "--offline",
        "--device",
        "cpu",
        "--json",
        "--i3d-weights",
        str(i3d_file),
        *extra,
    )


def sidecars(folder):
    """(subfolder, file, class, seed, status) of every generated clip under `folder`."""
    found = []
    for mp4 in sorted(folder.rglob("*.mp4")):
        side = json.loads(mp4.with_suffix(".json").read_text())
        found.append((mp4.parent.name, mp4.name, side["class"], side["seed"], side["status"]))
    return found


def test_eval_model_of_a_class_conditional_checkpoint(
    class_model, sets, i3d_file, no_cached_weights, tmp_path
):
    generated = tmp_path / "generated"
    # One class first: its clips are those the evaluation of every class makes for it.
    one = eval_model(class_model, sets, i3d_file, generated, "--class", "b", "--num-samples", "2")
    assert one.exit_code == 0, one.output
    out = json.loads(one.stdout)
    assert out["fake"]["generated"]["classes"] == [
        {"class": "b", "folder": "b", "samples": 2, "seeds": [1_000_000, 1_000_001]}
    ]
    assert sidecars(generated) == [
        ("b", "model-seed1000000.mp4", "b", 1_000_000, "complete"),
        ("b", "model-seed1000001.mp4", "b", 1_000_001, "complete"),
    ]
    made_b = {p.name: p.stat().st_mtime_ns for p in (generated / "b").glob("*.mp4")}

    # Every class (the default): sample i is of class i mod 2, so 4 samples are 2 a and 2 b; the
    # b clips above are complete and kept, only the a clips are made.
    every = eval_model(class_model, sets, i3d_file, generated, "--num-samples", "4")
    assert every.exit_code == 0, every.output
    out = json.loads(every.stdout)
    assert out["fake"]["generated"]["classes"] == [
        {"class": "a", "folder": "a", "samples": 2, "seeds": [0, 1]},
        {"class": "b", "folder": "b", "samples": 2, "seeds": [1_000_000, 1_000_001]},
    ]
    assert sidecars(generated) == [
        ("a", "model-seed0.mp4", "a", 0, "complete"),
        ("a", "model-seed1.mp4", "a", 1, "complete"),
        ("b", "model-seed1000000.mp4", "b", 1_000_000, "complete"),
        ("b", "model-seed1000001.mp4", "b", 1_000_001, "complete"),
    ]
    assert {p.name: p.stat().st_mtime_ns for p in (generated / "b").glob("*.mp4")} == made_b
    assert out["fake"]["videos"] == 4 and out["fake"]["clips"] == 4 and math.isfinite(out["fvd"])
    for name in ("a", "b"):  # each class folder is a generate folder of its own
        rows = [json.loads(line) for line in (generated / name / "manifest.jsonl").read_text().splitlines()]
        assert [r["status"] for r in rows] == ["complete", "complete"]

    # An odd count: the first classes get one more.
    shares = [(cls.name, n) for cls, n in evaluate.class_shares(evaluate.model_classes(str(class_model)), 5)]
    assert shares == [("a", 3), ("b", 2)]


def test_eval_model_class_is_checked_before_any_work(
    class_model, sets, i3d_file, no_cached_weights, tmp_path
):
    unknown = eval_model(class_model, sets, i3d_file, tmp_path / "g", "--class", "c")
    assert unknown.exit_code == 2
    assert unknown.stderr.strip() == "rflav: error: unknown class 'c': valid classes for --class are a, b"
    assert not (tmp_path / "g").exists()
    # By index, as generate takes it.
    assert [c.name for c in evaluate.model_classes(str(class_model), "1")] == ["b"]
    plain = tiny.build_tiny_model(tmp_path / "plain")
    refused = eval_model(plain, sets, i3d_file, tmp_path / "g", "--class", "a")
    assert refused.exit_code == 2
    assert "--class a: this checkpoint is unconditional: drop --class" in refused.stderr


def test_eval_model_takes_a_vae_for_a_checkpoint_naming_none(sets, i3d_file, no_cached_weights, tmp_path):
    latent = tiny.build_tiny_model(tmp_path / "latent")  # its rflav.json names no autoencoder
    missing = eval_model(latent, sets, i3d_file, tmp_path / "g")
    assert missing.exit_code == 2 and "--vae PATH" in missing.stderr  # offline: the default VAE is not here
    vae = tiny.build_tiny_vae(tmp_path / "vae")
    given = eval_model(latent, sets, i3d_file, tmp_path / "g", "--num-samples", "2", "--vae", str(vae))
    assert given.exit_code == 0, given.stderr
    sides = [json.loads(p.read_text()) for p in sorted((tmp_path / "g").glob("*.json"))]
    assert [side["vae"] for side in sides] == [str(vae)] * 2


# ---------------------------------------------------------------------------------------- --real stats.npz


def test_saved_statistics_follow_num_clips(sets, i3d_file, full, tmp_path):
    two_clips = full[1]
    args = [
        "eval",
        "--clip-stride",
        "4",
        "--device",
        "cpu",
        "--metrics",
        "fvd",
        "--i3d-weights",
        str(i3d_file),
    ]
    args += ["--fake", str(sets / "fake")]  # 2 clips
    # Too few: refused as a folder of too few clips is, unless --allow-fewer.
    fewer = run(*args, "--real", str(two_clips), "--num-clips", "3")
    assert fewer.exit_code == 2, fewer.output
    line = fewer.stderr.strip()
    assert "\n" not in line and str(two_clips) in line
    assert "holds the features of 2 clips but --num-clips is 3" in line and "--allow-fewer" in line
    allowed = run(*args, "--real", str(two_clips), "--num-clips", "3", "--allow-fewer", "--json")
    assert allowed.exit_code == 0, allowed.output
    assert json.loads(allowed.stdout)["real"] == {
        "stats": str(two_clips),
        "clips_available": 2,
        "clips": 2,
        "seed": 0,
    }

    # More: the first --num-clips clips, the same numbers as a file that holds only those.
    (tmp_path / "real4").mkdir()
    make_video(tmp_path / "real4" / "a.mp4", "testsrc", 440, 2.0)
    make_video(tmp_path / "real4" / "b.mp4", "rgbtestsrc", 660, 2.0)
    four_clips = tmp_path / "four.npz"
    real4 = ["--real", str(tmp_path / "real4"), "--num-clips", "4", "--allow-fewer"]
    saved = run(*args, *real4, "--save-real-stats", str(four_clips))
    assert saved.exit_code == 0, saved.output
    with np.load(four_clips) as data:
        video, audio, meta = data["video"], data["audio"], data["meta"]
    assert video.shape == (4, 400)
    first_two = tmp_path / "first-two.npz"
    np.savez(first_two, video=video[:2], audio=audio[:2], meta=meta)
    cut = json.loads(run(*args, "--real", str(four_clips), "--num-clips", "2", "--json").stdout)
    expected = json.loads(run(*args, "--real", str(first_two), "--num-clips", "2", "--json").stdout)
    assert cut["real"]["clips_available"] == 4 and cut["real"]["clips"] == 2
    assert cut["fvd"] == expected["fvd"]
    every = run(*args, "--real", str(four_clips), "--num-clips", "4", "--allow-fewer", "--json")
    every = json.loads(every.stdout)
    assert every["real"]["clips"] == 4 and every["fvd"] != cut["fvd"]


# ---------------------------------------------------------------------------------------- video kinds


def test_training_video_kinds_are_evaluated(sets, i3d_file, tmp_path):
    # The same streams in .mkv and .mov as in .mp4: the same clips, so the same FVD.
    args = ["eval", "--clip-stride", "4", "--device", "cpu", "--json", "--metrics", "fvd"]
    args += ["--i3d-weights", str(i3d_file), "--allow-fewer"]
    for kind, names in (("mp4", ("a.mp4", "b.mp4")), ("other", ("a.mkv", "b.mov"))):
        (tmp_path / kind).mkdir()
        for source, name in zip((sets / "real" / "a.mp4", sets / "fake" / "a.mp4"), names):
            cmd = [find_ffmpeg(), "-v", "error", "-i", str(source), "-c", "copy", str(tmp_path / kind / name)]
            subprocess.run(cmd, check=True)
    results = {}
    for kind in ("mp4", "other"):
        result = run(*args, "--num-clips", "4", "--real", str(tmp_path / kind), "--fake", str(sets / "fake"))
        assert result.exit_code == 0, result.output
        results[kind] = json.loads(result.stdout)
    assert results["other"]["real"]["videos"] == 2 and results["other"]["real"]["clips"] == 4
    assert results["other"]["fvd"] == results["mp4"]["fvd"]
    # A folder of those kinds alone is no longer "no videos found".
    (tmp_path / "mkv-only").mkdir()
    (tmp_path / "other" / "a.mkv").rename(tmp_path / "mkv-only" / "a.mkv")
    alone = run(*args, "--num-clips", "2", "--real", str(tmp_path / "mkv-only"), "--fake", str(sets / "fake"))
    assert alone.exit_code == 0, alone.output
    assert json.loads(alone.stdout)["real"]["clips"] == 2


# ---------------------------------------------------------------------------------------- outputs


def test_unwritable_outputs_fail_before_any_work(sets, class_model, no_cached_weights, tmp_path):
    # No weights anywhere and downloads off: a check that came after the weights' would say so.
    blocker = tmp_path / "afile"
    blocker.write_text("not a folder")
    cases = [
        (
            ["eval", "--real", str(sets / "real"), "--fake", str(sets / "fake")],
            ["--save-real-stats", str(blocker / "x.npz")],
            f"--save-real-stats {blocker / 'x.npz'} cannot be written: {blocker} is a file",
        ),
        (
            ["eval", "--real", str(sets / "real"), "--model", str(class_model)],
            ["--fake-out", str(blocker / "clips")],
            f"--fake-out {blocker / 'clips'} cannot be made: {blocker} is a file",
        ),
        (
            ["drift", "--real", str(sets / "real"), "--fake", str(sets / "fake")],
            ["-o", str(blocker / "d")],
            f"--output {blocker / 'd'} cannot be written: {blocker} is a file",
        ),
    ]
    for command, output, message in cases:
        result = run(*command, *output, "--offline", "--device", "cpu", "--num-clips", "2")
        assert result.exit_code == 2, result.output
        line = result.stderr.strip()
        assert "\n" not in line and message in line and "Traceback" not in result.output, line
        # The same command with a usable output goes on, to the missing weights.
        ok = run(*command, *output[:-1], str(tmp_path / "out" / "x.npz"), "--offline", "--device", "cpu")
        assert ok.exit_code == 2 and "i3d_pretrained_400.pt" in ok.stderr, ok.stderr


def test_failed_writes_are_one_line(sets, i3d_file, full, monkeypatch, tmp_path):
    def fail_with(code):
        def atomic_write(target, write, suffix=".tmp"):
            temporary = target.parent / f".{target.name}.tmp"
            raise OSError(code, os.strerror(code), str(temporary))

        return atomic_write

    # An I/O error saving the real statistics: what failed and where.
    monkeypatch.setattr(evaluate, "atomic_write", fail_with(errno.EIO))
    stats = tmp_path / "real.npz"
    result = run(
        *COMMON,
        "--metrics",
        "fvd",
        "--i3d-weights",
        str(i3d_file),
        "--real",
        str(sets / "real"),
        "--fake",
        str(sets / "fake"),
        "--save-real-stats",
        str(stats),
    )
    assert result.exit_code == 2, result.output
    assert result.stderr.strip() == (
        f"rflav: error: cannot write {stats} ({os.strerror(errno.EIO)}): choose another --save-real-stats"
    )
    # A full disk writing the drift CSV: reported as for every command (exit 1), naming the CSV.
    monkeypatch.setattr(evaluate, "atomic_write", fail_with(errno.ENOSPC))
    (tmp_path / "long").mkdir()
    for i, pattern in enumerate(("testsrc", "smptebars")):
        make_video(tmp_path / "long" / f"{i}.mp4", pattern, 300 + 100 * i, 1.7)
    result = run(
        "drift",
        "--fake",
        str(tmp_path / "long"),
        "--real",
        str(full[1]),
        "--num-clips",
        "2",
        "--metrics",
        "fvd",
        "--device",
        "cpu",
        "--i3d-weights",
        str(i3d_file),
        "-o",
        str(tmp_path / "d"),
        "-q",
    )
    assert result.exit_code == 1, result.output
    line = result.stderr.strip()
    assert "\n" not in line and "no space left" in line and str(tmp_path / "d.csv") in line, line
    assert not (tmp_path / "d.csv").exists()
