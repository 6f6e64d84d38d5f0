"""Tests of rflav_cli.media against ffmpeg/ffprobe on synthetic clips made in tmp_path."""

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

from rflav_cli import media
from rflav_cli.media import (
    MediaError,
    VideoWriter,
    count_frames,
    find_ffmpeg,
    probe,
    read_audio,
    read_video_frames,
    write_wav,
)

FFMPEG = shutil.which("ffmpeg")
FFPROBE = shutil.which("ffprobe")
pytestmark = pytest.mark.skipif(not (FFMPEG and FFPROBE), reason="needs ffmpeg and ffprobe on PATH")

SR, FPS, SPF = 16000, 10, 1600
AAC_FRAME_S = 1024 / SR


@pytest.fixture(autouse=True)
def _fresh_ffmpeg_lookup_and_deadline():
    """Re-resolve ffmpeg in every test; fail (rather than hang) if a pipe ever deadlocks.

    Product code honours $RFLAV_FFMPEG, so the suite can be run against another ffmpeg.
    """
    media.find_ffmpeg.cache_clear()

    def _timeout(signum, frame):
        raise TimeoutError("media test took more than 60 s (deadlock?)")

    old = signal.signal(signal.SIGALRM, _timeout)
    signal.alarm(60)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)
    media.find_ffmpeg.cache_clear()


# ---------------------------------------------------------------------------- helpers
def synth(path: Path, *args: str) -> Path:
    """Make a clip with the system ffmpeg (lavfi sources)."""
    subprocess.run([FFMPEG, "-v", "error", "-y", *args, str(path)], check=True, stdin=subprocess.DEVNULL)
    return path


def ffprobe_streams(path: Path) -> dict[str, dict]:
    res = subprocess.run(
        [FFPROBE, "-v", "error", "-count_packets", "-show_streams", "-of", "json", str(path)],
        capture_output=True,
        check=True,
    )
    streams = json.loads(res.stdout)["streams"]
    return {s["codec_type"]: s for s in streams}


def stream_end(s: dict) -> float:
    return float(s.get("start_time", 0)) + float(s["duration"])


def colour(i: int) -> tuple[int, int, int]:
    return (10 * i) % 256, 250 - 9 * i, (37 * i) % 256


def pattern_frames(start: int, n: int) -> np.ndarray:
    return np.stack(
        [np.broadcast_to(np.array(colour(i), np.uint8), (256, 256, 3)) for i in range(start, start + n)]
    )


def burst_audio(start: int, n: int) -> np.ndarray:
    """Silence except a 440 Hz tone during frames 10..14 (samples 16000..24000)."""
    t = np.arange(start * SPF, (start + n) * SPF)
    tone = 0.5 * np.sin(2 * np.pi * 440 * t / SR)
    return np.where((t >= 10 * SPF) & (t < 15 * SPF), tone, 0.0).astype(np.float32)


def partial_files(folder: Path) -> list[Path]:
    return sorted(folder.glob(".*partial*"))


def assert_av_agree(path: Path, n_frames: int) -> None:
    s = ffprobe_streams(path)
    assert int(s["video"]["nb_read_packets"]) == n_frames
    assert abs(stream_end(s["video"]) - n_frames / FPS) < 1e-3
    assert abs(stream_end(s["audio"]) - stream_end(s["video"])) <= AAC_FRAME_S + 1e-3


