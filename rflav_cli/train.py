"""Training: the rolling flow-matching objective over clips of W frames, on one device or
many (torchrun + DistributedDataParallel), with EMA weights, resumable atomic checkpoints.

A run folder holds `checkpoint-STEP/` folders in the release layout (EMA weights in
`model.safetensors`, `config.json`, `vocoder/`, `rflav.json`) plus `training_state/` (raw
weights, EMA, optimizer, step, data position), and `latest` → the newest complete one. `.lock`
is held by the process that trains into the folder.
Everything random is derived from (seed, step, rank), so stopping at step N and resuming gives
the same weights as an uninterrupted run.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from . import __version__
from .config import FLAV_SIZES, FPS, LATENT_CHANNELS, LATENT_SCALE, SAMPLE_RATE, VAE_DOWNSCALE
from .errors import FileFormatError
from .files import creation_mode, load_safetensors, read_json_object, save_safetensors
from .flow import flow_matching_loss, sample_training_levels
from .hub import (
    PRESETS,
    VOCODER_FILES,
    ResolveError,
    local_folder,
    read_side_file,
    resolve_model,
    write_side_file,
)
from .models.flav import FLAV, FLAVConfig
from .progress import TextColumn, progress_bar
from .requests import (
    TrainConfig,
    TrainError,
    TrainFile,
    cache_file,
    check_train_config,
    check_vocoder_folder,
    checkpoint_file,
    read_model_config,
    resolve_train_config,
    resume_train_config,
)
from .runtime import Dist, init_distributed, rank_device

STATE_DIR = "training_state"
LOCK_FILE = ".lock"
DEFAULT_VOCODER_PRESET = "dance"  # checkpoints get its HiFi-GAN unless --vocoder says otherwise


# ----------------------------------------------------------------------------------------
# Distributed helpers
# ----------------------------------------------------------------------------------------


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
        out += perm[offset : offset + take].tolist()
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
    """The FLAV of a new run: --size or --model-config, with the input size, window and class
    count that the data and the other settings give (a file that contradicts them is refused)."""
    files = [read_model_config(cfg.model_config)] if cfg.model_config else []
    cfg = resolve_train_config(cfg, files, defaults=True)
    given = files[0].model if files else {}
    if "num_classes" in given and given["num_classes"] != num_classes:
        raise TrainError(
            f"num_classes {given['num_classes']} in {files[0].name}, but the data has {num_classes} "
            "classes (class folders): remove num_classes from the file, the data sets it"
        )
    base = FLAV_SIZES[cfg.size] if cfg.size else {}
    config = FLAVConfig.from_dict(
        {
            "causal_attn": True,
            **base,
            **given,
            "in_channels": 3 if cfg.pixel_space else LATENT_CHANNELS,
            "latent_size": cfg.image_size if cfg.pixel_space else cfg.image_size // VAE_DOWNSCALE,
            "predict_frames": cfg.window,
            "num_classes": num_classes,
            "grad_ckpt": cfg.grad_ckpt,
        }
    )
    if config.hidden_size % config.num_heads or config.latent_size % config.patch_size:
        raise TrainError(
            f"{files[0].name if files else cfg.size}: hidden_size {config.hidden_size} must be a multiple "
            f"of num_heads {config.num_heads} and the {config.latent_size}x{config.latent_size} input of "
            f"patch_size {config.patch_size}: change the file or {{image_size}}",
            params=("image_size",),
        )
    return config


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
    save_safetensors(
        {k: v.detach().float().cpu().contiguous() for k, v in model.state_dict().items()},
        st / "model.safetensors",
    )
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


def _vocoder_folder(cfg: TrainConfig) -> Path | None:
    """The vocoder copied into every checkpoint: --vocoder FOLDER, none (Griffin-Lim), or by
    default the dance checkpoint's. A default that cannot be fetched stops the run before it
    starts: checkpoints never silently lose their vocoder."""
    folder = check_vocoder_folder(cfg.vocoder)
    if folder is not None or (cfg.vocoder or "").lower() == "none":
        return folder
    preset = PRESETS[DEFAULT_VOCODER_PRESET]
    try:
        return local_folder(preset.repo_id, VOCODER_FILES) / "vocoder"
    except ResolveError as err:
        found = re.match(r"[^(]*\((.*)\): ", err.template)
        why = found.group(1) if found else err.template
        raise TrainError(
            f"cannot fetch the default vocoder (vocoder/ of {preset.repo_id}: {why}): pass {{vocoder}} "
            "FOLDER (with config.json and vocoder.pt) or {vocoder} none for Griffin-Lim "
            f"(or run 'rflav download {preset.name}' while online)",
            params=("vocoder",),
        ) from None


_DAMAGED = "the checkpoint is damaged: delete it to resume from the one before, or train into another folder"


@contextmanager
def _run_lock(run_dir: Path, console, enabled: bool) -> Iterator[None]:
    """Hold RUN/.lock while training. A second `rflav train` on the same folder stops at once,
    and so temporary folders found once the lock is held can only be leftovers of runs that
    were killed: they are removed. The lock goes with the process, however it ends."""
    try:
        import fcntl
    except ImportError:  # no flock (Windows): no lock and no clean-up
        enabled = False
    if not enabled:
        yield
        return
    handle = open(run_dir / LOCK_FILE, "a+", encoding="utf-8")
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            owner = handle.read().strip() or "another process"
            raise TrainError(
                f"{run_dir} is being trained by {owner}: wait for it to finish or stop it, or give "
                "another {output}",
                params=("output",),
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"rflav train, pid {os.getpid()} on {socket.gethostname()}\n")
        handle.flush()
        for stale in sorted(run_dir.glob(".checkpoint-*.tmp")):
            shutil.rmtree(stale, ignore_errors=True)
            console.print(f"removed {stale.name}, left by a run that was stopped while saving", markup=False)
        if (run_dir / ".latest.tmp").is_symlink():
            (run_dir / ".latest.tmp").unlink()
        yield
    finally:
        handle.close()


def _cache_header(data: Path) -> tuple[Path, dict] | None:
    from .data import is_latent_cache

    for candidate in (data, data / "train"):
        if is_latent_cache(candidate):
            return candidate / "index.json", read_json_object(
                candidate / "index.json", "latent cache index", fix="run `rflav prepare` again"
            )
    return None


def _new_run_config(cfg: TrainConfig):
    """Settings of a new run, from what was asked, the files given and the defaults; and the
    --init checkpoint, resolved."""
    files: list[TrainFile] = []
    source = None
    if cfg.model_config:
        files.append(read_model_config(cfg.model_config))
    if cfg.init:
        source = resolve_model(cfg.init, need_vocoder=False)
        config = read_json_object(source.folder / "config.json", "model config")
        files.append(
            checkpoint_file(
                f"the checkpoint {cfg.init}", config, read_side_file(source.folder), source.audio_scale
            )
        )
    cache = _cache_header(Path(cfg.data))
    if cache is not None:
        files.append(cache_file(str(cache[0]), cache[1]))
    return resolve_train_config(cfg, files, defaults=True), source


def train(
    cfg: TrainConfig, console=None, stop=None, name_of: Callable[[str], str] | None = None
) -> Path | None:
    """Run (or resume) training; returns the last checkpoint written by this process.

    Settings left None in `cfg` take the resumed run's values, else those of the files given,
    else the defaults. `name_of` names a parameter in printed lines (the CLI passes its flags).
    """
    from rich.console import Console

    console = console or Console(stderr=True)
    name_of = name_of or (lambda param: param)
    main_rank = int(os.environ.get("RANK", "0")) == 0
    check_train_config(cfg)
    run_dir = Path(cfg.output)
    resume = latest_checkpoint(run_dir)
    state: dict = {}
    init_source = None
    if resume is not None:
        state = read_json_object(resume / STATE_DIR / "state.json", "training state", fix=_DAMAGED)
        if not isinstance(state.get("step"), int) or not isinstance(state.get("audio_scale"), (int, float)):
            raise FileFormatError(
                f"{resume / STATE_DIR / 'state.json'} (training state) lacks the step or the "
                f"audio scale: {_DAMAGED}"
            )
        saved_model = read_json_object(resume / "config.json", "model config", fix=_DAMAGED)
        cfg, changes = resume_train_config(
            cfg, state.get("config", {}), saved_model, state["audio_scale"], str(run_dir)
        )
        step = int(state["step"])
        if step >= cfg.max_steps:
            if main_rank:
                console.print(
                    f"{run_dir} is already at step {step} ≥ {name_of('max_steps')} {cfg.max_steps}: "
                    f"nothing to do (raise {name_of('max_steps')} to train further)",
                    markup=False,
                )
            return None
        if main_rank:
            console.print(
                f"resuming from step {step} ({run_dir / resume.name})", markup=False, highlight=False
            )
            if changes:
                console.print(
                    "changed since the saved run: "
                    + ", ".join(f"{name_of(name)} {then} → {now}" for name, then, now in changes),
                    markup=False,
                    highlight=False,
                )
    else:
        cfg, init_source = _new_run_config(cfg)
    vocoder_folder = _vocoder_folder(cfg)

    device = rank_device(cfg.device)
    d = init_distributed(device)
    if d.main:
        run_dir.mkdir(parents=True, exist_ok=True)
    _barrier(d)
    with _run_lock(run_dir, console, enabled=d.main):
        if d.main and latest_checkpoint(run_dir) != resume:  # another run saved since we looked
            raise TrainError(
                f"{run_dir} got a new checkpoint while this run was starting: run the command again"
            )
        return _train(cfg, run_dir, resume, state, init_source, vocoder_folder, device, d, console, stop)


def _train(
    cfg: TrainConfig,
    run_dir: Path,
    resume: Path | None,
    state: dict,
    init_source,
    vocoder_folder,
    device: torch.device,
    d: Dist,
    console,
    stop,
) -> Path | None:
    from .data import LatentClipDataset, estimate_audio_scale, open_training_data

    dataset = open_training_data(
        Path(cfg.data),
        "train",
        cfg.window,
        image_size=cfg.image_size,
        missing_audio=cfg.missing_audio,
        progress=d.main,
    )
    if len(dataset) == 0:
        raise TrainError(f"{cfg.data}: no clip of {cfg.window} frames in the train split")
    class_names = list(getattr(dataset, "class_names", []) or [])
    index = getattr(dataset, "index", None)
    data_info = {"clips": len(dataset)}
    if index is not None:
        data_info.update(videos=len(index.videos), skipped={k: len(v) for k, v in index.skipped.items() if v})
        if d.main:
            console.print(index.summary(cfg.window))

    if resume is not None:
        audio_scale = state["audio_scale"]
    else:
        audio_scale = cfg.audio_scale or estimate_audio_scale(dataset)
    dataset.audio_scale = audio_scale
    if d.main and resume is None:
        console.print(
            f"audio_scale {audio_scale:.6f}" + ("" if cfg.audio_scale else " (unit std of the training mel)")
        )

    # Model: resumed, or the released / given weights to fine-tune, or new.
    if resume is not None:
        config = FLAVConfig.from_dict(read_json_object(resume / "config.json", "model config", fix=_DAMAGED))
        config.grad_ckpt = cfg.grad_ckpt
        model = FLAV(config)
        model.load_state_dict(
            load_safetensors(resume / STATE_DIR / "model.safetensors", "training weights", fix=_DAMAGED)
        )
    elif init_source is not None:
        model = FLAV.from_pretrained(init_source.folder)
        model.config.grad_ckpt = cfg.grad_ckpt
        model.gradient_checkpointing = cfg.grad_ckpt
        if model.num_classes != len(class_names) and class_names:
            raise TrainError(
                f"{{init}} {cfg.init} has {model.num_classes} classes but the data has {len(class_names)}",
                params=("init",),
            )
    else:
        torch.manual_seed(cfg.seed)
        model = FLAV(build_model_config(cfg, len(class_names)))
        model.initialize_weights()
    model.to(device).train()

    ema = {k: v.detach().float().clone() for k, v in model.state_dict().items()}
    if resume is not None:
        saved_ema = load_safetensors(resume / STATE_DIR / "ema.safetensors", "EMA weights", fix=_DAMAGED)
        ema = {k: v.to(device) for k, v in saved_ema.items()}

    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    if resume is not None:
        optimizer.load_state_dict(_optimizer_state(resume / STATE_DIR / "optimizer.pt", device))
        for group in optimizer.param_groups:  # the saved state holds the old ones; a resume may change them
            group.update(lr=cfg.lr, weight_decay=cfg.weight_decay)

    step = int(state.get("step", 0))
    position = int(state.get("data_position", 0))

    vae = None
    if not cfg.pixel_space and not isinstance(dataset, LatentClipDataset):
        from .models.autoencoder import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(cfg.autoencoder).to(device).eval().requires_grad_(False)

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
        # What makes the sound: the HiFi-GAN in vocoder/, or Griffin-Lim by intent (--vocoder none).
        "vocoder": "hifigan" if vocoder_folder is not None else "griffin-lim",
        "fps": FPS,
        "sample_rate": SAMPLE_RATE,
        "rflav_version": __version__,
    }
    side = {k: v for k, v in side.items() if v is not None}

    loader = _Fetcher(dataset, threads=0 if isinstance(dataset, LatentClipDataset) else cfg.num_workers)
    metrics_path = run_dir / "metrics.jsonl"
    last_written: Path | None = None
    progress = _progress(console, d.main)
    task = progress.add_task(
        "training", total=cfg.max_steps, completed=step, loss=float("nan"), clips=0.0, steps=0.0
    )
    began, clips_done, window_loss, window_count = time.perf_counter(), 0, 0.0, 0
    try:
        with progress:
            while step < cfg.max_steps:
                if stop is not None and stop.is_set():
                    break
                # Everything random in this step (latent sampling in the dataset, label dropout in
                # the model, noise and levels) derives from (seed, step, rank).
                torch.manual_seed((cfg.seed * 1_000_003 + step) * 4099 + d.rank)
                indices = global_batch_indices(len(dataset), cfg.seed, position, cfg.batch_size * d.world)
                mine = indices[d.rank * cfg.batch_size : (d.rank + 1) * cfg.batch_size]
                items = loader.fetch(mine)
                position += cfg.batch_size * d.world
                g = step_generator(cfg.seed, step, d.rank, device)
                v, a, y = _batch(items, device, vae, g)
                t = sample_training_levels(v.shape[0], cfg.window, generator=g, device=device)
                with autocast:
                    out = flow_matching_loss(
                        lambda vv, aa, tt: forward(vv, aa, tt, y),
                        v,
                        a,
                        t,
                        weighting=cfg.weighting,
                        generator=g,
                    )
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
                progress.update(
                    task,
                    completed=step,
                    loss=loss,
                    clips=clips_done / max(elapsed, 1e-9),
                    steps=clips_done / (cfg.batch_size * d.world) / max(elapsed, 1e-9),
                )
                if d.main and (step % cfg.log_every == 0 or step == cfg.max_steps):
                    record = {
                        "step": step,
                        "loss": window_loss / window_count,
                        "video_loss": float(out["video"]),
                        "audio_loss": float(out["audio"]),
                        "grad_norm": float(grad_norm),
                        "steps_per_s": clips_done / (cfg.batch_size * d.world) / max(elapsed, 1e-9),
                        "clips_per_s": clips_done / max(elapsed, 1e-9),
                        "time": time.time(),
                    }
                    with open(metrics_path, "a") as f:
                        f.write(json.dumps(record) + "\n")
                    window_loss, window_count = 0.0, 0
                if step % cfg.save_every == 0 or step == cfg.max_steps:
                    last_written = _save(
                        run_dir,
                        step,
                        model,
                        ema,
                        optimizer,
                        cfg,
                        audio_scale,
                        position,
                        d,
                        side,
                        vocoder_folder,
                        data_info,
                    )
                if d.main and cfg.sample_every and step % cfg.sample_every == 0 and last_written is not None:
                    _sample(last_written, cfg, console)

        if (
            stop is not None
            and stop.is_set()
            and (last_written is None or not last_written.name.endswith(f"{step:08d}"))
        ):
            last_written = _save(
                run_dir,
                step,
                model,
                ema,
                optimizer,
                cfg,
                audio_scale,
                position,
                d,
                side,
                vocoder_folder,
                data_info,
            )
    finally:
        loader.close()
    _barrier(d)
    return last_written


def _optimizer_state(path: Path, device: torch.device) -> dict:
    try:
        state = torch.load(path, weights_only=True, map_location=device)
    except FileNotFoundError:
        raise FileFormatError(f"{path} (optimizer state) is missing: {_DAMAGED}") from None
    except Exception as exc:  # noqa: BLE001 - truncated or foreign pickles fail in many ways
        raise FileFormatError(
            f"{path} (optimizer state) cannot be read ({type(exc).__name__}): {_DAMAGED}"
        ) from None
    if not isinstance(state, dict) or "state" not in state or "param_groups" not in state:
        raise FileFormatError(f"{path} (optimizer state) is not an optimizer state: {_DAMAGED}")
    return state


def _save(
    run_dir, step, model, ema, optimizer, cfg, audio_scale, position, d: Dist, side, vocoder_folder, data_info
):
    path = None
    checksum = torch.tensor(
        [float(sum(p.double().sum() for p in model.state_dict().values()))], dtype=torch.float64
    )
    if d.world > 1 and dist.get_backend() == "nccl":
        checksum = checksum.to(next(model.parameters()).device)
    checksums = [checksum.clone() for _ in range(d.world)]
    if d.world > 1:  # every rank must hold the same weights; recorded so it can be checked
        dist.all_gather(checksums, checksum)
    if d.main:
        state = {
            "step": step,
            "data_position": position,
            "audio_scale": audio_scale,
            "world_size": d.world,
            "seed": cfg.seed,
            "config": asdict(cfg),
            "data": data_info,
            "rank_weight_checksums": [float(c.item()) for c in checksums],
            "rflav_version": __version__,
        }
        try:
            path = _write_checkpoint(
                run_dir, step, model, ema, optimizer, state, side, vocoder_folder, cfg.keep
            )
        except BaseException:  # disk full, a failed copy …: no half-written folder stays behind
            shutil.rmtree(run_dir / f".checkpoint-{step:08d}.tmp", ignore_errors=True)
            raise
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
            latents = posterior.mean + posterior.std * torch.randn(
                posterior.mean.shape, generator=g, device=device
            )
        video = (latents * LATENT_SCALE).view(b, w, *latents.shape[1:])
    y = labels if bool((labels >= 0).all()) and labels.numel() else None
    return video, audio, y


def _progress(console, enabled: bool):
    return progress_bar(
        TextColumn("step {task.completed:>7.0f}/{task.total:.0f}"),
        TextColumn("loss {task.fields[loss]:.4f}"),
        TextColumn("{task.fields[steps]:>6.2f} steps/s"),
        TextColumn("{task.fields[clips]:>7.1f} clips/s"),
        console=console,
        enabled=enabled,
    )


def _sample(checkpoint: Path, cfg: TrainConfig, console) -> None:
    """Write a short sample MP4 into the checkpoint from its EMA weights (first class, if any)."""
    from .generate import GenerateRequest, run_generate

    classes = read_side_file(checkpoint).get("class_names") or []
    try:
        run_generate(
            GenerateRequest(
                model=str(checkpoint),
                label=classes[0] if classes else None,
                frames=cfg.sample_frames,
                seed=cfg.seed,
                output=checkpoint / "sample.mp4",
                quiet=True,
                device=cfg.device,
                dtype="fp32",
                overwrite=True,
            ),
            console,
        )
    except Exception as err:  # a sample is a courtesy: never stop training for it
        console.print(f"[yellow]sample at {checkpoint.name} failed: {err}")
