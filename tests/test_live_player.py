"""The browserless player of benchmarks/live.py: its fragmented-MP4 reader against streams that
VideoWriter makes and against hand-built boxes, its player model against hand-computed stalls,
and the whole client against a local server that pauses mid-stream."""

from __future__ import annotations

import shutil
import struct
import threading
import time
from fractions import Fraction
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from conftest import load_benchmark

from rflav_cli import media
from rflav_cli.media import VideoWriter

live = load_benchmark("live")
needs_ffmpeg = pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="needs ffmpeg")

FPS, SPF, SIZE = 10, 1600, 32


def writer_stream(frames: int) -> bytes:
    """The live MP4 that VideoWriter sends down a pipe for `frames` frames and their sound."""
    writer = VideoWriter(media.PIPE, width=SIZE, height=SIZE, fps=FPS)
    pieces: list[bytes] = []

    def read() -> None:
        while piece := writer.stream.read1(1 << 16):
            pieces.append(piece)

    reader = threading.Thread(target=read)
    reader.start()
    for i in range(frames):
        writer.write(np.full((SIZE, SIZE, 3), 9 * i % 256, np.uint8), np.zeros(SPF, np.float32))
    writer.close()
    reader.join(30)
    return b"".join(pieces)


@pytest.fixture(scope="module")
def stream_bytes() -> bytes:
    if shutil.which("ffmpeg") is None:
        pytest.skip("needs ffmpeg")
    return writer_stream(37)  # 3.7 s: not a whole number of fragments or keyframe intervals


# ---------------------------------------------------------------------------- the reader


@needs_ffmpeg
def test_reader_finds_every_frame_of_a_writer_stream_and_its_exact_media_time(stream_bytes):
    reader = live.FragmentReader()
    fragments = reader.feed(stream_bytes)
    assert reader.timescale and reader.video_track is not None
    assert sum(f.frames for f in fragments) == 37
    assert fragments[0].start == 0
    for before, after in zip(fragments, fragments[1:]):
        assert after.start == before.start + before.duration  # no gap, no overlap
    assert sum(f.duration for f in fragments) == 37 * reader.timescale // FPS
    assert fragments[-1].end_s == Fraction(37, FPS)
    # Every byte after the init segment belongs to a fragment, up to the closing mfra.
    assert sum(f.size for f in fragments) < len(stream_bytes)


@needs_ffmpeg
@pytest.mark.parametrize("piece", [1, 7, 1000])
def test_reader_gives_the_same_fragments_whatever_the_pieces(stream_bytes, piece):
    whole = live.FragmentReader().feed(stream_bytes)
    reader = live.FragmentReader()
    fragments = []
    for i in range(0, len(stream_bytes), piece):
        fragments += reader.feed(stream_bytes[i : i + piece])
    assert fragments == whole


def box(kind: bytes, payload: bytes, *, large: bool = False) -> bytes:
    if large:
        return struct.pack(">I4sQ", 1, kind, 16 + len(payload)) + payload
    return struct.pack(">I4s", 8 + len(payload), kind) + payload


def full_box(kind: bytes, version: int, flags: int, payload: bytes) -> bytes:
    return box(kind, struct.pack(">I", version << 24 | flags) + payload)


def trak(track_id: int, handler: bytes, timescale: int) -> bytes:
    tkhd = full_box(b"tkhd", 0, 7, struct.pack(">III", 0, 0, track_id) + bytes(68))
    mdhd = full_box(b"mdhd", 1, 0, struct.pack(">QQIQ", 0, 0, timescale, 0) + bytes(4))
    hdlr = full_box(b"hdlr", 0, 0, bytes(4) + handler + bytes(12) + b"x\0")
    return box(b"trak", tkhd + box(b"mdia", mdhd + hdlr))


def trex(track_id: int, duration: int) -> bytes:
    return full_box(b"trex", 0, 0, struct.pack(">IIIII", track_id, 1, duration, 0, 0))


