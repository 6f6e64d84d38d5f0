"""Rolling rectified flow against the original sampler's recorded run and training levels."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import load_fixture, strip_prefix

from rflav_cli import flow
from rflav_cli.models.flav import FLAV, FLAVConfig

TOL = dict(atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def recorded():
    tensors, meta = load_fixture("sampler_tiny")
    model_tensors, _ = load_fixture("flav_tiny_causal")
    model = FLAV(FLAVConfig.from_dict(meta["sample"]["model_constructor_kwargs"])).eval()
    model.load_state_dict(strip_prefix(model_tensors))
    return tensors, model


def test_preroll_schedule_matches_reference(recorded):
    f, _ = recorded
    for i in range(8):
        t, dt = flow.preroll_levels(window=4, steps=2, i=i)
        torch.testing.assert_close(dt, f[f"preroll.{i}.dt"].view(4), **TOL)
        torch.testing.assert_close(t, f[f"preroll.{i}.t_partial"].view(4), **TOL)
        torch.testing.assert_close(flow.model_time(t), f[f"preroll.{i}.t_rf"].view(4), **TOL)


def test_preroll_ends_with_frame_k_at_one_minus_k_over_w():
    t, dt = flow.preroll_levels(window=10, steps=2, i=19)
    torch.testing.assert_close(t + dt, 1 - torch.arange(10) / 10, atol=1e-6, rtol=0)


def test_rolling_schedule_matches_reference(recorded):
    f, _ = recorded
    for i in range(2):
        torch.testing.assert_close(
            flow.model_time(flow.rolling_levels(4, 2, i)), f[f"rolling.{i}.t_rf"].view(4), **TOL
        )
    assert flow.rolling_step_size(4, 2) == pytest.approx(f["rolling.dt"].item())


def test_sampler_replays_reference_run(recorded):
    """All 7 frames and the inputs of all 20 model calls, with the recorded noise injected."""
    f, model = recorded
    y = f["y"]
    calls = []

    def velocity(v, a, t_rf):
        calls.append((v.clone(), a.clone(), t_rf.clone()))
        return model(v, a, t_rf, y)

    recorded_noise = iter([(f[f"noise.{2 * k:03d}"], f[f"noise.{2 * k + 1:03d}"]) for k in range(7)])
    frames = flow.rolling_sample(
        velocity, f["init.v"], f["init.a"], steps=2, noise=lambda: next(recorded_noise)
    )
    for k in range(7):
        v, a = next(frames)
        torch.testing.assert_close(v, f[f"frame.{k}.v"], **TOL)
        torch.testing.assert_close(a, f[f"frame.{k}.a"], **TOL)
    assert len(calls) == 8 + 6 * 2
    for n, (v_in, a_in, t_rf) in enumerate(calls):
        torch.testing.assert_close(v_in, f[f"call.{n:03d}.v_in"], **TOL)
        torch.testing.assert_close(a_in, f[f"call.{n:03d}.a_in"], **TOL)
        torch.testing.assert_close(t_rf, f[f"call.{n:03d}.t_rf"], **TOL)


def test_cfg_velocity_plugs_in(recorded):
    """Guidance is just another velocity callable; scale 1 equals the conditional model."""
    f, model = recorded
    y = f["y"]
    plain = flow.rolling_sample(
        lambda v, a, t: model(v, a, t, y),
        f["init.v"],
        f["init.a"],
        noise=lambda: (torch.zeros(1, 4, 8, 8), torch.zeros(1, 1, 16, 10)),
    )
    guided = flow.rolling_sample(
        lambda v, a, t: model.forward_with_cfg(v, a, t, y, 1.0),
        f["init.v"],
        f["init.a"],
        noise=lambda: (torch.zeros(1, 4, 8, 8), torch.zeros(1, 1, 16, 10)),
    )
    for _ in range(3):
        (v1, a1), (v2, a2) = next(plain), next(guided)
        torch.testing.assert_close(v1, v2, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(a1, a2, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("window", [4, 10])
def test_training_levels_and_weights_match_reference(recorded, window):
    f, _ = recorded
    weights = []
    for tw in (0.0, 0.3, 0.99):
        for rollout in (1, 0):
            key = f"train_t.w{window}.tw{tw:.2f}.rollout{rollout}"
            t = flow.training_levels(torch.tensor([tw]), torch.tensor([bool(rollout)]), window)[0]
            torch.testing.assert_close(t, f[f"{key}.t"], **TOL)
            torch.testing.assert_close(flow.model_time(t), f[f"{key}.t_rf"], **TOL)
            w = flow.logit_normal_density(t)
            torch.testing.assert_close(w, f[f"{key}.weight"], atol=0, rtol=1e-5)
            weights.append(w)
    # The loss with a zero model, data = 1 and noise = 0 is 2·mean(weight).
    rows = [(tw, r) for tw in (0.0, 0.3, 0.99) for r in (1, 0)]
    t = flow.training_levels(
        torch.tensor([r[0] for r in rows]), torch.tensor([bool(r[1]) for r in rows]), window
    )
    ones_v, ones_a = torch.ones(6, window, 1, 1, 1), torch.ones(6, window, 1, 1, 1)
    loss = flow.flow_matching_loss(
        lambda v, a, t_rf: (torch.zeros_like(v), torch.zeros_like(a)),
        ones_v,
        ones_a,
        t,
        eps_v=torch.zeros_like(ones_v),
        eps_a=torch.zeros_like(ones_a),
    )
    torch.testing.assert_close(loss["loss"], f[f"train_t.w{window}.loss_zero_model"], atol=0, rtol=1e-5)


def test_logit_normal_is_a_density():
    t = torch.linspace(1e-4, 1 - 1e-4, 200001, dtype=torch.float64)
    integral = torch.trapezoid(flow.logit_normal_density(t), t).item()
    assert integral == pytest.approx(1.0, abs=1e-3)
    assert flow.logit_normal_density(torch.tensor([0.5])).item() == pytest.approx(4 / math.sqrt(2 * math.pi))


def test_uniform_weighting_is_plain_mse():
    v = torch.randn(2, 3, 4, 2, 2)
    a = torch.randn(2, 3, 1, 4, 10)
    t = flow.sample_training_levels(2, 3, generator=torch.Generator().manual_seed(0))
    eps_v, eps_a = torch.randn_like(v), torch.randn_like(a)
    out = flow.flow_matching_loss(
        lambda x, y, t: (torch.zeros_like(x), torch.zeros_like(y)),
        v,
        a,
        t,
        eps_v=eps_v,
        eps_a=eps_a,
        weighting="uniform",
    )
    expected = (v - eps_v).square().mean() + (a - eps_a).square().mean()
    torch.testing.assert_close(out["loss"], expected)


def test_sample_training_levels_mix_rolling_and_preroll():
    t = flow.sample_training_levels(4000, 10, generator=torch.Generator().manual_seed(1))
    gaps = t[:, 0] - t[:, 9]
    rolling = (gaps - 0.9).abs() < 1e-4  # rolling windows span exactly 9/10
    assert 0.77 < rolling.float().mean() < 0.83
    assert bool(((t > 0) & (t < 1)).all())


def test_model_evaluations_per_frame(recorded):
    _, model = recorded
    count = 0

    def velocity(v, a, t):
        nonlocal count
        count += 1
        return torch.zeros_like(v), torch.zeros_like(a)

    frames = flow.rolling_sample(velocity, torch.randn(1, 4, 4, 8, 8), torch.randn(1, 4, 1, 16, 10), steps=3)
    for _ in range(5):
        next(frames)
    assert count == 4 * 3 + 4 * 3  # W·S for the first frame, S for each of the next four


def test_sampler_leaves_the_callers_grad_mode_alone():
    frames = flow.rolling_sample(
        lambda v, a, t: (torch.zeros_like(v), torch.zeros_like(a)),
        torch.randn(1, 2, 4, 2, 2),
        torch.randn(1, 2, 1, 4, 10),
        steps=1,
    )
    next(frames)
    assert torch.is_grad_enabled()
    next(frames)
    assert torch.is_grad_enabled()


def test_causal_preroll_evaluates_only_moving_frames_and_replays_reference(recorded):
    """With a causal model the pre-roll may skip the frames that do not move yet: the frames
    still equal the reference run, and the pre-roll evaluates 20 instead of 32 frame slots."""
    f, model = recorded
    y = f["y"]
    sizes = []

    def velocity(v, a, t_rf):
        sizes.append(v.shape[1])
        return model(v, a, t_rf, y)

    recorded_noise = iter([(f[f"noise.{2 * k:03d}"], f[f"noise.{2 * k + 1:03d}"]) for k in range(7)])
    frames = flow.rolling_sample(
        velocity, f["init.v"], f["init.a"], steps=2, causal=True, noise=lambda: next(recorded_noise)
    )
    for k in range(7):
        v, a = next(frames)
        torch.testing.assert_close(v, f[f"frame.{k}.v"], **TOL)
        torch.testing.assert_close(a, f[f"frame.{k}.a"], **TOL)
    assert sizes[:8] == [1, 1, 2, 2, 3, 3, 4, 4]  # window 4, 2 steps: frame k joins at step 2k
    assert sizes[8:] == [4] * 12  # rolling steps always see the whole window


def test_a_window_longer_than_the_model_is_refused(recorded):
    f, model = recorded
    with pytest.raises(ValueError, match="window is 4"):
        model(torch.zeros(1, 5, 4, 8, 8), torch.zeros(1, 5, 1, 16, 10), torch.ones(1, 5), f["y"])
