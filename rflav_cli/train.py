"""Training: the rolling flow-matching objective over clips of W frames, on one device or
many (torchrun + DistributedDataParallel), with EMA weights, resumable atomic checkpoints.

A run folder holds `checkpoint-STEP/` folders in the release layout (EMA weights in
`model.safetensors`, `config.json`, `vocoder/`, `rflav.json`) plus `training_state/` (raw
weights, EMA, optimizer, step, data position), and `latest` → the newest complete one.
Everything random is derived from (seed, step, rank), so stopping at step N and resuming gives
the same weights as an uninterrupted run.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file
from torch.nn.parallel import DistributedDataParallel

from . import __version__
from .config import FPS, LATENT_SCALE, SAMPLE_RATE, VAE_DOWNSCALE
from .flow import flow_matching_loss, sample_training_levels
from .hub import PRESETS, VAE_REPO_ID, read_side_file, resolve_model, write_side_file
from .models.checkpoint import creation_mode, save_safetensors
from .models.flav import FLAV, FLAVConfig
from .errors import RflavError

STATE_DIR = "training_state"


class TrainError(RflavError, ValueError):
    """A training request that cannot be served (bad data, incompatible resume, …)."""


@dataclass
class TrainConfig:
    """Everything `rflav train` can be asked; stored in each checkpoint's training state."""

    data: str
    output: str = "runs/rflav"
    model: str = "FLAV-B/1"
    model_config: str | None = None      # JSON file with FLAV constructor keys
    init: str | None = None              # preset / repo id / folder to fine-tune
    autoencoder: str = VAE_REPO_ID       # repo id, folder or "none" (pixel space)
    vocoder: str | None = None           # folder with config.json + vocoder.pt (default: dance's)
    image_size: int = 256
    window: int = 10
    batch_size: int = 8
    lr: float = 1e-4
    weight_decay: float = 0.02
    grad_clip: float = 1.0
    ema_decay: float = 0.9999
    max_steps: int = 100_000
    save_every: int = 1000
    keep: int = 3
    sample_every: int = 0
    sample_frames: int = 40
    log_every: int = 10
    weighting: str = "logit_normal"
    audio_scale: float | None = None
    missing_audio: str = "skip"
    seed: int = 0
    device: str = "auto"
    grad_ckpt: bool = False
    compile: bool = False
    num_workers: int = 2

    @property
    def pixel_space(self) -> bool:
        return self.autoencoder.lower() == "none"


# ----------------------------------------------------------------------------------------
# Distributed helpers
# ----------------------------------------------------------------------------------------


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device: torch.device) -> Dist:
    """Join the torchrun group when launched by torchrun (NCCL on GPUs, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def _barrier(d: Dist) -> None:
    if d.world > 1:
        dist.barrier()


# ----------------------------------------------------------------------------------------
# Data order: one global, seeded permutation per epoch; each step takes the next world×batch
# indices and each rank its slice. The position is a single number, valid for any world size.
# ----------------------------------------------------------------------------------------


def global_batch_indices(n: int, seed: int, position: int, count: int) -> list[int]:
    """`count` dataset indices starting at global `position` of the epoch-wise shuffled stream."""
    out: list[int] = []
    while len(out) < count:
        epoch, offset = divmod(position, n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        take = min(count - len(out), n - offset)
        out += perm[offset:offset + take].tolist()
        position += take
    return out


def step_generator(seed: int, step: int, rank: int, device: torch.device) -> torch.Generator:
    """The RNG of one step on one rank: noise, levels and label dropout all come from it."""
    g = torch.Generator(device=device)
    g.manual_seed((seed * 1_000_003 + step) * 4099 + rank)
    return g


# ----------------------------------------------------------------------------------------
# Model construction
# ----------------------------------------------------------------------------------------


def build_model_config(cfg: TrainConfig, num_classes: int) -> FLAVConfig:
    channels = 3 if cfg.pixel_space else 4
    latent = cfg.image_size if cfg.pixel_space else cfg.image_size // VAE_DOWNSCALE
    common = dict(in_channels=channels, latent_size=latent, predict_frames=cfg.window, num_classes=num_classes,
                  causal_attn=True, grad_ckpt=cfg.grad_ckpt)
    if cfg.model_config:
        data = json.loads(Path(cfg.model_config).read_text())
        return FLAVConfig.from_dict({**common, **data, "grad_ckpt": cfg.grad_ckpt})
    return FLAVConfig.from_size(cfg.model, **common)


def _ema_update(ema: dict[str, torch.Tensor], model: torch.nn.Module, decay: float) -> None:
    with torch.no_grad():
        for name, p in model.state_dict().items():
            ema[name].mul_(decay).add_(p.detach().float(), alpha=1 - decay)


# ----------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------


def _write_checkpoint(
    run_dir: Path,
    step: int,
    model: FLAV,
    ema: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    state: dict,
    side: dict,
    vocoder_folder: Path | None,
    keep: int,
) -> Path:
    """Write checkpoint-STEP atomically (temp folder, then rename) and repoint `latest`."""
    final = run_dir / f"checkpoint-{step:08d}"
    tmp = run_dir / f".checkpoint-{step:08d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    release = FLAV(model.config)
    release.load_state_dict({k: v.to(torch.float32) for k, v in ema.items()})
    release.save_pretrained(tmp)
    if vocoder_folder is not None:
        # Plain copies, not the source's modes: the checkpoint's files follow the umask.
        shutil.copytree(vocoder_folder, tmp / "vocoder", copy_function=shutil.copyfile)
        os.chmod(tmp / "vocoder", creation_mode(directory=True))
    write_side_file(tmp, side)
    st = tmp / STATE_DIR
    st.mkdir()
    save_safetensors({k: v.detach().float().cpu().contiguous() for k, v in model.state_dict().items()}, st / "model.safetensors")
    save_safetensors({k: v.cpu().contiguous() for k, v in ema.items()}, st / "ema.safetensors")
    torch.save(optimizer.state_dict(), st / "optimizer.pt")
    (st / "state.json").write_text(json.dumps(state, indent=2) + "\n")
    _fsync_tree(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _point_latest(run_dir, final.name)
    checkpoints = sorted(p for p in run_dir.glob("checkpoint-*") if p.is_dir())
    for old in checkpoints[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _fsync_tree(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())


def _point_latest(run_dir: Path, name: str) -> None:
    link = run_dir / "latest"
    tmp = run_dir / ".latest.tmp"
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    os.symlink(name, tmp)
    os.replace(tmp, link)


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint: `latest` if it resolves, else the highest step."""
    link = run_dir / "latest"
    if link.exists() and (link / STATE_DIR / "state.json").exists():
        return link.resolve()
    complete = [p for p in sorted(run_dir.glob("checkpoint-*")) if (p / STATE_DIR / "state.json").exists()]
    return complete[-1] if complete else None