def test_reader_on_hand_built_boxes_every_way_of_giving_durations():
    # Audio is track 1, video track 7 (timescale 90000, trex default 3000); a tfdt of
    # version 1, a 64-bit moof size, a tfhd default after base-data-offset, per-sample
    # durations, a fragment with no video, and one without tfdt (it follows the previous one).
    moov = box(b"moov", trak(1, b"soun", 16000) + trak(7, b"vide", 90000) + box(b"mvex", trex(7, 3000)))
    audio_traf = box(
        b"traf", full_box(b"tfhd", 0, 0, struct.pack(">I", 1)) + full_box(b"trun", 0, 0, b"\0\0\0\5")
    )

    def moof(video_traf: bytes, *, large: bool = False) -> bytes:
        return box(b"moof", full_box(b"mfhd", 0, 0, b"\0\0\0\1") + audio_traf + video_traf, large=large)

    def traf(tfhd_flags: int, tfhd_fields: bytes, tfdt: bytes, trun_flags: int, trun_fields: bytes) -> bytes:
        return box(
            b"traf",
            full_box(b"tfhd", 0, tfhd_flags, struct.pack(">I", 7) + tfhd_fields)
            + tfdt
            + full_box(b"trun", 0, trun_flags, trun_fields),
        )

    stream = box(b"ftyp", b"iso5\0\0\0\0") + moov
    # trex default: 4 samples of 3000 from 900000 (10 s), tfdt of version 1.
    stream += moof(traf(0, b"", full_box(b"tfdt", 1, 0, struct.pack(">Q", 900000)), 0, b"\0\0\0\4"))
    stream += box(b"mdat", b"abcd")
    # tfhd default duration 1500 after a base data offset and a sample description index; 64-bit moof.
    fields = struct.pack(">QII", 0, 1, 1500)
    run = struct.pack(">Ii", 2, 0)  # 2 samples, a data offset
    stream += moof(
        traf(0x0B, fields, full_box(b"tfdt", 0, 0, struct.pack(">I", 912000)), 0x01, run), large=True
    )
    stream += box(b"mdat", b"")
    # Per-sample durations and sizes, first-sample flags: 1000 + 2000 + 500; no tfdt.
    run = struct.pack(">II", 3, 0) + struct.pack(">6I", 1000, 10, 2000, 10, 500, 10)
    stream += moof(traf(0x08, struct.pack(">I", 7777), b"", 0x304, run))
    stream += box(b"mdat", b"x" * 30)
    # A fragment with sound only, then a free box.
    stream += box(b"moof", full_box(b"mfhd", 0, 0, b"\0\0\0\4") + audio_traf) + box(b"mdat", b"")
    stream += box(b"free", b"")

    reader = live.FragmentReader()
    fragments = [f for i in range(len(stream)) for f in reader.feed(stream[i : i + 1])]
    assert (reader.video_track, reader.timescale) == (7, 90000)
    assert [(f.start, f.duration, f.frames) for f in fragments] == [
        (900000, 12000, 4),
        (912000, 3000, 2),
        (915000, 3500, 3),
    ]
    assert fragments[-1].end_s == Fraction(918500, 90000)


def test_reader_refuses_what_it_cannot_play():
    with pytest.raises(live.Mp4Error, match="no video track"):
        live.FragmentReader().feed(box(b"moov", trak(1, b"soun", 16000)))
    with pytest.raises(live.Mp4Error, match="moof before a moov"):
        live.FragmentReader().feed(box(b"moof", b""))
    with pytest.raises(live.Mp4Error, match="end of an endless stream"):
        live.FragmentReader().feed(struct.pack(">I4s", 0, b"mdat"))


# ---------------------------------------------------------------------------- the player model


