"""SD-VAE parity with diffusers' AutoencoderKL (fixtures made by the original R-FLAV setup)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from rflav_cli.models.autoencoder import (
    CONFIG_NAME,
    SD_VAE_CONFIG,
    WEIGHTS_NAME,
    AutoencoderKL,
    DiagonalGaussian,
)

FIXTURES = Path(__file__).parent / "fixtures"
TOL = dict(atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def enc_fixture() -> dict[str, torch.Tensor]:
    return load_file(str(FIXTURES / "vae_tiny_enc.safetensors"))


@pytest.fixture(scope="module")
def dec_fixture() -> dict[str, torch.Tensor]:
    return load_file(str(FIXTURES / "vae_tiny_dec.safetensors"))


@pytest.fixture(scope="module")
def tiny_config() -> dict:
    # The full diffusers config, including keys the model ignores (force_upcast, shift_factor...).
    info = json.loads((FIXTURES / "vae_tiny.json").read_text())
    return {
        "_class_name": "AutoencoderKL",
        "_diffusers_version": "0.42.1",
        **info["full_config_as_instantiated"],
    }


@pytest.fixture(scope="module")
def tiny_state(enc_fixture, dec_fixture) -> dict[str, torch.Tensor]:
    return {
        key.removeprefix("model."): value
        for part in (enc_fixture, dec_fixture)
        for key, value in part.items()
        if key.startswith("model.")
    }


def write_folder(folder: Path, config: dict, state: dict[str, torch.Tensor]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / CONFIG_NAME).write_text(json.dumps(config))
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / WEIGHTS_NAME))
    return folder


@pytest.fixture(scope="module")
def tiny_vae(tmp_path_factory, tiny_config, tiny_state) -> AutoencoderKL:
    folder = write_folder(tmp_path_factory.mktemp("vae"), tiny_config, tiny_state)
    return AutoencoderKL.from_pretrained(folder)


def outputs(vae: AutoencoderKL, enc_fixture, dec_fixture) -> tuple[torch.Tensor, ...]:
    with torch.no_grad():
        posterior = vae.encode(enc_fixture["in.x"])
        return posterior.mean, posterior.std, vae.decode(dec_fixture["in.z"])


def test_loads_in_eval_mode_as_float32(tiny_vae):
    assert not tiny_vae.training
    assert all(p.dtype == torch.float32 and p.device.type == "cpu" for p in tiny_vae.parameters())


def test_encode_matches_reference(tiny_vae, enc_fixture):
    with torch.no_grad():
        posterior = tiny_vae.encode(enc_fixture["in.x"])
    torch.testing.assert_close(posterior.mean, enc_fixture["out.mean"], **TOL)
    torch.testing.assert_close(posterior.std, enc_fixture["out.std"], **TOL)


def test_decode_matches_reference(tiny_vae, dec_fixture):
    with torch.no_grad():
        images = tiny_vae.decode(dec_fixture["in.z"])
    assert images.shape == (2, 3, 8, 8)
    torch.testing.assert_close(images, dec_fixture["out.dec"], **TOL)


def test_sd_config_keys_shapes_and_param_count():
    with open(FIXTURES / "vae_sd_ft_ema_keys.tsv", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    with torch.device("meta"):
        vae = AutoencoderKL.from_config(SD_VAE_CONFIG)
    got = [(key, list(t.shape)) for key, t in vae.state_dict().items()]
    assert got == [(row["key"], json.loads(row["shape"])) for row in rows]
    assert sum(p.numel() for p in vae.parameters()) == 83_653_863
    assert sum(int(row["numel"]) for row in rows) == 83_653_863


@pytest.mark.parametrize("conv_shaped", [False, True])
def test_legacy_attention_names_load_identically(
    tmp_path, tiny_config, tiny_state, tiny_vae, enc_fixture, dec_fixture, conv_shaped
):
    with open(FIXTURES / "vae_sd_ft_ema_keys.tsv", newline="") as f:
        renames = {r["key"]: r["legacy_key"] for r in csv.DictReader(f, delimiter="\t")}
    legacy = {}
    for key, value in tiny_state.items():
        new_key = renames.get(key, key)  # the mid-block key names do not depend on the size
        if new_key != key and conv_shaped and value.ndim == 2:
            value = value[:, :, None, None]
        legacy[new_key] = value
    assert any(".query." in k for k in legacy) and not any(".to_q." in k for k in legacy)

    vae = AutoencoderKL.from_pretrained(write_folder(tmp_path, tiny_config, legacy))
    for got, want in zip(outputs(vae, enc_fixture, dec_fixture), outputs(tiny_vae, enc_fixture, dec_fixture)):
        torch.testing.assert_close(got, want, atol=0, rtol=0)


def test_mismatched_weights_name_the_offending_keys(tmp_path, tiny_config, tiny_state):
    bad = dict(tiny_state)
    del bad["decoder.conv_out.bias"]
    bad["encoder.extra.weight"] = torch.zeros(3)
    bad["quant_conv.weight"] = torch.zeros(8, 8, 3, 3)
    with pytest.raises(ValueError) as err:
        AutoencoderKL.from_pretrained(write_folder(tmp_path, tiny_config, bad))
    message = str(err.value)
    assert "\n" not in message
    assert "missing: decoder.conv_out.bias" in message
    assert "unexpected: encoder.extra.weight" in message
    assert "quant_conv.weight (file (8, 8, 3, 3), model (8, 8, 1, 1))" in message


def test_missing_files_give_clear_error(tmp_path):
    (tmp_path / CONFIG_NAME).write_text(json.dumps(SD_VAE_CONFIG))
    with pytest.raises(FileNotFoundError, match=WEIGHTS_NAME):
        AutoencoderKL.from_pretrained(tmp_path)


def test_save_load_round_trip(tmp_path, tiny_vae, enc_fixture, dec_fixture):
    folder = tiny_vae.save_pretrained(tmp_path / "saved")
    assert sorted(p.name for p in folder.iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]  # no temp files
    config = json.loads((folder / CONFIG_NAME).read_text())
    assert config["_class_name"] == "AutoencoderKL"
    assert config["block_out_channels"] == [32, 64] and config["scaling_factor"] == 0.18215

    loaded = AutoencoderKL.from_pretrained(folder)
    assert loaded.config == tiny_vae.config
    saved = load_file(str(folder / WEIGHTS_NAME))
    assert saved.keys() == tiny_vae.state_dict().keys()
    for key, value in tiny_vae.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    for got, want in zip(
        outputs(loaded, enc_fixture, dec_fixture), outputs(tiny_vae, enc_fixture, dec_fixture)
    ):
        assert torch.equal(got, want)


def test_from_pretrained_dtype(tmp_path, tiny_vae):
    half = AutoencoderKL.from_pretrained(tiny_vae.save_pretrained(tmp_path), dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in half.parameters())


def test_sample_is_seeded_mean_plus_std_noise(tiny_vae, enc_fixture):
    with torch.no_grad():
        posterior = tiny_vae.encode(enc_fixture["in.x"])
    first = posterior.sample(torch.Generator().manual_seed(7))
    second = posterior.sample(torch.Generator().manual_seed(7))
    assert torch.equal(first, second)
    noise = torch.randn(posterior.mean.shape, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(first, posterior.mean + posterior.std * noise, atol=0, rtol=0)
    assert not torch.equal(first, posterior.sample(torch.Generator().manual_seed(8)))


def test_posterior_clamps_logvar():
    moments = torch.cat([torch.zeros(1, 2, 1, 1), torch.tensor([-50.0, 30.0]).view(1, 2, 1, 1)], dim=1)
    posterior = DiagonalGaussian(moments)
    assert posterior.logvar.flatten().tolist() == [-30.0, 20.0]
    torch.testing.assert_close(posterior.std.flatten(), torch.exp(torch.tensor([-15.0, 10.0])))


def test_rejects_unsupported_block_types():
    with pytest.raises(ValueError, match="down_block_types"):
        AutoencoderKL(down_block_types=["AttnDownEncoderBlock2D"], block_out_channels=[32], norm_num_groups=8)
