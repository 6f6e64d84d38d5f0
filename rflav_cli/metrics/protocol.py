"""The ``mmdiffusion`` evaluation protocol: FVD, KVD and FAD as MM-Diffusion's evaluator computes them.

This module is the media side of the protocol; the feature networks are passed in as
callables. It reproduces the evaluator's numerically significant behaviour:

* Clips: every 16-frame window at 10 fps of every video file (sorted, recursive), the
  windows of a file in order; the files are the evaluator's kinds (avi, gif, mp4) and those of
  training data (:data:`rflav_cli.data.VIDEO_EXTENSIONS`), all listed by the same rules. The
  evaluator shuffles the clips without a seed; here the order is either the enumeration order
  or a shuffle by ``random.Random(seed)``. Clips are consumed
  in batches of 8, epoch after epoch (a short set repeats), and features are truncated to
  ``num``. Batches matter: the audio network normalises with the statistics of its batch.
* Video: decoded RGB frames, letterboxed to 64×64 (bicubic, black bars) with or without
  antialiasing (torchvision ≥ 0.17 antialiases, older releases did not), rounded to uint8,
  mapped to [-1, 1] and back with truncation (u ∈ [1, 63] becomes u − 1), then each clip is
  resized bilinearly to 224 (shorter side), centre-cropped and scaled to [-1, 1] for I3D.
* Audio: moviepy 1.0.3's reader (44.1 kHz stereo from ffmpeg, a 200,000-sample buffer with
  its one-sample shift when the buffer is re-filled, float32 clip times, two read chunks),
  channel 0, zero-padded or cut to 70,560 samples, then the float32 ``scale`` step that maps
  int16 full scale onto [-1, 1] and so adds a DC offset and quantises to 641 levels.
* Metrics: FVD = Fréchet(fake, real) in float32, KVD = unbiased cubic-kernel MMD² in
  float32, FAD = Fréchet(fake, real) × 10,000.
"""

from __future__ import annotations

import math
import random
import re
import subprocess
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..data import VIDEO_EXTENSIONS as TRAINING_VIDEO_EXTENSIONS
from ..errors import UsageError
from ..media import MediaError, ffmpeg_command, find_ffmpeg, probe, run_tool
from ..requests import EvalError
from .frechet import frechet_distance
from .kernel import polynomial_mmd

__all__ = [
    "AUDIO_RATE",
    "AUDIO_SAMPLES",
    "BATCH_SIZE",
    "CLIP_FRAMES",
    "EVALUATOR_EXTENSIONS",
    "EVAL_FPS",
    "FAD_SCALE",
    "I3D_SIZE",
    "LETTERBOX_SIZE",
    "VIDEO_EXTENSIONS",
    "Clip",
    "MoviepyAudioReader",
    "clip_audio",
    "compute_features",
    "enumerate_clips",
    "i3d_input",
    "letterbox",
    "list_video_files",
    "loader_batches",
    "mmdiffusion_scores",
    "moviepy_duration",
    "read_clip_videos",
    "scale_audio",
    "uint8_round_trip",
]

EVAL_FPS = 10  # the evaluator resamples every video to 10 fps
CLIP_FRAMES = 16  # frames per clip (1.6 s)
LETTERBOX_SIZE = 64  # evaluator's video_size [16, 3, 64, 64]
I3D_SIZE = 224  # I3D input resolution
AUDIO_RATE = 44_100  # moviepy decode rate
AUDIO_SAMPLES = 70_560  # int(44100 · 1.6)
BATCH_SIZE = 8  # loader batch size, also the audio network's BatchNorm group
FAD_SCALE = 1e4  # FAD is reported as Fréchet distance × 10,000
EVALUATOR_EXTENSIONS = ("avi", "gif", "mp4")  # the kinds MM-Diffusion's evaluator lists
# Plus every kind a model can be trained on, so that its own training videos can be the real set.
VIDEO_EXTENSIONS = tuple(
    sorted(set(EVALUATOR_EXTENSIONS) | {e.lstrip(".").lower() for e in TRAINING_VIDEO_EXTENSIONS})
)

