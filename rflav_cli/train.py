"""Training: the rolling flow-matching objective over clips of W frames, on one device or
many (torchrun + DistributedDataParallel), with EMA weights, resumable atomic checkpoints.

A run folder holds `checkpoint-STEP/` folders in the release layout (EMA weights in
`model.safetensors`, `config.json`, `vocoder/`, `rflav.json`) plus `training_state/` (raw
weights, EMA, optimizer, step, data position), and `latest` → the newest complete one. `.lock`
is held by the process that trains into the folder. A checkpoint is never deleted before the
one that replaces it is in place, so a run killed at any moment leaves a complete one to resume.
Everything random is derived from (seed, step, rank), so stopping at step N and resuming gives
the same weights as an uninterrupted run on a CPU; GPUs' attention and convolution gradients
accumulate in a nondeterministic order, so there the two agree up to rounding.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from rich.console import Console
from torch.nn.parallel import DistributedDataParallel

from . import __version__
from .config import FLAV_SIZES, FPS, LATENT_CHANNELS, LATENT_SCALE, SAMPLE_RATE, VAE_DOWNSCALE
from .data import (
    LatentClipDataset,
    VideoClipDataset,
    estimate_audio_scale,
    is_latent_cache,
    open_training_data,
)
from .errors import FileFormatError
from .files import atomic_write, creation_mode, read_json_object
from .flow import flow_matching_loss, sample_training_levels
from .generate import GenerationInterrupted, run_generate
from .hub import (
    PRESETS,
    VOCODER_FILES,
    ResolvedModel,
    ResolveError,
    local_folder,
    read_side_file,
    resolve_model,
    write_side_file,
)
from .models.autoencoder import AutoencoderKL
from .models.flav import FLAV, FLAVConfig
from .progress import TextColumn, progress_bar
from .requests import (
    GenerateRequest,
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
from .runtime import (
    Dist,
    check_one_process_per_gpu,
    init_distributed,
    launched_by_torchrun,
    rank_device,
    tf32_scope,
)
from .tensorfiles import load_safetensors, save_safetensors

try:
    import fcntl
except ImportError:  # no flock on Windows: runs go without a lock
    fcntl = None

STATE_DIR = "training_state"
LOCK_FILE = ".lock"
METRICS_FILE = "metrics.jsonl"
DEFAULT_VOCODER_PRESET = "dance"  # checkpoints get its HiFi-GAN unless --vocoder says otherwise


class TrainingInterrupted(KeyboardInterrupt):
    """A run stopped (Ctrl-C, SIGTERM) before --max-steps, once the step it reached is saved.

    `checkpoint` holds that step (on every rank, though only rank 0 wrote it); the same request
    resumes the run. `exit_code` is 128 + the signal number, as for an interrupted generation."""

    def __init__(self, checkpoint: Path, step: int, max_steps: int, signum: int = signal.SIGINT) -> None:
        self.message = (
            f"interrupted: stopped at step {step} of {max_steps}, saved in {checkpoint} "
            "(the same command resumes the run)"
        )
        super().__init__(self.message)
        self.checkpoint = checkpoint
        self.step = step
        self.exit_code = 128 + int(signum)

    def __str__(self) -> str:
        return self.message


# ----------------------------------------------------------------------------------------
# Ranks: barriers, the global batch order, per-step seeds
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


def step_seed(seed: int, step: int, rank: int) -> int:
    """The seed of one step on one rank, for its generator and for the global RNG."""
    return (seed * 1_000_003 + step) * 4099 + rank


def step_generator(seed: int, step: int, rank: int, device: torch.device) -> torch.Generator:
    """The RNG of one step on one rank: noise, levels and latent draws come from it."""
    g = torch.Generator(device=device)
    g.manual_seed(step_seed(seed, step, rank))
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
    tmp = run_dir / f".checkpoint-{step:08d}{_TMP}"
    aside = run_dir / f".checkpoint-{step:08d}{_ASIDE}"
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
    _fsync_tree(tmp)
    # state.json last, once the rest is on disk: a folder that has it is complete (_is_complete).
    with open(st / "state.json", "w") as f:
        f.write(json.dumps(state, indent=2) + "\n")
        f.flush()
        os.fsync(f.fileno())
    if final.exists():
        # Moved aside, not deleted, until the new folder is in place: a process killed in between
        # leaves the old one, which latest_checkpoint finds and the next run puts back.
        if _is_complete(final) or not aside.exists():
            shutil.rmtree(aside, ignore_errors=True)
            os.replace(final, aside)
        else:  # a damaged folder whose complete copy is already aside
            shutil.rmtree(final)
    try:
        os.replace(tmp, final)
    except BaseException:
        if aside.exists() and not final.exists():
            os.replace(aside, final)
        raise
    _point_latest(run_dir, final.name)
    shutil.rmtree(aside, ignore_errors=True)
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


_TMP = ".tmp"  # .checkpoint-STEP.tmp: a checkpoint being written
_ASIDE = ".old"  # .checkpoint-STEP.old: the one it replaces, until it is in place
_COPY_NAME = re.compile(r"\.(checkpoint-\d+)(\.tmp|\.old)")


def _is_complete(folder: Path) -> bool:
    return (folder / STATE_DIR / "state.json").is_file()


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint: `latest` if it resolves, else the highest step.

    A save killed half-way can leave a step only in `.checkpoint-STEP.old` (the folder it was
    replacing, moved aside) or in a complete `.checkpoint-STEP.tmp`; that copy counts for its
    step, and the next run puts it back in place (_put_back_interrupted_saves)."""
    link = run_dir / "latest"
    if link.exists() and _is_complete(link):
        return link.resolve()
    best: dict[int, Path] = {}
    for path in run_dir.glob("checkpoint-*"):
        if re.fullmatch(r"checkpoint-\d+", path.name) and _is_complete(path):
            best[int(path.name.split("-")[1])] = path
    for suffix in (_ASIDE, _TMP):  # the copy that was in place before is preferred
        for path in run_dir.glob(f".checkpoint-*{suffix}"):
            found = _COPY_NAME.fullmatch(path.name)
            step = int(found.group(1).split("-")[1]) if found else None
            if step is not None and step not in best and _is_complete(path):
                best[step] = path
    return best[max(best)].resolve() if best else None


