"""Finding, downloading and reading the weight files of the evaluation feature networks.

A file is looked up in this order: an explicit path, the cache folder (``$RFLAV_CACHE``, by
default ``~/.cache/rflav``), then a download from its public URL, checked against its sha256
and moved into the cache only once complete. Offline, or when the download fails, a
:class:`MissingWeightsError` says which file is needed, where to put it and where it comes from.
"""

from __future__ import annotations

import hashlib
import os
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn
from torch import Tensor

from ..errors import RflavError
from ..files import atomic_write
from ..tensorfiles import load_tensor_file, state_dict_mismatch

__all__ = [
    "CACHE_ENV",
    "WEIGHTS",
    "EvalWeightsError",
    "MissingWeightsError",
    "WeightsFile",
    "audioclip_weights",
    "cache_dir",
    "i3d_weights",
    "read_tensor_file",
    "resolve_weights",
]

CACHE_ENV = "RFLAV_CACHE"
DEFAULT_CACHE = "~/.cache/rflav"
_CHUNK = 1 << 20
_TIMEOUT_S = 60


@dataclass(frozen=True)
class WeightsFile:
    """A weight file the evaluation needs: where it comes from and how to check it."""

    name: str
    url: str
    sha256: str | None  # None: no trusted digest known, the download is not checked
    origin: str


I3D_FILE = "i3d_pretrained_400.pt"
AUDIOCLIP_FILE = "AudioCLIP-Full-Training.pt"

# The sha256 values are the git-LFS object ids of the same files in public repositories
# (I3D: the Open-Sora-Plan v1.0.0 copy, 50,939,526 bytes; AudioCLIP: assets/ of the AudioCLIP
# repository, 537,302,068 bytes); the URLs below are expected to serve those same bytes.
WEIGHTS: dict[str, WeightsFile] = {
    I3D_FILE: WeightsFile(
        name=I3D_FILE,
        url=(
            "https://huggingface.co/spaces/LanguageBind/Open-Sora-Plan-v1.0.0/resolve/"
            "810fa8c4bdb3a4c8eec9bd57375c29bde6fb46de/opensora/eval/fvd/videogpt/i3d_pretrained_400.pt"
        ),
        sha256="55095f049e706479d48e221adcdb145b2b9dc930ba28b081ed72367ffaa32343",
        origin="VideoGPT's Kinetics-400 I3D (Google Drive id 1mQK8KD8G6UWRa5t87SRMm5PVXtlpneJT)",
    ),
    AUDIOCLIP_FILE: WeightsFile(
        name=AUDIOCLIP_FILE,
        url="https://github.com/AndreyGuzhov/AudioCLIP/releases/download/v0.1/AudioCLIP-Full-Training.pt",
        sha256="2441d35b353352c8b1bbfb8f7c687f46314c3d2909e940eaf763b8c17f632c44",
        origin="the AudioCLIP v0.1 release",
    ),
}


class EvalWeightsError(RflavError, ValueError):
    """An evaluation weight file is unusable (wrong content, failed check)."""


class MissingWeightsError(EvalWeightsError):
    """An evaluation weight file is not available locally and cannot be downloaded."""


def cache_dir() -> Path:
    """The folder holding downloaded evaluation weights."""
    return Path(os.environ.get(CACHE_ENV) or DEFAULT_CACHE).expanduser()


def resolve_weights(
    name: str, path: str | Path | None = None, offline: bool = False, progress: bool = True
) -> Path:
    """Local path of weight file `name`: `path` if given (a file, or a folder holding it), else the
    cache, else a checked download into the cache (unless `offline`)."""
    entry = WEIGHTS[name]
    if path is not None:
        candidate = Path(path).expanduser()
        if candidate.is_dir():
            candidate = candidate / name
        if not candidate.is_file():
            raise MissingWeightsError(f"{name} not found at {candidate}; download it from {entry.url}")
        return candidate
    cached = cache_dir() / name
    if cached.is_file():
        return cached
    if offline:
        raise MissingWeightsError(
            f"{name} is not in {cached.parent} and downloads are off; put it at {cached} "
            f"(from {entry.url}, {entry.origin}) or pass its path"
        )
    _download(entry, cached, progress)
    return cached


def i3d_weights(path: str | Path | None = None, offline: bool = False, progress: bool = True) -> Path:
    """Path of ``i3d_pretrained_400.pt`` (see :func:`resolve_weights`)."""
    return resolve_weights(I3D_FILE, path, offline, progress)


def audioclip_weights(path: str | Path | None = None, offline: bool = False, progress: bool = True) -> Path:
    """Path of ``AudioCLIP-Full-Training.pt`` (see :func:`resolve_weights`)."""
    return resolve_weights(AUDIOCLIP_FILE, path, offline, progress)


def _open_url(url: str) -> BinaryIO:
    request = urllib.request.Request(url, headers={"User-Agent": "rflav"})
    return urllib.request.urlopen(request, timeout=_TIMEOUT_S)


def _download(entry: WeightsFile, dest: Path, progress: bool) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)

    def fetch(tmp: str) -> None:
        digest = hashlib.sha256()
        with open(tmp, "wb") as out:
            try:
                with _open_url(entry.url) as response:
                    total = int(response.headers.get("Content-Length") or 0) or None
                    columns = (TextColumn(entry.name), BarColumn(), DownloadColumn(), TransferSpeedColumn())
                    with Progress(*columns, console=Console(stderr=True), disable=not progress) as bar:
                        task = bar.add_task("download", total=total)
                        while chunk := response.read(_CHUNK):
                            out.write(chunk)
                            digest.update(chunk)
                            bar.advance(task, len(chunk))
            except (urllib.error.URLError, OSError) as e:
                reason = getattr(e, "reason", None) or e
                raise MissingWeightsError(
                    f"could not download {entry.name} from {entry.url} ({reason}); "
                    f"download it yourself and put it at {dest} or pass its path"
                ) from None
        if entry.sha256 is not None and digest.hexdigest() != entry.sha256:
            raise EvalWeightsError(
                f"{entry.name} downloaded from {entry.url} has sha256 {digest.hexdigest()}, "
                f"expected {entry.sha256}; nothing was saved"
            )

    atomic_write(dest, fetch, suffix=".part")


def read_tensor_file(path: str | Path, what: str) -> dict[str, Tensor]:
    """The ``{name: tensor}`` dict saved in a torch file, read without unpickling any code."""
    return load_tensor_file(path, what, error=EvalWeightsError, missing_error=MissingWeightsError)


def check_weights(
    model: torch.nn.Module,
    state: dict[str, Tensor],
    path: Path,
    description: str,
    *,
    optional: Callable[[str], bool] = lambda key: False,
    shown_prefix: str = "",
) -> None:
    """Refuse ``state`` in one line unless it fits ``model`` (``optional`` keys may be absent)."""
    mismatch = state_dict_mismatch({k: v.shape for k, v in model.state_dict().items()}, state, optional)
    wrong = [k for k, _, _ in mismatch.misshaped]
    if mismatch:
        parts = [
            f"{len(keys)} {label} (e.g. {shown_prefix}{keys[0]})"
            for label, keys in (
                ("missing", mismatch.missing),
                ("unexpected", mismatch.unexpected),
                ("wrong shape", wrong),
            )
            if keys
        ]
        raise EvalWeightsError(f"{path} does not hold {description}: {'; '.join(parts)}")
