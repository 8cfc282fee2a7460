"""``easel project list|run``: projects (config.yaml, prompts.yaml) from the terminal.

A project file that does not validate exits 2 with the file, the key path and what is
wrong; a run's failed jobs exit 1, a request the server refuses exits 2; an unreachable
server exits 3.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from easel.cli._display import job_display, starting_text
from easel.cli._output import AsJson, ExitCode, Token, console, emit, errors, exit_for, usage
from easel.projects.files import Project, ProjectFileError, PromptSet, load_project
from easel.projects.run import Finished, Planned, Target, run_jobs

project_app = typer.Typer(
    help="Projects: a folder with config.yaml and prompts.yaml (named prompt sets).",
    no_args_is_help=True,
)

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


def _project(directory: Path | None, root: Path | None, name: str | None) -> Project:
    if directory is None:
        if root is None or name is None:
            usage("give a project folder, or --input ROOT --project NAME")
        directory = root / name
    elif root is not None or name is not None:
        usage("give a project folder or --input/--project, not both")
    try:
        return load_project(directory)
    except ProjectFileError as exc:
        console.print(f"[bold red]error[/] project_invalid: {escape(str(exc.path))}")
        for problem in exc.problems:
            console.print(f"  {escape(problem)}", soft_wrap=True)
        raise typer.Exit(ExitCode.usage) from None


@project_app.command("list")
def list_sets(
    directory: ProjectDir = None,
    input_root: InputRoot = None,
    project_name: ProjectName = None,
    as_json: AsJson = False,
) -> None:
    """The prompt sets of a project.

    Example: easel project list projects/mountains
    """
    project = _project(directory, input_root, project_name)
    if as_json:
        sets = [s.model_dump(exclude_defaults=True) for s in project.prompt_sets]
        emit({"project": project.name, "prompt_sets": sets})
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
        typer.Option(
            "--server", "--url", envvar="EASEL_SERVER", help="Overrides config.yaml's server_url."
        ),
    ] = None,
    token: Token = None,
    model: Annotated[str | None, typer.Option(help="Overrides config.yaml's model.")] = None,
    backend: Annotated[str | None, typer.Option(help="Overrides config.yaml's backend.")] = None,
    output_dir: Annotated[Path, typer.Option(help="Where PROJECT/PROMPT_SET/... goes.")] = Path(
        "outputs"
    ),
    data_dir: Annotated[
        Path | None, typer.Option(help="Embedded runs only [default: a temporary directory]")
    ] = None,
    as_json: AsJson = False,
) -> None:
    """Generate prompt sets of a project: all jobs submitted at once, files under
    OUTPUT_DIR/PROJECT/PROMPT_SET/TIMESTAMP_MODEL/{images,metadata}.

    Example: easel project run projects/mountains --prompt landscape --batch 5 --seed 1
    """
    project = _project(directory, input_root, project_name)
    if run_all == bool(prompt):
        usage("name prompt sets with --prompt NAME, or pass --all")
    try:
        chosen = project.prompt_sets if run_all else [project.prompt_set(n) for n in prompt or []]
    except KeyError as exc:
        usage(str(exc.args[0]))
    if expand and project.config.ollama is None:
        usage("--expand needs an ollama: section in config.yaml")
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
            token=token,
        )
    if as_json:
        files = [
            {"job_id": r.job.id, "state": r.job.state.value, "images": [str(p) for p in r.images],
             "metadata": [str(p) for p in r.metadata], "error": r.job.error}
            for r in results
        ]  # fmt: skip
        emit({"jobs": files})
    else:
        for result in results:
            for image in result.images:
                typer.echo(image)
    exit_for([r.job for r in results])


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
    token: str | None,
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
        token=token,
        diffusers=resolved.diffusers,
        not_applied=resolved.not_applied,
    )
    starting = starting_text(server, model)
    with errors(), job_display(prompt_set.name, batch, starting) as on_event:
        return asyncio.run(run_jobs(target, planned, on_event))


def _expanded(
    project: Project, request: dict[str, Any], model: str | None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The LLM's prompt about the set's own prompt (its fallback on failure)."""
    from easel.projects.expand import expand_prompt

    if project.config.ollama is None:
        return request, {}
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
