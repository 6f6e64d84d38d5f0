"""Watching live: `rflav serve` measured from a player and under a crowd.

    python benchmarks/live.py                                   # ball, 5-minute stream, Chromium
    python benchmarks/live.py --minutes 1 --device cpu          # a quicker run
    python benchmarks/live.py --model dance --device cuda
    python benchmarks/live.py --player http --model CKPT/model --vae CKPT/vae --device cuda

Starts `rflav serve --max-streams 1` on a free port and measures, with one of two players:

- `--player browser` (default): the page in headless Chromium (chromium and chromedriver,
  selenium). First frame: from pressing Start to the first video frame painted (the page's
  requestVideoFrameCallback); stalls: `waiting` events and the time the playhead stood still
  while playing, against the video time played.
- `--player http`: no browser, only the standard library. The stream is read over HTTP and its
  fragmented MP4 parsed as it comes (the video track's fragments and their media time, from
  `tfdt` and `trun`); a modelled player starts once `--start-buffer` seconds of video are in,
  then moves its playhead with the wall clock and stalls (playhead held) whenever it reaches the
  end of what has arrived. Like the page, it reads only while less than `--ahead` seconds are
  buffered, so the generation runs at the pace it is watched. First frame: from the request to
  the first complete video fragment.

Both then run the same load check: `--clients` clients at once, each loading the page then
asking for a stream: page load times, how many streams ran (must be one) and what the others
were told; the one stream is then held without reading for `--hold` seconds while the server's
memory (RSS of the server and its ffmpeg processes) is sampled: a slow client must not grow it.

Prints the figures, and one JSON object with --json.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import queue
import re
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------------
# The server
# ----------------------------------------------------------------------------------------


class Server:
    def __init__(self, model: str, device: str, vae: str | None = None) -> None:
        cmd = [sys.executable, "-m", "rflav_cli", "serve", "--model", model, "--device", device]
        cmd += ["--port", "0", "--max-streams", "1"]
        if vae is not None:
            cmd += ["--vae", vae]
        self.proc = subprocess.Popen(
            cmd, cwd=ROOT, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True
        )
        self.lines: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()
        began = time.monotonic()
        while not any("serving " in line for line in self.lines):
            if self.proc.poll() is not None or time.monotonic() - began > 600:
                raise SystemExit("the server did not start:\n" + "\n".join(self.lines))
            time.sleep(0.05)
        self.load_seconds = time.monotonic() - began
        line = next(line for line in self.lines if "serving " in line)
        self.port = int(re.search(r":(\d+)/", line).group(1))
        self.base = f"http://127.0.0.1:{self.port}"

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))

    def get(self, path: str, timeout: float = 30) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(self.base + path, timeout=timeout) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as err:
            return err.code, err.read()

    def status(self) -> dict:
        return json.loads(self.get("/status")[1])

    def stream_path(self, seed: int) -> str:
        """The stream URL's path for the first model served (its first class, if it has classes)."""
        model = json.loads(self.get("/models")[1])["models"][0]
        query = {"model": model["name"], "seed": seed}
        if model["classes"]:
            query["class"] = model["classes"][0]
        return "/stream.mp4?" + urllib.parse.urlencode(query)

    def wait_idle(self, timeout: float = 10) -> None:
        deadline = time.monotonic() + timeout
        while self.status()["streams"]:
            if time.monotonic() > deadline:
                raise SystemExit(f"a generation is still running: {self.status()}")
            time.sleep(0.05)

    def rss_mib(self) -> float:
        """Resident memory of the server and its children (the ffmpeg of each stream)."""
        pids = [self.proc.pid]
        try:
            pids += [
                int(p)
                for p in Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()
            ]
        except OSError:
            pass
        total = 0
        for pid in pids:
            try:
                status = Path(f"/proc/{pid}/status").read_text()
            except OSError:
                continue
            total += int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1))
        return total / 1024

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


# ----------------------------------------------------------------------------------------
# The browser
# ----------------------------------------------------------------------------------------


BROWSER_MISSING = "chromium and chromedriver are not installed (apt-get install chromium chromium-driver)"