# ---------------------------------------------------------------------------- writing
def test_writer_roundtrip_format_pattern_and_sync(tmp_path):
    out = tmp_path / "clip.mp4"
    with VideoWriter(out) as w:
        w.write(pattern_frames(0, 10), burst_audio(0, 10))
        w.write(pattern_frames(10, 1)[0], burst_audio(10, 1))  # a single (H, W, 3) frame
        frames, audio = pattern_frames(11, 14), burst_audio(11, 14)
        try:
            import torch

            frames, audio = torch.from_numpy(frames.copy()), torch.from_numpy(audio)
        except ImportError:
            pass
        w.write(frames, audio)
    assert out.exists() and not partial_files(tmp_path)

    s = ffprobe_streams(out)
    v, a = s["video"], s["audio"]
    assert (v["codec_name"], v["pix_fmt"], v["width"], v["height"]) == ("h264", "yuv420p", 256, 256)
    assert v["r_frame_rate"] == "10/1" and v["avg_frame_rate"] == "10/1"
    assert int(v["nb_read_packets"]) == 25
    assert (a["codec_name"], a["sample_rate"], a["channels"]) == ("aac", "16000", 1)
    assert abs(stream_end(v) - 2.5) < 1e-3
    assert abs(stream_end(a) - stream_end(v)) <= AAC_FRAME_S + 1e-3
    info = probe(out)
    assert (info.has_video, info.has_audio, info.fps, info.audio_channels) == (True, True, 10.0, 1)

    decoded = list(read_video_frames(out))
    assert len(decoded) == 25 == count_frames(out)
    means = np.array([f.reshape(-1, 3).mean(0) for f in decoded])
    np.testing.assert_allclose(means, np.array([colour(i) for i in range(25)]), atol=6)

    # The tone must come back at 1.0 s..1.5 s: A/V in sync, encoder delay removed.
    back = read_audio(out)
    assert abs(len(back) - 25 * SPF) <= 1024
    loud = np.flatnonzero(np.abs(back) > 0.1)
    assert abs(loud[0] - 10 * SPF) <= 160 and abs(loud[-1] - 15 * SPF) <= 160
    seg = back[10 * SPF + 800 : 15 * SPF - 800]
    spectrum = np.abs(np.fft.rfft(seg * np.hanning(len(seg))))
    assert abs(np.argmax(spectrum) * SR / len(seg) - 440) < 5
    assert abs(np.sqrt(np.mean(seg**2)) - 0.5 / np.sqrt(2)) < 0.03


def test_writer_video_only(tmp_path):
    out = tmp_path / "silent.mp4"
    with VideoWriter(out, audio=False) as w:
        w.write(pattern_frames(0, 12))
    s = ffprobe_streams(out)
    assert set(s) == {"video"} and int(s["video"]["nb_read_packets"]) == 12


def test_writer_never_overwrites(tmp_path):
    out = tmp_path / "taken.mp4"
    out.write_bytes(b"precious")
    with pytest.raises(MediaError, match=r"taken\.mp4.*--overwrite"):
        VideoWriter(out)
    assert out.read_bytes() == b"precious" and not partial_files(tmp_path)

    with VideoWriter(out, overwrite=True) as w:
        w.write(pattern_frames(0, 3), burst_audio(0, 3))
    assert int(ffprobe_streams(out)["video"]["nb_read_packets"]) == 3

    # A file that appears at the destination while writing is not clobbered either.
    late = tmp_path / "late.mp4"
    w = VideoWriter(late)
    w.write(pattern_frames(0, 3), burst_audio(0, 3))
    late.write_bytes(b"someone else's")
    with pytest.raises(MediaError, match="late.mp4"):
        w.close()
    assert late.read_bytes() == b"someone else's"
    assert w.partial_path.exists()  # the finished output is kept under its temporary name


def test_writer_abort_and_errors_remove_partial(tmp_path):
    w = VideoWriter(tmp_path / "a.mp4")
    w.write(pattern_frames(0, 4), burst_audio(0, 4))
    assert w.partial_path.exists()
    w.abort()
    assert list(tmp_path.iterdir()) == []

    with pytest.raises(RuntimeError):
        with VideoWriter(tmp_path / "b.mp4") as w:
            w.write(pattern_frames(0, 2), burst_audio(0, 2))
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_writer_validates_inputs(tmp_path):
    with VideoWriter(tmp_path / "v.mp4") as w:
        with pytest.raises(ValueError, match="3200"):
            w.write(pattern_frames(0, 2), np.zeros(3000, np.float32))
        with pytest.raises(ValueError, match="audio"):
            w.write(pattern_frames(0, 2))
        with pytest.raises(ValueError, match="uint8"):
            w.write(pattern_frames(0, 2).astype(np.float32), np.zeros(3200, np.float32))
        with pytest.raises(ValueError, match="256, 256, 3"):
            w.write(np.zeros((2, 128, 128, 3), np.uint8), np.zeros(3200, np.float32))
        w.write(pattern_frames(0, 2), np.zeros(3200, np.float32))
    assert int(ffprobe_streams(tmp_path / "v.mp4")["video"]["nb_read_packets"]) == 2


