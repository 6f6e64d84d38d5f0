"""`rflav train` / `rflav prepare` on bad or changed requests: the default vocoder, resuming with
other settings, leftovers of killed runs, the options and their help, and flags against files."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import tiny
import torch
import typer
from safetensors.torch import load_file
from test_train import MODEL, _video
from typer.testing import CliRunner

from rflav_cli import train as train_mod
from rflav_cli.cli import app
from rflav_cli.hub import VAE_REPO_ID, write_side_file
from rflav_cli.models.flav import FLAV, FLAVConfig
from rflav_cli.models.vocoder import HiFiGAN
from rflav_cli.requests import TRAIN_DEFAULT_AUTOENCODER

# A model config that fixes the window (3 frames) and the input (16×16 pixels) by itself.
PIXEL_MODEL = {**MODEL, "in_channels": 3, "latent_size": 16, "predict_frames": 3}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    for cls, pattern, tone in (("a", "testsrc", 300), ("b", "smptebars", 900)):
        folder = root / "train" / cls
        folder.mkdir(parents=True)
        _video(folder / "one.mp4", pattern, tone, 1.0)
    return root


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("assets")
    HiFiGAN(tiny.TINY_VOCODER).save_pretrained(root / "vocoder")
    (root / "model.json").write_text(json.dumps(MODEL))
    (root / "pixel.json").write_text(json.dumps(PIXEL_MODEL))
    return {"vocoder": root / "vocoder", "model_config": root / "model.json", "pixel": root / "pixel.json"}


def _args(data: Path, assets: dict, run: Path, *extra: str) -> list[str]:
    return [
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
        "--lr",
        "1e-3",
        "--save-every",
        "2",
        "--device",
        "cpu",
        *extra,
    ]


def _invoke(args: list[str]):
    return CliRunner().invoke(app, args, catch_exceptions=False)


def _lines(result) -> str:
    """Everything printed, with rich's line wrapping undone."""
    return " ".join(result.output.split())


def _error(result) -> str:
    errors = [line for line in result.output.splitlines() if line.startswith("rflav: error:")]
    assert len(errors) == 1, result.output
    return errors[0]


def _tree(folder: Path) -> dict[str, float]:
    return {str(p.relative_to(folder)): p.lstat().st_mtime_ns for p in folder.rglob("*")}


@pytest.fixture(autouse=True)
def wide_console(monkeypatch):
    monkeypatch.setenv("COLUMNS", "400")  # rich reads it: no wrapped lines to piece together


