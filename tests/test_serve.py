"""`rflav serve`: the page, the stream URL, the limits and the safety rules, against a real server
running the packaged `ball` model (no download), and the page in headless Chromium."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import types
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import tiny
import torch
import torch._dynamo.exc
import uvicorn
from conftest import load_benchmark
from typer.testing import CliRunner

from rflav_cli.cli import app
from rflav_cli.errors import UsageError
from rflav_cli.pipeline import Pipeline
from rflav_cli.requests import ServeRequest, check_serve_request, is_loopback_host
from rflav_cli.serve import (
    DevicePlacement,
    ServedModel,
    StreamLimit,
    build_app,
    load_served_models,
    page_url,
    prepare_serve,
    serve_devices,
    served_names,
)

pytestmark = pytest.mark.skipif(shutil.which("ffprobe") is None, reason="needs ffprobe to inspect streams")

ROOT = Path(__file__).resolve().parents[1]
SCREENSHOT = ROOT / "examples" / "live" / "page.png"
TOKEN = "s3cret-token"


def open_stream(port: int, query: str, rcvbuf: int | None = None) -> socket.socket:
    """A viewer: the request sent, the response head read; the caller reads the body or not."""
    sock = socket.socket()
    if rcvbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.connect(("127.0.0.1", port))
    sock.sendall(f"GET /stream.mp4?{query} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(1)
        assert chunk, head
        head += chunk
    assert head.startswith(b"HTTP/1.1 200"), head
    return sock


class Server:
    """`rflav serve` in a subprocess, on a free port; its stderr is collected line by line."""

    def __init__(self, *args: str) -> None:
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "rflav_cli",
                "serve",
                "--model",
                "ball",
                "--device",
                "cpu",
                "--port",
                "0",
                *args,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        line = self.wait_for("serving ", timeout=120)
        self.port = int(re.search(r":(\d+)/", line).group(1))
        self.base = f"http://127.0.0.1:{self.port}"

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))

    def wait_for(self, text: str, timeout: float = 30) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.lines:
                if text in line:
                    return line
            if self.proc.poll() is not None:
                self._reader.join(5)
                break
            time.sleep(0.05)
        raise AssertionError(f"server never said {text!r}: {self.lines}")

    def get(self, path: str, headers: dict | None = None, method: str = "GET") -> tuple[int, str, dict]:
        request = urllib.request.Request(self.base + path, headers=headers or {}, method=method)
        try:
            with urllib.request.urlopen(request, timeout=10) as resp:
                return resp.status, resp.read().decode(), dict(resp.headers)
        except urllib.error.HTTPError as err:
            return err.code, err.read().decode(), dict(err.headers)

    def status(self, query: str = "") -> dict:
        code, body, _ = self.get("/status" + query)
        assert code == 200, body
        return json.loads(body)

    def open_stream(self, query: str = "model=ball", rcvbuf: int | None = None) -> socket.socket:
        return open_stream(self.port, query, rcvbuf)

    def wait_held_back(self) -> int:
        """Frames made once the only generation stopped growing (its viewer reads nothing)."""
        frames, still_since = -1, time.monotonic()
        deadline = time.monotonic() + 40
        while time.monotonic() - still_since < 1.5:
            assert time.monotonic() < deadline, f"the generation never waited ({frames} frames)"
            now = self.status()["generations"][0]["frames"]
            if now != frames:
                frames, still_since = now, time.monotonic()
            time.sleep(0.1)
        return frames

    def wait_idle(self, timeout: float) -> float:
        """Seconds until no generation runs; fails after `timeout`."""
        began = time.monotonic()
        while self.status()["streams"]:
            assert time.monotonic() - began < timeout, self.status()
            time.sleep(0.02)
        return time.monotonic() - began

    def stop(self, signum: int = signal.SIGINT) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signum)
        try:
            return self.proc.wait(timeout=20)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
            self._reader.join(5)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The packaged ball model, and a tiny class-conditional checkpoint given as a folder."""
    root = tmp_path_factory.mktemp("served")
    classes = tiny.build_tiny_model(root / "classes", num_classes=2, class_names=["drums", "guitar"])
    s = Server("--model", str(classes), "--vae", str(tiny.build_tiny_vae(root / "vae")))
    yield s
    s.stop()


