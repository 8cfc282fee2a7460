"""What every command shares: its options for reaching a server, ``--json`` output, errors as
one line on stderr, and the exit codes scripts rely on.

Exit codes: 0 ok, 1 a job ran and failed, 2 a usage or config error (a request the server
refused with a 4xx is one: invalid, unknown model or job, no token, queue full), 3 the
server cannot be reached, 130 stopped by Ctrl-C. No command ends in a traceback.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from enum import IntEnum
from typing import Annotated, Any, NoReturn

import httpx
import typer
from pydantic import BaseModel
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from easel.errors import EaselError, GenerationError, ServerUnreachable
from easel.jobs import Job, JobState

DEFAULT_SERVER = "http://127.0.0.1:8000"


class ExitCode(IntEnum):
    ok = 0
    job_failed = 1
    usage = 2
    unreachable = 3
    interrupted = 130  # what shells report for a command stopped by Ctrl-C (128 + SIGINT)


console = Console(stderr=True, highlight=False)
"""Progress, notes and errors: stderr, so stdout carries only what scripts read."""

Server = Annotated[
    str | None,
    typer.Option(
        "--server",
        "--url",
        envvar="EASEL_SERVER",
        help=f"Base URL of an easel server, e.g. {DEFAULT_SERVER} [default: run embedded]",
        show_default=False,
    ),
]
RemoteServer = Annotated[
    str,
    typer.Option("--server", "--url", envvar="EASEL_SERVER", help="Base URL of the easel server."),
]
Token = Annotated[
    str | None,
    typer.Option(
        envvar="EASEL_TOKEN",
        help="A service's bearer token (one of the server's EASEL_TOKENS).",
        show_default=False,
    ),
]
AsJson = Annotated[bool, typer.Option("--json", help="Print JSON on stdout (for scripts).")]


def fail(code: str, message: str, exit_code: int = ExitCode.job_failed) -> NoReturn:
    """One line on stderr, then exit: ``error CODE: what is wrong and what to do``."""
    console.print(f"[bold red]error[/] {escape(code)}: {escape(message)}", soft_wrap=True)
    raise typer.Exit(exit_code)


def usage(message: str) -> NoReturn:
    """A usage or config error: exit 2."""
    fail("invalid_usage", message, ExitCode.usage)


@contextmanager
def errors() -> Iterator[None]:
    """A refusal (a 4xx: what was asked is wrong, or not allowed now) exits 2; a failure
    exits 1; an unreachable server exits 3; Ctrl-C exits 130 with one line."""
    try:
        yield
    except KeyboardInterrupt:
        console.print(
            "interrupted; jobs already submitted to a server keep running there "
            "(easel jobs list, easel jobs cancel JOB_ID)",
            soft_wrap=True,
        )
        raise typer.Exit(ExitCode.interrupted) from None
    except ServerUnreachable as exc:
        fail(exc.code, exc.message, ExitCode.unreachable)
    except EaselError as exc:
        fail(exc.code, exc.message, exit_code_of(exc))
    except (httpx.TransportError, ConnectionError) as exc:
        fail(
            "server_unreachable",
            f"cannot reach the server: {exc}; is `easel serve` running?",
            ExitCode.unreachable,
        )
    except OSError as exc:  # a file or folder given that cannot be read or written
        fail("os_error", f"{exc.strerror or exc}: {exc.filename or ''}".rstrip(": "), 2)


def exit_code_of(exc: EaselError) -> ExitCode:
    """2 for a refusal (a 4xx answer, or what embedded admission refuses), 1 for the rest:
    a job's own failure (cancelled, an engine's refusal of the run) and server faults."""
    if isinstance(exc, GenerationError) or not 400 <= exc.status < 500:
        return ExitCode.job_failed
    return ExitCode.usage


def emit(data: Any) -> None:
    """One JSON document on stdout (pydantic models as their JSON form)."""
    if isinstance(data, BaseModel):
        typer.echo(data.model_dump_json())
    else:
        typer.echo(json.dumps(data, default=_jsonable))


def _jsonable(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    return str(value)


def show(table: Table) -> None:
    """A table on stdout, for people."""
    Console(highlight=False).print(table)


def exit_for(jobs: Sequence[Job]) -> None:
    """The one "failed job -> report and exit code" of every command: a line on stderr for
    each job that did not succeed (its error code and message), then exit 1 if any did not."""
    failed = [job for job in jobs if job.state is not JobState.succeeded]
    for job in failed:
        error = job.error
        code = error.code if error else job.state.value
        message = error.message if error else f"job ended {job.state.value}"
        console.print(
            f"[bold red]failed[/] {escape(job.id)}: {escape(code)}: {escape(message)}",
            soft_wrap=True,
        )
    if failed:
        raise typer.Exit(ExitCode.job_failed)
