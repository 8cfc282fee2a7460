"""``easel project list|run`` and ``easel reproduce``: projects from the terminal.

Exit codes: 0 ok, 1 a job failed, 2 a usage or project-file error, 3 server unreachable.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from easel.errors import EaselError
from easel.jobs import Event, EventType, JobState
from easel.projects.files import Project, ProjectFileError, PromptSet, load_project
from easel.projects.run import EventCallback, Finished, Planned, Target, run_jobs

project_app = typer.Typer(
    help="Projects: a folder with config.yaml and prompts.yaml (named prompt sets).",
    no_args_is_help=True,
)
console = Console(stderr=True, highlight=False)

ProjectDir = Annotated[
    Path | None,
    typer.Argument(help="The project folder (config.yaml, prompts.yaml).", show_default=False),
]
InputRoot = Annotated[
    Path | None,
    typer.Option("--input", help="A folder of projects; with --project NAME."),
]
ProjectName = Annotated[
    str | None, typer.Option("--project", help="A project folder under --input.")
]


def _fail(code: str, message: str, exit_code: int = 1) -> NoReturn:
    console.print(f"[bold red]error[/] {escape(code)}: {escape(message)}", soft_wrap=True)
    raise typer.Exit(exit_code)


def _project(directory: Path | None, root: Path | None, name: str | None) -> Project:
    if directory is None:
        if root is None or name is None:
            _fail("invalid_request", "give a project folder, or --input ROOT --project NAME", 2)
        directory = root / name
    elif root is not None or name is not None:
        _fail("invalid_request", "give a project folder or --input/--project, not both", 2)
    try:
        return load_project(directory)
    except ProjectFileError as exc:
        console.print(f"[bold red]error[/] project_invalid: {escape(str(exc.path))}")
        for problem in exc.problems:
            console.print(f"  {escape(problem)}", soft_wrap=True)
        raise typer.Exit(2) from None


@project_app.command("list")
def list_sets(
    directory: ProjectDir = None,
    input_root: InputRoot = None,
    project_name: ProjectName = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object for scripts.")] = False,
) -> None:
    """The prompt sets of a project.

    Example: easel project list projects/mountains
    """
    project = _project(directory, input_root, project_name)
    if as_json:
        sets = [s.model_dump(exclude_defaults=True) for s in project.prompt_sets]
        typer.echo(json.dumps({"project": project.name, "prompt_sets": sets}))
        return
    table = Table("prompt set", "prompt", "params", title=f"project {project.name}")
    for prompt_set in project.prompt_sets:
        params = prompt_set.params.model_dump(exclude_none=True)
        shown = ", ".join(f"{key}={value}" for key, value in params.items())
        table.add_row(escape(prompt_set.name), escape(prompt_set.prompt), escape(shown))
    Console().print(table)


@project_app.command("run")
def run(
    directory: ProjectDir = None,
    prompt: Annotated[
        list[str] | None,
        typer.Option("--prompt", metavar="NAME", help="A prompt set's name (repeatable)."),
    ] = None,
    run_all: Annotated[bool, typer.Option("--all", help="Every prompt set.")] = False,
    batch: Annotated[int, typer.Option(min=1, help="Images per prompt set (one job each).")] = 1,
    seed: Annotated[
        int | None, typer.Option(min=0, help="Seed of the first job; the next get +1, +2...")
    ] = None,
    expand: Annotated[
        bool,
        typer.Option(
            "--expand", "--ollama", help="Have the LLM of config.yaml's ollama: write each prompt."
        ),
    ] = False,
    input_root: InputRoot = None,
    project_name: ProjectName = None,
    server: Annotated[
        str | None,
        typer.Option(envvar="EASEL_SERVER", help="Overrides config.yaml's server_url."),
    ] = None,
    model: Annotated[str | None, typer.Option(help="Overrides config.yaml's model.")] = None,
    backend: Annotated[str | None, typer.Option(help="Overrides config.yaml's backend.")] = None,
    output_dir: Annotated[Path, typer.Option(help="Where PROJECT/PROMPT_SET/... goes.")] = Path(
        "outputs"
    ),
    data_dir: Annotated[
        Path | None, typer.Option(help="Embedded runs only [default: a temporary directory]")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the files as JSON.")] = False,
) -> None:
    """Generate prompt sets of a project: all jobs submitted at once, files under
    OUTPUT_DIR/PROJECT/PROMPT_SET/TIMESTAMP_MODEL/{images,metadata}.

    Example: easel project run projects/mountains --prompt landscape --batch 5 --seed 1
    """
    project = _project(directory, input_root, project_name)
    if run_all == bool(prompt):
        _fail("invalid_request", "name prompt sets with --prompt NAME, or pass --all", 2)
    try:
        chosen = project.prompt_sets if run_all else [project.prompt_set(n) for n in prompt or []]
    except KeyError as exc:
        _fail("invalid_request", str(exc.args[0]), 2)
    if expand and project.config.ollama is None:
        _fail("invalid_request", "--expand needs an ollama: section in config.yaml", 2)
    results: list[Finished] = []
    for prompt_set in chosen:
        results += _run_set(
            project,
            prompt_set,
            batch=batch,
            seed=seed,
            expand=expand,
            server=server or project.config.server_url,
            model=model or project.config.model,
            backend=backend or project.config.backend,
            output_dir=output_dir,
            data_dir=data_dir,
        )
    failed = [r.job for r in results if r.job.state is not JobState.succeeded]
    if as_json:
        files = [
            {"job_id": r.job.id, "state": r.job.state.value, "images": [str(p) for p in r.images],
             "metadata": [str(p) for p in r.metadata]}
            for r in results
        ]  # fmt: skip
        typer.echo(json.dumps({"jobs": files}))
    else:
        for result in results:
            for image in result.images:
                typer.echo(image)
    for job in failed:
        error = job.error
        console.print(
            f"[bold red]failed[/] {job.id}: {escape(error.code if error else job.state.value)}"
            f": {escape(error.message if error else '')}"
        )
    if failed:
        raise typer.Exit(1)


def _run_set(
    project: Project,
    prompt_set: PromptSet,
    *,
    batch: int,
    seed: int | None,
    expand: bool,
    server: str | None,
    model: str | None,
    backend: str | None,
    output_dir: Path,
    data_dir: Path | None,
) -> list[Finished]:
    resolved = project.resolve(prompt_set)
    for key, why in resolved.not_applied.items():
        console.print(f"[yellow]note[/] {key} is not applied: {escape(why)}")
    if server and resolved.diffusers:
        names = ", ".join(sorted(resolved.diffusers))
        console.print(
            f"[yellow]note[/] {names}: memory settings of the server's own; set them in its "
            "easel.toml [diffusers] (applied here only when running embedded)"
        )
    first_seed = seed if seed is not None else resolved.request.get("seed")
    planned = []
    for index in range(batch):
        request = dict(resolved.request)
        if first_seed is not None:
            request["seed"] = first_seed + index
        source: dict[str, Any] = {}
        if expand:
            request, source = _expanded(project, request, model)
        planned.append(Planned(request=request, prompt_source=source))
    target = Target(
        project=project.name,
        prompt_set=prompt_set.name,
        output_dir=output_dir,
        server=server,
        backend=backend,
        model=model,
        data_dir=data_dir,
        diffusers=resolved.diffusers,
        not_applied=resolved.not_applied,
    )
    with _errors(), _display(prompt_set.name, batch) as on_event:
        return asyncio.run(run_jobs(target, planned, on_event))


def _expanded(
    project: Project, request: dict[str, Any], model: str | None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The LLM's prompt about the set's own prompt (its fallback on failure)."""
    from easel.projects.expand import expand_prompt

    assert project.config.ollama is not None
    model_dir = Path(model) if model and Path(model).is_dir() else None
    expansion = expand_prompt(project.config.ollama, request["prompt"], model_dir=model_dir)
    if expansion.source == "fallback":
        console.print(
            f"[yellow]note[/] prompt expansion failed: {escape(expansion.details['reason'])}"
        )
    request = {**request, "prompt": expansion.prompt}
    if project.config.ollama.negative_prompt and "negative_prompt" not in request:
        request["negative_prompt"] = project.config.ollama.negative_prompt
    return request, expansion.record()


