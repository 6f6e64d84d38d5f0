"""Rolling rectified flow: schedules, the streaming sampler and the training loss.

Convention: t = 1 is data, t = 0 is noise; x_t = t·x₁ + (1−t)·ε and the velocity target is
x₁ − ε. The model sees t_rf = 999·t + 1 per frame. Frame k of a window of W frames is always
k/W "behind" frame 0, so after each rolling step frame 0 is clean and leaves the window while a
fresh noise frame enters at the back: an unbounded stream at a fixed cost per frame.

Everything here is a pure function of a *velocity* callable
``velocity(v, a, t_rf) -> (v_velocity, a_velocity)`` so that classifier-free guidance,
dtype/device handling and compilation stay outside the maths.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Literal

import torch

from .config import FLOW_T_EPS, FLOW_T_SCALE

Velocity = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
# Returns one fresh noise frame per modality: (B, C, H, W) video and (B, 1, n_mels, 10) audio.
FrameNoise = Callable[[], tuple[torch.Tensor, torch.Tensor]]


def model_time(t: torch.Tensor) -> torch.Tensor:
    """Flow time in [0, 1] → the model's time input in [1, 1000]."""
    return t * (FLOW_T_SCALE - FLOW_T_EPS) + FLOW_T_EPS


def _frame_index(window: int, device: torch.device | str | None = None) -> torch.Tensor:
    return torch.linspace(0, window - 1, window, device=device)


# ----------------------------------------------------------------------------------------
# Schedules
# ----------------------------------------------------------------------------------------


