"""The clients against a real server (mock backend): results, handlers, errors, resume."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from PIL import Image

from easel import quick_generate
from easel.api import create_app
from easel.client import AsyncClient, Client
from easel.config import Settings
from easel.errors import (
    EaselError,
    GenerationError,
    InvalidRequest,
    JobFinished,
    JobNotFound,
    UserQueueFull,
)
from easel.events.bus import InProcessEventBus
from easel.jobs import Event, EventType, GenerationRequest, JobState
from easel.runtime.facade import Runtime
from tests.servers import serve

SMALL: dict[str, Any] = {"width": 64, "height": 64, "steps": 3}


@pytest.fixture
def slow_server(tmp_path: Path) -> Iterator[str]:
    """A server whose mock backend takes 0.2 s a step: jobs stay queued long enough to see."""
    settings = Settings(data_dir=tmp_path / "slow", mock_step_delay=0.2, backend="mock")
    with serve(create_app(settings)) as url:
        yield url


def _pixels(png: bytes) -> bytes:
    with Image.open(io.BytesIO(png)) as image:
        return image.convert("RGB").tobytes()


async def _until(client: AsyncClient, job_id: str, type: EventType) -> None:
    async with contextlib.aclosing(client.events(job_id=job_id)) as events:
        async for event in events:
            if event.type is type:
                return


async def test_submit_returns_the_job_with_its_seed_and_position(server: str) -> None:
    async with AsyncClient(server, user_id="ann") as client:
        view = await client.submit("a red fox", **SMALL)
        assert view.id
        assert view.request.user_id == "ann"
        assert view.request.seed is not None  # resolved at admission, so reproducible
        assert view.state in {JobState.queued, JobState.running, JobState.succeeded}
        job = await client.wait(view.id, timeout=10)
        assert job.state is JobState.succeeded


async def test_handlers_fire_in_event_order(server: str) -> None:
    seen: list[str] = []
    async with AsyncClient(server) as client:

        @client.on("queued")
        def queued(event: Event) -> None:
            seen.append("queued")

        @client.on("generating")
        async def generating(event: Event) -> None:
            await asyncio.sleep(0)
            seen.append("generating")

        client.on("progress", lambda event: seen.append(f"progress {event.step}/{event.total}"))
        client.on("done", lambda event: seen.append(f"done {len(event.images)}"))

        job = await client.generate("a red fox", **SMALL)

    assert seen == [
        "queued",
        "generating",
        "progress 1/3",
        "progress 2/3",
        "progress 3/3",
        "done 1",
    ]
    assert job.state is JobState.succeeded
    assert [(ref.index, ref.width, ref.height) for ref in job.images] == [(0, 64, 64)]


async def test_a_failed_job_is_returned_and_reaches_the_error_handler(server: str) -> None:
    errors: list[Event] = []
    async with AsyncClient(server) as client:
        client.on("error", errors.append)
        job = await client.generate("[mock:fail] a fox", **SMALL)
    assert job.state is JobState.failed
    assert job.error is not None and job.error.code == "mock_failure"
    assert [event.error.code for event in errors if event.error] == ["mock_failure"]


async def test_images_carry_their_parameters_and_save_with_sidecars(
    server: str, tmp_path: Path
) -> None:
    async with AsyncClient(server) as client:
        job = await client.generate("a red fox", seed=42, batch_size=2, **SMALL)
        png = await client.image(job)
        with Image.open(io.BytesIO(png)) as image:
            assert image.format == "PNG"
            assert image.size == (64, 64)
            parameters = image.info["parameters"]
        assert "a red fox" in parameters
        assert "Seed: 42" in parameters

        paths = await client.save_images(job, tmp_path / "out", prefix="fox")
        assert paths == [tmp_path / "out" / "fox-0.png", tmp_path / "out" / "fox-1.png"]
        sidecar = json.loads(paths[1].with_suffix(".json").read_text())
        assert (sidecar["job_id"], sidecar["index"], sidecar["seed"]) == (job.id, 1, 43)
        assert sidecar["request"]["seed"] == 43
        assert sidecar["request"]["batch_size"] == 1

        # the sidecar alone reproduces its image
        again = await client.generate(request=GenerationRequest(**sidecar["request"]))
        assert _pixels(await client.image(again)) == _pixels(paths[1].read_bytes())


async def test_http_errors_raise_the_matching_easel_error(server: str) -> None:
    async with AsyncClient(server) as client:
        with pytest.raises(InvalidRequest) as invalid:
            await client.submit("a red fox", width=100, height=64)
        assert (invalid.value.code, invalid.value.status) == ("invalid_request", 422)
        assert "multiple of 8" in invalid.value.message

        with pytest.raises(JobNotFound) as missing:
            await client.get("no-such-job")
        assert (missing.value.code, missing.value.status) == ("job_not_found", 404)

        with pytest.raises(JobNotFound) as refused:  # the websocket handshake's answer
            await client.wait("no-such-job", timeout=10)
        assert "no-such-job" in refused.value.message


async def test_an_unreachable_server_is_an_easel_error() -> None:
    async with AsyncClient("http://127.0.0.1:9", timeout=2) as client:
        with pytest.raises(EaselError) as info:
            await client.get("x")
    assert info.value.code == "server_unreachable"


async def test_cancel_a_queued_job(slow_server: str) -> None:
    cancelled: list[Event] = []
    async with AsyncClient(slow_server) as client:
        client.on("cancelled", cancelled.append)
        running = await client.submit("runs first", width=64, height=64, steps=50)
        second = await client.submit("waits", **SMALL)
        third = await client.submit("waits longer", **SMALL)
        await _until(client, running.id, EventType.started)
        assert (await client.get(second.id)).position == 0
        assert (await client.get(third.id)).position == 1

        job = await client.cancel(third.id)
        assert job.state is JobState.cancelled
        assert (await client.wait(third.id, timeout=5)).state is JobState.cancelled
        assert [event.job_id for event in cancelled] == [third.id]
        with pytest.raises(JobFinished) as finished:
            await client.cancel(third.id)
        assert finished.value.code == "job_finished"

        for job_id in (second.id, running.id):
            await client.cancel(job_id)
        assert (await client.wait(running.id, timeout=5)).state is JobState.cancelled


async def test_a_full_user_queue_raises_user_queue_full(slow_server: str) -> None:
    async with AsyncClient(slow_server, user_id="greedy") as client:
        first = await client.submit("one", max_user_queue_size=1, **SMALL)
        with pytest.raises(UserQueueFull) as full:
            await client.submit("two", max_user_queue_size=1, **SMALL)
        assert (full.value.code, full.value.status) == ("user_queue_full", 429)
        await client.cancel(first.id)


async def test_events_resume_after_the_last_id_exactly_once(server: str) -> None:
    async with AsyncClient(server) as client:
        job = await client.generate("a red fox", width=64, height=64, steps=5)
        everything = [event async for event in client.events(job_id=job.id)]
        types = [event.type for event in everything]
        assert types == ["queued", "started", *["progress"] * 5, "succeeded"]

        first: list[Event] = []
        async with contextlib.aclosing(client.events(job_id=job.id)) as events:
            async for event in events:
                first.append(event)
                if len(first) == 3:
                    break
        rest = [event async for event in client.events(job_id=job.id, after=first[-1].id)]
    assert [event.id for event in first + rest] == [event.id for event in everything]


@contextlib.asynccontextmanager
async def _tcp_proxy(url: str) -> AsyncIterator[tuple[str, Callable[[], None]]]:
    """A loopback TCP proxy to ``url``; ``drop()`` cuts every connection through it."""
    target = urlsplit(url)
    transports: list[asyncio.WriteTransport] = []
    tasks: set[asyncio.Task[Any]] = set()

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        writer.close()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        tasks.add(task)
        upstream_reader, upstream_writer = await asyncio.open_connection(
            target.hostname, target.port
        )
        transports.extend([writer.transport, upstream_writer.transport])
        await asyncio.gather(pipe(reader, upstream_writer), pipe(upstream_reader, writer))
        tasks.discard(task)

    def drop() -> None:
        for transport in transports:
            transport.abort()
        transports.clear()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}", drop
    finally:
        server.close()
        drop()
        await asyncio.gather(*tasks, return_exceptions=True)
        await server.wait_closed()


async def test_a_dropped_event_stream_reconnects_without_loss(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "data", mock_step_delay=0.05, backend="mock")
    with serve(create_app(settings)) as url:
        async with _tcp_proxy(url) as (proxy, drop), AsyncClient(proxy) as client:
            drops: list[BaseException] = []
            client.on("connection_error", drops.append)
            view = await client.submit("a red fox", width=64, height=64, steps=10)
            seen: list[Event] = []
            async for event in client.events(job_id=view.id):
                seen.append(event)
                if event.step == 3:
                    drop()
            # what the server holds for the job, replayed in one piece afterwards
            everything = [event.id async for event in client.events(job_id=view.id)]
    assert len(drops) == 1
    assert [event.id for event in seen] == everything  # every event, each exactly once
    assert [event.type for event in seen] == ["queued", "started", *["progress"] * 10, "succeeded"]
    assert [event.step for event in seen if event.type is EventType.progress] == list(range(1, 11))
    ids = [event.id for event in seen]
    assert ids == sorted(set(ids))


async def test_wait_on_a_job_whose_events_are_forgotten(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "data", mock_step_delay=0.0, backend="mock")
    runtime = Runtime(settings, bus=InProcessEventBus(history_size=2))
    with serve(create_app(runtime=runtime)) as url:
        async with AsyncClient(url) as client:
            first = await client.generate("first", **SMALL)
            await client.generate("second pushes the first out of the history", **SMALL)
            done: list[Event] = []
            client.on("done", done.append)
            job = await client.wait(first.id, timeout=10)
    assert job.state is JobState.succeeded
    assert [(event.job_id, event.images) for event in done] == [(first.id, first.images)]


async def test_listen_dispatches_one_users_events(server: str) -> None:
    async with AsyncClient(server) as submitter, AsyncClient(server) as bot:
        await submitter.generate("not for the bot", user_id="someone", **SMALL)
        mine = await submitter.generate("for the bot", user_id="bot", **SMALL)
        done: asyncio.Queue[Event] = asyncio.Queue()
        bot.on("done", done.put_nowait)
        listener = asyncio.create_task(bot.listen(user_id="bot", after=0))
        event = await asyncio.wait_for(done.get(), timeout=10)
        listener.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await listener
    assert event.job_id == mine.id
    assert done.empty()


def test_the_sync_client_runs_the_async_one(server: str, tmp_path: Path) -> None:
    steps: list[int | None] = []
    with Client(server, user_id="sync") as client:

        @client.on("progress")
        def progress(event: Event) -> None:
            steps.append(event.step)

        job = client.generate("a red fox", **SMALL)
        assert job.state is JobState.succeeded
        assert steps == [1, 2, 3]
        assert [listed.id for listed in client.list(user_id="sync")] == [job.id]
        assert client.get(job.id).images == job.images
        types = [event.type for event in client.events(job_id=job.id)]
        assert types[0] == "queued" and types[-1] == "succeeded"
        [path] = client.save_images(job, tmp_path)
        assert path.with_suffix(".json").is_file()
        with pytest.raises(JobNotFound):
            client.cancel("no-such-job")


def test_quick_generate_embedded_writes_a_batch(tmp_path: Path) -> None:
    paths = quick_generate(
        "a red fox", tmp_path / "fox.png", batch_size=2, seed=7, data_dir=tmp_path / "data", **SMALL
    )
    assert paths == [tmp_path / "fox-1.png", tmp_path / "fox-2.png"]
    seeds = [json.loads(path.with_suffix(".json").read_text())["seed"] for path in paths]
    assert seeds == [7, 8]
    with Image.open(paths[0]) as image:
        assert image.size == (64, 64)


def test_quick_generate_embedded_raises_the_job_error(tmp_path: Path) -> None:
    with pytest.raises(GenerationError) as info:
        quick_generate("[mock:fail]", tmp_path / "x.png", **SMALL)
    assert info.value.code == "mock_failure"
    with pytest.raises(InvalidRequest):
        quick_generate("a fox", tmp_path / "x.png", width=65)


def test_quick_generate_via_a_server(server: str, tmp_path: Path) -> None:
    [path] = quick_generate("a red fox", tmp_path / "fox.png", server=server, seed=3, **SMALL)
    assert path == tmp_path / "fox.png"
    sidecar = json.loads(path.with_suffix(".json").read_text())
    assert sidecar["seed"] == 3
    assert sidecar["request"]["prompt"] == "a red fox"
