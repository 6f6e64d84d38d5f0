"""`rflav serve`: generate and watch live, in a browser or in any player.

A small HTTP server (Starlette on uvicorn) with the models loaded once at start:

* ``GET /``: the page, to pick a model, class, seed and guidance and watch the stream;
* ``GET /models``: the models offered and their classes, as JSON;
* ``GET /stream.mp4?model=NAME&seed=S&class=C&cfg_scale=G``: an endless fragmented MP4 (H.264 +
  AAC) of one new generation, which any player can open (``ffplay URL``);
* ``GET /status``: the generations running, as JSON.

Clients choose only among the models given at start, by name. At most ``max_streams``
generations run at once (by default one per device); more get HTTP 503 with the reason. With
several GPUs (``--device auto`` or ``cuda``) each model is loaded once per GPU and a new
generation goes to a GPU with none running, else to the least busy one. Each generation runs in
its own thread and writes into a :class:`~rflav_cli.media.VideoWriter` whose MP4 comes out of a
pipe that the event loop reads with a bounded buffer: a client that reads slowly holds back the
generation instead of growing memory, and one that disconnects stops it at once.
"""

from __future__ import annotations

import asyncio
import ipaddress
import secrets
import socket
import sys
import threading
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import partial
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import quote

import torch
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from .errors import RflavError, UsageError
from .hub import PRESETS
from .media import PIPE, OutputClosed, VideoWriter
from .pipeline import Pipeline
from .requests import ServeRequest, check_serve_request, class_index, is_loopback_host
from .runtime import (
    WorkerThread,
    auto_compile,
    compile_failure_message,
    compile_skipped_message,
    is_compile_error,
    pick_device,
    pick_dtype,
    stop_on_signals,
)

__all__ = [
    "DevicePlacement",
    "LiveStream",
    "ServedModel",
    "StreamLimit",
    "build_app",
    "load_served_models",
    "page_url",
    "prepare_serve",
    "run_serve",
    "serve_devices",
]

# Bytes the event loop holds from one generation's pipe before it stops reading (then ffmpeg,
# and behind it the generation, wait for the client).
_READ_LIMIT = 1 << 14
_CHUNK = 1 << 14
# Kernel send buffer of each connection (inherited from the listening socket): without a cap
# Linux grows it to megabytes, minutes of video generated ahead of a client that does not read.
# This still carries about 10 Mbit/s over a 100 ms round trip.
_SEND_BUFFER = 1 << 16
_MAX_SEED = 2**63 - 1
_STREAM_PARAMS = {"model", "seed", "class", "cfg_scale", "token"}
_GRACEFUL_SHUTDOWN_S = 3
_STREAM_HEADERS = {
    "content-type": "video/mp4",
    "cache-control": "no-store",
    "x-content-type-options": "nosniff",
}


def _log(message: str) -> None:
    print(f"rflav: {message}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------
# Models and generations
# ----------------------------------------------------------------------------------------


@dataclass
class ServedModel:
    """A model loaded once per device that streams run on, and the name clients choose it by."""

    name: str
    pipes: dict[str, Pipeline]  # device name (as DevicePlacement knows it) -> the copy loaded there

    @property
    def pipe(self) -> Pipeline:
        """The first copy: what the copies share (classes, image size) is read from it."""
        return next(iter(self.pipes.values()))

    @property
    def classes(self) -> list[str] | None:
        """Class names of a class-conditional model (indices when it has no names), else None."""
        count = self.pipe.model.num_classes
        if count <= 0:
            return None
        return list(self.pipe.class_names or [str(i) for i in range(count)])

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "classes": self.classes,
            "guidance": self.classes is not None,  # classifier-free guidance needs classes
            "size": self.pipe.image_size,
        }


def served_names(models: list[str]) -> list[str]:
    """The name clients use for each --model: a preset's name, a folder's last part or a Hub
    repo id; repeated names get -2, -3, …"""
    names: list[str] = []
    for model in models:
        folder = Path(model).expanduser()
        base = folder.resolve().name if model not in PRESETS and folder.is_dir() else model
        name, n = base, 1
        while name in names:
            n += 1
            name = f"{base}-{n}"
        names.append(name)
    return names


