"""The library surface of the pipeline: `from_pretrained(torch_dtype=…)`, `.to()` and the bounded
call, checked against the streaming `generate()` on tiny checkpoints."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tiny
import torch

from rflav_cli.errors import RflavError, UsageError
from rflav_cli.pipeline import Pipeline, PipelineError, PipelineOutput
from rflav_cli.requests import GenerateRequest, generate_frame_count


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ckpt")
    return {"model": tiny.build_tiny_model(root / "model"), "vae": tiny.build_tiny_vae(root / "vae")}


@pytest.fixture(scope="module")
def pipe(ckpt) -> Pipeline:
    return Pipeline.from_pretrained(
        str(ckpt["model"]), vae=str(ckpt["vae"]), torch_dtype=torch.float32, device="cpu"
    )


def test_bounded_call_equals_the_stream(ckpt):
    pipe = Pipeline.from_pretrained(str(ckpt["model"]), vae=str(ckpt["vae"]), torch_dtype=torch.float32).to(
        "cpu"
    )
    out = pipe(seconds=1, seed=0)

    assert isinstance(out, PipelineOutput)
    assert out.frames.dtype == np.uint8 and out.frames.shape == (1, 10, 256, 256, 3)
    assert out.audio.dtype == np.float32 and out.audio.shape == (1, 16_000)
    assert (out.fps, out.sample_rate) == (10, 16_000)

    # An independent load with the command line's string spellings, streamed frame by frame.
    streamed = list(
        Pipeline.from_pretrained(
            str(ckpt["model"]), vae=str(ckpt["vae"]), device="cpu", dtype="fp32"
        ).generate(num_frames=10, seeds=[0])
    )
    assert [f.index for f in streamed] == list(range(10))
    np.testing.assert_array_equal(out.frames[0], np.stack([f.video[0] for f in streamed]))
    np.testing.assert_array_equal(out.audio[0], np.concatenate([f.audio[0] for f in streamed]))
    assert out.frames.std() > 1 and np.abs(out.audio).max() > 0  # not a blank clip


def test_call_batches_seeds_and_counts_frames(pipe):
    out = pipe(frames=3, seeds=[7, 8])
    assert out.frames.shape == (2, 3, 256, 256, 3) and out.audio.shape == (2, 3 * 1600)
    assert np.abs(out.frames[0].astype(int) - out.frames[1]).mean() > 1  # two seeds, two clips
    one = pipe(frames=3, seed=7)
    assert np.abs(one.frames[0].astype(int) - out.frames[0]).max() <= 1
    assert pipe(seconds=0.04, seed=1).frames.shape[1] == 1  # rounds up to one frame, as the CLI


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        ({"seconds": 1, "frames": 10}, "give either seconds or frames"),
        ({"seconds": -1}, "seconds must be a positive number"),
        ({"seconds": 1e308}, "seconds must be a positive number of at most 604800"),
        ({"seconds": float("inf")}, "seconds must be a positive number of at most 604800"),
        ({"seconds": float("nan")}, "seconds must be a positive number"),
        ({"frames": 0}, "frames must be a whole number from 1 to 6048000"),
        ({"frames": 2.5}, "frames must be a whole number from 1"),
        ({"frames": 1, "seed": 1, "seeds": [1]}, "give either seed or seeds"),
        ({"frames": 1, "seeds": []}, "seeds must hold at least one seed"),
        ({"frames": 1, "seed": -1}, r"seed must be from 0 to 9223372036854775807 \(a whole number\), got -1"),
        ({"frames": 1, "seed": 2**64}, "seed must be from 0 to 9223372036854775807"),
        ({"frames": 1, "seed": 1.5}, "seed must be from 0 to 9223372036854775807"),
        ({"frames": 1, "seeds": [3, 2**63]}, "seeds must be from 0 to 9223372036854775807"),
        ({"audio": np.zeros(0, np.float32)}, "audio holds no samples"),
        (
            {"audio": np.zeros(3 * 1600, np.float32), "frames": 4},
            "frames 4 asks for 4 frames, and audio lasts 3 frames",
        ),
    ],
)
def test_call_rejects_bad_requests(pipe, kwargs, needle):
    with pytest.raises(UsageError, match=needle):
        pipe(**kwargs)


def test_a_length_is_at_most_a_week():
    assert generate_frame_count(GenerateRequest(seconds=7 * 24 * 3600), None) == 6048000
    assert generate_frame_count(GenerateRequest(frames=6048000), None) == 6048000
    for req in (GenerateRequest(seconds=7 * 24 * 3600 + 1), GenerateRequest(frames=6048001)):
        with pytest.raises(UsageError, match="at most 604800 .a week.|from 1 to 6048000 .a week."):
            generate_frame_count(req, None)


def test_stream_rejects_seeds_and_lengths_torch_would_misread(pipe):
    # torch takes -1 as 2**64 - 1 and rounds nothing: each would silently be another request.
    for kwargs, needle in (
        ({"num_frames": 2.5}, "num_frames must be a whole number"),
        ({"num_frames": 2, "seeds": [-1]}, "seeds must be from 0"),
        ({"num_frames": 2, "seeds": [0.5]}, "seeds must be from 0"),
        ({"num_frames": 2, "audio": np.zeros(0, np.float32)}, "audio holds no samples"),
    ):
        with pytest.raises(UsageError, match=needle):
            pipe.generate(**kwargs)
    assert len(list(pipe.generate(num_frames=2, seeds=[np.int64(3)]))) == 2  # numpy's integers are fine


def test_audio_sets_the_length_and_a_shorter_one_is_allowed(pipe):
    wave = np.zeros(3 * 1600, np.float32)
    assert pipe(audio=wave, seed=0).frames.shape[1] == 3
    assert pipe(audio=wave, frames=2, seed=0).frames.shape[1] == 2


def test_a_checkpoint_with_nan_weights_is_named_as_the_cause(ckpt):
    pipe = Pipeline.from_pretrained(str(ckpt["model"]), vae=str(ckpt["vae"]), device="cpu", dtype="fp32")
    with torch.no_grad():
        for p in pipe.model.parameters():
            p.fill_(float("nan"))
    with pytest.raises(PipelineError, match=r"NaN or infinite sound at frame 0: the weights of checkpoint "):
        pipe(frames=2)

    # A VAE that decodes NaN: the sound is fine, the picture is not (uint8 alone would hide it).
    pipe = Pipeline.from_pretrained(str(ckpt["model"]), vae=str(ckpt["vae"]), device="cpu", dtype="fp32")
    with torch.no_grad():
        for p in pipe.vae.parameters():
            p.fill_(float("nan"))
    with pytest.raises(PipelineError, match="NaN or infinite video at frame 0"):
        pipe(frames=2)


def test_a_revision_is_refused_where_it_cannot_apply(ckpt):
    with pytest.raises(
        UsageError, match="revision applies to Hub repos, and the ball preset ships with rflav"
    ):
        Pipeline.from_pretrained("ball", revision="main")
    with pytest.raises(UsageError, match="is a local folder: drop revision"):
        Pipeline.from_pretrained(str(ckpt["model"]), vae=str(ckpt["vae"]), revision="main")


def test_torch_dtype_bfloat16_gives_a_bf16_model(ckpt):
    pipe = Pipeline.from_pretrained(
        str(ckpt["model"]), vae=str(ckpt["vae"]), torch_dtype=torch.bfloat16, device=torch.device("cpu")
    )
    assert pipe.dtype == torch.bfloat16 and pipe.model.dtype == torch.bfloat16
    assert pipe.device == torch.device("cpu")
    assert pipe(frames=2, seed=0).frames.shape == (1, 2, 256, 256, 3)


def test_to_moves_and_returns_the_same_object(ckpt):
    pipe = Pipeline.from_pretrained(str(ckpt["model"]), vae=str(ckpt["vae"]), device="cpu", dtype="fp32")
    assert pipe.to("cpu") is pipe and pipe.to(torch.device("cpu")) is pipe
    assert pipe.device == torch.device("cpu") and pipe.dtype == torch.float32

    pipe.model.compile_blocks()
    before = pipe.model._compiled_blocks
    assert pipe.to(torch.bfloat16) is pipe
    assert pipe.dtype == torch.bfloat16 and pipe.model.dtype == torch.bfloat16
    assert pipe.model.blocks_compiled and pipe.model._compiled_blocks is not before  # compiled anew
    assert pipe.to("cpu", dtype=torch.float32) is pipe
    assert pipe.model.dtype == torch.float32
    assert next(pipe.vae.parameters()).dtype == torch.float32


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        ({"torch_dtype": torch.int8}, "unknown torch_dtype torch.int8"),
        ({"torch_dtype": torch.float64}, "unknown torch_dtype"),
        ({"torch_dtype": "bf16"}, "unknown torch_dtype 'bf16'"),
        ({"torch_dtype": torch.float32, "dtype": "fp32"}, "give either dtype or torch_dtype, not both"),
    ],
)
def test_from_pretrained_rejects_bad_dtypes(ckpt, kwargs, needle):
    with pytest.raises(UsageError, match=needle):
        Pipeline.from_pretrained(str(ckpt["model"]), vae=str(ckpt["vae"]), device="cpu", **kwargs)


def test_to_rejects_bad_dtypes_and_devices(pipe):
    with pytest.raises(UsageError, match="unknown dtype torch.int64"):
        pipe.to(torch.int64)
    with pytest.raises(RflavError, match="fp16 is not supported on CPU"):
        pipe.to(torch.float16)
    with pytest.raises(RflavError, match="unknown device 'tpu'"):
        pipe.to("tpu")
    assert pipe.device == torch.device("cpu") and pipe.dtype == torch.float32  # unchanged after the refusals


def test_warm_up_changes_no_later_stream(tmp_path):
    """A server warms a pipeline up before its first viewer: the streams after it are those of a
    pipeline that was never warmed up."""
    model = tiny.build_tiny_model(tmp_path / "m")
    vae = tiny.build_tiny_vae(tmp_path / "vae")
    cold = Pipeline.from_pretrained(str(model), vae=str(vae), device="cpu", dtype="fp32")
    warm = Pipeline.from_pretrained(str(model), vae=str(vae), device="cpu", dtype="fp32")
    warm.warm_up()
    for a, b in zip(cold.generate(num_frames=6, seeds=[3]), warm.generate(num_frames=6, seeds=[3])):
        assert np.array_equal(a.video, b.video) and np.array_equal(a.audio, b.audio)


def test_warm_up_meets_every_batch_a_stream_can_have_on_a_thread_of_its_own(tmp_path):
    """A class-conditional model's streams call the model at batch 1, or 2 with guidance (the
    conditional and null-class passes together): warming up meets both, off the caller's thread."""
    import threading

    model = tiny.build_tiny_model(tmp_path / "m", num_classes=3, class_names=["a", "b", "c"])
    vae = tiny.build_tiny_vae(tmp_path / "vae")
    pipe = Pipeline.from_pretrained(str(model), vae=str(vae), device="cpu", dtype="fp32")
    calls: set[tuple[int, int, str]] = set()
    forward = pipe.model.forward

    def recorded(v, *args, **kwargs):
        calls.add((v.shape[0], v.shape[1], threading.current_thread().name))
        return forward(v, *args, **kwargs)

    pipe.model.forward = recorded
    pipe.warm_up()
    window = pipe.model.window
    assert {(1, window, "rflav-warm-up"), (2, window, "rflav-warm-up")} <= calls
    assert {name for _, _, name in calls} == {"rflav-warm-up"}


