"""Tests for rflav_cli.hub: presets, local folders, the Hugging Face cache layout and errors.

No test touches the network: offline mode is forced both in the environment and in
huggingface_hub's constants (read at import time), and the cache lives under tmp_path.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from types import SimpleNamespace

import huggingface_hub
import pytest
from huggingface_hub import constants as hf_constants
from huggingface_hub.errors import (
    GatedRepoError,
    LocalEntryNotFoundError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
)
from huggingface_hub.utils import are_progress_bars_disabled

from rflav_cli import hub
from rflav_cli.hub import (
    MODEL_FILES,
    PRESETS,
    VAE_FILES,
    VAE_REPO_ID,
    ResolveError,
    download,
    local_folder,
    read_side_file,
    resolve_model,
    write_side_file,
)

COMMIT = "3f1c2a9e8d7b6a5f4e3d2c1b0a9f8e7d6c5b4a39"
OTHER_COMMIT = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"
DANCE = "MaverickAlex/R-FLAV-B-1-AIST"
LANDSCAPE = "MaverickAlex/R-FLAV-B-1-LS"


def model_payload(tag: str) -> dict[str, bytes]:
    return {
        "config.json": json.dumps({"depth": 12, "num_classes": 0, "tag": tag}).encode(),
        "model.safetensors": f"weights of {tag}".encode(),
        "vocoder/config.json": json.dumps({"num_mels": 256}).encode(),
        "vocoder/vocoder.pt": f"vocoder of {tag}".encode(),
    }


VAE_PAYLOAD = {"config.json": b'{"latent_channels": 4}', "diffusion_pytorch_model.safetensors": b"vae"}


def add_to_cache(cache: Path, repo_id: str, files: dict[str, bytes], commit: str = COMMIT,
                 ref: str | None = "main") -> Path:
    """Lay files out exactly as huggingface_hub does: blobs, relative symlinks, refs/<branch>."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    for name, data in files.items():
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    if ref is not None:
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commit)  # no trailing newline, as the Hub client writes it
    return snapshot


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "hf_home"
    cache_dir = home / "hub"
    cache_dir.mkdir(parents=True)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache_dir))
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads these at import time; patch them so no request can leave.
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache_dir))
    monkeypatch.chdir(tmp_path)
    return cache_dir


def make_folder(folder: Path, files: dict[str, bytes]) -> Path:
    for name, data in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    return folder


# ---------------------------------------------------------------- presets and constants


def test_presets_point_at_the_released_checkpoints() -> None:
    assert set(PRESETS) == {"dance", "landscape"}
    assert PRESETS["dance"].repo_id == DANCE
    assert PRESETS["dance"].audio_scale == 3.5009668382765917
    assert PRESETS["landscape"].repo_id == LANDSCAPE
    assert PRESETS["landscape"].audio_scale == 3.0951129410195515
    assert all(p.name == key for key, p in PRESETS.items())
    with pytest.raises(dataclasses.FrozenInstanceError):
        PRESETS["dance"].audio_scale = 1.0  # type: ignore[misc]
    assert VAE_REPO_ID == "stabilityai/sd-vae-ft-ema"
    assert MODEL_FILES == ["config.json", "model.safetensors", "vocoder/config.json", "vocoder/vocoder.pt"]
    assert VAE_FILES == ["config.json", "diffusion_pytorch_model.safetensors"]


@pytest.mark.parametrize("name", ["org/name", "MaverickAlex/R-FLAV-B-1-AIST", "a_b/c.d-e"])
def test_valid_repo_ids(name: str) -> None:
    assert hub.is_repo_id(name)


@pytest.mark.parametrize(
    "name", ["name", "a/b/c", "org/", "/abs", "./rel/x", "org/na--me", "org/a..b", "org/-x", "org/x.git",
             "org/with space", "o/" + "x" * 95],
)
def test_invalid_repo_ids(name: str) -> None:
    assert not hub.is_repo_id(name)


# ---------------------------------------------------------------- the Hub cache


def test_local_folder_finds_the_cached_snapshot_offline(cache: Path) -> None:
    snapshot = add_to_cache(cache, DANCE, model_payload("dance"))
    folder = local_folder(DANCE, MODEL_FILES)
    assert folder == snapshot
    assert (folder / "model.safetensors").read_bytes() == b"weights of dance"
    # The vocoder loader asks for the subfolder files and uses <folder>/vocoder.
    vocoder = local_folder(DANCE, ["vocoder/config.json", "vocoder/vocoder.pt"]) / "vocoder"
    assert (vocoder / "vocoder.pt").read_bytes() == b"vocoder of dance"


