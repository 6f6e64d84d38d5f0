"""Where and how the computation runs: device, precision, the compile policy, stop signals and
the torchrun group. Entry points resolve these once and pass `torch.device`/`torch.dtype` down.
"""

from __future__ import annotations

import functools
import os
import re
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from .errors import UsageError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# ----------------------------------------------------------------------------------------
# Device and precision
# ----------------------------------------------------------------------------------------


def _mps_available() -> bool:
    return getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()


def pick_device(name: str = "auto") -> torch.device:
    """`auto` → CUDA, else Apple MPS, else CPU. An explicit device must be available."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name not in ("cuda", "mps", "cpu") and not re.fullmatch(r"cuda:\d+", name):
        raise UsageError(
            f"unknown {{device}} {name!r}: use auto, cuda (or cuda:N), mps or cpu", params=("device",)
        )
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UsageError(
                f"{{device}} {name} was asked for but no CUDA GPU is visible; use cpu", params=("device",)
            )
        index = int(name.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise UsageError(
                f"{{device}} {name}: only {torch.cuda.device_count()} CUDA GPU(s) are visible "
                "(cuda:0 is the first)",
                params=("device",),
            )
    if name == "mps" and not _mps_available():
        raise UsageError("{device} mps was asked for but MPS is not available; use cpu", params=("device",))
    return torch.device(name)


def resolve_device(device: str | torch.device | None) -> torch.device:
    """A device name or torch.device, checked to be available (None: auto)."""
    if device is None:
        return pick_device("auto")
    if isinstance(device, torch.device):
        return pick_device(device.type if device.type != "cuda" or device.index is None else str(device))
    return pick_device(device)


@functools.cache
def cpu_has_native_bf16() -> bool:
    """True where the CPU computes bf16 matrix products natively (AVX512-BF16 or AMX)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(flag in flags.split() for flag in ("avx512_bf16", "amx_bf16"))


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    """`auto` → bf16 on CUDA and on CPUs with native bf16, fp32 elsewhere."""
    if name == "auto":
        if device.type == "cuda" or (device.type == "cpu" and cpu_has_native_bf16()):
            return torch.bfloat16
        return torch.float32
    if name not in DTYPES:
        raise UsageError(f"unknown {{dtype}} {name!r}: use auto, fp32, bf16 or fp16", params=("dtype",))
    if name == "fp16" and device.type == "cpu":
        raise UsageError("{dtype} fp16 is not supported on CPU: use bf16 or fp32", params=("dtype",))
    return DTYPES[name]


def dtype_from_torch(torch_dtype: object, device: torch.device, param: str = "torch_dtype") -> torch.dtype:
    """A precision given as a torch.dtype (the diffusers spelling), checked as `pick_dtype` checks
    names; `param` is the parameter that gave it, for the message."""
    names = {value: name for name, value in DTYPES.items()}
    if not isinstance(torch_dtype, torch.dtype) or torch_dtype not in names:
        raise UsageError(
            f"unknown {{{param}}} {torch_dtype!r}: use torch.float32, torch.bfloat16 or torch.float16",
            params=(param,),
        )
    return pick_dtype(names[torch_dtype], device)


def use_tf32(device: torch.device, enabled: bool = True) -> None:
    """float32 matrix products and convolutions on CUDA in TensorFloat-32 (10-bit mantissa
    products, float32 sums), as the reference code runs --dtype fp32; `enabled=False` keeps
    full float32. A process-wide setting of torch; nothing changes on other devices."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = enabled
        torch.backends.cudnn.allow_tf32 = enabled


@contextmanager
def tf32_scope(device: torch.device | None = None, enabled: bool | None = None) -> Iterator[None]:
    """Within: TF32 as `enabled` on CUDA (None: as it is); after: as it was before. For work
    that must neither change the process-wide setting nor be changed by it (a sample during
    training builds a pipeline; the evaluation networks run in full float32)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    if device is not None and enabled is not None:
        use_tf32(device, enabled)
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


# ----------------------------------------------------------------------------------------
# Compile policy
# ----------------------------------------------------------------------------------------


AUTO_COMPILE_MIN_FRAMES = 200