def test_player_model_stalls_as_computed_by_hand():
    # Fragments of 0.5 s; times in quarters of a second, exact in binary.
    player = live.PlaybackModel(start_buffer_s=1.0)
    player.receive(0.25, 0.0, 0.5)
    assert not player.started and player.playhead_at(0.4) == 0.0
    player.receive(0.5, 0.5, 1.0)  # 1 s buffered: playback starts
    assert player.started_at == 0.5
    player.receive(1.0, 1.0, 1.5)
    assert player.playhead == 0.5 and player.buffered_ahead(1.25) == 0.75
    # The playhead reaches 1.5 at 2.0 and waits there until the next fragment at 2.75.
    assert player.playhead_at(2.5) == 1.5
    player.receive(2.75, 1.5, 2.0)
    assert (player.stalls, player.stalled_s, player.playhead) == (1, 0.75, 1.5)
    assert not player.stalled
    player.receive(3.0, 2.0, 2.5)
    assert player.playhead == 1.75
    # Arriving just as the playhead gets there is no stall.
    player.receive(3.75, 2.5, 3.0)
    assert (player.stalls, player.playhead) == (1, 2.5)
    # Out of media at 4.25; a stall in progress counts, and goes on.
    player.advance(6.0)
    assert (player.stalls, player.stalled_s, player.played_s) == (2, 2.5, 3.0)
    player.advance(6.5)
    assert (player.stalls, player.stalled_s, player.played_s) == (2, 3.0, 3.0)
    # Played and stalled time add up to the time since playback started.
    assert player.played_s + player.stalled_s == 6.5 - player.started_at
    with pytest.raises(ValueError, match="time went back"):
        player.advance(6.0)


def test_player_model_starts_from_the_first_fragments_time_and_waits_for_its_buffer():
    player = live.PlaybackModel(start_buffer_s=0.75)
    player.receive(2.0, 10.0, 10.25)
    player.receive(5.0, 10.25, 10.5)  # slow arrivals before playback are no stalls
    player.receive(5.5, 10.5, 10.75)
    assert player.started_at == 5.5
    player.advance(6.0)
    assert (player.playhead, player.played_s, player.stalls, player.stalled_s) == (10.5, 0.5, 0, 0.0)
    immediate = live.PlaybackModel(start_buffer_s=0.0)
    immediate.receive(1.0, 0.0, 0.125)
    assert immediate.started_at == 1.0


# ---------------------------------------------------------------------------- the whole client


class _PausingHandler(BaseHTTPRequestHandler):
    """Sends the init segment and the first second of video at once, the rest `pause` s later,
    then holds the connection until the client leaves."""

    split: bytes
    rest: bytes
    pause = 1.5
    left = threading.Event()

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("content-type", "video/mp4")
        self.end_headers()
        try:
            self.wfile.write(self.split)
            self.wfile.flush()
            time.sleep(self.pause)
            self.wfile.write(self.rest)
            self.wfile.flush()
        except OSError:
            return
        self.left.wait(10)

    def log_message(self, *args) -> None:
        pass


@needs_ffmpeg
def test_http_player_counts_the_stall_of_a_server_that_pauses(stream_bytes):
    fragments = live.FragmentReader().feed(stream_bytes)
    cut = _end_of_fragment(stream_bytes, sum(f.end_s <= 1 for f in fragments))
    _PausingHandler.split, _PausingHandler.rest = stream_bytes[:cut], stream_bytes[cut:]
    _PausingHandler.left.clear()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _PausingHandler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/stream.mp4?seed=1"
        watched = live.watch_http(url, seconds=2.5, start_buffer_s=1.0, ahead_s=4.0)
    finally:
        _PausingHandler.left.set()
        server.shutdown()
        server.server_close()
    # Playback starts on the first second, runs out at about 1 s and waits out the rest of the
    # 1.5 s pause: one stall of about 0.5 s (the scheduling of two threads on a busy machine
    # may add to it, never take much from it).
    start = watched["playback_start_s"]
    assert 0 <= watched["first_fragment_s"] <= start < 0.5
    assert watched["stalls"] == 1
    assert 1.5 - 1.0 - start - 0.05 <= watched["stalled_s"] <= 0.5 + 0.3
    assert watched["received_s"] == 3.7 and not watched["ended"]
    assert abs(watched["played_s"] + watched["stalled_s"] - (watched["wall_s"] - start)) < 2e-3


def _end_of_fragment(data: bytes, count: int) -> int:
    """Byte offset just after the `count`-th mdat of a fragmented MP4."""
    offset = 0
    while count:
        size, kind = struct.unpack_from(">I4s", data, offset)
        offset += size
        count -= kind == b"mdat"
    return offset
