"""``easel reproduce IMAGE``: the same request again, from an image's own metadata."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from easel.cli._display import job_display, starting_text
from easel.cli._output import AsJson, Token, console, emit, errors, exit_for


def reproduce(
    image: Annotated[
        Path, typer.Argument(exists=True, dir_okay=False, help="An image easel or A1111 made.")
    ],
    server: Annotated[
        str | None,
        typer.Option(
            "--server",
            "--url",
            envvar="EASEL_SERVER",
            help="An easel server [default: run embedded]",
            show_default=False,
        ),
    ] = None,
    token: Token = None,
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
    as_json: AsJson = False,
) -> None:
    """Generate an image again from its metadata: the same pixels on the same backend and model.

    Reads a project's metadata/*.yaml or easel's .json sidecar beside the image, the PNG's
    easel chunk, or any Automatic1111 infotext (PNG parameters chunk, EXIF UserComment).

    Example: easel reproduce outputs/mountains/landscape/20260101_120000_sd15/images/001.png
    """
    from easel.projects.reproduce import reproduction_of
    from easel.quick import generate_files

    with errors():
        found = reproduction_of(image)
    chosen_backend = backend or found.backend
    chosen_model = model or found.model
    target = output_dir / "reproduced" / f"{image.stem}-{time.strftime('%Y%m%d_%H%M%S')}.png"
    with errors():
        target.parent.mkdir(parents=True, exist_ok=True)
    with errors(), job_display(image.name, 1, starting_text(server, chosen_model)) as on_event:
        job, paths = asyncio.run(
            generate_files(
                found.request,
                target,
                server=server,
                backend=chosen_backend,
                model=chosen_model,
                data_dir=data_dir,
                token=token,
                on_event=on_event,
            )
        )
    exit_for([job])
    if as_json:
        report = {"source": found.source, "request": found.request, "backend": chosen_backend,
                  "model": chosen_model, "images": [str(p) for p in paths]}  # fmt: skip
        emit(report)
        return
    console.print(f"parameters from {escape(found.source)}")
    for path in paths:
        typer.echo(path)
