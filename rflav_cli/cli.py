"""The `rflav` command line: one thin function per subcommand over the Python API."""

from __future__ import annotations

import typer

from . import __version__

app = typer.Typer(
    name="rflav",
    help="Generate, train and evaluate R-FLAV rolling audio-video models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"rflav {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
) -> None:
    """Generate, train and evaluate R-FLAV rolling audio-video models."""


def main() -> None:
    app()
