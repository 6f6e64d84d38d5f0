"""The GPU-only fast paths, checked where a CUDA device exists (skipped elsewhere).

Tiny release-layout checkpoints; the same guarantees as on CPU: the second stream for decoding
and vocoding changes nothing, compiled (CUDA graphs) equals eager up to rounding, bf16 stays
close to fp32, and sampling never makes the host wait for the GPU's queue to drain.
"""

from __future__ import annotations

import numpy as np
import pytest
import tiny
import torch

from rflav_cli.pipeline import Pipeline

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("cuda")
    model = tiny.build_tiny_model(root / "model", num_classes=3, class_names=["a", "b", "c"])
    return model, tiny.build_tiny_vae(root / "vae")


def frames(pipe: Pipeline, n: int = 6) -> tuple[np.ndarray, np.ndarray]:
    out = list(pipe.generate(num_frames=n, seeds=[0, 1], label="b"))
    return np.stack([f.video for f in out]), np.stack([f.audio for f in out])


def load(ckpt, **kwargs) -> Pipeline:
    """Full float32 for fp32 (no TF32): these tests compare kernels and paths, and TF32's 10-bit
    products would turn their float32 rounding differences into larger ones."""
    model, vae = ckpt
    kwargs.setdefault("tf32", False)
    return Pipeline.from_pretrained(str(model), vae=str(vae), device="cuda", **kwargs)


def test_second_stream_changes_nothing(ckpt):
    overlapped = frames(load(ckpt, dtype="fp32"))
    serial = frames(load(ckpt, dtype="fp32", overlap=False))
    assert np.array_equal(overlapped[0], serial[0]) and np.array_equal(overlapped[1], serial[1])


def test_compiled_equals_eager_on_cuda(ckpt):
    eager = frames(load(ckpt, dtype="fp32"))
    for overlap in (True, False):
        fast = frames(load(ckpt, dtype="fp32", compile=True, compile_in_background=False, overlap=overlap))
        assert np.abs(fast[0].astype(int) - eager[0]).max() <= 1
        assert np.abs(fast[1] - eager[1]).max() <= 1e-4


def test_background_compile_takes_over_on_cuda(ckpt):
    """Compiled on a thread, then replayed as a CUDA graph that the sampling thread captures:
    the frames after the switch are the eager ones up to rounding."""
    eager = frames(load(ckpt, dtype="fp32"), n=12)
    pipe = load(ckpt, dtype="fp32", compile=True)
    generation = pipe.generate(num_frames=12, seeds=[0, 1], label="b")
    out = [next(generation), next(generation)]  # the first frame out lets the compiler start
    assert pipe.model.wait_compiled(timeout=600)
    out += list(generation)
    video, audio = np.stack([f.video for f in out]), np.stack([f.audio for f in out])
    assert pipe.compile and np.abs(video.astype(int) - eager[0]).max() <= 1
    assert np.abs(audio - eager[1]).max() <= 1e-4


def test_one_compiled_model_serves_two_threads_at_once(ckpt):
    """As `rflav serve` runs streams: each thread captures its own graph of the shared compiled
    blocks, and neither stream's frames are disturbed by the other's."""
    import threading

    def one_seed(pipe: Pipeline, seed: int) -> np.ndarray:
        return np.stack([f.video for f in pipe.generate(num_frames=14, seeds=[seed], label="b")])

    eager_pipe = load(ckpt, dtype="fp32")
    eager = {seed: one_seed(eager_pipe, seed) for seed in (3, 4)}
    pipe = load(ckpt, dtype="fp32", compile=True, compile_in_background=False)
    pipe.warm_up()
    got: dict[int, np.ndarray] = {}
    threads = [
        threading.Thread(target=lambda s=seed: got.__setitem__(s, one_seed(pipe, s))) for seed in (3, 4)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for seed in (3, 4):
        assert np.abs(got[seed].astype(int) - eager[seed]).max() <= 1


def test_cuda_graph_replay_equals_eager(ckpt):
    """The eager kernels replayed as a CUDA graph: the same frames as launching them one by one."""
    for dtype in ("fp32", "bf16"):
        eager = frames(load(ckpt, dtype=dtype), n=14)
        replayed = frames(load(ckpt, dtype=dtype, cuda_graph=True), n=14)
        assert np.abs(replayed[0].astype(int) - eager[0]).max() <= 1
        assert np.abs(replayed[1] - eager[1]).max() <= 1e-4


def test_tf32_stream_is_close_to_full_fp32(ckpt):
    """fp32 as the reference runs it (TF32 products, the default) against full float32."""
    full = frames(load(ckpt, dtype="fp32"))
    tf32 = frames(load(ckpt, dtype="fp32", tf32=True))
    assert torch.backends.cuda.matmul.allow_tf32
    assert np.abs(tf32[0].astype(float) - full[0]).mean() < 1.0  # uint8 levels
    assert np.sqrt(((tf32[1] - full[1]) ** 2).mean() / (full[1] ** 2).mean()) < 2e-2
    load(ckpt, dtype="fp32")  # TF32 is a process-wide setting: the other tests' full float32


def test_bf16_stream_is_close_to_fp32(ckpt):
    fp32 = frames(load(ckpt, dtype="fp32"))
    bf16 = frames(load(ckpt, dtype="bf16"))
    assert np.abs(bf16[0].astype(float) - fp32[0]).mean() < 2.0  # uint8 levels
    assert np.sqrt(((bf16[1] - fp32[1]) ** 2).mean() / (fp32[1] ** 2).mean()) < 5e-2


def test_sampling_never_waits_for_the_gpu(ckpt):
    """Rolling steps (model calls, fresh noise, window shift) only queue GPU work: with a few
    hundred milliseconds of matrix products queued first, two more frames of the sampler come
    back before that work is done. A blocking host-to-device copy would wait for it."""
    pipe = load(ckpt, dtype="fp32")
    sampler = pipe.generate(num_frames=None, seeds=[0], label="b")._frames
    next(sampler)  # pre-roll
    for _ in range(2):  # the first round also grows the pinned-memory pool to what is in flight
        torch.cuda.synchronize()
        big = torch.randn(8192, 8192, device="cuda")
        for _ in range(20):
            big = big @ big.T / 8192
        queued = torch.cuda.Event()
        queued.record()
        next(sampler)
        next(sampler)
        still_running = not queued.query()
    torch.cuda.synchronize()
    assert still_running
