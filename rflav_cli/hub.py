"""Checkpoint presets and resolution of model/VAE folders from local paths or the Hugging Face Hub.

Downloads go through ``huggingface_hub`` so that its cache, progress bars and the usual
environment variables (``HF_HOME``, ``HF_HUB_CACHE``, ``HF_HUB_OFFLINE``, ``HF_TOKEN``) apply.
Every failure is turned into a :class:`ResolveError` with a single line saying what went wrong
and how to fix it.

Before the first request of a process the endpoint is probed once with a short timeout
(``RFLAV_HUB_TIMEOUT`` seconds, default 5): when it refuses, fails or does not answer, files come
from the cache only and a miss is reported at once, instead of after huggingface_hub's retries.
A download that has started is never cut by that timeout.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import threading
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import huggingface_hub
from huggingface_hub import constants as hf_constants
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import (
    are_progress_bars_disabled,
    disable_progress_bars,
    enable_progress_bars,
)

from .errors import RflavError
from .files import atomic_write  # torch-free: keeps this module light

# Checkpoints that ship inside the package, one folder each (release layout plus rflav.json).
PACKAGED_DIR = Path(__file__).parent / "weights"


@dataclass(frozen=True)
class Preset:
    """A checkpoint known by a short name: released on the Hub, or shipped with the package
    (``repo_id`` None; its folder is ``PACKAGED_DIR / name`` and its rflav.json has the rest)."""

    name: str
    repo_id: str | None
    audio_scale: float | None
    description: str

    @property
    def packaged_folder(self) -> Path | None:
        return PACKAGED_DIR / self.name if self.repo_id is None else None


PRESETS: dict[str, Preset] = {
    "dance": Preset(
        name="dance",
        repo_id="MaverickAlex/R-FLAV-B-1-AIST",
        audio_scale=3.5009668382765917,
        description="AIST++ dance videos with music (unconditional)",
    ),
    "landscape": Preset(
        name="landscape",
        repo_id="MaverickAlex/R-FLAV-B-1-LS",
        audio_scale=3.0951129410195515,
        description="Landscape videos with ambient sound",
    ),
    "ball": Preset(
        name="ball",
        repo_id=None,
        audio_scale=None,
        description="A bouncing ball whose tone follows its height (small, ships with rflav, works offline)",
    ),
}

VAE_REPO_ID = "stabilityai/sd-vae-ft-ema"
VAE_FOLDER_NAME = "sd-vae-ft-ema"
MODEL_CORE_FILES = ["config.json", "model.safetensors"]
VOCODER_FILES = ["vocoder/config.json", "vocoder/vocoder.pt"]
MODEL_FILES = MODEL_CORE_FILES + VOCODER_FILES
VAE_FILES = ["config.json", "diffusion_pytorch_model.safetensors"]
SIDE_FILE = "rflav.json"

# Hub naming rules: one "org/name" pair of [A-Za-z0-9._-], no leading/trailing "-" or ".",
# no "--" or "..", at most 96 characters.
_REPO_PART = r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]*[A-Za-z0-9_])?"
_REPO_ID_RE = re.compile(rf"{_REPO_PART}/{_REPO_PART}")
_COMMIT_RE = re.compile(r"[0-9a-f]{40}")


class ResolveError(RflavError):
    """A checkpoint or one of its files cannot be found or fetched (one-line message)."""


@dataclass
class ResolvedModel:
    """Where a model checkpoint lives on disk and what is known about it."""

    folder: Path
    source: str
    revision: str | None = None
    audio_scale: float | None = None
    class_names: list[str] | None = None
    vocoder_folder: Path | None = None
    autoencoder: str | None = None
    preset: str | None = None


def is_repo_id(name: str) -> bool:
    """True if ``name`` has the form ``org/name`` of a Hub repository."""
    return (
        len(name) <= 96
        and _REPO_ID_RE.fullmatch(name) is not None
        and "--" not in name
        and ".." not in name
        and not name.endswith(".git")
    )


def recorded_name(name: str) -> str:
    """A model name as files that are read later, from anywhere, record it: a local folder by
    its absolute path; a preset, Hub repo id or "none" as given."""
    path = Path(name).expanduser()
    return str(path.resolve()) if path.is_dir() else name


def _truthy(value: str | None) -> bool:
    return (value or "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def _env_offline() -> bool:
    """Offline mode as set in the environment now or when huggingface_hub was imported."""
    return bool(hf_constants.HF_HUB_OFFLINE) or _truthy(os.environ.get("HF_HUB_OFFLINE"))


def _cache_dir() -> str | None:
    """The Hub cache chosen by the environment at call time (None: huggingface_hub's default).

    huggingface_hub reads these variables once at import; reading them here as well lets a
    change made later in the process (e.g. by a test or a wrapper script) take effect.
    """
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return os.path.expanduser(os.environ[var])
    if os.environ.get("HF_HOME"):
        return os.path.join(os.path.expanduser(os.environ["HF_HOME"]), "hub")
    return None


@contextlib.contextmanager
def _progress_bars(enabled: bool) -> Iterator[None]:
    """Temporarily silence huggingface_hub's progress bars when ``enabled`` is False."""
    if enabled or are_progress_bars_disabled():
        yield
        return
    disable_progress_bars()
    try:
        yield
    finally:
        enable_progress_bars()


def _flag_for(files: list[str]) -> str:
    return "--vae" if any(f.endswith("diffusion_pytorch_model.safetensors") for f in files) else "--model"


def _packaged_hint(repo_id: str, flag: str | None = "--model") -> str:
    """For a released checkpoint asked for by --model: the packaged one, which needs no
    download, to try meanwhile."""
    if flag != "--model" or not any(p.repo_id == repo_id for p in PRESETS.values()):
        return ""
    packaged = [name for name, p in PRESETS.items() if p.packaged_folder is not None]
    return f" ('--class {packaged[0]}' works without a download)" if packaged else ""


def _download_hint(repo_id: str) -> str:
    for preset in PRESETS.values():
        if preset.repo_id == repo_id:
            return f"run 'rflav download {preset.name}' while online"
    if repo_id == VAE_REPO_ID:
        return "run 'rflav download' while online"
    return "fetch it once while online (HF_HUB_OFFLINE unset)"


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


# ---------------------------------------------------------------- reachability of the Hub

DEFAULT_HUB_TIMEOUT = 5.0
TIMEOUT_VAR = "RFLAV_HUB_TIMEOUT"

# Endpoint -> why it cannot be used ("" when it answered). One probe per endpoint and process.
_endpoint_problems: dict[str, str] = {}


def hub_timeout() -> float:
    """Seconds the reachability probe waits for the endpoint (``RFLAV_HUB_TIMEOUT``)."""
    text = os.environ.get(TIMEOUT_VAR, "").strip()
    if not text:
        return DEFAULT_HUB_TIMEOUT
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value < float("inf"):
        raise ResolveError(f"{TIMEOUT_VAR} must be a positive number of seconds, got '{text}'")
    return value


@contextlib.contextmanager
def _quiet_hub() -> Iterator[None]:
    """Keep huggingface_hub's retry and fallback warnings off the terminal during our calls.

    Our own error says what happened in one line; HF_HUB_VERBOSITY still shows them on request.
    """
    if os.environ.get("HF_HUB_VERBOSITY"):
        yield
        return
    logger = logging.getLogger("huggingface_hub")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


@contextlib.contextmanager
def _no_requests(enabled: bool) -> Iterator[None]:
    """Turn on huggingface_hub's offline switch for a call that must stay in the cache.

    ``local_files_only`` alone still lets it fetch telemetry data from the endpoint first,
    which waits up to 3 s on an endpoint that does not answer.
    """
    if not enabled or hf_constants.HF_HUB_OFFLINE:
        yield
        return
    hf_constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        hf_constants.HF_HUB_OFFLINE = False


def _probe(url: str, timeout: float) -> str:
    """Why ``url``'s server cannot serve downloads now ("" when it answers, even with an HTTP error).

    The request runs in a daemon thread so that the wait is bounded as a whole, name
    resolution included, and huggingface_hub's retries are off for it.
    """
    outcome: list[BaseException | None] = []

    def head() -> None:
        try:
            huggingface_hub.get_hf_file_metadata(url, timeout=timeout, retry_on_errors=False)
            outcome.append(None)
        except Exception as exc:  # noqa: BLE001 - reported to the waiting thread
            outcome.append(exc)

    worker = threading.Thread(target=head, name="rflav-hub-probe", daemon=True)
    worker.start()
    worker.join(timeout)
    hub = f"the Hub at {hf_constants.ENDPOINT}"
    if not outcome:
        return f"{hub} did not answer within {timeout:g} s"
    exc = outcome[0]
    if exc is None:
        return ""
    if isinstance(exc, HfHubHTTPError):
        status = getattr(exc.response, "status_code", None)
        # A 4xx answer (no such repo, gated, ...) means the Hub is there: the download reports it.
        return f"{hub} answered HTTP {status}" if status is None or status >= 500 else ""
    if "Timeout" in type(exc).__name__:
        return f"{hub} did not answer within {timeout:g} s"
    return f"{hub} could not be reached ({_one_line(str(exc)) or type(exc).__name__})"


def _hub_problem(repo_id: str, filename: str, revision: str | None) -> str:
    """Why the Hub cannot be used now ("" when it can), probed once per endpoint and process."""
    endpoint = hf_constants.ENDPOINT
    if endpoint not in _endpoint_problems:
        url = huggingface_hub.hf_hub_url(repo_id, filename, revision=revision)
        with _quiet_hub():
            _endpoint_problems[endpoint] = _probe(url, hub_timeout())
    return _endpoint_problems[endpoint]


def _unreachable(problem: str, repo_id: str, filename: str, flag: str) -> ResolveError:
    wait = f", or set {TIMEOUT_VAR} to wait longer" if "did not answer" in problem else ""
    local = f", or pass a local folder with {flag} PATH" if flag else ""
    return ResolveError(
        f"cannot get {filename} from {repo_id} ({problem}; not in the Hugging Face cache either): "
        f"check the network connection or HF_ENDPOINT{wait}{local}{_packaged_hint(repo_id, flag)}"
    )


def _explain(
    exc: Exception, repo_id: str, filename: str, offline: bool, revision: str | None, flag: str
) -> ResolveError:
    """Turn a huggingface_hub failure into a one-line ResolveError that says how to fix it."""
    head = f"cannot get {filename} from {repo_id}"
    # flag "": the caller has no option that takes a folder instead (rflav download).
    local = f", or pass a local folder with {flag} PATH" if flag else ""
    if isinstance(exc, LocalEntryNotFoundError):
        if offline or isinstance(exc.__cause__, OfflineModeIsEnabled):
            why = "offline and not in the Hugging Face cache"
            fix = f"{_download_hint(repo_id)}{local}{_packaged_hint(repo_id, flag)}"
        else:
            why = "the Hub could not be reached and it is not in the Hugging Face cache"
            fix = f"check the network connection (or HF_ENDPOINT){local}"
    elif isinstance(exc, GatedRepoError):
        why = "the repo is gated"
        fix = (
            f"accept its terms at https://huggingface.co/{repo_id} and log in with "
            f"'hf auth login' or set HF_TOKEN{local}"
        )
    elif isinstance(exc, RepositoryNotFoundError):
        why = "no such Hub repo, or it is private and no valid token was given"
        fix = f"check the repo id (no local folder of that name exists either), set HF_TOKEN{local}"
    elif isinstance(exc, RevisionNotFoundError):
        why = f"revision '{revision}' does not exist"
        fix = f"check --revision{local}"
    elif isinstance(exc, EntryNotFoundError):
        why = "the repo has no such file"
        fix = f"check the repo id and revision{local}"
    elif isinstance(exc, HfHubHTTPError) and getattr(exc.response, "status_code", None) in (401, 403):
        why = "access denied"
        fix = f"log in with 'hf auth login' or set HF_TOKEN{local}"
    else:
        why = _one_line(f"{type(exc).__name__}: {exc}")
        fix = f"retry{local}"
    return ResolveError(f"{head} ({why}): {fix}")


def _snapshot_of(path: str | Path, filename: str) -> Path:
    """The folder that ``filename`` (possibly with subfolders) was placed in."""
    return Path(path).parents[len(Path(filename).parts) - 1]


def _fetch(
    repo_id: str,
    files: list[str],
    revision: str | None,
    offline: bool | None,
    local_dir: Path | None = None,
    flag: str | None = None,
) -> Path:
    """Fetch ``files`` of a Hub repo into the cache (or ``local_dir``) and return their folder."""
    local_only = _env_offline() if offline is None else offline
    flag = _flag_for(files) if flag is None else flag
    # An endpoint that cannot be used leaves the cache: a hit is served, a miss reported at once.
    problem = "" if local_only else _hub_problem(repo_id, files[0], revision)
    cache_dir = _cache_dir()
    folder: Path | None = None
    cache_only = local_only or bool(problem)
    for filename in files:
        try:
            with _quiet_hub(), _no_requests(cache_only):
                path = huggingface_hub.hf_hub_download(
                    repo_id,
                    filename,
                    revision=revision,
                    cache_dir=cache_dir,
                    local_dir=local_dir,
                    local_files_only=cache_only,
                )
        except Exception as exc:  # noqa: BLE001 - every Hub failure becomes one line
            if problem:
                raise _unreachable(problem, repo_id, filename, flag) from exc
            raise _explain(exc, repo_id, filename, local_only or _env_offline(), revision, flag) from exc
        if folder is None:
            folder = _snapshot_of(path, filename)
            # Pin the remaining files to the commit of the first one so they belong together.
            if local_dir is None and _COMMIT_RE.fullmatch(folder.name):
                revision = folder.name
    assert folder is not None, "no files requested"
    return folder


def _check_folder(folder: Path, files: list[str], flag: str) -> None:
    for filename in files:
        if not (folder / filename).is_file():
            raise ResolveError(
                f"{folder} has no {filename}: pass a folder holding {', '.join(files)} with {flag}"
            )


def local_folder(
    path_or_repo_id: str | Path,
    files: list[str],
    revision: str | None = None,
    offline: bool | None = None,
    flag: str | None = None,
) -> Path:
    """Return a folder that holds ``files``: an existing local folder, or a Hub snapshot.

    ``offline=True`` uses only the Hugging Face cache; ``None`` follows ``HF_HUB_OFFLINE``.
    ``flag`` is the option that messages tell the user to pass a folder with (default: by files).
    """
    flag = flag or _flag_for(files)
    path = Path(path_or_repo_id).expanduser()
    if path.is_dir():
        _check_folder(path, files, flag)
        return path
    name = str(path_or_repo_id)
    if path.exists():
        raise ResolveError(f"{name} is a file: pass the folder that holds {', '.join(files)} with {flag}")
    if isinstance(path_or_repo_id, Path) or not is_repo_id(name):
        raise ResolveError(
            f"'{name}' is neither a local folder nor a Hub repo id (org/name): check the spelling"
        )
    return _fetch(name, files, revision, offline, flag=flag)


def read_side_file(folder: str | Path) -> dict[str, Any]:
    """Read ``rflav.json`` from a checkpoint folder ({} when absent), checking the known keys."""
    path = Path(folder) / SIDE_FILE
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ResolveError(f"cannot read {path} ({_one_line(str(exc))}): fix or delete it") from None
    if not isinstance(data, dict):
        raise ResolveError(f"{path} must hold a JSON object: fix or delete it")
    scale = data.get("audio_scale")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float)) or scale <= 0):
        raise ResolveError(f"{path}: audio_scale must be a positive number, got {scale!r}")
    names = data.get("class_names")
    if names is not None and (not isinstance(names, list) or not all(isinstance(n, str) for n in names)):
        raise ResolveError(f"{path}: class_names must be a list of strings")
    vae = data.get("autoencoder")
    if vae is not None and not isinstance(vae, str):
        raise ResolveError(f"{path}: autoencoder must be a repo id or a path (a string)")
    return data


