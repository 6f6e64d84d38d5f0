"""Watching live: `rflav serve` measured from a real browser and under a crowd.

    python benchmarks/live.py                                   # ball, 5-minute stream
    python benchmarks/live.py --minutes 1 --device cpu          # a quicker run
    python benchmarks/live.py --model dance --device cuda

Starts `rflav serve --max-streams 1` on a free port and measures, in headless Chromium
(chromium and chromedriver, selenium):

- first frame: from pressing Start to the first video frame painted (the page's
  requestVideoFrameCallback), over a few starts;
- stalls over an N-minute stream: `waiting` events and the time the playhead stood still while
  playing, against the video time played;
- load: `--clients` clients at once, each loading the page then asking for a stream: page load
  times, how many streams ran (must be one) and what the others were told; the one stream is
  then held without reading for `--hold` seconds while the server's memory (RSS of the server
  and its ffmpeg processes) is sampled: a slow client must not grow it.

Prints the figures, and one JSON object with --json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------------
# The server
# ----------------------------------------------------------------------------------------


class Server:
    def __init__(self, model: str, device: str) -> None:
        cmd = [sys.executable, "-m", "rflav_cli", "serve", "--model", model, "--device", device]
        cmd += ["--port", "0", "--max-streams", "1"]
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


def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    driver = shutil.which("chromedriver")
    if chromium is None or driver is None:
        raise SystemExit("needs chromium and chromedriver (apt-get install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--autoplay-policy=no-user-gesture-required",
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
# Many clients at once
# ----------------------------------------------------------------------------------------


def crowd(server: Server, clients: int, hold: float) -> dict:
    server.wait_idle()
    rss_before = server.rss_mib()
    barrier = threading.Barrier(clients)
    results: list[dict] = [{} for _ in range(clients)]
    streaming: list[socket.socket] = []
    lock = threading.Lock()

    def client(i: int) -> None:
        barrier.wait()
        t = time.perf_counter()
        code, page = server.get("/")
        results[i]["page_s"] = time.perf_counter() - t
        results[i]["page_ok"] = code == 200 and b"<video" in page
        sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.sendall(f"GET /stream.mp4?seed={i} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
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
    parser.add_argument("--device", default="auto")
    parser.add_argument("--minutes", type=float, default=5.0, help="length of the watched stream")
    parser.add_argument("--starts", type=int, default=3, help="starts timed to the first frame")
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument(
        "--hold", type=float, default=30.0, help="seconds the crowd's one stream is held unread"
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    server = Server(args.model, args.device)
    report: dict = {"machine": machine(), "model": args.model, "device": args.device}
    try:
        report["server_start_s"] = round(server.load_seconds, 2)
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

    if args.json:
        print(json.dumps(report, indent=2))
        return
    s, c = report["stream"], report["crowd"]
    print(
        f"machine: {report['machine']}; model {args.model} on {args.device}; "
        f"server ready in {report['server_start_s']} s"
    )
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