class DevicePlacement:
    """Where a new stream runs: on a device with no stream running when there is one, else on
    the least busy; ties go to the first in order. Knows devices by name only. Not locked:
    StreamLimit calls it under its own lock."""

    def __init__(self, devices: Sequence[str]) -> None:
        if not devices or len(set(devices)) != len(devices):
            raise ValueError(f"need distinct devices, got {list(devices)}")
        self._running = dict.fromkeys(devices, 0)

    def take(self) -> str:
        """The device for a new stream, counted as running one more."""
        device = min(self._running, key=self._running.__getitem__)  # the first of the least busy
        self._running[device] += 1
        return device

    def release(self, device: str) -> None:
        """A stream on `device` has ended."""
        if self._running[device] <= 0:
            raise ValueError(f"no stream is running on {device}")
        self._running[device] -= 1

    def running(self) -> dict[str, int]:
        """Streams running on each device, in the devices' order."""
        return dict(self._running)


class LiveStream:
    """One endless generation, written as fragmented MP4 into a pipe (:attr:`output`).

    :meth:`start` runs the generation in a thread; :meth:`stop` ends it from any thread within
    a fraction of a second (a frame in progress is finished first). `on_end` is called from the
    thread once it is over."""

    _ids = iter(range(1, 1 << 62))

    def __init__(
        self,
        served: ServedModel,
        *,
        device: str,
        seed: int,
        label: str | None,
        cfg_scale: float,
        steps: int = 2,
        on_end: Callable[[LiveStream], None],
    ) -> None:
        self.id = next(self._ids)
        self.served, self.device, self.pipe = served, device, served.pipes[device]
        self.seed, self.label, self.cfg_scale, self.steps = seed, label, cfg_scale, steps
        self.frames = 0
        self.error: str | None = None  # one line: why the generation failed
        self._on_end = on_end
        self._stop = threading.Event()
        self._started = False
        size = self.pipe.image_size
        self.writer = VideoWriter(PIPE, width=size, height=size)
        self.output = self.writer.stream
        self._thread = WorkerThread(target=self._run, name=f"rflav-stream-{self.id}")

    def start(self) -> None:
        self._started = True
        self._thread.start()

    def discard(self) -> None:
        """Release a stream that was never started."""
        if not self._started:
            self._started = True
            self.writer.abort()
            self._on_end(self)

    def stop(self) -> None:
        """Ask the generation to end; safe from any thread and from a signal handler."""
        self._stop.set()
        self.writer.interrupt()

    def join(self, timeout: float | None = None) -> None:
        self._thread.wait(timeout)

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def describe(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "model": self.served.name,
            "device": self.device,
            "seed": self.seed,
            "class": self.label,
            "cfg_scale": self.cfg_scale,
            "steps": self.steps,
            "frames": self.frames,
        }

    def _run(self) -> None:
        try:
            # A new thread's current CUDA device is the first GPU: make it this copy's own, for
            # whatever allocates on "the current device" (streams, graphs).
            on_gpu = self.pipe.device.type == "cuda" and self.pipe.device.index is not None
            with torch.no_grad(), torch.cuda.device(self.pipe.device) if on_gpu else nullcontext():
                generation = self.pipe.generate(
                    num_frames=None,
                    seeds=[self.seed],
                    steps=self.steps,
                    label=self.label,
                    cfg_scale=self.cfg_scale,
                )
                for frame in generation:
                    if self._stop.is_set():
                        break
                    self.writer.write(frame.video[0], frame.audio[0])
                    self.frames += 1
        except OutputClosed:
            pass  # the viewer left, or the server stops
        except BaseException as err:  # noqa: BLE001 - reported, and the stream ends
            # --compile was asked for and cannot work: say so in one line, with the way out.
            self.error = compile_failure_message(err) if is_compile_error(err) else _one_line(err)
        finally:
            # A live stream has no end to finalise: its reader has left, or is told by the
            # end of the pipe.
            self.writer.abort()
            self._on_end(self)


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return text or type(err).__name__