def test_local_folder_picks_the_commit_of_the_ref(cache: Path) -> None:
    add_to_cache(cache, DANCE, model_payload("old"), commit=OTHER_COMMIT, ref=None)
    current = add_to_cache(cache, DANCE, model_payload("new"))
    assert local_folder(DANCE, MODEL_FILES) == current
    pinned = local_folder(DANCE, MODEL_FILES, revision=OTHER_COMMIT)
    assert (pinned / "model.safetensors").read_bytes() == b"weights of old"


def test_resolve_preset_offline(cache: Path) -> None:
    snapshot = add_to_cache(cache, DANCE, model_payload("dance"))
    model = resolve_model("dance")
    assert model.folder == snapshot
    assert model.source == DANCE
    assert model.revision == COMMIT
    assert model.preset == "dance"
    assert model.audio_scale == 3.5009668382765917
    assert model.vocoder_folder == snapshot / "vocoder"
    assert model.class_names is None and model.autoencoder is None


def test_resolve_landscape_preset(cache: Path) -> None:
    add_to_cache(cache, LANDSCAPE, model_payload("ls"), commit=OTHER_COMMIT)
    model = resolve_model("landscape", offline=True)
    assert model.source == LANDSCAPE
    assert model.revision == OTHER_COMMIT
    assert model.audio_scale == 3.0951129410195515


def test_side_file_in_a_hub_repo_wins_over_the_preset(cache: Path) -> None:
    files = model_payload("dance") | {"rflav.json": b'{"audio_scale": 2.5, "class_names": ["a", "b"]}'}
    add_to_cache(cache, DANCE, files)
    model = resolve_model("dance")
    assert model.audio_scale == 2.5
    assert model.class_names == ["a", "b"]


def test_unknown_hub_repo_with_and_without_side_file(cache: Path) -> None:
    add_to_cache(cache, "someone/plain", model_payload("plain"))
    plain = resolve_model("someone/plain")
    assert plain.preset is None and plain.audio_scale is None and plain.revision == COMMIT
    side = {"audio_scale": 3.25, "class_names": ["x", "y"], "autoencoder": "me/my-vae", "fps": 10}
    add_to_cache(cache, "someone/trained", model_payload("t") | {"rflav.json": json.dumps(side).encode()})
    trained = resolve_model("someone/trained")
    assert (trained.audio_scale, trained.class_names, trained.autoencoder) == (3.25, ["x", "y"], "me/my-vae")
    assert trained.source == "someone/trained"


def test_missing_file_offline_names_repo_file_and_fix(cache: Path) -> None:
    files = model_payload("dance")
    del files["vocoder/vocoder.pt"]
    snapshot = add_to_cache(cache, DANCE, files)
    with pytest.raises(ResolveError) as info:
        resolve_model("dance")
    message = str(info.value)
    assert DANCE in message and "vocoder/vocoder.pt" in message and "--model" in message
    assert "offline" in message and "rflav download dance" in message
    assert "\n" not in message
    assert info.value.__cause__ is not None  # the original error is kept for debugging only
    # Without the vocoder requirement the same cache entry is enough.
    model = resolve_model("dance", need_vocoder=False)
    assert model.folder == snapshot and model.vocoder_folder is None


def test_uncached_vae_offline_suggests_vae_flag(cache: Path) -> None:
    with pytest.raises(ResolveError) as info:
        local_folder(VAE_REPO_ID, VAE_FILES)
    message = str(info.value)
    assert VAE_REPO_ID in message and "config.json" in message and "--vae" in message
    assert "--model" not in message


# ---------------------------------------------------------------- local folders


