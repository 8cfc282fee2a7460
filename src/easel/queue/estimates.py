"""ETA policy: what a job will cost, and when it will be done. Pure: no I/O, no clock.

Two parts:

- :class:`CostBook` prices one run from what runs like it measured: the recent samples of
  its exact shape (backend, model, kind, size, steps, batch) give a median and a spread
  (p10-p90); a shape not seen yet is priced by a curve fitted per backend over the shapes
  that were (least squares of ``seconds ~ overhead + per-step + per-step-megapixel``, so
  the curve is what the measurements say, not a fixed formula). Model loads are measured
  apart (a run on a worker that had another model loaded) and added where a load will
  be needed.
- :func:`project` simulates the queue forward: the queued jobs in the order the fair
  queue will serve them (tiers, fair share, aging: :meth:`FairQueue.order`) handed to
  the worker lanes that can run them as each lane comes free, paying a load where a lane
  has another model. Each job gets its wait (until it starts) and its run, at p10, p50
  and p90. Other users' jobs that will overtake, premium arrivals, and model switches
  are all counted because the simulation follows the queue's own policy.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from easel.jobs import GenerationRequest

KEEP = 32
"""Samples kept per shape (the most recent)."""
MIN_SHAPES_TO_FIT = 3
"""Distinct shapes a backend must have measured before its curve prices unseen shapes."""


@dataclass(frozen=True, slots=True)
class Shape:
    """What decides a run's time on one backend."""

    backend: str
    model: str | None
    kind: str
    width: int
    height: int
    steps: int
    batch: int
    cost: float
    """``GenerationRequest.cost``: steps x megapixels x batch (audio: its own units)."""
    audio_ms: int = 0
    """Audio jobs: milliseconds of sound asked for (or expected from the words), which
    decides their run time as the size does an image's."""

    @classmethod
    def of(cls, backend: str, request: GenerationRequest) -> Shape:
        return cls(
            backend=backend,
            model=request.model,
            kind=str(request.kind),
            width=request.width,
            height=request.height,
            steps=request.steps,
            batch=request.batch_size,
            cost=request.cost,
            audio_ms=round(request.audio_seconds * 1000),
        )

    @property
    def key(self) -> tuple[str, str | None, str, int, int, int, int, int]:
        return (
            self.backend, self.model, self.kind, self.width, self.height, self.steps, self.batch,
            self.audio_ms,
        )  # fmt: skip

    def features(self) -> tuple[float, float, float]:
        """The curve's regressors: a fixed overhead, per step, per step-megapixel."""
        return (1.0, float(self.steps * self.batch), float(self.cost))


@dataclass(frozen=True, slots=True)
class Timing:
    """One measured time, for ETAs: ``kind`` says what (``run``: a warm run of a shape,
    ``load``: a model load, ``gap``: a worker's time between runs, ``finish``: committing
    results) and ``key`` of what (JSON: the shape, the backend and model, the backend)."""

    kind: str
    key: str
    seconds: float


@dataclass(frozen=True, slots=True)
class Timings:
    """Every kept sample: ``(kind, key)`` -> seconds, oldest first; ``version`` changes
    with every sample recorded."""

    version: int
    samples: dict[tuple[str, str], list[float]]


@dataclass(frozen=True, slots=True)
class Estimate:
    """Seconds at p10, p50 and p90."""

    low: float
    mid: float
    high: float

    def __add__(self, other: Estimate) -> Estimate:
        return Estimate(self.low + other.low, self.mid + other.mid, self.high + other.high)

    def scaled(self, factor: float) -> Estimate:
        return Estimate(self.low * factor, self.mid * factor, self.high * factor)

    def at(self, level: int) -> float:
        return (self.low, self.mid, self.high)[level]


ZERO = Estimate(0.0, 0.0, 0.0)


def spread(samples: Sequence[float]) -> Estimate:
    """p10, median and p90 of the samples (one sample: all three are it)."""
    if len(samples) == 1:
        return Estimate(samples[0], samples[0], samples[0])
    ordered = sorted(samples)
    deciles = statistics.quantiles(ordered, n=10, method="inclusive")
    mid = statistics.median(ordered)
    # interpolation may stray by an ulp: keep p10 <= p50 <= p90 within the samples
    return Estimate(
        min(max(deciles[0], ordered[0]), mid), mid, max(min(deciles[-1], ordered[-1]), mid)
    )