# moviepy 1.0.3 constants: reader buffer, to_soundarray chunk, relaunch distance.
_READER_BUFFER = 200_000
_SOUNDARRAY_CHUNK = 50_000
_SEEK_RELAUNCH = 1_000_000
_INT16_SCALE = 32768.0


# --------------------------------------------------------------------------------------
# clips
# --------------------------------------------------------------------------------------
def list_video_files(root: str | Path) -> list[Path]:
    """Video files under ``root`` in the evaluator's order: names sorted, folders recursed in place.

    A file counts when its name has a dot and its extension (any case) is one of
    :data:`VIDEO_EXTENSIONS`: the evaluator's avi, gif and mp4, and the kinds of training data
    (mkv, mov, webm). A single file is returned as a one-element list.
    """
    root = Path(root)
    if root.is_file():
        return [root]
    if not root.is_dir():
        raise MediaError(f"{root}: no such file or folder")
    found: list[Path] = []
    for name in sorted(p.name for p in root.iterdir()):
        entry = root / name
        if "." in name and name.rsplit(".", 1)[1].lower() in VIDEO_EXTENSIONS:
            found.append(entry)
        elif entry.is_dir():
            found.extend(list_video_files(entry))
    return found


@dataclass(frozen=True)
class Clip:
    """One evaluation clip.

    ``frames`` are indices into the file's decoded frames (presentation order); ``window``
    is the clip's number among the file's windows. ``start_t``/``end_t`` delimit its audio in
    seconds, as the evaluator computes them (float32 values).
    """

    path: Path
    window: int
    frames: tuple[int, ...]
    start_t: float
    end_t: float


def _video_pts(path: Path) -> np.ndarray:
    """Presentation timestamps of the first video stream's packets, sorted (no decoding)."""
    cmd = ffmpeg_command(
        "-i",
        str(path),
        "-map",
        "0:v:0",
        "-c",
        "copy",
        "-f",
        "framemd5",
        "-",
    )
    res = run_tool(cmd)
    if res.returncode != 0:
        raise MediaError(
            f"cannot read the video timestamps of {path}: "
            f"{res.stderr.decode('utf-8', 'replace').strip()[-300:]}"
        )
    pts = []
    for line in res.stdout.decode("ascii", "replace").splitlines():
        if line.startswith("#"):
            continue
        fields = [f.strip() for f in line.split(",")]
        # stream, dts, pts, duration, size, hash
        if len(fields) >= 3 and re.fullmatch(r"-?\d+", fields[2]):
            pts.append(int(fields[2]))
    return np.sort(np.asarray(pts, dtype=np.int64))


def _seconds_f32(frame_number: int, fps: float) -> float:
    # The evaluator divides an int64 tensor by the float fps: a float32 result.
    return (torch.tensor(frame_number, dtype=torch.int64) / fps * 1.0).item()


def _resampled_indices(n_frames: int, native_fps: float, fps: float) -> np.ndarray:
    """Decoded-frame index of each frame at ``fps`` (torchvision VideoClips' resampling)."""
    step = native_fps / fps
    if step.is_integer():
        return np.arange(0, n_frames, int(step), dtype=np.int64)
    count = int(math.floor(n_frames * fps / native_fps))
    return (torch.arange(count, dtype=torch.float32) * step).floor().to(torch.int64).numpy()