def write_side_file(folder: str | Path, data: dict[str, Any]) -> Path:
    """Write ``rflav.json`` into ``folder`` atomically and return its path."""
    path = Path(folder) / SIDE_FILE
    text = json.dumps(data, indent=2, sort_keys=True) + "\n"
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    return path


def _optional_side_file(repo_id: str, folder: Path, offline: bool | None) -> dict[str, Any]:
    """rflav.json of a Hub snapshot, fetched if the repo has one; {} if it has none."""
    if not (folder / SIDE_FILE).is_file():
        pinned = folder.name if _COMMIT_RE.fullmatch(folder.name) else None
        try:
            _fetch(repo_id, [SIDE_FILE], pinned, offline)
        except ResolveError:
            return {}  # released checkpoints have no side file
    return read_side_file(folder)


def _vocoder_in(folder: Path) -> Path | None:
    return folder / "vocoder" if all((folder / f).is_file() for f in VOCODER_FILES) else None


def resolve_model(
    name: str,
    revision: str | None = None,
    offline: bool | None = None,
    need_vocoder: bool = True,
    flag: str = "--model",
) -> ResolvedModel:
    """Find a model checkpoint given a preset name, a local folder or a Hub repo id; `flag` is
    the option that gave it, which messages name."""
    files = MODEL_FILES if need_vocoder else MODEL_CORE_FILES
    preset = PRESETS.get(name)
    path = Path(name).expanduser()
    if preset is not None and preset.packaged_folder is not None:
        resolved = resolve_model(str(preset.packaged_folder), need_vocoder=need_vocoder)
        resolved.source, resolved.preset = f"{preset.name} (ships with rflav)", preset.name
        return resolved
    if preset is None and path.is_dir():
        missing = [f for f in files if not (path / f).is_file()]
        if missing:
            raise ResolveError(
                f"{path} is not a model folder: it lacks {', '.join(missing)} "
                f"(expected {', '.join(files)}); pass a checkpoint folder with {flag}"
            )
        side = read_side_file(path)
        return ResolvedModel(
            folder=path,
            source=str(path),
            audio_scale=side.get("audio_scale"),
            class_names=side.get("class_names"),
            vocoder_folder=_vocoder_in(path),
            autoencoder=side.get("autoencoder"),
        )
    if preset is None and not is_repo_id(name):
        choices = ", ".join(PRESETS)
        raise ResolveError(
            f"'{name}' is neither a preset ({choices}), a local folder nor a Hub repo id (org/name): "
            "check the spelling"
        )
    repo_id = preset.repo_id if preset else name
    folder = _fetch(repo_id, files, revision, offline, flag=flag)
    side = _optional_side_file(repo_id, folder, offline)
    scale = side.get("audio_scale", preset.audio_scale if preset else None)
    return ResolvedModel(
        folder=folder,
        source=repo_id,
        revision=folder.name if _COMMIT_RE.fullmatch(folder.name) else None,
        audio_scale=scale,
        class_names=side.get("class_names"),
        vocoder_folder=_vocoder_in(folder),
        autoencoder=side.get("autoencoder"),
        preset=preset.name if preset else None,
    )


