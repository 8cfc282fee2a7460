"""easel's command line: one module per command group, all on one typer app.

``serve``/``worker`` (:mod:`.serve`), ``generate``, ``jobs``, ``queue``/``health``/
``backends`` (:mod:`.status`), ``models``, ``project``, ``reproduce``. Commands are thin:
generation goes through :mod:`easel.client` (a server, or easel embedded in this process),
so the CLI shows progress and files and nothing else. What they share (``--json``, errors
as one line, exit codes 0 ok / 1 job failed / 2 usage or config / 3 server unreachable)
is in :mod:`._output`; the progress display in :mod:`._display`.
"""

from __future__ import annotations

import typer

from easel.cli._output import DEFAULT_SERVER, ExitCode
from easel.cli.generate import generate
from easel.cli.jobs import jobs_app
from easel.cli.models import models_app
from easel.cli.project import project_app
from easel.cli.reproduce import reproduce
from easel.cli.serve import serve, serving_line, worker
from easel.cli.status import health, list_backends, queue

__all__ = ["DEFAULT_SERVER", "ExitCode", "app", "serving_line"]

app = typer.Typer(
    name="easel",
    help="A self-hosted generation server: one fair queue, many backends, many clients.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
app.command()(serve)
app.command()(worker)
app.command()(generate)
app.add_typer(models_app, name="models")
app.add_typer(jobs_app, name="jobs")
app.command("queue")(queue)
app.command("health")(health)
app.command("backends")(list_backends)
app.add_typer(project_app, name="project")
app.command("reproduce")(reproduce)
