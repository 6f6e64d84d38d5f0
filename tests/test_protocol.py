"""The mmdiffusion protocol's media side against MM-Diffusion's recorded inputs (e2e_protocol etc.)."""

from __future__ import annotations

import hashlib
import json
import math
import random
import subprocess
from pathlib import Path

import numpy as np
import pytest
import rounding_bounds as rb
import torch
import torchvision.transforms as T
from safetensors.torch import load_file
from torchvision.transforms import InterpolationMode

from rflav_cli.data import VIDEO_EXTENSIONS
from rflav_cli.media import MediaError, find_ffmpeg
from rflav_cli.metrics import protocol as P
from rflav_cli.metrics.frechet import frechet_distance
from rflav_cli.metrics.kernel import polynomial_mmd

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread_module):
    """Metrics on one thread (see conftest.one_thread_module)."""


@pytest.fixture(scope="module")
def e2e() -> tuple[dict[str, torch.Tensor], dict]:
    meta = json.loads((FIXTURES / "e2e_protocol.json").read_text())
    return load_file(str(FIXTURES / "e2e_protocol.safetensors")), meta


def sha256(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


def synth(path: Path, *args: str) -> Path:
    cmd = [find_ffmpeg(), "-hide_banner", "-loglevel", "error", "-y", *args, str(path)]
    subprocess.run(cmd, check=True, stdin=subprocess.DEVNULL)
    return path


# --------------------------------------------------------------------------------------
# clips
# --------------------------------------------------------------------------------------
def test_resampling_to_10_fps(tmp_path):
    # 20 fps: every 2nd frame; 25 fps: floor(k·2.5) on ⌊N·10/25⌋ frames (torchvision VideoClips).
    v20 = synth(
        tmp_path / "a20.mp4", "-f", "lavfi", "-i", "testsrc=s=32x24:r=20:d=1.7", "-pix_fmt", "yuv420p"
    )
    v25 = synth(
        tmp_path / "b25.mp4", "-f", "lavfi", "-i", "testsrc=s=32x24:r=25:d=1.8", "-pix_fmt", "yuv420p"
    )
    clips = P.enumerate_clips([v20, v25])
    c20 = [c for c in clips if c.path == v20]
    c25 = [c for c in clips if c.path == v25]
    assert [c.frames for c in c20] == [tuple(range(0, 32, 2)), tuple(range(2, 34, 2))]
    # Audio window: (last original frame + 1)/fps in float32, not 1.6 s (quirk 10).
    assert c20[0].start_t == 0.0 and c20[0].end_t == float(np.float32(31) / np.float32(20))
    assert c20[1].start_t == float(np.float32(0.1))
    idx25 = [math.floor(k * 2.5) for k in range(45 * 10 // 25)]
    assert [c.frames for c in c25] == [tuple(idx25[w : w + 16]) for w in range(3)]
    assert c25[0].end_t == float(np.float32(38) / np.float32(25))


def test_video_file_listing(tmp_path):
    # The evaluator's kinds and those of training data, in one order: names sorted, folders in place.
    names = ("b.mp4", "a.MP4", "c.txt", "noext", "sub/x.gif", "sub/y.avi", "a0/z.mp4", "d.mkv", "e.webm")
    for rel in (*names, "sub/w.MOV", "f.mp3"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"")
    got = [p.relative_to(tmp_path).as_posix() for p in P.list_video_files(tmp_path)]
    assert got == ["a.MP4", "a0/z.mp4", "b.mp4", "d.mkv", "e.webm", "sub/w.MOV", "sub/x.gif", "sub/y.avi"]
    assert {"." + e for e in P.VIDEO_EXTENSIONS} == set(VIDEO_EXTENSIONS) | {".gif"}


def test_loader_batches():
    assert P.loader_batches(15, 15) == [list(range(8)), list(range(8, 15))]
    # A short set repeats pass after pass, and the last batch is computed whole.
    assert P.loader_batches(15, 20) == [list(range(8)), list(range(8, 15)), list(range(8))]
    order = list(range(30))
    random.Random(5).shuffle(order)
    assert P.loader_batches(30, 16, seed=5) == [order[:8], order[8:16]]
    with pytest.raises(ValueError, match="batch of one"):
        P.loader_batches(9, 9)


# --------------------------------------------------------------------------------------
# video
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("antialias", [True, False])
@pytest.mark.parametrize("hw", [(48, 80), (81, 50), (64, 64), (256, 256)])
def test_letterbox_equals_torchvision_resize_and_pad(hw, antialias):
    h, w = hw
    frames = torch.randint(
        0, 256, (3, 3, h, w), generator=torch.Generator().manual_seed(h * w), dtype=torch.uint8
    )
    ratio = min(64 / h, 64 / w)
    fit = (int(h * ratio), int(w * ratio))
    left, top = (64 - fit[1]) // 2, (64 - fit[0]) // 2
    reference = T.Compose(
        [
            T.Resize(fit, interpolation=InterpolationMode.BICUBIC, antialias=antialias),
            T.Pad((left, top, 64 - fit[1] - left, 64 - fit[0] - top)),
        ]
    )(frames)
    assert torch.equal(P.letterbox(frames, antialias=antialias), reference)


def test_uint8_round_trip_truncates():
    u = torch.arange(256, dtype=torch.uint8)
    expected = torch.where((u >= 1) & (u <= 63), u - 1, u)
    assert torch.equal(P.uint8_round_trip(u), expected)


I3D_INPUT_TOL = rb.I3D_INPUT_TOL  # see rounding_bounds


def test_i3d_input_matches_evaluator_preprocessing(monkeypatch):
    tensors = load_file(str(FIXTURES / "i3d_formula.safetensors"))
    pre_meta = json.loads((FIXTURES / "i3d_formula.json").read_text())["preprocessed"]
    pre = P.i3d_input(tensors["video_uint8"])
    assert pre.dtype == torch.float32 and tuple(pre.shape) == (2, 3, 16, 224, 224)
    torch.testing.assert_close(
        pre[0, :, 0, 0:8, 0:8], tensors["pre_clip0_c_t0_r0-8_c0-8"], rtol=0, atol=I3D_INPUT_TOL
    )
    torch.testing.assert_close(
        pre[1, :, 15, 108:116, 108:116],
        tensors["pre_clip1_c_t15_r108-116_c108-116"],
        rtol=0,
        atol=I3D_INPUT_TOL,
    )
    assert pre[0].double().mean().item() == pytest.approx(pre_meta["clip0_mean"], abs=I3D_INPUT_TOL)
    assert pre[0].double().std().item() == pytest.approx(pre_meta["clip0_std_unbiased"], abs=I3D_INPUT_TOL)
    # Another resize convention (corner-aligned sampling) is far outside the tolerance.
    interpolate = P.F.interpolate
    monkeypatch.setattr(P.F, "interpolate", lambda *a, **k: interpolate(*a, **{**k, "align_corners": True}))
    other = P.i3d_input(tensors["video_uint8"][:1])
    assert (other[0, :, 0, 0:8, 0:8] - tensors["pre_clip0_c_t0_r0-8_c0-8"]).abs().max() > 100 * I3D_INPUT_TOL
    wide = P.i3d_input(torch.zeros(1, 16, 3, 48, 64, dtype=torch.uint8))
    assert tuple(wide.shape) == (1, 3, 16, 224, 224) and wide.eq(-1).all()


# --------------------------------------------------------------------------------------
# audio
# --------------------------------------------------------------------------------------
def full_decode_ch0(path: Path) -> np.ndarray:
    cmd = [
        find_ffmpeg(),
        "-loglevel",
        "error",
        "-i",
        str(path),
        "-vn",
        "-f",
        "s16le",
        "-acodec",
        "pcm_s16le",
        "-ar",
        "44100",
        "-ac",
        "2",
        "-",
    ]
    pcm = subprocess.run(cmd, capture_output=True, check=True).stdout
    return np.frombuffer(pcm, "<i2").reshape(-1, 2)[:, 0] / 32768.0


def test_clip_audio_far_into_a_file_relaunches_ffmpeg(tmp_path):
    """A clip starting past ≈29.5 s makes moviepy restart ffmpeg with a seek (quirk 5c)."""
    long_file = synth(
        tmp_path / "long.mp4",
        "-f",
        "lavfi",
        "-i",
        "testsrc=s=32x24:r=10:d=33",
        "-f",
        "lavfi",
        "-i",
        "sine=f=440:r=22050:d=33",
        "-pix_fmt",
        "yuv420p",
        "-c:a",
        "libmp3lame",
    )
    clip = P.enumerate_clips([long_file])[310]
    assert clip.start_t == pytest.approx(31.0)
    opened: list[float] = []
    original = P._PcmPipe.__init__

    def spy(self, path, start=0.0):
        opened.append(start)
        original(self, path, start)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(P._PcmPipe, "__init__", spy)
        wave = P.clip_audio(clip)
    assert opened == [0.0, (round(44100 * 31.0) - 100_000) / 44100]
    # MP3 input seeking is sample exact here: the window equals the full decode's.
    first, n = round(44100 * clip.start_t), int(44100 * (clip.end_t - clip.start_t))
    assert n == 70559  # float32 clip times
    np.testing.assert_array_equal(wave[:n], full_decode_ch0(long_file)[first : first + n])
    assert wave[n] == 0


def test_clip_audio_when_the_stream_ends_before_the_clip(tmp_path):
    """1.5 s of audio in a 2 s file: moviepy's buffer is shorter than its nominal size.

    The second read chunk (from sample 35,280) re-fills the buffer "keeping" the last
    ``capacity − start + 1`` samples of a buffer that holds only ``len`` samples, so it is the
    decode shifted by ``capacity + 1 − len`` samples (checked against moviepy 1.0.3).
    """
    short = synth(
        tmp_path / "short.mp4",
        "-f",
        "lavfi",
        "-i",
        "testsrc=s=32x24:r=10:d=2",
        "-f",
        "lavfi",
        "-i",
        "sine=f=300:r=16000:d=1.5",
        "-pix_fmt",
        "yuv420p",
        "-c:a",
        "aac",
    )
    full = full_decode_ch0(short)
    capacity = int(44100 * P.moviepy_duration(short)) + 1
    assert 35280 < len(full) < 70560 < capacity
    wave = P.clip_audio(P.enumerate_clips([short])[0])
    np.testing.assert_array_equal(wave[:35280], full[:35280])
    shift = capacity + 1 - len(full)
    np.testing.assert_array_equal(wave[35280:], full[35280 - shift : 70560 - shift])


def test_scale_audio_is_float32_with_dc_offset():
    tensors = load_file(str(FIXTURES / "audioclip_formula.safetensors"))
    scaled = P.scale_audio(tensors["waveform"][:, :16].double())
    assert scaled.dtype == torch.float32
    assert torch.equal(scaled, tensors["scaled_first16"])
    levels = P.scale_audio(torch.arange(-32768, 32768, dtype=torch.float64) / 32768)
    assert len(torch.unique(levels)) == 641  # float32 rounding of x + 32768
    assert P.scale_audio(torch.zeros(1)).item() == pytest.approx(0.5 / 32767.5, rel=1e-3)


def test_clip_audio_needs_an_audio_stream(tmp_path):
    silent = synth(tmp_path / "v.mp4", "-f", "lavfi", "-i", "testsrc=s=32x24:r=10:d=2", "-pix_fmt", "yuv420p")
    clip = P.enumerate_clips([silent])[0]
    with pytest.raises(MediaError, match="no audio stream"):
        P.clip_audio(clip)


# --------------------------------------------------------------------------------------
# features and scores
# --------------------------------------------------------------------------------------
def test_compute_features_order_batches_and_inputs(tmp_path):
    clip_file = synth(
        tmp_path / "s.mp4",
        "-f",
        "lavfi",
        "-i",
        "testsrc=s=64x48:r=10:d=3",
        "-f",
        "lavfi",
        "-i",
        "sine=f=440:r=16000:d=3",
        "-pix_fmt",
        "yuv420p",
        "-c:a",
        "aac",
        "-shortest",
    )
    clips = P.enumerate_clips([clip_file])
    assert len(clips) == 15
    batches = P.loader_batches(len(clips), 20, seed=1)
    audio_calls: list[torch.Tensor] = []

    def video_features(x: torch.Tensor) -> torch.Tensor:
        assert x.dtype == torch.float32 and tuple(x.shape[1:]) == (3, 16, 224, 224)
        return x.flatten(1)[:, ::4099]

    def audio_features(x: torch.Tensor) -> torch.Tensor:
        audio_calls.append(x)
        return torch.stack([x.mean(1).double(), torch.full((len(x),), float(len(x)), dtype=torch.float64)], 1)

    video, audio = P.compute_features(clips, batches, 20, video_features, audio_features)
    order = [i for b in batches for i in b][:20]
    direct = P.i3d_input(torch.stack(P.read_clip_videos([clips[i] for i in order])))
    assert torch.equal(video, direct.flatten(1)[:, ::4099])
    assert [len(x) for x in audio_calls] == [8, 7, 8]
    assert audio[:, 1].tolist() == [8.0] * 8 + [7.0] * 7 + [8.0] * 5
    first = P.clip_audio(clips[order[0]])
    assert audio_calls[0].dtype == torch.float64 and tuple(audio_calls[0].shape) == (8, 70560)
    # Two float64 means of the same 70,560 samples, summed in different orders: within
    # n·unit·mean|x| of each other (a sine's mean is near 0, so no relative tolerance).
    mean_bound = len(first) * rb.UNIT64 * np.abs(first).mean()
    assert abs(audio[0, 0].item() - first.mean()) <= mean_bound
    scaled_calls: list[torch.Tensor] = []
    P.compute_features(
        clips,
        [[0, 1]],
        2,
        video_features,
        lambda x: scaled_calls.append(x) or x[:, :3],
        scale_audio_input=True,
    )
    assert torch.equal(scaled_calls[0][0], P.scale_audio(torch.from_numpy(P.clip_audio(clips[0]))))


def test_scores_from_saved_features(e2e):
    """Our scores and the evaluator's recorded ones, from the evaluator's own features: both are
    float32 roundings of the exact values (the same algorithms in float64), each within the
    bounds of rounding_bounds; the letterbox setting, a real protocol difference, is far outside."""
    tensors, meta = e2e
    exact, bounds = {}, {}
    for suffix in ("", "_noaa"):
        fake, real = tensors[f"fake.i3d_logits{suffix}"], tensors[f"real.i3d_logits{suffix}"]
        exact["fvd" + suffix] = frechet_distance(fake, real, dtype=torch.float64).item()
        bounds["fvd" + suffix] = rb.frechet_bound(fake, real)
        exact["kvd" + suffix] = rb.kvd_variant(fake, real)
        bounds["kvd" + suffix] = rb.kvd_bound(fake, real)
    fake, real = tensors["fake.audio_emb"], tensors["real.audio_emb"]
    exact["fad"] = P.FAD_SCALE * frechet_distance(fake, real, dtype=torch.float64).item()
    bounds["fad"] = P.FAD_SCALE * rb.frechet_bound(fake, real)

    got = P.mmdiffusion_scores(
        tensors["fake.i3d_logits"],
        tensors["real.i3d_logits"],
        tensors["fake.audio_emb"],
        tensors["real.audio_emb"],
    )
    want = meta["metric"]
    for key in ("fvd", "kvd", "fad"):
        assert abs(got[key] - exact[key]) <= bounds[key], key
        assert abs(want[key] - exact[key]) <= bounds[key], key
    fake, real = tensors["fake.i3d_logits_noaa"], tensors["real.i3d_logits_noaa"]
    noaa = {"fvd": frechet_distance(fake, real).item(), "kvd": polynomial_mmd(fake, real)}
    for key in ("fvd", "kvd"):
        assert abs(noaa[key] - exact[key + "_noaa"]) <= bounds[key + "_noaa"], key
        assert abs(meta["metric_noaa"][key] - exact[key + "_noaa"]) <= bounds[key + "_noaa"], key
        # Antialiased or not: the two protocols differ by 15 (FVD) and 70 (KVD) times the bounds.
        assert abs(exact[key] - exact[key + "_noaa"]) > 5 * (bounds[key] + bounds[key + "_noaa"]), key
    # KVD's own protocol changes (biased estimator, degree, gamma) are far outside too.
    fake, real = tensors["fake.i3d_logits"], tensors["real.i3d_logits"]
    for change in ({"biased": True}, {"degree": 2}, {"gamma": 1.1 / fake.shape[1]}):
        assert abs(rb.kvd_variant(fake, real, **change) - exact["kvd"]) > 5 * bounds["kvd"], change
