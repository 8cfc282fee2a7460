"""Routing policy: which backend of the fleet runs a job. Pure: no I/O, no clock.

The runtime describes each backend as a :class:`BackendView` (what it can do, what it has
loaded, how much work it holds, how fast it is, whether its breaker lets work through) and
each job as a :class:`Want`; :func:`choose` picks one, :func:`claim` says what a backend
out of work does (load a model waiting jobs want and nobody has loaded, :func:`pressure`;
take a run of jobs queued elsewhere, :func:`take`), and :class:`Breaker` is the
per-backend circuit breaker. ``tests/test_routing.py`` checks the properties with hypothesis;
``benchmarks/fleet.py`` runs this very code against round robin and least-loaded.

Policy, in order:
1. **Filter**: the backends the job may run on: named ones only (``backend`` or a
   fallback list), with every capability it needs, serving its model, carrying its tags,
   and whose breaker is closed (a down backend receives nothing).
2. **Model affinity**: among those, a backend that has the job's model loaded (or will
   have, after the work it holds) is preferred, unless its wait exceeds the least-loaded
   eligible backend's by more than that model's load time plus ``slack``: then loading it
   elsewhere is cheaper than waiting.
3. **Least work**: otherwise the backend whose outstanding work, in seconds at its
   measured speed, is smallest (a switch costs it the load time); ties go to the faster,
   then by name, so the choice is deterministic.

Model-switch costs make this differ from round robin and plain least-loaded: on a
diffusion fleet a switch costs seconds to minutes (``protocols/routing.md``: SwarmUI,
Ray Serve's multiplexing and the prefix-cache routers of vLLM/SGLang do the same with a
balance threshold).
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum

from easel.samplers import CAPABILITY_PREFIX


@dataclass(frozen=True)
class BackendView:
    """One backend as the router sees it at one moment."""

    name: str
    capabilities: frozenset[str] = frozenset()
    models: frozenset[str] = frozenset()
    """Models it serves; empty: it serves whatever it is asked (no model filter)."""
    loaded: frozenset[str] = frozenset()
    """Models loaded now, or that the work it already holds will leave loaded."""
    tags: frozenset[str] = frozenset()
    slots: int = 1
    outstanding: float = 0.0
    """Work units (``GenerationRequest.cost``) queued on it and running on it."""
    speed: float = 1.0
    """Work units per second of one slot (measured; 1.0 until then)."""
    load_seconds: float = 10.0
    """What loading a model costs it (measured; the configured default until then)."""
    up: bool = True
    """Its breaker lets work through (closed, or half-open for a probe)."""

    def wait(self) -> float:
        """Seconds until a new job would start, if it needs no model load."""
        return self.outstanding / (self.speed * max(self.slots, 1))

    def serves(self, model: str | None) -> bool:
        return model is None or not self.models or model in self.models

    def has(self, model: str | None) -> bool:
        return model is None or model in self.loaded


@dataclass(frozen=True)
class Want:
    """What one job needs from a backend."""

    capabilities: frozenset[str] = frozenset()
    model: str | None = None
    tags: frozenset[str] = frozenset()
    backends: frozenset[str] | None = None
    """Only these backends (the one a request names, or its fallback list); None: any."""
    cost: float = 1.0


@dataclass(frozen=True)
class Policy:
    slack_seconds: float = 10.0
    """How much longer than the least-loaded backend's a loaded model's wait may be,
    besides the model's load time..."""
    ratio: float = 16.0
    """...and, as well, how many times longer (both must be exceeded to move a model)."""
    steal_ratio: float = 4.0
    """``ratio`` for an idle backend taking queued jobs (:func:`take`). Lower than
    ``ratio``: a job moved on arrival lands amid another model's queue (a switch there and
    one back), while an idle backend switches once for a whole run of jobs."""


def capable(want: Want, backend: BackendView) -> bool:
    """Whether the backend could ever run the job (health aside): admission asks this."""
    return (
        (want.backends is None or backend.name in want.backends)
        and _can(want.capabilities, backend.capabilities)
        and backend.serves(want.model)
        and want.tags <= backend.tags
    )


def _can(needed: frozenset[str], offered: frozenset[str]) -> bool:
    missing = needed - offered
    if not missing:
        return True
    if any(not c.startswith(CAPABILITY_PREFIX) for c in missing):
        return False
    lists = any(c.startswith(CAPABILITY_PREFIX) for c in offered)
    return CAPABILITY_PREFIX + "*" in offered or not lists


def eligible(want: Want, backends: Iterable[BackendView]) -> list[BackendView]:
    """The backends that may take the job now: capable and up."""
    return [backend for backend in backends if backend.up and capable(want, backend)]


def finish_estimate(want: Want, backend: BackendView) -> float:
    """Seconds until the job would be done there: wait, a load if needed, its own run."""
    load = 0.0 if backend.has(want.model) else backend.load_seconds
    return backend.wait() + load + want.cost / backend.speed


def _least_loaded_key(want: Want, backend: BackendView) -> tuple[float, float, str]:
    load = 0.0 if backend.has(want.model) else backend.load_seconds
    return (backend.wait() + load, -backend.speed, backend.name)


