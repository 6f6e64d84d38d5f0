"""Model + VAE + vocoder → a stream of synchronized (video frame, audio chunk) pairs.

Nothing here keeps more than the rolling window, a few frames of vocoder context and the
frames waiting for their audio, so a stream can run for hours at constant memory.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import audio as audio_lib
from .config import (
    AUDIO_GUIDANCE_DEFAULT,
    FPS,
    LATENT_SCALE,
    MEL_FRAMES_PER_FRAME,
    SAMPLE_RATE,
    SAMPLES_PER_FRAME,
    VAE_DOWNSCALE,
    VIDEO_GUIDANCE_DEFAULT,
)
from .errors import FileFormatError, RflavError, UsageError
from .flow import Guide, rolling_sample
from .hub import (
    SIDE_FILE,
    VAE_REPO_ID,
    VOCODER_FILES,
    ResolvedModel,
    ResolveError,
    is_repo_id,
    local_folder,
    read_side_file,
    resolve_model,
)
from .models.autoencoder import AutoencoderKL
from .models.flav import FLAV
from .models.vocoder import GriffinLim, HiFiGAN, StreamingVocoder
from .requests import (
    GenerateRequest,
    check_frames,
    check_revision,
    check_seed,
    class_index,
    generate_frame_count,
)
from .runtime import (
    CudaGraphReplay,
    WorkerThread,
    compile_failure_reason,
    cpu_has_native_bf16,
    dtype_from_torch,
    pick_dtype,
    resolve_device,
    use_tf32,
)


class PipelineError(RflavError, ValueError):
    """A request the pipeline cannot serve (bad class, missing audio scale, …)."""


# ----------------------------------------------------------------------------------------
# Device and precision
# ----------------------------------------------------------------------------------------


def vae_dtype_for(device: torch.device, dtype: torch.dtype) -> torch.dtype:
    """The VAE follows the model's dtype on GPUs and on CPUs with native bf16 (twice as fast
    there as fp32); elsewhere it stays in fp32."""
    native = device.type == "cuda" or (
        device.type == "cpu" and dtype == torch.bfloat16 and cpu_has_native_bf16()
    )
    return dtype if native else torch.float32


# ----------------------------------------------------------------------------------------
# The stream
# ----------------------------------------------------------------------------------------


@dataclass
class AVFrame:
    """One output frame of every sample in the batch."""

    index: int
    video: np.ndarray  # (B, H, W, 3) uint8
    audio: np.ndarray  # (B, SAMPLES_PER_FRAME) float32 in [-1, 1]


def latents_to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Decoded frames (B, 3, H, W) in [-1, 1] → (B, H, W, 3) uint8, rounding as the original."""
    return torch.clamp(127.5 * images.float() + 128.0, 0, 255).to(torch.uint8).permute(0, 2, 3, 1)


