"""The run times a deployment measured, for ETAs: one table per process, rebuilt from the
samples every process keeps in the store, so every replica prices alike."""

from __future__ import annotations

import dataclasses
import json
import math
from collections import deque
from collections.abc import Callable
from typing import Any

from easel.jobs import GenerationRequest, JobKind
from easel.queue.estimates import ZERO, CostBook, Estimate, Shape, Timing, Timings, spread

ShapeKey = tuple[str, str | None, int, int, int]
_AUDIO_KINDS = frozenset(str(kind) for kind in JobKind if kind.is_audio)


class RunTimes:
    """Measured generation times, for ETAs.

    :class:`~easel.queue.estimates.CostBook` keeps the samples of each shape, the curve
    fitted per backend and the model load times; an EWMA of seconds per work unit
    (``GenerationRequest.cost``) per backend prices what neither covers yet. Every
    measurement is also a :class:`Timing` in ``pending``: the runtime keeps them in the
    store and :meth:`load` rebuilds these tables from every process's samples, so every
    replica of a deployment prices alike.
    """

    def __init__(self, alpha: float = 0.2) -> None:
        self.alpha = alpha
        self.book = CostBook()
        self._per_image: dict[ShapeKey, float] = {}
        self._per_unit: dict[str, float] = {}
        self._finish: dict[str, deque[float]] = {}
        self._gap: dict[str, deque[float]] = {}
        self.pending: list[Timing] = []
        """Measured here, not yet kept in the store."""
        self.on_pending: Callable[[], None] | None = None
        """Called when a measurement joins ``pending`` (the runtime flushes soon after)."""

    def _record(self, kind: str, key: object, seconds: float) -> None:
        self.pending.append(Timing(kind, json.dumps(key), seconds))
        if self.on_pending is not None:
            self.on_pending()

    def load(self, timings: Timings) -> None:
        """Rebuild from the samples every process kept (and what is still pending here)."""
        self.book = CostBook()
        self._per_image, self._per_unit, self._finish, self._gap = {}, {}, {}, {}
        for (kind, key), samples in timings.samples.items():
            try:
                what = json.loads(key)
            except ValueError:
                continue
            for seconds in samples:
                self._replay(kind, what, seconds)
        for timing in self.pending:
            self._replay(timing.kind, json.loads(timing.key), timing.seconds)

    def _replay(self, kind: str, what: Any, seconds: float) -> None:
        match kind:
            case "run":
                self._warm(Shape(*what), seconds)
            case "cold":
                self.book.observe_cold(Shape(*what), seconds)
            case "load":
                self.book.observe_load(what[0], what[1], seconds)
            case "gap":
                self._keep(self._gap, what, seconds)
            case "finish":
                self._keep(self._finish, what, seconds)

    @staticmethod
    def shape(backend: str, request: GenerationRequest) -> ShapeKey:
        return (backend, request.model, request.width, request.height, request.steps)

    def observe(
        self, backend: str, request: GenerationRequest, seconds: float, *, cold: bool = False
    ) -> None:
        """One run took ``seconds``; ``cold``: it loaded its model first (kept apart: the
        book derives the model's load from its shapes' cold and warm runs)."""
        if not math.isfinite(seconds) or seconds <= 0:
            return
        shape = Shape.of(backend, request)
        if cold:
            self.book.observe_cold(shape, seconds)
            self._record("cold", dataclasses.astuple(shape), seconds)
        else:
            self._warm(shape, seconds)
            self._record("run", dataclasses.astuple(shape), seconds)

    def _warm(self, shape: Shape, seconds: float) -> None:
        self.book.observe(shape, seconds)
        if shape.kind not in _AUDIO_KINDS:  # audio: per second of audio (its cost) only
            key = (shape.backend, shape.model, shape.width, shape.height, shape.steps)
            self._update(self._per_image, key, seconds / shape.batch)
        if shape.cost > 0:
            self._update(self._per_unit, shape.backend, seconds / shape.cost)

    def _update(self, table: dict[Any, float], key: Any, sample: float) -> None:
        old = table.get(key)
        table[key] = sample if old is None else old + self.alpha * (sample - old)

    def _keep(self, table: dict[str, deque[float]], key: str, sample: float) -> None:
        table.setdefault(key, deque(maxlen=self.book.keep)).append(sample)

    def observe_finish(self, backend: str, seconds: float) -> None:
        """Finishing one job's results (encode, write, commit) took ``seconds``."""
        if seconds > 0:
            self._keep(self._finish, backend, seconds)
            self._record("finish", backend, seconds)

    def observe_gap(self, backend: str, seconds: float) -> None:
        """A busy worker took ``seconds`` between one run's end and the next one's start
        (claim, events): a per-job cost that run times do not show."""
        if seconds >= 0:
            self._keep(self._gap, backend, seconds)
            self._record("gap", backend, seconds)

    def gap(self, backend: str) -> Estimate:
        """Seconds a busy worker spends between two runs (claim, events): p10, p50, p90
        of the measured gaps (0 until measured), so their jitter widens the range."""
        samples = self._gap.get(backend)
        return spread(samples) if samples else ZERO

    def finish(self, backend: str) -> Estimate:
        """Seconds from a run's end to its results being committed (0 until measured);
        with pipelined results this delays the job's own end, not the next job's start."""
        samples = self._finish.get(backend)
        return spread(samples) if samples else ZERO

    def price(self, backend: str, request: GenerationRequest) -> Estimate | None:
        """One run of this request: p10, p50, p90 seconds, when anything like it was measured."""
        if (estimate := self.book.price(Shape.of(backend, request))) is not None:
            return estimate
        if (mid := self.estimate(backend, request, measured_only=False)) is not None:
            return Estimate(mid, mid, mid)
        return None

    def estimate(
        self, backend: str, request: GenerationRequest, *, measured_only: bool = True
    ) -> float | None:
        """Seconds one run of this request takes, when anything like it was measured."""
        if measured_only and (priced := self.book.price(Shape.of(backend, request))):
            return priced.mid
        per_image = None
        if not request.kind.is_audio:
            per_image = self._per_image.get(self.shape(backend, request))
        if per_image is not None:
            return per_image * request.batch_size
        per_unit = self._per_unit.get(backend)
        return None if per_unit is None else per_unit * request.cost

    def eta(
        self, backend: str, request: GenerationRequest, cost_ahead: float, workers: int
    ) -> float | None:
        """Seconds until done: the work ahead shared by the workers, then its own run."""
        own = self.estimate(backend, request)
        per_unit = self._per_unit.get(backend)
        if own is None or per_unit is None:
            return None
        return per_unit * cost_ahead / max(workers, 1) + own

    def averages(self) -> list[dict[str, Any]]:
        if rows := self.book.averages():
            return rows
        return [
            {"backend": b, "model": m, "width": w, "height": h, "steps": s,
             "seconds_per_image": round(t, 4)}
            for (b, m, w, h, s), t in sorted(self._per_image.items(), key=str)
        ]  # fmt: skip
