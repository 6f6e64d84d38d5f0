"""Tests for rflav_cli.hub: presets, local folders, the Hugging Face cache layout and errors.

No test touches the network. In-process tests force offline mode both in the environment and
in huggingface_hub's constants (read at import time); the command-line tests run `rflav` in a
subprocess whose HF_ENDPOINT is a local port that refuses connections, a local server that
accepts and never answers, or a small local stand-in for the Hub. The cache lives under tmp_path.
"""

from __future__ import annotations

import dataclasses
import hashlib
import http.server
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
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


def add_to_cache(
    cache: Path, repo_id: str, files: dict[str, bytes], commit: str = COMMIT, ref: str | None = "main"
) -> Path:
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
    assert set(PRESETS) == {"dance", "landscape", "ball"}
    assert PRESETS["ball"].repo_id is None and PRESETS["ball"].packaged_folder.is_dir()
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
    "name",
    [
        "name",
        "a/b/c",
        "org/",
        "/abs",
        "./rel/x",
        "org/na--me",
        "org/a..b",
        "org/-x",
        "org/x.git",
        "org/with space",
        "o/" + "x" * 95,
    ],
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
    no_vocoder = make_folder(
        tmp_path / "novoc", {k: v for k, v in model_payload("m").items() if not k.startswith("vocoder/")}
    )
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
    data = {
        "class_names": ["a"],
        "audio_scale": 3.5,
        "autoencoder": VAE_REPO_ID,
        "fps": 10,
        "sample_rate": 16000,
    }
    path = write_side_file(tmp_path, data)
    assert path == tmp_path / "rflav.json"
    assert read_side_file(tmp_path) == data
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rflav.json"]  # no temp file left behind
    assert read_side_file(tmp_path / "elsewhere") == {}