def test_writer_unwritable_destination(tmp_path):
    with pytest.raises(MediaError, match="does not exist"):
        VideoWriter(tmp_path / "missing" / "x.mp4")
    (tmp_path / "file").write_text("")
    with pytest.raises(MediaError, match="file"):
        VideoWriter(tmp_path / "file" / "x.mp4")
    with pytest.raises(MediaError, match="folder"):
        VideoWriter(tmp_path)
    if os.geteuid() != 0:  # root ignores permission bits
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        with pytest.raises(MediaError, match="cannot write to folder"):
            VideoWriter(ro / "x.mp4")


def test_ctrl_c_in_loop_then_close_gives_playable_file(tmp_path):
    out = tmp_path / "stopped.mp4"
    with pytest.raises(KeyboardInterrupt):
        with VideoWriter(out) as w:
            for i in range(1000):
                if i == 17:
                    raise KeyboardInterrupt
                w.write(pattern_frames(i, 1), burst_audio(i, 1))
    assert not partial_files(tmp_path)
    assert_av_agree(out, 17)


def test_interrupt_between_video_and_audio_is_padded(tmp_path):
    out = tmp_path / "torn.mp4"
    w = VideoWriter(out)
    w.write(pattern_frames(0, 5), burst_audio(0, 5))

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    w._audio.queue.put = interrupted  # Ctrl-C lands after frame 5's video was queued
    with pytest.raises(KeyboardInterrupt):
        w.write(pattern_frames(5, 3), burst_audio(5, 3))
    del w._audio.queue.put
    w.close()
    assert_av_agree(out, 6)
    assert abs(len(read_audio(out)) - 6 * SPF) <= 1024


def test_partial_file_plays_after_ffmpeg_is_killed(tmp_path):
    w = VideoWriter(tmp_path / "k.mp4")
    try:
        w.write(pattern_frames(0, 25), burst_audio(0, 25))
        w.write(pattern_frames(0, 25), burst_audio(0, 25))
        w.write(pattern_frames(0, 20), burst_audio(0, 20))
        deadline = time.monotonic() + 20
        while w.partial_path.read_bytes().count(b"moof") < 2:  # two fragments on disk
            assert time.monotonic() < deadline, "no fragment was flushed"
            time.sleep(0.05)
        w._proc.send_signal(signal.SIGKILL)
        w._proc.wait()
        res = subprocess.run(
            [
                FFPROBE,
                "-v",
                "quiet",
                "-select_streams",
                "v:0",
                "-count_frames",
                "-show_entries",
                "stream=nb_read_frames",
                "-of",
                "csv=p=0",
                str(w.partial_path),
            ],
            capture_output=True,
            text=True,
        )
        assert int(res.stdout.strip().split(",")[0]) >= 10
        with pytest.raises(MediaError, match="ffmpeg"):
            w.write(pattern_frames(0, 1), burst_audio(0, 1))
    finally:
        w.abort()
    assert list(tmp_path.iterdir()) == []


def test_write_wav(tmp_path):
    import wave

    x = (0.5 * np.sin(2 * np.pi * 440 * np.arange(1600) / SR)).astype(np.float32)
    x[0], x[1] = 1.5, -1.5  # clipped
    out = write_wav(tmp_path / "a.wav", x, SR)
    with wave.open(str(out)) as f:
        assert (f.getnchannels(), f.getsampwidth(), f.getframerate(), f.getnframes()) == (1, 2, SR, 1600)
        pcm = np.frombuffer(f.readframes(1600), "<i2")
    expect = np.round(np.clip(x, -1, 1) * 32767).astype(np.int16)
    np.testing.assert_array_equal(pcm, expect)
    with pytest.raises(MediaError, match="--overwrite"):
        write_wav(out, x, SR)
    write_wav(out, x[:100], SR, overwrite=True)
    with wave.open(str(out)) as f:
        assert f.getnframes() == 100
    assert not partial_files(tmp_path)


