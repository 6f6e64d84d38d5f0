"""`rflav eval` and `rflav drift` as library calls, over the `mmdiffusion` protocol.

FVD, KVD and FAD are computed exactly as the MM-Diffusion evaluator does (see
`rflav_cli.metrics.protocol`), with one deliberate change: the real-clip selection is seeded,
so a run is reproducible.
"""

from __future__ import annotations

import csv
import json
import os
import random
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .media import probe
from .metrics import protocol as P
from .metrics.frechet import frechet_distance
from .metrics.kernel import polynomial_mmd
from .metrics.weights import audioclip_weights, i3d_weights
from .models.audioclip import load_audioclip_audio
from .models.i3d import load_i3d
from .errors import RflavError

PROTOCOL = "mmdiffusion"
METRICS = ("fvd", "kvd", "fad")


class EvalError(RflavError, ValueError):
    """Bad evaluation input, reported as one line."""


@dataclass
class FeatureNets:
    """The two feature extractors, ready on a device."""

    video: Callable[[torch.Tensor], torch.Tensor]
    audio: Callable[[torch.Tensor], torch.Tensor] | None
    device: torch.device


def load_feature_nets(
    metrics: set[str], *, i3d_path: str | None = None, audioclip_path: str | None = None,
    device: str = "auto", offline: bool = False,
) -> FeatureNets:
    from .pipeline import pick_device

    dev = pick_device(device)
    if dev.type == "cuda" and "LOCAL_RANK" in os.environ:
        dev = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    if dev.type == "cuda":  # TF32 moves I3D logits by ~1e-3; the protocol is float32
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    i3d = load_i3d(i3d_weights(i3d_path, offline=offline)).to(dev)

    def video(x: torch.Tensor) -> torch.Tensor:
        return i3d(x.to(dev))

    audio = None
    if "fad" in metrics:
        net = load_audioclip_audio(audioclip_weights(audioclip_path, offline=offline)).to(dev)
        audio = net
    return FeatureNets(video=video, audio=audio, device=dev)


# ----------------------------------------------------------------------------------------
# Sets of clips
# ----------------------------------------------------------------------------------------


@dataclass
class ClipSet:
    clips: list[P.Clip]
    files: list[Path]
    skipped: dict[str, list[str]]


def collect_clips(root: Path, *, clip_stride: int, need_audio: bool, what: str) -> ClipSet:
    """Every 16-frame window (at `clip_stride`) of every video under `root`, in file order."""
    if not root.is_dir():
        raise EvalError(f"{what} {root}: no such folder")
    files = P.list_video_files(root)
    if not files:
        raise EvalError(f"{what} {root}: no videos found (looked for {', '.join(sorted(P.VIDEO_EXTENSIONS))})")
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
        raise EvalError(f"FAD needs audio but {len(no_audio)} {what} video(s) have none: {shown}")
    return ClipSet(clips, files, {k: v for k, v in skipped.items() if v})


def select_batches(n_clips: int, num: int, *, seed: int, allow_fewer: bool, what: str) -> tuple[list[list[int]], int]:
    """Loader batches for `num` clips: all in file order when every clip is used, else a seeded pick."""
    if n_clips < num:
        if not allow_fewer:
            raise EvalError(f"{what} set has {n_clips} clips but --num is {num}: lower --num or pass --allow-fewer")
        num = n_clips
    if num < 2:
        raise EvalError(f"{what} set has {n_clips} clip(s): at least 2 are needed")
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
    batches = [order[i:i + P.BATCH_SIZE] for i in range(0, num, P.BATCH_SIZE)]
    if len(batches) > 1 and len(batches[-1]) == 1:
        batches[-2].extend(batches.pop())
    return batches