class StreamLimit:
    """The generations running: at most `max_streams` at once, spread over `devices` (the names
    of the devices every ServedModel has a copy on), each sampling `steps` model evaluations per
    frame."""

    def __init__(self, max_streams: int, devices: Sequence[str] = ("cpu",), steps: int = 2) -> None:
        self.max_streams = max_streams
        self.steps = steps
        self._lock = threading.Lock()
        self._active: dict[int, LiveStream] = {}
        self._placement = DevicePlacement(devices)
        self._closing = False

    def open(self, served: ServedModel, *, seed: int, label: str | None, cfg_scale: float) -> LiveStream:
        """A new stream (not started yet) on the least busy device; _Busy when every place is taken."""
        with self._lock:
            self._check_room()
            device = self._placement.take()
            try:
                stream = LiveStream(
                    served,
                    device=device,
                    seed=seed,
                    label=label,
                    cfg_scale=cfg_scale,
                    steps=self.steps,
                    on_end=self._ended,
                )
            except BaseException:
                self._placement.release(device)
                raise
            self._active[stream.id] = stream
            return stream

    def check_room(self) -> None:
        """_Busy if a new stream would be refused now."""
        with self._lock:
            self._check_room()

    def _check_room(self) -> None:
        if self._closing:
            raise _Busy("the server is shutting down")
        if len(self._active) >= self.max_streams:
            running = len(self._active)
            raise _Busy(
                f"busy: {running} of {self.max_streams} generation{'s' if self.max_streams > 1 else ''} "
                f"running (--max-streams {self.max_streams}); try again when one ends"
            )

    def _ended(self, stream: LiveStream) -> None:
        with self._lock:
            if self._active.pop(stream.id, None) is not None:
                self._placement.release(stream.device)
        reason = f"failed ({stream.error})" if stream.error else "ended"
        _log(f"stream {stream.id} {reason} after {stream.frames} frames")

    @property
    def running(self) -> int:
        return len(self._active)

    def running_per_device(self) -> dict[str, int]:
        """Generations running on each device."""
        with self._lock:
            return self._placement.running()

    def streams(self) -> list[LiveStream]:
        return list(self._active.values())

    def stop_all(self) -> list[LiveStream]:
        """Stop every generation and accept no new one. Takes no lock, so that a signal handler
        may call it whatever the main thread was doing."""
        self._closing = True
        streams = list(self._active.values())
        for stream in streams:
            stream.stop()
        return streams


class _Busy(RflavError):
    """Every generation place is taken (HTTP 503)."""


class _NotFound(RflavError):
    """An unknown model name (HTTP 404)."""


# ----------------------------------------------------------------------------------------
# HTTP
# ----------------------------------------------------------------------------------------


def _text(message: str, status: int, **headers: str) -> PlainTextResponse:
    return PlainTextResponse(message + "\n", status_code=status, headers=headers or None)


class _LiveResponse(Response):
    """Sends a stream's MP4 as it is made; stops the generation when the client leaves."""

    def __init__(self, stream: LiveStream) -> None:
        super().__init__(media_type="video/mp4")
        self.stream = stream

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        stream = self.stream
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=_READ_LIMIT)
        transport = None
        try:
            transport, _ = await loop.connect_read_pipe(
                lambda: asyncio.StreamReaderProtocol(reader), stream.output
            )
            headers = [(k.encode(), v.encode()) for k, v in _STREAM_HEADERS.items()]
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            stream.start()

            async def pump() -> None:
                while chunk := await reader.read(_CHUNK):
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                await send({"type": "http.response.body", "body": b"", "more_body": False})

            async def until_disconnect() -> None:
                while (await receive())["type"] != "http.disconnect":
                    pass

            tasks = [asyncio.ensure_future(pump()), asyncio.ensure_future(until_disconnect())]
            try:
                # A send that fails (the connection broke) ends the stream like a disconnect.
                await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            stream.stop()
            if transport is not None:
                transport.close()
            else:
                stream.output.close()
            stream.discard()


