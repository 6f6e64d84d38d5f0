"""Side-by-side table of a vs_reference.sh log: for each clip length and batch, the reference's
and rflav's wall time (after loading) and frames/s, and how many times faster rflav is.

    python benchmarks/ratios.py gpu-results/vs_reference.jsonl
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def load(path: Path) -> dict[tuple[str, int, int], dict]:
    """The last run of each (implementation, frames, batch) in the log."""
    runs = {}
    for line in path.read_text().splitlines():
        try:
            run = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not isinstance(run, dict):
            continue
        batch = run.get("batch", run.get("batch_size"))
        if "total_s" in run and batch is not None:
            runs[run.get("impl", "rflav"), int(run["frames"]), int(batch)] = run
    return runs


def table(runs: dict[tuple[str, int, int], dict]) -> list[str]:
    rows = [
        "| frames | batch | reference s | rflav s | faster | reference frames/s "
        "| rflav steady frames/s | rflav first frame s |"
    ]
    rows.append("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for frames, batch in sorted({(f, b) for _, f, b in runs}):
        ref, ours = runs.get(("reference", frames, batch)), runs.get(("rflav", frames, batch))
        if ref is None or ours is None:
            continue
        rows.append(
            f"| {frames} | {batch} | {ref['total_s']:.2f} | {ours['total_s']:.2f} | "
            f"{ref['total_s'] / ours['total_s']:.2f}× | {ref['frames_per_s']:.1f} | "
            f"{ours['steady_frames_per_s']:.1f} | {ours['first_frame_s']:.2f} |"
        )
    return rows


if __name__ == "__main__":
    print("\n".join(table(load(Path(sys.argv[1])))))