# ---------------------------------------------------------------------------- reading
def test_read_video_letterbox_wide_and_fps(tmp_path):
    # 320x180 at 25 fps, 2 s; brightness rises with the source frame number.
    clip = synth(
        tmp_path / "wide.mp4",
        "-f",
        "lavfi",
        "-i",
        "color=c=black:s=320x180:r=25:d=2,format=yuv420p,geq=lum='60+3*N':cb=128:cr=128",
        "-c:v",
        "libx264",
        "-pix_fmt",
        "yuv420p",
    )
    frames = list(read_video_frames(clip))
    assert len(frames) == 20 == count_frames(clip)
    assert all(f.shape == (256, 256, 3) and f.dtype == np.uint8 for f in frames)
    for f in frames:
        rows = np.flatnonzero(f.mean(axis=(1, 2)) > 25)
        assert (rows[0], len(rows)) == (56, 144)  # 56 black rows, 144 content, 56 black
        assert f[:56].max() <= 3 and f[200:].max() <= 3
    brightness = [f[56:200].mean() for f in frames]
    assert np.all(np.diff(brightness) > 0)  # later source frames, in order
    # output frame k shows source frame ~2.5k: luma 60 + 7.5k, i.e. RGB (luma-16)*255/219
    np.testing.assert_allclose(brightness, [(60 + 7.5 * k - 16) * 255 / 219 for k in range(20)], atol=6)


@pytest.mark.parametrize("w,h", [(320, 179), (179, 320), (322, 100)])
def test_read_video_letterbox_odd_padding_goes_bottom_right(tmp_path, w, h):
    # lavfi's colour source rounds sizes to even numbers: crop to the odd size afterwards.
    clip = synth(
        tmp_path / "odd.mkv",
        "-f",
        "lavfi",
        "-i",
        f"color=c=white:s={w + 1}x{h + 1}:r=10:d=0.3,format=rgb24,crop={w}:{h}:0:0",
        "-c:v",
        "ffv1",
        "-pix_fmt",
        "bgr0",
    )
    assert (probe(clip).width, probe(clip).height) == (w, h)
    # The original R-FLAV rule: ratio = min(256/h, 256/w), new side = int(side * ratio).
    ratio = min(256 / h, 256 / w)
    new_w, new_h = int(w * ratio), int(h * ratio)
    top, left = (256 - new_h) // 2, (256 - new_w) // 2
    frames = list(read_video_frames(clip))
    assert len(frames) == 3
    content = frames[0].mean(axis=2) > 128
    rows, cols = np.flatnonzero(content.any(1)), np.flatnonzero(content.any(0))
    assert (rows[0], rows[-1] + 1, cols[0], cols[-1] + 1) == (top, top + new_h, left, left + new_w)
    assert 256 - (top + new_h) - top in (0, 1) and 256 - (left + new_w) - left in (0, 1)


def test_read_audio_takes_first_channel(tmp_path):
    clip = synth(
        tmp_path / "st.wav",
        "-f",
        "lavfi",
        "-i",
        "aevalsrc=0.5*sin(2*PI*440*t)|0.5*sin(2*PI*1000*t):s=44100:d=1",
        "-c:a",
        "pcm_s16le",
    )
    a = read_audio(clip)
    assert a.dtype == np.float32 and a.shape == (SR,)
    spectrum = np.abs(np.fft.rfft(a * np.hanning(len(a))))
    assert spectrum[440] > 100 * spectrum[1000]
    assert abs(np.sqrt(np.mean(a[1000:-1000] ** 2)) - 0.5 / np.sqrt(2)) < 0.01  # not a downmix

    silent_right = synth(
        tmp_path / "l.wav",
        "-f",
        "lavfi",
        "-i",
        "aevalsrc=0.5*sin(2*PI*440*t)|0:s=22050:d=1",
        "-c:a",
        "pcm_s16le",
    )
    b = read_audio(silent_right, sample_rate=8000)
    assert b.shape == (8000,) and abs(np.sqrt(np.mean(b[500:-500] ** 2)) - 0.3536) < 0.01


def test_missing_streams_and_bad_files(tmp_path):
    video_only = synth(
        tmp_path / "v.mp4",
        "-f",
        "lavfi",
        "-i",
        "testsrc=s=64x64:r=10:d=0.5",
        "-c:v",
        "libx264",
        "-pix_fmt",
        "yuv420p",
    )
    audio_only = synth(tmp_path / "a.wav", "-f", "lavfi", "-i", "sine=f=440:d=0.5")
    with pytest.raises(MediaError, match="v.mp4 has no audio stream"):
        read_audio(video_only)
    with pytest.raises(MediaError, match="a.wav has no video stream"):
        read_video_frames(audio_only)
    with pytest.raises(MediaError, match="has no video stream"):
        count_frames(audio_only)
    with pytest.raises(MediaError, match="no such file"):
        read_audio(tmp_path / "nope.mp4")
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"this is not a video file\n" * 200)  # fixed: random bytes may pass for audio
    with pytest.raises(MediaError, match="cannot read"):
        read_video_frames(junk)


