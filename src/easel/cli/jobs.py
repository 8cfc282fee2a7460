"""``easel jobs list|show|cancel|watch``: the jobs on a server, from the terminal."""

from __future__ import annotations

import asyncio
import time
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Column, Table

from easel.cli._display import EventCallback, job_display
from easel.cli._output import (
    DEFAULT_SERVER,
    AsJson,
    RemoteServer,
    Token,
    emit,
    errors,
    exit_for,
    show,
)
from easel.client._common import HANDLER_FOR_EVENT
from easel.jobs import Event, Job, JobState, JobView

jobs_app = typer.Typer(help="Jobs on a server: list, show, cancel, watch.", no_args_is_help=True)

JobId = Annotated[
    str, typer.Argument(metavar="JOB_ID", help="The job's id (easel jobs list shows them).")
]


@jobs_app.command("list")
def list_jobs(
    server: RemoteServer = DEFAULT_SERVER,
    token: Token = None,
    user_id: Annotated[str | None, typer.Option(help="Only this user's jobs.")] = None,
    state: Annotated[JobState | None, typer.Option(help="Only jobs in this state.")] = None,
    limit: Annotated[int, typer.Option(min=1, help="Jobs listed at most.")] = 20,
    as_json: AsJson = False,
) -> None:
    """Jobs, newest first.

    Example: easel jobs list --state failed --limit 5
    """
    from easel.client import Client

    with errors(), Client(server, token=token, retries=1) as client:
        jobs = client.list(user_id=user_id, state=state, limit=limit)
    if as_json:
        emit({"jobs": jobs})
        return
    table = Table(Column("id", no_wrap=True, min_width=24), "state", "user", "backend", "images")
    table.add_column("prompt", overflow="ellipsis", no_wrap=True)
    for job in jobs:
        row = (job.id, job.state.value, escape(job.user_id), job.backend, str(len(job.images)))
        table.add_row(*row, escape(job.request.prompt))
    show(table)


@jobs_app.command("show")
def show_job(
    job_id: JobId,
    server: RemoteServer = DEFAULT_SERVER,
    token: Token = None,
    as_json: AsJson = False,
) -> None:
    """One job: state, request, timings, results and error.

    Example: easel jobs show 01J9ZQ... --json
    """
    from easel.client import Client

    with errors(), Client(server, token=token, retries=1) as client:
        job = client.get(job_id)
    if as_json:
        typer.echo(job.model_dump_json(indent=2))
        return
    for name, value in _summary(job):
        typer.echo(f"{name + ':':<10} {value}")


@jobs_app.command("get", hidden=True)
def get_job(job_id: JobId, server: RemoteServer = DEFAULT_SERVER, token: Token = None) -> None:
    """The job record as JSON (``easel jobs show --json``)."""
    show_job(job_id, server=server, token=token, as_json=True)


def _summary(job: JobView) -> list[tuple[str, str]]:
    r = job.request
    lines = [
        ("id", job.id),
        ("state", job.state.value),
        ("user", job.user_id),
        ("backend", f"{job.backend}" + (f", model {r.model}" if r.model else "")),
        ("prompt", r.prompt),
        ("size", f"{r.width}x{r.height}, {r.steps} steps, batch {r.batch_size}"),
    ]
    if job.position is not None:
        eta = f", eta {job.eta_seconds:.0f}s" if job.eta_seconds is not None else ""
        lines.append(("position", f"{job.position}{eta}"))
    lines.append(("created", _when(job.created_at)))
    if job.started_at is not None:
        lines.append(("started", _when(job.started_at)))
    if job.finished_at is not None:
        lines.append(("finished", _when(job.finished_at)))
    if job.images:
        lines.append(("images", ", ".join(f"{ref.index} (seed {ref.seed})" for ref in job.images)))
    if job.error is not None:
        lines.append(("error", f"{job.error.code}: {job.error.message}"))
    return lines


def _when(at: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(at))


@jobs_app.command("cancel")
def cancel_job(
    job_id: JobId,
    server: RemoteServer = DEFAULT_SERVER,
    token: Token = None,
    as_json: AsJson = False,
) -> None:
    """Cancel a queued job at once, or a running one at its next step (exit 2 if it had ended).

    Example: easel jobs cancel 01J9ZQ...
    """
    from easel.client import Client

    with errors(), Client(server, token=token, retries=1) as client:
        job = client.cancel(job_id)
    if as_json:
        emit({"job_id": job.id, "state": job.state.value})
    else:
        typer.echo(f"{job.id} {job.state.value}")


@jobs_app.command("watch")
def watch_job(
    job_id: JobId,
    server: RemoteServer = DEFAULT_SERVER,
    token: Token = None,
    as_json: AsJson = False,
) -> None:
    """Follow a job until it ends: queued, loading model, steps, done. Exit 0 if it succeeded,
    1 if it failed or was cancelled. With --json, each event as one JSON line.

    Example: easel jobs watch 01J9ZQ...
    """
    from easel.client import Client

    with errors(), Client(server, token=token, retries=1) as client:
        client.get(job_id)  # an unknown id or a server down: one line, no display drawn
    if as_json:

        def print_event(event: Event) -> None:
            typer.echo(event.model_dump_json(exclude_none=True, exclude={"preview"}))

        with errors():
            job = asyncio.run(_watch(server, token, job_id, print_event))
    else:
        with errors(), job_display(job_id, 1) as on_event:
            job = asyncio.run(_watch(server, token, job_id, on_event))
    exit_for([job])


async def _watch(server: str, token: str | None, job_id: str, on_event: EventCallback) -> Job:
    from easel.client import AsyncClient

    async with AsyncClient(server, token=token, retries=1) as client:
        for name in HANDLER_FOR_EVENT.values():
            client.on(name, on_event)
        return await client.wait(job_id)