def test_page_and_models(server):
    code, page, headers = server.get("/")
    assert code == 200 and headers["content-type"].startswith("text/html") and "<video" in page
    code, body, _ = server.get("/models")
    assert code == 200
    assert json.loads(body)["models"] == [
        {"name": "ball", "classes": None, "guidance": False, "size": 32},
        {"name": "classes", "classes": ["drums", "guitar"], "guidance": True, "size": 256},
    ]


def test_served_names_are_unique():
    assert served_names(["ball", "rflav_cli/weights/ball/", "org/model", "ball"]) == [
        "ball",
        "ball-2",
        "org/model",
        "ball-3",
    ]


def test_class_and_guidance_of_a_class_conditional_model(server):
    sock = server.open_stream("model=classes&class=guitar&cfg_scale=2.5&seed=4")
    try:
        assert sock.recv(4096)
        (running,) = server.status()["generations"]
        assert {k: running[k] for k in ("model", "seed", "class", "cfg_scale")} == {
            "model": "classes",
            "seed": 4,
            "class": "guitar",
            "cfg_scale": 2.5,
        }
        assert running["frames"] >= 1
        assert (running["device"], running["steps"]) == ("cpu", 2)
        assert server.status()["devices"] == {"cpu": 1}  # --device cpu: one device, one place
    finally:
        sock.close()
    server.wait_idle(timeout=5)
    sock = server.open_stream("model=classes&class=1&seed=4")  # an index, as generate's --class
    try:
        assert server.status()["generations"][0]["class"] == "guitar"
    finally:
        sock.close()
    server.wait_idle(timeout=5)
    code, body, _ = server.get("/stream.mp4?model=classes&class=2")
    assert code == 400 and "unknown class '2' for classes: use one of drums, guitar" in body
    for query, message in [
        ("model=classes", "model classes needs a class: one of drums, guitar"),
        ("model=classes&class=piano", "unknown class 'piano' for classes"),
        ("model=classes&class=drums&cfg_scale=-1", "cfg_scale must be a number >= 0"),
        ("model=classes&class=drums&cfg_scale=nan", "cfg_scale must be a number >= 0"),
    ]:
        code, body, _ = server.get("/stream.mp4?" + query)
        assert code == 400 and message in body, body


def test_stream_url_plays_in_ffprobe_and_leaving_stops_the_generation(server):
    res = subprocess.run(
        [
            "ffprobe",
            "-v",
            "error",
            "-read_intervals",
            "%+2",  # the stream is endless: decode its first 2 s, then hang up
            "-count_frames",
            "-show_streams",
            "-of",
            "json",
            f"{server.base}/stream.mp4?model=ball&seed=3",
        ],
        capture_output=True,
        timeout=60,
    )
    assert res.returncode == 0, res.stderr
    streams = {s["codec_type"]: s for s in json.loads(res.stdout)["streams"]}
    video, audio = streams["video"], streams["audio"]
    assert (video["codec_name"], video["width"], video["height"]) == ("h264", 32, 32)
    assert int(video["nb_read_frames"]) >= 20
    assert (audio["codec_name"], audio["sample_rate"]) == ("aac", "16000") and int(
        audio["nb_read_frames"]
    ) > 0
    server.wait_idle(timeout=2)


def test_disconnecting_viewer_stops_its_generation_within_a_second(server):
    sock = server.open_stream("model=ball&seed=1")
    assert sock.recv(4096)
    assert server.status()["generations"][0]["seed"] == 1
    sock.close()
    assert server.wait_idle(timeout=5) < 1.0
    server.wait_for("ended after")