def test_a_full_window_preroll_makes_the_frames_of_the_leading_frames_one(tmp_path, monkeypatch):
    """On GPUs every pre-roll call has the full window; on CPUs a causal model's pre-roll calls
    only the frames that move. The frames agree up to float32 rounding."""
    import rflav_cli.pipeline as pipeline_module

    model = tiny.build_tiny_model(tmp_path / "m")
    vae = tiny.build_tiny_vae(tmp_path / "vae")
    pipe = Pipeline.from_pretrained(str(model), vae=str(vae), device="cpu", dtype="fp32")
    assert pipe.model.config.causal_attn
    lengths: list[int] = []
    forward = pipe.model.forward

    def recorded(v, *args, **kwargs):
        lengths.append(v.shape[1])
        return forward(v, *args, **kwargs)

    pipe.model.forward = recorded
    prefix = list(pipe.generate(num_frames=4, seeds=[0]))
    assert min(lengths) == 1  # the CPU's way
    sample = pipeline_module.rolling_sample
    monkeypatch.setattr(
        pipeline_module, "rolling_sample", lambda *a, **k: sample(*a, **{**k, "causal": False})
    )
    lengths.clear()
    full = list(pipe.generate(num_frames=4, seeds=[0]))
    assert set(lengths) == {pipe.model.window}  # the GPU's way: one shape
    for a, b in zip(prefix, full):
        assert np.abs(a.video.astype(int) - b.video.astype(int)).max() <= 1
        assert np.abs(a.audio - b.audio).max() <= 1e-5