def _place(src: Path, dst: Path) -> None:
    """Put a copy of ``src`` at ``dst`` atomically: a hard link when possible, else a copy."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    real = src.resolve()  # cache snapshots hold symlinks to blobs
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    try:
        try:
            os.link(real, tmp)
        except OSError:
            shutil.copyfile(real, tmp)
        os.replace(tmp, dst)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


@contextlib.contextmanager
def _undo_on_failure(folder: Path) -> Iterator[None]:
    """On any failure, remove what was added under ``folder`` (partial files, lock files, the
    ``.cache/huggingface`` bookkeeping, folders made for it); what was there before stays."""
    first_new = None  # the highest folder on the way to ``folder`` that does not exist yet
    probe = folder
    while not probe.exists():
        first_new, probe = probe, probe.parent
    before: set[str] = set()
    if first_new is None:
        for dirpath, dirnames, filenames in os.walk(folder):
            before.update(os.path.join(dirpath, name) for name in (*dirnames, *filenames))
    try:
        yield
    except BaseException:
        if first_new is not None:
            shutil.rmtree(first_new, ignore_errors=True)
        else:
            for dirpath, dirnames, filenames in os.walk(folder):
                for name in list(dirnames):
                    path = os.path.join(dirpath, name)
                    if path not in before:
                        dirnames.remove(name)
                        if os.path.islink(path):
                            with contextlib.suppress(OSError):
                                os.unlink(path)
                        else:
                            shutil.rmtree(path, ignore_errors=True)
                for name in filenames:
                    path = os.path.join(dirpath, name)
                    if path not in before:
                        with contextlib.suppress(OSError):
                            os.unlink(path)
        raise


def _download_one(
    repo_id: str, files: list[str], revision: str | None, offline: bool, to: Path | None
) -> Path:
    # Messages offer no folder to pass instead: downloading is what was asked.
    if to is None:
        return _fetch(repo_id, files, revision, offline, flag="")
    to.mkdir(parents=True, exist_ok=True)
    if offline or _hub_problem(repo_id, files[0], revision):
        # huggingface_hub's local_dir mode never reads the cache when it cannot go online:
        # copy from the cache here (a miss says why the Hub was not asked).
        snapshot = _fetch(repo_id, files, revision, offline, flag="")
        for filename in files:
            _place(snapshot / filename, to / filename)
        return to
    _fetch(repo_id, files, revision, False, local_dir=to, flag="")
    return to


def download(
    which: str = "dance",
    to: str | Path | None = None,
    revision: str | None = None,
    progress: bool = True,
    offline: bool | None = None,
) -> list[Path]:
    """Fetch a preset's model files (``which``: a preset name or "all") and the VAE ahead of time.

    Without ``to`` the files go into the Hugging Face cache; with ``to`` into plain folders
    ``to/<preset>`` and ``to/sd-vae-ft-ema`` usable as ``--model``/``--vae``. ``revision`` applies
    to the model repos only. Returns the folders, models first, the VAE last. A folder whose
    download fails is left as it was before the call (folders completed before it stay).
    """
    hosted = [name for name, preset in PRESETS.items() if preset.repo_id is not None]
    if which == "all":
        presets = [PRESETS[name] for name in hosted]
    elif which in hosted:
        presets = [PRESETS[which]]
    elif which in PRESETS:
        raise ResolveError(f"'{which}' ships with rflav: there is nothing to download")
    else:
        raise ResolveError(f"unknown checkpoint '{which}': choose one of {', '.join([*hosted, 'all'])}")
    local_only = _env_offline() if offline is None else offline
    root = Path(to).expanduser().resolve() if to is not None else None
    folders: list[Path] = []
    with _progress_bars(progress):
        for preset in presets:
            if root is None:
                folders.append(_download_one(preset.repo_id, MODEL_FILES, revision, local_only, None))
                continue
            dest = root / preset.name
            with _undo_on_failure(dest):
                folder = _download_one(preset.repo_id, MODEL_FILES, revision, local_only, dest)
                # A plain folder loses the preset name: record its audio_scale beside the weights.
                side = read_side_file(folder)
                if "audio_scale" not in side:
                    write_side_file(folder, {**side, "audio_scale": preset.audio_scale})
            folders.append(folder)
        if root is None:
            folders.append(_download_one(VAE_REPO_ID, VAE_FILES, None, local_only, None))
        else:
            with _undo_on_failure(root / VAE_FOLDER_NAME):
                folders.append(
                    _download_one(VAE_REPO_ID, VAE_FILES, None, local_only, root / VAE_FOLDER_NAME)
                )
    return folders