def _in_place(checkpoint: Path) -> Path:
    """The checkpoint-STEP folder that `checkpoint` (maybe a copy left by a killed save) is put back as."""
    found = _COPY_NAME.fullmatch(checkpoint.name)
    return checkpoint.with_name(found.group(1)) if found else checkpoint


def _put_back_interrupted_saves(run_dir: Path, console: Console, remove: bool = True) -> None:
    """Put in place the checkpoint a save killed half-way left aside (or, failing that, its
    complete temporary folder), then remove what such saves left; never the only complete copy
    of a step (one whose checkpoint-STEP is there but damaged stays)."""
    copies = sorted(p for p in run_dir.glob(".checkpoint-*") if _COPY_NAME.fullmatch(p.name))
    for suffix in (_ASIDE, _TMP):
        for copy in copies:
            final = _in_place(copy)
            if copy.name.endswith(suffix) and not final.exists() and _is_complete(copy):
                os.replace(copy, final)
                console.print(f"put back {final.name} from {copy.name}, left by a stopped save", markup=False)
    for copy in copies if remove else []:
        if copy.exists() and not (_is_complete(copy) and not _is_complete(_in_place(copy))):
            shutil.rmtree(copy, ignore_errors=True)
            console.print(f"removed {copy.name}, left by a run that was stopped while saving", markup=False)


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
def _run_lock(run_dir: Path, console: Console, enabled: bool) -> Iterator[None]:
    """Hold RUN/.lock while training. A second `rflav train` on the same folder stops at once,
    and so temporary folders found once the lock is held can only be leftovers of runs that
    were killed: a checkpoint they hold is put back in place, the rest removed. The lock goes
    with the process, however it ends."""
    if not enabled:
        yield
        return
    if fcntl is None:  # no flock (Windows): no lock; what a resume reads is put back, nothing removed
        _put_back_interrupted_saves(run_dir, console, remove=False)
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
        _put_back_interrupted_saves(run_dir, console)
        if (run_dir / ".latest.tmp").is_symlink():
            (run_dir / ".latest.tmp").unlink()
        yield
    finally:
        handle.close()


def _cache_header(data: Path) -> tuple[Path, dict] | None:
    for candidate in (data, data / "train"):
        if is_latent_cache(candidate):
            return candidate / "index.json", read_json_object(
                candidate / "index.json", "latent cache index", fix="run `rflav prepare` again"
            )
    return None


