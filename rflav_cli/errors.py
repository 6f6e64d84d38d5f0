"""The one error hierarchy of the package.

Every failure caused by what a caller gave (a parameter, a file, a checkpoint, the network)
is a :class:`RflavError` with a one-line message saying what is wrong and how to fix it.
Anything else (a bare ``ValueError`` from a bug) is a programming error and stays a traceback.

Messages speak of the library's parameters. A message may name them as ``{param}``
placeholders, listed in ``params``: ``str(err)`` writes the parameter name, and the command
line renders the same error with its flag (``--seconds``) through :meth:`RflavError.render`.
"""

from __future__ import annotations

from collections.abc import Callable


class RflavError(Exception):
    """Base class of every expected failure: bad input, bad files, unreachable downloads."""

    # Under torchrun every process is given the same command line, files and network, so most
    # failures are the same in each and rank 0 alone reports them. True for those that depend on
    # a process's own share of the work (a file only it reads): every rank reports those.
    per_process: bool = False

    def __init__(self, message: str, *, params: tuple[str, ...] = ()) -> None:
        self.template = message
        self.params = tuple(params)
        super().__init__(self.render())

    def render(self, name_of: Callable[[str], str] | None = None) -> str:
        """The message with each ``{param}`` written as ``name_of(param)`` (default: the name)."""
        text = self.template
        for param in self.params:
            text = text.replace("{" + param + "}", name_of(param) if name_of else param)
        return text


class UsageError(RflavError, ValueError):
    """A parameter value that cannot be served (out of range, contradicting another, …)."""


class FileFormatError(RflavError, ValueError):
    """A file exists but is not what it should be: truncated, corrupt or of another kind."""
