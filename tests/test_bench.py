"""`rflav bench` and `rflav_cli.bench` on CPU with the tiny random checkpoint."""

from __future__ import annotations

import json
import shutil
import subprocess
import time

import pytest
import torch
from typer.testing import CliRunner

import rflav_cli.media as media
from rflav_cli import bench
from rflav_cli.cli import app
from rflav_cli.config import FPS


def run_cli(*args: str):
    return CliRunner().invoke(app, ["bench", *args], catch_exceptions=False)


def test_json_figures_are_consistent():
    frames = 8  # the default on CPUs
    began = time.perf_counter()
    result = run_cli("--size", "tiny", "--device", "cpu", "--dtype", "fp32", "--no-mux", "--json")
    wall = time.perf_counter() - began
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    gen, fwd = report["generation"], report["forward"]
    assert report["model"] == gen["model"] == fwd["model"] == "random tiny"
    assert report["dtype"] == gen["dtype"] == fwd["dtype"] == "float32"
    assert report["device"].startswith("cpu")
    assert gen["frames"] == frames and gen["frames_generated"] == frames
    assert gen["first_frame_s"] > 0 and gen["steady_frames_per_s"] > 0
    assert gen["real_time_factor"] == pytest.approx(gen["steady_frames_per_s"] / FPS)
    # The steady frames (all but the first quarter) come out after the first one and before the end.
    steady_intervals = frames - frames // bench.STEADY_SKIP - 1
    assert gen["first_frame_s"] + steady_intervals / gen["steady_frames_per_s"] <= gen["total_s"] + 1e-9
    # Loading and generating happened inside this call, so they cannot add up to more than it took.
    assert 0 < gen["load_s"] + gen["total_s"] < wall
    assert gen["peak_gpu_mem_gb"] is None and report["peak_rss_mb"] == gen["peak_rss_mb"] > 0
    assert not gen["muxed"] and gen["outputs"] == []
    # fp32 against its own fp32 reference: the same numbers.
    assert fwd["relative_error"] == 0.0
    assert fwd["window"] == bench.TINY_FLAV["predict_frames"] and fwd["batch"] == 1 and fwd["steps"] == 2
    assert len(fwd["times_s"]) == bench.FORWARD_REPEATS and fwd["median_s"] in fwd["times_s"]
    assert fwd["forward_ms"] == pytest.approx(1000 * fwd["median_s"])
    assert fwd["frames_per_s"] == pytest.approx(1 / (2 * fwd["median_s"]))


@pytest.mark.skipif(shutil.which("ffprobe") is None, reason="needs ffprobe to inspect the MP4s")
def test_mp4s_written_while_timing_are_complete(tmp_path):
    frames = 6
    result = bench.time_generation(
        size="tiny", device="cpu", dtype="fp32", batch_size=2, frames=frames, video_dir=tmp_path
    )
    assert result.muxed and result.frames_generated == frames
    assert sorted(result.outputs) == [str(tmp_path / "bench-0.mp4"), str(tmp_path / "bench-1.mp4")]
    for path in result.outputs:
        probe = subprocess.run(
            ["ffprobe", "-v", "error", "-count_frames", "-show_streams", "-of", "json", path],
            capture_output=True,
            text=True,
            check=True,
        )
        streams = {s["codec_type"]: s for s in json.loads(probe.stdout)["streams"]}
        video, audio = streams["video"], streams["audio"]
        assert video["codec_name"] == "h264" and (video["width"], video["height"]) == (256, 256)
        assert int(video["nb_read_frames"]) == frames and video["r_frame_rate"] == f"{FPS}/1"
        assert audio["codec_name"] == "aac" and audio["sample_rate"] == "16000"


def test_no_mux_never_starts_a_writer_and_profile_writes_a_trace(tmp_path, monkeypatch):
    def no_writer(*args, **kwargs):
        raise AssertionError("a VideoWriter was started without muxing")

    monkeypatch.setattr(media, "VideoWriter", no_writer)
    trace = tmp_path / "trace.json"
    result = bench.time_generation(
        size="tiny",
        device="cpu",
        dtype="fp32",
        frames=3,
        mux=False,
        profile=trace,
        video_dir=tmp_path / "videos",
    )
    assert not result.muxed and result.frames_generated == 3
    assert not (tmp_path / "videos").exists()
    events = json.loads(trace.read_text())["traceEvents"]
    assert any(e.get("name") == "aten::linear" for e in events)