def test_local_folder_with_existing_directory(tmp_path: Path) -> None:
    folder = make_folder(tmp_path / "vae", VAE_PAYLOAD)
    assert local_folder(str(folder), VAE_FILES) == folder
    assert local_folder(folder, VAE_FILES) == folder
    (folder / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(ResolveError) as info:
        local_folder(folder, VAE_FILES)
    assert "diffusion_pytorch_model.safetensors" in str(info.value) and str(folder) in str(info.value)


def test_resolve_local_folder_without_side_file(tmp_path: Path) -> None:
    folder = make_folder(tmp_path / "ckpt", model_payload("mine"))
    model = resolve_model(str(folder))
    assert model.folder == folder and model.source == str(folder)
    assert model.revision is None and model.preset is None
    assert model.audio_scale is None and model.class_names is None
    assert model.vocoder_folder == folder / "vocoder"


def test_resolve_local_folder_with_side_file(tmp_path: Path) -> None:
    folder = make_folder(tmp_path / "ckpt", model_payload("mine"))
    write_side_file(folder, {"audio_scale": 3.0, "class_names": ["rain", "sea"], "autoencoder": "org/vae"})
    model = resolve_model(str(folder))
    assert model.audio_scale == 3.0
    assert model.class_names == ["rain", "sea"]
    assert model.autoencoder == "org/vae"
    # The config stays exactly what the original code can load.
    assert json.loads((folder / "config.json").read_text()) == {"depth": 12, "num_classes": 0, "tag": "mine"}


def test_resolve_local_folder_missing_files(tmp_path: Path) -> None:
    files = model_payload("mine")
    del files["model.safetensors"]
    folder = make_folder(tmp_path / "broken", files)
    with pytest.raises(ResolveError, match="model.safetensors"):
        resolve_model(str(folder))
    no_vocoder = make_folder(tmp_path / "novoc", {k: v for k, v in model_payload("m").items()
                                                   if not k.startswith("vocoder/")})
    with pytest.raises(ResolveError, match="vocoder/vocoder.pt"):
        resolve_model(str(no_vocoder))
    model = resolve_model(str(no_vocoder), need_vocoder=False)
    assert model.vocoder_folder is None


@pytest.mark.parametrize("name", ["no such thing", "a/b/c", "./missing/folder", "org/na--me"])
def test_malformed_names(cache: Path, name: str) -> None:
    with pytest.raises(ResolveError, match="neither a local folder nor a Hub repo id"):
        local_folder(name, MODEL_FILES)
    with pytest.raises(ResolveError, match="neither a preset"):
        resolve_model(name)


def test_a_file_is_not_a_folder(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"x")
    with pytest.raises(ResolveError, match="is a file"):
        local_folder(str(path), MODEL_FILES)


# ---------------------------------------------------------------- rflav.json


def test_side_file_round_trip_and_atomic(tmp_path: Path) -> None:
    data = {"class_names": ["a"], "audio_scale": 3.5, "autoencoder": VAE_REPO_ID, "fps": 10, "sample_rate": 16000}
    path = write_side_file(tmp_path, data)
    assert path == tmp_path / "rflav.json"
    assert read_side_file(tmp_path) == data
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rflav.json"]  # no temp file left behind
    assert read_side_file(tmp_path / "elsewhere") == {}


@pytest.mark.parametrize(
    "text", ["{not json", "[1, 2]", '{"audio_scale": "big"}', '{"audio_scale": -1}', '{"class_names": [1]}',
             '{"autoencoder": 3}'],
)
def test_bad_side_file(tmp_path: Path, text: str) -> None:
    (tmp_path / "rflav.json").write_text(text)
    with pytest.raises(ResolveError, match="rflav.json"):
        read_side_file(tmp_path)


# ---------------------------------------------------------------- download


def test_download_into_cache_returns_snapshots(cache: Path) -> None:
    snapshot = add_to_cache(cache, DANCE, model_payload("dance"))
    vae = add_to_cache(cache, VAE_REPO_ID, VAE_PAYLOAD, commit=OTHER_COMMIT)
    assert download("dance", progress=False) == [snapshot, vae]


def test_download_to_folder_offline_copies_from_cache(cache: Path, tmp_path: Path) -> None:
    add_to_cache(cache, DANCE, model_payload("dance"))
    add_to_cache(cache, LANDSCAPE, model_payload("ls"), commit=OTHER_COMMIT)
    add_to_cache(cache, VAE_REPO_ID, VAE_PAYLOAD)
    target = tmp_path / "weights"
    folders = download("all", to=target, progress=False)
    assert folders == [target / "dance", target / "landscape", target / "sd-vae-ft-ema"]
    for name, data in model_payload("dance").items():
        assert (target / "dance" / name).read_bytes() == data
        assert not (target / "dance" / name).is_symlink()
    assert (target / "landscape" / "model.safetensors").read_bytes() == b"weights of ls"
    for name, data in VAE_PAYLOAD.items():
        assert (target / "sd-vae-ft-ema" / name).read_bytes() == data
    # The plain folders work as --model / --vae and keep the preset's audio scale.
    model = resolve_model(str(target / "landscape"))
    assert model.audio_scale == 3.0951129410195515 and model.vocoder_folder is not None
    assert local_folder(str(target / "sd-vae-ft-ema"), VAE_FILES) == target / "sd-vae-ft-ema"
    # Running it again is harmless.
    assert download("dance", to=target, progress=False)[0] == target / "dance"


def test_download_reports_what_is_missing(cache: Path, tmp_path: Path) -> None:
    add_to_cache(cache, DANCE, model_payload("dance"))
    with pytest.raises(ResolveError) as info:
        download("dance", to=tmp_path / "w")
    assert VAE_REPO_ID in str(info.value)
    with pytest.raises(ResolveError, match="dance, landscape, all"):
        download("ballet")


# ---------------------------------------------------------------- Hub errors and offline switch


class FakeDownload:
    """Stands in for hf_hub_download: records calls and raises a chosen error."""

    def __init__(self, error: Exception | None = None, root: Path | None = None) -> None:
        self.error = error
        self.root = root
        self.calls: list[dict] = []

    def __call__(self, repo_id: str, filename: str, **kwargs) -> str:
        self.calls.append({"filename": filename, "bars_off": are_progress_bars_disabled(), **kwargs})
        if self.error is not None:
            raise self.error
        if kwargs.get("local_dir") is not None:
            path = Path(kwargs["local_dir"]) / filename
        else:
            assert self.root is not None
            path = self.root / COMMIT / filename
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
        return str(path)


def http_error(cls: type, status: int) -> Exception:
    # Only the attributes the error class reads; avoids depending on the HTTP client library.
    response = SimpleNamespace(status_code=status, headers={}, request=None)
    return cls("boom\nsecond line", response=response)


@pytest.fixture
def online_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (lambda: http_error(GatedRepoError, 403), "gated"),
        (lambda: http_error(RepositoryNotFoundError, 404), "no such Hub repo"),
        (lambda: http_error(RemoteEntryNotFoundError, 404), "no such file"),
        (lambda: LocalEntryNotFoundError("no connection"), "could not be reached"),
        (lambda: OSError("disk full"), "disk full"),
    ],
)
def test_hub_errors_become_one_line(online_env: None, monkeypatch: pytest.MonkeyPatch, error, expected: str) -> None:
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", FakeDownload(error()))
    with pytest.raises(ResolveError) as info:
        resolve_model("org/model")
    message = str(info.value)
    assert expected in message and "org/model" in message and "config.json" in message
    assert "--model" in message and "\n" not in message


