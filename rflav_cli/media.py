"""Reading and writing audio/video with ffmpeg.

Everything goes through an ffmpeg executable (the system one, or the one shipped by the
``imageio-ffmpeg`` package); command lines are built with ``ffmpeg-python``.

* :func:`read_video_frames` streams letterboxed RGB frames at a fixed frame rate.
* :func:`read_audio` decodes the first audio channel, resampled.
* :class:`VideoWriter` streams frames and their audio into one fragmented MP4 while they are
  produced, with flat memory, so an interrupted run still leaves a playable file; the MP4 can
  also go to standard output or to a pipe, fragment by fragment, for live playback.
* :func:`write_wav` / :class:`WavWriter` write 16-bit PCM WAV files.
"""

from __future__ import annotations

import functools
import glob
import json
import os
import queue
import re
import secrets
import select
import shutil
import subprocess
import sys
import tempfile
import threading
import wave
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Callable, Iterator

import ffmpeg
import numpy as np

from .config import FPS, IMAGE_SIZE, SAMPLE_RATE
from .errors import RflavError, UsageError
from .files import stdout_unusable

__all__ = [
    "DecoderKilled",
    "MediaError",
    "MediaInfo",
    "OutputClosed",
    "PIPE",
    "STDOUT",
    "VideoWriter",
    "WavWriter",
    "count_frames",
    "ffmpeg_command",
    "find_ffmpeg",
    "letterbox",
    "probe",
    "read_audio",
    "read_video_frames",
    "run_tool",
    "write_wav",
]

FFMPEG_ENV = "RFLAV_FFMPEG"
_GLOBAL_ARGS = ("-hide_banner", "-nostdin", "-loglevel", "error")
# One keyframe (hence one MP4 fragment) per second of video: an interrupted file loses
# at most about a second.
KEYFRAME_INTERVAL_S = 1.0
# fragmented MP4; delay_moov writes the header after the first fragment, so it carries the
# edit lists that hide the encoder delays (B-frames, AAC priming) and A/V start in sync.
MOVFLAGS = "+frag_keyframe+delay_moov+default_base_moof"
# Live outputs (standard output, pipes) also cut a fragment at least this often, so a player
# gets the first picture after this much video instead of a whole keyframe interval.
LIVE_FRAGMENT_S = 0.2
# VideoWriter targets besides a file name: this process's standard output, or a pipe that the
# caller reads from `VideoWriter.stream`.
STDOUT = "-"
PIPE = subprocess.PIPE
# Bounded hand-over queues (items are single frames): a few MB whatever the video length.
_VIDEO_QUEUE_FRAMES = 16
_AUDIO_QUEUE_FRAMES = 64
_STDERR_TAIL = 600


class MediaError(RflavError):
    """A media file cannot be read or written; the message is one line for the user."""

    per_process = True


class DecoderKilled(MediaError):
    """ffmpeg or ffprobe was ended by a signal: says nothing about the file it was reading."""


class OutputClosed(MediaError):
    """The reader of a streamed MP4 went away (a player quit, a viewer disconnected): nothing
    more can be delivered, and that is the normal end of a live stream rather than a failure."""


# --------------------------------------------------------------------------------------
# executables
# --------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def find_ffmpeg() -> str:
    """Path of the ffmpeg executable: $RFLAV_FFMPEG, else PATH, else imageio-ffmpeg's binary."""
    override = os.environ.get(FFMPEG_ENV)
    if override:
        exe = shutil.which(override)
        if exe is None:
            raise MediaError(f"{FFMPEG_ENV}={override} is not an executable ffmpeg")
        return exe
    exe = shutil.which("ffmpeg")
    if exe is not None:
        return exe
    try:
        import imageio_ffmpeg

        exe = imageio_ffmpeg.get_ffmpeg_exe()
    except Exception:  # not installed, or its binary is missing for this platform
        exe = None
    if exe and os.access(exe, os.X_OK):
        return exe
    raise MediaError(
        "ffmpeg not found: install it (e.g. apt-get install ffmpeg) or `pip install imageio-ffmpeg`"
    )


def _ffprobe_exe() -> str | None:
    return shutil.which("ffprobe")


