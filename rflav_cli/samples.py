"""Many samples of one command: which are already made (a rerun resumes), which this process makes
(under torchrun each rank takes its share), and the manifest that lists them all.

Sample i always uses seed + i and always lands in the same file, whatever the number of processes.
Its sidecar (`NAME.json`) says how far it got: written with status "running" before its first
frame, replaced by the summary ("complete" or "interrupted") once the MP4 is final. A rerun of the
same command skips complete samples and makes the others again; a file that another command made,
or that rflav did not make, is never overwritten without --overwrite. A "running" sidecar names
the process that writes it (pid and host): while that process lives, its sample is not taken
over, by a rerun or by --overwrite.
"""

from __future__ import annotations

import json
import os
import socket
from dataclasses import dataclass
from pathlib import Path

from .config import FPS, default_guidance_scale
from .errors import FileFormatError, UsageError
from .files import atomic_write, read_json_object, write_json

MANIFEST = "manifest.jsonl"

# The settings that make a file this command's sample: a rerun with other values does not resume.
IDENTITY_KEYS = (
    "model",
    "vae",
    "audio_scale",
    "class",
    "cfg_scale",
    "seed",
    "steps",
    "frames_requested",
    "audio_input",
    "video_input",
    "guidance_scale",
)

COMPLETE, INCOMPLETE, MISSING = "complete", "incomplete", "missing"


@dataclass(frozen=True)
class Sample:
    """Sample `index` of a command: its seed and its MP4."""

    index: int
    seed: int
    path: Path

    @property
    def sidecar(self) -> Path:
        return self.path.with_suffix(".json")


def read_sidecar(path: Path) -> dict | None:
    """The sidecar of an MP4 rflav wrote (None if absent or not an rflav sidecar)."""
    try:
        side = read_json_object(path, "sample sidecar")
    except (FileFormatError, OSError):
        return None
    return side if "rflav_version" in side else None


def sidecar_status(side: dict) -> str:
    """ "running", "complete" or "interrupted"; sidecars written before the status existed say
    only whether the run was interrupted."""
    return side.get("status") or ("interrupted" if side.get("interrupted") else "complete")


def _process_state(pid: int) -> tuple[str, int] | None:
    """The state letter and start time (clock ticks since boot) of process `pid`, from Linux's
    /proc; None where there is no such file."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        fields = stat.rsplit(")", 1)[1].split()  # the name, in parentheses, may hold spaces
        return fields[0], int(fields[19])
    except (OSError, IndexError, ValueError):
        return None


def _alive(pid: int, started: object) -> bool:
    """Whether process `pid` of this machine still runs, and is the one that started at `started`
    (a pid is reused once its process is gone)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: there is one
        pass
    except OSError:
        return False
    state = _process_state(pid)
    if state is None:
        return True  # no /proc (macOS): the pid alone
    letter, ticks = state
    return letter not in ("Z", "X") and (started is None or ticks == started)


def writer_identity() -> dict:
    """What a "running" sidecar says about the process that writes the sample."""
    state = _process_state(os.getpid())
    return {"pid": os.getpid(), "host": socket.gethostname(), "pid_started": state and state[1]}


def running_elsewhere(side: dict | None) -> str | None:
    """Who makes the sample of a "running" sidecar right now ("process PID on this machine"), or
    None: its run is over (killed or crashed), or it runs on another machine, whose processes
    this one cannot see (a rerun on several machines must take over a dead node's samples)."""
    if side is None or sidecar_status(side) != "running":
        return None
    pid = side.get("pid")
    if not isinstance(pid, int) or isinstance(pid, bool) or side.get("host") != socket.gethostname():
        return None
    return f"process {pid} on this machine" if _alive(pid, side.get("pid_started")) else None


def refuse_if_running(sample: Sample, side: dict | None = None) -> None:
    """A sample that a live process is writing is its own: no other run takes its files over."""
    owner = running_elsewhere(read_sidecar(sample.sidecar) if side is None else side)
    if owner is not None:
        raise UsageError(
            f"{sample.path} is being made right now by {owner}: wait for that run to end (or stop it), "
            "or choose another {output}",
            params=("output",),
        )


def sample_state(sample: Sample, identity: dict) -> str:
    """COMPLETE (made by this command, whole), INCOMPLETE (started by this command: stopped,
    crashed or short; made again) or MISSING. A file of another command, or one that rflav did
    not make, is an error naming it, and so is a sample that another live process is making."""
    side = read_sidecar(sample.sidecar)
    refuse_if_running(sample, side)
    if side is None:
        for target in (sample.path, sample.sidecar):
            if target.exists():
                raise UsageError(
                    f"{target} already exists and is not a sample of this command: choose another "
                    "{output} or pass {overwrite}",
                    params=("output", "overwrite"),
                )
        return MISSING
    changed = [key for key in IDENTITY_KEYS if _recorded(side, key) != identity.get(key)]
    if changed:
        what = ", ".join(f"{key} {_recorded(side, key)!r} (asked: {identity.get(key)!r})" for key in changed)
        raise UsageError(
            f"{sample.path} was made with other settings: {what}; choose another {{output}} or pass "
            "{overwrite} to replace it",
            params=("output", "overwrite"),
        )
    whole = (
        sidecar_status(side) == COMPLETE
        and side.get("frames_requested") is not None
        and side.get("frames") == side.get("frames_requested")
        and sample.path.is_file()
    )
    return COMPLETE if whole else INCOMPLETE


def _recorded(side: dict, key: str) -> object:
    """A setting as a sidecar records it. Older sidecars wrote a guidance scale left at its
    default as null: the scale applied was the default of the input they name."""
    value = side.get(key)
    if key == "guidance_scale" and value is None:
        return default_guidance_scale(side.get("audio_input"), side.get("video_input"))
    return value


def batches_of(samples: list[Sample], batch_size: int) -> list[list[Sample]]:
    return [samples[i : i + batch_size] for i in range(0, len(samples), batch_size)]


def write_running_sidecar(sample: Sample, identity: dict, version: str) -> None:
    """Mark a sample as started by this process: a crash before its summary leaves this, and a
    rerun makes it again once this process is gone."""
    write_json(
        sample.sidecar,
        {
            "output": str(sample.path),
            **identity,
            "status": "running",
            **writer_identity(),
            "rflav_version": version,
        },
    )


def write_manifest(folder: Path, samples: list[Sample]) -> Path:
    """`folder/manifest.jsonl`: one line per sample of the command (index, seed, file, status,
    frames, seconds), from the sidecars as they are now."""
    lines = []
    for sample in samples:
        side = read_sidecar(sample.sidecar)
        status = MISSING if side is None else sidecar_status(side)
        if status == COMPLETE and not sample.path.is_file():
            status = MISSING
        frames = None if side is None else side.get("frames")
        row = {
            "index": sample.index,
            "seed": sample.seed,
            "file": sample.path.name,
            "status": status,
            "frames": frames,
            "seconds": None if frames is None else frames / FPS,
        }
        lines.append(json.dumps(row))
    path = folder / MANIFEST
    text = "\n".join(lines) + "\n"
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))
    return path
