"""Results on S3: every PNG or audio file (and its sidecar) also goes to an S3-compatible bucket.

boto3 blocks, so every call runs in a thread, never on the event loop. An upload is tried
``max_attempts`` times with :func:`easel.queue.scheduler.retry_delay` backoff; the local copy is
written first and never removed, so a failed upload loses nothing. ``sync_with_s3``
requests are uploaded by the worker before ``succeeded``; the others after it, here, in the
background, ending with an ``uploaded`` (or ``upload_failed``) event.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from pathlib import Path
from typing import Any, TypeVar

from easel.config import S3Settings
from easel.events.bus import EventBus
from easel.jobs import AudioRef, Event, EventType, ImageFormat, ImageRef, Job
from easel.queue.backoff import retry_delay
from easel.results.files import LocalStorage
from easel.store.base import JobStore

log = logging.getLogger("easel.results.s3")

Ref = TypeVar("Ref", ImageRef, AudioRef)


class S3Store:
    """One bucket; the boto3 client is made on first use (in a thread) and is thread-safe."""

    def __init__(self, settings: S3Settings) -> None:
        if not settings.bucket:
            raise ValueError("S3 needs a bucket: set EASEL_S3__BUCKET")
        self.settings = settings
        self.bucket = settings.bucket
        self._client: Any = None
        self._lock = threading.Lock()

    def client(self) -> Any:
        with self._lock:
            if self._client is None:
                import boto3
                from botocore.config import Config

                secret = self.settings.secret_access_key
                self._client = boto3.client(
                    "s3",
                    endpoint_url=self.settings.endpoint_url,
                    region_name=self.settings.region,
                    aws_access_key_id=self.settings.access_key_id,
                    aws_secret_access_key=secret.get_secret_value() if secret else None,
                    config=Config(
                        # our backoff retries; boto3's own would multiply the wait
                        retries={"max_attempts": 1, "mode": "standard"},
                        connect_timeout=self.settings.timeout_seconds,
                        read_timeout=self.settings.timeout_seconds,
                        s3={"addressing_style": "path"},
                        signature_version="s3v4",
                    ),
                )
            return self._client

    def key(self, ref: ImageRef | AudioRef) -> str:
        return f"{self.settings.prefix}{ref.path}"

    def url(self, key: str) -> str:
        """A presigned GET URL (when ``presign_seconds``), else the plain object URL."""
        client = self.client()
        if self.settings.presign_seconds:
            url: str = client.generate_presigned_url(
                "get_object",
                Params={"Bucket": self.bucket, "Key": key},
                ExpiresIn=self.settings.presign_seconds,
            )
            return url
        return f"{client.meta.endpoint_url}/{self.bucket}/{key}"

    def upload(self, refs: list[Ref], storage: LocalStorage) -> list[Ref]:
        """Put every result and its sidecar; return the refs with their ``remote_url``. Blocks."""
        client = self.client()
        done = []
        for ref in refs:
            local = storage.path(ref)
            key = self.key(ref)
            if isinstance(ref, AudioRef):
                media_type = ref.media_type
            else:
                media_type = ImageFormat.of_path(local.name).media_type
            client.put_object(
                Bucket=self.bucket,
                Key=key,
                Body=local.read_bytes(),
                ContentType=media_type,
            )
            sidecar = local.with_suffix(".json")
            if sidecar.is_file():
                client.put_object(
                    Bucket=self.bucket,
                    Key=str(Path(key).with_suffix(".json")),
                    Body=sidecar.read_bytes(),
                    ContentType="application/json",
                )
            done.append(ref.model_copy(update={"remote_url": self.url(key)}))
        return done


class Uploads:
    """Uploads with retries, in threads; tracks background uploads so stop() can end them."""

    def __init__(self, s3: S3Store, storage: LocalStorage, bus: EventBus, store: JobStore) -> None:
        self.s3 = s3
        self.storage = storage
        self.bus = bus
        self.store = store
        self._tasks: set[asyncio.Task[None]] = set()

    async def upload(self, job: Job, refs: list[Ref]) -> list[Ref]:
        """Upload with backoff; raises the last error once ``max_attempts`` are spent."""
        attempts = self.s3.settings.max_attempts
        for attempt in range(1, attempts + 1):
            try:
                return await asyncio.to_thread(self.s3.upload, refs, self.storage)
            except Exception as exc:
                if attempt == attempts:
                    raise
                delay = retry_delay(attempt, base=self.s3.settings.retry_base_seconds)
                log.warning(
                    "job %s: upload attempt %d failed (%s); retrying in %.1fs",
                    job.id, attempt, exc, delay,
                )  # fmt: skip
                await asyncio.sleep(delay)
        raise AssertionError("unreachable")  # pragma: no cover

    def schedule(self, job: Job) -> None:
        """Upload a succeeded job's images after the fact, then announce ``uploaded``."""
        task = asyncio.create_task(self._background(job), name=f"easel-upload-{job.id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _background(self, job: Job) -> None:
        try:
            images = await self.upload(job, job.images)
            audio = await self.upload(job, job.audio)
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}"
            log.error("job %s: upload failed for good; its images stay local: %s", job.id, error)
            await self._annotate(job, upload_error=error)
            await self.bus.publish(Event.of(job, EventType.upload_failed, upload_error=error))
            return
        await self._annotate(job, images=images, audio=audio)
        await self.bus.publish(
            Event.of(job, EventType.uploaded, images=images, audio=audio or None)
        )

    async def _annotate(self, job: Job, **fields: Any) -> None:
        """On the job's record, for every replica and after a restart; a store that is
        down loses only this note (the files and the event still come)."""
        try:
            await self.store.annotate(job.id, **fields)
        except Exception as exc:
            log.error("job %s: could not record its upload on the job (%s)", job.id, exc)

    async def close(self, grace: float = 5.0) -> None:
        """Give uploads in flight ``grace`` seconds, then cancel them (the files stay local)."""
        if self._tasks:
            _, pending = await asyncio.wait(set(self._tasks), timeout=grace)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