def find_browser() -> tuple[str, str] | None:
    """The headless browser's binary and its driver, if both are installed."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    driver = shutil.which("chromedriver")
    return (chromium, driver) if chromium and driver else None


def browser(*extra_args: str):
    """Headless Chromium that plays media without a click (also the page test's browser)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    found = find_browser()
    if found is None:
        raise SystemExit(BROWSER_MISSING)
    chromium, driver = found
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--autoplay-policy=no-user-gesture-required",
        *extra_args,
    ):
        options.add_argument(arg)
    return webdriver.Chrome(options=options, service=Service(driver))


STATE_JS = (
    "const v = document.getElementById('video');"
    "return {time: v.currentTime, audio: v.webkitAudioDecodedByteCount, live: window.rflavLive,"
    " status: document.getElementById('status').textContent};"
)


def start_stream(driver, server: Server, seed: int) -> None:
    from selenium.webdriver.common.by import By

    driver.get(server.base + "/")
    start = driver.find_element(By.ID, "start")
    while not start.is_enabled():
        time.sleep(0.02)
    seed_box = driver.find_element(By.ID, "seed")
    seed_box.clear()
    seed_box.send_keys(str(seed))
    start.click()


def first_frame_seconds(driver, server: Server, trials: int) -> list[float]:
    from selenium.webdriver.common.by import By

    times = []
    for trial in range(trials):
        server.wait_idle()
        start_stream(driver, server, seed=trial)
        deadline = time.monotonic() + 120
        while True:
            state = driver.execute_script(STATE_JS)
            if state["live"]["firstFrameAt"] is not None:
                break
            if state["live"]["error"] or time.monotonic() > deadline:
                raise SystemExit(f"no first frame: {state}")
            time.sleep(0.01)
        times.append((state["live"]["firstFrameAt"] - state["live"]["startedAt"]) / 1000)
        driver.find_element(By.ID, "stop").click()
    return times


def watch(driver, server: Server, minutes: float) -> dict:
    from selenium.webdriver.common.by import By

    server.wait_idle()
    start_stream(driver, server, seed=100)
    began = time.monotonic()
    rss = []
    state = driver.execute_script(STATE_JS)
    while time.monotonic() - began < minutes * 60:
        time.sleep(2)
        state = driver.execute_script(STATE_JS)
        rss.append(server.rss_mib())
        if state["live"]["error"]:
            raise SystemExit(f"playback failed: {state}")
    wall = time.monotonic() - began
    driver.find_element(By.ID, "stop").click()
    live = state["live"]
    return {
        "wall_s": round(wall, 1),
        "played_s": round(state["time"], 1),
        "first_frame_s": round((live["firstFrameAt"] - live["startedAt"]) / 1000, 3),
        "waiting_events": live["waiting"],
        "stalled_s": live["stalledMs"] / 1000,
        "audio_bytes_decoded": state["audio"],
        "server_rss_mib": {"first": round(rss[0], 1), "max": round(max(rss), 1), "last": round(rss[-1], 1)},
    }


# ----------------------------------------------------------------------------------------
# The HTTP player: fragmented MP4 read as it comes, and a model of a player's clock
# ----------------------------------------------------------------------------------------


class Mp4Error(Exception):
    """The stream is not the fragmented MP4 this reader understands."""


@dataclass(frozen=True)
class Fragment:
    """One movie fragment (moof + mdat) of the video track, in the track's time units."""

    start: int  # baseMediaDecodeTime
    duration: int  # sum of its samples' durations
    timescale: int  # units per second (the track's mdhd)
    frames: int
    size: int  # bytes of moof and mdat

    @property
    def start_s(self) -> Fraction:
        return Fraction(self.start, self.timescale)

    @property
    def end_s(self) -> Fraction:
        return Fraction(self.start + self.duration, self.timescale)


def _boxes(data: bytes, start: int = 0, end: int | None = None) -> Iterator[tuple[bytes, int, int]]:
    """(type, payload start, box end) of each box in data[start:end]."""
    end = len(data) if end is None else end
    while start < end:
        if end - start < 8:
            raise Mp4Error(f"a box header cut short at byte {start}")
        size, kind = struct.unpack_from(">I4s", data, start)
        header = 8
        if size == 1:  # 64-bit size after the type
            size, header = struct.unpack_from(">Q", data, start + 8)[0], 16
        elif size == 0:  # up to the end of its container
            size = end - start
        if size < header or start + size > end:
            raise Mp4Error(f"box {kind!r} of {size} bytes does not fit at byte {start}")
        yield kind, start + header, start + size
        start += size


