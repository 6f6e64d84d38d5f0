"""I3D and the AudioCLIP audio head against MM-Diffusion evaluator fixtures (formula weights),
plus loading of the original checkpoint layouts and the weight-file resolution."""

from __future__ import annotations

import hashlib
import io
import json
import math
from dataclasses import replace
from fractions import Fraction
from pathlib import Path

import formula_weights as fw
import pytest
import rounding_bounds as rb
import torch
from safetensors.torch import load_file

from rflav_cli.metrics import weights as wt
from rflav_cli.metrics.audioclip import (
    AUDIOCLIP_PREFIX,
    AUDIOCLIP_SAMPLES,
    AudioCLIPAudio,
    _linspace,
    load_audioclip_audio,
    rescale_like_int16,
)
from rflav_cli.metrics.i3d import InceptionI3d, load_i3d, preprocess_for_i3d

FIXTURES = Path(__file__).parent / "fixtures"
I3D_TABLE = FIXTURES / "i3d_keys.tsv"
AUDIO_TABLE = FIXTURES / "audioclip_audio_keys.tsv"
EXTRA_TONES = [(200.0, 0.1), (650.0, 1.0), (2500.0, 2.0), (5000.0, 0.5), (90.0, 0.0), (7000.0, 1.3)]

_DTYPES = {"float32": torch.float32, "int64": torch.int64}


def _meta(name: str) -> dict:
    return json.loads((FIXTURES / f"{name}.json").read_text())


@pytest.fixture(scope="module")
def i3d_state() -> dict[str, torch.Tensor]:
    return fw.formula_state_dict(I3D_TABLE)


@pytest.fixture(scope="module")
def audio_state() -> dict[str, torch.Tensor]:
    return fw.formula_state_dict(AUDIO_TABLE)


@pytest.fixture(scope="module")
def i3d(i3d_state) -> InceptionI3d:
    model = InceptionI3d()
    model.load_state_dict(i3d_state)
    return model.eval()


@pytest.fixture(scope="module")
def audio_net(audio_state) -> AudioCLIPAudio:
    model = AudioCLIPAudio()
    model.load_state_dict({k.removeprefix(AUDIOCLIP_PREFIX): v for k, v in audio_state.items()})
    return model


@pytest.fixture(scope="module")
def i3d_ref() -> dict[str, torch.Tensor]:
    return load_file(FIXTURES / "i3d_formula.safetensors")


@pytest.fixture(scope="module")
def audio_ref() -> dict[str, torch.Tensor]:
    return load_file(FIXTURES / "audioclip_formula.safetensors")


def _assert_table(state: dict[str, torch.Tensor], table: Path, prefix: str = "") -> None:
    rows = fw.read_key_table(table)
    assert [prefix + k for k in state] == [r.key for r in rows]
    for row in rows:
        value = state[row.key.removeprefix(prefix)]
        assert tuple(value.shape) == row.shape, row.key
        assert value.dtype == _DTYPES[row.dtype], row.key


# --- structure ----------------------------------------------------------------------------


def test_i3d_state_dict_matches_checkpoint_key_list():
    model = InceptionI3d()
    _assert_table(model.state_dict(), I3D_TABLE)
    assert sum(p.numel() for p in model.parameters()) == _meta("i3d_formula")["num_parameters"]


def test_audioclip_state_dict_matches_checkpoint_key_list(audio_state):
    model = AudioCLIPAudio()
    _assert_table(model.state_dict(), AUDIO_TABLE, AUDIOCLIP_PREFIX)
    assert sum(p.numel() for p in model.parameters()) == _meta("audioclip_formula")["num_audio_parameters"]
    # The constructor's window is the periodic Blackman-Harris one of the original.
    assert torch.equal(model.window, audio_state["audio.window"])


@pytest.mark.parametrize("name,table", [("i3d_formula", I3D_TABLE), ("audioclip_formula", AUDIO_TABLE)])
def test_formula_weights_reproduce_reference_digests(name, table, i3d_state, audio_state):
    state = i3d_state if name == "i3d_formula" else audio_state
    rows = fw.read_key_table(table)
    digest = _meta(name)["weights_digest"]
    assert fw.state_digest(state, rows, formula_only=True) == digest["formula_entries_sha256"]
    assert fw.state_digest(state, rows, formula_only=False) == digest["all_entries_sha256"]


