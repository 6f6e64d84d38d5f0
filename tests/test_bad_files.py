"""Damaged checkpoint files are refused in one line naming the file, and written files follow
the umask."""

from __future__ import annotations

import json
import os
import random
import shutil
import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import tiny
import torch
from typer.testing import CliRunner

from rflav_cli.cli import app
from rflav_cli.errors import FileFormatError, RflavError
from rflav_cli.files import atomic_write, creation_mode, current_umask
from rflav_cli.hub import write_side_file
from rflav_cli.models.autoencoder import AutoencoderKL, VAEFileError
from rflav_cli.models.flav import FLAV, CheckpointFileError, FLAVConfig
from rflav_cli.models.vocoder import CheckpointFormatError, HiFiGAN
from rflav_cli.tensorfiles import load_tensor_file

REDOWNLOAD = "download it again or pass another folder"


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("good")
    return {"model": tiny.build_tiny_model(root / "model"), "vae": tiny.build_tiny_vae(root / "vae")}


def copy_of(src: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(src, tmp_path / src.name))


# Ways a file goes bad, each paired with the words the refusal must use.
def truncate_half(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def truncate_in_header(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:40])


def random_bytes(path: Path) -> None:
    path.write_bytes(random.Random(0).randbytes(path.stat().st_size))


def empty(path: Path) -> None:
    path.write_bytes(b"")


def folder_instead(path: Path) -> None:
    path.unlink()
    path.mkdir()
    (path / "stray").write_text("x")


SAFETENSORS_DAMAGE = [
    (truncate_half, "is truncated"),
    (truncate_in_header, "is truncated"),
    (random_bytes, "is not a safetensors file"),
    (empty, "is empty"),
    (folder_instead, "is a folder, not a file"),
]
TORCH_FILE_DAMAGE = [
    (truncate_half, "is truncated or damaged"),
    (random_bytes, "is not a torch checkpoint file"),
    (empty, "is empty"),
    (folder_instead, "is a folder, not a file"),
]


def assert_one_line_naming(err: BaseException, path: Path, *fragments: str) -> str:
    message = str(err)
    assert isinstance(err, FileFormatError) and isinstance(err, RflavError)
    assert str(path) in message and "\n" not in message
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    return message


def edit_json(path: Path, change: Callable[[dict], object]) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


# --------------------------------------------------------------------------------------
# FLAV: model.safetensors and config.json
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("damage,words", SAFETENSORS_DAMAGE, ids=lambda x: getattr(x, "__name__", ""))
def test_damaged_flav_weights_are_named(good, tmp_path, damage, words):
    folder = copy_of(good["model"], tmp_path)
    damage(folder / "model.safetensors")
    with pytest.raises(CheckpointFileError) as err:
        FLAV.from_pretrained(folder)
    assert_one_line_naming(err.value, folder / "model.safetensors", words, REDOWNLOAD)


def test_truncated_flav_weights_say_how_much_is_there(good, tmp_path):
    folder = copy_of(good["model"], tmp_path)
    path = folder / "model.safetensors"
    size = path.stat().st_size
    truncate_half(path)
    with pytest.raises(CheckpointFileError, match=rf"\({size // 2} of {size} bytes\)"):
        FLAV.from_pretrained(folder)


