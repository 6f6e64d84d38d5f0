"""HiFi-GAN vocoder against the original R-FLAV generator fixtures (tests/fixtures/vocoder_tiny*)."""

from __future__ import annotations

import json
import pathlib
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rflav_cli.models.vocoder import CheckpointFormatError, HiFiGAN, StreamingVocoder

FIXTURES = Path(__file__).parent / "fixtures"
TINY = FIXTURES / "vocoder_tiny"

FULL_CONFIG = {
    "resblock": "1",
    "upsample_rates": [5, 4, 4, 2],
    "upsample_kernel_sizes": [11, 8, 8, 4],
    "upsample_initial_channel": 512,
    "resblock_kernel_sizes": [3, 7, 11],
    "resblock_dilation_sizes": [[1, 3, 5]] * 3,
    "num_mels": 256,
}
# Hop 160 like the released vocoder, with few channels to stay fast.
HOP160_CONFIG = {**FULL_CONFIG, "upsample_initial_channel": 16, "num_mels": 24}
# (k - u) odd in the first stage: padding (k-u)//2 + 1 with output_padding 1; type-2 resblocks.
ODD_CONFIG = {
    "resblock": "2",
    "upsample_rates": [3, 2],
    "upsample_kernel_sizes": [6, 4],
    "upsample_initial_channel": 16,
    "resblock_kernel_sizes": [3, 5],
    "resblock_dilation_sizes": [[1, 3], [1, 3]],
    "num_mels": 8,
}


@pytest.fixture(scope="module")
def ref() -> dict[str, torch.Tensor]:
    return load_file(FIXTURES / "vocoder_tiny.safetensors")


@pytest.fixture(scope="module")
def tiny() -> HiFiGAN:
    return HiFiGAN.from_pretrained(TINY)