def test_forward_error_against_fp32():
    fp32 = bench.time_forward("tiny", "cpu", "fp32", repeats=1)
    assert fp32.relative_error == 0.0 and fp32.dtype == "float32"
    bf16 = bench.time_forward("tiny", "cpu", "bf16", repeats=2, batch=2, steps=3)
    assert bf16.dtype == "bfloat16" and 0 < bf16.relative_error < 0.05
    assert len(bf16.times_s) == 2 and bf16.frames_per_s == pytest.approx(2 / (3 * bf16.median_s))
    # The same error, computed here from the same seeded weights and inputs.
    model = bench.random_flav("tiny")
    inputs = bench.forward_inputs(model.config, 2, torch.device("cpu"))
    with torch.no_grad():
        ref = torch.cat([y.flatten() for y in model(*inputs)])
        low = torch.cat([y.float().flatten() for y in model.to(torch.bfloat16)(*inputs)])
    assert bf16.relative_error == pytest.approx(((low - ref).norm() / ref.norm()).item(), rel=1e-5)


def test_a_class_conditional_checkpoint_is_timed_on_its_first_class(tmp_path):
    import tiny

    folder = tiny.build_tiny_model(tmp_path / "classes", num_classes=2, class_names=["a", "b"])
    bf16 = bench.time_forward(device="cpu", dtype="bf16", repeats=1, model=str(folder))
    assert bf16.model == str(folder) and 0 < bf16.relative_error < 0.05
    result = run_cli("--model", str(folder), "--device", "cpu", "--dtype", "fp32", "--forward-only")
    assert result.exit_code == 0, result.output
    assert "0.0e+00" in result.stdout  # the fp32 forward against itself


def test_table_on_cpu_forward_only():
    result = run_cli("--size", "tiny", "--device", "cpu", "--dtype", "fp32", "--forward-only")
    assert result.exit_code == 0, result.output
    assert "forward (window 4, batch 1)" in result.stdout and "ms" in result.stdout
    assert "time to first frame" not in result.stdout


BAD = [
    (["--frames", "1"], "--frames must be at least 2"),
    (["--steps", "0"], "--steps must be at least 1"),
    (["--batch-size", "0"], "--batch-size must be at least 1"),
    (["--size", "FLAV-Q/3"], "unknown size 'FLAV-Q/3'"),
    (["--device", "cpu", "--dtype", "fp16"], "fp16 is not supported on CPU"),
    (["--forward-only", "--profile", "t.json"], "drop --forward-only"),
]


@pytest.mark.parametrize("args,message", BAD)
def test_bad_input_exits_2_with_one_line(args, message):
    result = run_cli("--size", "tiny", *args)
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rflav: error: ") and message in lines[0]
    assert result.stdout == ""


def test_timing_builds_the_pipeline_it_is_asked_for(monkeypatch):
    """Every way of running the model that the benchmark scripts compare reaches the pipeline."""
    from rflav_cli.pipeline import Pipeline

    built: list[Pipeline] = []
    real = Pipeline.from_pretrained.__func__

    def recording(cls, *args, **kwargs):
        built.append(real(cls, *args, **kwargs))
        return built[-1]

    monkeypatch.setattr(Pipeline, "from_pretrained", classmethod(recording))
    tiny_run = dict(size="tiny", device="cpu", dtype="fp32", frames=2, mux=False, tf32=False)
    for background, graph, overlap in ((False, True, False), (True, False, True)):
        bench.time_generation(**tiny_run, compile_in_background=background, cuda_graph=graph, overlap=overlap)
        pipe = built[-1]
        assert (pipe.compile_in_background, pipe.cuda_graph, pipe.overlap, pipe.tf32) == (
            background,
            graph,
            overlap,
            False,
        )
