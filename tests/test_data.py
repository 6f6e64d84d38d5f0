from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from rflav_cli import audio as audio_lib
from rflav_cli import data
from rflav_cli.config import LATENT_SCALE, LOG_MEL_MAX, LOG_MEL_MIN, SAMPLES_PER_FRAME
from rflav_cli.media import read_audio, read_video_frames
from rflav_cli.models.autoencoder import AutoencoderKL
from tests.tiny import build_tiny_vae

pytestmark = pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="needs the ffmpeg executable")

S = 32  # small letterbox size for speed


def synth(path: Path, *args: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(["ffmpeg", "-y", "-v", "error", *args, str(path)], check=True)
    return path


def lavfi_video(spec: str) -> list[str]:
    return ["-f", "lavfi", "-i", spec]


def ffprobe_start_pts(path: Path) -> int:
    out = subprocess.run(
        [
            "ffprobe",
            "-v",
            "error",
            "-select_streams",
            "v:0",
            "-show_entries",
            "stream=start_pts",
            "-of",
            "json",
            str(path),
        ],
        capture_output=True,
        check=True,
    )
    return int(json.loads(out.stdout)["streams"][0]["start_pts"])


H264 = ["-c:v", "libx264", "-pix_fmt", "yuv420p"]
# Amplitude grows with time: a per-clip peak normalisation would give different columns.
RAMP_AUDIO = "aevalsrc=0.3*(t+0.2)*sin(2*PI*(300+500*t)*t):s=44100:d={d}"

EXPECTED_FRAMES = {"cats/a.mp4": 25, "cats/sub/b.mkv": 8, "dogs/c.mov": 5, "dogs/silent.mp4": 5}


@pytest.fixture(scope="module")
def media_dir(tmp_path_factory) -> Path:
    """Source videos, made once: copy the tree before changing it."""
    root = tmp_path_factory.mktemp("media")
    train = root / "DATA" / "train"
    synth(
        train / "cats" / "a.mp4",
        *lavfi_video("testsrc=s=64x48:r=25:d=2.5"),
        *lavfi_video(RAMP_AUDIO.format(d=2.5)),
        *H264,
        "-g",
        "50",
        "-bf",
        "2",
        "-c:a",
        "aac",
    )
    synth(
        train / "cats" / "sub" / "b.mkv",
        *lavfi_video("testsrc=s=64x48:r=30:d=0.8"),
        *lavfi_video("sine=f=600:d=0.8"),
        *H264,
        "-c:a",
        "aac",
    )
    synth(
        train / "dogs" / "c.mov",
        *lavfi_video("testsrc2=s=48x64:r=10:d=0.5"),
        *lavfi_video("sine=f=1000:d=0.5"),
        *H264,
        "-c:a",
        "aac",
    )
    synth(train / "dogs" / "silent.mp4", *lavfi_video("testsrc=s=64x48:r=10:d=0.5"), *H264)
    (train / "dogs" / "broken.mp4").write_bytes(
        np.random.default_rng(0).integers(0, 256, 4000, np.uint8).tobytes()
    )
    (train / "notes.txt").write_text("not a video")
    # MPEG-TS starts its timestamps at 1.4 s: seeking must not assume zero.
    synth(root / "seek" / "v.ts", *lavfi_video("testsrc=s=64x48:r=30:d=2.5"), "-c:v", "mpeg2video")
    return root


@pytest.fixture
def data_root(media_dir, tmp_path) -> Path:
    root = tmp_path / "DATA"
    shutil.copytree(media_dir / "DATA", root)
    return root


@pytest.fixture(scope="module")
def tiny_vae_weights(tmp_path_factory) -> Path:
    return build_tiny_vae(tmp_path_factory.mktemp("vae"))


@pytest.fixture
def tiny_vae(tiny_vae_weights) -> Iterator[AutoencoderKL]:
    # Convolutions this small are far slower split over threads on a busy machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield AutoencoderKL.from_pretrained(tiny_vae_weights)
    torch.set_num_threads(threads)


def whole_track_s(path: Path, frames: int) -> torch.Tensor:
    """Scale-free mel of a video, built from the primitives (independent of data.py)."""
    wav = np.zeros(frames * SAMPLES_PER_FRAME, np.float32)
    track = read_audio(path)[: wav.size]
    wav[: track.size] = track
    return audio_lib.normalize_log_mel(audio_lib.log_mel(torch.from_numpy(wav)), 1.0)


# --------------------------------------------------------------------------------------
# scanning
# --------------------------------------------------------------------------------------
def test_scan_labels_skips_and_clip_counts(data_root):
    index = data.scan_dataset(data_root, "train", progress=False)
    assert index.class_names == ["cats", "dogs"]
    assert [(v.path, v.label) for v in index.videos] == [
        ("cats/a.mp4", 0),
        ("cats/sub/b.mkv", 0),
        ("dogs/c.mov", 1),
    ]
    assert {v.path: v.frames for v in index.videos} == {
        k: n for k, n in EXPECTED_FRAMES.items() if "silent" not in k
    }
    assert all(v.has_audio for v in index.videos)
    assert index.skipped == {"unreadable": ["dogs/broken.mp4"], "no audio": ["dogs/silent.mp4"]}
    a = index.videos[0]
    st = (data_root / "train" / "cats" / "a.mp4").stat()
    assert (a.size, a.mtime_ns) == (st.st_size, st.st_mtime_ns)

    clips = index.clips(4)
    assert len(clips) == 22 + 5 + 2
    assert clips[0] == (0, 0) and clips[21] == (0, 21) and clips[22] == (1, 0) and clips[-1] == (2, 1)
    assert len(index.clips(4, stride=2)) == 11 + 3 + 1
    line = index.summary(4)
    for part in (
        "3 videos",
        "29 clips of 4 frames",
        "2 classes",
        "skipped 2",
        "no audio: 1",
        "unreadable: 1",
    ):
        assert part in line
    assert "\n" not in line

    kept = data.scan_dataset(data_root, "train", missing_audio="silence", progress=False)
    assert [v.path for v in kept.videos] == ["cats/a.mp4", "cats/sub/b.mkv", "dogs/c.mov", "dogs/silent.mp4"]
    silent = kept.videos[-1]
    assert (silent.label, silent.frames, silent.has_audio) == (1, 5, False)
    assert kept.skipped == {"unreadable": ["dogs/broken.mp4"]}


def test_scan_unlabelled_and_errors(data_root, tmp_path):
    test = data_root / "test"
    test.mkdir()
    with pytest.raises(data.DataError, match=str(test)):
        data.scan_dataset(data_root, "test", progress=False)
    with pytest.raises(data.DataError, match="not a folder"):
        data.scan_dataset(data_root, "valid", progress=False)
    shutil.copy(data_root / "train" / "dogs" / "c.mov", test / "x.mov")
    shutil.copy(data_root / "train" / "dogs" / "silent.mp4", test / "y.mp4")
    index = data.scan_dataset(data_root, "test", missing_audio="silence", progress=False)
    assert index.class_names == []
    assert [(v.path, v.label, v.has_audio) for v in index.videos] == [
        ("x.mov", -1, True),
        ("y.mp4", -1, False),
    ]
    with pytest.raises(ValueError, match="missing_audio"):
        data.scan_dataset(data_root, "test", missing_audio="zeros", progress=False)


def test_index_cache_reused_and_only_changed_files_probed(data_root, media_dir, monkeypatch):
    first = data.scan_dataset(data_root, "train", progress=False)
    assert (data_root / "train" / data.INDEX_FILE).is_file()
    real = data.probe_video
    probed: list[str] = []

    def spy(path):
        probed.append(Path(path).name)
        return real(path)

    monkeypatch.setattr(data, "probe_video", spy)
    again = data.scan_dataset(data_root, "train", progress=False)
    assert probed == []
    assert again.videos == first.videos and again.skipped == first.skipped

    # Replace c.mov by a longer video: only it is probed again.
    c = data_root / "train" / "dogs" / "c.mov"
    synth(c, *lavfi_video("testsrc2=s=48x64:r=10:d=0.9"), *lavfi_video("sine=d=0.9"), *H264, "-c:a", "aac")
    changed = data.scan_dataset(data_root, "train", progress=False)
    assert probed == ["c.mov"]
    assert changed.videos[2].frames == 9 and changed.videos[:2] == first.videos[:2]

    # Same size, newer mtime: probed again too.
    a = data_root / "train" / "cats" / "a.mp4"
    st = a.stat()
    os.utime(a, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    probed.clear()
    data.scan_dataset(data_root, "train", progress=False)
    assert probed == ["a.mp4"]

    (data_root / "train" / "cats" / "sub" / "b.mkv").unlink()
    probed.clear()
    removed = data.scan_dataset(data_root, "train", progress=False)
    assert probed == [] and [v.path for v in removed.videos] == ["cats/a.mp4", "dogs/c.mov"]
    entries = json.loads((data_root / "train" / data.INDEX_FILE).read_text())["entries"]
    assert "cats/sub/b.mkv" not in entries and entries["dogs/broken.mp4"]["skip"] == "unreadable"


def test_index_cache_falls_back_when_split_folder_is_read_only(data_root, tmp_path, monkeypatch):
    monkeypatch.setenv("RFLAV_CACHE", str(tmp_path / "cache"))
    split = data_root / "train"
    real_write = data._write_json_atomic

    def read_only_split(path, obj):
        if path.parent == split:
            raise PermissionError(13, "Permission denied", str(path))
        real_write(path, obj)

    monkeypatch.setattr(data, "_write_json_atomic", read_only_split)
    first = data.scan_dataset(data_root, "train", progress=False)
    assert not (split / data.INDEX_FILE).exists()
    saved = list((tmp_path / "cache" / "index").glob("*.json"))
    assert len(saved) == 1 and json.loads(saved[0].read_text())["folder"] == str(split.resolve())
    monkeypatch.setattr(data, "probe_video", lambda path: pytest.fail(f"probed {path} again"))
    assert data.scan_dataset(data_root, "train", progress=False).videos == first.videos


# --------------------------------------------------------------------------------------
# decoding
# --------------------------------------------------------------------------------------
def test_read_clip_seek_equals_full_decode(data_root, media_dir):
    index = data.scan_dataset(data_root, "train", progress=False)
    a = index.videos[0]
    ts = media_dir / "seek" / "v.ts"
    probe = data.probe_video(ts)
    assert probe["frames"] == 25
    assert a.start_pts == ffprobe_start_pts(index.video_path(0)) == 0
    assert probe["start_pts"] == ffprobe_start_pts(ts) != 0
    for path, start_pts in ((index.video_path(0), a.start_pts), (ts, probe["start_pts"])):
        full = np.stack(list(read_video_frames(path, size=S)))
        assert len(full) == 25
        # Starts ≥ 11 are read through an input seek; 22 ends at the last frame.
        for start, count in ((0, 3), (4, 2), (12, 3), (17, 4), (22, 3)):
            clip = data.read_clip(path, start, count, image_size=S, start_pts=start_pts)
            assert clip.shape == (count, S, S, 3) and clip.dtype == np.uint8
            np.testing.assert_array_equal(
                clip, full[start : start + count], err_msg=f"{path.name} start {start}"
            )
    with pytest.raises(Exception, match="cannot read frames"):
        data.read_clip(ts, 23, 3, image_size=S, start_pts=probe["start_pts"])


@pytest.mark.parametrize(
    "w,h,axis,before,content", [(64, 42, 0, 5, 21), (42, 64, 1, 5, 21), (64, 48, 0, 4, 24)]
)
def test_letterbox_geometry(tmp_path, w, h, axis, before, content):
    # int(side * min(S/h, S/w)): 42 * 0.5 = 21 rows of picture; the odd pad row goes last.
    clip = synth(tmp_path / f"white{w}x{h}.mp4", *lavfi_video(f"color=c=white:s={w}x{h}:r=10:d=0.3"), *H264)
    frame = data.read_clip(clip, 1, 1, image_size=S)[0].astype(int)
    profile = frame.mean(axis=(1, 2) if axis == 0 else (0, 2))
    assert np.all(profile[:before] == 0)
    assert np.all(profile[before : before + content] > 200)
    assert np.all(profile[before + content :] == 0)
    assert S - before - content >= before  # odd pixel at the bottom/right


def test_video_clip_dataset_items(data_root):
    index = data.scan_dataset(data_root, "train", missing_audio="silence", progress=False)
    ds = data.VideoClipDataset(index, 3, image_size=S, audio_scale=2.5)
    assert ds.class_names == ["cats", "dogs"] and len(ds) == 23 + 6 + 3 + 3
    i = ds.clips.index((0, 14))
    item = ds[i]
    assert item["video"].shape == (3, 3, S, S) and item["video"].dtype == torch.float32
    assert item["audio"].shape == (3, 1, 256, 10) and item["audio"].dtype == torch.float32
    assert item["label"].dtype == torch.int64 and item["label"].item() == 0

    full = np.stack(list(read_video_frames(index.video_path(0), size=S)))[14:17]
    expected = torch.from_numpy(full).permute(0, 3, 1, 2).float() / 127.5 - 1
    torch.testing.assert_close(item["video"], expected, rtol=0, atol=1e-6)

    s = whole_track_s(index.video_path(0), 25)
    for k in range(3):  # frame k of the clip owns columns 10·(14+k) … 10·(14+k)+9 of the track
        torch.testing.assert_close(
            item["audio"][k, 0], 2.5 * s[:, 10 * (14 + k) : 10 * (15 + k)], rtol=1e-5, atol=1e-5
        )
    # A mel of the clip's own audio (peak-normalised per clip) would be different.
    wav = read_audio(index.video_path(0))[14 * 1600 : 17 * 1600]
    per_clip = audio_lib.normalize_log_mel(audio_lib.log_mel(torch.from_numpy(wav.copy())), 2.5)
    assert (audio_lib.mel_to_frames(per_clip) - item["audio"]).abs().max() > 0.05

    silent = ds[ds.clips.index((3, 1))]
    # Silence: |STFT| = sqrt(1e-9) in every bin, so the mel is that times each filter's sum.
    floor = torch.log(
        torch.clamp(audio_lib.mel_filterbank().double().sum(1) * math.sqrt(1e-9), min=LOG_MEL_MIN)
    )
    s_floor = 2 * (floor - math.log(LOG_MEL_MIN)) / (math.log(LOG_MEL_MAX) - math.log(LOG_MEL_MIN)) - 1
    torch.testing.assert_close(
        silent["audio"],
        (2.5 * s_floor.float())[None, None, :, None].expand(3, 1, 256, 10),
        rtol=1e-5,
        atol=1e-5,
    )
    assert silent["label"].item() == 1

    with pytest.raises(data.DataError, match="at least 30 frames"):
        data.VideoClipDataset(index, 30, image_size=S)


def test_data_whose_every_video_is_skipped_says_why(data_root, tiny_vae, tmp_path):
    """Not "too short": how many were skipped, for which reasons, and the option that keeps
    videos without sound; `prepare` refuses too, instead of writing an empty cache."""
    for p in (data_root / "train").rglob("*"):
        if p.is_file() and p.name not in ("silent.mp4", "broken.mp4"):
            p.unlink()
    index = data.scan_dataset(data_root, "train", progress=False)
    expected = (
        f"no usable video in {data_root / 'train'}: all 2 were skipped (no audio: 1, unreadable: 1); "
        "--missing-audio silence keeps videos without sound"
    )
    with pytest.raises(data.DataError) as err:
        data.VideoClipDataset(index, 3, image_size=S)
    assert str(err.value) == expected
    with pytest.raises(data.DataError) as err:
        data.prepare_cache(index, tmp_path / "cache", tiny_vae, image_size=S, progress=False)
    assert str(err.value) == expected and not (tmp_path / "cache").exists()


def test_default_image_size_and_unlabelled(data_root, tmp_path):
    test = data_root / "test"
    test.mkdir()
    shutil.copy(data_root / "train" / "dogs" / "c.mov", test / "c.mov")
    ds = data.open_training_data(data_root, "test", 2, progress=False)
    assert isinstance(ds, data.VideoClipDataset) and len(ds) == 4 and ds.class_names == []
    item = ds[3]
    assert item["video"].shape == (2, 3, 256, 256) and item["audio"].shape == (2, 1, 256, 10)
    assert -1 <= item["video"].min() < item["video"].max() <= 1
    assert item["label"].item() == -1


def test_chunked_track_mel_equals_whole(tmp_path):
    wav = torch.randn(37 * SAMPLES_PER_FRAME, generator=torch.Generator().manual_seed(0)) * torch.linspace(
        0, 1, 37 * 1600
    )
    whole = audio_lib.log_mel(wav)
    chunked = data._track_log_mel(wav, chunk_columns=70)
    assert chunked.shape == (256, 370)
    torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------
# latent cache
# --------------------------------------------------------------------------------------
def encode_counter(monkeypatch, vae, fail_on_call: int | None = None) -> list[int]:
    """Record the batch sizes given to vae.encode; optionally fail on the n-th call."""
    calls: list[int] = []
    real = vae.encode

    def spy(x):
        calls.append(x.shape[0])
        if fail_on_call is not None and len(calls) == fail_on_call:
            raise RuntimeError("interrupted")
        return real(x)

    monkeypatch.setattr(vae, "encode", spy)
    return calls


def test_prepare_cache_latents_mel_and_index(data_root, tiny_vae, tmp_path):
    index = data.scan_dataset(data_root, "train", missing_audio="silence", progress=False)
    out = data.prepare_cache(
        index,
        tmp_path / "cache",
        tiny_vae,
        batch_size=4,
        image_size=S,
        progress=False,
        autoencoder_id="tiny/vae",
    )
    header = json.loads((out / "index.json").read_text())
    assert header["complete"] and header["image_size"] == S and header["autoencoder"] == "tiny/vae"
    assert header["class_names"] == ["cats", "dogs"] and header["latent_shape"] == [4, 4, 4]
    assert [(v["path"], v["frames"], v["label"], v["shard"]) for v in header["videos"]] == [
        (v.path, v.frames, v.label, f"videos/{i:05d}.safetensors") for i, v in enumerate(index.videos)
    ]

    for i, v in enumerate(index.videos):
        frames = np.stack(list(read_video_frames(index.video_path(i), size=S)))
        with torch.no_grad():
            posterior = tiny_vae.encode(torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 127.5 - 1)
        with safe_open(str(out / header["videos"][i]["shard"]), "pt") as f:
            assert f.get_tensor("mean").dtype == torch.float32
            torch.testing.assert_close(f.get_tensor("mean"), posterior.mean, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(f.get_tensor("std"), posterior.std, rtol=1e-5, atol=1e-5)
            mel = f.get_tensor("mel")
        assert mel.shape == (256, 10 * v.frames)
        if v.has_audio:
            torch.testing.assert_close(
                mel, whole_track_s(index.video_path(i), v.frames), rtol=1e-5, atol=1e-5
            )
        assert mel.min() >= -1 and mel.max() <= 1

    # The cache and the raw videos give the same audio_scale.
    assert data.estimate_audio_scale(out) == pytest.approx(data.estimate_audio_scale(index), rel=1e-6)


def test_prepare_cache_records_a_local_autoencoder_by_its_absolute_path(
    data_root, tiny_vae, tmp_path, monkeypatch
):
    """A cache is read later from anywhere: `--autoencoder vae` typed in one folder must name the
    same folder from every other."""
    (tmp_path / "vae").mkdir()
    monkeypatch.chdir(tmp_path)
    index = data.scan_dataset(data_root, "train", missing_audio="silence", progress=False)
    out = data.prepare_cache(
        index, tmp_path / "cache", tiny_vae, batch_size=4, image_size=S, progress=False, autoencoder_id="vae"
    )
    header = json.loads((out / "index.json").read_text())
    assert header["autoencoder"] == str((tmp_path / "vae").resolve())


def test_prepare_cache_resumes(data_root, tiny_vae, tmp_path, monkeypatch):
    index = data.scan_dataset(data_root, "train", progress=False)  # 25, 8, 5 frames
    out = tmp_path / "cache"
    calls = encode_counter(monkeypatch, tiny_vae, fail_on_call=2)
    with pytest.raises(RuntimeError, match="interrupted"):
        data.prepare_cache(index, out, tiny_vae, batch_size=32, image_size=S, progress=False)
    header = json.loads((out / "index.json").read_text())
    assert not header["complete"] and [v["shard"] for v in header["videos"]] == [
        "videos/00000.safetensors",
        None,
        None,
    ]
    assert sorted(p.name for p in (out / "videos").iterdir()) == ["00000.safetensors"]
    with pytest.raises(data.DataError, match="incomplete"):
        data.LatentClipDataset(out, 2)

    calls = encode_counter(monkeypatch, tiny_vae)
    data.prepare_cache(index, out, tiny_vae, batch_size=32, image_size=S, progress=False)
    assert calls == [8, 5]  # only the unfinished videos
    (out / "videos" / "00001.safetensors").unlink()
    calls.clear()
    data.prepare_cache(index, out, tiny_vae, batch_size=32, image_size=S, progress=False)
    assert calls == [8]
    calls.clear()
    data.prepare_cache(index, out, tiny_vae, batch_size=32, image_size=S, progress=False)
    assert calls == []
    assert json.loads((out / "index.json").read_text())["complete"]
    # Another image size invalidates every shard.
    data.prepare_cache(index, out, tiny_vae, batch_size=32, image_size=16, progress=False)
    assert calls == [25, 8, 5]


def test_latent_clip_dataset(data_root, tiny_vae, tmp_path):
    index = data.scan_dataset(data_root, "train", progress=False)
    out = data.prepare_cache(index, tmp_path / "cache", tiny_vae, batch_size=8, image_size=S, progress=False)
    ds = data.LatentClipDataset(out, 4, audio_scale=3.0, sample=False)
    assert len(ds) == len(index.clips(4)) and ds.class_names == ["cats", "dogs"] and ds.image_size == S
    i = ds.clips.index((2, 1))
    item = ds[i]
    assert item["video"].shape == (4, 4, 4, 4) and item["video"].dtype == torch.float32
    assert item["audio"].shape == (4, 1, 256, 10) and item["label"].dtype == torch.int64
    assert item["label"].item() == 1
    with safe_open(str(out / "videos" / "00002.safetensors"), "pt") as f:
        mean, std, mel = f.get_tensor("mean"), f.get_tensor("std"), f.get_tensor("mel")
    torch.testing.assert_close(item["video"], mean[1:5] * LATENT_SCALE, rtol=0, atol=0)
    torch.testing.assert_close(item["audio"][:, 0], 3.0 * mel[:, 10:50].reshape(256, 4, 10).permute(1, 0, 2))

    sampled = data.LatentClipDataset(out, 4, sample=True, generator=torch.Generator().manual_seed(7))[i]
    eps = torch.randn(mean[1:5].shape, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(sampled["video"], (mean[1:5] + std[1:5] * eps) * LATENT_SCALE)
    assert not torch.equal(sampled["video"], item["video"])

    same = data.open_training_data(out, "train", 4, audio_scale=3.0, sample=False)
    assert isinstance(same, data.LatentClipDataset)
    torch.testing.assert_close(same[i]["audio"], item["audio"])
    with pytest.raises(data.DataError, match="not a latent cache"):
        data.LatentClipDataset(tmp_path, 4)


def write_synthetic_cache(folder: Path, mels: list[torch.Tensor]) -> Path:
    (folder / "videos").mkdir(parents=True)
    videos = []
    for i, mel in enumerate(mels):
        frames = mel.shape[1] // 10
        save_file(
            {"mean": torch.zeros(frames, 4, 2, 2), "std": torch.ones(frames, 4, 2, 2), "mel": mel},
            str(folder / "videos" / f"{i:05d}.safetensors"),
        )
        videos.append(
            {
                "path": f"{i}.mp4",
                "label": -1,
                "frames": frames,
                "has_audio": True,
                "size": 1,
                "mtime_ns": 1,
                "shard": f"videos/{i:05d}.safetensors",
            }
        )
    header = {
        "format": "rflav-latent-cache",
        "version": 1,
        "split": "train",
        "source": "x",
        "image_size": 16,
        "latent_scale": LATENT_SCALE,
        "latent_shape": [4, 2, 2],
        "autoencoder": None,
        "class_names": [],
        "complete": True,
        "videos": videos,
    }
    (folder / "index.json").write_text(json.dumps(header))
    return folder


def test_estimate_audio_scale_closed_form(tmp_path):
    # Constant mels 0.3 (10 columns), 0.7 (20), -0.1 (30): weights 1:2:3.
    cache = write_synthetic_cache(
        tmp_path / "c", [torch.full((256, 10), 0.3), torch.full((256, 20), 0.7), torch.full((256, 30), -0.1)]
    )
    mean = (0.3 * 1 + 0.7 * 2 - 0.1 * 3) / 6
    var = (0.09 * 1 + 0.49 * 2 + 0.01 * 3) / 6 - mean**2
    assert data.estimate_audio_scale(cache) == pytest.approx(1 / math.sqrt(var), rel=1e-6)
    # Two videos of three: the first and the last (mean 0, variance 0.03).
    assert data.estimate_audio_scale(data.LatentClipDataset(cache, 1), max_videos=2) == pytest.approx(
        1 / math.sqrt(0.03), rel=1e-6
    )
    flat = write_synthetic_cache(tmp_path / "flat", [torch.full((256, 10), -0.5)] * 2)
    with pytest.raises(data.DataError, match="no variation"):
        data.estimate_audio_scale(flat)


def test_in_memory_frames_equal_seeked_clips(data_root):
    """Small datasets keep whole decoded videos and mels; clips must equal per-clip seek decoding."""
    index = data.scan_dataset(data_root, "train", progress=False)
    kept = data.VideoClipDataset(index, 4, image_size=16)
    seeked = data.VideoClipDataset(index, 4, image_size=16, keep_frames_mb=0)
    assert kept._keep and not seeked._keep
    for i in (0, 7, len(kept) - 1):
        assert torch.equal(kept[i]["video"], seeked[i]["video"])
        assert torch.equal(kept[i]["audio"], seeked[i]["audio"])
