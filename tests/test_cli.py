"""Command-line conventions shared by every subcommand: help, one-line errors, fast failures."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import typer

from rflav_cli.cli import app

COMMANDS = sorted(typer.main.get_command(app).commands)


def run_cli(*args: str) -> tuple[int, str, str, bool]:
    """Run `rflav ARGS` in a fresh interpreter: exit code, stdout, stderr, and whether torch
    had been imported by the time it exited."""
    probe = (
        "import json, sys\n"
        "from rflav_cli.cli import main\n"
        f"sys.argv = ['rflav', *{list(args)!r}]\n"
        "try:\n"
        "    main()\n"
        "    code = 0\n"
        "except SystemExit as e:\n"
        "    code = e.code\n"
        "sys.stdout.flush()\n"
        "print(json.dumps({'code': code, 'torch': 'torch' in sys.modules}), file=sys.stderr)\n"
    )
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    *lines, last = proc.stderr.rstrip("\n").split("\n")
    status = json.loads(last)
    return status["code"], proc.stdout, "\n".join(lines), status["torch"]


@pytest.mark.parametrize("command", COMMANDS)
def test_short_help_flag(command):
    code, out, err, torch_loaded = run_cli(command, "-h")
    assert code == 0, err
    assert out.startswith(f"Usage: rflav {command}")
    assert not torch_loaded


def test_every_option_has_help():
    """Each visible option of each subcommand says what it does."""
    missing = []
    for name, command in typer.main.get_command(app).commands.items():
        for param in command.params:
            if getattr(param, "hidden", False) or param.name == "help":
                continue
            if not (getattr(param, "help", None) or "").strip():
                missing.append(f"{name} {'/'.join(param.opts)}")
    assert not missing, f"options without help: {', '.join(missing)}"


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["generate", "--steps", "x"], "--steps"),
        (["generate", "--no-such-flag"], "--no-such-flag"),
        (["no-such-command"], "no-such-command"),
        (["train"], "data"),
    ],
)
def test_parse_errors_are_one_line_before_torch(args, fragment):
    code, out, err, torch_loaded = run_cli(*args)
    assert code == 2
    assert out == ""
    assert len(err.splitlines()) == 1, err
    assert err.startswith("rflav: error: ") and fragment in err
    assert f"rflav {args[0]} -h" in err or "rflav -h" in err
    assert not torch_loaded


def test_no_command_prints_help():
    code, out, err, _ = run_cli()
    assert code == 2
    assert "Usage: rflav" in err and "generate" in err


@pytest.mark.parametrize("command", ["train", "prepare"])
@pytest.mark.parametrize("below", ["", "/sub"])
def test_an_output_folder_that_is_a_file_is_one_line_before_torch(tmp_path, command, below):
    (tmp_path / "data" / "train").mkdir(parents=True)
    (tmp_path / "afile").write_text("not a folder")
    out = f"{tmp_path / 'afile'}{below}"
    code, stdout, err, torch_loaded = run_cli(command, str(tmp_path / "data"), "-o", out)
    assert code == 2 and stdout == "" and len(err.splitlines()) == 1, err
    expected = "is a file: give a folder" if not below else f"cannot be made: {tmp_path / 'afile'} is a file"
    assert err.startswith(f"rflav: error: --output {out}") and expected in err
    assert not torch_loaded


@pytest.mark.parametrize(
    "error",
    [
        OSError(28, "No space left on device", "/runs/x/checkpoint-00000010/model.safetensors"),
        RuntimeError(
            "Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "
            '"No space left on device" })'
        ),
    ],
)
def test_a_full_disk_is_one_line(error, capsys):
    from rflav_cli.cli import _run

    def write():
        raise error

    with pytest.raises(typer.Exit) as stop:
        _run(write)
    assert stop.value.exit_code == 1
    where = " writing /runs/x/checkpoint-00000010/model.safetensors" if isinstance(error, OSError) else ""
    assert capsys.readouterr().err == (
        f"rflav: error: no space left on the device{where}: free some space or write elsewhere\n"
    )
