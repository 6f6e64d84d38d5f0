"""Training data for ``rflav train`` and ``rflav prepare``.

Layout: ``DATA/<split>/[CLASS/]**/*.{mp4,mkv,webm,avi,mov}``. With class subfolders, the class
names are the sorted names of the subfolders that hold videos (labels 0..K-1, videos found
recursively below each); without them the split is unlabelled (label -1).

* :func:`scan_dataset` probes every video once (frame count at 10 fps, audio present, first
  timestamp) and keeps the result in ``<split>/.rflav-index.json`` keyed by relative path,
  size and mtime, so a rescan probes only new or changed files. Unreadable files and, unless
  asked to treat them as silence, videos without audio are skipped and reported, never fatal.
* :class:`VideoClipDataset` decodes W-frame clips from the raw videos (accurate ffmpeg seek,
  the same letterbox as :func:`rflav_cli.media.read_video_frames`).
* :func:`prepare_cache` encodes every frame once with the SD-VAE into safetensors shards and
  :class:`LatentClipDataset` reads clips from them lazily.

Audio design: the mel of a video is computed ONCE over its whole audio track (peak-normalised
over the track, :func:`rflav_cli.audio.log_mel`) and then cut into per-frame columns; a clip of
W frames starting at frame ``start`` takes columns ``10·start … 10·(start+W)−1``. There is no
per-clip normalisation, which keeps the raw and cached modes identical and matches streaming
generation. The audio track is cut or zero-padded to ``frames · 1600`` samples, sample 0 at the
first video frame; a video without audio (kept with ``missing_audio="silence"``) gets the mel of
an all-zero waveform. The cache stores the scale-free model-space mel ``s ∈ [-1, 1]``
(``normalize_log_mel(log_mel, 1)``); the datasets return ``audio_scale · s``.

Latent cache (``prepare_cache``), format version 1:

* ``index.json``: ``format`` ("rflav-latent-cache"), ``version``, ``split``, ``source``,
  ``image_size``, ``latent_scale``, ``latent_shape`` [C, h, w], ``autoencoder`` (id or null),
  ``class_names``, ``complete`` and ``videos``: a list of {``path``, ``label``, ``frames``,
  ``has_audio``, ``size``, ``mtime_ns``, ``shard``} where ``shard`` is null until encoded.
* ``videos/NNNNN.safetensors`` (one per video): ``mean`` and ``std`` float32 (F, C, h, w), the
  encoder posterior (unscaled), and ``mel`` float32 (256, 10·F), the scale-free mel. Float32 is
  kept: at 256×256 a frame costs 32 KiB of latents plus 10 KiB of mel.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import re
import threading
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import ffmpeg
import numpy as np
import torch
import torch.nn.functional as F
from rich.progress import Progress
from safetensors import safe_open
from torch.utils.data import Dataset

from . import audio as audio_lib
from . import media
from .config import (
    FPS,
    HOP_LENGTH,
    IMAGE_SIZE,
    LATENT_SCALE,
    LOG_MEL_MIN,
    MEL_FRAMES_PER_FRAME,
    N_FFT,
    N_MELS,
    SAMPLES_PER_FRAME,
    WIN_LENGTH,
)
from .errors import RflavError
from .files import atomic_write
from .hub import recorded_name
from .progress import progress_bar
from .tensorfiles import save_safetensors

__all__ = [
    "CACHE_INDEX",
    "INDEX_FILE",
    "VIDEO_EXTENSIONS",
    "DataError",
    "DatasetIndex",
    "LatentClipDataset",
    "VideoClipDataset",
    "VideoEntry",
    "estimate_audio_scale",
    "frames_to_tensor",
    "is_latent_cache",
    "open_training_data",
    "prepare_cache",
    "probe_video",
    "read_clip",
    "scan_dataset",
    "video_mel",
]

VIDEO_EXTENSIONS = (".mp4", ".mkv", ".webm", ".avi", ".mov")
INDEX_FILE = ".rflav-index.json"
INDEX_VERSION = 1
CACHE_INDEX = "index.json"
CACHE_FORMAT = "rflav-latent-cache"
CACHE_VERSION = 1
CACHE_ENV = "RFLAV_CACHE"
# Input seeks land this far before the wanted frame, so the fps filter sees the same source
# frames around the clip start as a decode from the beginning would.
SEEK_MARGIN_S = 1.0
# Whole-track mels kept per process: a video serves many consecutive clips.
MEL_CACHE_SIZE = 8
# Long tracks get their STFT in pieces of this many columns (bounded memory, same values).
MEL_CHUNK_COLUMNS = 2000

SKIP_UNREADABLE = "unreadable"
SKIP_NO_AUDIO = "no audio"
SKIP_NO_VIDEO = "no video"
SKIP_OUTSIDE_CLASSES = "outside class folders"


class DataError(RflavError, ValueError):
    """The training data cannot be used as given; the message says what to fix."""


# --------------------------------------------------------------------------------------
# index
# --------------------------------------------------------------------------------------
@dataclass
class VideoEntry:
    """One usable video of a split.

    ``path`` is relative to the split folder; ``frames`` counts frames at 10 fps exactly as
    the clip reader delivers them; ``start_pts`` is the first decoded frame's timestamp in the
    stream time base (None: unknown, clips are then decoded from the beginning).
    """

    path: str
    label: int
    frames: int
    has_audio: bool
    size: int
    mtime_ns: int
    start_pts: int | None = None


@dataclass
class DatasetIndex:
    """The usable videos of ``root/split``, their class names and what was skipped (reason → paths)."""

    root: Path
    split: str
    videos: list[VideoEntry]
    class_names: list[str]
    skipped: dict[str, list[str]] = field(default_factory=dict)

    @property
    def folder(self) -> Path:
        return Path(self.root) / self.split

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def video_path(self, i: int) -> Path:
        return self.folder / self.videos[i].path

    def clips(self, window: int, stride: int = 1) -> list[tuple[int, int]]:
        """(video index, start frame) of every window with ``start + window ≤ frames``, every
        ``stride`` frames."""
        return _clips([v.frames for v in self.videos], window, stride)

    def summary(self, window: int | None = None, stride: int = 1) -> str:
        """One line: videos, clips (or frames without ``window``), classes, skipped by reason."""
        parts = [f"{len(self.videos)} videos"]
        if window is None:
            parts.append(f"{sum(v.frames for v in self.videos)} frames")
        else:
            parts.append(f"{len(self.clips(window, stride))} clips of {window} frames")
        parts.append(f"{len(self.class_names)} classes" if self.class_names else "unlabelled")
        text = f"{self.folder}: " + ", ".join(parts)
        n_skipped = sum(len(v) for v in self.skipped.values())
        if n_skipped:
            reasons = ", ".join(f"{reason}: {len(paths)}" for reason, paths in sorted(self.skipped.items()))
            text += f"; skipped {n_skipped} ({reasons})"
        return text

    def no_clips_message(self, window: int) -> str:
        """Why no clip of `window` frames exists: too short, or every video skipped (and why)."""
        short = (
            f"no video in {self.folder} has at least {window} frames at {FPS} fps "
            f"(a {window}-frame window needs {window / FPS:g} s)"
        )
        if not self.videos and self.skipped:
            return self.no_videos_message()
        n_skipped = sum(len(v) for v in self.skipped.values())
        if not n_skipped:
            return short
        reasons = ", ".join(f"{reason}: {len(paths)}" for reason, paths in sorted(self.skipped.items()))
        return f"{short}; {n_skipped} more were skipped ({reasons})"

    def no_videos_message(self) -> str:
        """Why the index holds no video: every file was skipped, by reason."""
        n_skipped = sum(len(v) for v in self.skipped.values())
        reasons = ", ".join(f"{reason}: {len(paths)}" for reason, paths in sorted(self.skipped.items()))
        hint = ""
        if self.skipped.get(SKIP_NO_AUDIO):
            hint = "; --missing-audio silence keeps videos without sound"
        return f"no usable video in {self.folder}: all {n_skipped} were skipped ({reasons}){hint}"


def _clips(frames: list[int], window: int, stride: int) -> list[tuple[int, int]]:
    if window < 1 or stride < 1:
        raise ValueError(f"window and stride must be ≥ 1, got window={window}, stride={stride}")
    return [(i, s) for i, n in enumerate(frames) for s in range(0, n - window + 1, stride)]


def _progress(enabled: bool) -> Progress:
    return progress_bar(enabled=enabled)


def _is_video(p: Path) -> bool:
    return p.is_file() and p.suffix.lower() in VIDEO_EXTENSIONS and not p.name.startswith(".")


def _videos_below(folder: Path) -> list[Path]:
    """Video files below ``folder``, recursively, skipping hidden files and folders."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found.extend(p for p in (Path(dirpath) / f for f in filenames) if _is_video(p))
    return sorted(found)