# --- I3D ------------------------------------------------------------------------------------


def test_i3d_preprocessing_matches_reference(i3d_ref):
    pre = preprocess_for_i3d(i3d_ref["video_uint8"])
    assert pre.shape == (2, 3, 16, 224, 224) and pre.dtype == torch.float32
    tol = rb.I3D_INPUT_TOL  # float32 rounding of values in [-1, 1], see rounding_bounds
    torch.testing.assert_close(pre[0, :, 0, 0:8, 0:8], i3d_ref["pre_clip0_c_t0_r0-8_c0-8"], atol=tol, rtol=0)
    torch.testing.assert_close(
        pre[1, :, 15, 108:116, 108:116], i3d_ref["pre_clip1_c_t15_r108-116_c108-116"], atol=tol, rtol=0
    )
    stats = _meta("i3d_formula")["preprocessed"]
    assert pre[0].double().mean().item() == pytest.approx(stats["clip0_mean"], abs=tol)
    assert pre[0].double().std().item() == pytest.approx(stats["clip0_std_unbiased"], abs=tol)


def test_i3d_logits_match_reference(i3d, i3d_ref):
    pre = preprocess_for_i3d(i3d_ref["video_uint8"])
    with torch.inference_mode():
        pooled = i3d.pooled_features(pre)
        logits = i3d(pre)
    assert pooled.shape == (2, 1024, 1, 1, 1)
    assert logits.shape == (2, 400)
    for got, ref in ((pooled.flatten(1), i3d_ref["pool"]), (logits, i3d_ref["logits"])):
        # float32 rounding scaled to the size of the values (see rounding_bounds): ~2e-5 here.
        tol = rb.I3D_OUTPUT_C * rb.UNIT32 * ref.abs().max().item()
        torch.testing.assert_close(got, ref, atol=tol, rtol=0)


# --- AudioCLIP ------------------------------------------------------------------------------


def _batch8(audio_ref) -> torch.Tensor:
    t = torch.arange(AUDIOCLIP_SAMPLES, dtype=torch.float64) / 44_100
    tones = torch.stack(
        [torch.round(32768 * 0.3 * torch.sin(2 * math.pi * f * t + p)) / 32768 for f, p in EXTRA_TONES]
    )
    return torch.cat([audio_ref["waveform"].double(), tones])


@pytest.mark.parametrize("steps", [2, 3, 1654, 2048, 4097])
def test_filterbank_positions_are_rounded_once_on_every_cpu(steps):
    """The FBSP filter positions: each point of linspace(-1, 1) rounded once to float32 from its
    exact value, as the vectorised CPU kernel (and so the reference) computes them, also on CPUs
    whose scalar kernel rounds twice (ATEN_CPU_CAPABILITY=default)."""
    got = _linspace(-1.0, 1.0, steps, torch.float32, torch.device("cpu"))
    step = Fraction(float(torch.tensor(2.0) / (steps - 1)))
    exact = [
        Fraction(-1) + step * i if i < steps // 2 else Fraction(1) - step * (steps - 1 - i)
        for i in range(steps)
    ]
    # float() of these fractions is exact (they fit in 53 bits), then one rounding to float32.
    assert torch.equal(got, torch.tensor([float(x) for x in exact], dtype=torch.float64).float())
    if torch.backends.cpu.get_cpu_capability() != "DEFAULT":
        assert torch.equal(got, torch.linspace(-1.0, 1.0, steps))


def test_audioclip_front_end_matches_reference(audio_net, audio_ref):
    wave = audio_ref["waveform"].double()[:, None]  # the evaluator feeds (B, 1, L) float64
    torch.testing.assert_close(
        rescale_like_int16(wave[:, 0])[:, :16], audio_ref["scaled_first16"], atol=0, rtol=0
    )
    with torch.inference_mode():
        x_db = audio_net.log_power(wave)
    ref = audio_ref["x_db"]
    assert x_db.shape == ref.shape == (2, 1, 3, 341, 124)
    # Weak bins are float32 noise of the filterbank product; the README allows 0.1 dB there.
    torch.testing.assert_close(x_db, ref, atol=0.1, rtol=0)
    strong = ref > -150.0
    assert strong.float().mean() > 0.5
    torch.testing.assert_close(x_db[strong], ref[strong], atol=0.01, rtol=0)