def features_of(clip_set: ClipSet, batches: list[list[int]], num: int, nets: FeatureNets, antialias: bool,
                progress: Callable[[int, int], None] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    return P.compute_features(clip_set.clips, batches, num, nets.video, nets.audio, antialias=antialias,
                              progress=progress)


# ----------------------------------------------------------------------------------------
# Real-set statistics files
# ----------------------------------------------------------------------------------------


def save_stats(path: Path, video: torch.Tensor, audio: torch.Tensor, meta: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp.npz")
    np.savez(tmp, video=video.numpy(), audio=audio.numpy(), meta=np.array(json.dumps(meta)))
    os.replace(tmp, path)


def load_stats(path: Path) -> tuple[torch.Tensor, torch.Tensor, dict]:
    with np.load(path, allow_pickle=False) as data:
        return torch.from_numpy(data["video"]), torch.from_numpy(data["audio"]), json.loads(str(data["meta"]))


# ----------------------------------------------------------------------------------------
# eval
# ----------------------------------------------------------------------------------------


@dataclass
class EvalRequest:
    real: Path
    fake: Path | None = None
    metrics: tuple[str, ...] = METRICS
    num: int = 2048
    seed: int = 0
    clip_stride: int = 1
    letterbox_antialias: bool = True
    allow_fewer: bool = False
    i3d_weights: str | None = None
    audioclip_weights: str | None = None
    save_real_stats: Path | None = None
    device: str = "auto"
    offline: bool = False
    # --model mode: generate the fake set first
    model: str | None = None
    num_samples: int | None = None
    batch_size: int = 8
    gen_seed: int = 0
    fake_out: Path | None = None
    quiet: bool = False


def parse_metrics(text: str) -> tuple[str, ...]:
    names = tuple(m.strip().lower() for m in text.split(",") if m.strip())
    bad = [m for m in names if m not in METRICS]
    if bad or not names:
        raise EvalError(f"unknown metric {bad[0] if bad else text!r}: choose from fvd, kvd, fad")
    return names


def run_eval(req: EvalRequest, console=None) -> dict:
    """FVD / KVD / FAD of a fake set against a real set (folder or saved statistics)."""
    from rich.console import Console

    console = console or Console(stderr=True)
    metrics = set(req.metrics)
    if req.fake is None and req.model is None:
        raise EvalError("give --fake DIR (generated videos) or --model CHECKPOINT (generate them now)")
    if req.num < 2:
        raise EvalError(f"--num must be at least 2, got {req.num}")
    if req.clip_stride < 1:
        raise EvalError(f"--clip-stride must be at least 1, got {req.clip_stride}")
    real_is_stats = req.real.is_file() and req.real.suffix == ".npz"
    if not real_is_stats and not req.real.is_dir():
        raise EvalError(f"--real {req.real}: neither a folder of videos nor a statistics .npz file")

    _init_distributed(req.device)
    fake_dir = req.fake
    generated = None
    if req.model is not None:
        fake_dir, generated = _generate_fake_set(req, console)

    need_audio = "fad" in metrics
    result: dict = {"protocol": PROTOCOL, "letterbox_antialias": req.letterbox_antialias, "seed": req.seed,
                    "clip_stride": req.clip_stride}

    # Both sets are listed and checked before any feature is computed.
    real_set = None
    if real_is_stats:
        real_v, real_a, meta = load_stats(req.real)
        if meta.get("protocol") != PROTOCOL or meta.get("letterbox_antialias") != req.letterbox_antialias:
            raise EvalError(f"{req.real} was computed with protocol {meta.get('protocol')} and letterbox antialias "
                            f"{meta.get('letterbox_antialias')}: recompute it with these settings")
        if need_audio and real_a.shape[1] == 0:
            raise EvalError(f"{req.real} holds no audio features: recompute it with FAD among the metrics")
        result["real"] = {"stats": str(req.real), "clips": int(real_v.shape[0]), "seed": meta.get("seed")}
    else:
        real_set = collect_clips(req.real, clip_stride=req.clip_stride, need_audio=need_audio, what="real")
        real_batches, real_num = select_batches(len(real_set.clips), req.num, seed=req.seed,
                                                allow_fewer=req.allow_fewer, what="real")
    fake_set = collect_clips(fake_dir, clip_stride=req.clip_stride, need_audio=need_audio, what="fake")
    fake_batches, fake_num = select_batches(len(fake_set.clips), req.num if req.model is None else len(fake_set.clips),
                                            seed=req.seed, allow_fewer=req.allow_fewer, what="fake")

    nets = load_feature_nets(metrics, i3d_path=req.i3d_weights, audioclip_path=req.audioclip_weights,
                             device=req.device, offline=req.offline)
    if real_set is not None:
        real_v, real_a = _with_progress(console, req.quiet, "real features", real_set, real_batches, real_num, nets,
                                        req.letterbox_antialias)
        result["real"] = {"folder": str(req.real), "videos": len(real_set.files), "clips_available": len(real_set.clips),
                          "clips": real_num, "skipped": {k: len(v) for k, v in real_set.skipped.items()}}
        if req.save_real_stats:
            save_stats(req.save_real_stats, real_v, real_a, {"protocol": PROTOCOL, "seed": req.seed,
                                                             "letterbox_antialias": req.letterbox_antialias,
                                                             "clip_stride": req.clip_stride, "num": real_num})
            result["real"]["saved_stats"] = str(req.save_real_stats)
    fake_v, fake_a = _with_progress(console, req.quiet, "fake features", fake_set, fake_batches, fake_num, nets,
                                    req.letterbox_antialias)
    result["fake"] = {"folder": str(fake_dir), "videos": len(fake_set.files), "clips_available": len(fake_set.clips),
                      "clips": fake_num, "skipped": {k: len(v) for k, v in fake_set.skipped.items()}}
    if generated is not None:
        result["fake"]["generated"] = generated

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
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    world, rank = _world()
    mine = list(range(rank, len(batches), world))
    with Progress(TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  console=console, disable=quiet or rank != 0) as progress:
        task = progress.add_task(label, total=len(mine))
        parts = []
        for done, b in enumerate(mine, 1):
            v, a = features_of(clip_set, [batches[b]], len(batches[b]), nets, antialias)
            parts.append((b, v, a))
            progress.update(task, completed=done)
    if world > 1:
        import torch.distributed as dist

        gathered: list = [None] * world
        dist.all_gather_object(gathered, parts)
        parts = [p for rank_parts in gathered for p in rank_parts]
    parts.sort(key=lambda p: p[0])
    video = torch.cat([p[1] for p in parts])[:num]
    audio = torch.cat([p[2] for p in parts])[:num]
    return video, audio


def _init_distributed(device: str) -> None:
    """Join the torchrun group when launched by torchrun (feature extraction is sharded)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return
    import torch.distributed as dist

    from .pipeline import pick_device

    if not dist.is_initialized():
        cuda = pick_device(device).type == "cuda"
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend="nccl" if cuda else "gloo")


def _world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def _generate_fake_set(req: EvalRequest, console) -> tuple[Path, dict]:
    from .generate import GenerateRequest, run_generate

    count = req.num_samples or req.num
    world, rank = _world()
    if req.fake_out is None and world > 1:
        raise EvalError("with several processes, give --fake-out (a folder all of them can write)")
    folder = req.fake_out or Path(tempfile.mkdtemp(prefix="rflav-eval-fake-"))
    # Rank r generates a contiguous block of seeds; file names carry the seed, so blocks never clash.
    per = -(-count // world)
    first, last = rank * per, min(count, (rank + 1) * per)
    if last > first:
        run_generate(GenerateRequest(model=req.model, frames=P.CLIP_FRAMES, num_samples=last - first,
                                     batch_size=req.batch_size, seed=req.gen_seed + first,
                                     output=folder / f"rank{rank}", device=req.device,
                                     quiet=req.quiet or rank != 0, offline=req.offline), console)
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
    return folder, {"model": req.model, "samples": count, "seeds": [req.gen_seed, req.gen_seed + count - 1]}


# ----------------------------------------------------------------------------------------
# drift
# ----------------------------------------------------------------------------------------


@dataclass
class DriftRequest:
    fake: Path
    real: Path
    window: int = P.CLIP_FRAMES
    stride: int = 8
    num: int = 2048
    seed: int = 0
    metrics: tuple[str, ...] = METRICS
    letterbox_antialias: bool = True
    allow_fewer: bool = True
    i3d_weights: str | None = None
    audioclip_weights: str | None = None
    device: str = "auto"
    offline: bool = False
    output: Path = Path("drift")
    quiet: bool = False


def run_drift(req: DriftRequest, console=None) -> dict:
    """Metrics of the set of windows at each position along long fake videos, against the real
    set, and each position's feature drift from the first window. Writes CSV (+ PNG)."""
    from rich.console import Console

    console = console or Console(stderr=True)
    if req.window != P.CLIP_FRAMES:
        raise EvalError(f"--window must be {P.CLIP_FRAMES} frames for the {PROTOCOL} protocol")
    if req.stride < 1:
        raise EvalError(f"--stride must be at least 1, got {req.stride}")
    metrics = set(req.metrics)
    real_result = run_eval_real_only(req, metrics, console)
    real_v, real_a, nets = real_result

    files = P.list_video_files(req.fake) if req.fake.is_dir() else []
    if not files:
        raise EvalError(f"--fake {req.fake}: no videos found")
    per_file = []
    for f in files:
        try:
            clips = P.enumerate_clips([f], clip_stride=req.stride)
        except Exception:
            continue
        if clips:
            per_file.append(clips)
    if len(per_file) < 2:
        raise EvalError(f"--fake {req.fake}: drift needs at least 2 readable videos of 16+ frames, found {len(per_file)}")
    positions = min(len(c) for c in per_file)
    rows = []
    first_v = first_a = None
    for p in range(positions):
        clip_set = ClipSet([c[p] for c in per_file], files, {})
        n = len(clip_set.clips)
        batches = _batches(n, n, None)
        v, a = _with_progress(console, req.quiet, f"window {p + 1}/{positions}", clip_set, batches, n, nets,
                              req.letterbox_antialias)
        if first_v is None:
            first_v, first_a = v.mean(0), (a.mean(0) if a.numel() else None)
        row = {"position": p, "start_frame": p * req.stride, "start_s": p * req.stride / P.EVAL_FPS, "videos": n,
               **_scores(metrics, v, a, real_v, real_a)}
        row["video_feature_drift"] = float(torch.linalg.vector_norm(v.mean(0) - first_v))
        if first_a is not None:
            row["audio_feature_drift"] = float(torch.linalg.vector_norm(a.mean(0) - first_a))
        rows.append(row)

    req.output.parent.mkdir(parents=True, exist_ok=True)
    csv_path = req.output.with_suffix(".csv")
    tmp = csv_path.with_name(f".{csv_path.name}.tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, csv_path)
    png_path = plot_drift(rows, req.output.with_suffix(".png"))
    return {"protocol": PROTOCOL, "csv": str(csv_path), "png": str(png_path), "positions": positions,
            "videos": len(per_file), "rows": rows}


def run_eval_real_only(req: DriftRequest, metrics: set[str], console):
    nets = load_feature_nets(metrics, i3d_path=req.i3d_weights, audioclip_path=req.audioclip_weights,
                             device=req.device, offline=req.offline)
    if req.real.is_file() and req.real.suffix == ".npz":
        real_v, real_a, _ = load_stats(req.real)
        return real_v, real_a, nets
    real_set = collect_clips(req.real, clip_stride=1, need_audio="fad" in metrics, what="real")
    batches, num = select_batches(len(real_set.clips), req.num, seed=req.seed, allow_fewer=req.allow_fewer,
                                  what="real")
    real_v, real_a = _with_progress(console, req.quiet, "real features", real_set, batches, num, nets,
                                    req.letterbox_antialias)
    return real_v, real_a, nets


def plot_drift(rows: list[dict], path: Path) -> Path:
    """One panel per metric against the window's start time."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise EvalError("the drift plot needs matplotlib: pip install 'rflav[plot]' (the CSV was written)") from None
    keys = [k for k in ("fvd", "kvd", "fad", "video_feature_drift", "audio_feature_drift") if k in rows[0]]
    labels = {"fvd": "FVD", "kvd": "KVD", "fad": "FAD (×1e4)", "video_feature_drift": "I3D feature drift",
              "audio_feature_drift": "AudioCLIP feature drift"}
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
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)
    return path