def _tail(text: str | bytes) -> str:
    """The last meaningful part of ffmpeg's stderr, as one line."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    line = " | ".join(s.strip() for s in text.strip().splitlines() if s.strip())
    return line[-_STDERR_TAIL:] if line else "no error message"


def _check_input(path: str | os.PathLike[str]) -> Path:
    p = Path(path)
    if not p.exists():
        raise MediaError(f"{p}: no such file")
    if p.is_dir():
        raise MediaError(f"{p} is a folder, not a media file")
    return p


# --------------------------------------------------------------------------------------
# probing
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MediaInfo:
    """What a media file contains (first video stream, first audio stream).

    ``start_time`` is the container's start; ``video_start`` the first video timestamp
    (known only when ffprobe is available).
    """

    has_video: bool
    has_audio: bool
    width: int | None = None
    height: int | None = None
    fps: float | None = None
    duration: float | None = None
    audio_sample_rate: int | None = None
    audio_channels: int | None = None
    start_time: float | None = None
    video_start: float | None = None


def probe(path: str | os.PathLike[str]) -> MediaInfo:
    """Describe a media file with ffprobe when available, else by parsing ``ffmpeg -i``."""
    p = _check_input(path)
    exe = _ffprobe_exe()
    return _probe_ffprobe(p, exe) if exe else _probe_ffmpeg(p)


def _fraction(text: Any) -> float | None:
    try:
        num, _, den = str(text).partition("/")
        value = float(num) / float(den or 1)
    except (ValueError, ZeroDivisionError):
        return None
    return value if value > 0 else None


def _float(text: Any) -> float | None:
    try:
        return float(text)
    except (TypeError, ValueError):
        return None


def _probe_ffprobe(p: Path, exe: str) -> MediaInfo:
    cmd = [exe, "-v", "error", "-print_format", "json", "-show_streams", "-show_format", str(p)]
    res = run_tool(cmd)
    if res.returncode != 0:
        raise MediaError(f"cannot read {p}: {_tail(res.stderr)}")
    data = json.loads(res.stdout or b"{}")
    streams = data.get("streams", [])
    video = next(
        (
            s
            for s in streams
            if s.get("codec_type") == "video" and not s.get("disposition", {}).get("attached_pic")
        ),
        None,
    )
    audio = next((s for s in streams if s.get("codec_type") == "audio"), None)
    fmt = data.get("format", {})
    duration = _float(fmt.get("duration"))
    info: dict[str, Any] = dict(
        has_video=video is not None, has_audio=audio is not None, start_time=_float(fmt.get("start_time"))
    )
    if video is not None:
        info.update(
            width=video.get("width"),
            height=video.get("height"),
            fps=_fraction(video.get("avg_frame_rate")) or _fraction(video.get("r_frame_rate")),
            video_start=_float(video.get("start_time")),
        )
        duration = duration or _float(video.get("duration"))
    if audio is not None:
        info.update(
            audio_sample_rate=int(audio["sample_rate"]) if audio.get("sample_rate") else None,
            audio_channels=audio.get("channels"),
        )
        duration = duration or _float(audio.get("duration"))
    return MediaInfo(duration=duration, **info)


_NAMED_LAYOUTS = {
    "mono": 1,
    "stereo": 2,
    "downmix": 2,
    "quad": 4,
    "hexagonal": 6,
    "octagonal": 8,
    "hexadecagonal": 16,
}


def _layout_channels(layout: str) -> int | None:
    layout = layout.strip()
    if m := re.fullmatch(r"(\d+) channels.*", layout):
        return int(m.group(1))
    base = layout.split("(")[0]
    if m := re.fullmatch(r"(\d+)\.(\d+)", base):  # "5.1" -> 5 + 1 channels
        return int(m.group(1)) + int(m.group(2))
    return _NAMED_LAYOUTS.get(base)


def _rate(text: str) -> float:
    return float(text[:-1]) * 1000 if text.endswith("k") else float(text)


def _probe_ffmpeg(p: Path) -> MediaInfo:
    """Parse the stream summary that ``ffmpeg -i FILE`` prints (it exits 1: no output given)."""
    res = run_tool([find_ffmpeg(), "-hide_banner", "-nostdin", "-i", str(p)])
    text = res.stderr.decode("utf-8", "replace")
    if "Input #0" not in text:
        raise MediaError(f"cannot read {p}: {_tail(text)}")
    info: dict[str, Any] = dict(has_video=False, has_audio=False)
    if m := re.search(r"Duration: (\d+):(\d+):(\d+(?:\.\d+)?)", text):
        info["duration"] = int(m.group(1)) * 3600 + int(m.group(2)) * 60 + float(m.group(3))
    if m := re.search(r", start: (-?\d+(?:\.\d+)?)", text):
        info["start_time"] = float(m.group(1))
    for line in text.splitlines():
        line = line.strip()
        if not line.startswith("Stream #0:"):
            continue
        if ": Video: " in line and "(attached pic)" not in line and not info["has_video"]:
            info["has_video"] = True
            if m := re.search(r", (\d+)x(\d+)(?=[ ,]|$)", line):
                info.update(width=int(m.group(1)), height=int(m.group(2)))
            m = re.search(r"([\d.]+k?) fps", line) or re.search(r"([\d.]+k?) tbr", line)
            if m:
                info["fps"] = _rate(m.group(1))
        elif ": Audio: " in line and not info["has_audio"]:
            info["has_audio"] = True
            if m := re.search(r"(\d+) Hz, ([^,]+)", line):
                info.update(audio_sample_rate=int(m.group(1)), audio_channels=_layout_channels(m.group(2)))
    return MediaInfo(**info)


def ffmpeg_command(*args: str) -> list[str]:
    """The ffmpeg executable with the quiet, non-interactive global options, then ``args``."""
    return [find_ffmpeg(), *_GLOBAL_ARGS, *args]


# --------------------------------------------------------------------------------------
# reading
# --------------------------------------------------------------------------------------


def run_tool(cmd: list[str]) -> subprocess.CompletedProcess[bytes]:
    """Run ffmpeg or ffprobe to its end, output captured. It gets a session of its own, so that a
    Ctrl-C in the terminal reaches only this process (which stops cleanly) and not the reader,
    whose death would pass for a broken file; a reader ended by a signal anyway raises
    :class:`DecoderKilled`."""
    res = subprocess.run(cmd, capture_output=True, stdin=subprocess.DEVNULL, start_new_session=True)
    if res.returncode < 0:
        _raise_killed(cmd, res.returncode)
    return res


def _raise_killed(cmd: list[str], returncode: int) -> None:
    source = cmd[cmd.index("-i") + 1] if "-i" in cmd[:-1] else cmd[-1]
    raise DecoderKilled(f"{Path(cmd[0]).name} was ended by signal {-returncode} while reading {source}")


def letterbox(stream: Any, size: int) -> Any:
    """RGB → bicubic fit in size×size → black pad (odd pixel bottom/right), on an ffmpeg stream.

    The fitted size is int(side · min(size/h, size/w)) in double precision, like the
    original R-FLAV preprocessing (which may leave the long side one pixel short).
    """
    ratio = f"min({size}/ih,{size}/iw)"
    return (
        stream.filter("format", "rgb24")
        # B=0, C=0.75 is the Keys a=-0.75 cubic that torch/PIL call bicubic.
        .filter(
            "scale",
            w=f"trunc(iw*{ratio})",
            h=f"trunc(ih*{ratio})",
            flags="bicubic+accurate_rnd+full_chroma_int",
            param0=0,
            param1=0.75,
        )
        .filter("pad", size, size, x="trunc((ow-iw)/2)", y="trunc((oh-ih)/2)", color="black")
    )


def _letterbox_graph(path: Path, fps: float, size: int) -> Any:
    """fps → :func:`letterbox` of the first video stream."""
    stream = (
        ffmpeg.input(str(path))["V:0"]
        # Time runs from the first video frame (an MP4 may start its audio earlier).
        .filter("setpts", "PTS-STARTPTS")
        .filter("fps", fps=fps)
    )
    return letterbox(stream, size)


def read_video_frames(
    path: str | os.PathLike[str], *, fps: float = FPS, size: int = IMAGE_SIZE
) -> Iterator[np.ndarray]:
    """Stream the first video stream as uint8 (size, size, 3) RGB frames at ``fps``.

    Frames are resampled in time with ffmpeg's fps filter and letterboxed (aspect kept,
    bicubic, black bars). Decoding is streamed: memory does not grow with the video length.
    """
    p = _check_input(path)
    if not probe(p).has_video:
        raise MediaError(f"{p} has no video stream")
    stream = _letterbox_graph(p, fps, size).output("pipe:", format="rawvideo", pix_fmt="rgb24")
    cmd = stream.compile(cmd=ffmpeg_command())
    return _stream_frames(cmd, p, size)


def _stream_frames(cmd: list[str], p: Path, size: int) -> Iterator[np.ndarray]:
    with tempfile.TemporaryFile() as err:
        # Own session, as in run_tool.
        proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err, start_new_session=True
        )
        assert proc.stdout is not None
        try:
            while True:
                frame = np.empty((size, size, 3), np.uint8)
                view = memoryview(frame).cast("B")
                got = 0
                while got < len(view):
                    n = proc.stdout.readinto(view[got:])
                    if not n:
                        break
                    got += n
                if got < len(view):
                    break  # end of stream (a truncated last frame is dropped)
                yield frame
            if proc.wait() < 0:
                _raise_killed(cmd, proc.returncode)
            if proc.returncode != 0:
                err.seek(0)
                raise MediaError(f"cannot decode video from {p}: {_tail(err.read())}")
        finally:
            if proc.poll() is None:  # consumer stopped early
                proc.kill()
            proc.stdout.close()
            proc.wait()


def count_frames(path: str | os.PathLike[str], *, fps: float = FPS) -> int:
    """Number of frames :func:`read_video_frames` yields at ``fps`` (decodes the video)."""
    p = _check_input(path)
    if not probe(p).has_video:
        raise MediaError(f"{p} has no video stream")
    stream = (
        ffmpeg.input(str(p))["V:0"]
        .filter("setpts", "PTS-STARTPTS")
        .filter("fps", fps=fps)
        .output("-", format="null")
        .global_args("-progress", "pipe:1", "-nostats")
    )
    res = run_tool(stream.compile(cmd=ffmpeg_command()))
    counts = re.findall(rb"^frame=(\d+)", res.stdout, re.MULTILINE)
    if res.returncode != 0 or not counts:
        raise MediaError(f"cannot decode video from {p}: {_tail(res.stderr)}")
    return int(counts[-1])


def read_audio(path: str | os.PathLike[str], *, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Decode the first audio stream's FIRST channel (no downmix) as float32 at ``sample_rate``.

    Sample 0 is at the time of the first video frame (the container start for audio-only
    files): earlier samples, such as an encoder delay that an older ffmpeg does not remove,
    are dropped and a late start is padded with silence.
    """
    p = _check_input(path)
    info = probe(p)
    if not info.has_audio:
        raise MediaError(f"{p} has no audio stream")
    origin = (
        info.video_start
        if info.has_video and info.video_start is not None
        else max(info.start_time or 0.0, 0.0)
    )
    stream = (
        ffmpeg.input(str(p))["a:0"]
        .filter("channelmap", map="0", channel_layout="mono")
        # With -copyts, first_pts trims/pads the decoded samples to start exactly at origin.
        .filter("aresample", sample_rate, first_pts=round(origin * sample_rate))
        .output("pipe:", format="f32le", acodec="pcm_f32le", ac=1, ar=sample_rate)
    )
    res = run_tool(stream.compile(cmd=ffmpeg_command("-copyts")))
    if res.returncode != 0:
        raise MediaError(f"cannot decode audio from {p}: {_tail(res.stderr)}")
    return np.frombuffer(res.stdout, dtype="<f4").astype(np.float32)