# ----------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------


def _device(name: str) -> torch.device:
    from .pipeline import pick_device

    device = pick_device(name)
    if device.type == "cuda" and "LOCAL_RANK" in os.environ:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    return device


def _default_vocoder(cfg: TrainConfig) -> Path | None:
    if cfg.vocoder and cfg.vocoder.lower() == "none":   # checkpoints then use Griffin-Lim
        return None
    if cfg.vocoder:
        folder = Path(cfg.vocoder)
        if (folder / "vocoder").is_dir():
            folder = folder / "vocoder"
        if not (folder / "config.json").exists() or not (folder / "vocoder.pt").exists():
            raise TrainError(f"--vocoder {cfg.vocoder}: expected a folder with config.json and vocoder.pt")
        return folder
    if cfg.vocoder is None:
        try:
            return resolve_model("dance").vocoder_folder
        except Exception:  # offline without the cache: checkpoints then fall back to Griffin-Lim
            return None
    return None


def train(cfg: TrainConfig, console=None, stop=None) -> Path | None:
    """Run (or resume) training; returns the last checkpoint written by this process."""
    from rich.console import Console

    from .data import LatentClipDataset, estimate_audio_scale, open_training_data

    console = console or Console(stderr=True)
    device = _device(cfg.device)
    d = init_distributed(device)
    run_dir = Path(cfg.output)
    if d.main:
        run_dir.mkdir(parents=True, exist_ok=True)
    _barrier(d)

    dataset = open_training_data(Path(cfg.data), "train", cfg.window, image_size=cfg.image_size,
                                 missing_audio=cfg.missing_audio, progress=d.main)
    if len(dataset) == 0:
        raise TrainError(f"{cfg.data}: no clip of {cfg.window} frames in the train split")
    class_names = list(getattr(dataset, "class_names", []) or [])
    index = getattr(dataset, "index", None)
    data_info = {"clips": len(dataset)}
    if index is not None:
        data_info.update(videos=len(index.videos), skipped={k: len(v) for k, v in index.skipped.items() if v})
        if d.main:
            console.print(index.summary(cfg.window))

    resume = latest_checkpoint(run_dir)
    state: dict = {}
    if resume is not None:
        state = json.loads((resume / STATE_DIR / "state.json").read_text())
        audio_scale = state["audio_scale"]
    else:
        audio_scale = cfg.audio_scale or estimate_audio_scale(dataset)
    dataset.audio_scale = audio_scale
    if d.main and resume is None:
        console.print(f"audio_scale {audio_scale:.6f}" + ("" if cfg.audio_scale else " (unit std of the training mel)"))

    # Model: from scratch, or the released / given weights to fine-tune.
    if resume is not None:
        config = FLAVConfig.from_dict(json.loads((resume / "config.json").read_text()))
        config.grad_ckpt = cfg.grad_ckpt
        model = FLAV(config)
        model.load_state_dict(load_file(str(resume / STATE_DIR / "model.safetensors")))
    elif cfg.init:
        source = resolve_model(cfg.init, need_vocoder=False)
        model = FLAV.from_pretrained(source.folder)
        model.config.grad_ckpt = cfg.grad_ckpt
        model.gradient_checkpointing = cfg.grad_ckpt
        if model.num_classes != len(class_names) and class_names:
            raise TrainError(f"--init {cfg.init} has {model.num_classes} classes but the data has {len(class_names)}")
        if cfg.init in PRESETS and cfg.audio_scale is None:
            audio_scale = PRESETS[cfg.init].audio_scale
            dataset.audio_scale = audio_scale
    else:
        torch.manual_seed(cfg.seed)
        model = FLAV(build_model_config(cfg, len(class_names)))
        model.initialize_weights()
    model.to(device).train()
    if model.window != cfg.window:
        raise TrainError(f"the model's window is {model.window} frames but --window is {cfg.window}")

    ema = {k: v.detach().float().clone() for k, v in model.state_dict().items()}
    if resume is not None:
        ema = {k: v.to(device) for k, v in load_file(str(resume / STATE_DIR / "ema.safetensors")).items()}

    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    if resume is not None:
        optimizer.load_state_dict(torch.load(resume / STATE_DIR / "optimizer.pt", weights_only=True, map_location=device))

    step = int(state.get("step", 0))
    position = int(state.get("data_position", 0))

    vae = None
    if not cfg.pixel_space and not isinstance(dataset, LatentClipDataset):
        from .models.autoencoder import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(cfg.autoencoder).to(device).eval().requires_grad_(False)
    vocoder_folder = _default_vocoder(cfg) if d.main else None

    net: torch.nn.Module = model
    if d.world > 1:
        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    forward = torch.compile(net) if cfg.compile else net
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()

    side = {
        "class_names": class_names or None,
        "audio_scale": audio_scale,
        "autoencoder": None if cfg.pixel_space else cfg.autoencoder,
        "pixel_space": cfg.pixel_space,
        "image_size": cfg.image_size,
        "fps": FPS,
        "sample_rate": SAMPLE_RATE,
        "rflav_version": __version__,
    }
    side = {k: v for k, v in side.items() if v is not None}

    loader = _Fetcher(dataset, threads=0 if isinstance(dataset, LatentClipDataset) else cfg.num_workers)
    metrics_path = run_dir / "metrics.jsonl"
    last_written: Path | None = None
    progress = _progress(console, d.main)
    task = progress.add_task("training", total=cfg.max_steps, completed=step, loss=float("nan"), clips=0.0, steps=0.0)
    began, clips_done, window_loss, window_count = time.perf_counter(), 0, 0.0, 0
    with progress:
        while step < cfg.max_steps:
            if stop is not None and stop.is_set():
                break
            # Everything random in this step (latent sampling in the dataset, label dropout in
            # the model, noise and levels) derives from (seed, step, rank).
            torch.manual_seed((cfg.seed * 1_000_003 + step) * 4099 + d.rank)
            indices = global_batch_indices(len(dataset), cfg.seed, position, cfg.batch_size * d.world)
            mine = indices[d.rank * cfg.batch_size:(d.rank + 1) * cfg.batch_size]
            items = loader.fetch(mine)
            position += cfg.batch_size * d.world
            g = step_generator(cfg.seed, step, d.rank, device)
            v, a, y = _batch(items, device, vae, g)
            t = sample_training_levels(v.shape[0], cfg.window, generator=g, device=device)
            with autocast:
                out = flow_matching_loss(lambda vv, aa, tt: forward(vv, aa, tt, y), v, a, t,
                                         weighting=cfg.weighting, generator=g)
            optimizer.zero_grad(set_to_none=True)
            out["loss"].backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            step += 1
            _ema_update(ema, model, min(cfg.ema_decay, (1 + step) / (10 + step)))

            loss = float(out["loss"].detach())
            if d.world > 1:
                reduced = torch.tensor([loss], device=device)
                dist.all_reduce(reduced)
                loss = reduced.item() / d.world
            clips_done += cfg.batch_size * d.world
            window_loss += loss
            window_count += 1
            elapsed = time.perf_counter() - began
            progress.update(task, completed=step, loss=loss, clips=clips_done / max(elapsed, 1e-9),
                            steps=clips_done / (cfg.batch_size * d.world) / max(elapsed, 1e-9))
            if d.main and (step % cfg.log_every == 0 or step == cfg.max_steps):
                record = {"step": step, "loss": window_loss / window_count, "video_loss": float(out["video"]),
                          "audio_loss": float(out["audio"]), "grad_norm": float(grad_norm),
                          "steps_per_s": clips_done / (cfg.batch_size * d.world) / max(elapsed, 1e-9),
                          "clips_per_s": clips_done / max(elapsed, 1e-9), "time": time.time()}
                with open(metrics_path, "a") as f:
                    f.write(json.dumps(record) + "\n")
                window_loss, window_count = 0.0, 0
            if step % cfg.save_every == 0 or step == cfg.max_steps:
                last_written = _save(run_dir, step, model, ema, optimizer, cfg, audio_scale, position, d, side,
                                     vocoder_folder, data_info)
            if d.main and cfg.sample_every and step % cfg.sample_every == 0 and last_written is not None:
                _sample(last_written, cfg, console)

    if stop is not None and stop.is_set() and (last_written is None or not last_written.name.endswith(f"{step:08d}")):
        last_written = _save(run_dir, step, model, ema, optimizer, cfg, audio_scale, position, d, side, vocoder_folder,
                             data_info)
    loader.close()
    _barrier(d)
    return last_written