def _child(data: bytes, start: int, end: int, kind: bytes) -> tuple[int, int] | None:
    return next(((s, e) for k, s, e in _boxes(data, start, end) if k == kind), None)


def _full_box(data: bytes, start: int) -> tuple[int, int]:
    """A full box's version and flags."""
    word = struct.unpack_from(">I", data, start)[0]
    return word >> 24, word & 0xFFFFFF


class FragmentReader:
    """Parses a fragmented MP4 fed in pieces of any size: the init segment (ftyp, moov) once,
    then moof + mdat pairs; :meth:`feed` returns the video fragments it completed."""

    def __init__(self) -> None:
        self._pending = bytearray()
        self.video_track: int | None = None
        self.timescale: int | None = None
        self._default_duration = 0  # the video track's trex default_sample_duration
        self._next_start = 0  # where a fragment without tfdt starts
        self._moof: tuple[int, int, int] | None = None  # the last moof's (start, duration, frames)
        self._moof_size = 0
        self.bytes = 0

    def feed(self, chunk: bytes) -> list[Fragment]:
        self.bytes += len(chunk)
        self._pending += chunk
        done = []
        while len(self._pending) >= 8:
            size, kind = struct.unpack_from(">I4s", self._pending)
            if size == 1:
                if len(self._pending) < 16:
                    break
                size = struct.unpack_from(">Q", self._pending, 8)[0]
            elif size == 0:
                raise Mp4Error(f"top-level box {kind!r} runs to the end of an endless stream")
            if size < 8:
                raise Mp4Error(f"top-level box {kind!r} claims {size} bytes")
            if len(self._pending) < size:
                break
            box = bytes(self._pending[:size])
            del self._pending[:size]
            fragment = self._top_level(box)
            if fragment is not None:
                done.append(fragment)
        return done

    def _top_level(self, box: bytes) -> Fragment | None:
        (kind, start, end) = next(_boxes(box))
        if kind == b"moov":
            self._read_moov(box, start, end)
        elif kind == b"moof":
            if self.video_track is None:
                raise Mp4Error("a moof before a moov with a video track")
            self._moof = self._read_moof(box, start, end)
            self._moof_size = len(box)
        elif kind == b"mdat" and self._moof is not None:
            first, duration, frames = self._moof
            self._moof = None
            if frames:
                return Fragment(first, duration, self.timescale, frames, self._moof_size + len(box))
        return None  # ftyp, styp, sidx, mfra, free ...: nothing to play

    def _read_moov(self, data: bytes, start: int, end: int) -> None:
        defaults = {}
        for kind, s, e in _boxes(data, start, end):
            if kind == b"trak":
                tkhd, mdia = _child(data, s, e, b"tkhd"), _child(data, s, e, b"mdia")
                if tkhd is None or mdia is None:
                    continue
                hdlr, mdhd = _child(data, *mdia, b"hdlr"), _child(data, *mdia, b"mdhd")
                if hdlr is None or mdhd is None or data[hdlr[0] + 8 : hdlr[0] + 12] != b"vide":
                    continue
                version = _full_box(data, tkhd[0])[0]
                self.video_track = struct.unpack_from(">I", data, tkhd[0] + (20 if version else 12))[0]
                version = _full_box(data, mdhd[0])[0]
                self.timescale = struct.unpack_from(">I", data, mdhd[0] + (20 if version else 12))[0]
            elif kind == b"mvex":
                for sub, ss, _ in _boxes(data, s, e):
                    if sub == b"trex":
                        track, _index, duration = struct.unpack_from(">III", data, ss + 4)
                        defaults[track] = duration
        if self.video_track is None or not self.timescale:
            raise Mp4Error("the moov has no video track")
        self._default_duration = defaults.get(self.video_track, 0)

    def _read_moof(self, data: bytes, start: int, end: int) -> tuple[int, int, int]:
        """(start, duration, frames) of the video track in this moof; frames 0 if it has none."""
        for kind, s, e in _boxes(data, start, end):
            if kind != b"traf":
                continue
            tfhd = _child(data, s, e, b"tfhd")
            if tfhd is None:
                raise Mp4Error("a traf without tfhd")
            _, flags = _full_box(data, tfhd[0])
            if struct.unpack_from(">I", data, tfhd[0] + 4)[0] != self.video_track:
                continue
            default_duration = self._default_duration
            if flags & 0x08:  # default-sample-duration-present, after the optional fields before it
                offset = tfhd[0] + 8 + (8 if flags & 0x01 else 0) + (4 if flags & 0x02 else 0)
                default_duration = struct.unpack_from(">I", data, offset)[0]
            first = self._next_start
            duration = frames = 0
            for sub, ss, _ in _boxes(data, s, e):
                if sub == b"tfdt":
                    version = _full_box(data, ss)[0]
                    first = struct.unpack_from(">Q" if version else ">I", data, ss + 4)[0]
                elif sub == b"trun":
                    _, run_flags = _full_box(data, ss)
                    count = struct.unpack_from(">I", data, ss + 4)[0]
                    offset = ss + 8 + (4 if run_flags & 0x01 else 0) + (4 if run_flags & 0x04 else 0)
                    per_sample = 4 * bin(run_flags & 0xF00).count("1")
                    if run_flags & 0x100:  # per-sample durations, the first field of each sample
                        duration += sum(
                            struct.unpack_from(">I", data, offset + i * per_sample)[0] for i in range(count)
                        )
                    elif default_duration:
                        duration += count * default_duration
                    elif count:
                        raise Mp4Error("video samples without a duration (no trun, tfhd or trex one)")
                    frames += count
            self._next_start = first + duration
            return first, duration, frames
        return self._next_start, 0, 0