@pytest.mark.parametrize("use_ffprobe", [True, False])
def test_probe_with_and_without_ffprobe(tmp_path, monkeypatch, use_ffprobe):
    clip = synth(
        tmp_path / "p.mp4",
        "-f",
        "lavfi",
        "-i",
        "testsrc=s=320x180:r=25:d=2",
        "-f",
        "lavfi",
        "-i",
        "aevalsrc=0.1*sin(2*PI*440*t)|0:s=44100:d=2",
        "-c:v",
        "libx264",
        "-pix_fmt",
        "yuv420p",
        "-c:a",
        "aac",
    )
    wav = synth(tmp_path / "m.wav", "-f", "lavfi", "-i", "sine=f=440:d=0.5:sample_rate=22050")
    if not use_ffprobe:
        monkeypatch.setattr(media, "_ffprobe_exe", lambda: None)
    info = probe(clip)
    assert (info.has_video, info.has_audio) == (True, True)
    assert (info.width, info.height, info.fps) == (320, 180, 25.0)
    assert (info.audio_sample_rate, info.audio_channels) == (44100, 2)
    assert abs(info.duration - 2.0) < 0.1
    assert (info.video_start is not None) == use_ffprobe
    w = probe(wav)
    assert (w.has_video, w.has_audio, w.audio_sample_rate, w.audio_channels) == (False, True, 22050, 1)
    with pytest.raises(MediaError, match="no such file"):
        probe(tmp_path / "nope.mp4")


# ---------------------------------------------------------------------------- ffmpeg lookup
def test_find_ffmpeg_prefers_path_and_env_override(monkeypatch, tmp_path):
    monkeypatch.delenv(media.FFMPEG_ENV, raising=False)
    assert os.path.samefile(find_ffmpeg(), FFMPEG)
    link = tmp_path / "my-ffmpeg"
    link.symlink_to(FFMPEG)
    monkeypatch.setenv(media.FFMPEG_ENV, str(link))
    media.find_ffmpeg.cache_clear()
    assert find_ffmpeg() == str(link)
    monkeypatch.setenv(media.FFMPEG_ENV, str(tmp_path / "nothing"))
    media.find_ffmpeg.cache_clear()
    with pytest.raises(MediaError, match=media.FFMPEG_ENV):
        find_ffmpeg()


def test_find_ffmpeg_falls_back_to_imageio_ffmpeg(monkeypatch, tmp_path):
    imageio_ffmpeg = pytest.importorskip("imageio_ffmpeg")
    try:
        exe = imageio_ffmpeg.get_ffmpeg_exe()
    except Exception:
        pytest.skip("imageio-ffmpeg has no binary here")
    clip = synth(
        tmp_path / "c.mp4",
        "-f",
        "lavfi",
        "-i",
        "testsrc=s=64x48:r=10:d=0.5",
        "-f",
        "lavfi",
        "-i",
        "sine=f=440:d=0.5",
        "-c:v",
        "libx264",
        "-pix_fmt",
        "yuv420p",
        "-c:a",
        "aac",
    )
    monkeypatch.delenv(media.FFMPEG_ENV, raising=False)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # no ffmpeg, no ffprobe
    assert find_ffmpeg() == exe
    # Everything still works through that binary, probing included (no ffprobe).
    info = probe(clip)
    assert (info.width, info.height, info.has_audio) == (64, 48, True)
    assert len(list(read_video_frames(clip))) == 5
    assert abs(len(read_audio(clip)) - 8000) <= 1024

    monkeypatch.setattr(imageio_ffmpeg, "get_ffmpeg_exe", lambda: (_ for _ in ()).throw(RuntimeError))
    media.find_ffmpeg.cache_clear()
    with pytest.raises(MediaError, match="ffmpeg not found"):
        find_ffmpeg()


