"""rflav_cli.runtime: device and precision names, stop signals, the torchrun group."""

from __future__ import annotations

import gc
import os
import signal
import threading
import time
import weakref

import pytest
import torch

from rflav_cli.bench import TINY, flav_config
from rflav_cli.cli import _flag
from rflav_cli.errors import UsageError
from rflav_cli.models.flav import FLAV
from rflav_cli.runtime import (
    CudaGraphReplay,
    Dist,
    WorkerThread,
    check_one_process_per_gpu,
    compile_cache_dir,
    init_distributed,
    persist_compile_cache,
    pick_device,
    pick_dtype,
    rank_device,
    resolve_device,
    stop_on_signals,
    tf32_scope,
    use_tf32,
)


def test_unknown_device_is_a_usage_error_naming_the_flag():
    with pytest.raises(UsageError) as err:
        pick_device("tpu")
    assert str(err.value) == "unknown device 'tpu': use auto, cuda (or cuda:N), mps or cpu"
    assert err.value.render(_flag).startswith("unknown --device 'tpu'")


def test_unavailable_cuda_and_cpu_fp16_are_usage_errors():
    if not torch.cuda.is_available():
        with pytest.raises(UsageError, match="no CUDA GPU is visible"):
            pick_device("cuda:0")
    with pytest.raises(UsageError, match="fp16 is not supported on CPU"):
        pick_dtype("fp16", torch.device("cpu"))
    with pytest.raises(UsageError, match="unknown dtype 'fp8'"):
        pick_dtype("fp8", torch.device("cpu"))


def test_names_and_devices_resolve_alike():
    cpu = torch.device("cpu")
    assert resolve_device("cpu") == resolve_device(cpu) == rank_device("cpu") == cpu
    assert resolve_device(None) == pick_device("auto")
    assert pick_dtype("bf16", cpu) is torch.bfloat16 and pick_dtype("fp32", cpu) is torch.float32


def test_without_torchrun_there_is_no_group(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert init_distributed(torch.device("cpu")) == Dist(0, 1, 0)
    assert not torch.distributed.is_initialized()


def test_torchrun_processes_take_the_node_gpus_in_turn_and_training_keeps_one_each(monkeypatch):
    """Generating or evaluating, a node may run more processes than it has GPUs (they share
    them: LOCAL_RANK modulo the GPU count); training refuses that in one line."""
    chosen: list[torch.device] = []
    monkeypatch.setattr("rflav_cli.runtime.pick_device", lambda name: torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    for gpus, local_rank, expected in ((1, 1, 0), (2, 3, 1), (2, 0, 0), (4, 2, 2)):
        monkeypatch.setattr(torch.cuda, "device_count", lambda gpus=gpus: gpus)
        monkeypatch.setenv("LOCAL_RANK", str(local_rank))
        assert rank_device("cuda") == torch.device("cuda", expected)
        assert chosen[-1] == torch.device("cuda", expected)

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    with pytest.raises(
        UsageError,
        match=r"2 processes on this node, which has 1 visible GPU\(s\): train with --nproc-per-node 1",
    ):
        check_one_process_per_gpu(torch.device("cuda", 0))
    check_one_process_per_gpu(torch.device("cpu"))  # gloo on CPU: any number of processes
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    check_one_process_per_gpu(torch.device("cuda", 0))


def test_a_gpu_chosen_by_number_becomes_the_current_one(monkeypatch):
    """Events and streams made without naming a device go to the current one: with --device
    cuda:1 that must be GPU 1, not GPU 0."""
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    chosen: list[torch.device] = []
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    monkeypatch.setattr("rflav_cli.runtime.pick_device", lambda name: torch.device(name))
    assert rank_device("cuda:1") == torch.device("cuda", 1)
    assert chosen == [torch.device("cuda", 1)]
    rank_device("cuda")  # the current GPU stays the current one
    rank_device("cpu")
    assert chosen == [torch.device("cuda", 1)]


def test_first_signal_asks_to_stop_second_interrupts():
    before = signal.getsignal(signal.SIGTERM)
    with stop_on_signals() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.is_set() and stop.signum == signal.SIGTERM
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGTERM) is before


def test_tf32_is_set_for_cuda_only():
    """fp32 on CUDA runs its products in TensorFloat-32 as the reference does, unless turned
    off; other devices leave torch's settings alone."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        use_tf32(torch.device("cpu"))
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
        use_tf32(torch.device("cuda"))
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        use_tf32(torch.device("cuda", 1), enabled=False)
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32

        # A scope leaves the setting as it found it, whatever is set inside.
        with tf32_scope(torch.device("cuda"), enabled=True):
            assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
            use_tf32(torch.device("cuda"), enabled=False)
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
        with tf32_scope():  # no change inside
            assert not torch.backends.cuda.matmul.allow_tf32
            use_tf32(torch.device("cuda"))  # e.g. a pipeline built inside
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def test_compile_cache_outlives_the_temporary_folder(monkeypatch, tmp_path):
    """Compiling keeps torch's compiled code under the user's cache folder, so that a second run
    starts hot; a folder chosen with TORCHINDUCTOR_CACHE_DIR or RFLAV_COMPILE_CACHE wins."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "unset below")  # restored after the test
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR")
    monkeypatch.delenv("RFLAV_COMPILE_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert compile_cache_dir() == tmp_path / "xdg" / "rflav" / "torch-compile"
    FLAV(flav_config(TINY)).compile_blocks()  # compiles lazily: only the cache folder is chosen here
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "xdg" / "rflav" / "torch-compile")

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    persist_compile_cache()
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "mine")
    monkeypatch.setenv("RFLAV_COMPILE_CACHE", str(tmp_path / "ours"))
    assert compile_cache_dir() == tmp_path / "ours"


