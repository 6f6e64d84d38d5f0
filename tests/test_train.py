"""`rflav train` on a tiny dataset made here: checkpoints, resume, DDP, crash safety."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import tiny
import torch
from rich.console import Console
from safetensors.torch import load_file
from typer.testing import CliRunner

from rflav_cli import flow
from rflav_cli import train as train_mod
from rflav_cli.cli import app
from rflav_cli.data import open_training_data
from rflav_cli.hub import write_side_file
from rflav_cli.media import find_ffmpeg, probe
from rflav_cli.models.flav import FLAV
from rflav_cli.models.vocoder import HiFiGAN
from rflav_cli.runtime import StopRequest

MODEL = {"depth": 1, "hidden_size": 32, "num_heads": 2, "patch_size": 4, "n_mels": 256}


def _video(path: Path, pattern: str, tone: int, seconds: float, audio: bool = True) -> None:
    cmd = [
        find_ffmpeg(),
        "-v",
        "error",
        "-y",
        "-f",
        "lavfi",
        "-i",
        f"{pattern}=size=32x24:rate=10:duration={seconds}",
    ]
    if audio:
        cmd += ["-f", "lavfi", "-i", f"sine=frequency={tone}:duration={seconds}", "-c:a", "aac", "-shortest"]
    subprocess.run(cmd + ["-pix_fmt", "yuv420p", "-c:v", "libx264", str(path)], check=True)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    for cls, pattern, tone in (("a", "testsrc", 300), ("b", "smptebars", 900)):
        folder = root / "train" / cls
        folder.mkdir(parents=True)
        _video(folder / "one.mp4", pattern, tone, 1.5)
        _video(folder / "two.mp4", pattern, tone + 100, 1.2)
    _video(root / "train" / "a" / "silent.mp4", "testsrc", 0, 1.0, audio=False)
    # Fixed junk: random bytes now and then pass for an audio-only format ("no video").
    (root / "train" / "b" / "broken.mp4").write_bytes(b"this is not a video file\n" * 120)
    return root


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("assets")
    HiFiGAN(tiny.TINY_VOCODER).save_pretrained(root / "vocoder")
    (root / "model.json").write_text(json.dumps(MODEL))
    return {"vocoder": root / "vocoder", "model_config": root / "model.json"}


def config(data: Path, assets: dict, out: Path, **overrides) -> train_mod.TrainConfig:
    base = dict(
        data=str(data),
        output=str(out),
        model_config=str(assets["model_config"]),
        autoencoder="none",
        vocoder=str(assets["vocoder"]),
        image_size=16,
        window=3,
        batch_size=2,
        lr=1e-3,
        max_steps=4,
        save_every=2,
        keep=2,
        log_every=1,
        device="cpu",
        num_workers=2,
        seed=3,
    )
    return train_mod.TrainConfig(**{**base, **overrides})


def test_cli_trains_counts_bad_files_and_checkpoint_generates(data, assets, tmp_path):
    run = tmp_path / "run"
    result = CliRunner().invoke(
        app,
        [
            "train",
            str(data),
            "-o",
            str(run),
            "--model-config",
            str(assets["model_config"]),
            "--autoencoder",
            "none",
            "--vocoder",
            str(assets["vocoder"]),
            "--image-size",
            "16",
            "--window",
            "3",
            "--batch-size",
            "2",
            "--max-steps",
            "4",
            "--save-every",
            "2",
            "--keep",
            "1",
            "--device",
            "cpu",
        ],
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    latest = run / "latest"
    assert latest.is_symlink() and latest.resolve().name == "checkpoint-00000004"
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-00000004"]  # --keep 1
    assert {p.name for p in latest.iterdir()} >= {
        "config.json",
        "model.safetensors",
        "vocoder",
        "rflav.json",
        "training_state",
    }
    side = json.loads((latest / "rflav.json").read_text())
    assert side["class_names"] == ["a", "b"] and side["pixel_space"] is True and side["audio_scale"] > 0
    assert side["vocoder"] == "hifigan"
    state = json.loads((latest / "training_state" / "state.json").read_text())
    assert state["data"]["skipped"] == {"no audio": 1, "unreadable": 1} and state["data"]["videos"] == 4
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines][-1] == 4
    # config.json stays loadable by the original code: only the 14 constructor keys.
    assert len(json.loads((latest / "config.json").read_text())) == 14

    out = tmp_path / "sample.mp4"
    gen = CliRunner().invoke(
        app,
        [
            "generate",
            "--model",
            str(latest),
            "--class",
            "b",
            "--frames",
            "4",
            "-o",
            str(out),
            "--device",
            "cpu",
            "--quiet",
        ],
        catch_exceptions=False,
    )
    assert gen.exit_code == 0, gen.output
    probe = subprocess.run(
        [
            "ffprobe",
            "-v",
            "error",
            "-count_frames",
            "-show_entries",
            "stream=codec_type,width,nb_read_frames",
            "-of",
            "json",
            str(out),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    streams = {s["codec_type"]: s for s in json.loads(probe.stdout)["streams"]}
    assert (
        streams["video"]["width"] == 16
        and int(streams["video"]["nb_read_frames"]) == 4
        and "audio" in streams
    )


def _fixed_batch_loss(model: FLAV, dataset) -> float:
    g = torch.Generator().manual_seed(123)
    items = [dataset[i] for i in range(0, len(dataset), max(1, len(dataset) // 6))][:6]
    v = torch.stack([it["video"] for it in items])
    a = torch.stack([it["audio"] for it in items])
    y = torch.stack([it["label"] for it in items])
    t = flow.sample_training_levels(len(items), 3, generator=g)
    model.eval()
    with torch.no_grad():
        return float(
            flow.flow_matching_loss(lambda vv, aa, tt: model(vv, aa, tt, y), v, a, t, generator=g)["loss"]
        )


def test_loss_on_a_fixed_batch_goes_down(data, assets, tmp_path):
    cfg = config(data, assets, tmp_path / "run", max_steps=40, save_every=40, lr=3e-3)
    ckpt = train_mod.train(cfg)
    state = json.loads((ckpt / "training_state" / "state.json").read_text())
    dataset = open_training_data(
        data, "train", 3, image_size=16, audio_scale=state["audio_scale"], progress=False
    )
    torch.manual_seed(3)
    start = FLAV(train_mod.build_model_config(cfg, 2))
    start.initialize_weights()
    trained = FLAV(start.config)
    trained.load_state_dict(load_file(str(ckpt / "training_state" / "model.safetensors")))
    before, after = _fixed_batch_loss(start, dataset), _fixed_batch_loss(trained, dataset)
    assert after < 0.8 * before, (before, after)


def _train_logged(cfg: train_mod.TrainConfig) -> tuple[Path, str]:
    log = io.StringIO()
    last = train_mod.train(cfg, console=Console(file=log, width=1000))
    return last, " ".join(log.getvalue().split())


def test_audio_scale_is_estimated_only_when_nothing_gives_it(data, assets, tmp_path, monkeypatch):
    estimated: list[float] = []

    def counted(dataset) -> float:
        estimated.append(real(dataset))
        return estimated[-1]

    real = train_mod.estimate_audio_scale
    monkeypatch.setattr(train_mod, "estimate_audio_scale", counted)
    source = tmp_path / "source"  # a pixel-space checkpoint for this data, with its own scale
    FLAV(train_mod.build_model_config(config(data, assets, source), 2)).save_pretrained(source)
    write_side_file(source, {"audio_scale": 2.5, "pixel_space": True, "image_size": 16})
    one_step = dict(max_steps=1, save_every=1)

    runs = {
        "init": config(data, assets, tmp_path / "init", model_config=None, init=str(source), **one_step),
        "flag": config(data, assets, tmp_path / "flag", audio_scale=1.5, **one_step),
    }
    expected = {"init": (2.5, f"of the checkpoint {source}"), "flag": (1.5, "given by audio_scale")}
    for name, cfg in runs.items():
        last, log = _train_logged(cfg)
        scale, origin = expected[name]
        assert estimated == [], name  # no pass over the data's audio
        assert f"audio_scale {scale:.6g} ({origin})" in log, log
        assert json.loads((last / "rflav.json").read_text())["audio_scale"] == scale
        assert json.loads((last / "training_state" / "state.json").read_text())["audio_scale"] == scale

    last, log = _train_logged(config(data, assets, tmp_path / "new", **one_step))
    assert len(estimated) == 1
    assert json.loads((last / "rflav.json").read_text())["audio_scale"] == estimated[0]
    assert f"audio_scale {estimated[0]:.6g} (unit std of the training mel)" in log, log

    _, log = _train_logged(config(data, assets, tmp_path / "new", max_steps=2, save_every=1))
    assert len(estimated) == 1  # a resumed run keeps its scale
    assert f"audio_scale {estimated[0]:.6g} (of the resumed run)" in log, log


def test_resume_is_bit_identical(data, assets, tmp_path):
    whole = train_mod.train(config(data, assets, tmp_path / "whole", max_steps=6, save_every=3))
    train_mod.train(config(data, assets, tmp_path / "split", max_steps=3, save_every=3))
    resumed = train_mod.train(config(data, assets, tmp_path / "split", max_steps=6, save_every=3))
    for name in ("model.safetensors", "ema.safetensors"):
        a = load_file(str(whole / "training_state" / name))
        b = load_file(str(resumed / "training_state" / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert (
        load_file(str(whole / "model.safetensors")).keys()
        == load_file(str(resumed / "model.safetensors")).keys()
    )


def test_crash_before_rename_leaves_latest_loadable(data, assets, tmp_path, monkeypatch):
    run = tmp_path / "run"
    real_replace = os.replace

    def crash(src, dst, *args, **kwargs):
        if Path(dst).name == "checkpoint-00000004":
            raise OSError("simulated crash")
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(train_mod.os, "replace", crash)
    with pytest.raises(OSError, match="simulated crash"):
        train_mod.train(config(data, assets, run))
    monkeypatch.setattr(train_mod.os, "replace", real_replace)
    assert not list(run.glob(".checkpoint-*"))  # a failed save leaves no temp folder
    assert (run / "latest").resolve().name == "checkpoint-00000002"
    FLAV.from_pretrained(run / "latest")
    # Running again resumes from step 2 and finishes.
    last = train_mod.train(config(data, assets, run))
    assert last.name == "checkpoint-00000004" and (run / "latest").resolve() == last
    assert not list(run.glob(".checkpoint-*"))


def _state(checkpoint: Path) -> dict:
    return json.loads((checkpoint / "training_state" / "state.json").read_text())


def _leftovers(run: Path) -> list[str]:
    return sorted(p.name for p in run.glob(".checkpoint-*"))


def test_stop_right_after_a_resume_keeps_the_resumed_checkpoint(data, assets, tmp_path):
    run = tmp_path / "run"
    train_mod.train(config(data, assets, run, max_steps=2))
    saved = run / "checkpoint-00000002"
    (saved / "sample.mp4").write_bytes(b"the sample of step 2")
    before = saved.stat().st_ino
    stop = threading.Event()
    stop.set()  # asked before the first step of the resumed run
    with pytest.raises(train_mod.TrainingInterrupted) as stopped:
        train_mod.train(config(data, assets, run, max_steps=4), stop=stop)
    assert stopped.value.step == 2 and stopped.value.exit_code == 128 + signal.SIGINT
    assert stopped.value.checkpoint == saved and "stopped at step 2 of 4" in str(stopped.value)
    # The very folder the run resumed from: not deleted and written again.
    assert saved.stat().st_ino == before and (saved / "sample.mp4").read_bytes() == b"the sample of step 2"
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-00000002"]
    assert (run / "latest").resolve() == saved.resolve() and not _leftovers(run)


def test_stopped_run_saves_the_step_it_reached_and_says_which_signal(data, assets, tmp_path, monkeypatch):
    stop = StopRequest()
    real_step = train_mod._train_step

    def step_then_sigterm(run, engine):
        result = real_step(run, engine)
        stop.signum = signal.SIGTERM  # what stop_on_signals records for a SIGTERM
        stop.set()
        return result

    monkeypatch.setattr(train_mod, "_train_step", step_then_sigterm)
    run = tmp_path / "run"
    with pytest.raises(train_mod.TrainingInterrupted) as stopped:
        train_mod.train(config(data, assets, run, max_steps=4), stop=stop)
    assert stopped.value.exit_code == 128 + signal.SIGTERM and stopped.value.step == 1
    assert stopped.value.checkpoint == run / "checkpoint-00000001"
    assert (run / "latest").resolve().name == "checkpoint-00000001"
    assert _state(run / "latest")["step"] == 1 and not _leftovers(run)


def _tiny_training_objects(cfg: train_mod.TrainConfig):
    model = FLAV(train_mod.build_model_config(cfg, 2))
    ema = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return model, ema, torch.optim.AdamW(model.parameters())


def test_save_that_fails_before_its_folder_is_in_place_keeps_the_one_it_replaces(
    data, assets, tmp_path, monkeypatch
):
    run = tmp_path / "run"
    run.mkdir()
    model, ema, optimizer = _tiny_training_objects(config(data, assets, run))
    side = {"audio_scale": 1.0}
    first = train_mod._write_checkpoint(run, 6, model, ema, optimizer, {"step": 6}, side, None, keep=1)
    (first / "sample.mp4").write_bytes(b"the sample of step 6")
    before = first.stat().st_ino
    real_replace = os.replace

    def fail_on_rename_into_place(src, dst, *args, **kwargs):
        if Path(src).name == ".checkpoint-00000006.tmp":
            raise OSError("simulated failure")
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(train_mod.os, "replace", fail_on_rename_into_place)
    with torch.no_grad():
        next(model.parameters()).add_(1.0)  # a different state of the same step
    with pytest.raises(OSError, match="simulated failure"):
        train_mod._write_checkpoint(run, 6, model, ema, optimizer, {"step": 6}, side, None, keep=1)
    monkeypatch.setattr(train_mod.os, "replace", real_replace)
    assert first.stat().st_ino == before and (first / "sample.mp4").is_file()
    assert train_mod.latest_checkpoint(run) == first.resolve() == (run / "latest").resolve()
    FLAV.from_pretrained(run / "latest")
    # The temporary folder is removed by the caller (_save); the one set aside is back in place.
    assert _leftovers(run) == [".checkpoint-00000006.tmp"]


_KILLED_RESAVE = textwrap.dedent("""
    import json, os, signal, sys
    from pathlib import Path
    import torch
    from safetensors.torch import load_file
    from rflav_cli import train as train_mod
    from rflav_cli.hub import read_side_file
    from rflav_cli.models.flav import FLAV

    run = Path(sys.argv[1])
    saved = run / "checkpoint-00000002"
    model = FLAV.from_pretrained(saved)
    ema = load_file(str(saved / "training_state" / "ema.safetensors"))
    optimizer = torch.optim.AdamW(model.parameters())
    state = json.loads((saved / "training_state" / "state.json").read_text())
    real_replace = os.replace

    def replace(src, dst):
        if Path(src).name == ".checkpoint-00000002.tmp":  # the new folder, about to go in place
            os.kill(os.getpid(), signal.SIGKILL)
        real_replace(src, dst)

    os.replace = replace
    train_mod._write_checkpoint(
        run, 2, model, ema, optimizer, state, read_side_file(saved), saved / "vocoder", keep=1
    )