BAD_FLAV_CONFIGS = [
    (
        "not JSON",
        lambda p: p.write_text('{"depth": 1,\n  "hidden_size": }'),
        "not valid JSON at line 2, column 18",
    ),
    ("a list", lambda p: p.write_text("[1, 2]"), "must hold a JSON object ({...}) but holds a list"),
    ("a string", lambda p: p.write_text('"config"'), "but holds a string"),
    ("empty", empty, "is empty"),
    ("blank", lambda p: p.write_text("  \n"), "holds only blanks"),
    ("not UTF-8", lambda p: p.write_bytes(b"\xff\xfe{\x00"), "not UTF-8"),
    ("a folder", folder_instead, "is a folder, not a file"),
    ("missing key", lambda p: edit_json(p, lambda d: d.pop("hidden_size")), "lacks the key(s) hidden_size"),
    (
        "depth a string",
        lambda p: edit_json(p, lambda d: d.update(depth="x")),
        'depth must be an integer, got "x"',
    ),
    (
        "depth a float",
        lambda p: edit_json(p, lambda d: d.update(depth=1.5)),
        "depth must be an integer, got 1.5",
    ),
    (
        "depth true",
        lambda p: edit_json(p, lambda d: d.update(depth=True)),
        "depth must be an integer, got true",
    ),
    (
        "heads zero",
        lambda p: edit_json(p, lambda d: d.update(num_heads=0)),
        "num_heads must be a positive integer",
    ),
    (
        "heads indivisible",
        lambda p: edit_json(p, lambda d: d.update(num_heads=3)),
        "hidden_size 32 is not divisible by num_heads 3",
    ),
    (
        "patch indivisible",
        lambda p: edit_json(p, lambda d: d.update(patch_size=5)),
        "latent_size 32 is not divisible by patch_size 5",
    ),
    (
        "mlp_ratio text",
        lambda p: edit_json(p, lambda d: d.update(mlp_ratio="4")),
        'mlp_ratio must be a number, got "4"',
    ),
    (
        "causal not bool",
        lambda p: edit_json(p, lambda d: d.update(causal_attn=1)),
        "causal_attn must be true or false",
    ),
    ("classes negative", lambda p: edit_json(p, lambda d: d.update(num_classes=-1)), "num_classes must be 0"),
]


@pytest.mark.parametrize("name,damage,words", BAD_FLAV_CONFIGS, ids=[c[0] for c in BAD_FLAV_CONFIGS])
def test_bad_flav_config_is_named(good, tmp_path, name, damage, words):
    folder = copy_of(good["model"], tmp_path)
    damage(folder / "config.json")
    with pytest.raises(CheckpointFileError) as err:
        FLAV.from_pretrained(folder)
    assert_one_line_naming(err.value, folder / "config.json", words, "FLAV config")


def test_flav_weights_of_another_config_are_named(good, tmp_path):
    folder = copy_of(good["model"], tmp_path)
    edit_json(folder / "config.json", lambda d: d.update(depth=2))
    with pytest.raises(CheckpointFileError) as err:
        FLAV.from_pretrained(folder)
    assert_one_line_naming(
        err.value, folder / "model.safetensors", "missing: blocks.1.", "use the config.json"
    )


def test_config_dict_from_code_is_a_usage_error():
    # Without a file behind it the same check speaks of the config only.
    with pytest.raises(RflavError, match='model config: depth must be an integer, got "x"') as err:
        FLAVConfig.from_dict({"depth": "x"})
    assert not isinstance(err.value, FileFormatError)
    # Partial dicts (training configs) still take the defaults of what they leave out.
    assert FLAVConfig.from_dict({"depth": 2, "note": "ignored"}) == FLAVConfig(depth=2)
    # A model built in code with an impossible config is a programming error, not a user's.
    with pytest.raises(ValueError) as err:
        FLAV(FLAVConfig(hidden_size=30, num_heads=4, depth=1))
    assert not isinstance(err.value, RflavError)


# --------------------------------------------------------------------------------------
# VAE
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("damage,words", SAFETENSORS_DAMAGE, ids=lambda x: getattr(x, "__name__", ""))
def test_damaged_vae_weights_are_named(good, tmp_path, damage, words):
    folder = copy_of(good["vae"], tmp_path)
    path = folder / "diffusion_pytorch_model.safetensors"
    damage(path)
    with pytest.raises(VAEFileError) as err:
        AutoencoderKL.from_pretrained(folder)
    assert_one_line_naming(err.value, path, words, "VAE weights", REDOWNLOAD)