@dataclass
class _App:
    models: dict[str, ServedModel]
    limit: StreamLimit
    token: str | None = None
    page: str = field(
        default_factory=lambda: resources.files(__package__).joinpath("web/live.html").read_text()
    )

    def authorised(self, request: Request) -> bool:
        if self.token is None:
            return True
        given = request.query_params.get("token")
        header = request.headers.get("authorization", "")
        if given is None and header.lower().startswith("bearer "):
            given = header[7:].strip()
        return given is not None and secrets.compare_digest(given.encode(), self.token.encode())

    def refuse(self) -> PlainTextResponse:
        return _text(
            "this server needs its token: open /?token=TOKEN, or add token=TOKEN to the stream URL",
            401,
            **{"www-authenticate": "Bearer"},
        )

    async def page_view(self, request: Request) -> Response:
        if not self.authorised(request):
            return self.refuse()
        return HTMLResponse(self.page, headers={"cache-control": "no-store"})

    async def models_view(self, request: Request) -> Response:
        if not self.authorised(request):
            return self.refuse()
        return JSONResponse(
            {
                "models": [m.describe() for m in self.models.values()],
                "max_streams": self.limit.max_streams,
            }
        )

    async def status_view(self, request: Request) -> Response:
        if not self.authorised(request):
            return self.refuse()
        return JSONResponse(
            {
                "streams": self.limit.running,
                "max_streams": self.limit.max_streams,
                "devices": self.limit.running_per_device(),  # generations running on each
                "generations": [s.describe() for s in self.limit.streams()],
            }
        )

    async def stream_view(self, request: Request) -> Response:
        if not self.authorised(request):
            return self.refuse()
        try:
            served, seed, label, cfg_scale = self.parse(request.query_params)
            if request.method == "HEAD":  # what a GET would answer, without generating
                self.limit.check_room()
                return Response(headers=_STREAM_HEADERS)
            stream = self.limit.open(served, seed=seed, label=label, cfg_scale=cfg_scale)
        except _Busy as err:
            return _text(str(err), 503, **{"retry-after": "5"})
        except _NotFound as err:
            return _text(str(err), 404)
        except RflavError as err:
            return _text(str(err), 400)
        client = request.client.host if request.client else "?"
        what = f"{served.name} seed {seed}" + (f" class {label}" if label is not None else "")
        _log(f"stream {stream.id}: {what} for {client}")
        return _LiveResponse(stream)

    def parse(self, query: Any) -> tuple[ServedModel, int, str | None, float]:
        """The stream's parameters, checked: only the models given at start, by name."""
        unknown = sorted(set(query.keys()) - _STREAM_PARAMS)
        if unknown:
            raise UsageError(
                f"unknown parameter {unknown[0]!r}: use {', '.join(sorted(_STREAM_PARAMS - {'token'}))}"
            )
        name = query.get("model") or next(iter(self.models))
        served = self.models.get(name)
        if served is None:
            raise _NotFound(f"unknown model {name!r}: this server offers {', '.join(self.models)}")
        try:
            seed = int(query.get("seed", "0"))
        except ValueError:
            raise UsageError(f"seed must be a whole number, got {query.get('seed')!r}") from None
        if not 0 <= seed <= _MAX_SEED:
            raise UsageError(f"seed must be from 0 to {_MAX_SEED}, got {seed}")
        classes = served.classes
        label = query.get("class") or None
        cfg_text = query.get("cfg_scale")
        if classes is None:
            if label is not None or cfg_text:
                raise UsageError(f"model {served.name} has no classes: drop class and cfg_scale")
            return served, seed, None, 1.0
        if label is None:
            raise UsageError(f"model {served.name} needs a class: one of {', '.join(classes)}")
        index = class_index(label, classes, len(classes))  # a name or an index, as generate's --class
        if index is None:
            raise UsageError(f"unknown class {label!r} for {served.name}: use one of {', '.join(classes)}")
        label = classes[index]
        try:
            cfg_scale = float(cfg_text) if cfg_text else 1.0
        except ValueError:
            raise UsageError(f"cfg_scale must be a number, got {cfg_text!r}") from None
        if not (cfg_scale >= 0 and cfg_scale < float("inf")):
            raise UsageError(f"cfg_scale must be a number >= 0, got {cfg_text}")
        return served, seed, label, cfg_scale


def build_app(models: list[ServedModel], limit: StreamLimit, token: str | None = None) -> Starlette:
    """The Starlette application serving `models` (names must be unique)."""
    state = _App({m.name: m for m in models}, limit, token)
    return Starlette(
        routes=[
            Route("/", state.page_view),
            Route("/models", state.models_view),
            Route("/status", state.status_view),
            Route("/stream.mp4", state.stream_view, methods=["GET", "HEAD"]),
        ]
    )


# ----------------------------------------------------------------------------------------
# Server
# ----------------------------------------------------------------------------------------


class _Server(uvicorn.Server):
    """uvicorn, with Ctrl-C / SIGTERM also ending every generation (their responses are
    endless: a graceful shutdown would otherwise wait for them)."""

    def __init__(self, config: uvicorn.Config, limit: StreamLimit) -> None:
        super().__init__(config)
        self.limit = limit

    def handle_exit(self, sig: int, frame: Any) -> None:
        self.limit.stop_all()
        super().handle_exit(sig, frame)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        # A live response never completes, and one whose client stopped reading cannot even send
        # its end: cut every connection now instead of waiting, then cancelling, them.
        for connection in list(self.server_state.connections):
            transport = getattr(connection, "transport", None)
            if transport is not None:
                transport.abort()
        await super().shutdown(sockets)


def _join_streams(streams: list[LiveStream]) -> None:
    """Wait for stopped generations: each finishes the frame it is making."""
    for stream in streams:
        stream.join(timeout=1)
    if any(stream.running for stream in streams):
        _log("waiting for the generations to finish the frame they are making")
        for stream in streams:
            stream.join()