@contextmanager
def _errors() -> Iterator[None]:
    """An unreachable server exits 3; other easel errors (refusals) exit 1."""
    try:
        yield
    except EaselError as exc:
        _fail(exc.code, exc.message, 3 if exc.code == "server_unreachable" else 1)
    except OSError as exc:
        _fail("server_unreachable", f"{exc}; is the server running?", 3)


@contextmanager
def _display(name: str, jobs: int) -> Iterator[EventCallback]:
    """One line per job (queued with position and ETA, loading, steps, done) and a total."""
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console) as progress:
        total = progress.add_task(f"{name}: jobs done", total=jobs)
        lines: dict[str, Any] = {}

        def on_event(event: Event) -> None:
            if event.job_id not in lines:
                label = f"  job {len(lines) + 1}"
                lines[event.job_id] = (label, progress.add_task(f"{label} submitted", total=None))
            label, task = lines[event.job_id]
            if event.type is EventType.queued:
                where = f" position {event.position}" if event.position is not None else ""
                eta = f" eta {event.eta_seconds:.0f}s" if event.eta_seconds is not None else ""
                progress.update(task, description=f"{label} queued{where}{eta}")
            elif event.type is EventType.started:
                progress.update(task, description=f"{label} loading model / starting")
            elif event.type is EventType.progress:
                progress.update(
                    task, description=f"{label} steps", completed=event.step, total=event.total
                )
            elif event.type in (EventType.succeeded, EventType.failed, EventType.cancelled):
                done = progress.tasks[task].total or 1
                progress.update(task, description=f"{label} {event.type.value}", completed=done)
                progress.advance(total)

        yield on_event