@pytest.fixture(scope="module")
def two_step_run(data, assets, tmp_path_factory) -> Path:
    """A run saved at step 2 (--max-steps 2), copied by each test that resumes it."""
    run = tmp_path_factory.mktemp("runs") / "run"
    result = CliRunner().invoke(app, _args(data, assets, run, "--max-steps", "2"), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return run


def _copy(run: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(run, copy, symlinks=True)
    return copy


# --------------------------------------------------------------------------------- the vocoder


def test_default_vocoder_that_cannot_be_fetched_stops_before_training(data, assets, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    run = tmp_path / "run"
    args = [a for a in _args(data, assets, run, "--max-steps", "2")]
    at = args.index("--vocoder")
    del args[at : at + 2]  # no --vocoder: the default is asked for
    result = _invoke(args)
    assert result.exit_code == 2, result.output
    line = _error(result)
    assert "cannot fetch the default vocoder" in line and "offline" in line
    assert "--vocoder FOLDER" in line and "--vocoder none" in line
    assert not list(run.glob("checkpoint-*")) and not (run / "metrics.jsonl").exists()


def test_vocoder_none_is_recorded_as_griffin_lim(data, assets, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # nothing may be fetched
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    run = tmp_path / "run"
    args = _args(data, assets, run, "--max-steps", "2")
    args[args.index("--vocoder") + 1] = "none"
    result = _invoke(args)
    assert result.exit_code == 0, result.output
    latest = run / "latest"
    assert json.loads((latest / "rflav.json").read_text())["vocoder"] == "griffin-lim"
    assert not (latest / "vocoder").exists()


def test_vocoder_folder_is_copied_and_recorded(two_step_run):
    latest = two_step_run / "latest"
    assert json.loads((latest / "rflav.json").read_text())["vocoder"] == "hifigan"
    assert (latest / "vocoder" / "vocoder.pt").is_file() and (latest / "vocoder" / "config.json").is_file()


def test_vocoder_folder_without_weights_is_refused(data, assets, tmp_path):
    empty = tmp_path / "not-a-vocoder"
    empty.mkdir()
    (empty / "config.json").write_text("{}")
    args = _args(data, assets, tmp_path / "run", "--max-steps", "2")
    args[args.index("--vocoder") + 1] = str(empty)
    result = _invoke(args)
    assert result.exit_code == 2
    assert "--vocoder" in _error(result) and "vocoder.pt" in _error(result)


# ------------------------------------------------------------------------------------ resuming


def test_resume_with_another_image_size_or_model_is_refused(two_step_run, data, assets, tmp_path):
    run = _copy(two_step_run, tmp_path)
    before = _tree(run)
    args = _args(data, assets, run, "--max-steps", "4")
    args[args.index("--image-size") + 1] = "32"
    result = _invoke(args)
    assert result.exit_code == 2, result.output
    line = _error(result)
    assert "--image-size 16 → 32" in line and "another --output" in line

    bigger = tmp_path / "bigger.json"
    bigger.write_text(json.dumps({**MODEL, "hidden_size": 64}))
    args = _args(data, assets, run, "--max-steps", "4")
    args[args.index("--model-config") + 1] = str(bigger)
    result = _invoke(args)
    assert result.exit_code == 2, result.output
    line = _error(result)
    assert "hidden_size 32 → 64" in line and "--model-config" in line

    # The old name of --size keeps its meaning: a size, compared with the saved model.
    result = _invoke(["train", str(data), "-o", str(run), "--model", "FLAV-S/8", "--max-steps", "4"])
    assert result.exit_code == 2, result.output
    assert "hidden_size 32 → 384" in _error(result) and "--size FLAV-S/8" in _error(result)
    assert _tree(run) == before  # nothing written by a refused resume


def test_resume_at_or_past_max_steps_does_nothing(two_step_run, data, assets, tmp_path):
    run = _copy(two_step_run, tmp_path)
    before = _tree(run)
    result = _invoke(_args(data, assets, run, "--max-steps", "1"))
    assert result.exit_code == 0, result.output
    assert "already at step 2 ≥ --max-steps 1: nothing to do" in _lines(result)
    assert "nan" not in result.output and "checkpoint:" not in result.output
    assert _tree(run) == before


def test_resume_says_so_keeps_the_runs_settings_and_takes_allowed_changes(two_step_run, data, tmp_path):
    run = _copy(two_step_run, tmp_path)
    # Only the data and what changes: window, image size, model, vocoder … come from the run.
    result = _invoke(
        ["train", str(data), "-o", str(run), "--max-steps", "3", "--lr", "5e-4", "--save-every", "1"]
    )
    assert result.exit_code == 0, result.output
    out = _lines(result)
    assert f"resuming from step 2 ({run / 'checkpoint-00000002'})" in out
    assert "changed since the saved run:" in out
    assert "--max-steps 2 → 3" in out and "--lr 0.001 → 0.0005" in out and "--save-every 2 → 1" in out
    latest = run / "latest"
    assert latest.resolve().name == "checkpoint-00000003"
    state = json.loads((latest / "training_state" / "state.json").read_text())
    assert state["step"] == 3
    assert state["config"]["window"] == 3 and state["config"]["image_size"] == 16
    assert state["config"]["autoencoder"] == "none" and state["config"]["lr"] == 5e-4
    optimizer = torch.load(latest / "training_state" / "optimizer.pt", weights_only=True)
    assert optimizer["param_groups"][0]["lr"] == 5e-4  # the new rate is used, not the saved one
    assert (latest / "vocoder" / "vocoder.pt").is_file()  # the run's vocoder, though not given again


def _data_in(folders: list[str], data: Path, root: Path) -> Path:
    """The fixture's videos in class folders `folders` (one each), or directly in train/ for []."""
    sources = [data / "train" / cls / "one.mp4" for cls in ("a", "b")]
    if not folders:
        (root / "train").mkdir(parents=True)
        for i, source in enumerate(sources):
            shutil.copyfile(source, root / "train" / f"clip{i}.mp4")
    for i, folder in enumerate(folders):
        (root / "train" / folder).mkdir(parents=True)
        shutil.copyfile(sources[i % 2], root / "train" / folder / "one.mp4")
    return root


_NO_FOLDERS = "no class folders (videos directly in train/)"


@pytest.mark.parametrize(
    "folders",
    [["a", "b", "c"], ["a", "b", "c", "d"], ["a", "c"], []],
    ids=["more", "too-many", "renamed", "none"],
)
def test_resume_on_data_with_other_classes_is_refused_before_any_step(
    two_step_run, data, assets, tmp_path, folders
):
    run = _copy(two_step_run, tmp_path)
    before = {k: v for k, v in _tree(run).items() if k != ".lock"}
    other = _data_in(folders, data, tmp_path / "other")
    result = _invoke(_args(other, assets, run, "--max-steps", "4"))
    assert result.exit_code == 2, result.output
    has = f"the class folders {', '.join(folders)}" if folders else _NO_FOLDERS
    assert _error(result) == (
        f"rflav: error: {other} has {has} but the run in {run} was trained on the classes a, b: resume it on "
        "data whose class folders are a, b, or start a new run with another --output"
    )
    assert {k: v for k, v in _tree(run).items() if k != ".lock"} == before  # no step, no checkpoint


def _unconditional_checkpoint(like: Path, folder: Path) -> Path:
    config = json.loads((like / "config.json").read_text())
    FLAV(FLAVConfig.from_dict({**config, "num_classes": 0})).save_pretrained(folder)
    write_side_file(folder, {"audio_scale": 2.0, "pixel_space": True, "image_size": 16})
    return folder


def _init_args(data: Path, source: Path, run: Path) -> list[str]:
    return [
        "train",
        str(data),
        "-o",
        str(run),
        "--init",
        str(source),
        "--vocoder",
        "none",
        "--batch-size",
        "2",
        "--max-steps",
        "1",
        "--device",
        "cpu",
    ]


def test_init_checkpoint_with_other_classes_than_the_data_is_refused(two_step_run, data, tmp_path):
    conditional = (two_step_run / "latest").resolve()  # classes a, b
    unconditional = _unconditional_checkpoint(conditional, tmp_path / "unconditional")
    unlabelled = _data_in([], data, tmp_path / "unlabelled")
    three = _data_in(["a", "b", "c"], data, tmp_path / "three")
    a_b = ("the classes a, b", "data whose class folders are a, b")
    none = ("no classes (unconditional)", "data without class folders (videos directly in train/)")
    cases = [
        (conditional, unlabelled, _NO_FOLDERS, *a_b),
        (conditional, three, "the class folders a, b, c", *a_b),
        (unconditional, data, "the class folders a, b", *none),
    ]
    for source, where, has, saved, same in cases:
        run = tmp_path / "run"
        result = _invoke(_init_args(where, source, run))
        assert result.exit_code == 2, result.output
        assert _error(result) == (
            f"rflav: error: {where} has {has} but the --init checkpoint {source} has {saved}: "
            f"train on {same}, or leave out --init to train new weights"
        )
        assert not list(run.glob("checkpoint-*")) and not (run / "metrics.jsonl").exists()

    result = _invoke(_init_args(unlabelled, unconditional, tmp_path / "fine"))  # the classes agree
    assert result.exit_code == 0, result.output
    assert "class_names" not in json.loads((tmp_path / "fine" / "latest" / "rflav.json").read_text())

    # Fine-tuning on as many classes under other names reuses the embeddings, and says so.
    renamed = _data_in(["a", "c"], data, tmp_path / "renamed")
    result = _invoke(_init_args(renamed, conditional, tmp_path / "tuned"))
    assert result.exit_code == 0, result.output
    assert "class embeddings serve these classes: a → a, b → c" in result.output
    side = json.loads((tmp_path / "tuned" / "latest" / "rflav.json").read_text())
    assert side["class_names"] == ["a", "c"]


# ----------------------------------------------------------------------------------- stopping


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_stop_saves_the_step_reached_and_exits_as_interrupted(
    data, assets, tmp_path, monkeypatch, signum, code
):
    real_step = train_mod._train_step

    def step_then_stop(run, engine):
        result = real_step(run, engine)
        os.kill(os.getpid(), signum)  # taken by the command's handler: a clean stop
        return result

    monkeypatch.setattr(train_mod, "_train_step", step_then_stop)
    run = tmp_path / "run"
    result = _invoke(_args(data, assets, run, "--max-steps", "5"))
    assert result.exit_code == code, result.output
    assert (
        f"rflav: interrupted: stopped at step 1 of 5, saved in {run / 'checkpoint-00000001'} "
        "(the same command resumes the run)"
    ) in result.output.replace("\n", " ")
    assert (run / "latest").resolve().name == "checkpoint-00000001"
    state = json.loads((run / "latest" / "training_state" / "state.json").read_text())
    assert state["step"] == 1 and not list(run.glob(".checkpoint-*"))


# ------------------------------------------------------------------------ leftovers of killed runs


def test_stale_checkpoint_temp_folder_is_removed_by_the_next_run(two_step_run, data, assets, tmp_path):
    run = _copy(two_step_run, tmp_path)
    stale = run / ".checkpoint-00000004.tmp"  # what a kill during a save leaves
    (stale / "training_state").mkdir(parents=True)
    (stale / "model.safetensors").write_bytes(os.urandom(100))
    result = _invoke(_args(data, assets, run, "--max-steps", "3"))
    assert result.exit_code == 0, result.output
    assert "removed .checkpoint-00000004.tmp" in _lines(result)
    assert not list(run.glob(".checkpoint-*")) and (run / "latest").resolve().name == "checkpoint-00000003"


def test_temp_folder_of_a_live_run_is_kept_and_the_run_folder_is_refused(
    two_step_run, data, assets, tmp_path
):
    run = _copy(two_step_run, tmp_path)
    live = run / ".checkpoint-00000004.tmp"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(f"""
        import fcntl, os, sys, time
        lock = open({str(run / ".lock")!r}, "a+")
        fcntl.flock(lock, fcntl.LOCK_EX)
        lock.truncate(0); lock.write("rflav train, pid %d on here" % os.getpid()); lock.flush()
        os.mkdir({str(live)!r})
        print("ready", flush=True)
        time.sleep(120)
    """),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "ready"
        result = _invoke(_args(data, assets, run, "--max-steps", "3"))
        assert result.exit_code == 2, result.output
        line = _error(result)
        assert f"is being trained by rflav train, pid {holder.pid}" in line and "another --output" in line
        assert live.is_dir()  # never removed while its run is alive
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    result = _invoke(_args(data, assets, run, "--max-steps", "3"))  # the holder was killed: clean up
    assert result.exit_code == 0, result.output
    assert not live.exists() and (run / "latest").resolve().name == "checkpoint-00000003"


# ----------------------------------------------------------------------------- flags and files


def test_model_config_sets_window_and_size_when_no_flag_is_typed(data, assets, tmp_path):
    run = tmp_path / "run"
    result = _invoke(
        [
            "train",
            str(data),
            "-o",
            str(run),
            "--model-config",
            str(assets["pixel"]),
            "--vocoder",
            str(assets["vocoder"]),
            "--batch-size",
            "2",
            "--max-steps",
            "1",
            "--device",
            "cpu",
        ]
    )
    assert result.exit_code == 0, result.output
    config = json.loads((run / "latest" / "config.json").read_text())
    side = json.loads((run / "latest" / "rflav.json").read_text())
    assert config["predict_frames"] == 3 and config["latent_size"] == 16 and config["in_channels"] == 3
    assert side["image_size"] == 16 and side["pixel_space"] is True


@pytest.mark.parametrize(
    "flag,value,file_says",
    [
        ("--window", "10", "predict_frames 3"),
        ("--image-size", "32", "latent_size 16"),
        ("--autoencoder", VAE_REPO_ID, "in_channels 3"),
    ],
)
def test_typed_flag_that_contradicts_the_model_config_names_both(
    data, assets, tmp_path, flag, value, file_says
):
    run = tmp_path / "run"
    result = _invoke(
        [
            "train",
            str(data),
            "-o",
            str(run),
            "--model-config",
            str(assets["pixel"]),
            flag,
            value,
            "--vocoder",
            "none",
            "--max-steps",
            "1",
            "--device",
            "cpu",
        ]
    )
    assert result.exit_code == 2, result.output
    line = _error(result)
    assert f"{flag} {value} contradicts {file_says} in {assets['pixel']}" in line
    assert not run.exists()


def test_bad_values_are_refused_before_torch_is_imported(data, assets, tmp_path):
    cases = [
        (["train", str(data), "--lr", "0"], "--lr must be greater than 0"),
        (["train", str(data), "--max-steps", "0"], "--max-steps"),
        (["train", str(data), "--weighting", "cosine"], "--weighting"),
        (
            ["train", str(data), "--model-config", str(assets["pixel"]), "--window", "10"],
            "contradicts predict_frames 3",
        ),
        (
            ["train", str(data), "--size", "FLAV-S/2", "--model-config", str(assets["pixel"])],
            "both define the model",
        ),
        (["train", str(data), "--image-size", "20"], "--image-size 20 must be a multiple of 8"),
        (
            ["prepare", str(data), "-o", str(tmp_path / "c"), "--image-size", "20"],
            "--image-size must be a positive multiple of 8",
        ),
    ]
    script = textwrap.dedent(f"""
        import sys
        from typer.testing import CliRunner
        from rflav_cli.cli import app
        for args, expected in {cases!r}:
            result = CliRunner().invoke(app, args)
            assert result.exit_code == 2, (args, result.output)
            assert expected in " ".join(result.output.split()), (args, result.output)
        assert "torch" not in sys.modules, "torch was imported"
        print("ok")
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


def test_every_train_and_prepare_option_has_help_and_old_names_are_hidden():
    group = typer.main.get_command(app)
    for name in ("train", "prepare"):
        command = group.commands[name]
        for param in command.params:
            if not getattr(param, "hidden", False) and param.param_type_name == "option":
                assert param.help and param.help.strip(), f"{name} {param.opts} has no help"
        help_text = CliRunner().invoke(app, [name, "-h"]).output
        assert "--size" in help_text if name == "train" else "--output" in help_text
        hidden = {"train": "--model", "prepare": "--out"}[name]
        assert any(hidden in p.opts and p.hidden for p in command.params)
        assert not re.search(re.escape(hidden) + r"(?![-\w])", help_text), help_text


def test_train_size_alias_and_prepare_output_alias(data, assets, tmp_path):
    result = _invoke(["train", str(data), "--model", "FLAV-S/8", "--size", "FLAV-S/8"])
    assert result.exit_code == 2 and "give only --size" in _error(result)
    result = _invoke(["train", str(data), "--model", "runs/x/latest"])
    assert result.exit_code == 2 and "--init" in _error(result)
    result = _invoke(["prepare", str(data)])
    assert result.exit_code == 2 and "missing option -o/--output" in _error(result)

    vae = tiny.build_tiny_vae(tmp_path / "vae")
    cache = tmp_path / "cache"
    common = ["--autoencoder", str(vae), "--image-size", "32", "--device", "cpu"]
    first = _invoke(["prepare", str(data), "-o", str(cache), *common])
    assert first.exit_code == 0, first.output
    index = json.loads((cache / "train" / "index.json").read_text())
    assert index["complete"] and index["autoencoder"] == str(vae) and index["image_size"] == 32
    again = _invoke(["prepare", str(data), "--out", str(cache), *common])  # the old spelling
    assert again.exit_code == 0, again.output
    assert json.loads((cache / "train" / "index.json").read_text())["complete"]


def test_library_defaults_match_the_hub():
    assert TRAIN_DEFAULT_AUTOENCODER == VAE_REPO_ID
    assert train_mod.TrainConfig is __import__("rflav_cli.requests", fromlist=["TrainConfig"]).TrainConfig


def test_init_checkpoint_sets_window_size_and_audio_scale_when_no_flag_is_typed(two_step_run, data, tmp_path):
    source = two_step_run / "latest"
    run = tmp_path / "run"
    result = _invoke(_init_args(data, source, run))
    assert result.exit_code == 0, result.output
    config = json.loads((run / "latest" / "config.json").read_text())
    side = json.loads((run / "latest" / "rflav.json").read_text())
    saved = json.loads((source / "rflav.json").read_text())
    assert config["predict_frames"] == 3 and config["latent_size"] == 16 and side["pixel_space"] is True
    assert side["audio_scale"] == saved["audio_scale"]

    result = _invoke(
        [
            "train",
            str(data),
            "-o",
            str(tmp_path / "other"),
            "--init",
            str(source),
            "--window",
            "5",
            "--vocoder",
            "none",
            "--max-steps",
            "1",
            "--device",
            "cpu",
        ]
    )
    assert result.exit_code == 2, result.output
    assert f"--window 5 contradicts predict_frames 3 in the checkpoint {source}" in _error(result)


def test_run_saved_by_an_older_version_resumes(two_step_run, data, tmp_path):
    run = _copy(two_step_run, tmp_path)
    state_path = run / "latest" / "training_state" / "state.json"
    state = json.loads(state_path.read_text())
    config = state["config"]
    config["model"] = "FLAV-B/1"  # the old field name, and its old default
    del config["size"]
    state_path.write_text(json.dumps(state))
    result = _invoke(["train", str(data), "-o", str(run), "--max-steps", "3"])
    assert result.exit_code == 0, result.output
    assert (
        "resuming from step 2" in _lines(result) and (run / "latest").resolve().name == "checkpoint-00000003"
    )


def test_broken_model_config_is_one_line(data, tmp_path):
    for text, expected in (
        ("{not json", "is not valid JSON"),
        ('{"depth": "4"}', "depth must be an integer"),
        ('{"dept": 4}', "unknown key dept"),
        ("[1, 2]", "must hold a JSON object"),
    ):
        bad = tmp_path / "bad.json"
        bad.write_text(text)
        result = _invoke(["train", str(data), "-o", str(tmp_path / "run"), "--model-config", str(bad)])
        assert result.exit_code == 2, result.output
        assert expected in _error(result) and str(bad) in _error(result)


def test_damaged_training_state_is_one_line(two_step_run, data, tmp_path):
    run = _copy(two_step_run, tmp_path)
    state = run / "latest" / "training_state" / "state.json"
    state.write_text('{"step": 2,')
    result = _invoke(["train", str(data), "-o", str(run), "--max-steps", "3"])
    assert result.exit_code == 2, result.output
    assert str(state.resolve()) in _error(result) and "not valid JSON" in _error(result)


@pytest.mark.parametrize("name", ["model.safetensors", "ema.safetensors", "optimizer.pt"])
def test_damaged_training_weights_are_one_line(two_step_run, data, tmp_path, name):
    run = _copy(two_step_run, tmp_path)
    damaged = run / "latest" / "training_state" / name
    damaged.write_bytes(damaged.read_bytes()[:200])  # a truncated copy
    result = _invoke(["train", str(data), "-o", str(run), "--max-steps", "3"])
    assert result.exit_code == 2, result.output
    assert str(damaged.resolve()) in _error(result) and "delete it to resume from the one before" in _error(
        result
    )


def test_a_diverging_run_stops_before_saving_non_finite_weights(data, assets, tmp_path):
    run = tmp_path / "run"
    args = _args(data, assets, run, "--max-steps", "6", "--save-every", "1")
    result = _invoke([*args, "--lr", "1e308"])  # the last --lr counts
    assert result.exit_code == 2, result.output
    error = _error(result)
    assert error.startswith("rflav: error: training diverged at step ") and "lower --lr (now 1e+308)" in error
    for checkpoint in run.glob("checkpoint-*"):  # what was saved is finite
        tensors = load_file(checkpoint / "model.safetensors")
        assert all(torch.isfinite(t).all() for t in tensors.values()), checkpoint.name
    for line in (run / "metrics.jsonl").read_text().splitlines() if (run / "metrics.jsonl").exists() else []:
        record = json.loads(line, parse_constant=lambda name: pytest.fail(f"{name} in metrics.jsonl"))
        assert all(math.isfinite(v) for v in record.values())