def _new_run_config(cfg: TrainConfig) -> tuple[TrainConfig, ResolvedModel | None]:
    """Settings of a new run, from what was asked, the files given and the defaults; and the
    --init checkpoint, resolved."""
    files: list[TrainFile] = []
    source = None
    if cfg.model_config:
        files.append(read_model_config(cfg.model_config))
    if cfg.init:
        source = resolve_model(cfg.init, need_vocoder=False, flag="--init")
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


# ----------------------------------------------------------------------------------------
# The run: what `train` settles before taking the folder, the data, the state a checkpoint
# saves, and the means of one process to take steps.
# ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AudioScale:
    """The mel scale of a run and where it came from."""

    value: float
    origin: str  # how the log line names the source, e.g. "given by --audio-scale"

    def describe(self) -> str:
        return f"audio_scale {self.value:.6g} ({self.origin})"


@dataclass
class _Plan:
    """What `train` settled before taking the run folder."""

    cfg: TrainConfig  # resolved: the run's or the files' values and the defaults filled in
    run_dir: Path
    resume: Path | None  # the checkpoint to continue
    saved: dict[str, Any]  # its training_state/state.json; {} for a new run
    init: ResolvedModel | None  # the --init weights of a new run
    vocoder_folder: Path | None  # copied into every checkpoint; None: Griffin-Lim
    audio_scale: AudioScale | None  # None: to be estimated from the data


@dataclass
class _Data:
    dataset: VideoClipDataset | LatentClipDataset
    class_names: list[str]
    info: dict[str, Any]  # recorded in state.json as "data"


@dataclass
class _TrainState:
    """Everything a checkpoint holds, and the run folder it goes to."""

    cfg: TrainConfig
    run_dir: Path
    model: FLAV
    ema: dict[str, torch.Tensor]
    optimizer: torch.optim.Optimizer
    step: int
    saved_step: int | None  # the step a checkpoint on disk holds: the resumed one, then the last saved
    data_position: int  # in the global sample stream, see global_batch_indices
    audio_scale: float
    side: dict[str, Any]  # rflav.json
    data_info: dict[str, Any]
    vocoder_folder: Path | None


@dataclass
class _Engine:
    """What one process takes steps with; nothing of it is saved."""

    device: torch.device
    ranks: Dist
    forward: Callable[..., Any]  # the model as called: wrapped in DDP and compiled when asked
    loader: _Fetcher
    vae: AutoencoderKL | None  # encodes decoded frames; None with a latent cache or in pixel space


@dataclass
class _StepResult:
    loss: float  # the mean over the ranks
    video_loss: float  # this rank's
    audio_loss: float
    grad_norm: float


def train(
    cfg: TrainConfig,
    console: Console | None = None,
    stop: threading.Event | None = None,
    name_of: Callable[[str], str] | None = None,
) -> Path | None:
    """Run (or resume) training; returns the last checkpoint written by this process.

    Settings left None in `cfg` take the resumed run's values, else those of the files given,
    else the defaults. `name_of` names a parameter in printed lines (the CLI passes its flags).
    A run stopped through `stop` before --max-steps saves the step it reached, then raises
    :class:`TrainingInterrupted` (on every rank).
    """
    console = console or Console(stderr=True)
    name_of = name_of or (lambda param: param)
    check_train_config(cfg)
    plan = _plan(cfg, console, name_of, main_rank=int(os.environ.get("RANK", "0")) == 0)
    if plan is None:
        return None

    device = rank_device(plan.cfg.device)
    check_one_process_per_gpu(device)
    joins_group = launched_by_torchrun() and not dist.is_initialized()
    d = init_distributed(device)
    if d.main:
        plan.run_dir.mkdir(parents=True, exist_ok=True)
    _barrier(d)
    with _run_lock(plan.run_dir, console, enabled=d.main):
        now = latest_checkpoint(plan.run_dir) if d.main else None
        if d.main and (now and _in_place(now)) != plan.resume:  # another run saved since we looked
            raise TrainError(
                f"{plan.run_dir} got a new checkpoint while this run was starting: run the command again"
            )
        _barrier(d)  # the checkpoint is read once rank 0 has put back one that a killed save left aside
        written, stopped_at = _train(plan, device, d, console, stop)
    if joins_group:  # every rank got here (the last barrier): leave the group as it was made
        dist.destroy_process_group()
    if stopped_at is not None:
        raise TrainingInterrupted(
            plan.run_dir / f"checkpoint-{stopped_at:08d}",
            stopped_at,
            plan.cfg.max_steps,
            getattr(stop, "signum", None) or signal.SIGINT,
        )
    return written