BAD_VAE_CONFIGS = [
    ("not JSON", lambda p: p.write_text("{'act_fn': 'silu'}"), "not valid JSON at line 1, column 2"),
    ("a number", lambda p: p.write_text("3"), "but holds a number"),
    (
        "missing key",
        lambda p: edit_json(p, lambda d: d.pop("block_out_channels")),
        "lacks the key(s) block_out_channels",
    ),
    (
        "channels text",
        lambda p: edit_json(p, lambda d: d.update(block_out_channels="x")),
        "block_out_channels must be a list of positive integers",
    ),
    (
        "groups",
        lambda p: edit_json(p, lambda d: d.update(norm_num_groups=3)),
        "divisible by norm_num_groups 3",
    ),
    (
        "block types",
        lambda p: edit_json(p, lambda d: d.update(up_block_types=["X"])),
        "up_block_types must be 4 x",
    ),
    ("act_fn", lambda p: edit_json(p, lambda d: d.update(act_fn="tanh")), "act_fn must be one of"),
    (
        "layers",
        lambda p: edit_json(p, lambda d: d.update(layers_per_block="1")),
        "layers_per_block must be a positive",
    ),
    ("a folder", folder_instead, "is a folder, not a file"),
]


@pytest.mark.parametrize("name,damage,words", BAD_VAE_CONFIGS, ids=[c[0] for c in BAD_VAE_CONFIGS])
def test_bad_vae_config_is_named(good, tmp_path, name, damage, words):
    folder = copy_of(good["vae"], tmp_path)
    damage(folder / "config.json")
    with pytest.raises(VAEFileError) as err:
        AutoencoderKL.from_pretrained(folder)
    assert_one_line_naming(err.value, folder / "config.json", words, "VAE config")


# --------------------------------------------------------------------------------------
# Vocoder
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("damage,words", TORCH_FILE_DAMAGE, ids=lambda x: getattr(x, "__name__", ""))
def test_damaged_vocoder_weights_are_named(good, tmp_path, damage, words):
    folder = copy_of(good["model"] / "vocoder", tmp_path)
    damage(folder / "vocoder.pt")
    with pytest.raises(CheckpointFormatError) as err:
        HiFiGAN.from_pretrained(folder)
    assert_one_line_naming(err.value, folder / "vocoder.pt", words, "vocoder weights", REDOWNLOAD)


def test_vocoder_truncated_after_its_zip_directory_is_named(good, tmp_path):
    # Cut only the zip's central directory away: the start of the file is still a torch file.
    folder = copy_of(good["model"] / "vocoder", tmp_path)
    path = folder / "vocoder.pt"
    path.write_bytes(path.read_bytes()[:-30])
    with pytest.raises(CheckpointFormatError) as err:
        HiFiGAN.from_pretrained(folder)
    assert_one_line_naming(err.value, path, "truncated or damaged")


def test_vocoder_of_another_config_names_the_weights(good, tmp_path):
    folder = copy_of(good["model"] / "vocoder", tmp_path)
    edit_json(folder / "config.json", lambda d: d.update(upsample_initial_channel=64))
    with pytest.raises(CheckpointFormatError) as err:
        HiFiGAN.from_pretrained(folder)
    assert_one_line_naming(err.value, folder / "vocoder.pt", "mis-shaped: conv_pre.weight", REDOWNLOAD)


BAD_VOCODER_CONFIGS = [
    ("not JSON", lambda p: p.write_text('{"resblock": "1"'), "not valid JSON at line 1, column 17"),
    ("a list", lambda p: p.write_text("[]"), "but holds a list"),
    ("missing key", lambda p: edit_json(p, lambda d: d.pop("num_mels")), "lacks the key(s) num_mels"),
    (
        "rates text",
        lambda p: edit_json(p, lambda d: d.update(upsample_rates="x")),
        'upsample_rates must be a list of positive integers, got "x"',
    ),
    (
        "resblock",
        lambda p: edit_json(p, lambda d: d.update(resblock="3")),
        'resblock must be "1" or "2", got "3"',
    ),
    ("lengths", lambda p: edit_json(p, lambda d: d.update(upsample_kernel_sizes=[11])), "differ in length"),
    (
        "kernel below rate",
        lambda p: edit_json(p, lambda d: d.update(upsample_kernel_sizes=[3, 8, 8, 4])),
        "at least its upsample_rates entry",
    ),
    (
        "dilations",
        lambda p: edit_json(p, lambda d: d.update(resblock_dilation_sizes=[1, 3])),
        "resblock_dilation_sizes must be a list of lists",
    ),
    (
        "mels text",
        lambda p: edit_json(p, lambda d: d.update(num_mels="256")),
        "num_mels must be a positive integer",
    ),
    ("a folder", folder_instead, "is a folder, not a file"),
]


