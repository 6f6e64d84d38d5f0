"""`rflav eval` and `rflav drift` as library calls, over the `mmdiffusion` protocol.

FVD, KVD and FAD are computed exactly as the MM-Diffusion evaluator does (see
`rflav_cli.metrics.protocol`), with one deliberate change: the real-clip selection is seeded,
so a run is reproducible. Only the networks the asked metrics need are loaded: I3D for FVD and
KVD, AudioCLIP for FAD.
"""

from __future__ import annotations

import csv
import errno
import json
import random
import re
import shutil
import tempfile
import zipfile
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from rich.console import Console

from .errors import FileFormatError
from .files import atomic_write, read_json_object, unwritable_reason
from .generate import run_generate
from .hub import resolve_model
from .media import probe
from .metrics import protocol as P
from .metrics.audioclip import EMBED_DIM, load_audioclip_audio
from .metrics.frechet import frechet_distance
from .metrics.i3d import NUM_CLASSES, load_i3d
from .metrics.kernel import polynomial_mmd
from .metrics.weights import audioclip_weights, i3d_weights
from .models.flav import ARCHITECTURE_KEYS, CONFIG_NAME, CheckpointFileError, FLAVConfig
from .progress import progress_bar
from .requests import (
    EVAL_AUDIO_METRICS,
    EVAL_DEFAULT_BATCH_SIZE,
    EVAL_VIDEO_METRICS,
    DriftRequest,
    EvalError,
    EvalRequest,
    GenerateRequest,
    check_drift_request,
    check_eval_request,
    check_output_folder,
    class_index,
    drift_output_paths,
    is_stats_file,
    parse_metrics,
)
from .requests import (
    EVAL_METRICS as METRICS,
)
from .runtime import init_distributed, launched_by_torchrun, rank_device, tf32_scope

__all__ = [
    "DriftRequest",
    "EvalError",
    "EvalRequest",
    "FeatureNets",
    "ModelClass",
    "load_feature_nets",
    "model_classes",
    "parse_metrics",
    "resolve_feature_weights",
    "run_drift",
    "run_eval",
]

PROTOCOL = "mmdiffusion"

# Class c of a class-conditional checkpoint is generated from seeds gen_seed + c·stride + j: no
# two clips of an evaluation share their noise, and a larger --num-samples extends every class.
CLASS_SEED_STRIDE = 1_000_000


def needs_video(metrics: set[str] | tuple[str, ...]) -> bool:
    """Whether the metrics need I3D video features (FVD, KVD)."""
    return any(m in EVAL_VIDEO_METRICS for m in metrics)


def needs_audio(metrics: set[str] | tuple[str, ...]) -> bool:
    """Whether the metrics need AudioCLIP audio features (FAD)."""
    return any(m in EVAL_AUDIO_METRICS for m in metrics)


@dataclass
class FeatureWeights:
    """Weight files of the networks some metrics need (None: that network is not needed)."""

    i3d: Path | None
    audioclip: Path | None


def resolve_feature_weights(
    metrics: set[str] | tuple[str, ...],
    *,
    i3d_path: str | None = None,
    audioclip_path: str | None = None,
    offline: bool = False,
) -> FeatureWeights:
    """Find (or download) the weight files of the networks `metrics` need, and only those: a
    missing file fails here, before any video is generated or decoded."""
    return FeatureWeights(
        i3d=i3d_weights(i3d_path, offline=offline) if needs_video(metrics) else None,
        audioclip=audioclip_weights(audioclip_path, offline=offline) if needs_audio(metrics) else None,
    )


@dataclass
class FeatureNets:
    """The feature extractors the metrics need, ready on a device (None: not needed)."""

    video: Callable[[torch.Tensor], torch.Tensor] | None
    audio: Callable[[torch.Tensor], torch.Tensor] | None
    device: torch.device