def _bind(host: str, port: int) -> socket.socket:
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _SEND_BUFFER)
        sock.bind(address)
    except OSError as err:
        raise UsageError(
            f"cannot listen on {{host}} {host} {{port}} {port}: {err.strerror or err}",
            params=("host", "port"),
        ) from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def page_url(host: str, port: int, token: str | None = None) -> str:
    """The page's address to print: one that a browser on this machine opens as it is."""
    try:
        wildcard = ipaddress.ip_address(host).is_unspecified
    except ValueError:
        wildcard = False
    shown = "127.0.0.1" if wildcard else host
    if ":" in shown:
        shown = f"[{shown}]"
    query = f"?token={quote(token, safe='')}" if token else ""
    return f"http://{shown}:{port}/{query}"


def serve_devices(name: str) -> list[torch.device]:
    """The devices streams run on: every visible GPU when `name` is auto or cuda and CUDA sees
    several, else the one device `name` picks (cuda:N, cpu, mps, or a single GPU)."""
    device = pick_device(name)
    count = torch.cuda.device_count() if device.type == "cuda" else 0
    if name in ("auto", "cuda") and count > 1:
        return [torch.device("cuda", index) for index in range(count)]
    return [device]


def _compile_failed(name: str, device: torch.device, reason: str) -> None:
    """Compiling was our choice, not the user's: one line, and the streams go on eagerly."""
    _log(compile_skipped_message(reason, f"compiling {name} on {device}"))


def load_served_models(req: ServeRequest, devices: Sequence[torch.device]) -> list[ServedModel]:
    """Each --model loaded once on each of `devices`, with the request's precision and compile policy."""
    models = []
    for name, model in zip(served_names(req.models), req.models):
        pipes: dict[str, Pipeline] = {}
        for device in devices:
            _log(f"loading {model}" + (f" on {device}" if len(devices) > 1 else ""))
            # An endless stream: compiled blocks pay off on CUDA (runtime.auto_compile). They are
            # compiled in the background, so the first frames do not wait for the compiler.
            compile_blocks = req.compile if req.compile is not None else auto_compile(device, None)
            pipes[str(device)] = Pipeline.from_pretrained(
                model,
                vae=req.vae,
                offline=req.offline or None,
                audio_scale=req.audio_scale,
                device=device,
                dtype=req.dtype,
                compile=compile_blocks,
                on_compile_failure=None if req.compile else partial(_compile_failed, name, device),
            )
            _log(f"warming up {model}" + (" (compiling)" if pipes[str(device)].compile else ""))
            try:
                pipes[str(device)].warm_up()
            except Exception as err:
                if req.compile and is_compile_error(err):  # asked for, and it cannot work here
                    raise UsageError(compile_failure_message(err)) from err
                raise
        models.append(ServedModel(name, pipes))
    return models


def prepare_serve(req: ServeRequest) -> tuple[list[ServedModel], StreamLimit]:
    """The models loaded on every device streams run on, and the limit that places the streams:
    --max-streams, by default one per device."""
    devices = serve_devices(req.device)
    models = load_served_models(req, devices)
    limit = StreamLimit(req.max_streams or len(devices), [str(d) for d in devices], steps=req.steps)
    return models, limit


def run_serve(req: ServeRequest) -> None:
    """Load the models, then serve until Ctrl-C or SIGTERM (which end every generation)."""
    check_serve_request(req)
    if not is_loopback_host(req.host):
        exposure = (
            "clients need the --token"
            if req.token
            else "anyone who can reach this machine can use it (give --token to require a shared secret)"
        )
        _log(f"warning: listening on {req.host}, not only on this machine: {exposure}")
    # An unavailable device, or a precision it cannot run, fails before the port is taken.
    pick_dtype(req.dtype, serve_devices(req.device)[0])
    sock = _bind(req.host, req.port)
    try:
        models, limit = prepare_serve(req)
        config = uvicorn.Config(
            build_app(models, limit, req.token),
            log_level="warning",
            access_log=False,
            lifespan="off",
            timeout_graceful_shutdown=_GRACEFUL_SHUTDOWN_S,
        )
        server = _Server(config, limit)
        port = sock.getsockname()[1]
        names = ", ".join(m.name for m in models)
        places = f"{limit.max_streams} stream{'s' if limit.max_streams > 1 else ''} at once"
        devices = ", ".join(limit.running_per_device())
        url = page_url(req.host, port, req.token)
        _log(f"serving {names} on {url} ({places} on {devices}; Ctrl-C to stop)")
        # uvicorn handles Ctrl-C and SIGTERM while it serves, then sends the signal again to the
        # handler it found: ours, which only notes it, so that the server ends here like any other.
        with stop_on_signals():
            asyncio.run(server.serve(sockets=[sock]))
        _join_streams(limit.stop_all())
    finally:
        sock.close()
    _log("stopped")