# --------------------------------------------------------------------------------------
# writing
# --------------------------------------------------------------------------------------
def _as_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor, without importing torch here
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _prepare_output(path: str | os.PathLike[str], overwrite: bool, suffix: str) -> tuple[Path, Path]:
    """Check the destination and create the private temporary file next to it."""
    dest = Path(path)
    if dest.is_dir():
        raise MediaError(f"{dest} is a folder: give a file name for the output")
    if dest.exists() and not overwrite:
        raise MediaError(f"{dest} already exists: choose another name or pass --overwrite")
    folder = dest.parent
    if not folder.is_dir():
        raise MediaError(f"cannot write {dest}: folder {folder} does not exist")
    tmp = folder / f".{dest.name}.{secrets.token_hex(4)}.partial{suffix}"
    try:
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    except OSError as e:
        raise MediaError(f"cannot write to folder {folder}: {e.strerror}") from None
    return dest, tmp


def remove_partials(dest: str | os.PathLike[str]) -> list[Path]:
    """Remove the temporary files that writers of `dest` left behind when their process was
    killed (a finished or aborted writer removes its own). Only for a destination that no
    running writer is using. Returns what was removed."""
    dest = Path(dest)
    removed = []
    for tmp in dest.parent.glob(f".{glob.escape(dest.name)}.*.partial*"):
        if re.fullmatch(re.escape(f".{dest.name}.") + r"[0-9a-f]{8}\.partial\.\w+", tmp.name):
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