def load_feature_nets(
    metrics: set[str] | tuple[str, ...],
    *,
    i3d_path: str | None = None,
    audioclip_path: str | None = None,
    device: str = "auto",
    offline: bool = False,
    weights: FeatureWeights | None = None,
) -> FeatureNets:
    """I3D when FVD or KVD is asked, AudioCLIP's audio head when FAD is: the weight files of a
    network that is not needed are never looked for."""
    if weights is None:
        weights = resolve_feature_weights(
            metrics, i3d_path=i3d_path, audioclip_path=audioclip_path, offline=offline
        )
    dev = rank_device(device)
    video = None
    if weights.i3d is not None:
        i3d = load_i3d(weights.i3d).to(dev)

        def video(x: torch.Tensor) -> torch.Tensor:
            with tf32_scope(dev, enabled=False):  # TF32 moves I3D logits by ~1e-3; the protocol is float32
                return i3d(x.to(dev))

    audio = None
    if weights.audioclip is not None:
        audioclip = load_audioclip_audio(weights.audioclip).to(dev)

        def audio(x: torch.Tensor) -> torch.Tensor:
            with tf32_scope(dev, enabled=False):
                return audioclip(x)

    return FeatureNets(video=video, audio=audio, device=dev)


# ----------------------------------------------------------------------------------------
# Output paths
# ----------------------------------------------------------------------------------------


def check_output_file(path: Path, param: str, given: Path) -> None:
    """Refuse, before any work, a file whose folder cannot be made or written in (a file in the
    way, no permission): found only when the results are written, it would waste the whole run.
    `given` is the value of `param` as the user wrote it."""
    reason = unwritable_reason(Path(path).parent)
    if reason:
        raise EvalError(
            f"{{{param}}} {given} cannot be written: {reason}: choose another {{{param}}}", params=(param,)
        )


def _write_failed(err: OSError, path: Path, param: str) -> Exception:
    """A failed write as one line naming the file. A full disk stays an OSError, now naming the
    file rather than its temporary name, which the command line reports as it does for every
    command."""
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        return OSError(err.errno, err.strerror, str(path))
    reason = err.strerror or str(err) or type(err).__name__
    return EvalError(f"cannot write {path} ({reason}): choose another {{{param}}}", params=(param,))


# ----------------------------------------------------------------------------------------
# Sets of clips
# ----------------------------------------------------------------------------------------


@dataclass
class ClipSet:
    clips: list[P.Clip]
    files: list[Path]
    skipped: dict[str, list[str]]


def collect_clips(root: Path, *, clip_stride: int, need_audio: bool, what: str) -> ClipSet:
    """Every 16-frame window (at `clip_stride`) of every video under `root`, in file order.
    `what` is the parameter that named the folder ("real" or "fake")."""
    if not root.is_dir():
        raise EvalError(f"{{{what}}} {root}: no such folder", params=(what,))
    files = P.list_video_files(root)
    if not files:
        raise EvalError(
            f"{{{what}}} {root}: no videos found ({_looked_for()})",
            params=(what,),
        )
    clips: list[P.Clip] = []
    skipped: dict[str, list[str]] = {"unreadable": [], "shorter than 16 frames": []}
    no_audio = []
    for f in files:
        try:
            found = P.enumerate_clips([f], clip_stride=clip_stride)
        except Exception:  # a broken file is counted, never fatal
            skipped["unreadable"].append(str(f))
            continue
        if not found:
            skipped["shorter than 16 frames"].append(str(f))
            continue
        if need_audio and not probe(f).has_audio:
            no_audio.append(str(f))
            continue
        clips.extend(found)
    if no_audio:
        shown = ", ".join(no_audio[:3]) + (f" and {len(no_audio) - 3} more" if len(no_audio) > 3 else "")
        raise EvalError(
            f"FAD needs audio but {len(no_audio)} {what} video(s) have none: {shown}; "
            "drop fad from {metrics} or remove them",
            params=("metrics",),
        )
    if not clips:
        kinds = ", ".join(f"{len(v)} {k}" for k, v in skipped.items() if v)
        raise EvalError(
            f"{{{what}}} {root}: no 16-frame clip in its {len(files)} video(s) ({kinds})", params=(what,)
        )
    return ClipSet(clips, files, {k: v for k, v in skipped.items() if v})


