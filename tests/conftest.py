from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

FIXTURES = Path(__file__).parent / "fixtures"

# Fixtures were produced with 2 CPU threads; match that so float32 sums round alike.
torch.set_num_threads(2)


def load_fixture(name: str) -> tuple[dict[str, torch.Tensor], dict]:
    """Tensors and JSON description of fixture `name` (without extension)."""
    tensors = load_file(str(FIXTURES / f"{name}.safetensors"))
    meta_path = FIXTURES / f"{name}.json"
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    return tensors, meta


def load_benchmark(name: str):
    """A script of benchmarks/ as a module (its players and browser are tested here)."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"benchmarks_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while building
    spec.loader.exec_module(module)
    return module


def strip_prefix(tensors: dict[str, torch.Tensor], prefix: str = "model.") -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}


@pytest.fixture
def fixtures_dir() -> Path:
    return FIXTURES


@pytest.fixture(scope="module")
def one_thread_module():
    """Run a module on one thread: with two, 1024-d SVDs slow down tenfold on a busy 2-core
    machine. The metric fixtures were made with two threads; the thread count moves these
    metrics by at most 2e-5 relative, which the tolerances cover."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
