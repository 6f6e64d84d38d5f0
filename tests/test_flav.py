"""FLAV forward parity with the original model on random weights, and the release layout."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import FIXTURES, load_fixture, strip_prefix
from safetensors.torch import save_file

from rflav_cli.config import RELEASED_FLAV_CONFIG
from rflav_cli.models import flav as flav_module
from rflav_cli.models.flav import FLAV, CheckpointMismatchError, FLAVConfig

TOL = dict(atol=1e-5, rtol=1e-5)


def _model(name: str) -> tuple[FLAV, dict[str, torch.Tensor]]:
    tensors, meta = load_fixture(name)
    model = FLAV(FLAVConfig.from_dict(meta["constructor_kwargs"])).eval()
    model.load_state_dict(strip_prefix(tensors))
    return model, tensors


def test_causal_forward_matches_reference():
    model, f = _model("flav_tiny_causal")
    with torch.no_grad():
        v, a = model(f["in.v"], f["in.a"], f["in.t"], f["in.y"])
    assert v.shape == f["out.v"].shape and a.shape == f["out.a"].shape
    torch.testing.assert_close(v, f["out.v"], **TOL)
    torch.testing.assert_close(a, f["out.a"], **TOL)


def test_causal_cfg_matches_reference():
    model, f = _model("flav_tiny_causal")
    with torch.no_grad():
        v, a = model.forward_with_cfg(f["in.v"], f["in.a"], f["in.t"], f["in.y"], cfg_scale=2.5)
    torch.testing.assert_close(v, f["out_cfg.v"], **TOL)
    torch.testing.assert_close(a, f["out_cfg.a"], **TOL)


def test_uncond_bidirectional_forward_matches_reference():
    model, f = _model("flav_tiny_uncond")
    assert not hasattr(model, "video_y_embedder")
    with torch.no_grad():
        v, a = model(f["in.v"], f["in.a"], f["in.t"], None)
    torch.testing.assert_close(v, f["out.v"], **TOL)
    torch.testing.assert_close(a, f["out.a"], **TOL)


def test_causal_model_ignores_future_frames():
    model, f = _model("flav_tiny_causal")
    v2, a2 = f["in.v"].clone(), f["in.a"].clone()
    v2[:, 3] += 1.0
    a2[:, 3] -= 1.0
    with torch.no_grad():
        v, a = model(f["in.v"], f["in.a"], f["in.t"], f["in.y"])
        vp, ap = model(v2, a2, f["in.t"], f["in.y"])
    torch.testing.assert_close(vp[:, :3], v[:, :3], atol=0, rtol=0)
    torch.testing.assert_close(ap[:, :3], a[:, :3], atol=0, rtol=0)
    assert (vp[:, 3] - v[:, 3]).abs().max() > 1e-3


def _keys_tsv() -> list[tuple[str, tuple[int, ...], str]]:
    rows = []
    for line in (FIXTURES / "flav_b1_keys.tsv").read_text().splitlines()[1:]:
        key, shape, _numel, config = line.split("\t")
        rows.append((key, tuple(json.loads(shape)), config))
    return rows


@pytest.mark.parametrize("num_classes", [0, 10])
def test_released_config_state_dict_matches_key_list(num_classes):
    expected = {k: s for k, s, cfg in _keys_tsv() if num_classes or cfg == "num_classes=0"}
    with torch.device("meta"):
        model = FLAV(FLAVConfig.from_dict({**RELEASED_FLAV_CONFIG, "num_classes": num_classes}))
    found = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert found == expected
    meta = json.loads((FIXTURES / "flav_b1_keys.json").read_text())
    total = sum(v.numel() for v in model.state_dict().values())
    assert total == meta[f"num_params_num_classes_{num_classes}"]


def test_size_table():
    with torch.device("meta"):
        assert FLAVConfig.from_size("FLAV-B/1") == FLAVConfig.from_dict(RELEASED_FLAV_CONFIG)
        for name, depth, hidden, heads, patch in [
            ("FLAV-S/2", 12, 384, 6, 2),
            ("FLAV-L/1", 24, 1024, 16, 1),
            ("FLAV-L/4", 20, 1024, 16, 4),
            ("FLAV-XL/8", 28, 1152, 16, 8),
        ]:
            cfg = FLAVConfig.from_size(name, latent_size=32)
            assert (cfg.depth, cfg.hidden_size, cfg.num_heads, cfg.patch_size) == (
                depth,
                hidden,
                heads,
                patch,
            )
    with pytest.raises(ValueError, match="FLAV-B/1"):
        FLAVConfig.from_size("FLAV-S/1")


def test_patch_size_2_shapes_roundtrip():
    model = FLAV(
        FLAVConfig(
            latent_size=8,
            patch_size=2,
            hidden_size=32,
            depth=1,
            num_heads=2,
            predict_frames=3,
            n_mels=16,
            num_classes=0,
        )
    ).eval()
    v = torch.randn(2, 3, 4, 8, 8)
    a = torch.randn(2, 3, 1, 16, 10)
    with torch.no_grad():
        ov, oa = model(v, a, torch.full((2, 3), 500.0))
    assert ov.shape == v.shape and oa.shape == a.shape


def test_save_load_release_layout(tmp_path):
    model, f = _model("flav_tiny_causal")
    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    hub = json.loads((FIXTURES / "flav_tiny_causal_hub_layout.json").read_text())
    assert json.loads((tmp_path / "config.json").read_text()) == hub["config.json"]
    loaded = FLAV.from_pretrained(tmp_path)
    assert not loaded.training
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v)
    with torch.no_grad():
        v, a = loaded(f["in.v"], f["in.a"], f["in.t"], f["in.y"])
    torch.testing.assert_close(v, f["out.v"], **TOL)


def test_from_pretrained_reads_reference_written_files(tmp_path):
    """A folder as the original save_pretrained writes it: config + bare state-dict keys."""
    tensors, _ = load_fixture("flav_tiny_causal")
    hub = json.loads((FIXTURES / "flav_tiny_causal_hub_layout.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(hub["config.json"]))
    save_file(strip_prefix(tensors), str(tmp_path / "model.safetensors"))
    model = FLAV.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16 and model.num_classes == 3 and model.window == 4


def test_mismatched_checkpoint_names_keys(tmp_path):
    tensors = strip_prefix(load_fixture("flav_tiny_causal")[0])
    hub = json.loads((FIXTURES / "flav_tiny_causal_hub_layout.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(hub["config.json"]))
    del tensors["a_embedder.bias"]
    tensors["extra.weight"] = torch.zeros(1)
    tensors["a_embedder.weight"] = torch.zeros(64, 8)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointMismatchError) as err:
        FLAV.from_pretrained(tmp_path)
    message = str(err.value)
    assert "missing: a_embedder.bias" in message
    assert "unexpected: extra.weight" in message
    assert "a_embedder.weight (file (64, 8), model (64, 16))" in message
    assert "\n" not in message


@pytest.mark.parametrize(
    "name,compiled,backend",
    [
        ("flav_tiny_causal", False, "matmul"),
        ("flav_tiny_uncond", False, "matmul"),
        ("flav_tiny_causal", True, "matmul"),
    ],
)
def test_matmul_attention_backend_matches_reference(name, compiled, backend):
    """The batched-matmul attention (bf16 CPU inference default) is the same maths as SDPA,
    causal mask included: in float32 it reproduces the reference outputs, eagerly and in its
    compiled form (the one `--compile` runs on CPU)."""
    model, f = _model(name)
    y = f["in.y"] if model.num_classes > 0 else None
    forward = torch.compile(model, dynamic=False, fullgraph=True) if compiled else model
    flav_module.set_attention_backend(backend)
    try:
        with torch.no_grad():
            v, a = forward(f["in.v"], f["in.a"], f["in.t"], y)
    finally:
        flav_module.set_attention_backend("auto")
    torch.testing.assert_close(v, f["out.v"], **TOL)
    torch.testing.assert_close(a, f["out.a"], **TOL)
    with pytest.raises(ValueError, match="sdpa"):
        flav_module.set_attention_backend("flash")


def test_compiled_blocks_serve_only_calls_without_gradients():
    model, f = _model("flav_tiny_causal")
    model.compile_blocks()
    assert model.blocks_compiled and set(model.state_dict()) == set(
        _model("flav_tiny_causal")[0].state_dict()
    )

    def unusable(*args):
        raise RuntimeError("compiled block called")

    model._compiled_blocks = [unusable] * len(model.blocks)
    v = f["in.v"].clone().requires_grad_(True)
    out_v, _ = model(v, f["in.a"], f["in.t"], f["in.y"])  # gradients tracked: eager blocks
    out_v.sum().backward()
    assert v.grad is not None and v.grad.abs().sum() > 0
    torch.testing.assert_close(out_v.detach(), f["out.v"], **TOL)
    with torch.no_grad(), pytest.raises(RuntimeError, match="compiled block called"):
        model(f["in.v"], f["in.a"], f["in.t"], f["in.y"])
    # Fewer frames than the window (a causal pre-roll) also stay eager: no recompiling per length.
    with torch.no_grad():
        short_v, _ = model(f["in.v"][:, :2], f["in.a"][:, :2], f["in.t"][:, :2], f["in.y"])
    torch.testing.assert_close(short_v, f["out.v"][:, :2], **TOL)  # causal: the prefix's outputs


def test_a_block_run_that_cannot_be_captured_falls_back_to_eager_when_asked():
    """Compiled blocks replay as a CUDA graph on GPUs; if the capture fails and the caller gave
    `on_failure`, it hears why once and this forward and the later ones run eagerly."""
    from rflav_cli.runtime import CudaGraphCaptureError

    model, f = _model("flav_tiny_causal")
    reports: list[BaseException] = []
    model.compile_blocks(on_failure=reports.append)

    def uncapturable(*inputs):
        raise CudaGraphCaptureError("CUDA graph capture failed: operation not permitted")

    model._compiled_graph = uncapturable
    with torch.no_grad():
        v, a = model(f["in.v"], f["in.a"], f["in.t"], f["in.y"])
        assert [str(r) for r in reports] == ["CUDA graph capture failed: operation not permitted"]
        assert not model.blocks_compiled
        torch.testing.assert_close(v, f["out.v"], **TOL)
        torch.testing.assert_close(a, f["out.a"], **TOL)
        model(f["in.v"], f["in.a"], f["in.t"], f["in.y"])
    assert len(reports) == 1

    model.compile_blocks()  # no on_failure: the error is the caller's
    model._compiled_graph = uncapturable
    with torch.no_grad(), pytest.raises(CudaGraphCaptureError):
        model(f["in.v"], f["in.a"], f["in.t"], f["in.y"])
