"""Where one FLAV forward spends its time: a torch profiler table (top ops by device time),
plus timings of torch.compile variants.

    python benchmarks/profile_forward.py --size FLAV-B/1 --batch 1 --compile default
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from rflav_cli.bench import forward_inputs, random_flav, timed_calls  # noqa: E402


def median_time(fn, repeats: int = 10) -> float:
    return statistics.median(timed_calls(fn, torch.device("cuda"), repeats)[0])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="FLAV-B/1")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--window", type=int, default=10)
    p.add_argument(
        "--compile",
        default="",
        help="comma list of torch.compile modes to time (e.g. default,reduce-overhead)",
    )
    p.add_argument("--rows", type=int, default=25)
    args = p.parse_args()
    model = random_flav(args.size, args.window).to("cuda", torch.bfloat16)
    v, a, t = forward_inputs(model.config, args.batch, torch.device("cuda"))
    with torch.no_grad():
        for _ in range(3):
            model(v, a, t)
        print(f"eager bf16 batch {args.batch}: {median_time(lambda: model(v, a, t)) * 1e3:.2f} ms")
        with torch.profiler.profile(
            activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
        ) as prof:
            for _ in range(3):
                model(v, a, t)
            torch.cuda.synchronize()
        print(
            prof.key_averages().table(
                sort_by="cuda_time_total", row_limit=args.rows, max_name_column_width=60
            )
        )
        for mode in [m for m in args.compile.split(",") if m]:
            start = time.perf_counter()
            compiled = torch.compile(model, mode=mode, dynamic=False)
            for _ in range(3):
                compiled(v, a, t)
            torch.cuda.synchronize()
            took = time.perf_counter() - start
            print(
                f"compiled ({mode}) bf16 batch {args.batch}: "
                f"{median_time(lambda: compiled(v, a, t)) * 1e3:.2f} ms"
                f" (compile + warm-up {took:.1f} s)"
            )
            if mode == "default":  # CUDA-graph modes hide their kernels from the profiler
                with torch.profiler.profile(
                    activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
                ) as prof:
                    for _ in range(3):
                        compiled(v, a, t)
                    torch.cuda.synchronize()
                print(
                    prof.key_averages().table(
                        sort_by="cuda_time_total", row_limit=args.rows, max_name_column_width=60
                    )
                )


if __name__ == "__main__":
    main()
