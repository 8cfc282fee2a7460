"""Webhooks: a job's events POSTed, signed, to the URL its request named.

One task subscribes to the bus for every job (no ``progress``: a tick per step is too many
POSTs to be worth it; poll or stream for progress). Each job with a webhook gets a bounded
queue and one sender at a time, so its events arrive in order and a slow receiver delays
only its own job, never the worker. Every POST is retried with
:func:`easel.queue.scheduler.retry_delay` backoff, ``max_attempts`` at most; the delivery state
is on the job (``webhook``). The body is the event as JSON; ``X-Easel-Signature`` is
``sha256=`` + hex HMAC-SHA256 of ``"<X-Easel-Timestamp>.<body>"`` under the server's secret.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import time
from urllib.parse import urlsplit

import httpx

from easel.config import Settings
from easel.errors import EaselError, InvalidRequest
from easel.events.bus import EventBus
from easel.jobs import Event, EventType, WebhookDelivery
from easel.queue.backoff import retry_delay
from easel.store.base import JobStore

log = logging.getLogger("easel.effects.webhooks")

DELIVERED_TYPES = frozenset(EventType) - {EventType.progress}
JOB_QUEUE_SIZE = 100
MAX_SENDERS = 16
_KNOWN_JOBS = 10_000


class WebhookNotAllowed(InvalidRequest):
    code = "webhook_not_allowed"


def check_webhook_url(url: str, allowed_hosts: list[str], secret_set: bool) -> None:
    """Refuse, at admission, a webhook that is not http(s) to an allowed host (no SSRF)."""
    parts = urlsplit(url)
    if parts.scheme not in {"http", "https"} or not parts.hostname:
        raise WebhookNotAllowed("webhook_url must be an http(s) URL with a host")
    if not allowed_hosts or not secret_set:
        raise WebhookNotAllowed(
            "this server sends no webhooks; set webhook_allowed_hosts and webhook_secret"
        )
    if parts.hostname.lower() not in {host.lower() for host in allowed_hosts}:
        raise WebhookNotAllowed(
            f"webhook host {parts.hostname!r} is not allowed; allowed hosts are: "
            + ", ".join(sorted(allowed_hosts))
        )


def sign(secret: bytes, timestamp: str, body: bytes) -> str:
    digest = hmac.new(secret, timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()
    return f"sha256={digest}"


class Webhooks:
    """The dispatcher: one bus subscriber, one sender task per job with events pending."""

    def __init__(self, settings: Settings, bus: EventBus, store: JobStore) -> None:
        secret = settings.webhook_secret
        self.secret = secret.get_secret_value().encode() if secret else b""
        self.settings = settings
        self.bus = bus
        self.store = store
        self._urls: dict[str, str | None] = {}  # job id -> its webhook (None: has none)
        self._queues: dict[str, asyncio.Queue[Event]] = {}
        self._senders: dict[str, asyncio.Task[None]] = {}
        self._limit = asyncio.Semaphore(MAX_SENDERS)
        self._client: httpx.AsyncClient | None = None
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        timeout = httpx.Timeout(self.settings.webhook_timeout_seconds)
        self._client = httpx.AsyncClient(timeout=timeout, follow_redirects=False)
        self._task = asyncio.create_task(self._listen(), name="easel-webhooks")

    async def close(self) -> None:
        tasks = [t for t in (self._task, *self._senders.values()) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._client is not None:
            await self._client.aclose()

    async def _listen(self) -> None:
        after: int | None = None
        while True:  # a subscription that fell behind ends: resume after the last event seen
            async with self.bus.subscribe(types=DELIVERED_TYPES, after=after) as events:
                async for event in events:
                    after = event.id
                    try:
                        await self._route(event)
                    except Exception:
                        log.exception("webhook: could not route event %s", event.id)
            await asyncio.sleep(0.1)  # fell behind (or the bus is closing): not a hot loop

    async def _route(self, event: Event) -> None:
        url = await self._url_of(event.job_id)
        if url is None:
            return
        queue = self._queues.setdefault(event.job_id, asyncio.Queue(JOB_QUEUE_SIZE))
        try:
            queue.put_nowait(event)
        except asyncio.QueueFull:
            log.warning("webhook of job %s is too far behind; event dropped", event.job_id)
            await self._note(event.job_id, url, last_error="receiver too slow; events dropped")
            return
        if event.job_id not in self._senders:
            sender = asyncio.create_task(self._send_all(event.job_id, url, queue))
            self._senders[event.job_id] = sender

    async def _url_of(self, job_id: str) -> str | None:
        if job_id not in self._urls:
            if len(self._urls) >= _KNOWN_JOBS:
                self._urls.pop(next(iter(self._urls)))
            try:
                job = await self.store.get(job_id)
            except EaselError:
                return None
            self._urls[job_id] = job.request.webhook_url
        return self._urls[job_id]

    async def _send_all(self, job_id: str, url: str, queue: asyncio.Queue[Event]) -> None:
        try:
            while not queue.empty():
                await self._deliver(url, queue.get_nowait())
        finally:
            self._senders.pop(job_id, None)
            if queue.empty():
                self._queues.pop(job_id, None)

    async def _deliver(self, url: str, event: Event) -> None:
        """POST one event until it is taken (2xx) or the attempts are spent."""
        if self._client is None:
            raise RuntimeError("Webhooks.start() was not called")
        body = event.model_dump_json(exclude={"preview"}).encode()
        for attempt in range(1, self.settings.webhook_max_attempts + 1):
            timestamp = str(int(time.time()))
            headers = {
                "content-type": "application/json",
                "x-easel-timestamp": timestamp,
                "x-easel-signature": sign(self.secret, timestamp, body),
            }
            error: str | None
            async with self._limit:
                try:
                    response = await self._client.post(url, content=body, headers=headers)
                except httpx.HTTPError as exc:
                    error = f"{type(exc).__name__}: {exc}"
                else:
                    error = None if response.is_success else f"HTTP {response.status_code}"
            await self._note(event.job_id, url, attempt=True, error=error)
            if error is None:
                return
            retryable = "HTTP 4" not in error or error in {"HTTP 408", "HTTP 429"}
            if not retryable or attempt == self.settings.webhook_max_attempts:
                log.warning("webhook of job %s: %s event not delivered: %s",
                            event.job_id, event.type, error)  # fmt: skip
                return
            delay = retry_delay(attempt, base=self.settings.webhook_retry_base_seconds)
            await asyncio.sleep(delay)

    async def _note(
        self,
        job_id: str,
        url: str,
        *,
        attempt: bool = False,
        error: str | None = None,
        last_error: str | None = None,
    ) -> None:
        try:
            state = (await self.store.get(job_id)).webhook or WebhookDelivery(url=url)
        except EaselError as exc:
            log.warning("webhook of job %s: its delivery state is not recorded: %s", job_id, exc)
            return
        update: dict[str, object] = {}
        if attempt:
            update["attempts"] = state.attempts + 1
            update["delivered"] = error is None
            if error is None:
                update["events"] = state.events + 1
            else:
                update["last_error"] = error
        if last_error is not None:
            update["last_error"] = last_error
        try:
            await self.store.annotate(job_id, webhook=state.model_copy(update=update))
        except EaselError as exc:
            log.warning("webhook of job %s: its delivery state is not recorded: %s", job_id, exc)
