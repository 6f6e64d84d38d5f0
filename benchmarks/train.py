"""Training-step speed: steps/s and clips/s for a model size, device and dtype.

    python benchmarks/train.py --size FLAV-B/1 --device cuda --dtype bf16 --batch-size 8
    python benchmarks/train.py --size FLAV-S/8 --device cpu --batch-size 2 --steps 3

Batches are random tensors of the training shapes (latents 4×32×32 or pixels with
--pixel-size), so the figure is the model's forward + backward + AdamW, without data loading.
"""

from __future__ import annotations

import argparse
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rflav_cli.flow import flow_matching_loss, sample_training_levels  # noqa: E402
from rflav_cli.models.flav import FLAV, FLAVConfig  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="FLAV-B/1")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bf16", choices=["fp32", "bf16"], help="bf16 = autocast")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--window", type=int, default=10)
    p.add_argument(
        "--pixel-size", type=int, default=0, help="train in pixel space at this size instead of latents"
    )
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--grad-ckpt", action="store_true")
    p.add_argument("--compile", action="store_true")
    args = p.parse_args()

    channels, latent = (3, args.pixel_size) if args.pixel_size else (4, 32)
    cfg = FLAVConfig.from_size(
        args.size,
        latent_size=latent,
        in_channels=channels,
        predict_frames=args.window,
        grad_ckpt=args.grad_ckpt,
    )
    model = FLAV(cfg)
    model.initialize_weights()
    model.to(args.device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.02)
    forward = torch.compile(model) if args.compile else model
    autocast = (
        torch.autocast(torch.device(args.device).type, dtype=torch.bfloat16)
        if args.dtype == "bf16"
        else nullcontext()
    )
    b, w = args.batch_size, args.window
    v = torch.randn(b, w, channels, latent, latent, device=args.device)
    a = torch.randn(b, w, 1, cfg.n_mels, 10, device=args.device)

    def step() -> float:
        t = sample_training_levels(b, w, device=args.device)
        with autocast:
            loss = flow_matching_loss(lambda vv, aa, tt: forward(vv, aa, tt), v, a, t)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return float(loss)

    step()  # warm-up (and compilation)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    device = (
        torch.cuda.get_device_name()
        if args.device.startswith("cuda")
        else f"cpu ({torch.get_num_threads()} threads)"
    )
    params = sum(p.numel() for p in model.parameters()) / 1e6
    print(f"{args.size} ({params:.1f} M params), window {w}, batch {b}, {args.dtype}, device {device}")
    print(
        f"steps/s {args.steps / elapsed:.3f}   clips/s {args.steps * b / elapsed:.2f}"
        + (
            f"   peak GPU memory {torch.cuda.max_memory_allocated() / 1e9:.1f} GB"
            if args.device.startswith("cuda")
            else ""
        )
    )


if __name__ == "__main__":
    main()