@pytest.mark.parametrize("name,damage,words", BAD_VOCODER_CONFIGS, ids=[c[0] for c in BAD_VOCODER_CONFIGS])
def test_bad_vocoder_config_is_named(good, tmp_path, name, damage, words):
    folder = copy_of(good["model"] / "vocoder", tmp_path)
    damage(folder / "config.json")
    with pytest.raises(CheckpointFormatError) as err:
        HiFiGAN.from_pretrained(folder)
    assert_one_line_naming(err.value, folder / "config.json", words, "vocoder config")


def test_tensor_file_refusals_keep_their_reason(tmp_path):
    # A sound torch file that holds no tensors is refused for what it holds, not as damaged.
    path = tmp_path / "w.pt"
    torch.save({"a": 1}, path)
    with pytest.raises(
        FileFormatError, match=r"not a plain tensor checkpoint of weights \(entry 'a' is a int"
    ):
        load_tensor_file(path, "weights")


# --------------------------------------------------------------------------------------
# The command line: exit 2 and one line naming the file
# --------------------------------------------------------------------------------------


CLI_CASES = [
    ("model weights truncated", "model", "model.safetensors", truncate_half, "is truncated"),
    ("model weights random", "model", "model.safetensors", random_bytes, "is not a safetensors file"),
    ("model weights empty", "model", "model.safetensors", empty, "is empty"),
    ("model weights folder", "model", "model.safetensors", folder_instead, "model.safetensors"),
    (
        "model config not JSON",
        "model",
        "config.json",
        lambda p: p.write_text("{"),
        "is not valid JSON at line 1",
    ),
    (
        "model config depth",
        "model",
        "config.json",
        lambda p: edit_json(p, lambda d: d.update(depth="x")),
        "depth must be an integer",
    ),
    ("model config list", "model", "config.json", lambda p: p.write_text("[]"), "must hold a JSON object"),
    ("vae weights truncated", "vae", "diffusion_pytorch_model.safetensors", truncate_half, "is truncated"),
    ("vae config not JSON", "vae", "config.json", lambda p: p.write_text("{,}"), "is not valid JSON"),
    ("vocoder weights truncated", "model", "vocoder/vocoder.pt", truncate_half, "is truncated or damaged"),
    ("vocoder weights random", "model", "vocoder/vocoder.pt", random_bytes, "is not a torch checkpoint file"),
    (
        "vocoder config not JSON",
        "model",
        "vocoder/config.json",
        lambda p: p.write_text("nope"),
        "is not valid JSON",
    ),
]