def enumerate_clips(
    paths: Iterable[str | Path],
    *,
    clip_frames: int = CLIP_FRAMES,
    fps: float = EVAL_FPS,
    clip_stride: int = 1,
) -> list[Clip]:
    """Every ``clip_frames``-frame window at ``fps`` of each file, files in the given order.

    Windows start every ``clip_stride`` resampled frames (the evaluator uses 1). Files too
    short for one window contribute nothing.
    """
    if clip_stride < 1:
        raise UsageError(f"{{clip_stride}} must be at least 1, got {clip_stride}", params=("clip_stride",))
    clips: list[Clip] = []
    for path in map(Path, paths):
        info = probe(path)
        if not info.has_video or not info.fps:
            raise MediaError(f"{path} has no video stream with a known frame rate")
        pts = _video_pts(path)
        if len(pts) < 2:
            continue
        tick = int(pts[1] - pts[0])  # the evaluator's frame duration: first two timestamps
        if tick <= 0:
            raise MediaError(f"{path}: its first two video frames share a timestamp")
        idx = _resampled_indices(len(pts), info.fps, fps)
        for window, first in enumerate(range(0, len(idx) - clip_frames + 1, clip_stride)):
            frames = idx[first : first + clip_frames]
            first_pid = int(pts[frames[0]] // tick)
            last_pid = int(pts[frames[-1]] // tick)
            clips.append(
                Clip(
                    path,
                    window,
                    tuple(int(i) for i in frames),
                    _seconds_f32(first_pid, info.fps),
                    _seconds_f32(last_pid + 1, info.fps),
                )
            )
    return clips


def loader_batches(
    n_clips: int, num: int, *, seed: int | None = None, batch_size: int = BATCH_SIZE
) -> list[list[int]]:
    """Clip indices of each batch the evaluator processes to collect ``num`` features.

    The order is ``range(n_clips)``, shuffled by ``random.Random(seed)`` when a seed is
    given. Each pass over the clips is cut into batches of ``batch_size`` (the last one
    smaller) and passes repeat until ``num`` clips are covered; the features of the whole
    last batch are computed, then everything is truncated to ``num``.
    """
    if n_clips < 1:
        raise EvalError("no clips to evaluate: the set holds no 16-frame clip")
    if num < 2:
        raise UsageError(f"{{num}} must be at least 2, got {num}", params=("num",))
    order = list(range(n_clips))
    if seed is not None:
        random.Random(seed).shuffle(order)
    epoch = [order[i : i + batch_size] for i in range(0, n_clips, batch_size)]
    batches: list[list[int]] = []
    covered = 0
    while covered < num:
        for batch in epoch:
            if covered >= num:
                break
            batches.append(batch)
            covered += len(batch)
    if any(len(b) == 1 for b in batches):
        raise EvalError(
            f"{n_clips} clips in batches of {batch_size} leave a batch of one clip, which the "
            "audio network (BatchNorm on batch statistics) cannot process: change the number "
            "of clips or {num}",
            params=("num",),
        )
    return batches


# --------------------------------------------------------------------------------------
# video
# --------------------------------------------------------------------------------------
def letterbox(frames: torch.Tensor, size: int = LETTERBOX_SIZE, *, antialias: bool = True) -> torch.Tensor:
    """Fit uint8 (T, 3, H, W) frames in (T, 3, size, size): bicubic, black bars, odd pixel bottom/right.

    The fitted size is ``int(side · min(size/H, size/W))``. Resizing runs in float32, then is
    clamped to [0, 255] and rounded half to even, as torchvision's ``Resize`` does on uint8
    tensors; a frame that already has the fitted size is left untouched.
    """
    if frames.dtype != torch.uint8 or frames.dim() != 4:
        raise ValueError(f"frames must be uint8 (T, C, H, W), got {frames.dtype} {tuple(frames.shape)}")
    h, w = frames.shape[-2:]
    ratio = min(size / h, size / w)
    fit_h, fit_w = int(h * ratio), int(w * ratio)
    if (fit_h, fit_w) != (h, w):
        resized = F.interpolate(
            frames.float(), size=[fit_h, fit_w], mode="bicubic", align_corners=False, antialias=antialias
        )
        frames = resized.clamp(0, 255).round().to(torch.uint8)
    top, left = (size - fit_h) // 2, (size - fit_w) // 2
    out = torch.zeros((*frames.shape[:2], size, size), dtype=torch.uint8)
    out[..., top : top + fit_h, left : left + fit_w] = frames
    return out


def uint8_round_trip(frames: torch.Tensor) -> torch.Tensor:
    """uint8 → [-1, 1] → uint8 in float32 with truncation (maps 1…63 to 0…62)."""
    unit = frames.float() / 127.5 - 1
    return ((unit + 1) * 127.5).clamp(0, 255).to(torch.uint8)


def i3d_input(clips: torch.Tensor, size: int = I3D_SIZE) -> torch.Tensor:
    """uint8 clips (B, T, 3, H, W) → float32 (B, 3, T, size, size) in [-1, 1], I3D's input.

    Bilinear resize of the shorter side to ``size`` (the other side rounded up), centre crop.
    """
    if clips.dtype != torch.uint8 or clips.dim() != 5:
        raise ValueError(f"clips must be uint8 (B, T, C, H, W), got {clips.dtype} {tuple(clips.shape)}")
    out = []
    for clip in clips:
        x = clip.float() / 255.0
        h, w = x.shape[-2:]
        factor = size / min(h, w)
        target = (size, math.ceil(w * factor)) if h < w else (math.ceil(h * factor), size)
        x = F.interpolate(x, size=target, mode="bilinear", align_corners=False)
        top, left = (x.shape[-2] - size) // 2, (x.shape[-1] - size) // 2
        x = x[..., top : top + size, left : left + size].permute(1, 0, 2, 3).contiguous()
        x -= 0.5
        out.append(x)
    return torch.stack(out) * 2


@lru_cache(maxsize=None)
def _passthrough_option() -> tuple[str, str]:
    """ffmpeg's option for one output frame per decoded frame (-vsync left in ffmpeg 9)."""
    cmd = ffmpeg_command(
        "-f",
        "lavfi",
        "-i",
        "nullsrc=d=0.1",
        "-fps_mode",
        "passthrough",
        "-f",
        "null",
        "-",
    )
    ok = run_tool(cmd).returncode == 0
    return ("-fps_mode", "passthrough") if ok else ("-vsync", "passthrough")


def _decode_rgb(path: Path, wanted: set[int]) -> Iterator[tuple[int, np.ndarray]]:
    """Yield (index, uint8 (H, W, 3)) for the wanted decoded frames, stopping after the last."""
    info = probe(path)
    if not info.width or not info.height:
        raise MediaError(f"{path} has no video stream")
    w, h = info.width, info.height
    # One output frame per decoded frame, stored size, no autorotation, BT.601 matrix and
    # bilinear chroma: what PyAV's to_ndarray("rgb24") gives by default.
    cmd = ffmpeg_command(
        "-noautorotate",
        "-i",
        str(path),
        "-map",
        "0:v:0",
        *_passthrough_option(),
        "-vf",
        "scale=in_color_matrix=bt601:flags=bilinear",
        "-f",
        "rawvideo",
        "-pix_fmt",
        "rgb24",
        "-",
    )
    last = max(wanted)
    frame_bytes = w * h * 3
    # Own session, as in media.run_tool: a Ctrl-C reaches only this process.
    proc = subprocess.Popen(
        cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True
    )
    assert proc.stdout is not None and proc.stderr is not None
    try:
        index = 0
        while index <= last:
            buf = proc.stdout.read(frame_bytes)
            if len(buf) < frame_bytes:
                err = proc.stderr.read().decode("utf-8", "replace").strip()
                raise MediaError(
                    f"{path}: decoded {index} frames, clip needs frame {last}"
                    + (f" ({err[-300:]})" if err else "")
                )
            if index in wanted:
                yield index, np.frombuffer(buf, np.uint8).reshape(h, w, 3)
            index += 1
    finally:
        proc.kill()
        proc.stdout.close()
        proc.stderr.close()
        proc.wait()


def read_clip_videos(clips: Sequence[Clip], *, antialias: bool = True) -> list[torch.Tensor]:
    """The uint8 (16, 3, 64, 64) video the evaluator hands to I3D for each clip.

    Each file is decoded once; every needed frame is letterboxed and round-tripped as it
    arrives (both act frame by frame), so memory holds only 64×64 frames.
    """
    by_file: dict[Path, list[int]] = {}
    for i, clip in enumerate(clips):
        by_file.setdefault(clip.path, []).append(i)
    out: list[torch.Tensor | None] = [None] * len(clips)
    for path, members in by_file.items():
        wanted = {f for i in members for f in clips[i].frames}
        small: dict[int, torch.Tensor] = {}
        for index, rgb in _decode_rgb(path, wanted):
            frame = torch.from_numpy(rgb.copy()).permute(2, 0, 1)[None]
            small[index] = uint8_round_trip(letterbox(frame, antialias=antialias))[0]
        for i in members:
            out[i] = torch.stack([small[f] for f in clips[i].frames])
    return out  # type: ignore[return-value]


# --------------------------------------------------------------------------------------
# audio
# --------------------------------------------------------------------------------------
@lru_cache(maxsize=256)
def moviepy_duration(path: str | Path) -> float:
    """The duration moviepy 1.0.3 uses: ffmpeg's "Duration: HH:MM:SS.ss" line, in seconds.

    It follows the ffmpeg in use: for an R-FLAV MP4, ffmpeg 4.2.2 (the evaluator's) and 5.1
    print 24.08 where ffmpeg 9 prints 24.01. Samples at or past it read as silence.
    """
    res = run_tool([find_ffmpeg(), "-hide_banner", "-nostdin", "-i", str(path)])
    text = res.stderr.decode("utf-8", "replace")
    line = next((ln for ln in text.splitlines() if "Duration: " in ln), "")
    found = re.search(r"(\d\d):(\d\d):(\d\d\.\d\d)", line)
    if not found:
        raise MediaError(f"cannot read the duration of {path} from ffmpeg")
    hours, minutes, seconds = (float(g) for g in found.groups())
    return seconds + 60 * minutes + 3600 * hours  # moviepy's summation order


@lru_cache(maxsize=256)
def _has_audio(path: str) -> bool:
    return probe(path).has_audio


class _PcmPipe:
    """The evaluator's audio pipe: s16le stereo at 44.1 kHz from ffmpeg, read on demand."""

    def __init__(self, path: Path, start: float = 0.0) -> None:
        if start != 0:
            # moviepy seeks the input to 1 s before ``start``, then the output 1 s further.
            lead = min(1, start)
            head = ["-ss", "%.05f" % (start - lead), "-i", str(path), "-vn", "-ss", "%.05f" % lead]
        else:
            head = ["-i", str(path), "-vn"]
        cmd = [
            find_ffmpeg(),
            *head,
            "-loglevel",
            "error",
            "-f",
            "s16le",
            "-acodec",
            "pcm_s16le",
            "-ar",
            str(AUDIO_RATE),
            "-ac",
            "2",
            "-",
        ]
        self.proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # as in media.run_tool
        )

    def read(self, n: int) -> np.ndarray:
        assert self.proc.stdout is not None
        raw = self.proc.stdout.read(4 * n) if n > 0 else b""
        pcm = np.frombuffer(raw[: len(raw) // 4 * 4], dtype="<i2").reshape(-1, 2)
        return pcm / _INT16_SCALE

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        assert self.proc.stdout is not None
        self.proc.stdout.close()
        self.proc.wait()


class MoviepyAudioReader:
    """Sample-exact model of moviepy 1.0.3's ``FFMPEG_AudioReader`` at 44.1 kHz, stereo.

    The buffer (200,000 samples, fewer for short files) is re-centred on the requested
    sample when a request leaves it. When the new window overlaps the old one, moviepy keeps
    one old sample too many, so everything in the re-filled buffer is the previous sample.
    Requests more than 1,000,000 samples ahead, or backwards, relaunch ffmpeg with a seek.
    """

    def __init__(self, path: str | Path, *, duration: float | None = None) -> None:
        self.path = Path(path)
        if not _has_audio(str(self.path)):
            raise MediaError(f"{self.path} has no audio stream")
        self.duration = moviepy_duration(str(self.path)) if duration is None else duration
        self.capacity = min(int(AUDIO_RATE * self.duration) + 1, _READER_BUFFER)
        self._pipe = _PcmPipe(self.path)
        self._pos = 0
        self._buf = np.zeros((0, 2))
        self._buf_start = 0
        self._fill_at(1, fresh=True)

    def close(self) -> None:
        self._pipe.close()

    def __enter__(self) -> MoviepyAudioReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _read(self, n: int) -> np.ndarray:
        self._pos += n
        return self._pipe.read(n)

    def _seek(self, target: int) -> None:
        if target < self._pos or target > self._pos + _SEEK_RELAUNCH:
            self._pipe.close()
            self._pipe = _PcmPipe(self.path, target / AUDIO_RATE)
        elif target > self._pos:
            self._pipe.read(target - self._pos)
        self._pos = target

    def _fill_at(self, sample: int, *, fresh: bool = False) -> None:
        start = max(0, sample - self.capacity // 2)
        old_end = self._buf_start + self.capacity
        if not fresh and start < old_end < start + self.capacity:
            kept = old_end - start + 1  # one too many: moviepy's off-by-one
            self._buf = np.concatenate([self._buf[-kept:], self._read(self.capacity - kept)])
        else:
            self._seek(start)
            self._buf = self._read(self.capacity)
        self._buf_start = start

    def samples_at(self, times: np.ndarray) -> np.ndarray:
        """Stereo samples (len(times), 2) at absolute times in seconds (moviepy ``get_frame``)."""
        inside = (times >= 0) & (times < self.duration)
        if not inside.any():
            raise MediaError(
                f"{self.path}: audio requested at {times[0]:.2f}-{times[-1]:.2f} s, "
                f"outside the file ({self.duration:.2f} s)"
            )
        wanted = np.round(AUDIO_RATE * times).astype(int)[inside]
        lo, hi = wanted.min(), wanted.max()
        if not 0 <= lo - self._buf_start < len(self._buf):
            self._fill_at(lo)
        elif not 0 <= hi - self._buf_start < len(self._buf):
            self._fill_at(hi)
        offsets = wanted - self._buf_start
        if len(self._buf) < self.capacity // 2:
            offsets -= self.capacity // 2 - len(self._buf) + 1
        out = np.zeros((len(times), 2))
        try:
            out[inside] = self._buf[offsets]
        except IndexError:
            # moviepy repeats the buffer's last sample past its end
            offsets[offsets >= len(self._buf)] = len(self._buf) - 1
            try:
                out[inside] = self._buf[offsets]
            except IndexError as e:
                raise MediaError(f"{self.path}: cannot read audio at {times[0]:.2f} s") from e
        return out


def clip_audio(clip: Clip, *, samples: int = AUDIO_SAMPLES) -> np.ndarray:
    """float64 (samples,) channel-0 audio of ``clip`` as the evaluator reads it, values k/32768.

    A fresh moviepy reader per clip; ``n = int(44100 · (end_t − start_t))`` samples read in
    chunks of at most 50,000 (positions from ``linspace``), then zero-padded or cut.
    """
    with MoviepyAudioReader(clip.path) as reader:
        if clip.start_t > reader.duration:
            raise MediaError(
                f"{clip.path}: clip starts at {clip.start_t:.2f} s, "
                f"after the end of the file ({reader.duration:.2f} s)"
            )
        length = clip.end_t - clip.start_t
        if length > _SOUNDARRAY_CHUNK / AUDIO_RATE:
            total = int(AUDIO_RATE * length)
            bounds = np.linspace(0, total, total // _SOUNDARRAY_CHUNK + 2, endpoint=True, dtype=int)
            parts = [
                reader.samples_at((1.0 / AUDIO_RATE) * np.arange(a, b) + clip.start_t)
                for a, b in zip(bounds[:-1], bounds[1:])
            ]
            stereo = np.concatenate(parts)
        else:
            stereo = reader.samples_at(np.arange(0, length, 1.0 / AUDIO_RATE) + clip.start_t)
    out = np.zeros(samples)
    n = min(samples, len(stereo))
    out[:n] = stereo[:n, 0]
    return out


def scale_audio(wave: torch.Tensor) -> torch.Tensor:
    """AudioCLIP's front-end ``scale``: ``((x + 32768)·2)/65535 − 1`` in float32, in this order.

    Meant for int16 values but applied to [-1, 1] audio, it yields ≈ (x + 0.5)/32767.5: a DC
    offset of half full scale, and float32 rounding of ``x + 32768`` leaves 641 levels.
    """
    x = wave.to(torch.float32)
    return (x + 32768.0) * 2.0 / 65535.0 - 1.0


# --------------------------------------------------------------------------------------
# features and scores
# --------------------------------------------------------------------------------------
def compute_features(
    clips: Sequence[Clip],
    batches: Sequence[Sequence[int]],
    num: int,
    video_features: Callable[[torch.Tensor], torch.Tensor] | None,
    audio_features: Callable[[torch.Tensor], torch.Tensor] | None,
    *,
    antialias: bool = True,
    scale_audio_input: bool = False,
    video_batch: int = BATCH_SIZE,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Video (num, 400) and audio (num, 1024) features of one set, in loader order.

    ``batches`` come from :func:`loader_batches`. ``video_features`` gets float32
    (B, 3, 16, 224, 224) in [-1, 1] (:func:`i3d_input`); clips are grouped by file for
    decoding, as I3D in eval mode does not depend on its batch. ``audio_features`` gets each
    loader batch as the evaluator hands it to AudioCLIP: float64 (B, 70560) waveforms in
    [-1, 1], which the network rescales itself (:func:`scale_audio`); with
    ``scale_audio_input`` it gets float32 (B, 70560) already rescaled instead.
    ``progress(done, total)`` is called after each audio batch. Without ``video_features``
    no frame is decoded and the video features come back empty, (num, 0); without
    ``audio_features`` no audio is read and the audio features come back empty, (num, 0).
    """
    order = [i for b in batches for i in b][:num]
    if video_features is None:
        video = torch.zeros(len(order), 0)
    else:
        needed = sorted({i for b in batches for i in b})
        video_out: dict[int, torch.Tensor] = {}
        for start in range(0, len(needed), 64):  # bounded memory: 64 clips of 64×64 at a time
            chunk = needed[start : start + 64]
            videos = read_clip_videos([clips[i] for i in chunk], antialias=antialias)
            for s in range(0, len(chunk), video_batch):
                with torch.no_grad():
                    feats = video_features(i3d_input(torch.stack(videos[s : s + video_batch])))
                for j, f in zip(chunk[s : s + video_batch], feats):
                    video_out[j] = f.detach().float().cpu()
        video = torch.stack([video_out[i] for i in order])
    if audio_features is None:
        return video, torch.zeros(len(order), 0)
    audio_rows: list[torch.Tensor] = []
    for done, batch in enumerate(batches, 1):
        waves = torch.from_numpy(np.stack([clip_audio(clips[i]) for i in batch]))
        with torch.no_grad():
            feats = audio_features(scale_audio(waves) if scale_audio_input else waves)
        audio_rows.extend(f.detach().float().cpu() for f in feats)
        if progress is not None:
            progress(done, len(batches))
    return video, torch.stack(audio_rows[:num])


def mmdiffusion_scores(
    fake_video: torch.Tensor,
    real_video: torch.Tensor,
    fake_audio: torch.Tensor,
    real_audio: torch.Tensor,
) -> dict[str, float]:
    """``{"fvd", "kvd", "fad"}`` from float32 features, as the evaluator reports them."""
    return {
        "fvd": frechet_distance(fake_video, real_video).item(),
        "kvd": polynomial_mmd(fake_video, real_video),
        "fad": frechet_distance(fake_audio, real_audio).item() * FAD_SCALE,
    }
