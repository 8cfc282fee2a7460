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
  and p90. Other users' queued jobs that will go first, premium work and model switches
  are all counted because the simulation follows the queue's own policy.

The measurements themselves are :class:`easel.queue.run_times.RunTimes`; what is not
queued yet, but will go ahead, is :mod:`easel.queue.arrivals`.
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
    _cold: dict[tuple[object, ...], deque[float]] = field(default_factory=dict)
    _shapes: dict[tuple[object, ...], Shape] = field(default_factory=dict)
    _loads: dict[tuple[str, str | None], deque[float]] = field(default_factory=dict)
    _curves: dict[str, tuple[np.ndarray, float] | None] = field(default_factory=dict)
    _derived: dict[tuple[str, str | None], list[float]] | None = None

    def observe(self, shape: Shape, seconds: float) -> None:
        """A warm run (its model was loaded already) took ``seconds``."""
        if not math.isfinite(seconds) or seconds <= 0:
            return
        samples = self._runs.setdefault(shape.key, deque(maxlen=self.keep))
        samples.append(seconds)
        self._shapes[shape.key] = shape
        self._changed(shape.backend)

    def observe_cold(self, shape: Shape, seconds: float) -> None:
        """A run that loaded its model first. Kept apart: a model's load is what its
        shapes' cold runs take over their warm ones, and until a shape has warm runs its
        cold ones price it less that load."""
        if not math.isfinite(seconds) or seconds <= 0:
            return
        self._cold.setdefault(shape.key, deque(maxlen=self.keep)).append(seconds)
        self._shapes[shape.key] = shape
        self._changed(shape.backend)

    def observe_load(self, backend: str, model: str | None, seconds: float) -> None:
        """Loading ``model`` on ``backend`` took ``seconds`` (measured apart)."""
        if seconds > 0:
            self._loads.setdefault((backend, model), deque(maxlen=self.keep)).append(seconds)
            self._derived = None

    def _changed(self, backend: str) -> None:
        self._curves.pop(backend, None)  # refit on next use
        self._derived = None

    def _load_samples(self) -> dict[tuple[str, str | None], list[float]]:
        """Per (backend, model): each shape's cold median over its warm median (or over
        the warm curve's price of it), and the loads measured apart."""
        if self._derived is None:
            derived: dict[tuple[str, str | None], list[float]] = {
                key: list(samples) for key, samples in self._loads.items()
            }
            for key, cold in self._cold.items():
                shape = self._shapes[key]
                warm = self._runs.get(key)
                if warm:
                    base = statistics.median(warm)
                elif (curve := self._curve(shape.backend)) is not None:
                    base = float(np.dot(curve[0], shape.features()))  # the warm curve's price
                else:
                    continue
                extra = statistics.median(cold) - base
                derived.setdefault((shape.backend, shape.model), []).append(max(extra, 0.0))
            self._derived = derived
        return self._derived

    def load(self, backend: str, model: str | None) -> float:
        """Seconds a load of ``model`` takes on ``backend`` (median; 0 if never seen)."""
        return self._known_load(backend, model) or 0.0

    def _known_load(self, backend: str, model: str | None) -> float | None:
        loads = self._load_samples()
        samples = loads.get((backend, model)) or [
            s for (b, _), listed in loads.items() if b == backend for s in listed
        ]
        return statistics.median(samples) if samples else None

    def samples(self, shape: Shape) -> int:
        return len(self._runs.get(shape.key, ()))

    def _measured(self, key: tuple[object, ...]) -> Estimate | None:
        """A shape's own runs: warm ones, else cold ones less the model's load."""
        if samples := self._runs.get(key):
            return spread(list(samples))
        cold = self._cold.get(key)
        if not cold:
            return None
        shape = self._shapes[key]
        load = self._known_load(shape.backend, shape.model)
        if load is None:
            return None
        est = spread(list(cold))
        floor = 0.05 * est.low
        return Estimate(*(max(est.at(i) - load, floor) for i in range(3)))

    def price(self, shape: Shape) -> Estimate | None:
        """One run of ``shape``: measured, else from the backend's curve, else its cold
        runs as they are; None if unknown."""
        if (measured := self._measured(shape.key)) is not None:
            return measured
        curve = self._curve(shape.backend)
        if curve is not None:
            coefficients, ratio = curve
            mid = float(np.dot(coefficients, shape.features()))
            if mid > 0:
                return Estimate(mid / ratio, mid, mid * ratio)
        if cold := self._cold.get(shape.key):
            return spread(list(cold))
        return None

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
        measured = [  # warm runs: cold ones are priced from the curve, not into it...
            (s, spread(list(self._runs[key])))
            for key, s in self._shapes.items()
            if s.backend == backend and self._runs.get(key)
        ]
        if len(measured) < MIN_SHAPES_TO_FIT:  # ...unless too few shapes ran warm yet
            measured += [
                (s, spread(list(self._cold[key])))
                for key, s in self._shapes.items()
                if s.backend == backend and not self._runs.get(key) and self._cold.get(key)
            ]
        curve = None
        if len(measured) >= MIN_SHAPES_TO_FIT:
            x = np.array([s.features() for s, _ in measured])
            y = np.array([est.mid for _, est in measured])
            coefficients = _fit_non_negative(x, y)
            ratios = [max(est.high / est.mid, est.mid / max(est.low, 1e-9))
                      for _, est in measured if est.mid > 0]  # fmt: skip
            curve = (coefficients, max(statistics.median(ratios), 1.0) if ratios else 1.0)
        self._curves[backend] = curve
        return curve

    def averages(self) -> list[dict[str, object]]:
        """Per shape: the median and spread measured (``GET /v1/queue``)."""
        rows: list[dict[str, object]] = []
        for key in sorted(self._shapes, key=str):
            shape, est = self._shapes[key], self.price(self._shapes[key])
            if est is None:
                continue
            samples = self._runs.get(key) or self._cold.get(key) or ()
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
    wait_var: float = 0.0
    """Variance of the wait: the runs ahead on its lane, each with its own spread, summed
    as independent times add (the p10-p90 of a sum is narrower than the sum of theirs)."""

    @property
    def total(self) -> Estimate:
        """When it is done: the wait's and its own run's spreads combined."""
        if self.wait_var <= 0 and self.wait.low == self.wait.high:
            return self.wait + self.run
        return _spread_of(self.wait.mid + self.run.mid, self.wait_var + variance(self.run))