@pytest.mark.parametrize("name,which,relative,damage,words", CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_cli_reports_damaged_file_in_one_line(good, tmp_path, name, which, relative, damage, words):
    folders = {"model": good["model"], "vae": good["vae"]}
    folders[which] = copy_of(folders[which], tmp_path)
    damaged = folders[which] / relative
    damage(damaged)
    out = tmp_path / "out.mp4"
    result = CliRunner().invoke(
        app,
        [
            "generate",
            "--model",
            str(folders["model"]),
            "--vae",
            str(folders["vae"]),
            "--frames",
            "2",
            "--device",
            "cpu",
            "-o",
            str(out),
        ],
    )
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rflav: error: "), result.stderr
    # A folder in place of the weights is already refused when the checkpoint folder is checked.
    named = str(damaged) if damage is not folder_instead else str(damaged.parent)
    assert named in lines[0] and words in lines[0] and damaged.name in lines[0]
    assert "Traceback" not in result.output and not out.exists()


def test_cli_process_exits_2_on_truncated_weights(good, tmp_path):
    folder = copy_of(good["model"], tmp_path)
    truncate_half(folder / "model.safetensors")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "rflav_cli",
            "generate",
            "--model",
            str(folder),
            "--vae",
            str(good["vae"]),
            "--frames",
            "2",
            "--device",
            "cpu",
            "-o",
            str(tmp_path / "out.mp4"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"rflav: error: {folder / 'model.safetensors'} (FLAV weights) is truncated "
        f"({(folder / 'model.safetensors').stat().st_size} of "
        f"{(good['model'] / 'model.safetensors').stat().st_size} "
        f"bytes): {REDOWNLOAD}"
    ]


# --------------------------------------------------------------------------------------
# Modes of written files follow the umask
# --------------------------------------------------------------------------------------


@pytest.fixture(params=[0o022, 0o002, 0o077])
def umask(request):
    before = os.umask(request.param)
    yield request.param
    os.umask(before)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_umask_is_read_without_being_changed(umask):
    assert current_umask() == umask
    assert os.umask(umask) == umask  # still in place
    assert creation_mode() == 0o666 & ~umask and creation_mode(directory=True) == 0o777 & ~umask


def test_atomic_write_and_side_file_follow_umask(tmp_path, umask):
    target = tmp_path / "file.bin"
    atomic_write(target, lambda tmp: Path(tmp).write_bytes(b"x"))
    assert mode(target) == 0o666 & ~umask
    assert mode(write_side_file(tmp_path, {"audio_scale": 1.0})) == 0o666 & ~umask
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.bin", "rflav.json"]  # no temp files left


def test_saved_checkpoints_follow_umask(tmp_path, umask):
    model = tiny.build_tiny_model(tmp_path / "model")
    vae = tiny.build_tiny_vae(tmp_path / "vae")
    written = [p for p in [*model.rglob("*"), *vae.rglob("*")]]
    assert {p.relative_to(tmp_path).as_posix() for p in written if p.is_file()} == {
        "model/config.json",
        "model/model.safetensors",
        "model/rflav.json",
        "model/vocoder/config.json",
        "model/vocoder/vocoder.pt",
        "vae/config.json",
        "vae/diffusion_pytorch_model.safetensors",
    }
    for path in written:
        assert mode(path) == (0o777 if path.is_dir() else 0o666) & ~umask, path
    for folder in (model, vae):
        assert mode(folder) == 0o777 & ~umask


def test_random_bench_checkpoint_follows_umask(tmp_path):
    from rflav_cli.bench import build_random_checkpoint

    before = os.umask(0o002)
    try:
        model_dir, vae_dir = build_random_checkpoint(tmp_path / "ckpt", "tiny")
    finally:
        os.umask(before)
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert len(files) == 7
    for path in tmp_path.rglob("*"):
        assert mode(path) == (0o775 if path.is_dir() else 0o664), path


def test_training_checkpoint_folder_follows_umask(good, tmp_path):
    from rflav_cli import train as train_mod

    model = FLAV.from_pretrained(good["model"])
    ema = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.AdamW(model.parameters())
    before = os.umask(0o002)
    try:
        final = train_mod._write_checkpoint(
            tmp_path,
            1,
            model,
            ema,
            optimizer,
            {"step": 1},
            {"audio_scale": 1.0},
            good["model"] / "vocoder",
            keep=2,
        )
    finally:
        os.umask(before)
    assert final.name == "checkpoint-00000001" and not list(tmp_path.glob(".checkpoint-*"))
    written = list(final.rglob("*"))
    assert {"model.safetensors", "config.json", "rflav.json", "vocoder.pt"} <= {p.name for p in written}
    for path in [final, *written]:
        assert mode(path) == (0o775 if path.is_dir() else 0o664), path