def _publish(tmp: Path, dest: Path, overwrite: bool, keep: bool = True) -> None:
    """Move the finished temporary file to its final name, never clobbering unless asked. When
    the name was taken meanwhile, the file is kept under its temporary name, or with `keep`
    False removed."""
    if overwrite:
        os.replace(tmp, dest)
        return
    try:
        os.link(tmp, dest)  # atomic "create only if absent"
    except FileExistsError:
        raise _taken(tmp, dest, keep) from None
    except OSError:  # filesystem without hard links
        if dest.exists():
            raise _taken(tmp, dest, keep) from None
        os.replace(tmp, dest)
    else:
        tmp.unlink()


def _taken(tmp: Path, dest: Path, keep: bool) -> MediaError:
    if keep:
        return MediaError(f"{dest} appeared while writing; output kept as {tmp} (use --overwrite to replace)")
    tmp.unlink(missing_ok=True)
    return MediaError(f"{dest} appeared while writing (--overwrite replaces it)")


_END = object()


class _PipeFeeder(threading.Thread):
    """Copies queued byte chunks into the write end of one pipe that ffmpeg reads.

    A write error (ffmpeg gone) is recorded and the queue keeps being drained, so the
    producer never blocks on a dead consumer.
    """

    def __init__(
        self, fd: int, maxsize: int, name: str, final_size: Callable[[], int | None] | None = None
    ) -> None:
        super().__init__(name=name, daemon=True)
        self.fd = fd
        self.queue: queue.Queue[Any] = queue.Queue(maxsize)
        self.final_size = final_size
        self.written = 0
        self.error: BaseException | None = None

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self.fd, view) :]
        self.written += len(data)

    def run(self) -> None:
        ended = False
        try:
            while (item := self.queue.get()) is not _END:
                self._write(item)
            ended = True
            if self.final_size is not None:
                missing = (self.final_size() or 0) - self.written
                if missing > 0:
                    self._write(bytes(missing))
        except BaseException as e:  # noqa: BLE001 - reported to the producer
            self.error = e
            while not ended:
                ended = self.queue.get() is _END
        finally:
            # ffmpeg reads the end of its input.
            os.close(self.fd)