class PlaybackModel:
    """A player's clock, driven by when media arrives.

    Playback starts once `start_buffer_s` of media has arrived; from then the playhead moves
    with the wall clock. When it reaches the end of what has arrived the player stalls: the
    playhead waits there (a stall event, and stalled time until more media comes). Times are
    seconds, wall times on any one clock that never goes back."""

    def __init__(self, start_buffer_s: float) -> None:
        self.start_buffer_s = start_buffer_s
        self.media_start: float | None = None
        self.media_end = 0.0
        self.started_at: float | None = None
        self.playhead = 0.0
        self.stalls = 0
        self.stalled_s = 0.0
        self.stalled = False
        self.clock = float("-inf")  # the wall time the playhead was last brought to

    @property
    def started(self) -> bool:
        return self.started_at is not None

    @property
    def played_s(self) -> float:
        return 0.0 if self.media_start is None else self.playhead - self.media_start

    def playhead_at(self, now: float) -> float:
        """Where the playhead is at `now` (no later than anything received), without moving it."""
        if not self.started or self.stalled:
            return self.playhead
        return min(self.playhead + (now - self.clock), self.media_end)

    def buffered_ahead(self, now: float) -> float:
        return self.media_end - self.playhead_at(now)

    def advance(self, now: float) -> None:
        """Move the clock to `now`: play, or stall at the end of what has arrived."""
        if now < self.clock:
            raise ValueError(f"time went back from {self.clock} to {now}")
        if self.started and not self.stalled:
            left, elapsed = self.media_end - self.playhead, now - self.clock
            if elapsed > left:
                self.playhead = self.media_end
                self.stalled = True
                self.stalls += 1
                self.stalled_s += elapsed - left
            else:
                self.playhead += elapsed
        elif self.stalled:
            self.stalled_s += now - self.clock
        self.clock = now

    def receive(self, now: float, start: float, end: float) -> None:
        """Media from `start` to `end` seconds arrived at `now`."""
        self.advance(now)
        if self.media_start is None:
            self.media_start = self.playhead = self.media_end = start
        self.media_end = max(self.media_end, end)
        # Fragment times are exact fractions turned into floats: a hair of rounding must not
        # hold playback back by one more fragment.
        if not self.started and self.media_end - self.media_start >= self.start_buffer_s - 1e-9:
            self.started_at = now
        if self.stalled and self.media_end > self.playhead:
            self.stalled = False


_RECEIVE_BUFFER = 1 << 15


