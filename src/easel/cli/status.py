"""``easel queue``, ``easel health``, ``easel backends``: how a server is doing, from outside."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Column, Table

from easel.cli._output import DEFAULT_SERVER, AsJson, RemoteServer, Token, emit, errors, show


def queue(
    server: RemoteServer = DEFAULT_SERVER,
    token: Token = None,
    user_id: Annotated[
        str | None, typer.Option(help="Whose prompts to show: your own user id.")
    ] = None,
    limit: Annotated[int, typer.Option(min=1, max=1000, help="Jobs listed at most.")] = 50,
    as_json: AsJson = False,
) -> None:
    """The queue as the caller sees it: running jobs, then queued ones in serving order with
    their tier, position and ETA, and the totals per tier and per user.

    Example: easel queue --user-id alice
    """
    from easel.client import Client

    with errors(), Client(server, token=token, retries=1) as client:
        state = client.queue()
        line = client.line(user_id=user_id, limit=limit)
    if as_json:
        emit({"queue": state.model_dump(mode="json"), "jobs": line.model_dump(mode="json")["jobs"]})
        return
    title = f"{state.running} running, {state.queued} queued"
    if not line.jobs:
        typer.echo(f"{title}: the queue is empty")
        return
    table = Table(
        Column("id", no_wrap=True, min_width=24), Column("state", min_width=7), "user",
        Column("tier", min_width=4), Column("pos", min_width=3), Column("eta", min_width=4),
        "backend", title=title,
    )  # fmt: skip
    table.add_column("prompt", overflow="ellipsis", no_wrap=True)
    for job in line.jobs:
        table.add_row(
            job.id, job.state.value, escape(job.user_id), str(job.tier),
            "" if job.position is None else str(job.position),
            "" if job.eta_seconds is None else f"{job.eta_seconds:.0f}s",
            job.backend, escape(job.prompt or ""),
        )  # fmt: skip
    show(table)
    if state.users:
        users = ", ".join(f"{user}: {count}" for user, count in sorted(state.users.items()))
        typer.echo(f"queued per user: {users}")


def health(
    server: RemoteServer = DEFAULT_SERVER,
    token: Token = None,
    as_json: AsJson = False,
) -> None:
    """Whether the server answers, its version and backends; exit 3 when it does not.

    Example: easel health --server http://127.0.0.1:8000 && echo up
    """
    from easel.client import Client

    with errors(), Client(server, token=token, retries=0) as client:
        answer = client.health()
    if as_json:
        emit(answer)
        return
    typer.echo(
        f"{answer.status}: easel {answer.version} at {server}, "
        f"backends: {', '.join(answer.backends) or 'none'}"
    )


def list_backends(
    server: RemoteServer = DEFAULT_SERVER,
    token: Token = None,
    as_json: AsJson = False,
) -> None:
    """The fleet of a server: each backend's kind, state, slots, loaded models and speed.

    Example: easel backends --json
    """
    from easel.client import Client

    with errors(), Client(server, token=token, retries=1) as client:
        listing = client.backends()
    if as_json:
        emit(listing)
        return
    table = Table(
        "backend", "kind", "state", "where", "slots", "models (loaded*)", "tags", "queued",
        "speed", "last error",
    )  # fmt: skip
    for b in listing.backends:
        models = ", ".join(m + ("*" if m in b.loaded_models else "") for m in b.models)
        table.add_row(
            b.name, b.kind, b.state, b.where, f"{b.slots_in_use}/{b.slots}", models,
            ", ".join(b.tags), f"{b.queued_work:g}", "" if b.speed is None else f"{b.speed:.3g}",
            escape(b.last_error or ""),
        )  # fmt: skip
    show(table)