def _looked_for() -> str:
    return "looked for " + ", ".join("*." + e for e in P.VIDEO_EXTENSIONS)


def select_batches(
    n_clips: int, num: int, *, seed: int, allow_fewer: bool, what: str
) -> tuple[list[list[int]], int]:
    """Loader batches for `num` clips: all in file order when every clip is used, else a seeded pick."""
    if n_clips < num:
        if not allow_fewer:
            raise EvalError(
                f"{what} set has {n_clips} clips but {{num_clips}} is {num}: lower {{num_clips}} "
                "or pass {allow_fewer}",
                params=("num_clips", "allow_fewer"),
            )
        num = n_clips
    if num < 2:
        raise EvalError(
            f"{what} set has {n_clips} clip(s): at least 2 are needed (add videos to {{{what}}})",
            params=(what,),
        )
    return _batches(n_clips, num, None if n_clips == num else seed), num


def _batches(n_clips: int, num: int, seed: int | None) -> list[list[int]]:
    """The evaluator's loader batches, except that a last batch of one clip, which AudioCLIP
    cannot process (batch statistics) and the original evaluator crashes on, is folded into the
    previous batch."""
    if num % P.BATCH_SIZE != 1:
        return P.loader_batches(n_clips, num, seed=seed)
    order = list(range(n_clips))
    if seed is not None:
        random.Random(seed).shuffle(order)
    order = order[:num]
    batches = [order[i : i + P.BATCH_SIZE] for i in range(0, num, P.BATCH_SIZE)]
    if len(batches) > 1 and len(batches[-1]) == 1:
        batches[-2].extend(batches.pop())
    return batches


def features_of(
    clip_set: ClipSet,
    batches: list[list[int]],
    num: int,
    nets: FeatureNets,
    antialias: bool,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    return P.compute_features(
        clip_set.clips, batches, num, nets.video, nets.audio, antialias=antialias, progress=progress
    )


# ----------------------------------------------------------------------------------------
# Real-set statistics files
# ----------------------------------------------------------------------------------------


def save_stats(path: Path, video: torch.Tensor, audio: torch.Tensor, meta: dict) -> None:
    """Features of the real set as .npz: video (N, 400) and audio (N, 1024), each (N, 0) when
    its metrics were not asked, and the settings they were computed with."""
    arrays = {"video": video.numpy(), "audio": audio.numpy(), "meta": np.array(json.dumps(meta))}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda tmp: np.savez(tmp, **arrays), suffix=".npz")  # savez adds .npz otherwise
    except OSError as err:
        raise _write_failed(err, path, "save_real_stats") from None


def _stats_fault(path: Path, problem: str) -> FileFormatError:
    return FileFormatError(
        f"{{real}} {path} {problem}: recompute it with {{save_real_stats}}",
        params=("real", "save_real_stats"),
    )


