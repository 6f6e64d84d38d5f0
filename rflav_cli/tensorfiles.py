"""Tensor files: safetensors and torch checkpoints, read safely (never unpickling code) and
written atomically, and the check of a state dict against the model it should fill.

A damaged or foreign file becomes one line that names it, says what is wrong and how to fix it.
"""

from __future__ import annotations

import json
import pickle
import re
import zipfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from .errors import FileFormatError
from .files import REDOWNLOAD, atomic_write, file_fault, require_file

# A safetensors header is a few hundred kB at most; a larger length is not a header at all.
_MAX_SAFETENSORS_HEADER = 100_000_000


def save_safetensors(
    tensors: dict[str, Tensor], path: str | Path, metadata: dict[str, str] | None = None
) -> None:
    """Write a safetensors file atomically, with the umask's mode (safetensors alone makes it 0600)."""
    atomic_write(Path(path), lambda tmp: save_file(tensors, tmp, metadata=metadata))


def _safetensors_problem(path: Path, size: int) -> str | None:
    """What is structurally wrong with a safetensors file, from its header alone (None: nothing)."""
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return f"is truncated or not a safetensors file ({size} bytes, too short for a header)"
        length = int.from_bytes(head, "little")
        if length > _MAX_SAFETENSORS_HEADER:
            return "is not a safetensors file"
        raw = f.read(length)
    if not raw.lstrip()[:1] == b"{":
        return "is not a safetensors file"
    if len(raw) < length:
        return f"is truncated ({size} bytes, shorter than its own header of {8 + length})"
    try:
        header = json.loads(raw)
        end = max(
            (int(entry["data_offsets"][1]) for name, entry in header.items() if name != "__metadata__"),
            default=0,
        )
    except (UnicodeDecodeError, ValueError, TypeError, KeyError, IndexError, AttributeError):
        return "is not a safetensors file (its header is not a tensor table)"
    if size < 8 + length + end:
        return f"is truncated ({size} of {8 + length + end} bytes)"
    return None


def load_safetensors(
    path: str | Path,
    what: str,
    *,
    error: type[Exception] = FileFormatError,
    missing_error: type[Exception] = FileNotFoundError,
    fix: str = REDOWNLOAD,
    device: str = "cpu",
) -> dict[str, Tensor]:
    """The tensors of a safetensors file; a damaged or foreign file is refused with ``error``."""
    path = Path(path)
    size = require_file(path, what, error, missing_error, fix)
    problem = _safetensors_problem(path, size)
    if problem is not None:
        raise error(file_fault(path, what, problem, fix))
    try:
        return load_file(str(path), device=device)
    except SafetensorError as e:
        detail = " ".join(str(e).split())
        raise error(file_fault(path, what, f"is not a readable safetensors file ({detail})", fix)) from None


def _torch_file_problem(path: Path) -> str:
    """Why torch could not read ``path``, judged from its container."""
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic == b"PK\x03\x04":  # torch's zip format
        try:
            with zipfile.ZipFile(path) as archive:
                broken = archive.testzip()
        except (zipfile.BadZipFile, OSError, EOFError, ValueError):
            return "is truncated or damaged (its zip archive cannot be read)"
        return f"is damaged (archive entry {broken} fails its checksum)" if broken else "is damaged"
    if magic[:1] == b"\x80":  # a pickle protocol marker: torch's legacy format
        return "is truncated or damaged"
    return "is not a torch checkpoint file"


def load_tensor_file(
    path: str | Path,
    what: str,
    *,
    error: type[Exception] = FileFormatError,
    missing_error: type[Exception] = FileNotFoundError,
    unwrap: str | None = None,
    fix: str = REDOWNLOAD,
) -> dict[str, Tensor]:
    """The ``{name: tensor}`` dict of a torch file (inside key ``unwrap`` when present), read with
    ``weights_only`` and refused with ``error`` if it holds anything else or cannot be read."""
    path = Path(path)
    require_file(path, what, error, missing_error, fix)

    def refusal(detail: str) -> Exception:
        return error(f"{path} is not a plain tensor checkpoint of {what} ({detail})")

    try:
        obj = torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as e:
        # torch's own message advises unsafe loading; only name what was refused.
        culprit = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        if culprit:
            raise refusal(f"it references {culprit.group(1)}") from None
        raise error(file_fault(path, what, _torch_file_problem(path), fix)) from None
    except (
        RuntimeError,
        EOFError,
        ValueError,
        AttributeError,
        TypeError,
        KeyError,
        IndexError,
        zipfile.BadZipFile,
    ) as e:
        problem = _torch_file_problem(path)
        if problem == "is damaged":  # the container is sound: what it holds was refused
            raise refusal(type(e).__name__) from None
        raise error(file_fault(path, what, problem, fix)) from None
    if unwrap is not None and isinstance(obj, dict) and unwrap in obj:
        obj = obj[unwrap]
    if not isinstance(obj, dict) or not obj:
        raise refusal(f"it holds {type(obj).__name__ if obj else 'nothing'}")
    odd = next((k for k, v in obj.items() if not (isinstance(k, str) and isinstance(v, torch.Tensor))), None)
    if odd is not None:
        raise refusal(f"entry {odd!r} is a {type(obj[odd]).__name__}, not a tensor")
    return obj


# --------------------------------------------------------------------------------------
# Checking a state dict against a model
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StateDictMismatch:
    """How a state dict read from a file differs from the one a model expects."""

    missing: list[str]  # in the model's order
    unexpected: list[str]  # in the file's order
    misshaped: list[tuple[str, tuple[int, ...], tuple[int, ...]]]  # (key, file shape, model shape)

    def __bool__(self) -> bool:
        return bool(self.missing or self.unexpected or self.misshaped)

    def describe(self, limit: int = 8) -> str:
        """One line: "missing: …; unexpected: …; mis-shaped: KEY (file SHAPE, model SHAPE)", each
        list cut after `limit` keys. Callers put the file and the fix around it."""
        misshaped = [f"{k} (file {tuple(f)}, model {tuple(m)})" for k, f, m in self.misshaped]
        parts = []
        for label, keys in (
            ("missing", self.missing),
            ("unexpected", self.unexpected),
            ("mis-shaped", misshaped),
        ):
            if keys:
                more = f", … ({len(keys)} in all)" if len(keys) > limit else ""
                parts.append(f"{label}: {', '.join(keys[:limit])}{more}")
        return "; ".join(parts)


def state_dict_mismatch(
    expected: Mapping[str, Sequence[int]],
    found: Mapping[str, Tensor],
    optional: Callable[[str], bool] | None = None,
) -> StateDictMismatch:
    """Compare ``found`` with the ``{key: shape}`` a model expects (keys for which ``optional``
    is true may be absent). Callers word the refusal, since each names its own file and fix."""
    missing = [k for k in expected if k not in found and not (optional and optional(k))]
    unexpected = [k for k in found if k not in expected]
    misshaped = [
        (k, tuple(found[k].shape), tuple(shape))
        for k, shape in expected.items()
        if k in found and tuple(found[k].shape) != tuple(shape)
    ]
    return StateDictMismatch(missing, unexpected, misshaped)