def preroll_levels(window: int, steps: int, i: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Pre-rolling step i of N = window·steps: per-frame levels t (W,) and step sizes dt (W,).

    The window starts as pure noise and is integrated until frame k sits at 1 − k/W.
    """
    n = window * steps
    k = _frame_index(window, device) / window
    t_now = torch.clamp(1 - (k + (n - i) / n), 0, 1)
    t_next = torch.clamp(1 - (k + (n - i - 1) / n), 0, 1)
    return t_now, torch.abs(t_next - t_now)


def rolling_levels(window: int, steps: int, i: int, device=None) -> torch.Tensor:
    """Per-frame levels t (W,) of inner step i of a rolling frame; every step is 1/(S·W)."""
    tau = (steps - i) / steps
    return 1 - (_frame_index(window, device) + tau) / window


def rolling_step_size(window: int, steps: int) -> float:
    return 1 / (steps * window)


def training_levels(tau: torch.Tensor, rolling: torch.Tensor, window: int) -> torch.Tensor:
    """Per-frame training levels (B, W) from τ ~ U(0,1) (B,) and the rolling flag (B,).

    Rolling windows mimic the steady state (frame k at 1 − (k+τ)/W); the others mimic the
    pre-roll (1 − (k/W + τ)), clamped away from 0 and 1.
    """
    k = _frame_index(window, tau.device).unsqueeze(0)
    tau = tau.reshape(-1, 1)
    t = torch.where(rolling.reshape(-1, 1).bool(), (k + tau) / window, k / window + tau)
    return torch.clamp(1 - t, 1e-6, 1 - 1e-6)


def logit_normal_density(t: torch.Tensor, mean: float = 0.0, std: float = 1.0) -> torch.Tensor:
    """Density of the logit-normal distribution, used as the per-frame loss weight."""
    logit = torch.log(t / (1 - t))
    return torch.exp(-((logit - mean) ** 2) / (2 * std**2)) / (std * math.sqrt(2 * math.pi) * t * (1 - t))


# ----------------------------------------------------------------------------------------
# Training loss
# ----------------------------------------------------------------------------------------


def sample_training_levels(
    batch: int,
    window: int,
    *,
    rolling_prob: float = 0.8,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Draw per-frame training levels (B, W): τ ~ U(0,1), rolling with probability 0.8."""
    tau = torch.rand(batch, device=device, generator=generator)
    rolling = torch.rand(batch, device=device, generator=generator) < rolling_prob
    return training_levels(tau, rolling, window)


def flow_matching_loss(
    velocity: Velocity,
    v: torch.Tensor,
    a: torch.Tensor,
    t: torch.Tensor,
    *,
    eps_v: torch.Tensor | None = None,
    eps_a: torch.Tensor | None = None,
    weighting: Literal["logit_normal", "uniform"] = "logit_normal",
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """Weighted rolling flow-matching loss of clean windows v (B,W,C,H,W), a (B,W,1,n_mels,10)
    at per-frame levels t (B, W). The noise is drawn from `generator` unless given.

    Returns ``loss`` (video + audio, each the mean over frames of weight × per-frame MSE),
    and the detached parts ``video`` and ``audio``.
    """
    b, window = v.shape[:2]
    if eps_v is None:
        eps_v = torch.randn(v.shape, device=v.device, generator=generator, dtype=v.dtype)
    if eps_a is None:
        eps_a = torch.randn(a.shape, device=a.device, generator=generator, dtype=a.dtype)
    weight = logit_normal_density(t) if weighting == "logit_normal" else torch.ones_like(t)
    tv = t.view(b, window, 1, 1, 1).to(v.dtype)
    pred_v, pred_a = velocity(tv * v + (1 - tv) * eps_v, tv * a + (1 - tv) * eps_a, model_time(t))
    per_frame_v = (pred_v.float() - (v - eps_v).float()).square().mean(dim=(2, 3, 4))
    per_frame_a = (pred_a.float() - (a - eps_a).float()).square().mean(dim=(2, 3, 4))
    loss_v = (per_frame_v * weight).mean()
    loss_a = (per_frame_a * weight).mean()
    return {"loss": loss_v + loss_a, "video": loss_v.detach(), "audio": loss_a.detach()}


# ----------------------------------------------------------------------------------------
# Sampling
# ----------------------------------------------------------------------------------------


def gaussian_frame_noise(
    v_frame_shape: tuple[int, ...],
    a_frame_shape: tuple[int, ...],
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> FrameNoise:
    """A FrameNoise drawing N(0, I) frames from `generator` (video first, then audio)."""

    def draw() -> tuple[torch.Tensor, torch.Tensor]:
        v = torch.randn(v_frame_shape, generator=generator, device=device, dtype=dtype)
        a = torch.randn(a_frame_shape, generator=generator, device=device, dtype=dtype)
        return v, a

    return draw


@dataclass
class Guide:
    """A modality that is given rather than generated (audio-to-video or video-to-audio).

    `frames` yields the given modality one clean frame at a time, in model space, shaped like
    one window slot: (B, C, H, W) for video, (B, 1, n_mels, 10) for audio. It may end: later
    frames are then generated jointly. At every model call the given frames are re-noised to
    their frame's level with a fixed ε (drawn from `generator`, on its device, then moved to the
    frames'), and the generated modality's Euler step is corrected by
    −dt·scale·∇ of the squared error between the true velocity x₁ − ε of the given frames and
    the model's prediction for them.
    """

    modality: Literal["video", "audio"]
    frames: Iterator[torch.Tensor]
    scale: float = 1.0
    generator: torch.Generator | None = None


class _GuideState:
    """Given frames (and their fixed noise) aligned with the sampler's window slots."""

    def __init__(self, guide: Guide, window: int) -> None:
        self.guide = guide
        self.clean: list[torch.Tensor | None] = []
        self.noise: list[torch.Tensor | None] = []
        for _ in range(window):
            self._push()

    def _push(self) -> None:
        frame = next(self.guide.frames, None)
        self.clean.append(frame)
        noise = None
        if frame is not None:
            # Drawn where the generator lives (a seeded CPU generator gives the same noise for
            # frames on any device), then moved to the frame.
            generator = self.guide.generator
            where = generator.device if generator is not None else frame.device
            noise = torch.randn(frame.shape, generator=generator, device=where, dtype=frame.dtype).to(
                frame.device
            )
        self.noise.append(noise)

    def shift(self) -> torch.Tensor | None:
        """Drop slot 0 (returning its clean frame) and pull the next given frame."""
        frame = self.clean.pop(0)
        self.noise.pop(0)
        self._push()
        return frame

    def known(self) -> list[int]:
        return [k for k, f in enumerate(self.clean) if f is not None]


def _moving_frames(window: int, steps: int, i: int) -> int:
    """How many leading frames pre-roll step i moves (dt > 0); every later frame has dt = 0."""
    moving = preroll_levels(window, steps, i)[1] > 0  # on the CPU: no wait for a GPU
    count = int(moving.sum())
    assert bool(moving[:count].all()), "the moving frames of a pre-roll step are a prefix"
    return count


def _euler_step(
    velocity: Velocity,
    v: torch.Tensor,
    a: torch.Tensor,
    t: torch.Tensor,
    dt: torch.Tensor | float,
    guide: _GuideState | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One Euler step of the whole window at per-frame levels t (W,)."""
    b, window = v.shape[:2]
    t_rf = model_time(t).unsqueeze(0).expand(b, window)
    if guide is None or not guide.known():
        pred_v, pred_a = velocity(v, a, t_rf)
        dt_ = dt.view(1, window, 1, 1, 1) if torch.is_tensor(dt) else dt
        return v + dt_ * pred_v, a + dt_ * pred_a

    given_is_video = guide.guide.modality == "video"
    given, generated = (v, a) if given_is_video else (a, v)
    known = guide.known()
    tk = t.view(1, window, 1, 1, 1).to(given.dtype)
    x1 = torch.stack([guide.clean[k] for k in known], dim=1)
    eps = torch.stack([guide.noise[k] for k in known], dim=1)
    given = given.clone()
    given[:, known] = tk[:, known] * x1 + (1 - tk[:, known]) * eps

    with torch.enable_grad():
        generated = generated.detach().requires_grad_(True)
        pred_v, pred_a = (
            velocity(given, generated, t_rf) if given_is_video else velocity(generated, given, t_rf)
        )
        pred_given, pred_generated = (pred_v, pred_a) if given_is_video else (pred_a, pred_v)
        error = (x1 - eps - pred_given[:, known]).float().square().mean()
        grad = torch.autograd.grad(error, generated)[0]

    dt_ = (
        dt.view(1, window, 1, 1, 1)
        if torch.is_tensor(dt)
        else torch.full((1, window, 1, 1, 1), dt, device=t.device)
    )
    # No correction on a step that lands a frame exactly on t = 1 (it leaves the window clean).
    correct = ((t + dt_.view(-1)) < 1 - 1e-6).view(1, window, 1, 1, 1).to(grad.dtype)
    generated = generated.detach() + dt_ * pred_generated.detach() - correct * dt_ * guide.guide.scale * grad
    given = given + dt_ * pred_given.detach()  # unknown slots evolve jointly; known ones are reset each call
    return (given, generated) if given_is_video else (generated, given)


def rolling_sample(
    velocity: Velocity,
    v_init: torch.Tensor,
    a_init: torch.Tensor,
    *,
    steps: int = 2,
    noise: FrameNoise | None = None,
    guide: Guide | None = None,
    causal: bool = False,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield clean (video latent (B,C,H,W), audio (B,1,n_mels,10)) frames forever.

    `v_init` (B,W,C,H,W) and `a_init` (B,W,1,n_mels,10) are the initial window noise. The first
    frame costs W·steps model calls (pre-roll), every later one `steps`. `noise` supplies the
    fresh frame appended after each emitted one (default: N(0, I) from the global RNG).

    `causal` says that the velocity's frame k depends only on frames ≤ k (a FLAV with causal
    attention, as released). Pre-roll step i only moves the frames k < (i+1)/steps, the others
    have dt = 0; the velocity is then evaluated on those leading frames alone, which gives the
    same result with about half the pre-roll's work.
    """
    if steps < 1:
        raise ValueError("steps must be at least 1")
    window = v_init.shape[1]
    device = v_init.device
    if noise is None:
        noise = gaussian_frame_noise(
            v_init.shape[:1] + v_init.shape[2:],
            a_init.shape[:1] + a_init.shape[2:],
            device=device,
            dtype=v_init.dtype,
        )
    state = _GuideState(guide, window) if guide is not None else None
    v, a = v_init, a_init

    # Grad mode is switched off around each piece of work, never across a `yield`: a suspended
    # generator must not leave the caller's autograd state changed.
    with torch.no_grad():
        for i in range(window * steps):
            t, dt = preroll_levels(window, steps, i, device)
            if causal and state is None:
                moving = _moving_frames(window, steps, i)
                v_head, a_head = _euler_step(
                    velocity, v[:, :moving], a[:, :moving], t[:moving], dt[:moving], None
                )
                v = torch.cat([v_head, v[:, moving:]], dim=1)
                a = torch.cat([a_head, a[:, moving:]], dim=1)
            else:
                v, a = _euler_step(velocity, v, a, t, dt, state)

    dt = rolling_step_size(window, steps)
    while True:
        with torch.no_grad():
            v_out, a_out = v[:, 0], a[:, 0]
            if state is not None:
                given = state.shift()
                if given is not None:  # emit the given modality exactly as it came in
                    if guide.modality == "video":
                        v_out = given
                    else:
                        a_out = given
            v_new, a_new = noise()
            v = torch.cat([v[:, 1:], v_new.unsqueeze(1)], dim=1)
            a = torch.cat([a[:, 1:], a_new.unsqueeze(1)], dim=1)
        yield v_out, a_out
        with torch.no_grad():
            for i in range(steps):
                v, a = _euler_step(velocity, v, a, rolling_levels(window, steps, i, device), dt, state)