def test_slow_viewer_holds_the_generation_back_and_others_are_told_busy(server):
    # A viewer that reads nothing: the generation must stop at bounded buffers.
    slow = server.open_stream("model=ball", rcvbuf=4096)
    try:
        frames = server.wait_held_back()
        assert 0 < frames < 600  # about 25 s of this model's video: its MP4 is ~12 kB/s

        # The one place (--max-streams 1, the default on CPU) is taken: 503 and why.
        code, body, headers = server.get("/stream.mp4?model=ball&seed=2")
        assert code == 503 and headers["retry-after"] == "5"
        assert body.strip().splitlines() == [
            "busy: 1 of 1 generation running (--max-streams 1); try again when one ends"
        ]
        # HEAD answers what a GET would.
        code, _, headers = server.get("/stream.mp4?model=ball&seed=2", method="HEAD")
        assert code == 503 and headers["retry-after"] == "5"
        assert server.status()["streams"] == 1
    finally:
        slow.close()
    server.wait_idle(timeout=5)
    sock = server.open_stream("model=ball&seed=2")  # the place is free again
    sock.close()
    server.wait_idle(timeout=5)


@pytest.mark.parametrize(
    "query, code, message",
    [
        ("model=dance", 404, "unknown model 'dance': this server offers ball, classes"),
        ("model=/etc/passwd", 404, "unknown model '/etc/passwd'"),
        ("model=../rflav_cli/weights/ball", 404, "unknown model"),
        ("model=ball&path=/tmp/x.mp4", 400, "unknown parameter 'path'"),
        ("model=ball&seed=-1", 400, "seed must be from 0"),
        ("model=ball&seed=x", 400, "seed must be a whole number"),
        ("model=ball&class=dog", 400, "model ball has no classes"),
    ],
)
def test_bad_stream_requests_get_4xx_and_start_nothing(server, query, code, message):
    got, body, _ = server.get("/stream.mp4?" + query)
    assert got == code and message in body and len(body.strip().splitlines()) == 1
    assert server.status()["streams"] == 0


def test_page_in_headless_chromium_plays_video_and_sound(server, tmp_path):
    live = load_benchmark("live")  # the browser benchmarks/live.py watches with
    if live.find_browser() is None:
        if os.environ.get("RFLAV_REQUIRE_BROWSER"):  # CI installs them: there this is a failure
            pytest.fail(live.BROWSER_MISSING)
        pytest.skip(live.BROWSER_MISSING)
    from selenium.webdriver.common.by import By

    driver = live.browser("--window-size=600,800")
    try:
        driver.set_page_load_timeout(20)
        driver.get(server.base + "/")
        start = driver.find_element(By.ID, "start")
        deadline = time.monotonic() + 20
        while not start.is_enabled():  # enabled once the models are listed
            assert time.monotonic() < deadline, driver.find_element(By.ID, "status").text
            time.sleep(0.05)
        driver.find_element(By.ID, "seed").clear()
        driver.find_element(By.ID, "seed").send_keys("7")
        start.click()
        state = {}
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            state = driver.execute_script(
                "const v = document.getElementById('video');"
                "return {time: v.currentTime, audio: v.webkitAudioDecodedByteCount,"
                " video: v.webkitVideoDecodedByteCount, live: window.rflavLive,"
                " status: document.getElementById('status').textContent};"
            )
            if state["time"] > 2.5:
                break
            assert not state["live"]["error"], state
            time.sleep(0.2)
        assert state["time"] > 2, state
        assert state["audio"] > 0 and state["video"] > 0, state
        assert state["status"] == "Playing ball, seed 7.", state
        assert server.status()["generations"][0]["seed"] == 7
        shot = SCREENSHOT if os.environ.get("RFLAV_UPDATE_SCREENSHOT") else tmp_path / "page.png"
        shot.parent.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(shot))

        # Start again with another seed while playing: the old generation makes way for the new.
        driver.find_element(By.ID, "seed").clear()
        driver.find_element(By.ID, "seed").send_keys("8")
        start.click()
        deadline = time.monotonic() + 30
        while driver.find_element(By.ID, "status").text != "Playing ball, seed 8.":
            assert time.monotonic() < deadline, driver.execute_script("return window.rflavLive")
            time.sleep(0.05)
        assert [g["seed"] for g in server.status()["generations"]] == [8]

        driver.find_element(By.ID, "stop").click()
        assert server.wait_idle(timeout=5) < 1.0  # Stop ends the generation
    finally:
        driver.quit()
    server.wait_idle(timeout=5)