def _plan(
    asked: TrainConfig, console: Console, name_of: Callable[[str], str], main_rank: bool
) -> _Plan | None:
    """The settings, weights, vocoder and (when known without the data) audio scale of the run
    that `asked` resumes or starts; None when the resumed run is already done."""
    run_dir = Path(asked.output)
    found = latest_checkpoint(run_dir)
    # A copy left by a killed save is read now and put back in place before the weights are.
    resume = None if found is None else _in_place(found)
    if found is None:
        cfg, init = _new_run_config(asked)
        saved: dict[str, Any] = {}
    else:
        resumed = _resume_config(asked, run_dir, found, console, name_of, main_rank)
        if resumed is None:
            return None
        cfg, saved = resumed
        init = None
    return _Plan(
        cfg=cfg,
        run_dir=run_dir,
        resume=resume,
        saved=saved,
        init=init,
        vocoder_folder=_vocoder_folder(cfg),
        audio_scale=_given_audio_scale(asked, cfg, saved, name_of),
    )


def _resume_config(
    asked: TrainConfig,
    run_dir: Path,
    resume: Path,
    console: Console,
    name_of: Callable[[str], str],
    main_rank: bool,
) -> tuple[TrainConfig, dict[str, Any]] | None:
    """The settings of the resumed run and its saved state, read from `resume` (a checkpoint or
    the copy of one a killed save left); None (said) when it is already at --max-steps."""
    state_path = resume / STATE_DIR / "state.json"
    saved = read_json_object(state_path, "training state", fix=_DAMAGED)
    if not isinstance(saved.get("step"), int) or not isinstance(saved.get("audio_scale"), (int, float)):
        raise FileFormatError(f"{state_path} (training state) lacks the step or the audio scale: {_DAMAGED}")
    saved_model = read_json_object(resume / "config.json", "model config", fix=_DAMAGED)
    cfg, changes = resume_train_config(
        asked, saved.get("config", {}), saved_model, saved["audio_scale"], str(run_dir)
    )
    step = int(saved["step"])
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
            f"resuming from step {step} ({run_dir / _in_place(resume).name})", markup=False, highlight=False
        )
        if changes:
            console.print(
                "changed since the saved run: "
                + ", ".join(f"{name_of(name)} {then} → {now}" for name, then, now in changes),
                markup=False,
                highlight=False,
            )
    return cfg, saved


def _given_audio_scale(
    asked: TrainConfig, cfg: TrainConfig, saved: dict[str, Any], name_of: Callable[[str], str]
) -> AudioScale | None:
    """The audio scale when something other than the data gives it, decided before the data is
    read: the flag, else the resumed run's, else the --init checkpoint's; None when it must be
    estimated from the data.

    A flag never contradicts the other two (resume_train_config and resolve_train_config refuse
    a different value); on a resume the saved number is kept as it is, so that the run goes on
    exactly as an uninterrupted one would."""
    if saved:
        return AudioScale(saved["audio_scale"], "of the resumed run")
    if asked.audio_scale is not None:
        return AudioScale(asked.audio_scale, f"given by {name_of('audio_scale')}")
    if cfg.audio_scale is not None:  # of a new run, only an --init checkpoint (or preset) sets it
        return AudioScale(cfg.audio_scale, f"of the checkpoint {cfg.init}")
    return None


def _train(
    plan: _Plan, device: torch.device, d: Dist, console: Console, stop: threading.Event | None
) -> tuple[Path | None, int | None]:
    """The last checkpoint this process wrote, and the step the run was stopped at (None when
    it reached --max-steps)."""
    data = _open_data(plan.cfg, d, console)
    _check_classes(plan, data.class_names, console, d.main)
    scale = plan.audio_scale or AudioScale(estimate_audio_scale(data.dataset), "unit std of the training mel")
    data.dataset.audio_scale = scale.value
    if d.main:
        console.print(scale.describe())
    run = _build_state(plan, data, scale.value, device)
    if d.main:
        _trim_metrics(run.run_dir / METRICS_FILE, run.step)
    engine = _build_engine(run, data.dataset, device, d)
    try:
        last_written, stopped = _train_loop(run, engine, console, stop)
    finally:
        engine.loader.close()
    _barrier(d)
    return last_written, run.step if stopped else None