def choose(
    want: Want, backends: Iterable[BackendView], policy: Policy | None = None
) -> BackendView | None:
    """The backend to run the job on; None when no eligible backend is up."""
    policy = policy or Policy()
    candidates = eligible(want, backends)
    if not candidates:
        return None
    least = min(candidates, key=lambda b: _least_loaded_key(want, b))
    if want.model is not None:
        warm = [b for b in candidates if b.has(want.model)]
        if warm:
            best = min(warm, key=lambda b: (b.wait(), -b.speed, b.name))
            cold_wait = least.wait() + (0.0 if least.has(want.model) else least.load_seconds)
            if (
                best.wait() <= cold_wait + policy.slack_seconds
                or best.wait() <= cold_wait * policy.ratio
            ):
                return best
    return least


def take(
    idle: str,
    queued: Sequence[tuple[Want, str]],
    backends: Collection[BackendView],
    policy: Policy | None = None,
) -> list[int]:
    """Work stealing: which of the jobs queued on other backends (``(want, owner)``, oldest
    first) the backend ``idle``, out of work, should take now. Jobs of a model it has
    loaded come first; once it takes one model it takes only more of the same, while the
    router would still send each there (so it moves a run of jobs, not a switch per job).
    """
    policy = replace(policy or Policy(), ratio=(policy or Policy()).steal_ratio)
    views = {backend.name: backend for backend in backends}
    if idle not in views or not views[idle].up:
        return []
    order = sorted(
        range(len(queued)),
        key=lambda i: (not views[idle].has(queued[i][0].model), i),
    )
    taken: list[int] = []
    model: str | None = None
    for index in order:
        want, owner = queued[index]
        if owner == idle or owner not in views or (taken and want.model != model):
            continue
        source = views[owner]
        without = replace(source, outstanding=max(source.outstanding - want.cost, 0.0))
        trial = {**views, owner: without}
        chosen = choose(want, trial.values(), policy)
        if chosen is None or chosen.name != idle:
            continue
        taken.append(index)
        model = want.model
        here = views[idle]
        views = {
            **trial,
            idle: replace(
                here,
                outstanding=here.outstanding + want.cost,
                loaded=frozenset({model}) if model is not None else here.loaded,
            ),
        }
    return taken


def pressure(waiting: Sequence[Want], backends: Collection[BackendView]) -> dict[str, str]:
    """Models that waiting jobs want and no up backend has loaded -> the backend that
    should load each now: the least busy capable one, at most one model per backend,
    the most wanted model first (by work waiting for it)."""
    loaded = {model for backend in backends if backend.up for model in backend.loaded}
    demand: dict[str, float] = {}
    for want in waiting:
        if want.model is not None and want.model not in loaded:
            demand[want.model] = demand.get(want.model, 0.0) + want.cost
    decisions: dict[str, str] = {}
    for model in sorted(demand, key=lambda m: (-demand[m], m)):
        wants = [w for w in waiting if w.model == model]
        free = [
            b
            for b in backends
            if b.up
            and b.name not in decisions
            and any(capable(replace(w, model=None), b) and b.serves(model) for w in wants)
        ]
        if free:
            chosen = min(free, key=lambda b: (b.wait(), -b.speed, b.name))
            decisions[chosen.name] = model
    return decisions


def claim(
    idle: str,
    queued: Sequence[tuple[Want, str]],
    backends: Collection[BackendView],
    policy: Policy | None = None,
) -> tuple[str | None, list[int]]:
    """What a backend out of work does, given the jobs queued elsewhere (``(want,
    owner)``, oldest first): the model it should load now, if waiting jobs want one that
    no up backend has loaded and it is the least busy capable backend for it
    (:func:`pressure`), and the jobs it takes (:func:`take`, that model counted loaded)."""
    views = {backend.name: backend for backend in backends}
    if idle not in views or not views[idle].up:
        return None, []
    model = pressure([want for want, _ in queued], list(views.values())).get(idle)
    if model is not None:
        views[idle] = replace(views[idle], loaded=views[idle].loaded | {model})
    return model, take(idle, queued, list(views.values()), policy)


# -- the circuit breaker --------------------------------------------------------------------


class BreakerState(StrEnum):
    closed = "up"
    """Work goes through; consecutive transient failures are counted."""
    open = "down"
    """Nothing goes through until the probe time."""
    half_open = "probing"
    """One probe (a health check or one job) decides: back up, or down again."""


@dataclass(frozen=True)
class Breaker:
    """One backend's breaker; every transition returns a new value (no clock inside)."""

    threshold: int = 3
    probe_seconds: float = 30.0
    state: BreakerState = BreakerState.closed
    failures: int = 0
    opened_at: float | None = None
    last_error: str | None = field(default=None, compare=False)

    @property
    def up(self) -> bool:
        """Whether the router may send it work (a half-open breaker takes the probe)."""
        return self.state is not BreakerState.open

    def succeeded(self) -> Breaker:
        """A run or health check worked: closed, count reset."""
        return replace(self, state=BreakerState.closed, failures=0, opened_at=None)

    def failed(self, now: float, error: str | None = None) -> Breaker:
        """A transient failure (unavailable, timeout). Permanent errors (bad input) are
        the job's fault, not the backend's: callers do not report them."""
        failures = self.failures + 1
        if self.state is BreakerState.half_open or failures >= self.threshold:
            return replace(
                self, state=BreakerState.open, failures=failures, opened_at=now, last_error=error
            )
        return replace(self, failures=failures, last_error=error)

    def tick(self, now: float) -> Breaker:
        """Open for ``probe_seconds``: half-open, so the next check or job probes it."""
        if (
            self.state is BreakerState.open
            and self.opened_at is not None
            and now - self.opened_at >= self.probe_seconds
        ):
            return replace(self, state=BreakerState.half_open)
        return self