def load_stats(path: Path) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Video and audio features and settings saved by :func:`save_stats`, checked."""
    unreadable = (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error)
    try:
        loaded = np.load(path, allow_pickle=False)
    except unreadable as e:
        raise _stats_fault(path, f"is not a readable .npz file ({type(e).__name__}: {e})") from None
    if not isinstance(loaded, np.lib.npyio.NpzFile):
        raise _stats_fault(path, "holds a single array, not the statistics of rflav eval")
    with loaded as data:
        missing = [k for k in ("video", "audio", "meta") if k not in data.files]
        if missing:
            raise _stats_fault(path, f"is not a statistics file of rflav eval (no {', '.join(missing)})")
        try:
            video, audio, meta_text = data["video"], data["audio"], str(data["meta"])
        except unreadable as e:  # a damaged member of the archive
            raise _stats_fault(path, f"is damaged ({type(e).__name__}: {e})") from None
    try:
        meta = json.loads(meta_text)
    except json.JSONDecodeError:
        meta = None
    if not isinstance(meta, dict):
        raise _stats_fault(path, "holds no readable settings (meta)")
    for name, array, width in (("video", video, NUM_CLASSES), ("audio", audio, EMBED_DIM)):
        if array.dtype != np.float32 or array.ndim != 2 or array.shape[1] not in (0, width):
            raise _stats_fault(
                path,
                f"holds {name} features of shape {array.shape} and type {array.dtype}, "
                f"not float32 (N, {width})",
            )
        if not np.isfinite(array).all():
            raise _stats_fault(path, f"holds non-finite {name} features")
    if video.shape[0] != audio.shape[0] or video.shape[0] < 2:
        raise _stats_fault(
            path,
            f"holds {video.shape[0]} video and {audio.shape[0]} audio feature rows "
            "(two equal counts of at least 2 are needed)",
        )
    return torch.from_numpy(video), torch.from_numpy(audio), meta


def real_stats(path: Path, metrics: set[str], antialias: bool) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Saved real-set features that fit this evaluation: same protocol and letterbox setting,
    and features for every asked metric."""
    video, audio, meta = load_stats(path)
    if meta.get("protocol") != PROTOCOL or meta.get("letterbox_antialias") != antialias:
        shown = {True: "on", False: "off"}.get(
            meta.get("letterbox_antialias"), meta.get("letterbox_antialias")
        )
        raise EvalError(
            f"{{real}} {path} was computed with protocol {meta.get('protocol')} and letterbox "
            f"antialias {shown}: recompute it with these settings or pass "
            f"{{letterbox_antialias}} {shown}",
            params=("real", "letterbox_antialias"),
        )
    if needs_video(metrics) and video.shape[1] == 0:
        raise EvalError(
            f"{{real}} {path} holds no video features (it was saved without FVD and KVD): recompute "
            "it with fvd or kvd among {metrics}",
            params=("real", "metrics"),
        )
    if needs_audio(metrics) and audio.shape[1] == 0:
        raise EvalError(
            f"{{real}} {path} holds no audio features (it was saved without FAD): recompute it "
            "with fad among {metrics}",
            params=("real", "metrics"),
        )
    return video, audio, meta


def first_clips(
    video: torch.Tensor, audio: torch.Tensor, num: int, *, allow_fewer: bool, path: Path
) -> tuple[torch.Tensor, torch.Tensor]:
    """The features of the first `num` clips of saved statistics (a file holds one feature row
    per clip, in the order its clips were picked), so that --num-clips means for a file what it
    means for a folder; a file of fewer clips is refused unless allowed."""
    saved = int(video.shape[0])
    if saved < num and not allow_fewer:
        raise EvalError(
            f"real set {path} holds the features of {saved} clips but {{num_clips}} is {num}: lower "
            f"{{num_clips}}, pass {{allow_fewer}}, or save statistics of {num} clips with "
            "{save_real_stats}",
            params=("num_clips", "allow_fewer", "save_real_stats"),
        )
    return video[:num], audio[:num]


# ----------------------------------------------------------------------------------------
# eval
# ----------------------------------------------------------------------------------------


