"""Webhooks: a job's events POSTed, signed, to the URL its request named.

Deliveries come from one durable queue per deployment (:mod:`easel.effects.deliveries`):
each event is POSTed by one sender of one replica, retried with
:func:`easel.queue.backoff.retry_delay` backoff up to ``webhook_max_attempts``, then kept
as a dead letter; the summary is on the job (``webhook``). At least once: a sender that
dies mid-POST is taken over, so a receiver dedupes on ``X-Easel-Delivery`` (the same for
every retry of one event). The body is the event as JSON; ``X-Easel-Signature`` is
``sha256=`` + hex HMAC-SHA256 of ``"<X-Easel-Timestamp>.<body>"`` under the server's secret.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import hmac
import logging
import time
from urllib.parse import urlsplit

import httpx

from easel.config import Settings
from easel.effects.deliveries import DELIVERED_TYPES, Delivery, DeliveryQueue, Outcome
from easel.errors import EaselError, InvalidRequest
from easel.events.bus import EventBus
from easel.jobs import Event
from easel.queue.backoff import retry_delay
from easel.store.base import JobStore

log = logging.getLogger("easel.effects.webhooks")

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
    """The dispatcher: feeds the queue (embedded) and runs up to ``MAX_SENDERS`` POSTs."""

    def __init__(
        self, settings: Settings, bus: EventBus, store: JobStore, queue: DeliveryQueue
    ) -> None:
        secret = settings.webhook_secret
        self.secret = secret.get_secret_value().encode() if secret else b""
        self.settings = settings
        self.bus = bus
        self.store = store
        self.queue = queue
        self._urls: dict[str, str | None] = {}  # job id -> its webhook (None: has none)
        self._senders: dict[str, asyncio.Task[None]] = {}  # delivery id -> its POST
        self._taken: dict[str, Delivery] = {}
        self._free = asyncio.Event()
        self._client: httpx.AsyncClient | None = None
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        timeout = httpx.Timeout(self.settings.webhook_timeout_seconds)
        self._client = httpx.AsyncClient(timeout=timeout, follow_redirects=False)
        await self.queue.open()
        if self.queue.follows_bus:
            self._tasks.append(asyncio.create_task(self._listen(), name="easel-webhooks-in"))
        self._tasks.append(asyncio.create_task(self._pump(), name="easel-webhooks-out"))

    async def close(self) -> None:
        tasks = [*self._tasks, *self._senders.values()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for delivery in list(self._taken.values()):  # unsent: another sender takes them now
            try:
                await self.queue.release(delivery)
            except EaselError as exc:
                log.warning("webhook delivery %s not released: %s", delivery.id, exc)
        self._taken.clear()
        await self.queue.close()
        if self._client is not None:
            await self._client.aclose()

    async def _listen(self) -> None:
        """Embedded: every event of a job with a webhook goes into the durable queue."""
        after: int | None = None
        while True:  # a subscription that fell behind ends: resume after the last event seen
            async with self.bus.subscribe(types=DELIVERED_TYPES, after=after) as events:
                async for event in events:
                    after = event.id
                    try:
                        if await self._url_of(event.job_id) is not None:
                            await self.queue.add(event)
                    except Exception:
                        log.exception("webhook: could not queue event %s", event.id)
            await asyncio.sleep(0.1)  # fell behind (or the bus is closing): not a hot loop

    async def _pump(self) -> None:
        while True:
            room = MAX_SENDERS - len(self._senders)
            if room <= 0:
                self._free.clear()
                await self._free.wait()
                continue
            try:
                deliveries = await self.queue.take(room)
            except Exception as exc:
                log.warning("webhook queue unavailable (%s); trying again", exc)
                await asyncio.sleep(1.0)
                continue
            for delivery in deliveries:
                self._taken[delivery.id] = delivery
                task = asyncio.create_task(self._send(delivery))
                self._senders[delivery.id] = task
                task.add_done_callback(functools.partial(self._done, delivery.id))

    def _done(self, delivery_id: str, _: asyncio.Task[None]) -> None:
        self._senders.pop(delivery_id, None)
        self._free.set()

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

    async def _send(self, delivery: Delivery) -> None:
        """One POST, then its outcome settled in the queue (and on the job)."""
        try:
            url = await self._url_of(delivery.event.job_id)
            if url is None:
                await self.queue.skip(delivery)
                self._taken.pop(delivery.id, None)
                return
            error = await self._post(url, delivery)
            attempt = delivery.attempts + 1
            if error is None:
                outcome, delay = Outcome.delivered, 0.0
            elif _retryable(error) and attempt < self.settings.webhook_max_attempts:
                outcome = Outcome.retry
                delay = retry_delay(attempt, base=self.settings.webhook_retry_base_seconds)
            else:
                outcome, delay = Outcome.dead, 0.0
                log.warning("webhook of job %s: %s event not delivered: %s",
                            delivery.event.job_id, delivery.event.type, error)  # fmt: skip
            await self.queue.settle(delivery, url, outcome, error=error, retry_in=delay)
            self._taken.pop(delivery.id, None)
        except EaselError as exc:  # the queue's store is down: the delivery stays pending
            log.warning("webhook delivery %s not settled: %s", delivery.id, exc)

    async def _post(self, url: str, delivery: Delivery) -> str | None:
        """POST the event; None when taken (2xx), else why not."""
        if self._client is None:
            raise RuntimeError("Webhooks.start() was not called")
        body = _body(delivery.event)
        timestamp = str(int(time.time()))
        headers = {
            "content-type": "application/json",
            "x-easel-timestamp": timestamp,
            "x-easel-signature": sign(self.secret, timestamp, body),
            "x-easel-delivery": delivery.id,
        }
        try:
            response = await self._client.post(url, content=body, headers=headers)
        except httpx.HTTPError as exc:
            return f"{type(exc).__name__}: {exc}"
        return None if response.is_success else f"HTTP {response.status_code}"


def _body(event: Event) -> bytes:
    return event.model_dump_json(exclude={"preview"}).encode()


def _retryable(error: str) -> bool:
    """Connection trouble, 5xx, 408 and 429 are worth another try; other 4xx are not."""
    return "HTTP 4" not in error or error in {"HTTP 408", "HTTP 429"}