class HttpStream:
    """One GET, its body read by a thread one piece per :meth:`ask` (as a player asks for
    more only when it wants it), each piece stamped with its arrival (time.perf_counter) in
    :attr:`pieces`; an empty piece is the end of the stream."""

    def __init__(self, url: str) -> None:
        parts = urllib.parse.urlsplit(url)
        path = parts.path + (f"?{parts.query}" if parts.query else "")
        self.requested_at = time.perf_counter()
        self._conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=600)
        # A small receive buffer (set before connecting, so the TCP window is small too): while
        # the player does not read, the server is held back soon, as by a player's own buffer,
        # instead of filling megabytes of kernel memory that the next read would take at once.
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _RECEIVE_BUFFER)
        self._sock.settimeout(600)
        self._sock.connect((parts.hostname, parts.port))
        self._conn.sock = self._sock  # shut down by close(), which wakes a read in progress
        self._conn.request("GET", path)
        self.response = self._conn.getresponse()
        if self.response.status != 200:
            body = self.response.read().decode(errors="replace").strip()
            self._conn.close()
            raise SystemExit(f"the stream was refused: HTTP {self.response.status} {body}")
        self.pieces: queue.Queue[tuple[float, bytes]] = queue.Queue()
        self._asked = threading.Semaphore(0)
        self._closing = False
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def ask(self) -> None:
        """Read one more piece: what has arrived, or the next bytes to arrive."""
        self._asked.release()

    def _read(self) -> None:
        try:
            while not self._closing:
                self._asked.acquire()
                if self._closing:
                    break
                piece = self.response.read1(1 << 16)
                self.pieces.put((time.perf_counter(), piece))
                if not piece:
                    return
        except (OSError, ValueError, http.client.HTTPException):
            pass
        if not self._closing:
            self.pieces.put((time.perf_counter(), b""))  # the stream broke: its end

    def close(self) -> None:
        self._closing = True
        self._asked.release()
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._thread.join(10)
        self.response.close()
        self._conn.close()


def watch_http(
    url: str,
    *,
    seconds: float,
    start_buffer_s: float = 1.0,
    ahead_s: float = 4.0,
    until_started: bool = False,
    rss: Callable[[], float] | None = None,
) -> dict:
    """Watch the stream at `url` for `seconds` from the request (or until playback starts) with
    a :class:`PlaybackModel`; `rss` is sampled every 2 s of playback."""
    if ahead_s < start_buffer_s:
        raise SystemExit(f"--ahead {ahead_s} must be at least --start-buffer {start_buffer_s}")
    reader, player = FragmentReader(), PlaybackModel(start_buffer_s)
    stream = HttpStream(url)
    began = stream.requested_at
    deadline = began + seconds
    first_fragment_at = None
    ended = False
    memory: list[float] = []
    next_sample = float("inf")
    asked = False  # a read is in progress
    try:
        while (now := time.perf_counter()) < deadline:
            if rss is not None and now >= next_sample:
                memory.append(rss())
                next_sample += 2
            wait = min(deadline, next_sample) - now
            # Read only while less than ahead_s is buffered, as the page does, so that the
            # generation runs at the pace of playback; wake when the playhead has caught up.
            if not asked:
                ahead = player.buffered_ahead(now)
                if ahead <= ahead_s:
                    stream.ask()
                    asked = True
                else:
                    wait = min(wait, ahead - ahead_s)
            try:
                arrived, piece = stream.pieces.get(timeout=max(wait, 1e-3))
            except queue.Empty:
                continue
            asked = False
            if not piece:
                ended = True
                break
            for fragment in reader.feed(piece):
                if first_fragment_at is None:
                    first_fragment_at = arrived
                was_started = player.started
                player.receive(arrived, float(fragment.start_s), float(fragment.end_s))
                if player.started and not was_started and rss is not None:
                    next_sample = arrived
            if until_started and player.started:
                break
    finally:
        stream.close()
    # The end of the watch (a piece may have been stamped a hair after the deadline).
    end = max(min(time.perf_counter(), deadline), player.clock)
    player.advance(end)
    if first_fragment_at is None or not player.started:
        raise SystemExit(
            f"playback did not start within {seconds:.0f} s: {reader.bytes} bytes, "
            f"{player.media_end - (player.media_start or 0):.2f} s of video received"
        )
    report = {
        "wall_s": round(end - began, 3),
        "first_fragment_s": round(first_fragment_at - began, 3),
        "playback_start_s": round(player.started_at - began, 3),
        "played_s": round(player.played_s, 3),
        "received_s": round(player.media_end - player.media_start, 3),
        "stalls": player.stalls,
        "stalled_s": round(player.stalled_s, 3),
        "bytes": reader.bytes,
        "ended": ended,  # the server ended the stream before `seconds`
    }
    if memory:
        report["server_rss_mib"] = {
            "first": round(memory[0], 1),
            "max": round(max(memory), 1),
            "last": round(memory[-1], 1),
        }
    return report


