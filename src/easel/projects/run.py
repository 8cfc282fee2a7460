"""Run a prompt set: its jobs submitted together, each image filed with its metadata.

Outputs go to ``OUTPUT/PROJECT/PROMPT_SET/TIMESTAMP_MODEL/images/NNN.png`` with
``metadata/NNN.yaml`` beside: the PNG exactly as easel made it (its ``parameters`` chunk
included), the YAML everything needed to find and reproduce it. Jobs go to a server
through :class:`~easel.client.AsyncClient` when the project names one, else to easel
embedded in this process (the same :class:`~easel.runtime.facade.Runtime` ``easel
generate`` uses).
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from easel.client._async import AsyncClient
from easel.client._common import HANDLER_FOR_EVENT
from easel.config import DiffusersOptions, Settings
from easel.jobs import FINAL_EVENTS, Event, GenerationRequest, Job, JobState
from easel.results.metadata import parse_infotext, read_parameters
from easel.runtime.facade import Runtime

EventCallback = Callable[[Event], object]


@dataclass
class Planned:
    """One job of a run: the request as sent and where its prompt came from."""

    request: dict[str, Any]
    prompt_source: dict[str, Any] = field(default_factory=dict)


@dataclass
class Finished:
    """One job's outcome and its files (none when it did not succeed)."""

    job: Job
    images: list[Path] = field(default_factory=list)
    metadata: list[Path] = field(default_factory=list)


@dataclass
class Target:
    """Where a run goes and what it is called."""

    project: str
    prompt_set: str
    output_dir: Path
    server: str | None = None
    backend: str | None = None
    model: str | None = None
    token: str | None = None
    data_dir: Path | None = None
    diffusers: Mapping[str, Any] = field(default_factory=dict)
    not_applied: Mapping[str, str] = field(default_factory=dict)
    started: float = field(default_factory=time.time)


Fetched = tuple[Job, list[bytes]]


async def run_jobs(
    target: Target, planned: Sequence[Planned], on_event: EventCallback | None = None
) -> list[Finished]:
    """Submit every planned job at once, wait for all, file each success."""
    requests = [_with_choice(p.request, target) for p in planned]
    if target.server is not None:
        fetched = await _via_server(target, requests, on_event)
    else:
        fetched = await _embedded(target, requests, on_event)
    filer = _Filer(target)
    return [filer.file(job, pngs, plan) for (job, pngs), plan in zip(fetched, planned, strict=True)]


def _with_choice(request: Mapping[str, Any], target: Target) -> dict[str, Any]:
    chosen = {"backend": target.backend, "model": target.model} if target.server else {}
    return {**request, **{key: value for key, value in chosen.items() if value}}


async def _via_server(
    target: Target, requests: Sequence[dict[str, Any]], on_event: EventCallback | None
) -> list[Fetched]:
    assert target.server is not None
    async with AsyncClient(target.server, token=target.token) as client:
        if on_event is not None:
            for name in HANDLER_FOR_EVENT.values():
                client.on(name, on_event)
        views = [await client.submit(**request) for request in requests]

        async def finish(job_id: str) -> Fetched:
            job = await client.wait(job_id)
            if job.state is not JobState.succeeded:
                return job, []
            return job, [await client.image(job, ref.index) for ref in job.images]

        return list(await asyncio.gather(*(finish(view.id) for view in views)))


async def _embedded(
    target: Target, requests: Sequence[dict[str, Any]], on_event: EventCallback | None
) -> list[Fetched]:
    chosen = {k: v for k, v in {"backend": target.backend, "model": target.model}.items() if v}
    diffusers = DiffusersOptions.model_validate(dict(target.diffusers))
    with tempfile.TemporaryDirectory(prefix="easel-") as scratch:
        data_dir = target.data_dir or Path(scratch)
        settings = Settings(data_dir=data_dir, diffusers=diffusers, **chosen)  # type: ignore[arg-type]
        async with Runtime(settings) as runtime:
            validated = [GenerationRequest.model_validate(r) for r in requests]
            views = [await runtime.submit(request) for request in validated]

            async def finish(job_id: str) -> Fetched:
                async with runtime.bus.subscribe(job_id=job_id, after=0) as events:
                    async for event in events:
                        if on_event is not None:
                            on_event(event)
                        if event.type in FINAL_EVENTS:
                            break
                job = await runtime.get(job_id)
                paths = [runtime.storage.path(ref) for ref in job.images]
                return job, [await asyncio.to_thread(path.read_bytes) for path in paths]

            return list(await asyncio.gather(*(finish(view.id) for view in views)))


class _Filer:
    """Writes images and metadata; the run's folder is named when the first image is in
    (its model is what the server reports, unless one was named)."""

    def __init__(self, target: Target) -> None:
        self.target = target
        self.folder: Path | None = None
        self.count = 0

    def file(self, job: Job, pngs: list[bytes], plan: Planned) -> Finished:
        finished = Finished(job=job)
        for ref, png in zip(job.images, pngs, strict=True):
            parameters = read_parameters(png).infotext
            fields = parse_infotext(parameters) if parameters else {}
            model = fields.get("Model") or self.target.model or job.backend
            folder = self._folder(model)
            self.count += 1
            stem = f"{self.count:03d}"
            image = folder / "images" / f"{stem}.png"
            meta = folder / "metadata" / f"{stem}.yaml"
            image.parent.mkdir(parents=True, exist_ok=True)
            meta.parent.mkdir(parents=True, exist_ok=True)
            image.write_bytes(png)
            record = _metadata(self.target, job, ref.index, ref.seed, model, plan, parameters)
            meta.write_text(yaml.safe_dump(record, sort_keys=False, allow_unicode=True))
            finished.images.append(image)
            finished.metadata.append(meta)
        return finished

    def _folder(self, model: str) -> Path:
        if self.folder is None:
            stamp = time.strftime("%Y%m%d_%H%M%S", time.localtime(self.target.started))
            label = "".join(c if c.isalnum() or c in "-_." else "_" for c in Path(model).name)
            base = self.target.output_dir / self.target.project / self.target.prompt_set
            self.folder = base / f"{stamp}_{label or 'model'}"
        return self.folder


def _metadata(
    target: Target,
    job: Job,
    index: int,
    seed: int,
    model: str,
    plan: Planned,
    parameters: str | None,
) -> dict[str, Any]:
    request = job.request.model_dump(mode="json", exclude={"init_image", "mask_image"})
    request |= {"seed": seed, "batch_size": 1}
    timings = {
        "created_at": job.created_at,
        "started_at": job.started_at,
        "finished_at": job.finished_at,
        "queued_seconds": _between(job.created_at, job.started_at),
        "run_seconds": _between(job.started_at, job.finished_at),
    }
    return {
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(job.created_at)),
        "project": target.project,
        "prompt_set": target.prompt_set,
        "prompt": job.request.prompt,
        "negative_prompt": job.request.negative_prompt,
        "prompt_source": plan.prompt_source or {"kind": "prompt_set"},
        "model": model,
        "backend": job.backend,
        "server": target.server or "embedded",
        "seed": seed,
        "job_id": job.id,
        "index": index,
        "parameters": request,
        "diffusers_settings": dict(target.diffusers) if target.server is None else {},
        "not_applied": dict(target.not_applied),
        "timings": timings,
        "infotext": parameters,
    }


def _between(start: float | None, end: float | None) -> float | None:
    return round(end - start, 3) if start is not None and end is not None else None
