"""One prompt to files (images or audio), through a server or with easel embedded in this process.

``quick_generate`` (scripts) and ``easel generate`` (the CLI) both end up in
:func:`generate_files`; embedded, it runs the same :class:`~easel.runtime.facade.Runtime` as the
server, so results and sidecars are the server's own. It sits above both the client and the
runtime (like ``easel.cli``), so that the client itself never imports a server module.
"""

from __future__ import annotations

import asyncio
import tempfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

from anyio.from_thread import start_blocking_portal
from pydantic import ValidationError

from easel.api.errors import validation_error
from easel.client import _files
from easel.client._async import AsyncClient
from easel.client._common import HANDLER_FOR_EVENT
from easel.config import Settings
from easel.jobs import FINAL_EVENTS, Event, GenerationRequest, Job, JobState, job_error
from easel.runtime.facade import Runtime

EventCallback = Callable[[Event], object]


async def generate_files(
    params: Mapping[str, Any],
    target: Path,
    *,
    server: str | None = None,
    backend: str | None = None,
    model: str | None = None,
    data_dir: Path | None = None,
    token: str | None = None,
    on_event: EventCallback | None = None,
) -> tuple[Job, list[Path]]:
    """Run one request (``params``: the JSON body of ``POST /v1/jobs``) and write its images
    to ``target`` (see :func:`easel.client._files.image_targets`); returns the final job and
    the PNG paths, none when the job did not succeed.

    With ``server``, ``backend`` and ``model`` go into the request; without, they configure
    the embedded runtime, whose database and outputs live in ``data_dir`` (default: a
    temporary directory, removed afterwards).
    """
    chosen = {key: value for key, value in {"backend": backend, "model": model}.items() if value}
    if server is not None:
        return await _via_server(server, {**params, **chosen}, target, token, on_event)
    request = _validated(params)
    with _data_dir(data_dir) as directory:
        return await _embedded(request, target, directory, chosen, on_event)


def quick_generate(
    prompt: str,
    path: Path | str | None = None,
    /,
    output_path: Path | str | None = None,
    *,
    server: str | None = None,
    backend: str | None = None,
    model: str | None = None,
    data_dir: Path | str | None = None,
    **params: Any,
) -> list[Path]:
    """The shortest path from a prompt to files: ``quick_generate("a fox", "fox.png")``.

    Without ``server`` easel runs in this process (the mock backend, or diffusers with
    ``model=DIR``). Writes ``fox.png`` and ``fox.json`` (``fox-1.png``, ``fox-2.png``... for a
    batch); an existing directory gets ``<job id>-<index>.png`` files. Returns the PNG paths.
    A job that fails raises its error. Runs on a thread of its own, so it works inside a
    running event loop (a notebook) too.

    The Draw Things client's form works too: ``quick_generate(address, prompt,
    output_path=...)``, where an ``http(s)://`` address is an easel server and a
    ``host:port`` one a Draw Things gRPC server (easel's ``--grpc-port`` or the app).
    """
    if path is not None and output_path is not None:  # (address, prompt, output_path=...)
        address, prompt = prompt, str(path)
        if not address.startswith(("http://", "https://")):
            from easel.client.grpc import quick_generate as over_grpc

            return [Path(over_grpc(address, prompt, output_path=output_path, **params))]
        server = address
    target = output_path if output_path is not None else path
    if target is None:
        raise TypeError("quick_generate needs an output path: quick_generate('a fox', 'fox.png')")
    call = partial(
        generate_files,
        {**params, "prompt": prompt},
        Path(target),
        server=server,
        backend=backend,
        model=model,
        data_dir=Path(data_dir) if data_dir is not None else None,
    )
    with start_blocking_portal() as portal:
        job, paths = portal.call(call)
    if job.state is not JobState.succeeded:
        raise job_error(job)
    return paths


async def _via_server(
    server: str,
    params: Mapping[str, Any],
    target: Path,
    token: str | None,
    on_event: EventCallback | None,
) -> tuple[Job, list[Path]]:
    async with AsyncClient(server, token=token) as client:
        if on_event is not None:
            for name in HANDLER_FOR_EVENT.values():
                client.on(name, on_event)
        view = await client.submit(**params)
        job = await client.wait(view.id)
        if job.state is not JobState.succeeded:
            return job, []
        if job.audio:
            paths = await client.write_audio(job, _files.audio_targets(target, job))
        else:
            paths = await client.write_images(job, _files.image_targets(target, job))
    return job, paths


async def _embedded(
    request: GenerationRequest,
    target: Path,
    data_dir: Path,
    overrides: dict[str, str],
    on_event: EventCallback | None,
) -> tuple[Job, list[Path]]:
    async with Runtime(Settings(data_dir=data_dir, **overrides)) as runtime:  # type: ignore[arg-type]
        view = await runtime.submit(request)
        async with runtime.bus.subscribe(job_id=view.id, after=0) as events:
            async for event in events:
                if on_event is not None:
                    on_event(event)
                if event.type in FINAL_EVENTS:
                    break
        job = await runtime.get(view.id)
        if job.state is not JobState.succeeded:
            return job, []
        refs = job.audio or job.images
        sources = [runtime.storage.path(ref) for ref in refs]
    paths = _files.result_targets(target, job)
    for source, path in zip(sources, paths, strict=True):
        await asyncio.to_thread(_files.copy_image, source, path)
    return job, paths


def _validated(params: Mapping[str, Any]) -> GenerationRequest:
    """The request, or the ``invalid_request`` error the server would have answered."""
    try:
        return GenerationRequest.model_validate(params)
    except ValidationError as exc:
        raise validation_error(exc.errors()) from None


@contextmanager
def _data_dir(data_dir: Path | None) -> Iterator[Path]:
    if data_dir is not None:
        yield data_dir
        return
    with tempfile.TemporaryDirectory(prefix="easel-") as directory:
        yield Path(directory)