@pytest.mark.parametrize(
    "text",
    [
        "{not json",
        "[1, 2]",
        '{"audio_scale": "big"}',
        '{"audio_scale": -1}',
        '{"class_names": [1]}',
        '{"autoencoder": 3}',
    ],
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
    with pytest.raises(ResolveError, match="'ball' ships with rflav: there is nothing to download"):
        download("ball")


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
    # hf_hub_download is faked here: the endpoint probe must not leave the process either.
    monkeypatch.setattr(hub, "_hub_problem", lambda *args: "")


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
def test_hub_errors_become_one_line(
    online_env: None, monkeypatch: pytest.MonkeyPatch, error, expected: str
) -> None:
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", FakeDownload(error()))
    with pytest.raises(ResolveError) as info:
        resolve_model("org/model")
    message = str(info.value)
    assert expected in message and "org/model" in message and "config.json" in message
    assert "--model" in message and "\n" not in message


def test_offline_switch_and_commit_pinning(
    online_env: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
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


def test_download_to_folder_online_uses_local_dir(
    online_env: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
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


# ---------------------------------------------------------------- an unreachable or silent Hub, via the CLI

REFUSED_LIMIT_S = 5.0  # the whole command, when the endpoint refuses connections
SILENT_LIMIT_S = 15.0  # the whole command, when the endpoint accepts and never answers


@pytest.fixture
def refused_endpoint() -> str:
    """An endpoint on a local port nothing listens on: connections are refused at once."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


@pytest.fixture
def silent_endpoint() -> Iterator[str]:
    """An endpoint that accepts connections and never sends a byte."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                continue
            held.append(conn)  # kept open and never answered

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}"
    stop.set()
    thread.join()
    for conn in held:
        conn.close()
    server.close()


class FakeHub(http.server.ThreadingHTTPServer):
    """Serves /<org>/<name>/resolve/<revision>/<path> as the Hub does for plain files.

    ``seconds_per_file`` spreads each GET body over that many seconds (a slow but working link).
    A file it does not hold is answered 404 EntryNotFound.
    """

    daemon_threads = True

    def __init__(self, repos: dict[str, dict[str, bytes]], seconds_per_file: float = 0.0) -> None:
        super().__init__(("127.0.0.1", 0), FakeHubHandler)
        self.repos = repos
        self.seconds_per_file = seconds_per_file
        self.gets: list[str] = []

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class FakeHubHandler(http.server.BaseHTTPRequestHandler):
    server: FakeHub

    def log_message(self, *args: object) -> None:  # keep the test output clean
        pass

    def _lookup(self) -> bytes | None:
        parts = self.path.split("?")[0].strip("/").split("/")
        if len(parts) < 5 or parts[2] != "resolve":
            return None
        return self.server.repos.get(f"{parts[0]}/{parts[1]}", {}).get("/".join(parts[4:]))

    def _head(self, data: bytes | None) -> None:
        if data is None:
            self.send_response(404)
            self.send_header("X-Error-Code", "EntryNotFound")
            self.send_header("X-Repo-Commit", COMMIT)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("X-Repo-Commit", COMMIT)
        self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()

    def do_HEAD(self) -> None:  # noqa: N802 - http.server's naming
        self._head(self._lookup())

    def do_GET(self) -> None:  # noqa: N802
        data = self._lookup()
        self._head(data)
        if data is None:
            return
        self.server.gets.append(self.path)
        pieces = 10
        step = max(1, -(-len(data) // pieces))
        for start in range(0, len(data), step):
            self.wfile.write(data[start : start + step])
            self.wfile.flush()
            time.sleep(self.server.seconds_per_file / pieces)


@pytest.fixture
def fake_hub() -> Iterator[FakeHub]:
    server = FakeHub({DANCE: model_payload("dance"), VAE_REPO_ID: VAE_PAYLOAD})
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def rflav(
    args: list[str], endpoint: str, tmp_path: Path, **env: str
) -> tuple[subprocess.CompletedProcess, float]:
    """Run `rflav ARGS` in a fresh process against ``endpoint``; returns the result and seconds taken."""
    full_env = {
        k: v
        for k, v in os.environ.items()
        if k
        not in (
            "HF_HUB_OFFLINE",
            "HF_HUB_CACHE",
            "HUGGINGFACE_HUB_CACHE",
            "HF_HUB_VERBOSITY",
            "RFLAV_HUB_TIMEOUT",
        )
    }
    full_env.update(HF_ENDPOINT=endpoint, HF_HOME=str(tmp_path / "hf_home"), **env)
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "rflav_cli", *args],
        cwd=tmp_path,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    return proc, time.monotonic() - start


def only_line(proc: subprocess.CompletedProcess) -> str:
    """The single line the command printed on stderr (and nothing else was printed there)."""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("rflav: error: "), proc.stderr
    return lines[0]


def tree(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


def test_refused_endpoint_fails_download_at_once_and_cleans_up(refused_endpoint: str, tmp_path: Path) -> None:
    target = tmp_path / "weights"
    (target / "dance").mkdir(parents=True)
    (target / "notes.txt").write_text("mine")
    (target / "dance" / "README").write_text("mine too")
    before = tree(target)
    proc, seconds = rflav(["download", "dance", "--to", str(target)], refused_endpoint, tmp_path)
    assert proc.returncode == 2
    line = only_line(proc)
    assert DANCE in line and "config.json" in line and "could not be reached" in line
    assert refused_endpoint in line and "local folder" not in line  # download has no such option
    assert proc.stdout == ""
    assert seconds < REFUSED_LIMIT_S
    # No lock files, partial files or .cache/huggingface left in the folders; ours kept.
    assert tree(target) == before
    # A folder the call would have made is not made at all.
    proc, _ = rflav(
        ["download", "dance", "--to", str(tmp_path / "new" / "deeper")], refused_endpoint, tmp_path
    )
    assert proc.returncode == 2 and not (tmp_path / "new").exists()


def test_silent_endpoint_fails_download_within_the_default_timeout(
    silent_endpoint: str, tmp_path: Path
) -> None:
    proc, seconds = rflav(["download", "dance", "--to", str(tmp_path / "w")], silent_endpoint, tmp_path)
    assert proc.returncode == 2
    line = only_line(proc)
    assert DANCE in line and "config.json" in line and "--model" not in line
    assert f"did not answer within {hub.DEFAULT_HUB_TIMEOUT:g} s" in line and "RFLAV_HUB_TIMEOUT" in line
    assert hub.DEFAULT_HUB_TIMEOUT <= seconds < SILENT_LIMIT_S
    assert not (tmp_path / "w").exists()


def test_silent_endpoint_honours_the_timeout_variable(silent_endpoint: str, tmp_path: Path) -> None:
    proc, seconds = rflav(["download", "dance"], silent_endpoint, tmp_path, RFLAV_HUB_TIMEOUT="0.5")
    assert proc.returncode == 2
    assert "did not answer within 0.5 s" in only_line(proc)
    assert 0.5 <= seconds < 4
    proc, _ = rflav(["download", "dance"], silent_endpoint, tmp_path, RFLAV_HUB_TIMEOUT="soon")
    assert proc.returncode == 2 and "RFLAV_HUB_TIMEOUT must be a positive number" in only_line(proc)


def test_generate_with_a_hub_model_fails_fast(
    refused_endpoint: str, silent_endpoint: str, tmp_path: Path
) -> None:
    # What starting `rflav generate` costs without any Hub access (torch and the models' code).
    start = time.monotonic()
    subprocess.run([sys.executable, "-c", "import rflav_cli.cli, rflav_cli.generate"], check=True)
    startup = time.monotonic() - start
    args = ["generate", "--model", "org/name", "--seconds", "1", "-o", "out.mp4"]
    proc, seconds = rflav(args, refused_endpoint, tmp_path)
    assert proc.returncode == 2
    line = only_line(proc)
    assert "org/name" in line and "config.json" in line and "could not be reached" in line
    assert "pass a local folder with --model PATH" in line
    assert seconds < max(REFUSED_LIMIT_S, startup + 2.0)
    proc, seconds = rflav(args, silent_endpoint, tmp_path, RFLAV_HUB_TIMEOUT="1")
    assert proc.returncode == 2
    line = only_line(proc)
    assert "org/name" in line and "did not answer within 1 s" in line and "--model PATH" in line
    assert seconds < startup + 1 + 3.0
    assert not (tmp_path / "out.mp4").exists()


def test_unreachable_hub_still_serves_the_cache(refused_endpoint: str, tmp_path: Path) -> None:
    cache = tmp_path / "hf_home" / "hub"
    snapshot = add_to_cache(cache, DANCE, model_payload("dance"))
    vae = add_to_cache(cache, VAE_REPO_ID, VAE_PAYLOAD)
    proc, seconds = rflav(["download", "dance"], refused_endpoint, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == [str(snapshot), str(vae)] and proc.stderr == ""
    assert seconds < REFUSED_LIMIT_S
    # Into plain folders, the files are copied from the cache.
    proc, _ = rflav(["download", "dance", "--to", "w"], refused_endpoint, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "w" / "dance" / "vocoder" / "vocoder.pt").read_bytes() == b"vocoder of dance"
    assert (tmp_path / "w" / "sd-vae-ft-ema" / "config.json").read_bytes() == VAE_PAYLOAD["config.json"]


def test_offline_mode_does_not_wait_for_a_silent_hub(silent_endpoint: str, tmp_path: Path) -> None:
    proc, seconds = rflav(["download", "dance"], silent_endpoint, tmp_path, HF_HUB_OFFLINE="1")
    assert proc.returncode == 2
    line = only_line(proc)
    assert "offline and not in the Hugging Face cache" in line and DANCE in line
    assert seconds < 3


def test_download_to_folder_from_a_slow_hub(fake_hub: FakeHub, tmp_path: Path) -> None:
    # Each file takes longer to arrive than the probe waits: a working download is not cut.
    fake_hub.seconds_per_file = 0.8
    proc, _ = rflav(["download", "dance", "--to", "w"], fake_hub.endpoint, tmp_path, RFLAV_HUB_TIMEOUT="0.5")
    assert proc.returncode == 0, proc.stderr
    target = tmp_path / "w"
    assert proc.stdout.split() == [str(target / "dance"), str(target / "sd-vae-ft-ema")]
    for name, data in model_payload("dance").items():
        assert (target / "dance" / name).read_bytes() == data
    for name, data in VAE_PAYLOAD.items():
        assert (target / "sd-vae-ft-ema" / name).read_bytes() == data
    assert read_side_file(target / "dance") == {"audio_scale": PRESETS["dance"].audio_scale}
    assert len(fake_hub.gets) == len(MODEL_FILES) + len(VAE_FILES)


def test_failed_download_to_folder_removes_what_it_added(fake_hub: FakeHub, tmp_path: Path) -> None:
    # The Hub holds the model but not its vocoder weights: two files arrive, then it fails.
    del fake_hub.repos[DANCE]["vocoder/vocoder.pt"]
    target = tmp_path / "w"
    (target / "dance" / ".cache").mkdir(parents=True)
    (target / "dance" / ".cache" / "keep").write_text("mine")
    (target / "dance" / "notes.txt").write_text("mine")
    before = tree(target)
    proc, _ = rflav(["download", "dance", "--to", str(target)], fake_hub.endpoint, tmp_path)
    assert proc.returncode == 2
    line = only_line(proc)
    assert DANCE in line and "vocoder/vocoder.pt" in line and "no such file" in line
    assert len(fake_hub.gets) == 3  # the files before it did arrive ...
    assert tree(target) == before  # ... and are gone again, with the .cache/huggingface bookkeeping


def test_an_unreachable_init_checkpoint_names_its_flag(refused_endpoint: str, tmp_path: Path) -> None:
    (tmp_path / "data" / "train").mkdir(parents=True)
    proc, _ = rflav(["train", "data", "-o", "run", "--init", "dance"], refused_endpoint, tmp_path)
    assert proc.returncode == 2
    line = only_line(proc)
    assert DANCE in line and "pass a local folder with --init PATH" in line
    assert "--model" not in line and "--class" not in line  # options of generate, not of train
