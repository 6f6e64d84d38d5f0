"""Safe, atomic file I/O shared by the models, the metrics and the rest of the package.

Readers here turn every way a user's file can be broken (missing, a folder, empty, truncated,
of another kind, not JSON) into one line that names the file, says what is wrong and how to
fix it. The module imports torch only when a tensor file is read, so light modules (the Hub
helpers) can use :func:`atomic_write` without paying for torch.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import tempfile
import threading
import zipfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import FileFormatError

if TYPE_CHECKING:
    from torch import Tensor

# What a user can do about a damaged checkpoint file.
REDOWNLOAD = "download it again or pass another folder"

# A safetensors header is a few hundred kB at most; a larger length is not a header at all.
_MAX_SAFETENSORS_HEADER = 100_000_000

_UMASK_LOCK = threading.Lock()


# --------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------


def current_umask() -> int:
    """The process umask, read without changing it where the system allows."""
    try:  # Linux ≥ 4.7 reports it; no window in which another thread sees another umask
        with open("/proc/self/status", encoding="ascii", errors="replace") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _UMASK_LOCK:
        # The only portable read is to set one and put the old one back. While it is set, a
        # file another thread creates gets the restrictive 0o077 mask, never a world-writable one.
        mask = os.umask(0o077)
        os.umask(mask)
    return mask


def creation_mode(directory: bool = False) -> int:
    """The mode ``open()`` or ``mkdir()`` would give a new file (or folder) under the umask now."""
    return (0o777 if directory else 0o666) & ~current_umask()


def atomic_write(target: Path, write: Callable[[str], object], suffix: str = ".tmp") -> None:
    """Call ``write(tmp_path)`` for a temporary file beside ``target``, then rename it into place,
    so a crash never leaves a half-written file under the final name. The file gets the mode a
    plainly created file would get (``mkstemp`` makes it 0600 whatever the umask). ``suffix``
    ends the temporary name, for writers that choose the format by extension (or add one)."""
    target = Path(target)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=suffix)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, creation_mode())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(target: Path, data: object) -> None:
    """`data` as indented JSON (one trailing newline), written atomically."""
    text = json.dumps(data, indent=2) + "\n"
    atomic_write(Path(target), lambda tmp: Path(tmp).write_text(text))


def save_safetensors(
    tensors: dict[str, Tensor], path: str | Path, metadata: dict[str, str] | None = None
) -> None:
    """Write a safetensors file atomically, with the umask's mode (safetensors alone makes it 0600)."""
    from safetensors.torch import save_file

    atomic_write(Path(path), lambda tmp: save_file(tensors, tmp, metadata=metadata))


# --------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------


def _fault(path: Path, what: str, problem: str, fix: str) -> str:
    """One line: which file, what it should be, what is wrong with it, what to do."""
    return f"{path} ({what}) {problem}: {fix}"


def _require_file(
    path: Path, what: str, error: type[Exception], missing_error: type[Exception], fix: str
) -> int:
    """The size of ``path``, refused unless it is an existing, non-empty regular file."""
    if path.is_dir():
        raise error(_fault(path, what, "is a folder, not a file", fix))
    if not path.exists():
        raise missing_error(f"{what} not found: {path}")
    if not path.is_file():
        raise error(_fault(path, what, "is not a regular file", fix))
    size = path.stat().st_size
    if size == 0:
        raise error(_fault(path, what, "is empty (0 bytes)", fix))
    return size


def _json_kind(value: object) -> str:
    if isinstance(value, bool):
        return "true/false"
    if value is None:
        return "null"
    return {list: "a list", str: "a string", int: "a number", float: "a number"}.get(
        type(value), type(value).__name__
    )


def read_json_object(
    path: str | Path,
    what: str,
    *,
    error: type[Exception] = FileFormatError,
    missing_error: type[Exception] = FileNotFoundError,
    fix: str = REDOWNLOAD,
) -> dict[str, Any]:
    """The JSON object stored in ``path``; any other content is refused with ``error``."""
    path = Path(path)
    _require_file(path, what, error, missing_error, fix)
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise error(_fault(path, what, "is not a JSON text file (not UTF-8)", fix)) from None
    if not text.strip():
        raise error(_fault(path, what, "holds only blanks, not JSON", fix))
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise error(
            _fault(path, what, f"is not valid JSON at line {e.lineno}, column {e.colno} ({e.msg})", fix)
        ) from None
    except RecursionError:
        raise error(_fault(path, what, "is not usable JSON (nested too deeply)", fix)) from None
    if not isinstance(data, dict):
        raise error(
            _fault(path, what, f"must hold a JSON object ({{...}}) but holds {_json_kind(data)}", fix)
        )
    return data


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
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    size = _require_file(path, what, error, missing_error, fix)
    problem = _safetensors_problem(path, size)
    if problem is not None:
        raise error(_fault(path, what, problem, fix))
    try:
        return load_file(str(path), device=device)
    except SafetensorError as e:
        detail = " ".join(str(e).split())
        raise error(_fault(path, what, f"is not a readable safetensors file ({detail})", fix)) from None


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
    import torch

    path = Path(path)
    _require_file(path, what, error, missing_error, fix)

    def refusal(detail: str) -> Exception:
        return error(f"{path} is not a plain tensor checkpoint of {what} ({detail})")

    try:
        obj = torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as e:
        # torch's own message advises unsafe loading; only name what was refused.
        culprit = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        if culprit:
            raise refusal(f"it references {culprit.group(1)}") from None
        raise error(_fault(path, what, _torch_file_problem(path), fix)) from None
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
        raise error(_fault(path, what, problem, fix)) from None
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