""")


def test_kill_in_the_middle_of_a_save_leaves_a_checkpoint_the_next_run_resumes(data, assets, tmp_path):
    run = tmp_path / "run"
    train_mod.train(config(data, assets, run, max_steps=2, keep=1))
    saved = run / "checkpoint-00000002"
    (saved / "sample.mp4").write_bytes(b"the sample of step 2")
    before = saved.stat().st_ino
    # Killed while saving step 2 again, between setting the old folder aside and renaming the new
    # one into place.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", _KILLED_RESAVE, str(run)], env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert not saved.exists()
    found = train_mod.latest_checkpoint(run)
    assert found is not None and _state(found)["step"] == 2

    last, log = _train_logged(config(data, assets, run, max_steps=3, save_every=1, keep=2))
    assert "put back checkpoint-00000002 from .checkpoint-00000002.old" in log, log
    assert "resuming from step 2" in log and "removed .checkpoint-00000002.tmp" in log, log
    assert last.name == "checkpoint-00000003" and not _leftovers(run)
    assert saved.stat().st_ino == before and (saved / "sample.mp4").is_file()  # the old folder, put back

    # What a kill between deleting the old folder and renaming the new one used to leave: the
    # only complete checkpoint in a temporary folder, `latest` pointing at nothing.
    shutil.rmtree(saved)
    os.rename(run / "checkpoint-00000003", run / ".checkpoint-00000003.tmp")
    last, log = _train_logged(config(data, assets, run, max_steps=4, save_every=1, keep=2))
    assert "put back checkpoint-00000003 from .checkpoint-00000003.tmp" in log, log
    assert "resuming from step 3" in log and last.name == "checkpoint-00000004", log
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-00000003", "checkpoint-00000004"]
    assert not _leftovers(run)


def test_metrics_have_each_step_once_after_a_kill_and_a_resume(data, assets, tmp_path, monkeypatch):
    run = tmp_path / "run"
    real_save = train_mod._save

    def killed_at_step_4(state, *, ranks):
        if state.step == 4:  # step 4 is logged, its checkpoint never written
            raise RuntimeError("killed")
        return real_save(state, ranks=ranks)

    monkeypatch.setattr(train_mod, "_save", killed_at_step_4)
    with pytest.raises(RuntimeError, match="killed"):
        train_mod.train(config(data, assets, run, max_steps=6, save_every=2, log_every=1, keep=1))
    monkeypatch.setattr(train_mod, "_save", real_save)
    metrics = run / "metrics.jsonl"
    assert [json.loads(line)["step"] for line in metrics.read_text().splitlines()] == [1, 2, 3, 4]
    with open(metrics, "a") as f:
        f.write('{"step": 5, "loss": 0.')  # a line cut short by the kill
    kept = metrics.read_text().splitlines()[:2]

    train_mod.train(config(data, assets, run, max_steps=6, save_every=2, log_every=1, keep=1))
    lines = metrics.read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3, 4, 5, 6]
    assert lines[:2] == kept  # the lines up to the resumed step are kept as they were
    assert not list(run.glob(".metrics.jsonl.*"))


def _torchrun_train(data, assets, run: Path, port: int, *flags: str) -> list[str]:
    """A 2-process gloo training command on the CPU (an explicit free port: torchrun's own pick hangs)."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(port),
        "-m",
        "rflav_cli",
        "train",
        str(data),
        "-o",
        str(run),
        "--model-config",
        str(assets["model_config"]),
        "--autoencoder",
        "none",
        "--vocoder",
        str(assets["vocoder"]),
        "--image-size",
        "16",
        "--window",
        "3",
        "--batch-size",
        "1",
        "--device",
        "cpu",
        *flags,
    ]