class _HostGraph:
    """What a CUDA graph does, on the host: replay reruns the captured function on the same
    input buffers and writes into the same output buffers."""

    def __init__(self, fn, static_inputs, static_outputs):
        self.fn, self.static_inputs, self.static_outputs = fn, static_inputs, static_outputs

    def replay(self) -> None:
        for buffer, out in zip(self.static_outputs, self.fn(*self.static_inputs)):
            buffer.copy_(out)


class _HostGraphReplay(CudaGraphReplay):
    """CudaGraphReplay with the CUDA capture replaced by _HostGraph, so its bookkeeping (the
    buffers, which calls replay, whose graphs they are) runs on any machine."""

    def __init__(self, fn, graph_shape=lambda shape: True):
        super().__init__(fn, graph_shape)
        self.captures: list[tuple[int, weakref.ref]] = []

    def _replays(self, inputs):
        return not torch.is_grad_enabled() and self.graph_shape(inputs[0].shape)

    def _capture(self, inputs):
        static_inputs = [x.clone() for x in inputs]
        static_outputs = tuple(out.clone() for out in self.fn(*static_inputs))
        graph = _HostGraph(self.fn, static_inputs, static_outputs)
        self.captures.append((threading.get_ident(), weakref.ref(graph)))
        return graph, static_inputs, static_outputs


def test_graph_replay_copies_in_and_out_and_keeps_one_graph_per_thread_and_shape():
    def step(x, y):
        return x * 2 + y, x - y

    replay = _HostGraphReplay(step, graph_shape=lambda shape: shape[0] == 4)
    x, y = torch.arange(4.0), torch.ones(4)
    with torch.no_grad():
        first = replay(x, y)
        second = replay(x + 10, y)  # replays the first capture over the same buffers
        assert len(replay.captures) == 1
        torch.testing.assert_close(first, step(x, y), rtol=0, atol=0)  # not overwritten
        torch.testing.assert_close(second, step(x + 10, y), rtol=0, atol=0)
        replay(torch.arange(4.0, dtype=torch.float64), torch.ones(4, dtype=torch.float64))
        assert len(replay.captures) == 2  # a new dtype is a new graph
        replay(torch.arange(3.0), torch.ones(3))  # a shape graph_shape rejects: called directly
    replay(x, y)  # gradients tracked: called directly
    assert len(replay.captures) == 2
    with torch.inference_mode():  # its buffers would be inference tensors: a graph of its own
        torch.testing.assert_close(replay(x, y), step(x, y), rtol=0, atol=0)
    assert len(replay.captures) == 3
    with torch.no_grad():
        torch.testing.assert_close(replay(x + 2, y), step(x + 2, y), rtol=0, atol=0)
    assert len(replay.captures) == 3

    results = {}

    def other_thread():
        with torch.no_grad():
            results["out"] = replay(x + 1, y)

    thread = threading.Thread(target=other_thread)
    thread.start()
    thread.join()
    torch.testing.assert_close(results["out"], step(x + 1, y), rtol=0, atol=0)
    (owner, graph), main = replay.captures[-1], threading.get_ident()
    assert len(replay.captures) == 4 and owner != main  # the thread captured its own graph ...
    gc.collect()
    assert graph() is None  # ... which went with the thread
    assert all(g() is not None for owner, g in replay.captures[:3])  # this thread's stay


def test_a_ctrl_c_while_waiting_for_a_worker_leaves_it_known_as_running():
    """Ctrl-C inside Thread.join() makes CPython (up to 3.12) take a running thread for stopped,
    and exit under it; WorkerThread.wait() keeps the truth, so the interpreter waits for it."""
    release = threading.Event()
    done = []

    def work():
        time.sleep(0.2)  # the main thread is waiting below by then
        signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)  # a Ctrl-C
        release.wait(30)
        done.append(True)

    worker = WorkerThread(target=work, name="work")
    assert not worker.daemon
    worker.start()
    with pytest.raises(KeyboardInterrupt):
        worker.wait()
    assert worker.is_alive() and not worker.finished.is_set()
    release.set()
    assert worker.wait(timeout=30) and done == [True]
    worker.join(timeout=30)
    assert not worker.is_alive()
