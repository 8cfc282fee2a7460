"""Prometheus metrics, fed by the event bus: what operators watch.

Counters and histograms follow events (one subscriber, nothing on the request path);
gauges of queue depth are read from the store at scrape time.
"""

from __future__ import annotations

from collections.abc import Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from easel.jobs import FINAL_EVENTS, Event, EventType
from easel.store.base import JobStore
from easel.views import BackendStatus

_SECONDS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.submitted = Counter("easel_jobs_submitted", "Jobs accepted", ["backend"], registry=r)
        self.finished = Counter(
            "easel_jobs_finished", "Jobs ended, by final state", ["backend", "state"], registry=r
        )
        self.rejected = Counter(
            "easel_rejections", "Submissions refused, by error code", ["code"], registry=r
        )
        self.wait = Histogram(
            "easel_job_wait_seconds", "Queued until started", ["backend", "model"],
            buckets=_SECONDS, registry=r,
        )  # fmt: skip
        self.run = Histogram(
            "easel_job_run_seconds", "Started until succeeded", ["backend", "model"],
            buckets=_SECONDS, registry=r,
        )  # fmt: skip
        self.queued = Gauge("easel_queue_depth", "Queued jobs per tier", ["tier"], registry=r)
        self.running = Gauge("easel_jobs_running", "Jobs running now", registry=r)
        self.workers = Gauge("easel_workers", "Workers serving this process", registry=r)
        self.backend_state = Gauge(
            "easel_backend_state", "1 for each backend's breaker state (up, down, probing)",
            ["backend", "kind", "state"], registry=r,
        )  # fmt: skip
        self.backend_slots = Gauge(
            "easel_backend_slots", "Jobs a backend runs at once", ["backend"], registry=r
        )
        self.backend_busy = Gauge(
            "easel_backend_slots_in_use", "Jobs a backend runs now", ["backend"], registry=r
        )
        self.backend_queued = Gauge(
            "easel_backend_queued_work", "Work units queued for a backend", ["backend"], registry=r
        )
        self.backend_speed = Gauge(
            "easel_backend_speed", "Measured work units per second (one slot)", ["backend"],
            registry=r,
        )  # fmt: skip
        self._started: dict[str, float] = {}
        self._queued_at: dict[str, float] = {}
        self._labels: dict[str, tuple[str, str]] = {}

    def label(
        self, job_id: str, backend: str, model: str | None, *, queued_at: float | None = None
    ) -> None:
        """A job's labels (and, for a job queued elsewhere, when it was queued)."""
        self._labels[job_id] = (backend, model or "")
        if queued_at is not None:
            self._queued_at.setdefault(job_id, queued_at)

    def knows(self, job_id: str) -> bool:
        return job_id in self._labels

    def observe(self, event: Event) -> None:
        """Count one event; wait and run times come from the event timestamps."""
        backend, model = self._labels.get(event.job_id, ("unknown", ""))
        if event.type is EventType.queued and event.job_id not in self._queued_at:
            self._queued_at[event.job_id] = event.at
            self.submitted.labels(backend).inc()
        elif event.type is EventType.started:
            self._started[event.job_id] = event.at
            if (queued := self._queued_at.get(event.job_id)) is not None:
                self.wait.labels(backend, model).observe(event.at - queued)
        elif event.type in FINAL_EVENTS:
            started = self._started.pop(event.job_id, None)
            self._queued_at.pop(event.job_id, None)
            self._labels.pop(event.job_id, None)
            if event.type is EventType.succeeded and started is not None:
                self.run.labels(backend, model).observe(event.at - started)
            self.finished.labels(backend, event.type.value).inc()

    async def render(
        self, store: JobStore, workers: int, backends: Sequence[BackendStatus] = ()
    ) -> bytes:
        stats = await store.stats()
        for gauge in (self.backend_state, self.backend_slots, self.backend_busy,
                      self.backend_queued, self.backend_speed):  # fmt: skip
            gauge.clear()
        for backend in backends:
            self.backend_state.labels(backend.name, backend.kind, backend.state).set(1)
            self.backend_slots.labels(backend.name).set(backend.slots)
            self.backend_busy.labels(backend.name).set(backend.slots_in_use)
            self.backend_queued.labels(backend.name).set(backend.queued_work)
            if backend.speed is not None:
                self.backend_speed.labels(backend.name).set(backend.speed)
        self.queued.clear()
        for tier, count in stats.tiers.items():
            self.queued.labels(str(tier)).set(count)
        self.running.set(stats.running)
        self.workers.set(workers)
        return generate_latest(self.registry)