def test_two_process_gloo_run_keeps_ranks_equal_and_samples_on_rank_0_alone(data, assets, tmp_path):
    """Rank 0's sample at a checkpoint is made by rank 0 alone while the other rank waits at the
    next step (a sample that called on the group would wait forever for the other rank)."""
    run = tmp_path / "ddp"
    cmd = _torchrun_train(
        data, assets, run, 29517, "--max-steps", "3", "--save-every", "3", "--sample-every", "3"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    state = json.loads((run / "latest" / "training_state" / "state.json").read_text())
    assert state["world_size"] == 2 and state["step"] == 3
    a, b = state["rank_weight_checksums"]
    assert a == b
    assert "sample at" not in proc.stderr  # no "sample ... failed" line
    sample = run / "latest" / "sample.mp4"
    assert sample.is_file() and probe(sample).duration > 0


def test_two_process_run_stopped_by_a_signal_saves_the_same_step_on_both_ranks(data, assets, tmp_path):
    """torchrun passes Ctrl-C on to each rank at its own moment; the ranks agree on the step
    to stop at, save it together and end."""
    run = tmp_path / "ddp"
    flags = ("--max-steps", "100000", "--save-every", "100000")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with open(tmp_path / "log.txt", "w") as log:
        proc = subprocess.Popen(_torchrun_train(data, assets, run, 29518, *flags), env=env, stderr=log)
        try:
            deadline = time.monotonic() + 240
            metrics = run / "metrics.jsonl"
            while not metrics.is_file():  # the first record: step 10
                assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "log.txt").read_text()
                time.sleep(0.2)
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=240)
        finally:
            if proc.poll() is None:
                proc.kill()
    state = json.loads((run / "latest" / "training_state" / "state.json").read_text())
    assert state["world_size"] == 2 and state["step"] >= 10
    a, b = state["rank_weight_checksums"]
    assert a == b
    assert not list(run.glob(".checkpoint-*"))