def reproduce(
    image: Annotated[
        Path, typer.Argument(exists=True, dir_okay=False, help="An image easel or A1111 made.")
    ],
    server: Annotated[
        str | None,
        typer.Option(envvar="EASEL_SERVER", help="An easel server [default: run embedded]"),
    ] = None,
    model: Annotated[
        str | None, typer.Option(help="[default: the model the image records]")
    ] = None,
    backend: Annotated[
        str | None, typer.Option(help="[default: the backend the image records]")
    ] = None,
    output_dir: Annotated[Path, typer.Option(help="Written to OUTPUT_DIR/reproduced/.")] = Path(
        "outputs"
    ),
    data_dir: Annotated[
        Path | None, typer.Option(help="Embedded runs only [default: a temporary directory]")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the request and files.")] = False,
) -> None:
    """Generate an image again from its metadata: the same pixels on the same backend and model.

    Reads a project's metadata/*.yaml or easel's .json sidecar beside the image, the PNG's
    easel chunk, or any Automatic1111 infotext (PNG parameters chunk, EXIF UserComment).

    Example: easel reproduce outputs/mountains/landscape/20260101_120000_sd15/images/001.png
    """
    import time

    from easel.projects.reproduce import reproduction_of
    from easel.quick import generate_files

    with _errors():
        found = reproduction_of(image)
    chosen_backend = backend or found.backend
    chosen_model = model or found.model
    target = output_dir / "reproduced" / f"{image.stem}-{time.strftime('%Y%m%d_%H%M%S')}.png"
    target.parent.mkdir(parents=True, exist_ok=True)
    with _errors(), _display(image.name, 1) as on_event:
        job, paths = asyncio.run(
            generate_files(
                found.request,
                target,
                server=server,
                backend=chosen_backend,
                model=chosen_model,
                data_dir=data_dir,
                on_event=on_event,
            )
        )
    if job.state is not JobState.succeeded:
        error = job.error
        _fail(error.code if error else job.state.value, error.message if error else "no images")
    if as_json:
        report = {"source": found.source, "request": found.request, "backend": chosen_backend,
                  "model": chosen_model, "images": [str(p) for p in paths]}  # fmt: skip
        typer.echo(json.dumps(report))
        return
    console.print(f"parameters from {escape(found.source)}")
    for path in paths:
        typer.echo(path)