def test_audioclip_trunk_matches_reference_from_reference_spectrogram(audio_net, audio_ref):
    # Isolates the ResNeXt trunk (batch-statistics BatchNorm, attention gates) from the
    # platform-dependent rounding of the front end. Batch of 2 is ill-conditioned: README atol.
    with torch.inference_mode():
        pooled = audio_net.pooled_features(audio_ref["x_db"])
        embedding = audio_net.fc(pooled)
    torch.testing.assert_close(pooled, audio_ref["reduction"], atol=2e-2, rtol=0)
    torch.testing.assert_close(embedding, audio_ref["embedding"], atol=2e-2, rtol=0)


def test_audioclip_embeddings_match_reference(audio_net, audio_ref):
    with torch.inference_mode():
        pair = audio_net(audio_ref["waveform"])
        batch8 = audio_net(_batch8(audio_ref)[:, None])
    torch.testing.assert_close(pair, audio_ref["embedding"], atol=2e-2, rtol=0)
    # The weak spectrogram bins carry float32 GEMM rounding that differs between CPUs; here
    # (and with a float64 product instead) it moves these embeddings by up to ~0.045.
    ref8 = audio_ref["embedding_batch8"]
    torch.testing.assert_close(batch8, ref8, atol=0.1, rtol=0)
    assert (batch8 - ref8).abs().mean() < 0.01


def test_audioclip_uses_batch_statistics_in_any_mode(audio_net, audio_ref):
    wave = audio_ref["waveform"][:, :20_000]  # any length works; short keeps it fast
    with torch.inference_mode():
        train_mode = audio_net.train()(wave)
        eval_mode = audio_net.eval()(wave)
        with pytest.raises(ValueError, match="more than 1 value per channel"):
            audio_net(wave[:1])
    torch.testing.assert_close(train_mode, eval_mode, atol=0, rtol=0)


# --- loading the original checkpoint layouts ---------------------------------------------------


def test_load_i3d_from_original_layout(tmp_path, i3d_state):
    path = tmp_path / "i3d_pretrained_400.pt"
    torch.save(dict(i3d_state), path)
    model = load_i3d(path)
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())
    for key, value in model.state_dict().items():
        assert torch.equal(value, i3d_state[key]), key
    # Files without the BatchNorm counters (older saves) load too.
    torch.save({k: v for k, v in i3d_state.items() if not k.endswith("num_batches_tracked")}, path)
    assert torch.equal(load_i3d(path).Mixed_5c.b3b.bn.running_var, i3d_state["Mixed_5c.b3b.bn.running_var"])


def test_load_i3d_refuses_mismatched_file(tmp_path, i3d_state):
    path = tmp_path / "bad.pt"
    torch.save({k: v for k, v in i3d_state.items() if k != "Mixed_4b.b1b.conv3d.weight"}, path)
    with pytest.raises(
        wt.EvalWeightsError, match=r"1 missing \(e\.g\. Mixed_4b\.b1b\.conv3d\.weight\)"
    ) as err:
        load_i3d(path)
    assert "\n" not in str(err.value)
    torch.save({"module." + k: v for k, v in i3d_state.items()}, path)
    with pytest.raises(wt.EvalWeightsError, match="344 unexpected"):
        load_i3d(path)


def test_load_audioclip_from_full_model_file(tmp_path, audio_state):
    full = dict(audio_state)
    # Parts of the full AudioCLIP file that the audio head ignores.
    full["visual.conv1.weight"] = torch.ones(32, 3, 3, 3)
    full["transformer.resblocks.0.attn.in_proj_weight"] = torch.ones(1536, 512)
    full["logit_scale_ai"] = torch.tensor(4.6)
    path = tmp_path / "AudioCLIP-Full-Training.pt"
    torch.save(full, path)
    model = load_audioclip_audio(path)
    for key, value in model.state_dict().items():
        assert torch.equal(value, audio_state[AUDIOCLIP_PREFIX + key]), key
    assert not any(p.requires_grad for p in model.parameters())


def test_load_audioclip_refuses_file_without_audio_head(tmp_path, audio_state):
    path = tmp_path / "esresnext.pt"
    torch.save({k.removeprefix(AUDIOCLIP_PREFIX): v for k, v in audio_state.items()}, path)
    with pytest.raises(wt.EvalWeightsError, match=r"missing \(e\.g\. audio\.conv1\.weight\)"):
        load_audioclip_audio(path)


