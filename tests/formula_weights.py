"""Deterministic "formula" weights of the evaluation networks, built from a key list.

The evaluation fixtures were produced with weights defined entry by entry from the row index
``i`` of the key list and the element index ``k``:

    c_k = cos(2*pi*frac(0.618034 * k^2) + 0.5*i)      (k^2 exact in int64, the rest in float64)

scaled per kind of entry and cast to float32. Entries that keep their constructor value
(BatchNorm counters, the analysis window, the empty FBSP bias) are rebuilt here as constructed.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

# Kinds whose value the formula does not set.
KEPT_KINDS = frozenset({"bn_num_batches_tracked", "window_buffer", "empty"})


@dataclass(frozen=True)
class KeyRow:
    index: int
    key: str
    shape: tuple[int, ...]
    dtype: str
    kind: str


def read_key_table(path: Path) -> list[KeyRow]:
    """Rows of a ``index key shape dtype numel kind fan_in`` TSV, in file order."""
    rows = []
    lines = Path(path).read_text().splitlines()
    for line in lines[1:]:
        index, key, shape_text, dtype, _numel, kind = line.split("\t")[:6]
        if shape_text == "scalar":
            shape: tuple[int, ...] = ()
        else:
            shape = tuple(int(s) for s in shape_text.split("x"))
        rows.append(KeyRow(int(index), key, shape, dtype, kind))
    return rows


def _cosines(index: int, count: int) -> np.ndarray:
    k = np.arange(count, dtype=np.int64)
    phase = np.mod((k * k).astype(np.float64) * 0.618034, 1.0)
    return np.cos(2.0 * np.pi * phase + 0.5 * index)


def _periodic_blackman_harris(length: int) -> np.ndarray:
    # Same evaluation order as scipy's general_cosine on length+1 points, last one dropped.
    angle = np.linspace(-np.pi, np.pi, length + 1)[:length]
    window = np.zeros(length)
    for order, coeff in enumerate((0.35875, 0.48829, 0.14128, 0.01168)):
        window += coeff * np.cos(order * angle)
    return window


def formula_value(row: KeyRow) -> torch.Tensor:
    """The tensor of one key-list entry."""
    count = math.prod(row.shape)
    if row.kind == "bn_num_batches_tracked":
        return torch.zeros(row.shape, dtype=torch.int64)
    if row.kind == "empty":
        return torch.zeros(row.shape, dtype=torch.float32)
    if row.kind == "window_buffer":
        values = _periodic_blackman_harris(count)
    else:
        c = _cosines(row.index, count)
        if row.kind in ("conv_weight", "linear_weight"):
            values = (2.0 / math.sqrt(count // row.shape[0])) * c
        elif row.kind in ("bias", "bn_bias", "bn_running_mean"):
            values = 0.01 * c
        elif row.kind in ("bn_weight", "fbsp_fb"):
            values = 1.0 + 0.1 * c
        elif row.kind == "bn_running_var":
            values = 1.0 + 0.25 * (1.0 + c)
        elif row.kind == "fbsp_m":
            values = 0.05 * (1.0 + c)
        elif row.kind == "fbsp_fc":
            values = np.arange(count, dtype=np.float64) + 0.1 * c
        else:
            raise ValueError(f"unknown entry kind {row.kind!r} for {row.key}")
    return torch.from_numpy(values.astype(np.float32).reshape(row.shape))


def formula_state_dict(table: Path) -> dict[str, torch.Tensor]:
    """All entries of the key list at `table`, in order."""
    return {row.key: formula_value(row) for row in read_key_table(table)}


def state_digest(state: dict[str, torch.Tensor], rows: list[KeyRow], formula_only: bool) -> str:
    """sha256 of the little-endian bytes of the entries, concatenated in key-list order."""
    digest = hashlib.sha256()
    for row in rows:
        if formula_only and row.kind in KEPT_KINDS:
            continue
        array = state[row.key].contiguous().numpy()
        digest.update(array.astype(array.dtype.newbyteorder("<")).tobytes())
    return digest.hexdigest()
