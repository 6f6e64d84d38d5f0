"""FLAV: the two-branch (video latents + mel) diffusion transformer of R-FLAV.

Parameter names equal those of the released checkpoints, so `model.safetensors` files load
as they are. Layouts:
  v: (B, T, C, H, W) video latents         a: (B, T, 1, n_mels, 10) mel columns per frame
  t: (B, T) model time in 1..1000          y: (B,) int64 class labels, or None
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import threading
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..config import FLAV_FLOAT_FIELDS, FLAV_SIZES, MEL_FRAMES_PER_FRAME, flav_config_problem
from ..errors import FileFormatError, RflavError, UsageError
from ..files import REDOWNLOAD, atomic_write, read_json_object
from ..hub import local_folder
from ..runtime import CudaGraphReplay, WorkerThread, is_compile_error, persist_compile_cache
from ..tensorfiles import load_safetensors, save_safetensors, state_dict_mismatch

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


@dataclass
class FLAVConfig:
    """Constructor arguments, exactly the keys of a release `config.json`."""

    latent_size: int = 32
    patch_size: int = 1
    in_channels: int = 4
    hidden_size: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    class_dropout_prob: float = 0.1
    num_classes: int = 0
    predict_frames: int = 10
    grad_ckpt: bool = False
    n_mels: int = 256
    audio_fr: int = 16000
    causal_attn: bool = True

    @classmethod
    def from_dict(
        cls, data: dict, source: str | os.PathLike | None = None, required: tuple[str, ...] = ()
    ) -> "FLAVConfig":
        """A config from the known keys of ``data`` (others are ignored), each checked for its
        type and range. ``source`` names the file the dict came from: its problems are then
        :class:`CheckpointFileError` naming it, otherwise :class:`UsageError`. ``required``
        keys must be present (a release config.json has every key that shapes the network)."""

        def refuse(problem: str) -> RflavError:
            if source is None:
                return UsageError(f"model config: {problem}")
            return CheckpointFileError(
                f"{source} (FLAV config) {problem}: fix it or pass another checkpoint folder"
            )

        missing = [k for k in required if k not in data]
        if missing:
            raise refuse(f"lacks the key(s) {', '.join(missing)}")
        values = {}
        for field in fields(cls):
            if field.name in data:
                problem = flav_config_problem(field.name, data[field.name])
                if problem is not None:
                    raise refuse(problem)
                value = data[field.name]
                values[field.name] = float(value) if field.name in FLAV_FLOAT_FIELDS else value
        config = cls(**values)
        if config.hidden_size % config.num_heads:
            raise refuse(f"hidden_size {config.hidden_size} is not divisible by num_heads {config.num_heads}")
        if config.latent_size % config.patch_size:
            raise refuse(
                f"latent_size {config.latent_size} is not divisible by patch_size {config.patch_size}"
            )
        if int(config.hidden_size * config.mlp_ratio) < 1:
            raise refuse(f"mlp_ratio {config.mlp_ratio} leaves the MLP without a hidden unit")
        return config

    @classmethod
    def from_size(cls, name: str, **overrides) -> "FLAVConfig":
        """A config from a size name such as ``"FLAV-B/1"`` plus any other field."""
        if name not in FLAV_SIZES:
            raise UsageError(f"unknown model size {name!r}; choose one of {', '.join(FLAV_SIZES)}")
        return cls(**{**FLAV_SIZES[name], **overrides})


# Config keys that shape the network's parameters: a checkpoint's config.json must give them.
ARCHITECTURE_KEYS = (
    "latent_size",
    "patch_size",
    "in_channels",
    "hidden_size",
    "depth",
    "num_heads",
    "mlp_ratio",
    "num_classes",
    "predict_frames",
    "n_mels",
)


class CheckpointFileError(FileFormatError):
    """A FLAV checkpoint file that cannot be read or does not describe a valid model."""


class CheckpointMismatchError(CheckpointFileError):
    """A state dict that does not fit the model it is loaded into."""


def check_state_dict(expected: dict[str, torch.Size], found: dict[str, torch.Tensor], what: str) -> None:
    """Raise one message naming every missing, unexpected and mis-shaped key."""
    mismatch = state_dict_mismatch(expected, found)
    if mismatch:
        raise CheckpointMismatchError(
            f"{what} does not match its config; "
            + mismatch.describe()
            + ": use the config.json that came with these weights or download the checkpoint again"
        )


# --------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------


def modulate(
    x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, out: torch.Tensor | None = None
) -> torch.Tensor:
    """adaLN modulation x·(1 + scale) + shift of per-frame tokens x (B, T, L, D) by (B, T, D)
    shift and scale, in one pass over x (written into `out` when given, whatever its strides)."""
    return torch.addcmul(shift.unsqueeze(2), x, 1 + scale.unsqueeze(2), out=out)


def gated_add(x: torch.Tensor, gate: torch.Tensor, update: torch.Tensor) -> torch.Tensor:
    """Gated residual x + gate·update with a per-frame (B, T, D) gate, in one pass."""
    return torch.addcmul(x, gate.unsqueeze(2), update)


def layer_norm(x: torch.Tensor) -> torch.Tensor:
    # Affine-free LayerNorm, eps 1e-6, as every norm of the model.
    return F.layer_norm(x, x.shape[-1:], eps=1e-6)


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection."""

    def __init__(self, dim: int, num_heads: int, causal: bool = False) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.causal = causal
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, length, dim = x.shape
        q, k, v = self.qkv(x).view(n, length, 3, self.num_heads, dim // self.num_heads).permute(2, 0, 3, 1, 4)
        out = attention(q, k, v, self.causal)
        return self.proj(out.transpose(1, 2).reshape(n, length, dim))


ATTENTION_BACKENDS = ("auto", "sdpa", "matmul")
_attention_backend = "auto"


def set_attention_backend(name: str) -> None:
    """How attention is computed: `sdpa` (PyTorch's fused kernels), `matmul` (batched matmuls
    and a softmax, inference only) or `auto` (matmul for bf16 inference on CPU, else sdpa)."""
    global _attention_backend
    if name not in ATTENTION_BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}: choose one of {', '.join(ATTENTION_BACKENDS)}")
    _attention_backend = name


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
    """Softmax attention of (N, heads, L, head_dim) queries, keys and values."""
    backend = _attention_backend
    if backend == "auto":
        backend = "matmul" if q.device.type == "cpu" and q.dtype == torch.bfloat16 else "sdpa"
    if backend == "matmul" and not torch.is_grad_enabled():
        return _matmul_attention(q, k, v, causal)
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal)