class _Output:
    """`with` support for the writers: finish the file on success and on Ctrl-C, drop it on any
    other error. Subclasses provide close() and abort()."""

    def __enter__(self):
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None or issubclass(exc_type, KeyboardInterrupt):
            self.close()
        else:
            self.abort()


class VideoWriter(_Output):
    """Stream RGB frames and their audio into a fragmented H.264/AAC MP4.

    Frames and audio go through two pipes into one ffmpeg process, each fed by a
    thread from a small bounded queue, so memory stays flat whatever the length. Output goes
    to a hidden temporary file in the destination folder, renamed on :meth:`close`.
    Stopping at any point (e.g. after Ctrl-C) and calling :meth:`close` gives a playable
    file whose audio is padded with silence to the video length.

    ``live=True`` makes a file watchable while it grows: once its first fragment is on disk it
    also gets its final name (a hard link to the temporary file, still never replacing an
    existing file unless ``overwrite``); :meth:`abort` and a failed :meth:`close` remove that
    name again.

    ``path`` may also be :data:`STDOUT` (this process's standard output) or :data:`PIPE` (read
    the MP4 from :attr:`stream`, in another thread than the writing one): a live stream, flushed
    fragment by fragment, that a player can show while it is made. When its reader goes away,
    writing raises :class:`OutputClosed`.
    """

    def __init__(
        self,
        path: str | os.PathLike[str] | int,
        *,
        width: int = IMAGE_SIZE,
        height: int = IMAGE_SIZE,
        fps: int = FPS,
        sample_rate: int = SAMPLE_RATE,
        audio: bool = True,
        overwrite: bool = False,
        crf: int = 18,
        live: bool = False,
    ) -> None:
        if fps < 1 or sample_rate < 1 or sample_rate % fps:
            raise UsageError(
                f"{{sample_rate}} {sample_rate} must be a positive multiple of {{fps}} {fps}",
                params=("sample_rate", "fps"),
            )
        if width < 2 or height < 2 or width % 2 or height % 2:
            raise UsageError(
                f"H.264 yuv420p needs even frame sizes ({{width}}, {{height}}), got {width}x{height}",
                params=("width", "height"),
            )
        self.width, self.height, self.fps = width, height, fps
        self.sample_rate, self.audio, self.overwrite = sample_rate, audio, overwrite
        self.samples_per_frame = sample_rate // fps
        self.frames_written = 0
        self._frame_bytes = width * height * 3
        # Where the MP4 goes: a file (through a temporary name), standard output or a pipe.
        self.stream: IO[bytes] | None = None
        self.path: Path | None = None
        self.partial_path: Path | None = None
        if isinstance(path, int):
            if path != PIPE:
                raise UsageError("{path} must be a file name, media.STDOUT or media.PIPE", params=("path",))
            self._target, self.name = "pipe", "the output pipe"
        elif isinstance(path, str) and path == STDOUT:
            problem = stdout_unusable()
            if problem:
                raise MediaError(problem)
            self._target, self.name = "stdout", "standard output"
        else:
            self.path, self.partial_path = _prepare_output(path, overwrite, ".mp4")
            self._target, self.name = "file", str(self.path)
        self._live_file = live and self._target == "file"
        self._linked = False  # the final name already points at the growing file
        self._partial_size = 0
        self._interrupted = False
        self._state = "open"
        try:
            self._start(crf)
        except BaseException:
            self._cleanup(remove_partial=True)
            raise

    def _start(self, crf: int) -> None:
        # Frames and audio reach ffmpeg through anonymous pipes that only this process writes:
        # if it dies, however abruptly, ffmpeg reads the end of both inputs and exits.
        video_read, video_write = os.pipe()
        pipes = [video_read, video_write]
        if self.audio:
            audio_read, audio_write = os.pipe()
            pipes += [audio_read, audio_write]
        try:
            self._proc = self._spawn(crf, pipes[0::2])
        except BaseException:
            for fd in pipes:
                os.close(fd)
            raise
        for fd in pipes[0::2]:  # ffmpeg's ends: ours closed, so a dead ffmpeg breaks our writes
            os.close(fd)
        self.stream = self._proc.stdout
        self._video = _PipeFeeder(video_write, _VIDEO_QUEUE_FRAMES, "rflav-video")
        self._feeders = [self._video]
        if self.audio:
            self._audio = _PipeFeeder(
                audio_write, _AUDIO_QUEUE_FRAMES, "rflav-audio", final_size=self._final_audio_bytes
            )
            self._feeders.append(self._audio)
        for f in self._feeders:
            f.start()

    def _spawn(self, crf: int, inputs_fds: list[int]) -> subprocess.Popen[bytes]:
        """Start ffmpeg reading raw video (and audio) from the pipes `inputs_fds`."""
        # The raw inputs are fully described by their options, so probing is cut to the
        # minimum: ffmpeg opens the inputs one after the other and must not wait for seconds
        # of one stream (which the producer only sends in step with the other) to start.
        no_probe = dict(probesize=32, analyzeduration=0)
        inputs = [
            ffmpeg.input(
                f"pipe:{inputs_fds[0]}",
                format="rawvideo",
                pix_fmt="rgb24",
                s=f"{self.width}x{self.height}",
                framerate=self.fps,
                **no_probe,
            )
        ]
        out_args: dict[str, Any] = dict(
            vcodec="libx264",
            # veryfast: about a third of the default preset's CPU time per frame for the same
            # quality at this CRF (benchmarks/RESULTS.md), so encoding never competes with sampling.
            preset="veryfast",
            pix_fmt="yuv420p",
            crf=crf,
            g=max(1, round(self.fps * KEYFRAME_INTERVAL_S)),
            movflags=MOVFLAGS,
            format="mp4",
            flush_packets=1,  # each finished fragment reaches the disk (or the reader) at once
        )
        if self._target != "file":
            # A player waits for what the encoder holds back: no look-ahead, no B-frames,
            # and short fragments.
            out_args.update(tune="zerolatency", frag_duration=round(LIVE_FRAGMENT_S * 1e6))
        if self.audio:
            inputs.append(
                ffmpeg.input(f"pipe:{inputs_fds[1]}", format="f32le", ar=self.sample_rate, ac=1, **no_probe)
            )
            out_args.update(acodec="aac", ar=self.sample_rate, ac=1)
        destination = str(self.partial_path) if self._target == "file" else "pipe:1"
        cmd = ffmpeg.output(*inputs, destination, **out_args).overwrite_output().compile(cmd=ffmpeg_command())
        # Unnamed, so nothing is left behind whatever happens to this process.
        self._stderr = tempfile.TemporaryFile()
        if self._target == "stdout":
            sys.stdout.flush()  # whatever Python printed comes before the MP4
        # Own session: a Ctrl-C in the terminal must reach only us, so that close() can
        # still finish the file through this ffmpeg.
        return subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout={"file": subprocess.DEVNULL, "stdout": 1, "pipe": subprocess.PIPE}[self._target],
            stderr=self._stderr,
            pass_fds=inputs_fds,
            start_new_session=True,
        )

    def _final_audio_bytes(self) -> int | None:
        """Audio bytes matching the frames ffmpeg actually received (waits for the video)."""
        self._video.join()
        if self._video.error is not None:
            return None
        return self._video.written // self._frame_bytes * self.samples_per_frame * 4

    # -- producer side ------------------------------------------------------------------
    def _reader_gone(self, stderr_text: bytes = b"") -> bool:
        """Whether a streamed output lost its reader (then ffmpeg's failure is the stream's end)."""
        if self._target == "file":
            return False
        if self._interrupted or (self.stream is not None and self.stream.closed):
            return True
        if self._target == "stdout":
            # The write end of a pipe (or socket) whose reader left reports an error.
            poller = select.poll()
            poller.register(1, select.POLLOUT)
            if any(events & (select.POLLERR | select.POLLHUP) for _, events in poller.poll(0)):
                return True
        return b"Broken pipe" in stderr_text

    def _ffmpeg_error(self, what: str) -> MediaError:
        self._stderr.seek(0)
        text = self._stderr.read()
        if self._interrupted:
            return OutputClosed(f"{self.name} was stopped after {self.frames_written} frames")
        if self._reader_gone(text):
            return OutputClosed(f"the reader of {self.name} closed it after {self.frames_written} frames")
        return MediaError(f"ffmpeg {what} while writing {self.name}: {_tail(text)}")

    def _check_alive(self) -> None:
        if self._interrupted or self._proc.poll() is not None or any(f.error for f in self._feeders):
            self._proc.wait()
            raise self._ffmpeg_error("stopped")

    def _put(self, feeder: _PipeFeeder, item: Any, *, check: bool = True) -> None:
        while True:
            if check:
                self._check_alive()
            try:
                feeder.queue.put(item, timeout=0.2)
                return
            except queue.Full:
                continue

    def write(self, frames: Any, audio: Any = None) -> None:
        """Append frames, uint8 (N, H, W, 3) or (H, W, 3), and their N·sample_rate/fps samples.

        Returns once the data is queued; blocks while ffmpeg is behind (bounded memory).
        """
        if self._state != "open":
            raise MediaError(f"{self.name}: writer is already {self._state}")
        frames = _as_numpy(frames)
        if frames.ndim == 3:
            frames = frames[None]
        if frames.dtype != np.uint8 or frames.shape[1:] != (self.height, self.width, 3):
            raise UsageError(
                f"frames must be uint8 (N, {self.height}, {self.width}, 3), "
                f"got {frames.dtype} {tuple(frames.shape)}"
            )
        n = frames.shape[0]
        if self.audio:
            if audio is None:
                raise UsageError(
                    "this writer has an audio track: pass the frames' {audio}", params=("audio",)
                )
            audio = _as_numpy(audio)
            want = n * self.samples_per_frame
            if audio.ndim != 1 or audio.shape[0] != want or not np.issubdtype(audio.dtype, np.floating):
                raise UsageError(
                    f"audio must be float (N·{self.samples_per_frame},) = ({want},) for {n} "
                    f"frames, got {audio.dtype} {tuple(audio.shape)}"
                )
            audio = np.clip(audio, -1.0, 1.0).astype("<f4").reshape(n, self.samples_per_frame)
        elif audio is not None:
            raise UsageError("this writer was created with audio=False: pass no {audio}", params=("audio",))
        for i in range(n):
            # Video first: if interrupted in between, close() pads the missing audio.
            self._put(self._video, frames[i].tobytes())
            if self.audio:
                self._put(self._audio, audio[i].tobytes())
            self.frames_written += 1
        if self._live_file and not self._linked:
            self._link_when_playable()

    def interrupt(self) -> None:
        """End a streamed output from any thread (a viewer left): ffmpeg stops, and a write()
        blocked in another thread, or the next one, raises :class:`OutputClosed` within a fraction
        of a second. The writing thread still calls :meth:`abort`."""
        self._interrupted = True
        proc = getattr(self, "_proc", None)
        if proc is not None and proc.returncode is None:
            try:
                proc.kill()
            except OSError:  # already gone
                pass

    # -- the final name of a live file --------------------------------------------------
    def _link_when_playable(self) -> None:
        """Give the growing file its final name once a first fragment is complete on disk."""
        assert self.partial_path is not None and self.path is not None
        try:
            size = self.partial_path.stat().st_size
        except OSError:
            return
        if size == self._partial_size:
            return
        self._partial_size = size
        if not _first_fragment_complete(self.partial_path):
            return
        try:
            if self.overwrite:
                # link() never replaces: link under a private name, then rename over the old file.
                spare = self.path.with_name(f".{self.path.name}.{secrets.token_hex(4)}.link")
                os.link(self.partial_path, spare)
                os.replace(spare, self.path)
            else:
                os.link(self.partial_path, self.path)  # create-if-absent, as at close()
        except OSError:  # taken meanwhile (close() reports it), or no hard links here
            self._live_file = False
            return
        self._linked = True

    def _final_name_is_ours(self) -> bool:
        try:
            return self._linked and os.path.samefile(self.path, self.partial_path)
        except OSError:
            return False

    def _unlink_final_name(self) -> None:
        """Take back the final name given early (only while it still points at our file)."""
        if self._final_name_is_ours():
            self.path.unlink(missing_ok=True)
        self._linked = False

    # -- finishing ------------------------------------------------------------------------
    def close(self, keep_partial: bool = True) -> Path | None:
        """Finish the output; a file moves to its final name, which is returned (None for a
        stream). A stream whose reader went away raises :class:`OutputClosed`. A file that
        cannot be finished is kept under its temporary name (the error says which), or with
        `keep_partial` False removed."""
        if self._state == "closed":
            return self.path
        if self._state != "open":
            raise MediaError(f"{self.name}: writer is already {self._state}")
        self._state = "closing"
        try:
            for f in self._feeders:
                self._put(f, _END, check=False)
            for f in self._feeders:
                f.join()
            rc = self._proc.wait()
        except BaseException:
            self.abort()
            raise
        self._state = "failed"
        if self._interrupted or rc != 0 or any(f.error for f in self._feeders):
            err = self._ffmpeg_error(f"failed (exit code {rc})")
            if self._target != "file":
                self._cleanup(remove_partial=True)
                raise err
            self._cleanup(remove_partial=not keep_partial)
            self._unlink_final_name()
            if not keep_partial:
                raise err
            raise MediaError(f"{err} (partial output kept as {self.partial_path})")
        self._cleanup(remove_partial=False)
        if self._target == "file":
            if self._final_name_is_ours():
                self.partial_path.unlink()
            else:
                _publish(self.partial_path, self.path, self.overwrite, keep_partial)
        self._state = "closed"
        return self.path

    def abort(self) -> None:
        """Stop ffmpeg and remove the partial file and any name given to it (no output is
        produced; a stream just ends)."""
        if self._state in ("closed", "aborted"):
            return
        self._state = "aborted"
        self._cleanup(remove_partial=True)

    def _cleanup(self, *, remove_partial: bool) -> None:
        proc = getattr(self, "_proc", None)
        if proc is not None:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            for f in getattr(self, "_feeders", []):
                if f.is_alive():
                    self._put(f, _END, check=False)  # feeders drain after the broken pipe
                f.join()
        if getattr(self, "_stderr", None) is not None:
            self._stderr.close()
        if remove_partial and self.partial_path is not None:
            self._unlink_final_name()
            self.partial_path.unlink(missing_ok=True)