def test_open_host_warns_and_the_token_is_required(tmp_path):
    s = Server("--host", "0.0.0.0", "--token", TOKEN)
    try:
        assert any("warning: listening on 0.0.0.0" in line and "--token" in line for line in s.lines)
        for path in ("/", "/models", "/status", "/stream.mp4?model=ball", "/?token=wrong-token"):
            code, body, headers = s.get(path)
            assert code == 401 and "needs its token" in body and headers["www-authenticate"] == "Bearer"
        code, page, _ = s.get(f"/?token={TOKEN}")
        assert code == 200 and "<video" in page
        assert s.get("/models", headers={"Authorization": f"Bearer {TOKEN}"})[0] == 200

        # Ctrl-C with a viewer watching: the generation and the server end cleanly.
        sock = s.open_stream(f"model=ball&token={TOKEN}")
        assert sock.recv(4096)
        assert s.stop() == 0
        sock.settimeout(10)
        while sock.recv(65536):  # the stream ends
            pass
        sock.close()
        assert "Traceback" not in "\n".join(s.lines) and s.lines[-1] == "rflav: stopped"
    finally:
        s.stop()

    s = Server("--host", "0.0.0.0")
    try:
        assert any(
            "warning: listening on 0.0.0.0" in line and "anyone who can reach this machine" in line
            for line in s.lines
        )
        assert s.get("/models")[0] == 200
    finally:
        assert s.stop(signal.SIGTERM) == 0  # SIGTERM ends it as cleanly as Ctrl-C
    assert s.lines[-1] == "rflav: stopped"


def test_ctrl_c_cuts_a_viewer_that_reads_nothing():
    """A stalled viewer cannot hold the shutdown: its connection is cut, without the server's
    graceful-shutdown timeout, a cancelled task or a traceback."""
    s = Server()
    try:
        slow = s.open_stream("model=ball", rcvbuf=4096)
        s.wait_held_back()
        assert s.stop() == 0
        slow.close()
        text = "\n".join(s.lines)
        assert "Traceback" not in text and "ERROR" not in text, text
        assert s.lines[-1] == "rflav: stopped"
    finally:
        s.stop()