def _check_classes(plan: _Plan, found: list[str], console: Console, main_rank: bool) -> None:
    """Refuse, before any step, data whose classes are not those of the resumed or --init
    weights: the labels are indices into the model's class embeddings, so other class folders
    would train other classes' embeddings (or the guidance's null label) or fail mid-step. Only
    fine-tuning (--init) may give the same number of classes other names: said, not refused."""
    if plan.resume is not None:
        folder, names = plan.resume, read_side_file(plan.resume).get("class_names")
    elif plan.init is not None:
        folder, names = plan.init.folder, plan.init.class_names
    else:
        return
    config = read_json_object(folder / "config.json", "model config", fix=_DAMAGED)
    count = config.get("num_classes") or 0
    if count == len(found) and (not names or list(names) == found):
        return
    if count == len(found) and plan.resume is None:
        if main_rank:
            pairs = ", ".join(f"{old} → {new}" for old, new in zip(names, found))
            note = f"the initial checkpoint's class embeddings serve these classes: {pairs}"
            console.print(note, markup=False)
        return
    if count == 0:
        saved, same = "no classes (unconditional)", "data without class folders (videos directly in train/)"
    elif names:
        saved, same = f"the classes {', '.join(names)}", f"data whose class folders are {', '.join(names)}"
    else:
        saved, same = f"{count} classes", f"data with {count} class folders"
    has = f"the class folders {', '.join(found)}" if found else "no class folders (videos directly in train/)"
    if plan.resume is not None:
        raise TrainError(
            f"{plan.cfg.data} has {has} but the run in {plan.run_dir} was trained on {saved}: resume it on "
            f"{same}, or start a new run with another {{output}}",
            params=("output",),
        )
    raise TrainError(
        f"{plan.cfg.data} has {has} but the {{init}} checkpoint {plan.cfg.init} has {saved}: train on "
        f"{same}, or leave out {{init}} to train new weights",
        params=("init",),
    )


def _trim_metrics(path: Path, step: int) -> None:
    """Drop the lines of metrics.jsonl past `step`, where this run starts: a run killed after
    logging steps it had not saved takes them again, and would log them twice. A last line cut
    short by the kill goes too. Rewritten atomically, and only when something goes."""
    try:
        lines = path.read_bytes().splitlines(keepends=True)
    except FileNotFoundError:
        return
    kept = []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            if line.endswith(b"\n"):  # not a line this code wrote: left as it is
                kept.append(line)
            continue
        logged = record.get("step") if isinstance(record, dict) else None
        if isinstance(logged, int) and not isinstance(logged, bool) and logged > step:
            continue
        kept.append(line if line.endswith(b"\n") else line + b"\n")
    if kept != lines:
        atomic_write(path, lambda tmp: Path(tmp).write_bytes(b"".join(kept)))


def _open_data(cfg: TrainConfig, d: Dist, console: Console) -> _Data:
    """The train split (videos or a latent cache), at audio scale 1 until the run's is known."""
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
    info: dict[str, Any] = {"clips": len(dataset)}
    index = getattr(dataset, "index", None)
    if index is not None:
        info.update(videos=len(index.videos), skipped={k: len(v) for k, v in index.skipped.items() if v})
        if d.main:
            console.print(index.summary(cfg.window))
    return _Data(dataset, list(getattr(dataset, "class_names", []) or []), info)


def _build_state(plan: _Plan, data: _Data, audio_scale: float, device: torch.device) -> _TrainState:
    """The resumed state, or a new one from the --init weights or new weights."""
    cfg = plan.cfg
    model = _build_model(plan, data.class_names)
    model.to(device).train()
    return _TrainState(
        cfg=cfg,
        run_dir=plan.run_dir,
        model=model,
        ema=_build_ema(plan, model, device),
        optimizer=_build_optimizer(plan, model),
        step=int(plan.saved.get("step", 0)),
        # On every rank: a stop before the first new step then saves nothing (its checkpoint is there).
        saved_step=int(plan.saved["step"]) if plan.resume is not None else None,
        data_position=int(plan.saved.get("data_position", 0)),
        audio_scale=audio_scale,
        side=_side_file(cfg, data.class_names, audio_scale, plan.vocoder_folder),
        data_info=data.info,
        vocoder_folder=plan.vocoder_folder,
    )