def run_eval(req: EvalRequest, console=None) -> dict:
    """FVD / KVD / FAD of a fake set against a real set (folder or saved statistics).

    With `req.model`, the fake set is generated first; from a class-conditional checkpoint,
    sample i is of class i mod the number of classes, or every sample is of class `req.label`."""
    check_eval_request(req)
    if req.save_real_stats is not None:
        check_output_file(Path(req.save_real_stats), "save_real_stats", req.save_real_stats)
    if req.fake_out is not None:
        check_output_folder(req.fake_out, "fake_out")
    console = console or Console(stderr=True)
    metrics = set(parse_metrics(req.metrics))
    real_is_stats = is_stats_file(req.real)
    # A class that the checkpoint lacks fails before the real set is listed or a weight fetched.
    classes = model_classes(req.model, req.label, offline=req.offline) if req.model is not None else None
    # The weight files come first: a missing one fails before anything is generated or decoded.
    weights = resolve_feature_weights(
        metrics, i3d_path=req.i3d_weights, audioclip_path=req.audioclip_weights, offline=req.offline
    )
    need_audio = needs_audio(metrics)
    result: dict = {
        "protocol": PROTOCOL,
        "letterbox_antialias": req.letterbox_antialias,
        "seed": req.seed,
        "clip_stride": req.clip_stride,
        "metrics": sorted(metrics, key=METRICS.index),
    }

    # The real set is listed and checked before the fake set is generated or read.
    real_set = None
    if real_is_stats:
        real_v, real_a, meta = real_stats(req.real, metrics, req.letterbox_antialias)
        saved = int(real_v.shape[0])
        real_v, real_a = first_clips(
            real_v, real_a, req.num_clips, allow_fewer=req.allow_fewer, path=req.real
        )
        result["real"] = {
            "stats": str(req.real),
            "clips_available": saved,
            "clips": int(real_v.shape[0]),
            "seed": meta.get("seed"),
        }
    else:
        real_set = collect_clips(req.real, clip_stride=req.clip_stride, need_audio=need_audio, what="real")
        real_batches, real_num = select_batches(
            len(real_set.clips), req.num_clips, seed=req.seed, allow_fewer=req.allow_fewer, what="real"
        )

    if launched_by_torchrun():  # feature extraction is sharded over the group
        init_distributed(rank_device(req.device), backend="gloo")  # small messages; GPUs may be shared
    with _fake_folder(req, console, classes) as (fake_dir, generated):
        fake_set = collect_clips(fake_dir, clip_stride=req.clip_stride, need_audio=need_audio, what="fake")
        fake_batches, fake_num = select_batches(
            len(fake_set.clips),
            req.num_clips if req.model is None else len(fake_set.clips),
            seed=req.seed,
            allow_fewer=req.allow_fewer,
            what="fake",
        )

        nets = load_feature_nets(metrics, weights=weights, device=req.device)
        if real_set is not None:
            real_v, real_a = _with_progress(
                console,
                req.quiet,
                "real features",
                real_set,
                real_batches,
                real_num,
                nets,
                req.letterbox_antialias,
            )
            result["real"] = {
                "folder": str(req.real),
                "videos": len(real_set.files),
                "clips_available": len(real_set.clips),
                "clips": real_num,
                "skipped": {k: len(v) for k, v in real_set.skipped.items()},
            }
            if req.save_real_stats:
                save_stats(
                    req.save_real_stats,
                    real_v,
                    real_a,
                    {
                        "protocol": PROTOCOL,
                        "seed": req.seed,
                        "letterbox_antialias": req.letterbox_antialias,
                        "clip_stride": req.clip_stride,
                        "num": real_num,
                        "metrics": result["metrics"],
                    },
                )
                result["real"]["saved_stats"] = str(req.save_real_stats)
        fake_v, fake_a = _with_progress(
            console,
            req.quiet,
            "fake features",
            fake_set,
            fake_batches,
            fake_num,
            nets,
            req.letterbox_antialias,
        )
        result["fake"] = {
            "folder": str(fake_dir),
            "videos": len(fake_set.files),
            "clips_available": len(fake_set.clips),
            "clips": fake_num,
            "skipped": {k: len(v) for k, v in fake_set.skipped.items()},
        }
        if generated is not None:
            result["fake"]["generated"] = generated
            if req.fake_out is None:
                result["fake"]["folder"] = None  # generated into a temporary folder, removed afterwards

        result.update(_scores(metrics, fake_v, fake_a, real_v, real_a))
        return result


def _scores(metrics: set[str], fake_v, fake_a, real_v, real_a) -> dict[str, float]:
    """FVD, KVD and FAD (×1e4) as the protocol computes them, for the metrics asked."""
    out = {}
    if "fvd" in metrics:
        out["fvd"] = frechet_distance(fake_v, real_v).item()
    if "kvd" in metrics:
        out["kvd"] = polynomial_mmd(fake_v, real_v)
    if "fad" in metrics:
        out["fad"] = frechet_distance(fake_a, real_a).item() * P.FAD_SCALE
    return out