def test_prepare_then_train_from_the_latent_cache_with_samples(data, assets, tmp_path):
    vae = tiny.build_tiny_vae(tmp_path / "vae")
    cache = tmp_path / "cache"
    prepared = CliRunner().invoke(
        app,
        [
            "prepare",
            str(data),
            "-o",
            str(cache),
            "--autoencoder",
            str(vae),
            "--image-size",
            "32",
            "--device",
            "cpu",
        ],
        catch_exceptions=False,
    )
    assert prepared.exit_code == 0, prepared.output
    (tmp_path / "latent.json").write_text(json.dumps({**MODEL, "patch_size": 2}))
    cfg = config(
        cache,
        assets,
        tmp_path / "run",
        autoencoder=str(vae),
        image_size=32,
        model_config=str(tmp_path / "latent.json"),
        max_steps=2,
        save_every=2,
        sample_every=2,
        sample_frames=3,
    )
    last = train_mod.train(cfg)
    assert (
        FLAV.from_pretrained(last).config.in_channels == 4
        and FLAV.from_pretrained(last).config.latent_size == 4
    )
    side = json.loads((last / "rflav.json").read_text())
    assert side["autoencoder"] == str(vae) and side["class_names"] == ["a", "b"]
    assert (last / "sample.mp4").stat().st_size > 0  # the periodic sample, from the EMA weights