def test_ctrl_c_while_warming_up_ends_without_an_abort():
    """The warm-up runs on its own thread: Ctrl-C must not end the interpreter under it."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "rflav_cli", "serve", "--model", "ball", "--device", "cpu", "--port", "0"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        seen = ""
        while "warming up" not in seen:
            line = proc.stderr.readline()
            assert line, seen
            seen += line
        time.sleep(0.02)
        proc.send_signal(signal.SIGINT)
        rest = proc.stderr.read()
        rc = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    # Interrupted while warming up (130), or just after it, once serving (0); never an abort.
    assert rc in (0, 130) and "terminate called" not in rest and "Traceback" not in rest, (rc, rest)
    assert rest.strip().splitlines()[-1] in ("rflav: interrupted", "rflav: stopped"), rest


@pytest.mark.parametrize("token", [None, "s3cret", "pass+word#1&x %/?"])
def test_the_printed_page_url_carries_the_token_as_given(token):
    from urllib.parse import parse_qs, urlsplit

    url = page_url("0.0.0.0", 8000, token)
    parts = urlsplit(url)
    assert (parts.scheme, parts.netloc, parts.path, parts.fragment) == ("http", "127.0.0.1:8000", "/", "")
    assert parse_qs(parts.query) == ({"token": [token]} if token else {})
    assert page_url("::1", 8000) == "http://[::1]:8000/"


def test_serve_flags_are_checked_before_loading():
    assert is_loopback_host("127.0.0.1") and is_loopback_host("::1") and is_loopback_host("localhost")
    assert not is_loopback_host("0.0.0.0") and not is_loopback_host("192.168.1.2")
    check_serve_request(ServeRequest(models=["ball"]))
    for args, message in [
        (["--max-streams", "0"], "--max-streams must be at least 1"),
        (["--port", "70000"], "--port must be from 0 to 65535"),
        (["--token", "short"], "--token must be at least 8 characters"),
        (["--device", "gpu"], "unknown --device 'gpu'"),
        (["--dtype", "fp8"], "unknown --dtype 'fp8': use auto, fp32, bf16, fp16"),
        (["--device", "cpu", "--dtype", "fp16"], "--dtype fp16 is not supported on CPU"),
        (["--steps", "0"], "--steps must be at least 1, got 0"),
        (["--model", "no/such/thing/here"], "--model no/such/thing/here: not a preset"),
    ]:
        result = CliRunner().invoke(app, ["serve", "--model", "ball", *args])
        assert result.exit_code == 2, result.output
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("rflav: error: ") and message in lines[0], lines


# ----------------------------------------------------------------------------------------
# Streams spread over GPUs: the placement, and its wiring checked on CPU with GPUs pretended
# ----------------------------------------------------------------------------------------


def test_placement_prefers_a_device_with_no_stream_then_the_least_busy():
    place = DevicePlacement(["cuda:0", "cuda:1", "cuda:2"])
    assert [place.take() for _ in range(3)] == ["cuda:0", "cuda:1", "cuda:2"]  # one each first
    place.release("cuda:1")
    assert place.take() == "cuda:1"  # the free one, not the next in turn
    assert [place.take() for _ in range(3)] == ["cuda:0", "cuda:1", "cuda:2"]  # then two each
    place.release("cuda:2")
    place.release("cuda:2")
    place.release("cuda:0")
    assert place.running() == {"cuda:0": 1, "cuda:1": 2, "cuda:2": 0}
    assert place.take() == "cuda:2"
    assert place.take() == "cuda:0"  # tied with cuda:2 at one: the first in order
    with pytest.raises(ValueError):
        DevicePlacement(["cpu"]).release("cpu")  # nothing runs there
    with pytest.raises(ValueError):
        DevicePlacement(["cuda:0", "cuda:0"])


def pretend_gpus(monkeypatch, count: int) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)


def test_serve_devices_every_gpu_for_auto_and_cuda_else_the_one_named(monkeypatch):
    with monkeypatch.context() as m:
        pretend_gpus(m, 3)
        every_gpu = [torch.device("cuda", i) for i in range(3)]
        assert serve_devices("auto") == every_gpu
        assert serve_devices("cuda") == every_gpu
        assert serve_devices("cuda:2") == [torch.device("cuda:2")]
        assert serve_devices("cpu") == [torch.device("cpu")]
        pretend_gpus(m, 1)
        assert serve_devices("auto") == [torch.device("cuda")]
    assert serve_devices("cpu") == [torch.device("cpu")]


class FakeLoads:
    """Pipeline.from_pretrained, recorded: each call gets its own real CPU pipeline of the asked
    model, whose generate calls are recorded with the device the copy was loaded for."""

    def __init__(self, real: bool = True) -> None:
        self.loads: list[dict] = []
        self.generations: list[tuple[str, dict]] = []
        self.real = real

    def __call__(self, model: str, *, device: torch.device, **options) -> object:
        self.loads.append({"model": model, "device": str(device), **options})
        if not self.real:
            return types.SimpleNamespace(compile=options["compile"], warm_up=lambda: None)
        pipe = ORIGINAL_FROM_PRETRAINED(model, device="cpu", dtype="fp32", offline=options["offline"])
        pipe.warm_up()  # as the server does, before the generations recorded below
        pipe.warm_up = lambda: None
        generate = pipe.generate

        def recorded(**kwargs):
            self.generations.append((str(device), kwargs))
            return generate(**kwargs)

        pipe.generate = recorded
        return pipe


ORIGINAL_FROM_PRETRAINED = Pipeline.from_pretrained


def test_compile_and_dtype_as_generate_decides_for_an_endless_stream(monkeypatch, capsys):
    loads = FakeLoads(real=False)
    monkeypatch.setattr(Pipeline, "from_pretrained", loads)
    pretend_gpus(monkeypatch, 2)

    load_served_models(ServeRequest(models=["ball"], dtype="fp16"), [torch.device("cuda", 1)])
    (load,) = loads.loads
    assert (load["dtype"], load["compile"]) == ("fp16", True)  # CUDA, unbounded: compiled
    # Compiling was not asked for: a failure is one line in the log and the stream goes on.
    load["on_compile_failure"]("no working C++ compiler found")
    assert capsys.readouterr().err.splitlines() == [
        "rflav: loading ball",
        "rflav: warming up ball (compiling)",
        "rflav: compiling ball on cuda:1 failed (no working C++ compiler found); continuing without it "
        "(--no-compile skips the attempt)",
    ]

    for compile_flag, device, expected in [
        (None, "cpu", False),
        (False, "cuda:0", False),
        (True, "cpu", True),
    ]:
        loads.loads.clear()
        load_served_models(ServeRequest(models=["ball"], compile=compile_flag), [torch.device(device)])
        assert loads.loads[0]["compile"] is expected, (compile_flag, device)
        # Asked for: a failure is the stream's error, not something to step over.
        assert (loads.loads[0]["on_compile_failure"] is None) == (compile_flag is True)


@contextlib.contextmanager
def in_process_server(models, limit):
    """The app on uvicorn in a thread, on a free port."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    config = uvicorn.Config(build_app(models, limit), log_level="warning", lifespan="off")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=lambda: asyncio.run(server.serve(sockets=[sock])), daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline
            time.sleep(0.01)
        yield sock.getsockname()[1]
    finally:
        for stream in limit.stop_all():
            stream.join(timeout=5)
        server.should_exit = True
        thread.join(10)
        sock.close()