def _save(run_dir, step, model, ema, optimizer, cfg, audio_scale, position, d: Dist, side, vocoder_folder,
          data_info):
    path = None
    checksum = torch.tensor([float(sum(p.double().sum() for p in model.state_dict().values()))], dtype=torch.float64)
    if d.world > 1 and dist.get_backend() == "nccl":
        checksum = checksum.to(next(model.parameters()).device)
    checksums = [checksum.clone() for _ in range(d.world)]
    if d.world > 1:  # every rank must hold the same weights; recorded so it can be checked
        dist.all_gather(checksums, checksum)
    if d.main:
        state = {"step": step, "data_position": position, "audio_scale": audio_scale, "world_size": d.world,
                 "seed": cfg.seed, "config": asdict(cfg),
                 "data": data_info, "rank_weight_checksums": [float(c.item()) for c in checksums],
                 "rflav_version": __version__}
        path = _write_checkpoint(run_dir, step, model, ema, optimizer, state, side, vocoder_folder, cfg.keep)
    _barrier(d)
    return path


class _Fetcher:
    """Reads the items of a batch, in parallel threads for decoded videos (each decode is an
    ffmpeg process, so threads overlap well)."""

    def __init__(self, dataset, threads: int) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self.dataset = dataset
        self.pool = ThreadPoolExecutor(max_workers=threads) if threads > 0 else None

    def fetch(self, indices: list[int]) -> list[dict]:
        if self.pool is None:
            return [self.dataset[i] for i in indices]
        return list(self.pool.map(self.dataset.__getitem__, indices))

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=False, cancel_futures=True)