class _Gadget:
    """Stands for any pickled Python object a weight file could smuggle in."""


@pytest.mark.parametrize(
    "payload,detail",
    [
        ({"conv.weight": torch.zeros(1), "epoch": 3}, "entry 'epoch' is a int"),
        ([torch.zeros(1)], "it holds list"),
        ({"conv.weight": _Gadget()}, "it references"),
    ],
)
def test_loaders_refuse_non_tensor_files(tmp_path, payload, detail):
    path = tmp_path / "odd.pt"
    torch.save(payload, path)
    for loader in (load_i3d, load_audioclip_audio):
        with pytest.raises(wt.EvalWeightsError, match=detail):
            loader(path)


def test_loaders_report_missing_file(tmp_path):
    with pytest.raises(wt.MissingWeightsError, match="not found"):
        load_i3d(tmp_path / "nothing.pt")


# --- weight-file resolution ---------------------------------------------------------------------


class _FakeResponse(io.BytesIO):
    def __init__(self, payload: bytes) -> None:
        super().__init__(payload)
        self.headers = {"Content-Length": str(len(payload))}


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    folder = tmp_path / "cache"
    monkeypatch.setenv(wt.CACHE_ENV, str(folder))

    def no_network(url):
        raise AssertionError(f"unexpected download of {url}")

    monkeypatch.setattr(wt, "_open_url", no_network)
    return folder


def test_explicit_path_then_cache_are_used_without_download(cache, tmp_path):
    assert wt.cache_dir() == cache
    mine = tmp_path / "elsewhere" / wt.I3D_FILE
    mine.parent.mkdir()
    mine.write_bytes(b"x")
    assert wt.i3d_weights(mine) == mine
    assert wt.i3d_weights(mine.parent) == mine  # a folder holding the file
    cache.mkdir()
    (cache / wt.AUDIOCLIP_FILE).write_bytes(b"y")
    assert wt.audioclip_weights() == cache / wt.AUDIOCLIP_FILE


def test_default_cache_folder(monkeypatch):
    monkeypatch.delenv(wt.CACHE_ENV, raising=False)
    assert wt.cache_dir() == Path("~/.cache/rflav").expanduser()


def test_missing_file_message_says_what_where_and_whence(cache, tmp_path):
    with pytest.raises(wt.MissingWeightsError) as err:
        wt.i3d_weights(offline=True)
    message = str(err.value)
    assert isinstance(err.value, ValueError) and "\n" not in message
    assert wt.I3D_FILE in message and str(cache / wt.I3D_FILE) in message
    assert wt.WEIGHTS[wt.I3D_FILE].url in message
    with pytest.raises(wt.MissingWeightsError, match=f"{wt.AUDIOCLIP_FILE} not found at"):
        wt.audioclip_weights(tmp_path / "nope.pt")


def test_download_is_checked_and_atomic(cache, monkeypatch):
    payload = b"weights" * 1000
    good = replace(wt.WEIGHTS[wt.I3D_FILE], sha256=hashlib.sha256(payload).hexdigest())
    monkeypatch.setitem(wt.WEIGHTS, wt.I3D_FILE, good)
    monkeypatch.setattr(wt, "_open_url", lambda url: _FakeResponse(payload))
    path = wt.i3d_weights(progress=False)
    assert path == cache / wt.I3D_FILE and path.read_bytes() == payload
    assert sorted(p.name for p in cache.iterdir()) == [wt.I3D_FILE]

    monkeypatch.setitem(
        wt.WEIGHTS, wt.AUDIOCLIP_FILE, replace(wt.WEIGHTS[wt.AUDIOCLIP_FILE], sha256="0" * 64)
    )
    with pytest.raises(wt.EvalWeightsError, match="expected 0000"):
        wt.audioclip_weights(progress=False)
    assert sorted(p.name for p in cache.iterdir()) == [wt.I3D_FILE]  # nothing half-written left


def test_failed_download_is_a_missing_file_error(cache, monkeypatch):
    def unreachable(url):
        raise wt.urllib.error.URLError("name resolution failed")

    monkeypatch.setattr(wt, "_open_url", unreachable)
    with pytest.raises(wt.MissingWeightsError, match="could not download .*name resolution failed"):
        wt.audioclip_weights(progress=False)
    assert list(cache.iterdir()) == []