def _with_progress(console, quiet, label, clip_set, batches, num, nets, antialias):
    """Features of a set; under torchrun each rank takes every world-th loader batch and rank 0
    puts them back in loader order (grouping into batches of 8 is unchanged, so is FAD)."""
    world, rank = _world()
    mine = list(range(rank, len(batches), world))
    with progress_bar(console=console, enabled=not quiet and rank == 0) as progress:
        task = progress.add_task(label, total=len(mine))
        parts = []
        for done, b in enumerate(mine, 1):
            v, a = features_of(clip_set, [batches[b]], len(batches[b]), nets, antialias)
            parts.append((b, v, a))
            progress.update(task, completed=done)
    if world > 1:
        gathered: list = [None] * world
        dist.all_gather_object(gathered, parts)
        parts = [p for rank_parts in gathered for p in rank_parts]
    parts.sort(key=lambda p: p[0])
    video = torch.cat([p[1] for p in parts])[:num]
    audio = torch.cat([p[2] for p in parts])[:num]
    return video, audio


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


@contextmanager
def _fake_folder(
    req: EvalRequest, console, classes: list[ModelClass] | None = None
) -> Iterator[tuple[Path, dict | None]]:
    """The fake set's folder: --fake, or the clips generated from --model, in --fake-out or in a
    temporary folder that is removed afterwards, whatever happens."""
    if req.model is None:
        yield req.fake, None
        return
    fake_dir, generated = _generate_fake_set(req, console, classes)
    try:
        yield fake_dir, generated
    finally:
        if req.fake_out is None:
            shutil.rmtree(fake_dir, ignore_errors=True)


def _generate_fake_set(req: EvalRequest, console, classes: list[ModelClass] | None) -> tuple[Path, dict]:
    """Generate the fake set into one folder (unconditional checkpoint) or one subfolder per
    class: for class c, what `rflav generate --class C --frames 16 --seed S --num-samples N -o
    FOLDER/C/` makes, with S = gen_seed + c·CLASS_SEED_STRIDE."""
    count = req.num_samples or req.num_clips
    world, _ = _world()
    if req.fake_out is None and world > 1:
        raise EvalError(
            "with several processes, give {fake_out} (a folder all of them can write)", params=("fake_out",)
        )
    shares = class_shares(classes, count) if classes else None
    if shares is not None and max(n for _, n in shares) > CLASS_SEED_STRIDE:
        raise EvalError(
            f"{{num_samples}} {count} gives a class more than {CLASS_SEED_STRIDE} samples, which its "
            "seeds cannot keep apart from the next class's: lower {num_samples}",
            params=("num_samples",),
        )
    folder = req.fake_out or Path(tempfile.mkdtemp(prefix="rflav-eval-fake-"))

    def generate(label: str | None, num: int, seed: int, output: Path) -> None:
        # generate's own sharding: under torchrun each rank makes its share of the seeds, and a
        # rerun into the same --fake-out makes only the clips that are not complete yet.
        run_generate(
            GenerateRequest(
                model=req.model,
                label=label,
                vae=req.vae,
                frames=P.CLIP_FRAMES,
                num_samples=num,
                batch_size=req.batch_size or EVAL_DEFAULT_BATCH_SIZE,
                seed=seed,
                output=str(output) + "/",
                device=req.device,
                quiet=req.quiet,
                offline=req.offline,
            ),
            console,
        )

    generated: dict = {"model": req.model, "samples": count}
    if shares is None:
        generate(None, count, req.gen_seed, folder)
        generated["seeds"] = [req.gen_seed, req.gen_seed + count - 1]
    else:
        # One run per class: a batch of generate has one class. Each run loads the model again,
        # which costs little next to the clips.
        generated["classes"] = []
        for cls, num in shares:
            seed = req.gen_seed + cls.index * CLASS_SEED_STRIDE
            generate(cls.label, num, seed, folder / cls.folder)
            generated["classes"].append(
                {"class": cls.name, "folder": cls.folder, "samples": num, "seeds": [seed, seed + num - 1]}
            )
    if world > 1:
        dist.barrier()
    return folder, generated


