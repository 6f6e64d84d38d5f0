"""Time one FLAV forward (any size, device, dtype, window, batch) and its bf16 error.

    python benchmarks/forward.py --size FLAV-B/1 --device cpu --dtypes fp32,bf16
    python benchmarks/forward.py --size FLAV-B/1 --device cuda --dtypes fp32,bf16 --batch 1,16 --compile
    python benchmarks/forward.py --device cuda --dtypes bf16 --attention sdpa,matmul

Weights are random (std 0.02, as a trained DiT's scale); the relative error of each dtype is
‖y − y_fp32‖ / ‖y_fp32‖ over both outputs. The measuring is `rflav_cli.bench.time_forward`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rflav_cli.bench import device_name, random_flav, time_forward  # noqa: E402
from rflav_cli.models.flav import set_attention_backend  # noqa: E402
from rflav_cli.runtime import pick_device  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="FLAV-B/1")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtypes", default="fp32,bf16")
    p.add_argument("--batch", default="1")
    p.add_argument("--window", type=int, default=10)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument(
        "--compile",
        action="store_true",
        help="also time the model compiled as the pipeline compiles it (CUDA graphs on GPUs)",
    )
    p.add_argument(
        "--attention", default="auto", help="comma list of attention backends to time: auto, sdpa, matmul"
    )
    args = p.parse_args()

    device = pick_device(args.device)
    reference = random_flav(args.size, args.window).to(device)  # one fp32 model shared by every row
    print(f"{args.size}, window {args.window}, device {device_name(device)}, torch {torch.__version__}")
    print(
        f"{'batch':>5} {'dtype':>6} {'attention':>12} {'compiled':>8} {'median s':>10} "
        f"{'frames/s @2 steps':>18} "
        f"{'rel err':>9}"
    )
    for batch in [int(b) for b in args.batch.split(",")]:
        for dtype_name in args.dtypes.split(","):
            for backend in args.attention.split(","):
                for compiled in (False, True) if args.compile else (False,):
                    set_attention_backend(backend)
                    r = time_forward(
                        args.size,
                        args.device,
                        dtype_name,
                        batch=batch,
                        window=args.window,
                        repeats=args.repeats,
                        compile=compiled,
                        steps=2,
                        reference=reference,
                    )
                    print(
                        f"{batch:>5} {dtype_name:>6} {backend:>12} {str(compiled):>8} {r.median_s:>10.4f} "
                        f"{r.frames_per_s:>18.1f} {r.relative_error:>9.2e}"
                    )
    set_attention_backend("auto")


if __name__ == "__main__":
    main()