def get_json(port: int, path: str) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as resp:
        return json.loads(resp.read())


def wait_for_devices(port: int, expected: dict, timeout: float = 5) -> None:
    deadline = time.monotonic() + timeout
    while (running := get_json(port, "/status")["devices"]) != expected:
        assert time.monotonic() < deadline, running
        time.sleep(0.02)


def test_two_gpus_get_a_copy_each_and_one_stream_each(monkeypatch):
    loads = FakeLoads()
    monkeypatch.setattr(Pipeline, "from_pretrained", loads)
    with monkeypatch.context() as m:  # GPUs only while loading: the copies really run on the CPU
        pretend_gpus(m, 2)
        models, limit = prepare_serve(ServeRequest(models=["ball"], device="auto", dtype="bf16", steps=3))
    assert [(load["device"], load["dtype"]) for load in loads.loads] == [
        ("cuda:0", "bf16"),
        ("cuda:1", "bf16"),
    ]
    (ball,) = models
    assert list(ball.pipes) == ["cuda:0", "cuda:1"] and ball.pipes["cuda:0"] is not ball.pipes["cuda:1"]
    assert limit.max_streams == 2  # one per GPU

    with in_process_server(models, limit) as port:
        viewers = [open_stream(port, "model=ball&seed=1"), open_stream(port, "model=ball&seed=2")]
        for viewer in viewers:
            assert viewer.recv(4096)  # both are generating
        status = get_json(port, "/status")
        assert status["devices"] == {"cuda:0": 1, "cuda:1": 1}
        assert sorted((g["seed"], g["device"]) for g in status["generations"]) == [
            (1, "cuda:0"),
            (2, "cuda:1"),
        ]
        # Each generation ran on its own GPU's copy, with --steps.
        assert [(device, call["seeds"], call["steps"]) for device, call in loads.generations] == [
            ("cuda:0", [1], 3),
            ("cuda:1", [2], 3),
        ]
        with pytest.raises(urllib.error.HTTPError) as busy:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/stream.mp4?model=ball&seed=3", timeout=10)
        assert busy.value.code == 503
        assert busy.value.read().decode().strip() == (
            "busy: 2 of 2 generations running (--max-streams 2); try again when one ends"
        )

        viewers[1].close()  # cuda:1 is free again: the next stream goes there, not to cuda:0
        wait_for_devices(port, {"cuda:0": 1, "cuda:1": 0})
        viewers[1] = open_stream(port, "model=ball&seed=4")
        assert viewers[1].recv(4096)
        assert loads.generations[-1][0] == "cuda:1" and loads.generations[-1][1]["seeds"] == [4]
        assert get_json(port, "/status")["devices"] == {"cuda:0": 1, "cuda:1": 1}
        for viewer in viewers:
            viewer.close()
        wait_for_devices(port, {"cuda:0": 0, "cuda:1": 0})


