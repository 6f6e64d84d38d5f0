"""Safe, atomic file I/O shared by the whole package.

Readers here turn every way a user's file can be broken (missing, a folder, empty, of another
kind, not JSON) into one line that names the file, says what is wrong and how to fix it. No
torch here, so light modules (the Hub helpers, the request checks) stay light; tensor files are
:mod:`rflav_cli.tensorfiles`'.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .errors import FileFormatError

# What a user can do about a damaged checkpoint file.
REDOWNLOAD = "download it again or pass another folder"

_UMASK_LOCK = threading.Lock()


# --------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------


def stdout_unusable() -> str | None:
    """Why binary output (an MP4) cannot go to standard output: closed, or a terminal; else None."""
    try:
        os.fstat(1)
    except OSError:
        closed = True
    else:
        closed = sys.stdout is None
    if closed:
        return "standard output is closed: pipe it into a player (| ffplay -) or a file (> NAME.mp4)"
    if os.isatty(1):
        return "standard output is a terminal: pipe it into a player (| ffplay -) or a file (> NAME.mp4)"
    return None


def unwritable_reason(folder: str | os.PathLike[str]) -> str | None:
    """Why files cannot be made in `folder` (made first if missing): the nearest existing path on
    the way to it is not a folder, or cannot be written in; None when they can."""
    existing = Path(folder).expanduser().absolute()
    while not existing.exists() and existing != existing.parent:  # below a file, exists() is False
        existing = existing.parent
    if not existing.is_dir():
        return f"{existing} is {'a file' if existing.is_file() else 'not a folder'}"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"no permission to write in {existing}"
    return None


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


# --------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------


def file_fault(path: Path, what: str, problem: str, fix: str) -> str:
    """One line: which file, what it should be, what is wrong with it, what to do."""
    return f"{path} ({what}) {problem}: {fix}"


def require_file(
    path: Path, what: str, error: type[Exception], missing_error: type[Exception], fix: str
) -> int:
    """The size of ``path``, refused unless it is an existing, non-empty regular file."""
    if path.is_dir():
        raise error(file_fault(path, what, "is a folder, not a file", fix))
    if not path.exists():
        raise missing_error(f"{what} not found: {path}")
    if not path.is_file():
        raise error(file_fault(path, what, "is not a regular file", fix))
    size = path.stat().st_size
    if size == 0:
        raise error(file_fault(path, what, "is empty (0 bytes)", fix))
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
    require_file(path, what, error, missing_error, fix)
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise error(file_fault(path, what, "is not a JSON text file (not UTF-8)", fix)) from None
    if not text.strip():
        raise error(file_fault(path, what, "holds only blanks, not JSON", fix))
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise error(
            file_fault(path, what, f"is not valid JSON at line {e.lineno}, column {e.colno} ({e.msg})", fix)
        ) from None
    except RecursionError:
        raise error(file_fault(path, what, "is not usable JSON (nested too deeply)", fix)) from None
    if not isinstance(data, dict):
        raise error(
            file_fault(path, what, f"must hold a JSON object ({{...}}) but holds {_json_kind(data)}", fix)
        )
    return data