@dataclass
class CostBook:
    """Measured run and load times, and the curves fitted to them."""

    keep: int = KEEP
    _runs: dict[tuple[object, ...], deque[float]] = field(default_factory=dict)
    _shapes: dict[tuple[object, ...], Shape] = field(default_factory=dict)
    _loads: dict[tuple[str, str | None], deque[float]] = field(default_factory=dict)
    _curves: dict[str, tuple[np.ndarray, float] | None] = field(default_factory=dict)

    def observe(self, shape: Shape, seconds: float) -> None:
        """A warm run (its model was loaded already) took ``seconds``."""
        if not math.isfinite(seconds) or seconds <= 0:
            return
        samples = self._runs.setdefault(shape.key, deque(maxlen=self.keep))
        samples.append(seconds)
        self._shapes[shape.key] = shape
        self._curves.pop(shape.backend, None)  # refit on next use

    def observe_cold(self, shape: Shape, seconds: float) -> None:
        """A run that loaded its model first: the load is what it took over a warm run."""
        warm = self.price(shape)
        if warm is None:  # nothing to subtract yet: a first sample beats none (the median
            self.observe(shape, seconds)  # of later warm runs soon outweighs it)
            return
        self.observe_load(shape.backend, shape.model, seconds - warm.mid)

    def observe_load(self, backend: str, model: str | None, seconds: float) -> None:
        """Loading ``model`` on ``backend`` took ``seconds``."""
        if seconds > 0:
            self._loads.setdefault((backend, model), deque(maxlen=self.keep)).append(seconds)

    def load(self, backend: str, model: str | None) -> float:
        """Seconds a load of ``model`` takes on ``backend`` (median; 0 if never seen)."""
        samples = self._loads.get((backend, model)) or self._loads_of(backend)
        return statistics.median(samples) if samples else 0.0

    def _loads_of(self, backend: str) -> list[float]:
        return [s for (b, _), samples in self._loads.items() if b == backend for s in samples]

    def samples(self, shape: Shape) -> int:
        return len(self._runs.get(shape.key, ()))

    def price(self, shape: Shape) -> Estimate | None:
        """One run of ``shape``: measured, else from the backend's curve; None if unknown."""
        samples = self._runs.get(shape.key)
        if samples:
            return spread(list(samples))
        curve = self._curve(shape.backend)
        if curve is None:
            return None
        coefficients, ratio = curve
        mid = float(np.dot(coefficients, shape.features()))
        if mid <= 0:
            return None
        return Estimate(mid / ratio, mid, mid * ratio)

    def prices(
        self, shape: Shape, routes: Iterable[str], speeds: Mapping[str, float]
    ) -> dict[str, Estimate]:
        """One run of ``shape`` on each of ``routes``: what that backend measured (its own
        samples or curve), else a measured backend's price scaled by their measured speeds
        (work units per second: a backend twice as fast takes half the time). Routes with
        neither are left out."""
        reference = self._reference(shape)
        out = {}
        for route in routes:
            own = self.price(replace(shape, backend=route))
            if own is None and reference is not None:
                backend, priced = reference
                theirs, ours = speeds.get(backend), speeds.get(route)
                factor = theirs / ours if theirs and ours else 1.0
                own = priced.scaled(factor)
            if own is not None:
                out[route] = own
        return out

    def _reference(self, shape: Shape) -> tuple[str, Estimate] | None:
        """A backend that measured this shape (its own backend first) and its price."""
        if (priced := self.price(shape)) is not None:
            return shape.backend, priced
        for other in sorted({s.backend for s in self._shapes.values()} - {shape.backend}):
            if (priced := self.price(replace(shape, backend=other))) is not None:
                return other, priced
        return None

    def _curve(self, backend: str) -> tuple[np.ndarray, float] | None:
        """Least squares over the medians of the backend's shapes (non-negative terms),
        and the typical spread ratio (p90 / p50) of its samples."""
        if backend in self._curves:
            return self._curves[backend]
        shapes = [s for s in self._shapes.values() if s.backend == backend]
        curve = None
        if len(shapes) >= MIN_SHAPES_TO_FIT:
            x = np.array([s.features() for s in shapes])
            y = np.array([statistics.median(self._runs[s.key]) for s in shapes])
            coefficients = _fit_non_negative(x, y)
            ratios = [
                max(est.high / est.mid, est.mid / max(est.low, 1e-9))
                for s in shapes
                if (est := spread(list(self._runs[s.key]))).mid > 0
            ]
            curve = (coefficients, max(statistics.median(ratios), 1.0) if ratios else 1.0)
        self._curves[backend] = curve
        return curve

    def averages(self) -> list[dict[str, object]]:
        """Per shape: the median and spread measured (``GET /v1/queue``)."""
        rows: list[dict[str, object]] = []
        for key, samples in sorted(self._runs.items(), key=str):
            shape, est = self._shapes[key], spread(list(samples))
            row: dict[str, object] = {
                "backend": shape.backend,
                "model": shape.model,
                "width": shape.width,
                "height": shape.height,
                "steps": shape.steps,
                "batch_size": shape.batch,
                "seconds_per_image": round(est.mid / shape.batch, 4),
                "p10_seconds": round(est.low, 4),
                "p90_seconds": round(est.high, 4),
                "samples": len(samples),
            }
            rows.append(row)
        return rows


