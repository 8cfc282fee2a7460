"""The progress display of every command that waits for jobs: one line per job (queued with
its position and ETA, loading model, steps, done) and a total line, fed by the jobs' events.

A job whose backend must load its model first says so on its ``started`` event (phase
``loading_model``): its line says ``loading model NAME`` until the first step, then shows
the steps. A job on a backend with its model in memory goes from ``started`` to its steps.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from easel.cli._output import console
from easel.jobs import FINAL_EVENTS, Event, EventType, Phase

EventCallback = Callable[[Event], None]


@contextmanager
def job_display(name: str, jobs: int, starting: str | None = None) -> Iterator[EventCallback]:
    """A rich display of ``jobs`` jobs called ``name``; yields the event callback.

    Drawn from the first event (a job never submitted leaves only its error line), or at
    once with ``starting`` as the total line's text: easel embedded in the command starts
    (and loads its model) before any job exists."""
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    progress = Progress(*columns, console=console)
    done_text = f"{name}: jobs done"
    total = progress.add_task(f"{name}: {starting}" if starting else done_text, total=jobs)
    if starting:
        progress.start()
    lines: dict[str, Any] = {}
    ended: set[str] = set()

    def on_event(event: Event) -> None:
        if not progress.live.is_started:
            progress.start()
        if not lines:
            progress.update(total, description=done_text)
        if event.job_id not in lines:
            label = f"  job {len(lines) + 1}"
            lines[event.job_id] = (label, progress.add_task(f"{label} submitted", total=None))
        label, task = lines[event.job_id]
        if event.job_id in ended:
            return  # a replayed event after the end
        if event.type is EventType.queued:
            where = f" position {event.position}" if event.position is not None else ""
            eta = f" eta {event.eta_seconds:.0f}s" if event.eta_seconds is not None else ""
            progress.update(task, description=f"{label} queued{where}{eta}")
        elif event.type is EventType.started:
            loading = event.phase is Phase.loading_model
            what = f"loading model {escape(event.model or '')}" if loading else "started"
            progress.update(task, description=f"{label} {what}")
        elif event.type is EventType.progress:
            progress.update(
                task, description=f"{label} steps", completed=event.step, total=event.total
            )
        elif event.type in FINAL_EVENTS:
            ended.add(event.job_id)
            done = progress.tasks[task].total or 1
            progress.update(
                task, description=f"{label} {event.type.value}", completed=done, total=done
            )
            progress.advance(total)

    try:
        yield on_event
    finally:
        if progress.live.is_started:
            progress.stop()


def starting_text(server: str | None, model: str | None) -> str | None:
    """What the display of a run embedded in the command says before its jobs exist."""
    if server is not None:
        return None
    return f"loading model {Path(model).name}" if model else "starting"
