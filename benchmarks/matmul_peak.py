"""What the hardware allows: matrix-product throughput per dtype, the FLOPs of one FLAV
forward, and the resulting lower bound on the forward's time.

    python benchmarks/matmul_peak.py --device cpu
    python benchmarks/matmul_peak.py --device cuda --batch 1,16

The GEMM shape is that of FLAV-B/1's MLP (10,240 tokens × 768 → 3,072), the largest
product of the model; the FLOP count is torch's own (FlopCounterMode on the meta device).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rflav_cli.bench import device_name, flav_config, timed_calls  # noqa: E402
from rflav_cli.models.flav import FLAV  # noqa: E402
from rflav_cli.runtime import pick_device  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def gemm_tflops(device: torch.device, dtype: torch.dtype, m: int, k: int, n: int, repeats: int) -> float:
    x = torch.randn(m, k, device=device, dtype=dtype)
    w = torch.randn(n, k, device=device, dtype=dtype)
    times, _ = timed_calls(lambda: torch.nn.functional.linear(x, w), device, repeats, warmup=2)
    return 2 * m * k * n / statistics.median(times) / 1e12


def forward_tflop(size: str, batch: int) -> float:
    with torch.device("meta"):
        model = FLAV(flav_config(size)).eval()
        c = model.config
        v = torch.randn(batch, c.predict_frames, c.in_channels, c.latent_size, c.latent_size)
        a = torch.randn(batch, c.predict_frames, 1, c.n_mels, 10)
        t = torch.rand(batch, c.predict_frames)
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            model(v, a, t)
    return counter.get_total_flops() / 1e12


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto")
    p.add_argument("--size", default="FLAV-B/1")
    p.add_argument("--batch", default="1")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    device = pick_device(args.device)
    print(f"device {device_name(device)}, torch {torch.__version__}")
    peaks = {}
    for name, dtype in DTYPES.items():
        peaks[name] = gemm_tflops(device, dtype, 10240, 768, 3072, args.repeats)
        print(f"GEMM 10240x768 @ 768x3072, {name}: {peaks[name] * 1000:.0f} GFLOP/s")
    print(f"bf16 / fp32 matrix throughput: {peaks['bf16'] / peaks['fp32']:.2f}x")
    for batch in [int(b) for b in args.batch.split(",")]:
        flop = forward_tflop(args.size, batch)
        floor = flop / peaks["bf16"]
        print(
            f"{args.size} forward, window 10, batch {batch}: {flop:.3f} TFLOP; at the bf16 GEMM rate above "
            f"it cannot take less than {floor * 1000:.1f} ms, "
            f"i.e. at most {batch / (2 * floor):.1f} frames/s "
            f"at 2 steps per frame (model only)"
        )


if __name__ == "__main__":
    main()
