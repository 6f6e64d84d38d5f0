"""Time one FLAV forward (any size, device, dtype, window, batch) and its bf16 error.

    python benchmarks/forward.py --size FLAV-B/1 --device cpu --dtypes fp32,bf16
    python benchmarks/forward.py --size FLAV-B/1 --device cuda --dtypes fp32,bf16 --batch 1,16 --compile

Weights are random (std 0.02, as a trained DiT's scale); the relative error of each dtype is
‖y − y_fp32‖ / ‖y_fp32‖ over both outputs.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rflav_cli.config import RELEASED_FLAV_CONFIG  # noqa: E402
from rflav_cli.models.flav import FLAV, FLAVConfig  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def build(size: str, window: int, device: str) -> FLAV:
    base = {k: v for k, v in RELEASED_FLAV_CONFIG.items() if k not in ("depth", "hidden_size", "num_heads", "patch_size")}
    model = FLAV(FLAVConfig.from_size(size, **{**base, "predict_frames": window}))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    return model.to(device).eval()


def timed(fn, device: str, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="FLAV-B/1")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtypes", default="fp32,bf16")
    p.add_argument("--batch", default="1")
    p.add_argument("--window", type=int, default=10)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--compile", action="store_true", help="also time torch.compile(mode='max-autotune-no-cudagraphs')")
    args = p.parse_args()

    fp32 = build(args.size, args.window, args.device)
    cfg = fp32.config
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"cpu ({torch.get_num_threads()} threads)"
    print(f"{args.size}, window {args.window}, device {name}, torch {torch.__version__}")
    print(f"{'batch':>5} {'dtype':>6} {'compiled':>8} {'median s':>10} {'frames/s @2 steps':>18} {'rel err':>9}")
    for batch in [int(b) for b in args.batch.split(",")]:
        g = torch.Generator().manual_seed(1)
        v = torch.randn(batch, cfg.predict_frames, cfg.in_channels, cfg.latent_size, cfg.latent_size, generator=g)
        a = torch.randn(batch, cfg.predict_frames, 1, cfg.n_mels, 10, generator=g)
        t = torch.rand(batch, cfg.predict_frames, generator=g) * 999 + 1
        v, a, t = v.to(args.device), a.to(args.device), t.to(args.device)
        with torch.no_grad():
            ref_v, ref_a = fp32(v, a, t)
        for dtype_name in args.dtypes.split(","):
            dtype = DTYPES[dtype_name]
            model = fp32 if dtype == torch.float32 else build(args.size, args.window, args.device).to(dtype)
            variants = [(False, model)]
            if args.compile:
                variants.append((True, torch.compile(model, mode="max-autotune-no-cudagraphs", dynamic=False)))
            for compiled, fn in variants:
                with torch.no_grad():
                    out_v, out_a = fn(v, a, t)  # warm-up (and compilation)
                    times = timed(lambda: fn(v, a, t), args.device, args.repeats)
                num = torch.cat([(out_v.float() - ref_v).flatten(), (out_a.float() - ref_a).flatten()]).norm()
                den = torch.cat([ref_v.flatten(), ref_a.flatten()]).norm()
                median = statistics.median(times)
                print(f"{batch:>5} {dtype_name:>6} {str(compiled):>8} {median:>10.4f} {batch / (2 * median):>18.1f} "
                      f"{(num / den).item():>9.2e}")
            if dtype != torch.float32:
                del model


if __name__ == "__main__":
    main()