def _matmul_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
    """Attention as batched matmuls over chunks of heads (the softmax accumulates in float32).

    For bf16 on CPUs with a head size of 64, oneDNN's matmuls run about 1.7× faster than the
    fused CPU kernel of scaled_dot_product_attention. Eagerly, chunks of ≤ 2 M scores stay in
    cache and two reused buffers avoid a fresh (page-faulting) allocation per chunk; a
    compiled graph plans its own memory, so there the chunks are larger and functional."""
    n, heads, length, head_dim = q.shape
    total = n * heads
    q = (q * head_dim**-0.5).reshape(total, length, head_dim)
    k_t = k.reshape(total, length, head_dim).transpose(1, 2)
    v = v.reshape(total, length, head_dim)
    mask = torch.ones(length, length, dtype=torch.bool, device=q.device).triu_(1) if causal else None
    compiling = torch.compiler.is_compiling()
    chunk = min(total, max(1, (1 << (24 if compiling else 21)) // (length * length)))
    if compiling:
        outs = []
        for start in range(0, total, chunk):
            scores = torch.bmm(q[start : start + chunk], k_t[start : start + chunk])
            if mask is not None:
                scores = scores.masked_fill(mask, float("-inf"))
            outs.append(torch.bmm(scores.softmax(dim=-1), v[start : start + chunk]))
        return torch.cat(outs).view(n, heads, length, head_dim)

    out = torch.empty_like(q)
    scores_buffer = q.new_empty(chunk, length, length)
    probs_buffer = torch.empty_like(scores_buffer)
    for start in range(0, total, chunk):
        size = min(chunk, total - start)
        scores = torch.bmm(q[start : start + size], k_t[start : start + size], out=scores_buffer[:size])
        if mask is not None:
            scores.masked_fill_(mask, float("-inf"))
        probs = torch.softmax(scores, dim=-1, out=probs_buffer[:size])
        torch.bmm(probs, v[start : start + size], out=out[start : start + size])
    return out.view(n, heads, length, head_dim)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


def _silu_linear(dim: int, out: int) -> nn.Sequential:
    # Index 1 holds the Linear, matching the checkpoint key names (`….1.weight`).
    return nn.Sequential(nn.SiLU(), nn.Linear(dim, out))


class TimestepEmbedder(nn.Module):
    """Sinusoidal embedding of the (fractional) model time followed by a 2-layer MLP."""

    def __init__(self, hidden_size: int, frequency_size: int = 256) -> None:
        super().__init__()
        self.frequency_size = frequency_size
        self.mlp = nn.Sequential(
            nn.Linear(frequency_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size)
        )

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.frequency_size // 2
        # Always float32: bf16 cannot resolve t ≈ 1000 finely enough.
        freqs = torch.exp(
            -math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half
        )
        args = t.float()[:, None] * freqs[None]
        embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        return self.mlp(embedding.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class embeddings; the extra last row is the null class used for guidance."""

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float) -> None:
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + int(dropout_prob > 0), hidden_size)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        return self.embedding_table(labels)


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, in_channels: int, hidden_size: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class FLAVBlock(nn.Module):
    """Video: spatial then temporal attention; audio: one attention over all mel tokens;
    then each branch's MLP is modulated by the other branch's per-frame token average."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float, causal: bool) -> None:
        super().__init__()
        d = hidden_size
        self.video_spatial_attn = Attention(d, num_heads)
        self.video_temporal_attn = Attention(d, num_heads, causal=causal)
        self.audio_spatial_attn = Attention(d, num_heads, causal=causal)
        self.video_mlp = Mlp(d, int(d * mlp_ratio))
        self.audio_mlp = Mlp(d, int(d * mlp_ratio))
        self.video_adaLN_modulation = _silu_linear(d, 6 * d)
        self.audio_adaLN_modulation = _silu_linear(d, 3 * d)
        self.video_scale = _silu_linear(d, 3 * d)
        self.audio_scale = _silu_linear(d, 3 * d)
        self.v_avg_proj = nn.Sequential(nn.Linear(d, d))
        self.a_avg_proj = nn.Sequential(nn.Linear(d, d))

    def forward(
        self, v: torch.Tensor, a: torch.Tensor, v_c: torch.Tensor, a_c: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        b, t, length, d = v.shape
        shift_s, scale_s, gate_s, shift_t, scale_t, gate_t = self.video_adaLN_modulation(v_c).chunk(6, dim=-1)
        shift_a, scale_a, gate_a = self.audio_adaLN_modulation(a_c).chunk(3, dim=-1)

        # Video: attention within each frame, then across frames at each spatial position.
        x = modulate(layer_norm(v), shift_s, scale_s).reshape(b * t, length, d)
        v = gated_add(v, gate_s, self.video_spatial_attn(x).view(b, t, length, d))
        # The temporal branch works position-major (B, L, T, D). In inference the modulation
        # writes straight into that layout (out= has no autograd; a compiler fuses it anyway),
        # and the gated residual reads the result back strided: no separate transpose copies.
        if torch.is_grad_enabled() or torch.compiler.is_compiling():
            x = modulate(layer_norm(v), shift_t, scale_t).transpose(1, 2).contiguous()
        else:
            x = v.new_empty(b, length, t, d)
            modulate(layer_norm(v), shift_t, scale_t, out=x.transpose(1, 2))
        x = self.video_temporal_attn(x.view(b * length, t, d)).view(b, length, t, d)
        v = gated_add(v, gate_t, x.transpose(1, 2))

        # Audio: one sequence of T*10 mel tokens.
        x = modulate(layer_norm(a), shift_a, scale_a).flatten(1, 2)
        a = gated_add(a, gate_a, self.audio_spatial_attn(x).view(a.shape))

        # Cross-modal fusion: each branch's MLP is conditioned on the other's frame average.
        a_avg = self.a_avg_proj(a.mean(dim=2)) + v_c
        v_avg = self.v_avg_proj(v.mean(dim=2)) + a_c
        scale_v, shift_v, gate_v = self.video_scale(a_avg).chunk(3, dim=-1)
        scale_m, shift_m, gate_m = self.audio_scale(v_avg).chunk(3, dim=-1)
        v = gated_add(v, gate_v, self.video_mlp(modulate(layer_norm(v), shift_v, scale_v)))
        a = gated_add(a, gate_m, self.audio_mlp(modulate(layer_norm(a), shift_m, scale_m)))
        return v, a


class FinalLayer(nn.Module):
    def __init__(self, hidden_size: int, out_features: int) -> None:
        super().__init__()
        self.linear = nn.Linear(hidden_size, out_features)
        self.adaLN_modulation = _silu_linear(hidden_size, 2 * hidden_size)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.linear(modulate(layer_norm(x), shift, scale))


# --------------------------------------------------------------------------------------
# FLAV
# --------------------------------------------------------------------------------------


class FLAV(nn.Module):
    """Joint audio-video velocity model over a window of `predict_frames` frames."""

    def __init__(self, config: FLAVConfig | None = None, **kwargs) -> None:
        super().__init__()
        config = config or FLAVConfig(**kwargs)
        self.config = config
        c, d = config, config.hidden_size
        if d % c.num_heads:
            raise ValueError(f"hidden_size {d} is not divisible by num_heads {c.num_heads}")
        if c.latent_size % c.patch_size:
            raise ValueError(f"latent_size {c.latent_size} is not divisible by patch_size {c.patch_size}")
        num_patches = (c.latent_size // c.patch_size) ** 2

        # Parameters registered before sub-modules, as in the release state dict.
        self.video_spatial_pos_embed = nn.Parameter(torch.zeros(1, 1, num_patches, d))
        self.video_temporal_pos_embed = nn.Parameter(torch.zeros(1, c.predict_frames, 1, d))
        self.audio_spatial_pos_embed = nn.Parameter(torch.zeros(1, 1, MEL_FRAMES_PER_FRAME, d))
        self.audio_temporal_pos_embed = nn.Parameter(torch.zeros(1, c.predict_frames, 1, d))

        self.v_embedder = PatchEmbed(c.patch_size, c.in_channels, d)
        self.a_embedder = nn.Linear(c.n_mels, d)
        self.video_t_embedder = TimestepEmbedder(d)
        self.audio_t_embedder = TimestepEmbedder(d)
        if c.num_classes > 0:
            self.video_y_embedder = LabelEmbedder(c.num_classes, d, c.class_dropout_prob)
            self.audio_y_embedder = LabelEmbedder(c.num_classes, d, c.class_dropout_prob)
        self.blocks = nn.ModuleList(
            FLAVBlock(d, c.num_heads, c.mlp_ratio, c.causal_attn) for _ in range(c.depth)
        )
        self.video_final_layer = FinalLayer(d, c.patch_size**2 * c.in_channels)
        self.audio_final_layer = FinalLayer(d, c.n_mels)
        self.gradient_checkpointing = c.grad_ckpt
        self._compiled_blocks: list[nn.Module] | None = None  # not sub-modules: no state-dict keys
        self._compiled_graph: CudaGraphReplay | None = None
        self._on_compile_failure: Callable[[BaseException], None] | None = None
        self._compile_thread: WorkerThread | None = None
        self._compile_error: Exception | None = None
        self._compile_gate: threading.Event | None = None
        self._compiled_ready: threading.Event | None = (
            None  # made by compile_blocks (deepcopy-safe until then)
        )

    # -- properties -----------------------------------------------------------------------
    @property
    def window(self) -> int:
        """Frames in the rolling window (`predict_frames`)."""
        return self.config.predict_frames

    @property
    def num_classes(self) -> int:
        return self.config.num_classes

    @property
    def dtype(self) -> torch.dtype:
        return self.a_embedder.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.a_embedder.weight.device

    # -- inference speed ----------------------------------------------------------------------
    def compile_blocks(
        self,
        *,
        on_failure: Callable[[BaseException], None] | None = None,
        background: bool = False,
        hold: bool = False,
    ) -> "FLAV":
        """Compile the transformer blocks for inference (torch.compile, static shapes). The
        blocks are identical, so they share one compiled graph: compiling takes seconds rather
        than the minutes of the whole model, for nearly the same speed. On CUDA the compiled
        blocks then replay as one CUDA graph per thread (runtime.CudaGraphReplay), captured at
        the thread's first compiled forward: torch.compile's own CUDA graphs ("reduce-overhead")
        keep their state per thread and fail when one thread compiles and another replays.
        Calls that track gradients, or see fewer frames than the window, keep the eager blocks.

        Compilation happens in the first full-window forward, which waits for it; with
        `background`, that forward and the next ones run eagerly while a thread compiles on a
        copy of its inputs, and the compiled blocks take over once ready (:meth:`wait_compiled`).
        With `hold` as well, the thread starts only at a full-window forward after
        :meth:`start_compiling`: a pipeline calls it once its first frame is out, so compiling,
        which takes much of the interpreter's time, never delays that frame.

        If compiling fails (no C++ compiler, no Triton, ...) the error propagates, unless
        `on_failure` is given: then the eager blocks come back, `on_failure` gets the error, and
        all later forwards run eagerly."""
        persist_compile_cache()
        self._compiled_blocks = [torch.compile(block, dynamic=False) for block in self.blocks]
        # The blocks share one code object, compiled once per device, precision and shape they
        # meet (a copy per GPU in serve, guided batches twice as large): torch's default limit
        # of 8 versions would leave the rest eager.
        config = torch._dynamo.config
        config.recompile_limit = max(config.recompile_limit, 64)
        self._compiled_graph = CudaGraphReplay(self._run_compiled_blocks)
        self._on_compile_failure = on_failure
        self._compile_thread = None
        self._compile_error = None
        self._compiled_ready = threading.Event()
        if not background:
            self._compiled_ready.set()
        self._compile_gate = threading.Event()
        if not hold:
            self._compile_gate.set()
        return self

    def start_compiling(self) -> None:
        """Let a held background compilation start at the next full-window forward."""
        if self._compile_gate is not None:
            self._compile_gate.set()

    def uncompile_blocks(self) -> "FLAV":
        """Back to the eager blocks."""
        self._compiled_blocks = None
        self._compiled_graph = None
        self._on_compile_failure = None
        return self

    def wait_compiled(self, timeout: float | None = None) -> bool:
        """Wait for a background compilation (once a full-window forward has started it); True
        once the compiled blocks serve the next forward, False if they never will or it has not
        started."""
        if self._compiled_blocks is None:
            return False
        thread = self._compile_thread
        if thread is not None:
            thread.wait(timeout)
        return (
            self._compiled_ready.is_set()
            and self._compile_error is None
            and self._compiled_blocks is not None
        )

    def _compile_in_background(self, blocks: list[nn.Module], inference: bool, *inputs: torch.Tensor) -> None:
        # The thread's current CUDA device is the first GPU's until set: make it the model's.
        device = torch.cuda.device(inputs[0].device) if inputs[0].is_cuda else contextlib.nullcontext()
        # The caller's mode, which the compiled code is specialised for.
        no_grad = torch.inference_mode() if inference else torch.no_grad()
        try:
            with no_grad, device:
                self._run_blocks(blocks, *inputs)
        except Exception as err:  # noqa: BLE001 - handed to the forward that would use the blocks
            self._compile_error = err
        finally:
            self._compiled_ready.set()

    def _compiled_forward(
        self, v: torch.Tensor, a: torch.Tensor, v_c: torch.Tensor, a_c: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The blocks' forward through the compiled blocks once they are ready, eager until then."""
        # Read once: another thread (a stream of serve) may give the compiled blocks up meanwhile.
        blocks, graph = self._compiled_blocks, self._compiled_graph
        if blocks is None or graph is None:
            return self._run_blocks(self.blocks, v, a, v_c, a_c)
        if not self._compiled_ready.is_set():
            if self._compile_thread is None and self._compile_gate.is_set():
                inputs = [x.detach().clone() for x in (v, a, v_c, a_c)]
                # The interpreter waits for it at exit (a process that ends under a compiling
                # thread can crash on its way out, after its work is done).
                self._compile_thread = WorkerThread(
                    target=self._compile_in_background,
                    args=(blocks, torch.is_inference_mode_enabled(), *inputs),
                    name="rflav-compile",
                )
                self._compile_thread.start()
            return self._run_blocks(self.blocks, v, a, v_c, a_c)
        try:
            if self._compile_error is not None:
                raise self._compile_error
            return graph(v, a, v_c, a_c)
        except Exception as err:
            report = self._on_compile_failure
            if report is None or not is_compile_error(err):
                raise
            self._compile_error = None
            self.uncompile_blocks()
            report(err)
            return self._run_blocks(self.blocks, v, a, v_c, a_c)  # the blocks are pure: rerun

    def _run_compiled_blocks(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._run_blocks(self._compiled_blocks or self.blocks, *inputs)  # given up: eager

    @property
    def compiling(self) -> bool:
        """A background compilation is running."""
        thread = self._compile_thread
        return thread is not None and thread.is_alive()

    @property
    def blocks_compiled(self) -> bool:
        return self._compiled_blocks is not None

    # -- initialisation (training from scratch) ----------------------------------------------
    def initialize_weights(self) -> None:
        """DiT-style init: xavier linears, small embeddings, zeroed modulations and outputs."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        w = self.v_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.v_embedder.proj.bias)
        for p in (
            self.video_spatial_pos_embed,
            self.video_temporal_pos_embed,
            self.audio_spatial_pos_embed,
            self.audio_temporal_pos_embed,
        ):
            nn.init.zeros_(p)
        if self.num_classes > 0:
            nn.init.normal_(self.video_y_embedder.embedding_table.weight, std=0.02)
            nn.init.normal_(self.audio_y_embedder.embedding_table.weight, std=0.02)
        for emb in (self.video_t_embedder, self.audio_t_embedder):
            nn.init.normal_(emb.mlp[0].weight, std=0.02)
            nn.init.normal_(emb.mlp[2].weight, std=0.02)
        zeroed = [
            self.video_final_layer.linear,
            self.audio_final_layer.linear,
            self.video_final_layer.adaLN_modulation[1],
            self.audio_final_layer.adaLN_modulation[1],
        ]
        for block in self.blocks:
            zeroed += [
                block.video_adaLN_modulation[1],
                block.audio_adaLN_modulation[1],
                block.video_scale[1],
                block.audio_scale[1],
            ]
        for linear in zeroed:
            nn.init.zeros_(linear.weight)
            nn.init.zeros_(linear.bias)

    # -- forward ----------------------------------------------------------------------------
    def _conditioning(self, t: torch.Tensor, y: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        b, frames = t.shape
        flat_t = t.reshape(-1)
        v_c = self.video_t_embedder(flat_t).view(b, frames, -1)
        a_c = self.audio_t_embedder(flat_t).view(b, frames, -1)
        if self.num_classes > 0:
            if y is None:
                raise ValueError("this model is class-conditional: pass labels y")
            y = y.to(device=t.device, dtype=torch.long)
            if self.training and self.config.class_dropout_prob > 0:
                drop = torch.rand(y.shape, device=y.device) < self.config.class_dropout_prob
                y = torch.where(drop, torch.full_like(y, self.num_classes), y)
            v_c = v_c + self.video_y_embedder(y).unsqueeze(1)
            a_c = a_c + self.audio_y_embedder(y).unsqueeze(1)
        return v_c, a_c

    def forward(
        self, v: torch.Tensor, a: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Velocities (same layouts as v and a) for noisy inputs at per-frame model time t."""
        b, frames, channels, height, width = v.shape
        p = self.config.patch_size
        if frames > self.window:
            raise ValueError(f"{frames} frames given; this model's window is {self.window}")
        # Fewer frames than the window are the window's first frames (a causal model's
        # outputs for them do not depend on the rest).
        v = self.v_embedder(v.reshape(b * frames, channels, height, width).to(self.dtype))
        v = (
            v.view(b, frames, -1, v.shape[-1])
            + self.video_temporal_pos_embed[:, :frames]
            + self.video_spatial_pos_embed
        )
        a = self.a_embedder(a.squeeze(2).transpose(-1, -2).to(self.dtype))
        a = a + self.audio_temporal_pos_embed[:, :frames] + self.audio_spatial_pos_embed

        v_c, a_c = self._conditioning(t, y)
        grad = torch.is_grad_enabled()
        # Compiled blocks serve the full window only: one static shape, no recompilation for the
        # shorter windows of a causal pre-roll.
        if self._compiled_blocks is not None and not grad and frames == self.window:
            v, a = self._compiled_forward(v, a, v_c, a_c)
        else:
            v, a = self._run_blocks(self.blocks, v, a, v_c, a_c)

        v = self.video_final_layer(v, v_c)  # (B, T, L, p*p*C)
        h, w = height // p, width // p
        v = v.view(b, frames, h, w, p, p, channels).permute(0, 1, 6, 2, 4, 3, 5)
        v = v.reshape(b, frames, channels, height, width)
        a = self.audio_final_layer(a, a_c).transpose(-1, -2).unsqueeze(2)  # (B, T, 1, n_mels, 10)
        return v, a

    def _run_blocks(
        self,
        blocks: Iterable[nn.Module],
        v: torch.Tensor,
        a: torch.Tensor,
        v_c: torch.Tensor,
        a_c: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        checkpointed = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for block in blocks:
            if checkpointed:
                v, a = checkpoint(block, v, a, v_c, a_c, use_reentrant=False)
            else:
                v, a = block(v, a, v_c, a_c)
        return v, a

    def forward_with_cfg(
        self, v: torch.Tensor, a: torch.Tensor, t: torch.Tensor, y: torch.Tensor, cfg_scale: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Classifier-free guidance: conditional and null-class passes in one batch,
        returning ``uncond + cfg_scale * (cond - uncond)`` for both modalities."""
        if self.num_classes <= 0:
            raise ValueError("classifier-free guidance needs a class-conditional model")
        null = torch.full_like(y, self.num_classes)
        v_out, a_out = self.forward(
            torch.cat([v, v]), torch.cat([a, a]), torch.cat([t, t]), torch.cat([y, null])
        )
        v_cond, v_uncond = v_out.chunk(2)
        a_cond, a_uncond = a_out.chunk(2)
        return v_uncond + cfg_scale * (v_cond - v_uncond), a_uncond + cfg_scale * (a_cond - a_uncond)

    # -- release layout -----------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        path_or_repo_id: str | os.PathLike,
        dtype: torch.dtype | None = None,
        revision: str | None = None,
        device: torch.device | str | None = None,
    ) -> "FLAV":
        """Load a release-layout checkpoint (`config.json` + `model.safetensors`) from a
        local folder or a Hub repo id. Returns the model in eval mode."""
        folder = Path(path_or_repo_id)
        if not folder.is_dir():
            folder = local_folder(str(path_or_repo_id), [CONFIG_NAME, WEIGHTS_NAME], revision=revision)
        config_path, weights_path = folder / CONFIG_NAME, folder / WEIGHTS_NAME
        data = read_json_object(config_path, "FLAV config", error=CheckpointFileError)
        config = FLAVConfig.from_dict(data, source=config_path, required=ARCHITECTURE_KEYS)
        with torch.device("meta"):
            model = cls(config)
        state = load_safetensors(
            weights_path,
            "FLAV weights",
            error=CheckpointFileError,
            device=str(device) if device is not None else "cpu",
        )
        expected = {k: v.shape for k, v in model.state_dict().items()}
        check_state_dict(expected, state, f"{weights_path}")
        odd = sorted(k for k, v in state.items() if not v.is_floating_point())
        if odd:
            raise CheckpointFileError(
                f"{weights_path} (FLAV weights) holds non-float tensors ({', '.join(odd[:4])}): {REDOWNLOAD}"
            )
        if dtype is not None:
            state = {k: v.to(dtype) for k, v in state.items()}
        model.load_state_dict(state, assign=True)
        return model.eval()

    def save_pretrained(self, folder: str | os.PathLike) -> Path:
        """Write `config.json` + `model.safetensors` (the release layout), each atomically."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_safetensors(state, folder / WEIGHTS_NAME)
        text = json.dumps(asdict(self.config), indent=2, sort_keys=True) + "\n"
        atomic_write(folder / CONFIG_NAME, lambda path: Path(path).write_text(text))
        return folder