def random_vocoder(config: dict, seed: int = 0) -> HiFiGAN:
    torch.manual_seed(seed)
    model = HiFiGAN(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model


def test_output_matches_reference(tiny: HiFiGAN, ref: dict[str, torch.Tensor]) -> None:
    assert tiny.hop_length == 4
    with torch.no_grad():
        wav = tiny(ref["in.mel"])
    assert wav.shape == ref["out.wav"].shape == (2, 1, 80)
    torch.testing.assert_close(wav, ref["out.wav"], atol=1e-5, rtol=1e-5)


def test_folded_weights_match_reference(tiny: HiFiGAN, ref: dict[str, torch.Tensor]) -> None:
    fused = {k.removeprefix("fused."): v for k, v in ref.items() if k.startswith("fused.")}
    state = tiny.state_dict()
    assert sorted(state) == sorted(fused)
    for key, value in fused.items():
        torch.testing.assert_close(state[key], value, atol=1e-6, rtol=1e-5, msg=key)


def test_full_config_keys_match_original_layout() -> None:
    rows = [line.split("\t") for line in (FIXTURES / "hifigan_full_keys.tsv").read_text().splitlines()[1:]]
    with torch.device("meta"):
        model = HiFiGAN(FULL_CONFIG)
        stored = model.weight_norm_state_dict()
    assert model.hop_length == 160
    assert [(k, json.loads(s), int(n)) for k, s, n in rows] == [
        (k, list(v.shape), v.numel()) for k, v in stored.items()
    ]
    assert len(stored) == 234
    assert sum(v.numel() for v in stored.values()) == 13_682_178
    assert sum(p.numel() for p in model.parameters()) == 13_672_065


def test_save_then_load_round_trip(tmp_path: Path) -> None:
    config = {**ODD_CONFIG, "sampling_rate": 16000}  # extra keys are kept, not used
    model = random_vocoder(config)
    model.save_pretrained(tmp_path / "vocoder")
    assert sorted(p.name for p in (tmp_path / "vocoder").iterdir()) == ["config.json", "vocoder.pt"]
    raw = torch.load(tmp_path / "vocoder" / "vocoder.pt", weights_only=True)
    assert set(raw) == {"generator"}
    assert all(not k.endswith(".weight") for k in raw["generator"])
    # A checkpoint root holding vocoder/ (the Hub layout) is accepted as well.
    for folder in (tmp_path / "vocoder", tmp_path):
        loaded = HiFiGAN.from_pretrained(folder)
        mel = torch.randn(1, 8, 12)
        with torch.no_grad():
            torch.testing.assert_close(loaded(mel), model(mel), atol=1e-6, rtol=1e-5)
        assert loaded.config == config


def test_saved_file_equals_official_format(
    tmp_path: Path, tiny: HiFiGAN, ref: dict[str, torch.Tensor]
) -> None:
    tiny.save_pretrained(tmp_path)
    ours = torch.load(tmp_path / "vocoder.pt", weights_only=True)["generator"]
    official = torch.load(TINY / "vocoder.pt", weights_only=True)["generator"]
    assert [(k, v.shape, v.dtype) for k, v in ours.items()] == [
        (k, v.shape, v.dtype) for k, v in official.items()
    ]
    for key, value in ours.items():
        if key.endswith(".weight_g"):
            # (g, v) is only defined up to v's scale: check that it folds to the fused reference.
            stem = key.removesuffix("_g")
            v = ours[stem + "_v"]
            torch.testing.assert_close(value, v.flatten(1).norm(dim=1).reshape(value.shape))
            torch.testing.assert_close(v, ref["fused." + stem], atol=1e-6, rtol=1e-5)
        elif key.endswith(".bias"):
            torch.testing.assert_close(value, official[key], atol=0, rtol=0)
    assert json.loads((tmp_path / "config.json").read_text()) == json.loads(
        (TINY / "config.json").read_text()
    )


def test_plain_weight_keys_are_accepted(tmp_path: Path, tiny: HiFiGAN) -> None:
    shutil.copy(TINY / "config.json", tmp_path / "config.json")
    torch.save({"generator": tiny.state_dict()}, tmp_path / "vocoder.pt")
    loaded = HiFiGAN.from_pretrained(tmp_path, dtype=torch.float64)
    assert loaded.conv_pre.weight.dtype == torch.float64
    torch.testing.assert_close(loaded.conv_pre.weight.float(), tiny.conv_pre.weight)


class _Touch:
    """Unpickling this would create a file: proof that loading never runs pickled code."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self):
        return (pathlib.Path.touch, (self.target,))


def test_non_tensor_pickle_is_refused(tmp_path: Path) -> None:
    shutil.copy(TINY / "config.json", tmp_path / "config.json")
    marker = tmp_path / "marker"
    torch.save({"generator": {"conv_pre.weight": _Touch(marker)}}, tmp_path / "vocoder.pt")
    with pytest.raises(CheckpointFormatError, match="not a plain tensor checkpoint") as info:
        HiFiGAN.from_pretrained(tmp_path)
    assert "\n" not in str(info.value)
    assert not marker.exists()
    # Allowed by weights_only, but still not a dict of tensors.
    torch.save({"generator": {"conv_pre.weight": "hello"}}, tmp_path / "vocoder.pt")
    with pytest.raises(CheckpointFormatError, match="not a plain tensor checkpoint"):
        HiFiGAN.from_pretrained(tmp_path)
    torch.save([1, 2], tmp_path / "vocoder.pt")
    with pytest.raises(ValueError, match="not a plain tensor checkpoint"):
        HiFiGAN.from_pretrained(tmp_path)


def test_mismatched_keys_are_named(tmp_path: Path) -> None:
    shutil.copy(TINY / "config.json", tmp_path / "config.json")
    state = torch.load(TINY / "vocoder.pt", weights_only=True)["generator"]
    del state["conv_post.bias"]
    state["extra.bias"] = torch.zeros(1)
    state["conv_pre.bias"] = torch.zeros(5)
    torch.save({"generator": state}, tmp_path / "vocoder.pt")
    with pytest.raises(CheckpointFormatError) as info:
        HiFiGAN.from_pretrained(tmp_path)
    msg = str(info.value)
    assert "missing: conv_post.bias" in msg
    assert "unexpected: extra.bias" in msg
    assert "mis-shaped: conv_pre.bias (file (5,), model (32,))" in msg
    assert "\n" not in msg


def test_missing_folder_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not found"):
        HiFiGAN.from_pretrained(tmp_path / "nowhere" / "deeper")


@pytest.mark.parametrize("name", ["my--vocoder/v1", "owner/voc.git", "-owner/voc"])
def test_missing_folder_that_is_no_repo_id_is_not_looked_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    """Names the Hub refuses as repo ids are missing folders, not Hub look-ups."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="vocoder folder not found"):
        HiFiGAN.from_pretrained(name)


def test_upsampling_lengths_for_both_padding_rules() -> None:
    for config in (HOP160_CONFIG, ODD_CONFIG):
        model = random_vocoder(config)
        with torch.no_grad():
            wav = model(torch.randn(2, config["num_mels"], 7))
        assert wav.shape == (2, 1, 7 * model.hop_length)
        assert wav.abs().max() <= 1


def _stream(model: HiFiGAN, mel: torch.Tensor, sizes: list[int]) -> tuple[torch.Tensor, int]:
    stream = StreamingVocoder(model)
    pieces, pos, most = [], 0, 0
    for n in sizes:
        piece = stream.push(mel[..., pos : pos + n])
        assert piece.shape[-1] == (stream.frames_emitted * model.hop_length) - sum(
            p.shape[-1] for p in pieces
        )
        pieces.append(piece)
        pos += n
        most = max(most, stream.buffered_frames)
    assert pos == mel.shape[-1]
    pieces.append(stream.flush())
    return torch.cat(pieces, dim=-1), most


@pytest.mark.parametrize("name", ["tiny", "hop160", "odd"])
@pytest.mark.parametrize("sizes", [[10] * 12, [1, 2, 3, 37, 7, 1, 30, 39]], ids=["even", "uneven"])
def test_streaming_equals_whole_mel(name: str, sizes: list[int], tiny: HiFiGAN) -> None:
    model = {"tiny": tiny, "hop160": random_vocoder(HOP160_CONFIG), "odd": random_vocoder(ODD_CONFIG)}[name]
    torch.manual_seed(1)
    mel = torch.randn(2, model.num_mels, sum(sizes)) * 2 - 4
    with torch.no_grad():
        whole = model(mel)[:, 0]
    streamed, most = _stream(model, mel, sizes)
    assert streamed.shape == whole.shape == (2, mel.shape[-1] * model.hop_length)
    torch.testing.assert_close(streamed, whole, atol=1e-5, rtol=0)
    left, right = model.receptive_field
    assert most <= left + right + max(sizes)


def test_streaming_memory_is_bounded(tiny: HiFiGAN) -> None:
    stream = StreamingVocoder(tiny)
    left, right = tiny.receptive_field
    total = 0
    for _ in range(60):
        total += stream.push(torch.randn(1, 16, 10)).shape[-1]
        assert stream.buffered_frames <= left + right + 10
    total += stream.flush().shape[-1]
    assert total == 600 * tiny.hop_length


def test_receptive_field_bounds_influence() -> None:
    for config in (HOP160_CONFIG, ODD_CONFIG):
        model = random_vocoder(config)
        left, right = model.receptive_field
        mel = torch.randn(1, config["num_mels"], 80)
        bumped = mel.clone()
        bumped[..., 40] += 5
        with torch.no_grad():
            changed = (model(bumped) - model(mel))[0, 0].abs() > 0
        frames = changed.nonzero().flatten() // model.hop_length
        # Frame t depends on t-left … t+right, so frame 40 reaches 40-right … 40+left.
        assert frames.min() >= 40 - right and frames.max() <= 40 + left
        assert frames.min() < 40 < frames.max()


@pytest.mark.parametrize("hz", [300.0, 1000.0, 1500.0])
def test_griffin_lim_keeps_the_pitch_of_a_tone(hz: float) -> None:
    """Checkpoints without a neural vocoder sound through Griffin-Lim, streamed frame by frame as
    generation does: a pure tone comes back with its frequency (the spectral peak of each
    0.1 s frame within one FFT bin of 10 Hz)."""
    from rflav_cli.audio import log_mel
    from rflav_cli.config import SAMPLE_RATE, SAMPLES_PER_FRAME
    from rflav_cli.models.vocoder import GriffinLim

    seconds = 2
    t = torch.arange(seconds * SAMPLE_RATE) / SAMPLE_RATE
    mel = log_mel(0.5 * torch.sin(2 * torch.pi * hz * t))
    mel = mel.reshape(1, mel.shape[-2], mel.shape[-1])
    stream = StreamingVocoder(GriffinLim(mel.shape[1]))
    chunks = [stream.push(mel[..., i : i + 10]) for i in range(0, mel.shape[-1], 10)] + [stream.flush()]
    wav = torch.cat([c for c in chunks if c.numel()], dim=-1)[0]
    assert wav.shape[-1] == seconds * SAMPLE_RATE
    frames = wav[SAMPLES_PER_FRAME:-SAMPLES_PER_FRAME].reshape(-1, SAMPLES_PER_FRAME)
    spectrum = torch.fft.rfft(frames * torch.hann_window(SAMPLES_PER_FRAME), dim=-1).abs()
    peaks = spectrum.argmax(dim=-1).float() * SAMPLE_RATE / SAMPLES_PER_FRAME
    assert torch.all((peaks - hz).abs() <= SAMPLE_RATE / SAMPLES_PER_FRAME), peaks
