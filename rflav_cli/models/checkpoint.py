"""Safe, atomic weight files shared by every model of the package."""

from __future__ import annotations

import os
import pickle
import re
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor


def atomic_write(target: Path, write: Callable[[str], object]) -> None:
    """Call ``write(tmp_path)`` for a temporary file beside ``target``, then rename it into place,
    so a crash never leaves a half-written file under the final name."""
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_tensor_file(
    path: str | Path,
    what: str,
    *,
    error: type[Exception] = ValueError,
    missing_error: type[Exception] = FileNotFoundError,
    unwrap: str | None = None,
) -> dict[str, Tensor]:
    """The ``{name: tensor}`` dict of a torch file (inside key ``unwrap`` when present), read with
    ``weights_only`` and refused with ``error`` if it holds anything else."""
    path = Path(path)
    if not path.is_file():
        raise missing_error(f"{what} not found: {path}")

    def refusal(detail: str) -> Exception:
        return error(f"{path} is not a plain tensor checkpoint of {what} ({detail})")

    try:
        obj = torch.load(path, weights_only=True, map_location="cpu")
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, AttributeError, TypeError) as e:
        # torch's own message advises unsafe loading; only name what was refused.
        culprit = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        raise refusal(f"it references {culprit.group(1)}" if culprit else type(e).__name__) from None
    if unwrap is not None and isinstance(obj, dict) and unwrap in obj:
        obj = obj[unwrap]
    if not isinstance(obj, dict) or not obj:
        raise refusal(f"it holds {type(obj).__name__ if obj else 'nothing'}")
    odd = next((k for k, v in obj.items() if not (isinstance(k, str) and isinstance(v, Tensor))), None)
    if odd is not None:
        raise refusal(f"entry {odd!r} is a {type(obj[odd]).__name__}, not a tensor")
    return obj