def test_more_streams_than_gpus_share_the_least_busy(monkeypatch):
    loads = FakeLoads()
    monkeypatch.setattr(Pipeline, "from_pretrained", loads)
    with monkeypatch.context() as m:
        pretend_gpus(m, 2)
        models, limit = prepare_serve(ServeRequest(models=["ball"], device="cuda", max_streams=3))
    assert limit.max_streams == 3
    with in_process_server(models, limit) as port:
        viewers = [open_stream(port, f"model=ball&seed={seed}") for seed in range(3)]
        for viewer in viewers:
            assert viewer.recv(4096)
        assert get_json(port, "/status")["devices"] == {"cuda:0": 2, "cuda:1": 1}
        assert [device for device, _ in loads.generations] == ["cuda:0", "cuda:1", "cuda:0"]
        for viewer in viewers:
            viewer.close()
        wait_for_devices(port, {"cuda:0": 0, "cuda:1": 0})


def test_one_named_gpu_is_one_copy_and_one_stream(monkeypatch):
    loads = FakeLoads(real=False)
    monkeypatch.setattr(Pipeline, "from_pretrained", loads)
    pretend_gpus(monkeypatch, 4)
    models, limit = prepare_serve(ServeRequest(models=["ball", "ball"], device="cuda:3"))
    assert [load["device"] for load in loads.loads] == ["cuda:3", "cuda:3"]
    assert [list(m.pipes) for m in models] == [["cuda:3"], ["cuda:3"]]
    assert limit.max_streams == 1 and limit.running_per_device() == {"cuda:3": 0}


def test_a_failed_compilation_that_was_asked_for_ends_the_stream_with_one_line(capsys):
    class CannotCompile:
        image_size, device = 32, torch.device("cpu")

        def generate(self, **kwargs):
            raise torch._dynamo.exc.TorchDynamoException(
                "Traceback ...\nInvalidCxxCompiler: No working C++ compiler"
            )

    limit = StreamLimit(1)
    stream = limit.open(ServedModel("broken", {"cpu": CannotCompile()}), seed=0, label=None, cfg_scale=1.0)
    stream.output.close()
    stream.start()
    stream.join(timeout=10)
    assert stream.error == (
        "--compile failed (InvalidCxxCompiler: No working C++ compiler); run without --compile, or install "
        "what torch.compile needs (a C++ compiler on CPU, Triton and a C compiler on GPUs)"
    )
    assert capsys.readouterr().err.splitlines() == [
        f"rflav: stream {stream.id} failed ({stream.error}) after 0 frames"
    ]
    assert limit.running == 0 and limit.running_per_device() == {"cpu": 0}


def test_a_compilation_asked_for_that_fails_while_warming_up_is_one_line(monkeypatch):
    """serve --compile compiles while warming up, before it takes viewers: if that cannot work
    (no compiler, or a CUDA graph that cannot be captured), serve ends with the one line that
    says why and how to do without, not a traceback."""
    from rflav_cli.runtime import CudaGraphCaptureError

    for failure in (
        torch._dynamo.exc.TorchDynamoException("Traceback ...\nInvalidCxxCompiler: No working C++ compiler"),
        CudaGraphCaptureError("CUDA graph capture failed: operation not permitted when stream is capturing"),
    ):

        def failing_warm_up(failure=failure):
            raise failure

        monkeypatch.setattr(
            Pipeline,
            "from_pretrained",
            lambda *args, **kwargs: types.SimpleNamespace(compile=True, warm_up=failing_warm_up),
        )
        with pytest.raises(UsageError) as caught:
            load_served_models(ServeRequest(models=["ball"], compile=True), [torch.device("cpu")])
        message = str(caught.value)
        assert message.startswith("--compile failed (") and "run without --compile" in message
        assert "\n" not in message and str(failure).splitlines()[-1] in message
        # Chosen by default instead, a failure while warming up is not turned into this line.
        with pytest.raises(type(failure)):
            load_served_models(ServeRequest(models=["ball"], compile=None), [torch.device("cpu")])
