"""Results on S3, against a real S3-compatible server (moto's) on a loopback port."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import boto3
import httpx
import pytest
from moto.server import ThreadedMotoServer

from easel.config import S3Settings, Settings
from easel.events.bus import Subscription
from easel.jobs import Event, EventType, GenerationRequest
from easel.runtime.facade import Runtime
from tests.servers import free_port

BUCKET = "easel-test"
CREDENTIALS = {"access_key_id": "testing", "secret_access_key": "testing"}
SMALL: dict[str, Any] = {"prompt": "a lighthouse", "width": 64, "height": 64, "steps": 2}


class Moto:
    """moto's standalone S3 server; stop() and start() again keep its buckets (in-process)."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._server: ThreadedMotoServer | None = None

    def start(self) -> None:
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self._server.start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None


@pytest.fixture(scope="module")
def moto() -> Iterator[Moto]:
    server = Moto()
    server.start()
    boto3.client(
        "s3",
        endpoint_url=server.url,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    ).create_bucket(Bucket=BUCKET)
    yield server
    server.stop()


def s3_settings(tmp_path: Path, moto: Moto, **s3: Any) -> Settings:
    options: dict[str, Any] = {"bucket": BUCKET, "endpoint_url": moto.url, "region": "us-east-1"}
    options |= {"retry_base_seconds": 0.1, **CREDENTIALS, **s3}
    return Settings(
        data_dir=tmp_path / "data", mock_step_delay=0.0, backend="mock", s3=S3Settings(**options)
    )


@pytest.fixture
async def runtime(tmp_path: Path, moto: Moto) -> AsyncIterator[Runtime]:
    async with Runtime(s3_settings(tmp_path, moto)) as runtime:
        yield runtime


async def events_of(events: Subscription, job_id: str, until: EventType) -> list[Event]:
    seen = []
    async with asyncio.timeout(20):
        async for event in events:
            if event.job_id == job_id:
                seen.append(event)
                if event.type is until:
                    return seen
    raise AssertionError(f"the stream ended before {until}")


def local_png(runtime: Runtime, event: Event) -> bytes:
    assert event.images is not None
    return runtime.storage.path(event.images[0]).read_bytes()


async def test_sync_with_s3_announces_succeeded_only_after_the_upload(runtime: Runtime) -> None:
    async with runtime.bus.subscribe() as events:
        job = await runtime.submit(GenerationRequest(**SMALL, sync_with_s3=True))
        seen = await events_of(events, job.id, EventType.succeeded)
    succeeded = seen[-1]
    assert succeeded.images is not None and succeeded.upload_error is None
    url = succeeded.images[0].remote_url
    assert url is not None and "X-Amz-Signature" in url  # presigned by default
    download = httpx.get(url)  # the object is there as soon as succeeded is out
    assert download.status_code == 200
    assert download.content == local_png(runtime, succeeded)
    assert EventType.uploaded not in [e.type for e in seen]
    stored = await runtime.get(job.id)
    assert stored.images[0].remote_url == url  # on the job record too


async def test_without_sync_succeeded_comes_first_then_uploaded(runtime: Runtime) -> None:
    async with runtime.bus.subscribe() as events:
        job = await runtime.submit(GenerationRequest(**SMALL))
        seen = await events_of(events, job.id, EventType.uploaded)
    types = [e.type for e in seen]
    assert types.index(EventType.succeeded) < types.index(EventType.uploaded)
    succeeded, uploaded = seen[types.index(EventType.succeeded)], seen[-1]
    assert succeeded.images is not None and succeeded.images[0].remote_url is None
    assert uploaded.images is not None and (url := uploaded.images[0].remote_url) is not None
    assert httpx.get(url).content == local_png(runtime, succeeded)
    record = await runtime.get(job.id)
    assert record.images[0].remote_url == url and record.upload_error is None


async def test_plain_urls_when_presigning_is_off(tmp_path: Path, moto: Moto) -> None:
    runtime = Runtime(s3_settings(tmp_path, moto, presign_seconds=0))
    async with runtime, runtime.bus.subscribe() as events:
        job = await runtime.submit(GenerationRequest(**SMALL, sync_with_s3=True))
        succeeded = (await events_of(events, job.id, EventType.succeeded))[-1]
    assert succeeded.images is not None
    key = f"easel/{succeeded.images[0].path}"
    assert succeeded.images[0].remote_url == f"{moto.url}/{BUCKET}/{key}"


async def test_upload_retries_until_the_server_is_back(tmp_path: Path, moto: Moto) -> None:
    settings = s3_settings(tmp_path, moto, max_attempts=20, retry_base_seconds=0.2)
    async with Runtime(settings) as runtime:
        moto.stop()
        try:
            async with runtime.bus.subscribe() as events:
                job = await runtime.submit(GenerationRequest(**SMALL))
                seen = await events_of(events, job.id, EventType.succeeded)
                assert seen[-1].images is not None
                local = runtime.storage.path(seen[-1].images[0])
                await asyncio.sleep(0.6)  # an attempt or two fail against the stopped server
                assert (await runtime.get(job.id)).images[0].remote_url is None
        finally:
            moto.start()
        async with runtime.bus.subscribe(job_id=job.id, after=seen[-1].id) as events:
            uploaded = await events_of(events, job.id, EventType.uploaded)
    assert uploaded[-1].images is not None and uploaded[-1].images[0].remote_url is not None
    assert httpx.get(uploaded[-1].images[0].remote_url).content == local.read_bytes()


async def test_a_failed_upload_keeps_the_job_and_its_local_image(
    tmp_path: Path, moto: Moto
) -> None:
    settings = s3_settings(tmp_path, moto, max_attempts=2, retry_base_seconds=0.05)
    async with Runtime(settings) as runtime:
        moto.stop()
        try:
            async with runtime.bus.subscribe() as events:
                job = await runtime.submit(GenerationRequest(**SMALL, sync_with_s3=True))
                seen = await events_of(events, job.id, EventType.succeeded)
                later = await runtime.submit(GenerationRequest(**SMALL))
                failed = await events_of(events, later.id, EventType.upload_failed)
        finally:
            moto.start()
        record = await runtime.get(job.id)
    succeeded = seen[-1]
    assert succeeded.upload_error and record.upload_error == succeeded.upload_error
    assert record.state == "succeeded" and record.images[0].remote_url is None
    assert runtime.storage.path(record.images[0]).is_file()
    assert failed[-1].upload_error


@pytest.mark.parametrize("sync", [True, False])
async def test_audio_goes_to_s3_like_images(tmp_path: Path, moto: Moto, sync: bool) -> None:
    from easel.backends.mock import MockAudioBackend

    settings = s3_settings(tmp_path, moto)
    async with Runtime(settings, backends={"mock-audio": MockAudioBackend()}) as runtime:
        request = GenerationRequest.model_validate(
            {"kind": "txt2audio", "prompt": "rain", "duration_seconds": 0.5, "steps": 2,
             "audio_format": "flac", "sync_with_s3": sync}
        )  # fmt: skip
        async with runtime.bus.subscribe() as events:
            job = await runtime.submit(request)
            until = EventType.succeeded if sync else EventType.uploaded
            last = (await events_of(events, job.id, until))[-1]
        assert last.audio is not None
        url = last.audio[0].remote_url
        assert url is not None
        download = httpx.get(url)
        assert download.headers["content-type"] == "audio/flac"
        assert download.content == runtime.storage.path(last.audio[0]).read_bytes()
        assert (await runtime.get(job.id)).audio[0].remote_url == url
