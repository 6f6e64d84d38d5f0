"""bf16 inference stays close to float32: one forward, the pre-roll, and the fp32 islands.

Bounds (relative L2 error, ‖x_bf16 − x_fp32‖ / ‖x_fp32‖):
  one forward of a small FLAV with trained-scale weights    ≤ 2e-2   (measured ≈ 7e-3)
  one forward of the reference's tiny model vs its output   ≤ 2e-2
  pre-roll (20 model calls) first frame                     ≤ 5e-3   (measured ≈ 1.2e-3)
  the same frame's displacement from its starting noise     ≤ 2e-2
"""

from __future__ import annotations

import itertools

import pytest
import torch
from conftest import load_fixture, strip_prefix

from rflav_cli.flow import rolling_sample
from rflav_cli.models.flav import FLAV, FLAVConfig

SMALL = dict(
    latent_size=32, patch_size=4, hidden_size=192, depth=4, num_heads=3, predict_frames=10, num_classes=4
)


def rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x.float() - ref.float()).norm() / ref.float().norm()).item()


@pytest.fixture(scope="module")
def models() -> tuple[FLAV, FLAV]:
    fp32 = FLAV(FLAVConfig(**SMALL)).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in fp32.parameters():  # the weight scale of a trained DiT-style model
            p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    bf16 = FLAV(FLAVConfig(**SMALL)).eval()
    bf16.load_state_dict(fp32.state_dict())
    return fp32, bf16.to(torch.bfloat16)


def test_bf16_forward_is_within_2e_2_of_fp32(models):
    fp32, bf16 = models
    assert bf16.dtype == torch.bfloat16
    g = torch.Generator().manual_seed(1)
    v = torch.randn(2, 10, 4, 32, 32, generator=g)
    a = torch.randn(2, 10, 1, 256, 10, generator=g)
    t = torch.rand(2, 10, generator=g) * 999 + 1
    y = torch.tensor([1, 3])
    with torch.no_grad():
        ref_v, ref_a = fp32(v, a, t, y)
        out_v, out_a = bf16(v, a, t, y)
    assert out_v.dtype == torch.bfloat16 and out_a.dtype == torch.bfloat16
    for out, ref in ((out_v, ref_v), (out_a, ref_a)):
        err = rel(out, ref)
        assert 1e-4 < err <= 2e-2, err  # > 1e-4: the forward really ran in bf16


def test_bf16_forward_of_reference_model_is_within_2e_2_of_its_output():
    tensors, meta = load_fixture("flav_tiny_causal")
    model = FLAV(FLAVConfig.from_dict(meta["constructor_kwargs"])).eval()
    model.load_state_dict(strip_prefix(tensors))
    model = model.to(torch.bfloat16)
    with torch.no_grad():
        v, a = model(tensors["in.v"], tensors["in.a"], tensors["in.t"], tensors["in.y"])
    assert rel(v, tensors["out.v"]) <= 2e-2
    assert rel(a, tensors["out.a"]) <= 2e-2


def _first_frames(
    model: FLAV, count: int
) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    v0 = torch.randn(1, 10, 4, 32, 32, generator=g)
    a0 = torch.randn(1, 10, 1, 256, 10, generator=g)

    def noise() -> tuple[torch.Tensor, torch.Tensor]:
        return torch.randn(1, 4, 32, 32, generator=g), torch.randn(1, 1, 256, 10, generator=g)

    y = torch.tensor([2])
    stream = rolling_sample(lambda v, a, t: model(v, a, t, y), v0, a0, steps=2, noise=noise)
    return list(itertools.islice(stream, count)), v0, a0


def test_bf16_preroll_output_is_close_to_fp32(models):
    fp32, bf16 = models
    ref, v0, a0 = _first_frames(fp32, 2)
    out, _, _ = _first_frames(bf16, 2)
    # The sampler keeps its state in float32 whatever the model's dtype.
    assert out[0][0].dtype == torch.float32
    (ref_v, ref_a), (out_v, out_a) = ref[0], out[0]
    assert rel(out_v, ref_v) <= 5e-3 and rel(out_a, ref_a) <= 5e-3
    # What the 20 pre-roll calls added to the starting noise, the part bf16 can disturb.
    assert rel(out_v - v0[:, 0], ref_v - v0[:, 0]) <= 2e-2
    assert rel(out_a - a0[:, 0], ref_a - a0[:, 0]) <= 2e-2
    # One rolling step later the stream is still on the fp32 trajectory.
    assert rel(out[1][0], ref[1][0]) <= 5e-3


def test_timestep_embedding_resolves_single_steps_in_bf16(models):
    _, bf16 = models
    # bf16 spaces representable numbers 4 apart near 1000: the sinusoids must see float32 time.
    t = torch.tensor([997.0, 998.0, 999.0, 1000.0])
    with torch.no_grad():
        emb = bf16.video_t_embedder(t).float()
    distances = torch.cdist(emb, emb)
    assert (distances + torch.eye(4) * 1e9).min() > 0