def _first_pts(path: Path) -> int | None:
    """Timestamp of the first decoded video frame, as the filter graph sees it with -copyts."""
    cmd = [
        media.find_ffmpeg(),
        "-hide_banner",
        "-nostdin",
        "-copyts",
        "-i",
        str(path),
        "-map",
        "0:V:0",
        "-frames:v",
        "1",
        "-vf",
        "showinfo",
        "-f",
        "null",
        "-",
    ]
    res = media.run_tool(cmd)
    m = re.search(rb"showinfo[^\]]*\] n: *0 pts: *(-?\d+)", res.stderr)
    return int(m.group(1)) if res.returncode == 0 and m else None


def _audio_decodes(path: Path) -> bool:
    cmd = media.ffmpeg_command("-i", str(path), "-map", "0:a:0", "-f", "null", "-")
    res = media.run_tool(cmd)
    return res.returncode == 0


def probe_video(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Probe one file: ``{"frames", "has_audio", "start_pts"}``, or ``{"skip": reason, "error": text}``.

    The whole video is decoded once to count its frames at 10 fps, so the count is exactly
    what the clip reader can deliver; the audio track, if any, is decoded to check it.
    """
    p = Path(path)
    try:
        info = media.probe(p)
        if not info.has_video:
            return {"skip": SKIP_NO_VIDEO, "error": f"{p} has no video stream"}
        frames = media.count_frames(p, fps=FPS)
    except media.DecoderKilled:
        raise  # nothing learnt about the file: not to be recorded as unreadable
    except media.MediaError as e:
        return {"skip": SKIP_UNREADABLE, "error": str(e)}
    if frames < 1:
        return {"skip": SKIP_UNREADABLE, "error": f"{p}: no video frame could be decoded"}
    if info.has_audio and not _audio_decodes(p):
        return {"skip": SKIP_UNREADABLE, "error": f"{p}: the audio track cannot be decoded"}
    return {"frames": frames, "has_audio": info.has_audio, "start_pts": _first_pts(p)}


def _fallback_index_path(folder: Path) -> Path:
    base = Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "rflav")
    key = hashlib.sha256(str(folder.resolve()).encode()).hexdigest()[:16]
    return base / "index" / f"{key}.json"


def _write_json_atomic(path: Path, obj: Any) -> None:
    text = json.dumps(obj, indent=1, sort_keys=True) + "\n"
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def _load_index_cache(folder: Path) -> dict[str, dict[str, Any]]:
    for path in (folder / INDEX_FILE, _fallback_index_path(folder)):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and data.get("version") == INDEX_VERSION:
            return dict(data.get("entries", {}))
    return {}


def _save_index_cache(folder: Path, entries: dict[str, dict[str, Any]]) -> Path:
    """Write the probe cache in the split folder, or in the user cache if that is read-only."""
    data = {"version": INDEX_VERSION, "folder": str(folder.resolve()), "entries": entries}
    try:
        _write_json_atomic(folder / INDEX_FILE, data)
        return folder / INDEX_FILE
    except OSError:
        fallback = _fallback_index_path(folder)
        fallback.parent.mkdir(parents=True, exist_ok=True)
        _write_json_atomic(fallback, data)
        return fallback


def scan_dataset(
    root: str | os.PathLike[str],
    split: str = "train",
    *,
    missing_audio: str = "skip",
    progress: bool = True,
    workers: int | None = None,
) -> DatasetIndex:
    """Index the videos of ``root/split`` (probing only files new or changed since the last scan).

    ``missing_audio``: "skip" drops videos without an audio track (reason "no audio"),
    "silence" keeps them with silent audio. Unreadable files are skipped (reason "unreadable").
    """
    if missing_audio not in ("skip", "silence"):
        raise ValueError(f"missing_audio must be 'skip' or 'silence', got {missing_audio!r}")
    root = Path(root)
    folder = root / split
    if not folder.is_dir():
        raise DataError(f"{folder} is not a folder: expected videos under DATA/{split}/[CLASS/]")
    subfolders = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    per_class = {d.name: _videos_below(d) for d in subfolders}
    class_names = [name for name, files in per_class.items() if files]
    loose = sorted(p for p in folder.iterdir() if _is_video(p))
    skipped: dict[str, list[str]] = {}
    candidates: list[tuple[Path, int]] = []
    if class_names:
        for label, name in enumerate(class_names):
            candidates += [(p, label) for p in per_class[name]]
        if loose:
            skipped[SKIP_OUTSIDE_CLASSES] = [p.name for p in loose]
    else:
        candidates = [(p, -1) for p in loose]
    if not candidates:
        raise DataError(
            f"no video files ({', '.join(VIDEO_EXTENSIONS)}) in {folder}: put them in "
            f"{folder}/ or in class subfolders {folder}/CLASS/"
        )

    cached = _load_index_cache(folder)
    entries: dict[str, dict[str, Any]] = {}
    todo: list[tuple[str, Path, os.stat_result]] = []
    for p, _ in candidates:
        rel = p.relative_to(folder).as_posix()
        st = p.stat()
        old = cached.get(rel)
        if old and old.get("size") == st.st_size and old.get("mtime_ns") == st.st_mtime_ns:
            entries[rel] = old
        else:
            todo.append((rel, p, st))
    changed = bool(todo) or set(entries) != set(cached)
    try:
        if todo:
            with (
                _progress(progress) as bar,
                ThreadPoolExecutor(workers or min(8, os.cpu_count() or 1)) as pool,
            ):
                task = bar.add_task(f"Scanning {folder.name}", total=len(todo))
                for (rel, _, st), result in zip(todo, pool.map(lambda t: probe_video(t[1]), todo)):
                    entries[rel] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, **result}
                    bar.advance(task)
    finally:
        # Saved even when interrupted, so that a rescan resumes where this one stopped.
        if changed:
            _save_index_cache(folder, entries)

    videos = []
    for p, label in candidates:
        rel = p.relative_to(folder).as_posix()
        e = entries[rel]
        reason = e.get("skip") or (SKIP_NO_AUDIO if not e["has_audio"] and missing_audio == "skip" else None)
        if reason:
            skipped.setdefault(reason, []).append(rel)
            continue
        videos.append(
            VideoEntry(
                path=rel,
                label=label,
                frames=int(e["frames"]),
                has_audio=bool(e["has_audio"]),
                size=int(e["size"]),
                mtime_ns=int(e["mtime_ns"]),
                start_pts=e.get("start_pts"),
            )
        )
    return DatasetIndex(root=root, split=split, videos=videos, class_names=class_names, skipped=skipped)


# --------------------------------------------------------------------------------------
# decoding
# --------------------------------------------------------------------------------------
def read_clip(
    path: str | os.PathLike[str],
    start: int,
    count: int,
    *,
    image_size: int = IMAGE_SIZE,
    start_pts: int | None = None,
) -> np.ndarray:
    """Frames ``start … start+count−1`` at 10 fps, letterboxed: uint8 (count, S, S, 3) RGB.

    Equal to the same frames of :func:`rflav_cli.media.read_video_frames`. With ``start_pts``
    (the first frame's timestamp, see :func:`probe_video`) the input is seeked to just before
    the clip; timestamps are kept (-copyts) so the fps filter selects the same source frames.
    """
    p = Path(path)
    seek = start / FPS - SEEK_MARGIN_S
    if start_pts is not None and seek > 0:
        stream = ffmpeg.input(str(p), ss=f"{seek:.6f}")["V:0"].filter("setpts", f"PTS-{start_pts}")
    else:
        stream = ffmpeg.input(str(p))["V:0"].filter("setpts", "PTS-STARTPTS")
    # Output timestamps of the fps filter are frame numbers (time base 1/FPS).
    stream = (
        stream.filter("fps", fps=FPS)
        .filter("trim", start_pts=start, end_pts=start + count)
        .filter("setpts", "PTS-STARTPTS")
    )
    out = media.letterbox(stream, image_size).output(
        "pipe:", format="rawvideo", pix_fmt="rgb24", vframes=count
    )
    res = media.run_tool(out.compile(cmd=media.ffmpeg_command("-copyts")))
    frame_bytes = image_size * image_size * 3
    got = len(res.stdout) // frame_bytes
    if res.returncode != 0 or got < count:
        why = res.stderr.decode("utf-8", "replace").strip().splitlines()
        raise media.MediaError(
            f"cannot read frames {start}..{start + count - 1} of {p} (got {got}): "
            f"{why[-1] if why else 'video shorter than indexed; delete its index and rescan'}"
        )
    # A writable copy: torch refuses to wrap read-only buffers without a warning.
    return (
        np.frombuffer(res.stdout, np.uint8, count * frame_bytes)
        .reshape(count, image_size, image_size, 3)
        .copy()
    )


def frames_to_tensor(frames: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) → float32 (N, 3, H, W) in [-1, 1] (x / 127.5 − 1)."""
    return torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def _track_log_mel(wav: torch.Tensor, chunk_columns: int = MEL_CHUNK_COLUMNS) -> torch.Tensor:
    """:func:`rflav_cli.audio.log_mel` of a whole track, the STFT done ``chunk_columns`` at a time."""
    columns = wav.shape[-1] // HOP_LENGTH
    if columns <= chunk_columns:
        return audio_lib.log_mel(wav)
    # Same steps as log_mel (peak normalisation over the whole track, reflect padding), with
    # the frames of the no-centre STFT taken in slices so memory stays bounded.
    x = F.pad(audio_lib.peak_normalize(wav)[None, None], (audio_lib.PAD, audio_lib.PAD), mode="reflect")[0, 0]
    window = torch.hann_window(WIN_LENGTH, dtype=x.dtype)
    fb = audio_lib.mel_filterbank(dtype=x.dtype)
    out = torch.empty(N_MELS, columns, dtype=x.dtype)
    for c0 in range(0, columns, chunk_columns):
        c1 = min(c0 + chunk_columns, columns)
        seg = x[c0 * HOP_LENGTH : (c1 - 1) * HOP_LENGTH + N_FFT]
        spec = torch.view_as_real(
            torch.stft(
                seg,
                N_FFT,
                hop_length=HOP_LENGTH,
                win_length=WIN_LENGTH,
                window=window,
                center=False,
                return_complex=True,
            )
        )
        magnitude = torch.sqrt(spec.pow(2).sum(-1) + audio_lib.MAGNITUDE_EPS)
        out[:, c0:c1] = torch.log(torch.clamp(fb @ magnitude, min=LOG_MEL_MIN))
    return out


def video_mel(path: str | os.PathLike[str], frames: int, has_audio: bool = True) -> torch.Tensor:
    """Scale-free model-space mel ``s`` of a whole video: float32 (256, 10·frames) in [-1, 1].

    The first audio channel at 16 kHz, cut or zero-padded to ``frames · 1600`` samples, or
    silence when ``has_audio`` is False.
    """
    n = frames * SAMPLES_PER_FRAME
    wav = torch.zeros(n)
    if has_audio:
        track = torch.from_numpy(media.read_audio(path))[:n]
        wav[: track.shape[0]] = track
    return audio_lib.normalize_log_mel(_track_log_mel(wav), 1.0).contiguous()


@functools.lru_cache(maxsize=MEL_CACHE_SIZE)
def _cached_video_mel(path: str, size: int, mtime_ns: int, frames: int, has_audio: bool) -> torch.Tensor:
    return video_mel(path, frames, has_audio)


def _mel_clip(mel: torch.Tensor, start: int, window: int, audio_scale: float) -> torch.Tensor:
    cols = mel[:, start * MEL_FRAMES_PER_FRAME : (start + window) * MEL_FRAMES_PER_FRAME]
    return audio_lib.mel_to_frames(cols * audio_scale).contiguous()


class VideoClipDataset(Dataset):
    """W-frame clips decoded from raw videos.

    Item: ``video`` float32 (W, 3, S, S) in [-1, 1]; ``audio`` float32 (W, 1, 256, 10) in model
    space (``audio_scale · s``); ``label`` int64 scalar tensor (−1 when unlabelled).
    """

    def __init__(
        self,
        index: DatasetIndex,
        window: int,
        *,
        image_size: int = IMAGE_SIZE,
        audio_scale: float = 1.0,
        stride: int = 1,
        keep_frames_mb: float = 2048,
    ) -> None:
        self.index = index
        self.window = window
        self.image_size = image_size
        self.audio_scale = float(audio_scale)
        self.stride = stride
        self.class_names = list(index.class_names)
        self.clips = index.clips(window, stride)
        if not self.clips:
            raise DataError(index.no_clips_message(window))
        # A small dataset is decoded once and kept in memory (every clip reuses its video's
        # frames); a large one decodes each clip with a seek.
        per_frame = image_size * image_size * 3 + N_MELS * MEL_FRAMES_PER_FRAME * 4  # pixels + mel bytes
        total_mb = sum(v.frames for v in index.videos) * per_frame / 2**20
        self._keep = total_mb <= keep_frames_mb
        self._frames: dict[int, np.ndarray] = {}
        self._mels: dict[int, torch.Tensor] = {}
        self._lock = threading.Lock()

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def _clip_frames(self, vi: int, start: int) -> np.ndarray:
        v = self.index.videos[vi]
        path = self.index.video_path(vi)
        if not self._keep:
            return read_clip(path, start, self.window, image_size=self.image_size, start_pts=v.start_pts)
        frames = self._frames.get(vi)
        if frames is None:
            frames = read_clip(path, 0, v.frames, image_size=self.image_size, start_pts=v.start_pts)
            with self._lock:
                frames = self._frames.setdefault(vi, frames)
        return frames[start : start + self.window]

    def __len__(self) -> int:
        return len(self.clips)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        vi, start = self.clips[i]
        v = self.index.videos[vi]
        path = self.index.video_path(vi)
        frames = self._clip_frames(vi, start)
        mel = self._mels.get(vi) if self._keep else None
        if mel is None:
            mel = _cached_video_mel(str(path), v.size, v.mtime_ns, v.frames, v.has_audio)
            if self._keep:
                with self._lock:
                    mel = self._mels.setdefault(vi, mel)
        return {
            "video": frames_to_tensor(frames),
            "audio": _mel_clip(mel, start, self.window, self.audio_scale),
            "label": torch.tensor(v.label, dtype=torch.int64),
        }


# --------------------------------------------------------------------------------------
# latent cache
# --------------------------------------------------------------------------------------
def _autoencoder_fingerprint(model: torch.nn.Module) -> str:
    """Cheap identity of the weights, so a resumed cache never mixes two autoencoders."""
    h = hashlib.sha256(json.dumps(getattr(model, "config", {}), sort_keys=True, default=str).encode())
    with torch.no_grad():
        for name, p in model.state_dict().items():
            h.update(f"{name}:{tuple(p.shape)}:{p.double().sum().item():.12e}".encode())
    return h.hexdigest()[:16]


def _shard_source(v: VideoEntry, image_size: int, fingerprint: str) -> dict[str, str]:
    """What a shard was made from; a mismatch means it must be encoded again."""
    return {
        "path": v.path,
        "size": str(v.size),
        "mtime_ns": str(v.mtime_ns),
        "frames": str(v.frames),
        "has_audio": str(v.has_audio),
        "image_size": str(image_size),
        "autoencoder": fingerprint,
    }


def _shard_is_current(path: Path, source: dict[str, str]) -> bool:
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
    except Exception:  # missing, truncated or not a safetensors file: encode again
        return False
    return all(meta.get(k) == val for k, val in source.items())


def _encode_video(
    path: Path,
    v: VideoEntry,
    autoencoder: torch.nn.Module,
    image_size: int,
    batch_size: int,
    device: torch.device,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    means, stds, batch = [], [], []

    def flush() -> None:
        x = frames_to_tensor(np.stack(batch)).to(device=device, dtype=dtype)
        posterior = autoencoder.encode(x)
        means.append(posterior.mean.float().cpu())
        stds.append(posterior.std.float().cpu())
        batch.clear()

    with torch.inference_mode():
        for frame in media.read_video_frames(path, fps=FPS, size=image_size):
            batch.append(frame)
            if len(batch) == batch_size:
                flush()
        if batch:
            flush()
    mean, std = torch.cat(means), torch.cat(stds)
    if mean.shape[0] != v.frames:
        raise DataError(
            f"{path} gave {mean.shape[0]} frames, the index says {v.frames}: "
            f"delete {INDEX_FILE} in its split folder and run again"
        )
    return mean, std


def prepare_cache(
    index: DatasetIndex,
    out_dir: str | os.PathLike[str],
    autoencoder: torch.nn.Module,
    *,
    batch_size: int = 16,
    device: str | torch.device = "cpu",
    progress: bool = True,
    image_size: int = IMAGE_SIZE,
    autoencoder_id: str | None = None,
) -> Path:
    """Encode every frame of every video once; write shards and ``index.json`` to ``out_dir``.

    Resumable: a rerun keeps each shard that was made from the same file (size, mtime) with
    the same image size and autoencoder weights, and encodes only the rest. ``autoencoder``
    is moved to ``device``. Returns ``out_dir``.
    """
    if not index.videos and index.skipped:
        raise DataError(index.no_videos_message())
    out = Path(out_dir)
    shards = out / "videos"
    shards.mkdir(parents=True, exist_ok=True)
    for stale in shards.glob(".*.tmp"):  # left by an interrupted run
        stale.unlink(missing_ok=True)
    device = torch.device(device)
    autoencoder = autoencoder.to(device).eval()
    dtype = next(autoencoder.parameters()).dtype
    fingerprint = _autoencoder_fingerprint(autoencoder)
    records = [{**asdict(v), "shard": None} for v in index.videos]
    for r in records:
        r.pop("start_pts")
    header = {
        "format": CACHE_FORMAT,
        "version": CACHE_VERSION,
        "split": index.split,
        "source": str(Path(index.root).resolve() / index.split),
        "image_size": image_size,
        "latent_scale": LATENT_SCALE,
        "latent_shape": None,
        "autoencoder": recorded_name(autoencoder_id) if autoencoder_id else None,
        "class_names": list(index.class_names),
        "complete": False,
        "videos": records,
    }

    def shard_name(i: int) -> str:
        return f"videos/{i:05d}.safetensors"

    todo = []
    for i, v in enumerate(index.videos):
        if _shard_is_current(out / shard_name(i), _shard_source(v, image_size, fingerprint)):
            records[i]["shard"] = shard_name(i)
        else:
            todo.append(i)
    done = [r for r in records if r["shard"]]
    if done:
        with safe_open(str(out / done[0]["shard"]), "pt") as f:
            header["latent_shape"] = list(f.get_slice("mean").get_shape()[1:])
    _write_json_atomic(out / CACHE_INDEX, header)

    with _progress(progress) as bar:
        task = bar.add_task("Encoding frames", total=sum(index.videos[i].frames for i in todo))
        for i in todo:
            v = index.videos[i]
            path = index.video_path(i)
            mean, std = _encode_video(path, v, autoencoder, image_size, batch_size, device, dtype)
            mel = video_mel(path, v.frames, v.has_audio)
            save_safetensors(
                {"mean": mean.contiguous(), "std": std.contiguous(), "mel": mel},
                out / shard_name(i),
                metadata=_shard_source(v, image_size, fingerprint),
            )
            records[i]["shard"] = shard_name(i)
            header["latent_shape"] = list(mean.shape[1:])
            _write_json_atomic(out / CACHE_INDEX, header)
            bar.advance(task, v.frames)
    referenced = {out / r["shard"] for r in records}
    for old in shards.glob("*.safetensors"):  # videos no longer in the split
        if old not in referenced:
            old.unlink()
    header["complete"] = True
    _write_json_atomic(out / CACHE_INDEX, header)
    return out


def is_latent_cache(path: str | os.PathLike[str]) -> bool:
    """True when ``path/index.json`` is a latent cache written by :func:`prepare_cache`."""
    try:
        return json.loads((Path(path) / CACHE_INDEX).read_text()).get("format") == CACHE_FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def _read_cache_index(cache_dir: Path) -> dict[str, Any]:
    if not is_latent_cache(cache_dir):
        raise DataError(
            f"{cache_dir} is not a latent cache (no {CACHE_INDEX}): create it with `rflav prepare`"
        )
    header = json.loads((cache_dir / CACHE_INDEX).read_text())
    if header.get("version") != CACHE_VERSION:
        raise DataError(
            f"{cache_dir} is a latent cache of format version {header.get('version')}, "
            f"this rflav reads version {CACHE_VERSION}: run `rflav prepare` again"
        )
    if not header.get("complete"):
        raise DataError(f"the latent cache {cache_dir} is incomplete: run `rflav prepare` again to finish it")
    return header


class LatentClipDataset(Dataset):
    """W-frame clips from a latent cache (shards opened lazily, only the clip's rows read).

    Item: ``video`` float32 (W, C, h, w) = (mean + std·ε if ``sample`` else mean) · 0.18215;
    ``audio`` float32 (W, 1, 256, 10) in model space; ``label`` int64 scalar tensor.
    ε comes from ``generator`` when given (for single-process determinism; DataLoader workers
    would each copy it), else from torch's global RNG.
    """

    def __init__(
        self,
        cache_dir: str | os.PathLike[str],
        window: int,
        *,
        audio_scale: float = 1.0,
        stride: int = 1,
        sample: bool = True,
        generator: torch.Generator | None = None,
    ) -> None:
        self.cache_dir = Path(cache_dir)
        header = _read_cache_index(self.cache_dir)
        self.window = window
        self.audio_scale = float(audio_scale)
        self.stride = stride
        self.sample = sample
        self.generator = generator
        self.class_names: list[str] = list(header["class_names"])
        self.image_size: int = int(header["image_size"])
        self.latent_shape: tuple[int, ...] = tuple(header["latent_shape"] or ())
        self.autoencoder: str | None = header.get("autoencoder")
        self.videos: list[dict[str, Any]] = header["videos"]
        self.clips = _clips([int(v["frames"]) for v in self.videos], window, stride)
        if not self.clips:
            raise DataError(f"no video in the latent cache {self.cache_dir} has at least {window} frames")

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self.clips)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        vi, start = self.clips[i]
        v = self.videos[vi]
        end = start + self.window
        with safe_open(str(self.cache_dir / v["shard"]), "pt") as f:
            mean = f.get_slice("mean")[start:end]
            std = f.get_slice("std")[start:end] if self.sample else None
            mel = f.get_slice("mel")[:, start * MEL_FRAMES_PER_FRAME : end * MEL_FRAMES_PER_FRAME]
        latent = mean
        if std is not None:
            latent = mean + std * torch.randn(mean.shape, generator=self.generator, dtype=mean.dtype)
        return {
            "video": (latent * LATENT_SCALE).float(),
            "audio": _mel_clip(mel.float(), 0, self.window, self.audio_scale),
            "label": torch.tensor(int(v["label"]), dtype=torch.int64),
        }


# --------------------------------------------------------------------------------------
# helpers for training
# --------------------------------------------------------------------------------------
def open_training_data(
    path: str | os.PathLike[str],
    split: str = "train",
    window: int = 10,
    *,
    image_size: int = IMAGE_SIZE,
    audio_scale: float = 1.0,
    stride: int = 1,
    sample: bool = True,
    generator: torch.Generator | None = None,
    missing_audio: str = "skip",
    progress: bool = True,
) -> VideoClipDataset | LatentClipDataset:
    """A latent cache when ``path`` (or ``path/split``) holds one, else the raw videos of ``path/split``.

    With a cache, ``image_size`` is the cache's own and ``missing_audio`` does not apply.
    """
    path = Path(path)
    for candidate in (path, path / split):
        if is_latent_cache(candidate):
            return LatentClipDataset(
                candidate, window, audio_scale=audio_scale, stride=stride, sample=sample, generator=generator
            )
    index = scan_dataset(path, split, missing_audio=missing_audio, progress=progress)
    return VideoClipDataset(index, window, image_size=image_size, audio_scale=audio_scale, stride=stride)


def _mels_of(data: Any, max_videos: int | None) -> Iterator[torch.Tensor]:
    if isinstance(data, (str, os.PathLike)):
        data = LatentClipDataset(data, 1)
    if isinstance(data, VideoClipDataset):
        data = data.index
    if isinstance(data, DatasetIndex):
        n = len(data.videos)
    elif isinstance(data, LatentClipDataset):
        n = len(data.videos)
    else:
        raise TypeError(
            f"expected a DatasetIndex, a clip dataset or a cache folder, got {type(data).__name__}"
        )
    picks: Iterable[int] = range(n)
    if max_videos is not None and max_videos < n:
        # Evenly spread over the (class-sorted) list, so every class is represented.
        picks = sorted({round(k * (n - 1) / max(max_videos - 1, 1)) for k in range(max_videos)})
    for i in picks:
        if isinstance(data, DatasetIndex):
            v = data.videos[i]
            yield video_mel(data.video_path(i), v.frames, v.has_audio)
        else:
            with safe_open(str(data.cache_dir / data.videos[i]["shard"]), "pt") as f:
                yield f.get_tensor("mel")


def estimate_audio_scale(data: Any, max_videos: int | None = None) -> float:
    """``1 / std(s)`` over every mel value of the split: the audio_scale giving unit-variance audio.

    ``data``: a :class:`DatasetIndex`, a :class:`VideoClipDataset`, a :class:`LatentClipDataset`
    or a latent cache folder; ``max_videos`` limits the estimate to that many videos.
    """
    count, mean, m2 = 0, 0.0, 0.0
    for mel in _mels_of(data, max_videos):
        x = mel.double()
        n_b = x.numel()
        if n_b == 0:
            continue
        mean_b = x.mean().item()
        m2_b = ((x - mean_b) ** 2).sum().item()
        # Chan et al.: merge per-video mean and sum of squared deviations without cancellation.
        delta = mean_b - mean
        total = count + n_b
        mean += delta * n_b / total
        m2 += m2_b + delta * delta * count * n_b / total
        count = total
    std = math.sqrt(m2 / count) if count else 0.0
    if std == 0.0:
        raise DataError(
            "the audio of the training data has no variation (all silent?): "
            "cannot estimate audio_scale; pass one with --audio-scale"
        )
    return 1.0 / std