def test_offline_switch_and_commit_pinning(online_env: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeDownload(root=tmp_path / "snap")
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake)
    folder = local_folder("org/model", MODEL_FILES)
    assert folder == tmp_path / "snap" / COMMIT
    assert [c["local_files_only"] for c in fake.calls] == [False] * 4
    # After the first file, the rest are pinned to the commit it came from.
    assert [c["revision"] for c in fake.calls] == [None, COMMIT, COMMIT, COMMIT]
    assert all(c["cache_dir"] == str(tmp_path / "hub") for c in fake.calls)
    fake.calls.clear()
    local_folder("org/model", ["config.json"], offline=True)
    assert fake.calls[0]["local_files_only"] is True
    fake.calls.clear()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # set after import: still honoured
    local_folder("org/model", ["config.json"])
    assert fake.calls[0]["local_files_only"] is True


def test_download_to_folder_online_uses_local_dir(online_env: None, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeDownload()
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake)
    bars_before = are_progress_bars_disabled()
    target = tmp_path / "weights"
    folders = download("landscape", to=target, revision="v1", progress=False)
    assert folders == [target / "landscape", target / "sd-vae-ft-ema"]
    assert [(c["filename"], c["local_dir"]) for c in fake.calls] == (
        [(f, target / "landscape") for f in MODEL_FILES] + [(f, target / "sd-vae-ft-ema") for f in VAE_FILES]
    )
    # The revision applies to the model repo only; local_dir files are never pinned to a cache commit.
    assert [c["revision"] for c in fake.calls] == ["v1"] * 4 + [None] * 2
    assert all(c["bars_off"] and c["local_files_only"] is False for c in fake.calls)
    assert are_progress_bars_disabled() == bars_before
    assert read_side_file(target / "landscape") == {"audio_scale": 3.0951129410195515}