def _build_model(plan: _Plan, class_names: list[str]) -> FLAV:
    """The resumed weights, or the released / given ones to fine-tune, or new ones."""
    cfg = plan.cfg
    if plan.resume is not None:
        config = FLAVConfig.from_dict(
            read_json_object(plan.resume / "config.json", "model config", fix=_DAMAGED)
        )
        config.grad_ckpt = cfg.grad_ckpt
        model = FLAV(config)
        model.load_state_dict(
            load_safetensors(plan.resume / STATE_DIR / "model.safetensors", "training weights", fix=_DAMAGED)
        )
        return model
    if plan.init is not None:
        model = FLAV.from_pretrained(plan.init.folder)
        model.config.grad_ckpt = cfg.grad_ckpt
        model.gradient_checkpointing = cfg.grad_ckpt
        return model  # its classes are those of the data: _check_classes
    torch.manual_seed(cfg.seed)
    model = FLAV(build_model_config(cfg, len(class_names)))
    model.initialize_weights()
    return model


def _build_ema(plan: _Plan, model: FLAV, device: torch.device) -> dict[str, torch.Tensor]:
    if plan.resume is None:
        return {k: v.detach().float().clone() for k, v in model.state_dict().items()}
    saved = load_safetensors(plan.resume / STATE_DIR / "ema.safetensors", "EMA weights", fix=_DAMAGED)
    return {k: v.to(device) for k, v in saved.items()}


def _build_optimizer(plan: _Plan, model: FLAV) -> torch.optim.Optimizer:
    cfg = plan.cfg
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    if plan.resume is not None:
        optimizer.load_state_dict(_optimizer_state(plan.resume / STATE_DIR / "optimizer.pt"))
        for group in optimizer.param_groups:  # the saved state holds the old ones; a resume may change them
            group.update(lr=cfg.lr, weight_decay=cfg.weight_decay)
    return optimizer


def _side_file(
    cfg: TrainConfig, class_names: list[str], audio_scale: float, vocoder_folder: Path | None
) -> dict[str, Any]:
    """The rflav.json of every checkpoint of the run."""
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
    return {k: v for k, v in side.items() if v is not None}


def _build_engine(
    run: _TrainState, dataset: VideoClipDataset | LatentClipDataset, device: torch.device, d: Dist
) -> _Engine:
    cfg = run.cfg
    vae = None
    if not cfg.pixel_space and not isinstance(dataset, LatentClipDataset):
        vae = AutoencoderKL.from_pretrained(cfg.autoencoder).to(device).eval().requires_grad_(False)
    net: torch.nn.Module = run.model
    if d.world > 1:
        net = DistributedDataParallel(run.model, device_ids=[device.index] if device.type == "cuda" else None)
    return _Engine(
        device=device,
        ranks=d,
        forward=torch.compile(net) if cfg.compile else net,
        loader=_Fetcher(dataset, threads=0 if isinstance(dataset, LatentClipDataset) else cfg.num_workers),
        vae=vae,
    )


def _train_loop(
    run: _TrainState, engine: _Engine, console: Console, stop: threading.Event | None
) -> tuple[Path | None, bool]:
    """Steps up to --max-steps or until `stop` is set, logging, saving and sampling on the way;
    a stop saves the step reached. Returns the last checkpoint this process wrote and whether
    `stop` ended the run before --max-steps."""
    cfg, d = run.cfg, engine.ranks
    last_written: Path | None = None
    meter = _Meter(clips_per_step=cfg.batch_size * d.world)
    progress = _progress(console, d.main)
    task = progress.add_task(
        "training", total=cfg.max_steps, completed=run.step, loss=float("nan"), clips=0.0, steps=0.0
    )
    stopped = False
    with progress:
        while run.step < cfg.max_steps:
            stopped = _stop_agreed(stop, engine)
            if stopped:
                break
            result = _train_step(run, engine)
            _check_finite(run, result)
            meter.add(result.loss)
            clips_per_s, steps_per_s = meter.rates()
            progress.update(task, completed=run.step, loss=result.loss, clips=clips_per_s, steps=steps_per_s)
            if d.main and (run.step % cfg.log_every == 0 or run.step == cfg.max_steps):
                with open(run.run_dir / METRICS_FILE, "a") as f:
                    f.write(json.dumps(meter.take_record(run.step, result)) + "\n")
            if run.step % cfg.save_every == 0 or run.step == cfg.max_steps:
                _check_finite(run)
                last_written, run.saved_step = _save(run, ranks=d), run.step
            if d.main and cfg.sample_every and run.step % cfg.sample_every == 0 and last_written is not None:
                _sample(last_written, cfg, console, stop)
    if stopped and run.saved_step != run.step:
        _check_finite(run)
        last_written, run.saved_step = _save(run, ranks=d), run.step
    return last_written, stopped