def _process_running(pid: int) -> bool:
    """Whether `pid` is a process that has not exited (a zombie left to a non-reaping init has)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return False
    return fields[0] != "Z"


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads process states from /proc")
@pytest.mark.parametrize("frames", [0, 3])
def test_ffmpeg_ends_when_the_writing_process_is_killed(tmp_path, frames):
    """SIGKILL gives a writer no chance to clean up: its ffmpeg must still end (it reads the end of
    its inputs), before or after the first frame, and leave nothing in the temporary folder."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    script = f"""
import os, signal, sys, tempfile
sys.path.insert(0, {str(Path(__file__).parent)!r})
tempfile.tempdir = {str(tmp)!r}
from test_media import burst_audio, pattern_frames
from rflav_cli.media import VideoWriter
w = VideoWriter({str(tmp_path / "killed.mp4")!r})
if {frames}:
    w.write(pattern_frames(0, {frames}), burst_audio(0, {frames}))
print(w._proc.pid, flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    ffmpeg_pid = int(proc.stdout)
    deadline = time.monotonic() + 10
    while _process_running(ffmpeg_pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _process_running(ffmpeg_pid), "ffmpeg outlived the process that fed it"
    assert list(tmp.iterdir()) == []


def test_failed_writer_leaves_nothing_behind(tmp_path, monkeypatch):
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    w = VideoWriter(tmp_path / "x.mp4")
    w.write(pattern_frames(0, 2), burst_audio(0, 2))
    assert list(tmp.iterdir()) == []  # pipes and ffmpeg's messages have no name
    w._proc.kill()  # ffmpeg dies under the writer
    w._proc.wait()
    with pytest.raises(MediaError, match="ffmpeg"):
        for i in range(100):
            w.write(pattern_frames(i, 1), burst_audio(i, 1))
    w.abort()
    assert list(tmp.iterdir()) == [] and not partial_files(tmp_path)
    assert all(not f.is_alive() for f in w._feeders)


# ---------------------------------------------------------------------------- live outputs
SMALL = 32  # live-output tests use small frames: what they check does not depend on the size


def small_frames(start: int, n: int) -> np.ndarray:
    return np.stack(
        [
            np.broadcast_to(np.array(colour(i % 25), np.uint8), (SMALL, SMALL, 3))
            for i in range(start, start + n)
        ]
    )


def ffprobe_bytes(data: bytes, tmp_path: Path) -> dict[str, dict]:
    path = tmp_path / "received.mp4"
    path.write_bytes(data)
    return ffprobe_streams(path)


class PipeReader:
    """Reads a writer's pipe in a thread, as a player would; `stop_after` bytes, then closes it."""

    def __init__(self, stream, stop_after: int | None = None) -> None:
        import threading

        self.chunks: list[bytes] = []
        self.stream, self.stop_after = stream, stop_after
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    @property
    def received(self) -> int:
        return sum(map(len, self.chunks))

    def _run(self) -> None:
        while chunk := self.stream.read1(1 << 16):
            self.chunks.append(chunk)
            if self.stop_after is not None and self.received >= self.stop_after:
                break
        self.stream.close()


def test_pipe_output_arrives_fragment_by_fragment(tmp_path):
    w = VideoWriter(media.PIPE, width=SMALL, height=SMALL)
    reader = PipeReader(w.stream)
    w.write(small_frames(0, 12), burst_audio(0, 12))
    # Live fragments are short: the header and the first frames reach the reader while the
    # writer is still open, long before a keyframe interval of more frames.
    deadline = time.monotonic() + 20
    while reader.received == 0:
        assert time.monotonic() < deadline, "nothing came out of the pipe while writing"
        time.sleep(0.01)
    w.write(small_frames(12, 13), burst_audio(12, 13))
    assert w.close() is None and w.path is None
    reader.thread.join(10)
    s = ffprobe_bytes(b"".join(reader.chunks), tmp_path)
    assert (s["video"]["width"], s["video"]["height"], int(s["video"]["nb_read_packets"])) == (
        SMALL,
        SMALL,
        25,
    )
    assert abs(stream_end(s["video"]) - 2.5) < 1e-3
    assert abs(stream_end(s["audio"]) - stream_end(s["video"])) <= AAC_FRAME_S + 1e-3
    assert not partial_files(tmp_path)


def test_pipe_reader_leaving_ends_writing_with_output_closed(tmp_path):
    w = VideoWriter(media.PIPE, width=SMALL, height=SMALL)
    reader = PipeReader(w.stream, stop_after=1)  # closes the pipe after its first chunk
    with pytest.raises(media.OutputClosed, match="closed it"):
        for i in range(10_000):  # 1000 s of video: ffmpeg notices the closed pipe long before
            w.write(small_frames(i, 1), burst_audio(i, 1))
    reader.thread.join(10)
    assert i < 1000
    w.abort()
    with pytest.raises(MediaError, match="aborted"):
        w.write(small_frames(0, 1), burst_audio(0, 1))


def test_interrupt_frees_a_writer_held_back_by_a_slow_reader():
    import threading

    w = VideoWriter(media.PIPE, width=SMALL, height=SMALL)  # nobody reads: writing soon blocks
    timer = threading.Timer(0.5, w.interrupt)
    timer.start()
    began = time.monotonic()
    with pytest.raises(media.OutputClosed, match="stopped"):
        for i in range(100_000):
            w.write(small_frames(i % 25, 1), burst_audio(0, 1))
    assert time.monotonic() - began < 0.5 + 1.0
    # Held back: far fewer frames than the loop asks for went in (bounded memory).
    assert w.frames_written < 2000
    w.abort()
    w.stream.close()


def _stdout_writer_script(frames: int) -> str:
    return (
        "import numpy as np, sys\n"
        "from rflav_cli.media import STDOUT, OutputClosed, VideoWriter\n"
        "try:\n"
        f"    with VideoWriter(STDOUT, width={SMALL}, height={SMALL}) as w:\n"
        f"        for i in range({frames}):\n"
        f"            w.write(np.full(({SMALL}, {SMALL}, 3), i % 256, np.uint8), "
        f"np.zeros({SPF}, np.float32))\n"
        "except OutputClosed as err:\n"
        "    print('closed:', err, file=sys.stderr)\n"
    )


def test_stdout_output_pipes_into_a_player(tmp_path):
    import sys

    res = subprocess.run(
        [sys.executable, "-c", _stdout_writer_script(25)], capture_output=True, timeout=60, check=True
    )
    s = ffprobe_bytes(res.stdout, tmp_path)
    assert int(s["video"]["nb_read_packets"]) == 25 and s["audio"]["codec_name"] == "aac"

    # The player quits after the first bytes: the writer ends with OutputClosed, promptly.
    proc = subprocess.Popen(
        [sys.executable, "-c", _stdout_writer_script(100_000)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout.read(100)
    proc.stdout.close()
    assert proc.wait(timeout=30) == 0
    err = proc.stderr.read().decode()
    assert err.startswith("closed: the reader of standard output closed it"), err


def test_stdout_output_refuses_a_terminal():
    import pty
    import sys

    main, child = pty.openpty()
    try:
        res = subprocess.run(
            [sys.executable, "-c", _stdout_writer_script(1)], stdout=child, stderr=subprocess.PIPE, timeout=60
        )
    finally:
        os.close(main)
        os.close(child)
    assert res.returncode != 0 and b"standard output is a terminal" in res.stderr


def _write_until_named(w: VideoWriter, path: Path, limit: int = 200) -> int:
    """Write frames until the file has its final name; returns the frames written."""
    for i in range(limit):
        w.write(small_frames(i, 1), burst_audio(i, 1))
        if path.exists():
            return i + 1
        time.sleep(0.002)  # let ffmpeg keep up, as a real-time producer would
    raise AssertionError(f"{path.name} did not appear within {limit} frames")


def test_live_file_is_playable_under_its_name_while_it_grows(tmp_path):
    out = tmp_path / "forever.mp4"
    w = VideoWriter(out, width=SMALL, height=SMALL, live=True)
    written = _write_until_named(w, out)
    assert os.path.samefile(out, w.partial_path)  # the same, growing file
    res = subprocess.run(
        [
            FFPROBE,
            "-v",
            "error",
            "-count_frames",
            "-show_entries",
            "stream=nb_read_frames",
            "-of",
            "csv=p=0",
            out,
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    playable = [int(n) for n in res.stdout.split()]
    assert len(playable) == 2 and 1 <= playable[0] <= written
    w.write(small_frames(written, 30), burst_audio(written, 30))
    assert w.close() == out
    assert not partial_files(tmp_path) and sorted(p.name for p in tmp_path.iterdir()) == ["forever.mp4"]
    assert_av_agree(out, written + 30)


def test_live_file_name_goes_away_on_abort_and_failure(tmp_path):
    out = tmp_path / "a.mp4"
    w = VideoWriter(out, width=SMALL, height=SMALL, live=True)
    _write_until_named(w, out)
    w.abort()
    assert list(tmp_path.iterdir()) == []

    w = VideoWriter(out, width=SMALL, height=SMALL, live=True)
    _write_until_named(w, out)
    w._proc.kill()  # ffmpeg fails under the writer
    w._proc.wait()
    with pytest.raises(MediaError, match="partial output kept"):
        w.close()
    assert not out.exists() and w.partial_path.exists()  # never a broken file under the name
    w.partial_path.unlink()


def test_live_file_never_clobbers_unless_asked(tmp_path):
    late = tmp_path / "late.mp4"
    w = VideoWriter(late, width=SMALL, height=SMALL, live=True)
    late.write_bytes(b"someone else's")  # appears before the first fragment
    for i in range(60):
        w.write(small_frames(i, 1), burst_audio(i, 1))
    time.sleep(0.5)
    assert media._first_fragment_complete(w.partial_path)  # so the next write tries to name it
    w.write(small_frames(60, 1), burst_audio(60, 1))
    assert late.read_bytes() == b"someone else's"
    with pytest.raises(MediaError, match="late.mp4"):
        w.close()
    assert late.read_bytes() == b"someone else's" and w.partial_path.exists()

    old = tmp_path / "old.mp4"
    old.write_bytes(b"old take")
    w = VideoWriter(old, width=SMALL, height=SMALL, live=True, overwrite=True)
    for i in range(200):
        w.write(small_frames(i, 1), burst_audio(i, 1))
        if old.read_bytes() != b"old take":
            break
        time.sleep(0.002)
    assert os.path.samefile(old, w.partial_path)  # replaced, as --overwrite asks, while growing
    w.close()
    assert_av_agree(old, i + 1)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".link")]


def test_readers_run_in_their_own_session_and_a_killed_one_is_no_verdict_on_the_file(tmp_path, monkeypatch):
    """A terminal's Ctrl-C goes to its foreground process group: the readers are outside it (own
    session), so a stop never passes for a broken file; a reader killed anyway raises
    DecoderKilled, which the dataset scan does not record as "unreadable"."""
    from rflav_cli import data
    from rflav_cli.media import DecoderKilled, run_tool

    res = run_tool([sys.executable, "-c", "import os; print(os.getsid(0), os.getpgid(0))"])
    sid, pgid = map(int, res.stdout.split())
    assert sid != os.getsid(0) and pgid != os.getpgid(0)
    with pytest.raises(DecoderKilled, match="ended by signal 9 while reading clip.mp4"):
        run_tool(["sh", "-c", "kill -9 $$", "-i", "clip.mp4", "-"])

    clip = tmp_path / "clip.mp4"
    with VideoWriter(clip, width=32, height=32) as w:
        w.write(np.zeros((3, 32, 32, 3), np.uint8), np.zeros(3 * 1600, np.float32))
    assert data.probe_video(clip)["frames"] == 3

    def killed(*args, **kwargs):
        raise DecoderKilled("ffmpeg was ended by signal 2 while reading clip.mp4")

    monkeypatch.setattr(media, "count_frames", killed)
    with pytest.raises(DecoderKilled):
        data.probe_video(clip)


@pytest.mark.parametrize("keep", [True, False])
def test_a_file_that_cannot_be_finished_is_kept_only_when_asked(tmp_path, keep):
    w = VideoWriter(tmp_path / "x.mp4")
    w.write(pattern_frames(0, 2), burst_audio(0, 2))
    w._proc.kill()  # ffmpeg dies before the file is finished
    w._proc.wait()
    with pytest.raises(MediaError) as err:
        w.close(keep_partial=keep)
    assert ("partial output kept as" in str(err.value)) == keep
    assert len(partial_files(tmp_path)) == int(keep) and not (tmp_path / "x.mp4").exists()