# ----------------------------------------------------------------------------------------
# Classes of a class-conditional checkpoint
# ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelClass:
    """One class of a checkpoint: its index, its name, the --class value that asks generate for
    it, and the subfolder its clips go to."""

    index: int
    name: str
    label: str
    folder: str


def model_classes(model: str, label: str | None = None, *, offline: bool = False) -> list[ModelClass] | None:
    """The classes to generate from checkpoint `model`: every class, or only `label` (a name or
    an index, as for generate); None for an unconditional checkpoint. Reads its config and
    rflav.json only, not the weights."""
    resolved = resolve_model(model, offline=offline or None, need_vocoder=False)
    config_path = resolved.folder / CONFIG_NAME
    config = read_json_object(config_path, "FLAV config", error=CheckpointFileError)
    count = FLAVConfig.from_dict(config, source=config_path, required=ARCHITECTURE_KEYS).num_classes
    if count <= 0:
        if label is not None:
            raise EvalError(
                f"{{label}} {label}: this checkpoint is unconditional: drop {{label}}", params=("label",)
            )
        return None
    names = list(resolved.class_names or [])
    name_of = [names[i] if i < len(names) else str(i) for i in range(count)]

    def one(index: int) -> ModelClass:
        name = name_of[index]
        # The name, unless generate would read it as another class's index.
        given = name if class_index(name, names, count) == index else str(index)
        safe = re.fullmatch(r"[^/\\\x00]+", name) is not None and not name.startswith(".")
        return ModelClass(index, name, given, name if safe else f"class-{index}")

    if label is None:
        return [one(i) for i in range(count)]
    index = class_index(label, names, count)
    if index is None:
        raise EvalError(
            f"unknown class {label!r}: valid classes for {{label}} are {', '.join(name_of)}",
            params=("label",),
        )
    return [one(index)]


