"""Consoles and error reporting shared by the commands.

Results go to stdout, progress and errors to stderr, so `--json` output stays parseable. Output
stays plain text when it is not a terminal (CI logs): no colour codes, no redraws.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import IO, Any

import click
import grpc
from rich.console import Console

from aimaas.cli.environment import CliEnvironment

# Wide enough that digests and endpoints are not wrapped in CI logs (80 columns is rich's default).
_NON_TTY_WIDTH = 160


@dataclass(frozen=True)
class CliContext:
    """What every command gets from the group: the environment snapshot and the two consoles."""

    env: CliEnvironment
    out: Console
    err: Console


def current() -> CliContext:
    context = click.get_current_context().find_object(CliContext)
    if context is None:  # a command invoked without the group (tests calling it directly)
        context = CliContext(CliEnvironment.capture(), make_console(), make_console(stderr=True))
    return context


class CliError(click.ClickException):
    """A failure reported as one `error: ...` line on stderr with exit code 1, never a traceback."""

    def show(self, file: IO[Any] | None = None) -> None:
        click.echo(f"error: {self.format_message()}", err=True, file=file)


def make_console(*, stderr: bool = False) -> Console:
    console = Console(stderr=stderr, highlight=False)
    if not console.is_terminal and console.width < _NON_TTY_WIDTH:
        console = Console(stderr=stderr, highlight=False, width=_NON_TTY_WIDTH)
    return console


def rpc_error(exc: grpc.RpcError, address: str, what: str = "the registry") -> CliError:
    """`<STATUS>: <details>` of a failed call, with a hint when the server is not there at all."""
    code = exc.code() if isinstance(exc, grpc.Call) else grpc.StatusCode.UNKNOWN
    details = (exc.details() if isinstance(exc, grpc.Call) else None) or str(exc)
    message = f"{code.name}: {details}"
    if code is grpc.StatusCode.UNAVAILABLE:
        message += f"\nhint: is {what} running at {address}? (`aimaas up` starts the local mesh)"
    return CliError(message)


def human_bytes(size: int) -> str:
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")