def _check_finite(run: _TrainState, result: _StepResult | None = None) -> None:
    """Stop a run that diverged before it logs or saves anything of it: after each step, a loss
    or gradient norm that is not finite (then the step has left the weights non-finite too);
    before each save, the weights themselves. Both are the same on every rank (reduced losses,
    synchronised weights), so every rank stops here together."""
    if result is not None:
        if math.isfinite(result.loss) and math.isfinite(result.grad_norm):
            return
        what = f"loss {result.loss:g}, gradient norm {result.grad_norm:g}"
    elif all(bool(torch.isfinite(p).all()) for p in run.model.parameters()):
        return
    else:
        what = "weights not finite"
    last = "" if run.saved_step is None else f"; checkpoint-{run.saved_step:08d} is from before"
    raise TrainError(
        f"training diverged at step {run.step} ({what}){last}: lower {{lr}} (now {run.cfg.lr:g}) and "
        "start again with another {output}",
        params=("lr", "output"),
    )


def _stop_agreed(stop: threading.Event | None, engine: _Engine) -> bool:
    """Whether to stop before the next step, the same answer on every rank: a signal reaches
    the ranks at slightly different moments, and ranks that went on alone would wait forever
    in collectives the others never make."""
    asked = stop is not None and stop.is_set()
    if engine.ranks.world == 1:
        return asked
    on_gpu = dist.get_backend() == "nccl"
    flag = torch.tensor([int(asked)], device=engine.device if on_gpu else "cpu")
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def _train_step(run: _TrainState, engine: _Engine) -> _StepResult:
    """One optimizer step on this rank's share of the next global batch, then the EMA update."""
    cfg, d, device = run.cfg, engine.ranks, engine.device
    # Everything random in this step (latent sampling in the dataset, label dropout in the
    # model, noise and levels) derives from (seed, step, rank).
    torch.manual_seed(step_seed(cfg.seed, run.step, d.rank))
    per_step = cfg.batch_size * d.world
    indices = global_batch_indices(len(engine.loader.dataset), cfg.seed, run.data_position, per_step)
    items = engine.loader.fetch(indices[d.rank * cfg.batch_size : (d.rank + 1) * cfg.batch_size])
    run.data_position += per_step
    g = step_generator(cfg.seed, run.step, d.rank, device)
    v, a, y = _batch(items, device, engine.vae, g)
    t = sample_training_levels(v.shape[0], cfg.window, generator=g, device=device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    with autocast:
        out = flow_matching_loss(
            lambda vv, aa, tt: engine.forward(vv, aa, tt, y), v, a, t, weighting=cfg.weighting, generator=g
        )
    run.optimizer.zero_grad(set_to_none=True)
    out["loss"].backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(run.model.parameters(), cfg.grad_clip)
    run.optimizer.step()
    run.step += 1
    _ema_update(run.ema, run.model, min(cfg.ema_decay, (1 + run.step) / (10 + run.step)))

    loss = float(out["loss"].detach())
    if d.world > 1:
        reduced = torch.tensor([loss], device=device)
        dist.all_reduce(reduced)
        loss = reduced.item() / d.world
    return _StepResult(loss, float(out["video"]), float(out["audio"]), float(grad_norm))


class _Meter:
    """Throughput since this process started, and the mean loss since the last metrics line."""

    def __init__(self, clips_per_step: int) -> None:
        self.clips_per_step = clips_per_step
        self.began = time.perf_counter()
        self.clips = 0
        self.loss_sum, self.loss_count = 0.0, 0

    def add(self, loss: float) -> None:
        self.clips += self.clips_per_step
        self.loss_sum += loss
        self.loss_count += 1

    def rates(self) -> tuple[float, float]:
        """Clips and steps per second."""
        elapsed = max(time.perf_counter() - self.began, 1e-9)
        return self.clips / elapsed, self.clips / self.clips_per_step / elapsed

    def take_record(self, step: int, last: _StepResult) -> dict[str, float]:
        """The metrics.jsonl line at `step` (losses of the last step beside the window's mean);
        starts a new loss window."""
        clips_per_s, steps_per_s = self.rates()
        record = {
            "step": step,
            "loss": self.loss_sum / self.loss_count,
            "video_loss": last.video_loss,
            "audio_loss": last.audio_loss,
            "grad_norm": last.grad_norm,
            "steps_per_s": steps_per_s,
            "clips_per_s": clips_per_s,
            "time": time.time(),
        }
        self.loss_sum, self.loss_count = 0.0, 0
        return record


def _optimizer_state(path: Path) -> dict:
    # Loaded on the CPU: load_state_dict moves the moments to their parameters' device and keeps
    # `step` on the CPU, as AdamW wants it (a step on the GPU costs a host sync per parameter).
    try:
        state = torch.load(path, weights_only=True, map_location="cpu")
    except FileNotFoundError:
        raise FileFormatError(f"{path} (optimizer state) is missing: {_DAMAGED}") from None
    except Exception as exc:  # noqa: BLE001 - truncated or foreign pickles fail in many ways
        raise FileFormatError(
            f"{path} (optimizer state) cannot be read ({type(exc).__name__}): {_DAMAGED}"
        ) from None
    if not isinstance(state, dict) or "state" not in state or "param_groups" not in state:
        raise FileFormatError(f"{path} (optimizer state) is not an optimizer state: {_DAMAGED}")
    return state


def _save(run: _TrainState, *, ranks: Dist) -> Path | None:
    """Checkpoint `run` at its step (rank 0 writes, every rank waits); the path on rank 0."""
    path = None
    model = run.model
    checksum = torch.tensor(
        [float(sum(p.double().sum() for p in model.state_dict().values()))], dtype=torch.float64
    )
    if ranks.world > 1 and dist.get_backend() == "nccl":
        checksum = checksum.to(next(model.parameters()).device)
    checksums = [checksum.clone() for _ in range(ranks.world)]
    if ranks.world > 1:  # every rank must hold the same weights; recorded so it can be checked
        dist.all_gather(checksums, checksum)
    if ranks.main:
        state = {
            "step": run.step,
            "data_position": run.data_position,
            "audio_scale": run.audio_scale,
            "world_size": ranks.world,
            "seed": run.cfg.seed,
            "config": asdict(run.cfg),
            "data": run.data_info,
            "rank_weight_checksums": [float(c.item()) for c in checksums],
            "rflav_version": __version__,
        }
        try:
            path = _write_checkpoint(
                run.run_dir,
                run.step,
                model,
                run.ema,
                run.optimizer,
                state,
                run.side,
                run.vocoder_folder,
                run.cfg.keep,
            )
        except BaseException:  # disk full, a failed copy …: no half-written folder stays behind
            shutil.rmtree(run.run_dir / f".checkpoint-{run.step:08d}{_TMP}", ignore_errors=True)
            raise
    _barrier(ranks)
    return path


class _Fetcher:
    """Reads the items of a batch, in parallel threads for decoded videos (each decode is an
    ffmpeg process, so threads overlap well)."""

    def __init__(self, dataset: VideoClipDataset | LatentClipDataset, threads: int) -> None:
        self.dataset = dataset
        self.pool = ThreadPoolExecutor(max_workers=threads) if threads > 0 else None

    def fetch(self, indices: list[int]) -> list[dict]:
        if self.pool is None:
            return [self.dataset[i] for i in indices]
        return list(self.pool.map(self.dataset.__getitem__, indices))

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=False, cancel_futures=True)