def _fit_non_negative(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Least squares, dropping any term that comes out negative (a time has no negative
    parts) and fitting again with the rest."""
    active = list(range(x.shape[1]))
    while active:
        solution, *_ = np.linalg.lstsq(x[:, active], y, rcond=None)
        if (solution >= 0).all():
            full = np.zeros(x.shape[1])
            full[active] = solution
            return full
        active.pop(int(np.argmin(solution)))
    return np.zeros(x.shape[1])


# -- projection ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Lane:
    """One worker slot: the route it serves, when it is free, what it will have loaded."""

    route: str
    free_in: Estimate = ZERO
    model: str | None = None


@dataclass(frozen=True, slots=True)
class Waiting:
    """A queued job as the projection needs it, in serving order."""

    job_id: str
    route: str
    model: str | None
    run: Estimate
    """Its own run (warm) on its route, priced by :meth:`CostBook.price` or a default."""
    elsewhere: Mapping[str, Estimate] = field(default_factory=dict)
    """Its run on the other backends that may take it (idle backends take queued work:
    the fleet's work stealing), each priced for that backend (:meth:`CostBook.prices`)."""


@dataclass(frozen=True, slots=True)
class Projection:
    job_id: str
    position: int
    wait: Estimate
    run: Estimate

    @property
    def total(self) -> Estimate:
        return self.wait + self.run


def project(
    waiting: Iterable[Waiting],
    lanes: Sequence[Lane],
    load: Callable[[str, str | None], float],
    *,
    until: str | None = None,
) -> list[Projection]:
    """When each waiting job starts and how long it runs, simulating the lanes forward.

    ``waiting`` is in serving order. A job goes to the lane of its route that comes free
    first (a lane with its model already loaded wins a tie), as workers claim; another
    backend that may run it (``Waiting.elsewhere``) takes it instead when it would finish
    it sooner at its own speed, as the fleet's idle backends take queued work. A lane with
    another model pays ``load(route, model)``. Stops after ``until`` when given. A job no
    lane serves is projected after everything (wait: the whole projected backlog).
    """
    free = [[lane.free_in.at(level) for level in range(3)] for lane in lanes]
    models = [lane.model for lane in lanes]
    out = []
    for position, job in enumerate(waiting):
        options = []  # (finish, not its own route, lane, its run there with any load)
        for route, run in ((job.route, job.run), *job.elsewhere.items()):
            candidates = [i for i, lane in enumerate(lanes) if lane.route == route]
            if not candidates:
                continue
            best = min(candidates, key=lambda i: (free[i][1], models[i] != job.model, i))
            switch = job.model is not None and models[best] not in (None, job.model)
            extra = load(route, job.model) if switch else 0.0
            priced = Estimate(run.low + extra, run.mid + extra, run.high + extra)
            options.append((free[best][1] + priced.mid, route != job.route, best, priced))
        if not options:
            horizon = max((max(f) for f in free), default=0.0)
            behind = Estimate(horizon, horizon, horizon)
            out.append(Projection(job.job_id, position, behind, job.run))
        else:
            _, _, best, run = min(options, key=lambda o: o[:3])
            wait = Estimate(*free[best])
            free[best] = [wait.at(level) + run.at(level) for level in range(3)]
            models[best] = job.model if job.model is not None else models[best]
            out.append(Projection(job.job_id, position, wait, run))
        if job.job_id == until:
            break
    return out


def material(
    old: Projection | None, new: Projection, *, ratio: float = 0.1, floor: float = 2.0
) -> bool:
    """Whether a new estimate is worth announcing: another position, or a total that
    moved by more than ``ratio`` of itself and more than ``floor`` seconds."""
    if old is None:
        return True
    if old.position != new.position:
        return True
    before, after = old.total.mid, new.total.mid
    return abs(after - before) > max(floor, ratio * max(before, after))