class HostCopy:
    """A tensor on its way to host memory. On CUDA the copy is asynchronous, so sampling of
    the next frames is queued before anyone waits for this one (`numpy()` waits).

    `finite` (a one-element bool tensor on the tensor's device) travels along with it: whether
    the values it was made from were finite, which a conversion such as uint8 no longer shows."""

    def __init__(self, tensor: torch.Tensor, finite: torch.Tensor | None = None) -> None:
        self.event = None
        self._finite = finite
        if tensor.device.type == "cuda":
            self.host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
            self.host.copy_(tensor, non_blocking=True)  # queued on the tensor's device's current stream
            if finite is not None:
                self._finite = torch.empty((), dtype=torch.bool, pin_memory=True)
                self._finite.copy_(finite, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record(torch.cuda.current_stream(tensor.device))
        else:
            self.host = tensor.detach().to("cpu")
            if finite is not None:
                self._finite = finite.to("cpu")

    @property
    def finite(self) -> bool:
        """Whether the source values were all finite (True when not told); waits as `numpy()` does."""
        if self._finite is None:
            return True
        if self.event is not None:
            self.event.synchronize()
        return bool(self._finite)

    @property
    def shape(self) -> torch.Size:
        return self.host.shape

    def numpy(self) -> np.ndarray:
        if self.event is not None:
            self.event.synchronize()
        return self.host.numpy()


def to_device_async(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host tensor → `device` without waiting for the GPU. A plain copy from pageable memory
    waits until the GPU has finished all queued work, which would drain the queue at every
    frame; from pinned memory the copy is queued like a kernel."""
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def _per_sample_noise(
    generators: Sequence[torch.Generator],
    v_shape: tuple[int, ...],
    a_shape: tuple[int, ...],
    device: torch.device,
) -> Callable[[], tuple[torch.Tensor, torch.Tensor]]:
    # One CPU generator per sample: sample i is the same whatever the batch size or device.
    def draw() -> tuple[torch.Tensor, torch.Tensor]:
        v = torch.stack([torch.randn(v_shape, generator=g) for g in generators])
        a = torch.stack([torch.randn(a_shape, generator=g) for g in generators])
        return to_device_async(v, device), to_device_async(a, device)

    return draw


class Generation:
    """Iterator of :class:`AVFrame`. Audio lags video by the vocoder's look-ahead, so frames
    are held until their audio is final; :meth:`finish` releases them when stopping early."""

    def __init__(
        self,
        frames: Iterator[tuple[torch.Tensor, torch.Tensor]],
        decode: Callable[[torch.Tensor], HostCopy],
        vocoder: StreamingVocoder,
        audio_scale: float,
        num_frames: int | None,
        given_video: Iterator[np.ndarray] | None = None,
        given_audio: np.ndarray | None = None,
        output_stream: "torch.cuda.Stream | None" = None,
        on_first_frame: Callable[[], None] | None = None,
        source: str = "the checkpoint",
    ) -> None:
        self._source = source  # named when the model makes NaN
        self._frames = frames
        self._on_first_frame = on_first_frame
        self._output_stream = output_stream
        self._decode = decode
        self._vocoder = vocoder
        self._audio_scale = audio_scale
        self._num_frames = num_frames
        self._given_video = given_video
        self._given_audio = given_audio
        self._pending: deque[tuple[int, HostCopy | np.ndarray]] = deque()  # frames waiting for audio
        self._ready: deque[AVFrame] = deque()
        self._audio: deque[HostCopy | np.ndarray] = deque()  # (B, n) chunks not yet assigned
        self._audio_samples = 0
        self._produced = 0
        self._finished = False

    @property
    def frames_generated(self) -> int:
        return self._produced

    def __iter__(self) -> Iterator[AVFrame]:
        return self

    def __next__(self) -> AVFrame:
        while not self._ready:
            if self._finished:
                raise StopIteration
            if self._num_frames is not None and self._produced >= self._num_frames:
                self._stop()
            else:
                self._produce_one()
        if self._on_first_frame is not None:
            self._on_first_frame()
            self._on_first_frame = None
        return self._ready.popleft()

    def finish(self) -> list[AVFrame]:
        """Stop generating: vocode the remaining mel and return every frame not yet taken."""
        self._stop()
        out = list(self._ready)
        self._ready.clear()
        return out

    def _stop(self) -> None:
        if not self._finished:
            self._finished = True
            with self._on_output_stream():
                self._add_audio(self._vocoder.flush())
            self._collect()

    @contextmanager
    def _on_output_stream(self, *inputs: torch.Tensor) -> Iterator[None]:
        """Run VAE decoding and vocoding on their own CUDA stream, so that they overlap with
        the sampling of the next frames on the main stream."""
        if self._output_stream is None:
            yield
            return
        self._output_stream.wait_stream(torch.cuda.current_stream(self._output_stream.device))
        for tensor in inputs:  # the sampler may free these while this stream still reads them
            tensor.record_stream(self._output_stream)
        with torch.cuda.stream(self._output_stream):
            yield

    def _produce_one(self) -> None:
        v, a = next(self._frames)
        with self._on_output_stream(v, a):
            video = None
            if self._given_video is not None:
                given = next(self._given_video, None)
                if given is not None:
                    video = np.broadcast_to(given, (v.shape[0], *given.shape)).copy()
            if video is None:
                video = self._decode(v)
            mel = audio_lib.denormalize_log_mel(a[:, 0].float(), self._audio_scale)  # (B, n_mels, 10)
            self._pending.append((self._produced, video))
            self._produced += 1
            self._add_audio(self._vocoder.push(mel))
        self._collect()

    def _add_audio(self, samples: torch.Tensor) -> None:
        if samples.numel():
            self._audio.append(HostCopy(samples.float()))
            self._audio_samples += samples.shape[-1]

    def _take_audio(self, n: int) -> np.ndarray:
        parts, need = [], n
        while need:
            chunk = self._audio.popleft()
            chunk = chunk.numpy() if isinstance(chunk, HostCopy) else chunk
            if chunk.shape[-1] > need:
                self._audio.appendleft(chunk[:, need:])
                chunk = chunk[:, :need]
            parts.append(chunk)
            need -= chunk.shape[-1]
        self._audio_samples -= n
        return np.concatenate(parts, axis=1) if len(parts) > 1 else parts[0]

    def _not_finite(self, what: str, index: int) -> PipelineError:
        return PipelineError(
            f"the model produced NaN or infinite {what} at frame {index}: the weights of {self._source} "
            "are probably not finite (a training run that diverged saves NaN): use another checkpoint"
        )

    def _collect(self) -> None:
        while self._pending and self._audio_samples >= SAMPLES_PER_FRAME:
            index, video = self._pending.popleft()
            chunk = self._take_audio(SAMPLES_PER_FRAME)
            # Checked here, where frames reach the host: a NaN in the sound makes the encoder fail
            # later with no word on why, and one in the picture turns into black pixels.
            if not np.isfinite(chunk).all():
                raise self._not_finite("sound", index)
            if isinstance(video, HostCopy) and not video.finite:
                raise self._not_finite("video", index)
            if self._given_audio is not None:
                start = index * SAMPLES_PER_FRAME
                given = self._given_audio[start : start + SAMPLES_PER_FRAME]
                if given.size:  # the given waveform as it came in; past its end, the generated audio
                    chunk = chunk.copy()
                    chunk[:, : given.size] = given
            video = video.numpy() if isinstance(video, HostCopy) else video
            self._ready.append(AVFrame(index, video, np.ascontiguousarray(chunk, dtype=np.float32)))


@dataclass
class PipelineOutput:
    """A whole generated clip per seed, as returned by calling a :class:`Pipeline`."""

    frames: np.ndarray  # (B, T, H, W, 3) uint8
    audio: np.ndarray  # (B, T * SAMPLES_PER_FRAME) float32 in [-1, 1], mono
    fps: int = FPS
    sample_rate: int = SAMPLE_RATE


# ----------------------------------------------------------------------------------------
# Pipeline
# ----------------------------------------------------------------------------------------

GRIFFIN_LIM = "griffin-lim"  # rflav.json "vocoder" of checkpoints trained without a neural vocoder
HIFIGAN = "hifigan"


def _vocoder_of(
    resolved: ResolvedModel, side: dict, griffin_lim: bool, revision: str | None, offline: bool | None
) -> tuple[Path | None, str | None]:
    """The checkpoint's HiFi-GAN folder and where it came from, or (None, None) for Griffin-Lim.

    Never a silent fallback: a checkpoint that should have a vocoder/ and lacks (part of) it
    is an error that names the way out."""
    declared = side.get("vocoder")
    if declared is not None and declared not in (GRIFFIN_LIM, HIFIGAN):
        raise FileFormatError(
            f'{Path(resolved.folder) / SIDE_FILE}: "vocoder" must be "{GRIFFIN_LIM}" or '
            f'"{HIFIGAN}", got {declared!r}: fix or delete that key'
        )
    if griffin_lim or declared == GRIFFIN_LIM:
        return None, None
    folder = Path(resolved.folder)
    way_out = (
        "pass {griffin_lim} to make the sound with Griffin-Lim instead (lower quality; checkpoints "
        "trained with --vocoder none by older versions need it)"
    )
    if resolved.vocoder_folder is not None:
        found = resolved.vocoder_folder
    elif not Path(resolved.source).expanduser().is_dir() and is_repo_id(resolved.source):
        try:  # a Hub checkpoint: its vocoder files are fetched only when they are used
            found = (
                local_folder(
                    resolved.source, VOCODER_FILES, revision=resolved.revision or revision, offline=offline
                )
                / "vocoder"
            )
        except ResolveError as err:
            raise ResolveError(f"{err}; or {way_out}", params=("griffin_lim",)) from err
    else:
        names = [Path(f).name for f in VOCODER_FILES]
        if not (folder / "vocoder").is_dir():
            what = (
                f"{folder} has no vocoder/ ({', '.join(names)}) and its {SIDE_FILE} does not say "
                f'"vocoder": "{GRIFFIN_LIM}"'
            )
        else:
            missing = [
                n + (" (a folder, not a file)" if (folder / "vocoder" / n).exists() else "")
                for n in names
                if not (folder / "vocoder" / n).is_file()
            ]
            what = f"{folder / 'vocoder'} is incomplete: it lacks {', '.join(missing)}"
        raise ResolveError(
            f"{what}: copy the vocoder/ of the run it came from into it, or {way_out}",
            params=("griffin_lim",),
        )
    if Path(resolved.source).expanduser().is_dir():
        return found, str(found)
    return found, f"{resolved.source}/vocoder"


@dataclass
class Pipeline:
    """A loaded FLAV checkpoint with its autoencoder and vocoder, ready to stream."""

    model: FLAV
    vae: AutoencoderKL | None  # None: the model works in pixel space
    vocoder: HiFiGAN | GriffinLim
    audio_scale: float
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dtype: torch.dtype = torch.float32
    class_names: list[str] | None = None
    source: ResolvedModel | None = None
    vae_source: str = VAE_REPO_ID
    vocoder_source: str | None = None  # where the HiFi-GAN came from (None for Griffin-Lim)
    decode_batch: int = 8
    compile: bool = False
    overlap: bool = True  # CUDA: decode and vocode on a second stream, alongside sampling
    # Given: a failed compilation is not an error; the stream goes on eagerly and this gets the reason.
    on_compile_failure: Callable[[str], None] | None = None
    tf32: bool = True  # CUDA float32 products in TensorFloat-32, as the reference runs fp32
    # Compile on a thread while the first frames come from the eager blocks: no wait for the first frame.
    compile_in_background: bool = True
    # CUDA, not compiled: replay each full-window model call as a CUDA graph of the eager kernels.
    cuda_graph: bool = False

    def __post_init__(self) -> None:
        use_tf32(self.device, self.tf32)
        if self.compile and not self.model.blocks_compiled:
            self._compile_blocks()

    def _compile_blocks(self) -> None:
        fallback = None if self.on_compile_failure is None else self._compile_failed
        self.model.compile_blocks(
            on_failure=fallback,
            background=self.compile_in_background,
            hold=self.compile_in_background,  # started by each stream's first frame (Generation)
        )

    def _compile_failed(self, err: BaseException) -> None:
        self.compile = False
        if self.on_compile_failure is not None:
            self.on_compile_failure(compile_failure_reason(err))

    @property
    def vocoder_name(self) -> str:
        """What turns the mel into sound: "hifigan" (the checkpoint's) or "griffin-lim"."""
        return "griffin-lim" if isinstance(self.vocoder, GriffinLim) else "hifigan"

    @property
    def _overlaps(self) -> bool:
        return self.overlap and self.device.type == "cuda"

    @classmethod
    def from_pretrained(
        cls,
        model: str = "dance",
        *,
        vae: str | None = None,
        revision: str | None = None,
        offline: bool | None = None,
        audio_scale: float | None = None,
        device: str | torch.device | None = None,
        dtype: str | None = None,
        torch_dtype: torch.dtype | None = None,
        compile: bool = False,
        on_compile_failure: Callable[[str], None] | None = None,
        overlap: bool = True,
        griffin_lim: bool = False,
        tf32: bool = True,
        compile_in_background: bool = True,
        cuda_graph: bool = False,
    ) -> "Pipeline":
        """Resolve `model` (preset, Hub repo id or local folder) and load everything.

        The sound comes from the checkpoint's HiFi-GAN (`vocoder/`), or from Griffin-Lim when
        its rflav.json says ``"vocoder": "griffin-lim"`` (trained without a neural vocoder) or
        `griffin_lim` asks for it; a checkpoint whose vocoder files are missing is an error.
        `compile` compiles the transformer blocks for faster frames: on a thread while the first
        frames come from the eager blocks (`compile_in_background`), or in the first full-window
        step, which then waits for it. A failed compilation raises, unless `on_compile_failure` is
        given: then it gets the reason and the stream goes on eagerly.
        `overlap` (CUDA) decodes and vocodes on a second stream while the next frames sample.
        `cuda_graph` (CUDA, without `compile`) replays each full-window model call as a CUDA graph
        of the eager kernels, so the host queues one replay per call.
        On CUDA the compiled blocks (and with `cuda_graph` the model calls) replay as CUDA graphs
        that each generating thread captures for itself at its first full-window step; a graph
        holds the memory of one forward and is freed when its thread ends.
        `tf32` (CUDA) computes float32 matrix products in TensorFloat-32, as the reference code
        does (a process-wide torch setting); False keeps full float32.
        `device` is a name (auto, cpu, cuda, cuda:N, mps; None: auto) or a torch.device; the
        precision is either `torch_dtype` (torch.float32, torch.bfloat16, torch.float16) or
        `dtype` (auto, fp32, bf16, fp16; None: auto), not both."""
        if dtype is not None and torch_dtype is not None:
            raise UsageError(
                "give either {dtype} or {torch_dtype}, not both", params=("dtype", "torch_dtype")
            )
        check_revision(model, revision)
        resolved = resolve_model(model, revision=revision, offline=offline, need_vocoder=False)
        side = read_side_file(resolved.folder)
        scale = audio_scale if audio_scale is not None else resolved.audio_scale
        if scale is None:
            raise PipelineError(
                f"{model} does not say its audio scale: pass {{audio_scale}} "
                "(3.5009668382765917 for AIST++-trained models) or add it to rflav.json",
                params=("audio_scale",),
            )
        vocoder_folder, vocoder_source = _vocoder_of(resolved, side, griffin_lim, revision, offline)
        torch_device = resolve_device(device)
        torch_dtype = (
            dtype_from_torch(torch_dtype, torch_device)
            if torch_dtype is not None
            else pick_dtype(dtype or "auto", torch_device)
        )
        flav = FLAV.from_pretrained(resolved.folder, dtype=torch_dtype).to(torch_device)
        autoencoder, vae_id = None, "none"
        if not side.get("pixel_space"):
            vae_id = vae or resolved.autoencoder or VAE_REPO_ID
            autoencoder = AutoencoderKL.from_pretrained(
                vae_id, dtype=vae_dtype_for(torch_device, torch_dtype), revision=None
            ).to(torch_device)
        if vocoder_folder is not None:
            vocoder: HiFiGAN | GriffinLim = HiFiGAN.from_pretrained(vocoder_folder)
        else:
            vocoder = GriffinLim(flav.config.n_mels)
        return cls(
            model=flav,
            vae=autoencoder,
            vocoder=vocoder.to(torch_device),
            audio_scale=float(scale),
            device=torch_device,
            dtype=torch_dtype,
            class_names=resolved.class_names,
            source=resolved,
            vae_source=str(vae_id),
            vocoder_source=vocoder_source,
            compile=compile,
            on_compile_failure=on_compile_failure,
            overlap=overlap,
            tf32=tf32,
            compile_in_background=compile_in_background,
            cuda_graph=cuda_graph,
        )

    def to(
        self, device: str | torch.device | torch.dtype | None = None, dtype: torch.dtype | None = None
    ) -> "Pipeline":
        """Move model, VAE and vocoder to `device` and/or the model to `dtype` (a torch.dtype,
        also accepted as the only argument, as in ``pipe.to(torch.bfloat16)``); returns self.
        Streams started before keep the old placement: call this between streams."""
        if isinstance(device, torch.dtype):
            if dtype is not None:
                raise UsageError("give one dtype: as the first argument or as {dtype}", params=("dtype",))
            device, dtype = None, device
        new_device = self.device if device is None else resolve_device(device)
        new_dtype = self.dtype if dtype is None else dtype_from_torch(dtype, new_device, "dtype")
        if new_dtype == torch.float16 and new_device.type == "cpu":
            pick_dtype("fp16", new_device)  # raises: fp16 does not run on CPU
        if (new_device, new_dtype) == (self.device, self.dtype):
            return self
        self.model.to(new_device, new_dtype)
        if self.vae is not None:
            self.vae.to(new_device, vae_dtype_for(new_device, new_dtype))
        self.vocoder.to(new_device)
        self.device, self.dtype = new_device, new_dtype
        use_tf32(self.device, self.tf32)
        if self.model.blocks_compiled:  # compiled graphs (CUDA graphs on GPUs) belong to the old placement
            self._compile_blocks()
        return self

    def __call__(
        self,
        *,
        seconds: float | None = None,
        frames: int | None = None,
        seed: int | None = None,
        seeds: Sequence[int] | None = None,
        steps: int = 2,
        label: str | int | None = None,
        cfg_scale: float = 1.0,
        audio: np.ndarray | None = None,
        video: Iterator[np.ndarray] | None = None,
        guidance_scale: float | None = None,
    ) -> PipelineOutput:
        """Generate a whole clip per seed: `seconds` or `frames` (neither: the length of `audio`
        when given, else 10 s) from `seed` (default 0) or one clip per seed of `seeds`.
        The bounded form of :meth:`generate`, whose stream it collects."""
        if seed is not None and seeds is not None:
            raise UsageError("give either {seed} or {seeds}, not both", params=("seed", "seeds"))
        seeds = [0 if seed is None else check_seed(seed)] if seeds is None else list(seeds)
        if not seeds:
            raise UsageError("{seeds} must hold at least one seed", params=("seeds",))
        given_frames = None if audio is None else self._audio_frames(audio)
        num_frames = generate_frame_count(
            GenerateRequest(seconds=seconds, frames=frames), given_frames, given_param="audio"
        )
        stream = self.generate(
            num_frames=num_frames,
            seeds=seeds,
            steps=steps,
            label=label,
            cfg_scale=cfg_scale,
            audio=audio,
            video=video,
            guidance_scale=guidance_scale,
        )
        taken = list(stream)
        return PipelineOutput(
            frames=np.stack([f.video for f in taken], axis=1),
            audio=np.concatenate([f.audio for f in taken], axis=1),
        )

    # -- helpers ------------------------------------------------------------------------------
    @staticmethod
    def _audio_frames(audio: np.ndarray) -> int:
        """The frames a given waveform lasts (at least one), refused when it holds no samples."""
        if len(audio) == 0:
            raise UsageError("{audio} holds no samples: give a waveform with sound", params=("audio",))
        return max(1, round(len(audio) / SAMPLE_RATE * FPS))

    @property
    def _source_name(self) -> str:
        return f"checkpoint {self.source.source}" if self.source is not None else "the checkpoint"

    @property
    def window(self) -> int:
        return self.model.window

    @property
    def image_size(self) -> int:
        """Side of the output frames: latent size × 8 with the VAE, the model's size without."""
        return self.model.config.latent_size * (VAE_DOWNSCALE if self.vae is not None else 1)

    def class_index(self, name: str | int | None) -> int | None:
        """Label for a class-conditional model (name or index); None for unconditional ones."""
        if self.model.num_classes <= 0:
            if name is not None:
                raise PipelineError(
                    f"{{label}} {name}: this checkpoint is unconditional: drop {{label}}", params=("label",)
                )
            return None
        if name is None:
            raise PipelineError(
                "this checkpoint is class-conditional: pass {label} with one of "
                + ", ".join(self.class_names or [str(i) for i in range(self.model.num_classes)]),
                params=("label",),
            )
        names = self.class_names or []
        index = class_index(name, names, self.model.num_classes)
        if index is not None:
            return index
        valid = ", ".join(names or [str(i) for i in range(self.model.num_classes)])
        raise PipelineError(
            f"unknown class {name!r}: valid classes for {{label}} are {valid}", params=("label",)
        )

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> HostCopy:
        """Video latents (B, C, h, w) → uint8 frames (B, H, W, 3), on their way to the host."""
        if self.vae is None:
            return HostCopy(latents_to_uint8(latents), finite=torch.isfinite(latents).all())
        vae_dtype = next(self.vae.parameters()).dtype
        out, finite = [], []
        for chunk in latents.split(self.decode_batch):
            images = self.vae.decode(chunk.to(self.device, vae_dtype) / LATENT_SCALE)
            finite.append(torch.isfinite(images).all())
            out.append(latents_to_uint8(images))
        return HostCopy(torch.cat(out) if len(out) > 1 else out[0], finite=torch.stack(finite).all())

    @torch.no_grad()
    def encode_frames(self, frames: np.ndarray) -> torch.Tensor:
        """uint8 frames (N, H, W, 3) → scaled latents (N, C, h, w) (posterior mean)."""
        x = torch.from_numpy(np.ascontiguousarray(frames)).to(self.device).permute(0, 3, 1, 2)
        if self.vae is None:
            return x.float() / 127.5 - 1.0
        vae_dtype = next(self.vae.parameters()).dtype
        x = x.to(vae_dtype) / 127.5 - 1.0
        return self.vae.encode(x).mean.float() * LATENT_SCALE

    def audio_to_model_frames(self, wav: np.ndarray) -> torch.Tensor:
        """Waveform (N,) at 16 kHz → model-space mel frames (T, 1, n_mels, 10), T = ceil(N/1600)."""
        frames = max(1, -(-len(wav) // SAMPLES_PER_FRAME))
        padded = np.zeros(frames * SAMPLES_PER_FRAME, dtype=np.float32)
        padded[: len(wav)] = wav
        mel = audio_lib.log_mel(torch.from_numpy(padded))
        return audio_lib.mel_to_frames(audio_lib.normalize_log_mel(mel, self.audio_scale))

    def _velocity(self, label: int | None, batch: int, cfg_scale: float):
        model = self.model
        y = None if label is None else torch.full((batch,), label, dtype=torch.long, device=self.device)

        def velocity(v: torch.Tensor, a: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            """A plain, class-conditional or guided (batched CFG) forward."""
            if y is None:
                return model(v, a, t)
            if cfg_scale == 1.0:
                return model(v, a, t, y)
            return model.forward_with_cfg(v, a, t, y, cfg_scale)

        if self.cuda_graph and self.device.type == "cuda" and not self.compile:
            # The full window has one shape for the whole stream: one capture serves every frame.
            return CudaGraphReplay(velocity, lambda shape: shape[1] == model.window)
        return velocity

    def warm_up(self) -> None:
        """Pay a stream's one-time costs now: every pre-roll shape, the rolling step, VAE decoding
        and vocoding (kernel loading, algorithm choices, memory pools) and, with `compile`, the
        compilation, on a throwaway stream of batch 1 (and, for a class-conditional model, one
        with guidance, whose model calls have batch 2). A server calls this before it takes
        viewers, so that a viewer's first frames come at the steady speed. Outputs of later
        streams are unchanged (every draw comes from the seeds).

        It runs on a thread of its own: one-time costs paid there carry over to every thread,
        while the CUDA graph it captures is that thread's own and is freed with it."""
        failures: list[BaseException] = []
        stop = threading.Event()

        def run() -> None:
            try:
                with torch.cuda.device(self.device) if self.device.type == "cuda" else nullcontext():
                    self._throwaway_stream(stop)
            except BaseException as err:  # noqa: BLE001 - raised again by the caller's thread
                failures.append(err)

        thread = WorkerThread(target=run, name="rflav-warm-up")
        thread.start()
        try:
            thread.wait()
        except BaseException:  # Ctrl-C: the thread ends after the step it is in
            stop.set()
            thread.wait()
            raise
        if failures:
            raise failures[0]

    def _throwaway_stream(self, stop: threading.Event) -> None:
        label = 0 if self.model.num_classes > 0 else None
        # Guidance doubles the model's batch: a second shape to prepare (compiled here, not later).
        for cfg_scale in (1.0, 2.0) if label is not None else (1.0,):
            if stop.is_set():
                return
            generation = self.generate(num_frames=None, seeds=[0], label=label, cfg_scale=cfg_scale)
            # The pre-roll and the first rolling step; lets a held compilation start. With
            # `compile`: a full-window step starts the compiler, then the compiled blocks' first
            # run (on CUDA, a graph is captured there).
            for step in range(3 if self.compile else 1):
                if stop.is_set():
                    break
                if step == 2:
                    self.model.wait_compiled()
                next(generation)
            generation.finish()

    # -- generation ---------------------------------------------------------------------------
    def generate(
        self,
        *,
        num_frames: int | None,
        seeds: Sequence[int] = (0,),
        steps: int = 2,
        label: str | int | None = None,
        cfg_scale: float = 1.0,
        audio: np.ndarray | None = None,
        video: Iterator[np.ndarray] | None = None,
        guidance_scale: float | None = None,
    ) -> Generation:
        """Start a stream of ``num_frames`` frames (None = unbounded) for each seed.

        `audio` (waveform at 16 kHz) makes it audio-to-video and `video` (an iterator of uint8
        frames at 10 fps, IMAGE_SIZE²) video-to-audio; the given modality is passed through
        unchanged to the output. Every random draw, the guidance noise included, comes from CPU
        generators seeded with `seeds`, so a seed gives the same noise on every device.
        """
        if steps < 1:
            raise PipelineError(f"{{steps}} must be at least 1, got {steps}", params=("steps",))
        if num_frames is not None:
            check_frames(num_frames, "num_frames")
        seeds = [check_seed(s, "seeds") for s in seeds]
        if audio is not None and video is not None:
            raise PipelineError("give either {audio} or {video}, not both", params=("audio", "video"))
        if audio is not None:
            self._audio_frames(audio)
        index = self.class_index(label)
        batch = len(seeds)
        cfg = self.model.config
        latent = cfg.latent_size
        v_shape = (cfg.in_channels, latent, latent)
        a_shape = (1, cfg.n_mels, MEL_FRAMES_PER_FRAME)
        generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
        v0 = torch.stack([torch.randn((self.window, *v_shape), generator=g) for g in generators]).to(
            self.device
        )
        a0 = torch.stack([torch.randn((self.window, *a_shape), generator=g) for g in generators]).to(
            self.device
        )

        guide = None
        given_video = None
        if audio is not None:
            given = self.audio_to_model_frames(audio).to(self.device)
            guide = Guide(
                "audio",
                (f.unsqueeze(0).expand(batch, *f.shape) for f in given),
                scale=AUDIO_GUIDANCE_DEFAULT if guidance_scale is None else guidance_scale,
                generator=generators[0],
            )
        elif video is not None:
            video_frames, given_video = _tee(video)
            latents = (self.encode_frames(f[None])[0] for f in video_frames)
            guide = Guide(
                "video",
                (z.unsqueeze(0).expand(batch, *z.shape).to(self.device) for z in latents),
                scale=VIDEO_GUIDANCE_DEFAULT if guidance_scale is None else guidance_scale,
                generator=generators[0],
            )

        frames = rolling_sample(
            self._velocity(index, batch, cfg_scale),
            v0,
            a0,
            steps=steps,
            noise=_per_sample_noise(generators, v_shape, a_shape, self.device),
            guide=guide,
            # The pre-roll's leading-frames shortcut saves compute, which is the cost on CPUs. On
            # a GPU a short call costs about what a full one does (the host's launches), while each
            # new length may pay one-time kernel costs of its own: every call has the full window
            # (the same frames up to rounding; benchmarks/first_frame.py times both).
            causal=cfg.causal_attn and self.device.type != "cuda",
        )
        return Generation(
            frames,
            self.decode_latents,
            StreamingVocoder(self.vocoder),
            self.audio_scale,
            num_frames,
            given_video=given_video,
            given_audio=audio,
            output_stream=torch.cuda.Stream(self.device) if self._overlaps else None,
            # A held background compilation starts once the first frame is out (see _compile_blocks).
            on_first_frame=self.model.start_compiling if self.model.blocks_compiled else None,
            source=self._source_name,
        )


def _tee(frames: Iterator[np.ndarray]) -> tuple[Iterator[np.ndarray], Iterator[np.ndarray]]:
    """Split a frame iterator in two; the second yields what the first has already read."""
    buffer: deque[np.ndarray] = deque()

    def leader() -> Iterator[np.ndarray]:
        for frame in frames:
            buffer.append(frame)
            yield frame

    return leader(), _Follower(buffer)


class _Follower:
    def __init__(self, buffer: deque[np.ndarray]) -> None:
        self._buffer = buffer

    def __iter__(self) -> "_Follower":
        return self

    def __next__(self) -> np.ndarray:
        if not self._buffer:
            raise StopIteration
        return self._buffer.popleft()