def compile_cache_dir() -> Path:
    """Where compiled kernels are kept between runs: $RFLAV_COMPILE_CACHE, else
    $XDG_CACHE_HOME/rflav/torch-compile (~/.cache/rflav/torch-compile)."""
    if os.environ.get("RFLAV_COMPILE_CACHE"):
        return Path(os.environ["RFLAV_COMPILE_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "rflav" / "torch-compile"


def persist_compile_cache() -> None:
    """Keep torch.compile's on-disk caches (Inductor's compiled graphs and kernels) in
    :func:`compile_cache_dir` instead of the temporary folder, which a reboot or a cleaner
    empties: a second run on the machine then starts from compiled code. A folder the user
    chose with TORCHINDUCTOR_CACHE_DIR is left alone. Call before the first compilation."""
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(compile_cache_dir()))


def auto_compile(device: torch.device, num_frames: int | None, guided: bool = False) -> bool:
    """Whether compiling pays off when nobody said: on CUDA, for streams of at least
    AUTO_COMPILE_MIN_FRAMES frames (or unbounded) without audio/video guidance. Compiling delays
    the first frame (most the very first time, while the compiler cache fills) and makes every
    later frame faster, which pays off over a long stream; guided steps need gradients and run
    eagerly anyway. On CPUs the gain is small for a long compile, so it stays opt-in.
    benchmarks/RESULTS.md has the measured costs and gains."""
    return (
        device.type == "cuda" and not guided and (num_frames is None or num_frames >= AUTO_COMPILE_MIN_FRAMES)
    )


def is_compile_error(err: BaseException) -> bool:
    """True for the errors of making the compiled blocks: torch.compile's when it cannot compile
    (no C++ compiler, …), and a CUDA graph that cannot be captured."""
    if isinstance(err, CudaGraphCaptureError):
        return True
    # `import torch` does not load the compiler stack; a compiler error means it is loaded.
    exc = sys.modules.get("torch._dynamo.exc")
    return exc is not None and isinstance(err, exc.TorchDynamoException)


def compile_failure_reason(err: BaseException) -> str:
    """The last line of a compilation error: the cause, without the compiler's traceback."""
    text = str(err).strip()
    return text.splitlines()[-1] if text else type(err).__name__


def compile_failure_message(err: BaseException) -> str:
    """One line for a compilation that was asked for (--compile) and failed: why, and the two
    ways out."""
    return (
        f"--compile failed ({compile_failure_reason(err)}); run without --compile, or install what "
        "torch.compile needs (a C++ compiler on CPU, Triton and a C compiler on GPUs)"
    )


def compile_skipped_message(reason: str, what: str = "compiling") -> str:
    """One line for a compilation chosen by default that failed: the run goes on without it."""
    return f"{what} failed ({reason}); continuing without it (--no-compile skips the attempt)"


class CudaGraphCaptureError(RuntimeError):
    """A function could not be captured as a CUDA graph (it synchronises with the host, draws
    random numbers, ...); the thread's stream is as it was before the attempt."""


_Captured = tuple["torch.cuda.CUDAGraph", list[torch.Tensor], tuple[torch.Tensor, ...]]
_CAPTURE_LOCK = threading.Lock()


@contextmanager
def _own_cublas_workspace() -> Iterator[None]:
    """cuBLAS keeps a workspace per (handle, stream) and a graph bakes in its address. Cleared
    before the capture, the graph's workspace is allocated in the graph's own memory pool;
    cleared after, no later product on a stream of the same number (streams come from a pool)
    shares it, nor frees it under the graph (torch's own graph capture does the same)."""
    clear = getattr(torch._C, "_cuda_clearCublasWorkspaces", None)
    if clear is not None:
        clear()
    try:
        yield
    finally:
        if clear is not None:
            clear()


class CudaGraphReplay:
    """Run a function of tensors as a CUDA graph of its kernels, one graph per input shape: the
    host queues one replay instead of hundreds of kernels, so the step's speed no longer follows
    the host CPU (capturing costs about three calls).

    `fn` must be capturable: the same kernels for the same shapes, no host synchronisation, no
    new random draws; eager kernels and torch.compile'd code compiled without CUDA graphs both
    are. Inputs are copied into the graph's own buffers and outputs copied out, so a caller may
    keep what it gets. Calls that track gradients, inputs off CUDA, and inputs whose first shape
    `graph_shape` rejects run `fn` directly.

    Each thread captures and replays its own graphs (they die with the thread): the static
    buffers of a graph cannot serve two threads at once, and a capture only forbids unsafe CUDA
    calls on its own thread, so another thread may decode or copy frames meanwhile."""

    def __init__(
        self,
        fn: Callable[..., tuple[torch.Tensor, ...]],
        graph_shape: Callable[[torch.Size], bool] = lambda shape: True,
    ) -> None:
        self.fn = fn
        self.graph_shape = graph_shape
        self._local = threading.local()

    def __call__(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if not self._replays(inputs):
            return self.fn(*inputs)
        graphs = self._thread_graphs()
        # Buffers made in inference mode cannot be written outside it (and vice versa for autograd).
        key = (torch.is_inference_mode_enabled(), *((x.shape, x.dtype, x.device) for x in inputs))
        if key not in graphs:
            graphs[key] = self._capture(inputs)
        graph, static_inputs, static_outputs = graphs[key]
        for buffer, x in zip(static_inputs, inputs):
            buffer.copy_(x, non_blocking=True)
        graph.replay()
        return tuple(out.clone() for out in static_outputs)

    def _replays(self, inputs: tuple[torch.Tensor, ...]) -> bool:
        return (
            not torch.is_grad_enabled()
            and inputs[0].device.type == "cuda"
            and self.graph_shape(inputs[0].shape)
        )

    def _thread_graphs(self) -> dict[tuple, _Captured]:
        graphs = getattr(self._local, "graphs", None)
        if graphs is None:
            graphs = self._local.graphs = {}
        return graphs

    def _capture(self, inputs: tuple[torch.Tensor, ...]) -> _Captured:
        device = inputs[0].device
        caller = torch.cuda.current_stream(device)
        static_inputs = [x.clone() for x in inputs]
        # The thread's own side stream (torch.cuda.graph's default one is shared by all threads).
        side = torch.cuda.Stream(device)
        side.wait_stream(caller)
        with torch.cuda.device(device), torch.cuda.stream(side):
            for _ in range(2):  # warm-up off the capture: lazy initialisation, workspaces
                self.fn(*static_inputs)
        caller.wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        try:
            # One capture at a time in the process: two threads' streams (serve) may not both be
            # capturing, nor one synchronise the device while another's capture begins.
            with (
                _CAPTURE_LOCK,
                torch.cuda.device(device),
                _own_cublas_workspace(),
                torch.cuda.graph(graph, stream=side, capture_error_mode="thread_local"),
            ):
                static_outputs = tuple(self.fn(*static_inputs))
        except RuntimeError as err:
            # A failed capture can leave the side stream current (torch.cuda.graph's exit stops
            # at the failing capture_end): give the caller back its stream.
            torch.cuda.set_stream(caller)
            raise CudaGraphCaptureError(f"CUDA graph capture failed: {err}") from err
        caller.wait_stream(side)
        return graph, static_inputs, static_outputs


# ----------------------------------------------------------------------------------------
# Stop requests (Ctrl-C, SIGTERM)
# ----------------------------------------------------------------------------------------


class WorkerThread(threading.Thread):
    """A thread that runs torch work: not a daemon (a process that ends while a thread is inside
    torch aborts), and whose end is waited for with :meth:`wait`, never with join() where a Ctrl-C
    may land: CPython up to 3.12 then marks the thread stopped while it still runs, stops waiting
    for it at exit, and the process aborts on its way out."""

    def __init__(self, target: Callable[..., object], name: str, args: tuple = ()) -> None:
        super().__init__(target=target, name=name, args=args, daemon=False)
        self.finished = threading.Event()

    def run(self) -> None:
        try:
            super().run()
        finally:
            self.finished.set()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until the target has returned or raised; False if `timeout` passed first."""
        return self.finished.wait(timeout)


class StopRequest(threading.Event):
    """Set by the first Ctrl-C or SIGTERM; `signum` says which signal asked."""

    signum: int | None = None


@contextmanager
def stop_on_signals() -> Iterator[StopRequest]:
    """First Ctrl-C / SIGTERM asks for a clean stop; a second one interrupts at once."""
    stop = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def handler(signum, frame):
        if stop.is_set():
            raise KeyboardInterrupt
        stop.signum = signum
        stop.set()

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


# ----------------------------------------------------------------------------------------
# torchrun
# ----------------------------------------------------------------------------------------


@dataclass
class Dist:
    """This process's place in the torchrun group (rank 0 of 1 without torchrun)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def rank_device(name: str) -> torch.device:
    """The device named, or under torchrun on CUDA this process's own GPU (LOCAL_RANK's, in
    turn when a node runs more processes than it has GPUs). A GPU chosen by number is made
    the current one: work queued without naming a device (events, streams) goes there too."""
    device = pick_device(name)
    if device.type == "cuda" and "LOCAL_RANK" in os.environ:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]) % torch.cuda.device_count())
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)
    return device


def check_one_process_per_gpu(device: torch.device) -> None:
    """Training keeps one process per GPU (NCCL refuses two ranks on one device)."""
    processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if device.type == "cuda" and processes > torch.cuda.device_count():
        gpus = torch.cuda.device_count()
        raise UsageError(
            f"torchrun started {processes} processes on this node, which has {gpus} visible "
            f"GPU(s): train with --nproc-per-node {gpus} or fewer"
        )


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


@contextmanager
def _stdout_to_stderr() -> Iterator[None]:
    """Gloo announces its connections on standard output, which belongs to the command's
    results (--json): send what is written there meanwhile to standard error."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def init_distributed(device: torch.device, backend: str | None = None) -> Dist:
    """Join the torchrun group when launched by torchrun: with `backend`, else NCCL on GPUs and
    gloo on CPU. Work that only exchanges small messages (sharded generation and evaluation)
    asks for gloo, which, unlike NCCL, lets several processes share one GPU."""
    if not launched_by_torchrun():
        return Dist()
    if not dist.is_initialized():
        if device.type == "cuda" and device.index is not None:
            torch.cuda.set_device(device)
        with _stdout_to_stderr():
            dist.init_process_group(backend=backend or ("nccl" if device.type == "cuda" else "gloo"))
    return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