def _first_fragment_complete(path: Path) -> bool:
    """Whether a fragmented MP4 on disk holds its header (moov) and one whole fragment (moof
    then mdat): from then on a player can open it."""
    seen_moov = seen_moof = False
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        offset = 0
        while offset + 8 <= size:
            f.seek(offset)
            header = f.read(16)
            box_size, kind = int.from_bytes(header[:4], "big"), header[4:8]
            if box_size == 1 and len(header) == 16:  # 64-bit size
                box_size = int.from_bytes(header[8:16], "big")
            if box_size < 8 or offset + box_size > size:  # incomplete, or "up to the end" (0)
                return False
            if kind == b"moov":
                seen_moov = True
            elif kind == b"moof":
                seen_moof = True
            elif kind == b"mdat" and seen_moov and seen_moof:
                return True
            offset += box_size
    return False


# --------------------------------------------------------------------------------------
# WAV
# --------------------------------------------------------------------------------------
class WavWriter(_Output):
    """Stream float audio in [-1, 1] into a 16-bit PCM WAV (temporary name, renamed on close)."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        sample_rate: int = SAMPLE_RATE,
        *,
        channels: int = 1,
        overwrite: bool = False,
    ) -> None:
        self.path, self.partial_path = _prepare_output(path, overwrite, ".wav")
        self.overwrite = overwrite
        self.channels = channels
        self._wav = wave.open(str(self.partial_path), "wb")
        self._wav.setnchannels(channels)
        self._wav.setsampwidth(2)
        self._wav.setframerate(sample_rate)
        self._closed = False

    def write(self, audio: Any) -> None:
        """Append samples: (N,) for mono or (N, channels)."""
        a = _as_numpy(audio)
        if a.ndim == 1:
            a = a[:, None]
        if a.ndim != 2 or a.shape[1] != self.channels:
            raise UsageError(f"audio must be (N,) or (N, {self.channels}), got {tuple(a.shape)}")
        pcm = np.round(np.clip(a.astype(np.float64), -1.0, 1.0) * 32767.0).astype("<i2")
        self._wav.writeframes(pcm.tobytes())

    def close(self, keep_partial: bool = True) -> Path:
        """Finish the file under its final name (see VideoWriter.close for `keep_partial`)."""
        if not self._closed:
            self._wav.close()
            self._closed = True
            _publish(self.partial_path, self.path, self.overwrite, keep_partial)
        return self.path

    def abort(self) -> None:
        if not self._closed:
            self._wav.close()
            self._closed = True
            self.partial_path.unlink(missing_ok=True)


def write_wav(
    path: str | os.PathLike[str], audio: Any, sample_rate: int = SAMPLE_RATE, *, overwrite: bool = False
) -> Path:
    """Write float audio (N,) or (N, C) in [-1, 1] as a 16-bit PCM WAV, atomically."""
    a = _as_numpy(audio)
    with WavWriter(path, sample_rate, channels=1 if a.ndim == 1 else a.shape[1], overwrite=overwrite) as w:
        w.write(a)
    return w.path