def http_starts(server: Server, trials: int, start_buffer_s: float, ahead_s: float) -> list[dict]:
    times = []
    for trial in range(trials):
        server.wait_idle()
        watched = watch_http(
            server.base + server.stream_path(trial),
            seconds=600,
            start_buffer_s=start_buffer_s,
            ahead_s=ahead_s,
            until_started=True,
        )
        times.append(watched)
    return times


def http_watch(server: Server, minutes: float, start_buffer_s: float, ahead_s: float) -> dict:
    server.wait_idle()
    return watch_http(
        server.base + server.stream_path(100),
        seconds=minutes * 60,
        start_buffer_s=start_buffer_s,
        ahead_s=ahead_s,
        rss=server.rss_mib,
    )


# ----------------------------------------------------------------------------------------
# Many clients at once
# ----------------------------------------------------------------------------------------


def crowd(server: Server, clients: int, hold: float) -> dict:
    server.wait_idle()
    rss_before = server.rss_mib()
    barrier = threading.Barrier(clients)
    results: list[dict] = [{} for _ in range(clients)]
    streaming: list[socket.socket] = []
    lock = threading.Lock()

    paths = [server.stream_path(i) for i in range(clients)]

    def client(i: int) -> None:
        barrier.wait()
        t = time.perf_counter()
        code, page = server.get("/")
        results[i]["page_s"] = time.perf_counter() - t
        results[i]["page_ok"] = code == 200 and b"<video" in page
        sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.sendall(f"GET {paths[i]} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        head = b""
        while b"\r\n\r\n" not in head:
            head += sock.recv(1)
        results[i]["code"] = int(head.split()[1])
        if results[i]["code"] == 200:
            with lock:
                streaming.append(sock)  # held, and never read again: the slowest possible viewer
        else:
            body = head.split(b"\r\n\r\n", 1)[1]
            while chunk := sock.recv(4096):
                body += chunk
                if b"\n" in body:
                    break
            results[i]["reason"] = body.decode().strip().splitlines()[-1]
            sock.close()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    running = [server.status()["streams"]]
    rss, frames = [], []
    began = time.monotonic()
    grew_until = 0.0  # when the held stream's generation last moved on
    while time.monotonic() - began < hold:
        time.sleep(1)
        status = server.status()
        running.append(status["streams"])
        frames.append(status["generations"][0]["frames"] if status["generations"] else None)
        if len(frames) > 1 and frames[-1] != frames[-2]:
            grew_until = time.monotonic() - began
        rss.append(server.rss_mib())
    for sock in streaming:
        sock.close()
    page_times = [r["page_s"] for r in results]
    reasons = sorted({r["reason"] for r in results if "reason" in r})
    return {
        "clients": clients,
        "pages_ok": sum(r["page_ok"] for r in results),
        "page_load_s": {"median": round(statistics.median(page_times), 3), "max": round(max(page_times), 3)},
        "answers": {
            str(code): sum(r["code"] == code for r in results)
            for code in sorted({r["code"] for r in results})
        },
        "refusal": reasons,
        "generations_running": sorted(set(running)),
        "held_s": hold,
        "frames_while_held": {
            "first": frames[0],
            "last": frames[-1],
            "stopped_growing_after_s": round(grew_until),
        },
        "server_rss_mib": {
            "before": round(rss_before, 1),
            "max": round(max(rss), 1),
            "last": round(rss[-1], 1),
        },
    }


# ----------------------------------------------------------------------------------------


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        cpu = re.search(r"model name\s*:\s*(.+)", Path("/proc/cpuinfo").read_text()).group(1)
    except (OSError, AttributeError):
        pass
    return f"{cpu}, {os.cpu_count()} cores"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="ball")
    parser.add_argument("--vae", default=None, help="passed to rflav serve --vae")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--player", choices=("browser", "http"), default="browser")
    parser.add_argument("--minutes", type=float, default=5.0, help="length of the watched stream")
    parser.add_argument("--starts", type=int, default=3, help="starts timed to the first frame")
    parser.add_argument(
        "--start-buffer",
        type=float,
        default=1.0,
        help="http player: seconds of video received before playback starts",
    )
    parser.add_argument(
        "--ahead",
        type=float,
        default=4.0,
        help="http player: reads only while less than this many seconds are buffered (as the page)",
    )
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument(
        "--hold", type=float, default=30.0, help="seconds the crowd's one stream is held unread"
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.player == "http" and not 0 <= args.start_buffer <= args.ahead:
        parser.error("--start-buffer must be from 0 to --ahead")

    server = Server(args.model, args.device, args.vae)
    report: dict = {
        "machine": machine(),
        "model": args.model,
        "device": args.device,
        "player": args.player,
    }
    try:
        report["server_start_s"] = round(server.load_seconds, 2)
        if args.player == "http":
            report["start_buffer_s"], report["ahead_s"] = args.start_buffer, args.ahead
            starts = http_starts(server, args.starts, args.start_buffer, args.ahead)
            first = [s["first_fragment_s"] for s in starts]
            begun = [s["playback_start_s"] for s in starts]
            report["first_frame_s"] = {"each": first, "median": round(statistics.median(first), 3)}
            report["playback_start_s"] = {"each": begun, "median": round(statistics.median(begun), 3)}
            report["stream"] = http_watch(server, args.minutes, args.start_buffer, args.ahead)
        else:
            driver = browser()
            try:
                starts = first_frame_seconds(driver, server, args.starts)
                report["first_frame_s"] = {
                    "each": [round(t, 3) for t in starts],
                    "median": round(statistics.median(starts), 3),
                }
                report["stream"] = watch(driver, server, args.minutes)
            finally:
                driver.quit()
        report["crowd"] = crowd(server, args.clients, args.hold)
    finally:
        server.stop()

    if args.json:  # one line: a log's last lines hold all of it
        print(json.dumps(report))
        return
    s, c = report["stream"], report["crowd"]
    print(
        f"machine: {report['machine']}; model {args.model} on {args.device}; "
        f"server ready in {report['server_start_s']} s; player {args.player}"
    )
    if args.player == "http":
        print(
            f"first complete video fragment after the request: median {report['first_frame_s']['median']} s "
            f"({report['first_frame_s']['each']}); playback start ({args.start_buffer} s buffered): "
            f"median {report['playback_start_s']['median']} s ({report['playback_start_s']['each']})"
        )
        print(
            f"stream: {s['played_s']} s played in {s['wall_s']} s ({s['received_s']} s received, "
            f"{s['bytes']} bytes); {s['stalls']} stalls, {s['stalled_s']:.2f} s stalled; "
            f"server RSS {s['server_rss_mib']}" + ("; the server ended the stream" if s["ended"] else "")
        )
    else:
        print(
            f"first frame after Start: median {report['first_frame_s']['median']} s "
            f"({report['first_frame_s']['each']})"
        )
        print(
            f"stream: {s['played_s']} s played in {s['wall_s']} s; {s['waiting_events']} waiting events, "
            f"{s['stalled_s']:.2f} s stalled; server RSS {s['server_rss_mib']}"
        )
    print(
        f"crowd of {c['clients']}: pages {c['pages_ok']}/{c['clients']} ok, "
        f"load median {c['page_load_s']['median']} s, "
        f"max {c['page_load_s']['max']} s; answers {c['answers']}; "
        f"generations running {c['generations_running']}"
    )
    print(f"  refused with: {c['refusal']}")
    print(
        f"  one stream held unread {c['held_s']:.0f} s: generated frames {c['frames_while_held']}, "
        f"server RSS {c['server_rss_mib']} MiB"
    )


if __name__ == "__main__":
    main()