def test_ctrl_c_during_a_training_sample_stops_the_training(tmp_path, monkeypatch):
    """A sample runs under generate's own signal handling: the Ctrl-C it takes is the
    training's, so the loop ends (its checkpoint is saved), and without a stop event it propagates."""
    from rflav_cli.generate import GenerationInterrupted

    def interrupted(*args, **kwargs):
        raise GenerationInterrupted("stopped", [], signal.SIGINT)

    monkeypatch.setattr(train_mod, "run_generate", interrupted)
    stop = threading.Event()
    checkpoint = tmp_path / "checkpoint-00000003"
    checkpoint.mkdir()
    train_mod._sample(checkpoint, train_mod.TrainConfig(data=tmp_path), Console(file=io.StringIO()), stop)
    assert stop.is_set() and stop.signum == signal.SIGINT

    def terminated(*args, **kwargs):
        raise GenerationInterrupted("stopped", [], signal.SIGTERM)

    monkeypatch.setattr(train_mod, "run_generate", terminated)
    stop = StopRequest()
    train_mod._sample(checkpoint, train_mod.TrainConfig(data=tmp_path), Console(file=io.StringIO()), stop)
    assert stop.is_set() and stop.signum == signal.SIGTERM  # the training then exits with 143
    monkeypatch.setattr(train_mod, "run_generate", interrupted)
    with pytest.raises(GenerationInterrupted):
        train_mod._sample(checkpoint, train_mod.TrainConfig(data=tmp_path), Console(file=io.StringIO()), None)