def _batch(items: list[dict], device: torch.device, vae: AutoencoderKL | None, g: torch.Generator):
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


def _progress(console: Console, enabled: bool):
    return progress_bar(
        TextColumn("step {task.completed:>7.0f}/{task.total:.0f}"),
        TextColumn("loss {task.fields[loss]:.4f}"),
        TextColumn("{task.fields[steps]:>6.2f} steps/s"),
        TextColumn("{task.fields[clips]:>7.1f} clips/s"),
        console=console,
        enabled=enabled,
    )


def _sample(checkpoint: Path, cfg: TrainConfig, console: Console, stop: threading.Event | None) -> None:
    """Write a short sample MP4 into the checkpoint from its EMA weights (first class, if any),
    in this process alone (the other ranks wait for it at the next step), leaving the
    process-wide TF32 setting as training had it. A Ctrl-C while it runs stops the training."""
    classes = read_side_file(checkpoint).get("class_names") or []
    try:
        with tf32_scope():
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
                alone=True,
            )
    except GenerationInterrupted as interrupted:
        if stop is None:
            raise
        if getattr(stop, "signum", None) is None:  # the training's exit code follows the signal
            stop.signum = interrupted.exit_code - 128
        stop.set()  # the checkpoint of this step is saved: the loop ends without another
    except Exception as err:  # a sample is a courtesy: never stop training for it
        console.print(f"[yellow]sample at {checkpoint.name} failed: {err}")