def class_shares(classes: list[ModelClass], count: int) -> list[tuple[ModelClass, int]]:
    """How many of `count` samples each class gets: sample i is of class i mod len(classes), so
    the set follows the classes evenly whatever the number of processes; classes left without a
    sample (fewer samples than classes) are dropped."""
    k = len(classes)
    shares = [(cls, count // k + (1 if c < count % k else 0)) for c, cls in enumerate(classes)]
    return [(cls, n) for cls, n in shares if n > 0]


# ----------------------------------------------------------------------------------------
# drift
# ----------------------------------------------------------------------------------------


def run_drift(req: DriftRequest, console=None) -> dict:
    """Metrics of the set of windows at each position along long fake videos, against the real
    set, and each position's feature drift from the first window. Writes CSV (+ PNG)."""
    check_drift_request(req)
    console = console or Console(stderr=True)
    metrics = set(parse_metrics(req.metrics))
    csv_path, png_path = drift_output_paths(req.output)
    check_output_file(csv_path, "output", req.output)  # the PNG goes beside it
    weights = resolve_feature_weights(
        metrics, i3d_path=req.i3d_weights, audioclip_path=req.audioclip_weights, offline=req.offline
    )

    files = P.list_video_files(req.fake)
    if not files:
        raise EvalError(f"{{fake}} {req.fake}: no videos found ({_looked_for()})", params=("fake",))
    per_file = []
    no_audio = []
    for f in files:
        try:
            clips = P.enumerate_clips([f], clip_stride=req.stride)
        except Exception:  # a broken file is left out, as in eval
            continue
        if clips and needs_audio(metrics) and not probe(f).has_audio:
            no_audio.append(str(f))
        elif clips:
            per_file.append(clips)
    if no_audio:
        raise EvalError(
            f"FAD needs audio but {len(no_audio)} fake video(s) have none: {', '.join(no_audio[:3])}; "
            "drop fad from {metrics} or remove them",
            params=("metrics",),
        )
    if len(per_file) < 2:
        raise EvalError(
            f"{{fake}} {req.fake}: drift needs at least 2 readable videos of {P.CLIP_FRAMES}+ frames, "
            f"found {len(per_file)}",
            params=("fake",),
        )

    if is_stats_file(req.real):
        real_v, real_a, _ = real_stats(req.real, metrics, req.letterbox_antialias)
        real_v, real_a = first_clips(
            real_v, real_a, req.num_clips, allow_fewer=req.allow_fewer, path=req.real
        )
        nets = load_feature_nets(metrics, weights=weights, device=req.device)
    else:
        real_set = collect_clips(req.real, clip_stride=1, need_audio=needs_audio(metrics), what="real")
        batches, num = select_batches(
            len(real_set.clips), req.num_clips, seed=req.seed, allow_fewer=req.allow_fewer, what="real"
        )
        nets = load_feature_nets(metrics, weights=weights, device=req.device)
        real_v, real_a = _with_progress(
            console, req.quiet, "real features", real_set, batches, num, nets, req.letterbox_antialias
        )

    positions = min(len(c) for c in per_file)
    rows = []
    first_v = first_a = None
    for p in range(positions):
        clip_set = ClipSet([c[p] for c in per_file], files, {})
        n = len(clip_set.clips)
        batches = _batches(n, n, None)
        v, a = _with_progress(
            console,
            req.quiet,
            f"window {p + 1}/{positions}",
            clip_set,
            batches,
            n,
            nets,
            req.letterbox_antialias,
        )
        if p == 0:
            first_v = v.mean(0) if v.numel() else None
            first_a = a.mean(0) if a.numel() else None
        row = {
            "position": p,
            "start_frame": p * req.stride,
            "start_s": p * req.stride / P.EVAL_FPS,
            "videos": n,
            **_scores(metrics, v, a, real_v, real_a),
        }
        if first_v is not None:
            row["video_feature_drift"] = float(torch.linalg.vector_norm(v.mean(0) - first_v))
        if first_a is not None:
            row["audio_feature_drift"] = float(torch.linalg.vector_norm(a.mean(0) - first_a))
        rows.append(row)

    def write_csv(tmp: str) -> None:
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)

    try:
        csv_path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(csv_path, write_csv)
    except OSError as err:
        raise _write_failed(err, csv_path, "output") from None
    plot_drift(rows, png_path)
    return {
        "protocol": PROTOCOL,
        "csv": str(csv_path),
        "png": str(png_path),
        "positions": positions,
        "videos": len(per_file),
        "rows": rows,
    }


def plot_drift(rows: list[dict], path: Path) -> Path:
    """One panel per metric against the window's start time."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise EvalError(
            "the drift plot needs matplotlib: pip install 'rflav[plot]' (the CSV was written)"
        ) from None
    keys = [k for k in ("fvd", "kvd", "fad", "video_feature_drift", "audio_feature_drift") if k in rows[0]]
    labels = {
        "fvd": "FVD",
        "kvd": "KVD",
        "fad": "FAD (×1e4)",
        "video_feature_drift": "I3D feature drift",
        "audio_feature_drift": "AudioCLIP feature drift",
    }
    fig, axes = plt.subplots(len(keys), 1, figsize=(7, 2.2 * len(keys)), sharex=True, squeeze=False)
    x = [r["start_s"] for r in rows]
    for ax, key in zip(axes[:, 0], keys):
        ax.plot(x, [r[key] for r in rows], marker="o", label=labels[key])
        ax.set_ylabel(labels[key])
        ax.grid(alpha=0.3)
        ax.legend(loc="upper left", fontsize=8)
    axes[-1, 0].set_xlabel("window start (s)")
    fig.suptitle(f"Drift along the videos ({PROTOCOL} protocol, 16-frame windows)")
    fig.tight_layout()
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120), suffix=".png")  # format by extension
    except OSError as err:
        raise _write_failed(err, path, "output") from None
    finally:
        plt.close(fig)
    return path
