"""The package's layering: models and metrics share only neutral modules, and the light modules
stay light."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "rflav_cli"


def imported_modules(path: Path) -> set[str]:
    """Every module ``path`` imports, as a dotted name inside the package where relative."""
    here = path.relative_to(PACKAGE.parent).with_suffix("").parts[:-1]  # e.g. ("rflav_cli", "models")
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = list(here[: len(here) - node.level + 1]) if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)
    return names


@pytest.mark.parametrize("side, other", [("models", "metrics"), ("metrics", "models")])
def test_models_and_metrics_do_not_import_each_other(side, other):
    offenders = {
        f"{path.name} imports {name}"
        for path in sorted((PACKAGE / side).glob("*.py"))
        for name in imported_modules(path)
        if name == f"rflav_cli.{other}" or name.startswith(f"rflav_cli.{other}.")
    }
    assert not offenders


def test_import_reader_resolves_relative_imports():
    # The check above is only as good as this reader: it must see both spellings of an import.
    names = imported_modules(PACKAGE / "models" / "flav.py")
    assert "rflav_cli.files" in names and "rflav_cli.hub.local_folder" in names
    assert "rflav_cli.metrics.weights" in imported_modules(PACKAGE / "metrics" / "i3d.py")


def test_hub_and_files_do_not_load_torch():
    code = "import sys, rflav_cli.hub, rflav_cli.files; assert 'torch' not in sys.modules, 'torch loaded'"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


# Imports inside functions that are deliberate: optional packages, and the CLI's heavy modules,
# loaded only by the subcommand that needs them (so that a bad flag fails before torch loads).
OPTIONAL_IMPORTS = ("matplotlib", "imageio_ffmpeg")


def test_library_imports_at_the_top():
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name == "cli.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for inner in ast.walk(node):
                if isinstance(inner, ast.Import):
                    names = [alias.name for alias in inner.names]
                elif isinstance(inner, ast.ImportFrom):
                    names = ["." * inner.level + (inner.module or "")]
                else:
                    continue
                offenders += [
                    f"{path.relative_to(PACKAGE)}:{inner.lineno} {name}"
                    for name in names
                    if not name.startswith(OPTIONAL_IMPORTS)
                ]
    assert not offenders


def test_files_and_request_checks_do_not_load_torch():
    code = (
        "import sys, rflav_cli.files, rflav_cli.requests, rflav_cli.samples; "
        "assert 'torch' not in sys.modules, 'torch loaded'"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