def _batch(items: list[dict], device: torch.device, vae, g: torch.Generator):
    video = torch.stack([it["video"] for it in items]).to(device)
    audio = torch.stack([it["audio"] for it in items]).to(device)
    labels = torch.stack([torch.as_tensor(it["label"]) for it in items]).to(device)
    if vae is not None:
        b, w = video.shape[:2]
        with torch.no_grad():
            posterior = vae.encode(video.flatten(0, 1))
            latents = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=g, device=device)
        video = (latents * LATENT_SCALE).view(b, w, *latents.shape[1:])
    y = labels if bool((labels >= 0).all()) and labels.numel() else None
    return video, audio, y


def _progress(console, enabled: bool):
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(),
        TextColumn("step {task.completed:>7.0f}/{task.total:.0f}"),
        TextColumn("loss {task.fields[loss]:.4f}"),
        TextColumn("{task.fields[steps]:>6.2f} steps/s"),
        TextColumn("{task.fields[clips]:>7.1f} clips/s"),
        TimeElapsedColumn(), TimeRemainingColumn(),
        console=console, disable=not enabled,
    )


def _sample(checkpoint: Path, cfg: TrainConfig, console) -> None:
    """Write a short sample MP4 into the checkpoint from its EMA weights (first class, if any)."""
    from .generate import GenerateRequest, run_generate

    classes = read_side_file(checkpoint).get("class_names") or []
    try:
        run_generate(GenerateRequest(model=str(checkpoint), label=classes[0] if classes else None,
                                     frames=cfg.sample_frames, seed=cfg.seed,
                                     output=checkpoint / "sample.mp4", quiet=True, device=cfg.device,
                                     dtype="fp32", overwrite=True), console)
    except Exception as err:  # a sample is a courtesy: never stop training for it
        console.print(f"[yellow]sample at {checkpoint.name} failed: {err}")
