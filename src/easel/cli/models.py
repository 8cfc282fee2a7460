"""``easel models list|make-tiny``: what a server (or this machine) serves; a tiny model."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from easel.cli._output import (
    AsJson,
    ExitCode,
    Server,
    Token,
    console,
    emit,
    errors,
    fail,
    show,
)

models_app = typer.Typer(
    help="Models: list what is served, build a tiny one.", no_args_is_help=True
)


@models_app.command("make-tiny")
def make_tiny(
    directory: Annotated[Path, typer.Argument(help="Where to write the diffusers folder.")],
    family: Annotated[
        str,
        typer.Option(
            help="sd, sd2, sdxl, sd3, flux, flux-dev, kandinsky22, kandinsky3 or stable-audio."
        ),
    ] = "sd",
    as_json: AsJson = False,
) -> None:
    """Build a tiny random pipeline of a model family: real code paths, noise for images.

    Example: easel models make-tiny models/tiny-sdxl --family sdxl
    """
    from easel.tiny import TINY_FAMILIES

    if {"sd1": "sd"}.get(family.casefold(), family.casefold()) not in TINY_FAMILIES:
        fail(
            "invalid_request",
            f"unknown family {family!r}; families are: {', '.join(TINY_FAMILIES)}",
            ExitCode.usage,
        )
    try:
        from transformers.utils import logging as transformers_logging

        from easel.tiny import make_tiny_pipeline
        from easel.tiny._families import build  # noqa: F401 (diffusers and torch are here)
    except ImportError as exc:
        fail("missing_dependency", f"{exc}; install easel[diffusers]", ExitCode.usage)
    transformers_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    with errors():
        path = make_tiny_pipeline(directory, family=family)
    if as_json:
        emit({"path": str(path), "family": family})
    else:
        typer.echo(path)


@models_app.command("list")
def list_models(
    server: Server = None,
    token: Token = None,
    models_dir: Annotated[
        Path | None, typer.Option(envvar="EASEL_MODELS_DIR", help="A folder of models.")
    ] = None,
    as_json: AsJson = False,
) -> None:
    """What a server serves; without --server, the models found on this machine.

    Columns: kind, name, family, base model, size, state (loaded / on disk), description and
    what it was merged from (``NAME.json`` beside the model).

    Example: easel models list --models-dir models
    """
    headers = (
        "backend", "kind", "model", "family", "base model", "size", "state", "description",
        "merged from",
    )  # fmt: skip
    rows: list[tuple[str, ...]] = []
    records: list[dict[str, object]] = []
    if server is None:
        from easel.backends.diffusers.models import ModelRegistry

        with errors():
            entries = ModelRegistry(models_dir).entries()
        for entry in sorted(entries, key=lambda e: (e.kind, e.name)):
            records.append(
                {"backend": "diffusers", "kind": entry.kind, "name": entry.name,
                 "family": entry.family, "base_model": entry.base_model,
                 "size_bytes": entry.size_bytes, "state": "on_disk", "path": str(entry.path),
                 "description": entry.description, "merged_from": entry.merged_from}
            )  # fmt: skip
            rows.append(
                (
                    "diffusers", entry.kind, entry.name, entry.family, entry.base_model or "",
                    _size(entry.size_bytes), "on disk", entry.description or "",
                    ", ".join(entry.merged_from),
                )
            )  # fmt: skip
    else:
        from easel.client import Client

        with errors(), Client(server, token=token, retries=1) as client:
            listing = client.models()
        for model in listing.models:
            records.append(model.model_dump(mode="json"))
            rows.append(
                (
                    model.backend, model.kind, model.name, model.family, model.base_model or "",
                    _size(model.size_bytes), model.state.replace("_", " "),
                    model.description or "", ", ".join(model.merged_from),
                )
            )  # fmt: skip
    if as_json:
        emit({"models": records})
        return
    if not rows:
        where = f"server {server}" if server else f"models dir {models_dir or '(none given)'}"
        console.print(
            f"no models found ({where}); put diffusers folders or .safetensors checkpoints in "
            "a models dir and pass --models-dir, or build one: easel models make-tiny DIR"
        )
        return
    table = Table(*headers)
    for row in rows:
        table.add_row(*(escape(cell) for cell in row))
    show(table)


def _size(size_bytes: int | None) -> str:
    return f"{size_bytes / 1e6:,.0f} MB" if size_bytes else ""
