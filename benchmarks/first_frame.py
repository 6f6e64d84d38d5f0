"""Where the time to the first frame goes: the cost of each stage's first and second call.

    python benchmarks/first_frame.py --size FLAV-B/1 --device cuda
    python benchmarks/first_frame.py --size tiny --device cpu        # a quick run anywhere

Each case runs in a fresh process, since one-time costs (kernel loading, convolution plans,
allocator growth) are paid once per process:

- stages: pre-roll, then two rolling frames, two VAE decodes and two vocoder pushes, in turn;
- warm-in-thread: a VAE decode and a vocoder push on a second thread and stream, then the same
  on the main thread (do one-time costs paid on another thread carry over?);
- concurrent: that warm-up thread runs while the main thread does the pre-roll;
- preroll-calls: each model call of the pre-roll timed alone (frames it sees, seconds): are
  the one-time costs in the first call, in each new shape, or spread? The pipeline's pre-roll:
  full windows on GPUs;
- preroll-calls-prefix: the same with the leading-frames shortcut of causal models (1 to W
  frames per call, as on CPUs);
- preroll-profile: the pre-roll under torch.profiler, the host's costliest operations (CUDA
  runtime calls included on GPUs).

Prints one JSON object per case, times in seconds.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rflav_cli import pipeline as pipeline_module  # noqa: E402
from rflav_cli.bench import build_random_checkpoint, synchronize, timed_calls  # noqa: E402
from rflav_cli.models.vocoder import StreamingVocoder  # noqa: E402
from rflav_cli.pipeline import Pipeline  # noqa: E402

CASES = ("stages", "warm-in-thread", "concurrent", "preroll-calls", "preroll-calls-prefix", "preroll-profile")


def timed(fn, device: torch.device) -> tuple[float, object]:
    (seconds,), out = timed_calls(fn, device, 1)
    return seconds, out


def preroll_calls(pipe: Pipeline, sampler, dev: torch.device) -> dict:
    """Each pre-roll model call timed alone: (frames it sees, seconds)."""
    calls: list[tuple[int, float]] = []
    forward = pipe.model.forward

    def timed_forward(v, *args, **kwargs):
        synchronize(dev)
        start = time.perf_counter()
        out = forward(v, *args, **kwargs)
        synchronize(dev)
        calls.append((v.shape[1], round(time.perf_counter() - start, 4)))
        return out

    pipe.model.forward = timed_forward
    try:
        next(sampler)
    finally:
        pipe.model.forward = forward
    return {"calls": calls, "first_call_s": calls[0][1], "rest_s": round(sum(s for _, s in calls[1:]), 4)}


def preroll_profile(sampler, dev: torch.device) -> dict:
    """The host's costliest operations in a fresh process's pre-roll."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if dev.type == "cuda":  # adds the CUDA runtime calls (launches, allocations, module loads)
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        next(sampler)
        synchronize(dev)
    top = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:15]
    return {"host_top": [(e.key, e.count, round(e.self_cpu_time_total / 1e6, 4)) for e in top]}


def run_case(case: str, model: str, vae: str, device: str, dtype: str) -> dict:
    if case == "preroll-calls-prefix":  # the shortcut whatever the device: the model is causal
        sample = pipeline_module.rolling_sample
        pipeline_module.rolling_sample = lambda *args, **kwargs: sample(*args, **{**kwargs, "causal": True})
    pipe = Pipeline.from_pretrained(model, vae=vae, device=device, dtype=dtype)
    dev = pipe.device
    label = 0 if pipe.model.num_classes > 0 else None
    sampler = pipe.generate(num_frames=None, seeds=[0], label=label)._frames
    cfg = pipe.model.config
    latents = torch.randn(1, cfg.in_channels, cfg.latent_size, cfg.latent_size, device=dev, dtype=pipe.dtype)
    mel = torch.randn(1, cfg.n_mels, 10, device=dev) - 5

    def decode() -> None:
        pipe.decode_latents(latents).numpy()

    def vocode() -> None:  # a push alone may only buffer (look-ahead); the flush vocodes
        vocoder = StreamingVocoder(pipe.vocoder)
        vocoder.push(mel)
        vocoder.flush().cpu()

    def warm_up() -> None:
        stream = torch.cuda.Stream(dev) if dev.type == "cuda" else None
        with torch.cuda.stream(stream) if stream is not None else torch.no_grad():
            with torch.no_grad():
                decode()
                vocode()
        synchronize(dev)

    row: dict = {"case": case}
    with torch.no_grad():
        if case == "stages":
            row["preroll_s"], _ = timed(lambda: next(sampler), dev)
            row["rolling_frame_s"] = [round(timed(lambda: next(sampler), dev)[0], 4) for _ in range(2)]
            row["decode_s"] = [round(timed(decode, dev)[0], 4) for _ in range(2)]
            row["vocoder_s"] = [round(timed(vocode, dev)[0], 4) for _ in range(2)]
            # Host-bound or GPU-bound: the host's time to queue one step / decode vs its full time.
            synchronize(dev)
            start = time.perf_counter()
            next(sampler)
            row["rolling_frame_queue_s"] = time.perf_counter() - start
            synchronize(dev)
            start = time.perf_counter()
            pipe.decode_latents(latents)
            row["decode_queue_s"] = time.perf_counter() - start
            synchronize(dev)
            many = latents.expand(4, *latents.shape[1:]).contiguous()
            row["decode_4_at_once_s"] = [
                round(timed(lambda: pipe.decode_latents(many).numpy(), dev)[0], 4) for _ in range(2)
            ]
        elif case == "warm-in-thread":
            thread = threading.Thread(target=warm_up)
            row["thread_s"], _ = timed(lambda: (thread.start(), thread.join()), dev)
            row["decode_after_s"], _ = timed(decode, dev)
            row["vocoder_after_s"], _ = timed(vocode, dev)
        elif case in ("preroll-calls", "preroll-calls-prefix"):
            row.update(preroll_calls(pipe, sampler, dev))
        elif case == "preroll-profile":
            row.update(preroll_profile(sampler, dev))
        else:
            done: dict = {}
            thread = threading.Thread(target=lambda: done.update(s=timed(warm_up, dev)[0]))
            start = time.perf_counter()
            thread.start()
            row["preroll_s"], _ = timed(lambda: next(sampler), dev)
            thread.join()
            row["both_done_s"] = time.perf_counter() - start
            row["thread_s"] = done.get("s")
            row["decode_after_s"], _ = timed(decode, dev)
            row["vocoder_after_s"], _ = timed(vocode, dev)
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="FLAV-B/1")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--cases", default=",".join(CASES))
    p.add_argument("--case", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--vae", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.case:  # one case, in this (fresh) process
        print(json.dumps(run_case(args.case, args.model, args.vae, args.device, args.dtype)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        model, vae = build_random_checkpoint(tmp, args.size)
        for case in args.cases.split(","):
            cmd = [
                sys.executable,
                __file__,
                "--case",
                case,
                "--model",
                str(model),
                "--vae",
                str(vae),
                "--device",
                args.device,
                "--dtype",
                args.dtype,
            ]
            done = subprocess.run(cmd, capture_output=True, text=True)
            print(done.stdout.strip() or done.stderr.strip().splitlines()[-1], flush=True)


if __name__ == "__main__":
    main()