Z90 = 1.2816
"""The 90th percentile of a standard normal: p10-p90 is the mean +- Z90 sd."""


def variance(estimate: Estimate) -> float:
    """Of one time, from its p10-p90 spread (normal approximation)."""
    sd = (estimate.high - estimate.low) / (2 * Z90)
    return sd * sd


def _spread_of(mid: float, var: float) -> Estimate:
    sd = math.sqrt(max(var, 0.0))
    return Estimate(max(mid - Z90 * sd, 0.0), mid, mid + Z90 * sd)


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
    free = [[lane.free_in.mid, variance(lane.free_in)] for lane in lanes]  # mean, variance
    models = [lane.model for lane in lanes]
    out = []
    for position, job in enumerate(waiting):
        options = []  # (finish, not its own route, lane, its run there with any load)
        for route, run in ((job.route, job.run), *job.elsewhere.items()):
            candidates = [i for i, lane in enumerate(lanes) if lane.route == route]
            if not candidates:
                continue
            best = min(candidates, key=lambda i: (free[i][0], models[i] != job.model, i))
            switch = job.model is not None and models[best] not in (None, job.model)
            extra = load(route, job.model) if switch else 0.0
            priced = Estimate(run.low + extra, run.mid + extra, run.high + extra)
            options.append((free[best][0] + priced.mid, route != job.route, best, priced))
        if not options:
            horizon = max((f[0] for f in free), default=0.0)
            behind = Estimate(horizon, horizon, horizon)
            out.append(Projection(job.job_id, position, behind, job.run))
        else:
            _, _, best, run = min(options, key=lambda o: o[:3])
            mid, var = free[best]
            wait = _spread_of(mid, var)
            free[best] = [mid + run.mid, var + variance(run)]
            models[best] = job.model if job.model is not None else models[best]
            out.append(Projection(job.job_id, position, wait, run, var))
        if job.job_id == until:
            break
    return out


@dataclass(frozen=True, slots=True)
class Announced:
    """What a job's latest ``queued`` event said (or would say now)."""

    position: int
    at: float
    """When it was said (any clock, the same for all)."""
    end: float
    """When it said the job will be done: ``at`` + its ETA."""


def material(
    old: Announced | None, new: Announced, *, ratio: float = 0.1, floor: float = 1.0
) -> bool:
    """Whether a new estimate is worth announcing: another position, or a job now expected
    to be done more than ``ratio`` of what it has left and more than ``floor`` seconds
    earlier or later than said. Ends are compared, not ETAs: an ETA that counts down as
    said is no news."""
    if old is None or old.position != new.position:
        return True
    return abs(new.end - old.end) > max(floor, ratio * (new.end - new.at))
