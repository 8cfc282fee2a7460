"""The routing policy (easel.queue.routing): properties over random fleets, with hypothesis."""

from __future__ import annotations

from dataclasses import replace

from hypothesis import given, settings
from hypothesis import strategies as st

from easel.queue.routing import (
    BackendView,
    Breaker,
    BreakerState,
    Policy,
    Want,
    capable,
    choose,
    claim,
    eligible,
    pressure,
    take,
)

MODELS = ["a", "b", "c"]
CAPS = ["txt2img", "img2img", "lora"]
TAGS = ["gpu", "cheap"]


@st.composite
def fleets(draw: st.DrawFn) -> list[BackendView]:
    count = draw(st.integers(1, 6))
    return [
        BackendView(
            name=f"b{i}",
            capabilities=frozenset(draw(st.sets(st.sampled_from(CAPS)))),
            models=frozenset(draw(st.sets(st.sampled_from(MODELS)))),
            loaded=frozenset(draw(st.sets(st.sampled_from(MODELS), max_size=1))),
            tags=frozenset(draw(st.sets(st.sampled_from(TAGS)))),
            slots=draw(st.integers(1, 3)),
            outstanding=draw(st.floats(0, 500)),
            speed=draw(st.floats(0.1, 4)),
            load_seconds=draw(st.floats(0, 30)),
            up=draw(st.booleans()),
        )
        for i in range(count)
    ]


wants = st.builds(
    Want,
    capabilities=st.frozensets(st.sampled_from(CAPS), max_size=2),
    model=st.none() | st.sampled_from(MODELS),
    tags=st.frozensets(st.sampled_from(TAGS), max_size=1),
    backends=st.none() | st.frozensets(st.sampled_from([f"b{i}" for i in range(6)]), min_size=1),
    cost=st.floats(0.1, 50),
)


def _cold_wait(want: Want, backend: BackendView) -> float:
    return backend.wait() + (0.0 if backend.has(want.model) else backend.load_seconds)


@settings(max_examples=60, deadline=None)
@given(fleets(), wants, st.randoms(use_true_random=False))
def test_the_choice_is_eligible_deterministic_and_balanced(
    fleet: list[BackendView], want: Want, rng: object
) -> None:
    policy = Policy(slack_seconds=10, ratio=4)
    chosen = choose(want, fleet, policy)
    candidates = eligible(want, fleet)
    if not candidates:
        assert chosen is None
        return
    assert chosen is not None and chosen in candidates
    assert chosen.up and capable(want, chosen)  # never a down or incapable backend
    shuffled = list(fleet)
    rng.shuffle(shuffled)  # type: ignore[attr-defined]
    assert choose(want, shuffled, policy) == chosen  # order of the fleet does not matter
    least = min(_cold_wait(want, b) for b in candidates)
    if chosen.has(want.model) and want.model is not None:
        # affinity holds only while the imbalance stays within the threshold
        assert chosen.wait() <= least + policy.slack_seconds or chosen.wait() <= least * 4
    else:
        # no loaded backend worth waiting for: the least loaded, load time counted
        assert _cold_wait(want, chosen) == least


@settings(max_examples=40, deadline=None)
@given(fleets(), wants)
def test_a_loaded_model_is_kept_when_the_fleet_is_balanced(
    fleet: list[BackendView], want: Want
) -> None:
    even = [replace(b, outstanding=0.0, speed=1.0, slots=1, up=True) for b in fleet]
    want = replace(want, model="a")
    warm = [b for b in eligible(want, even) if "a" in b.loaded]
    chosen = choose(want, even)
    if warm:
        assert chosen is not None and "a" in chosen.loaded  # no reload for nothing


def test_affinity_gives_way_past_the_threshold() -> None:
    warm = BackendView("warm", models=frozenset("a"), loaded=frozenset("a"), load_seconds=10)
    cold = BackendView("cold", models=frozenset("a"), loaded=frozenset("b"), load_seconds=10)
    want = Want(model="a")
    policy = Policy(slack_seconds=5, ratio=2)
    held = replace(warm, outstanding=18)  # 18 s > 10 + 5, but within 2 x 10
    assert choose(want, [held, cold], policy) == held
    busy = replace(warm, outstanding=30)  # 30 > 10 + 5 and 30 > 2 x 10
    assert choose(want, [busy, cold], policy) == cold
    assert choose(want, [busy, replace(cold, up=False)], policy) == busy


def test_named_backends_tags_and_capabilities_filter() -> None:
    fleet = [
        BackendView("gpu", capabilities=frozenset(CAPS), tags=frozenset({"gpu"}), outstanding=9),
        BackendView("cpu", capabilities=frozenset({"txt2img"}), tags=frozenset({"cheap"})),
    ]
    assert choose(Want(capabilities=frozenset({"txt2img"})), fleet).name == "cpu"  # type: ignore[union-attr]
    assert choose(Want(capabilities=frozenset({"lora"})), fleet).name == "gpu"  # type: ignore[union-attr]
    assert choose(Want(tags=frozenset({"gpu"})), fleet).name == "gpu"  # type: ignore[union-attr]
    assert choose(Want(backends=frozenset({"gpu"})), fleet).name == "gpu"  # type: ignore[union-attr]
    assert choose(Want(tags=frozenset({"tpu"})), fleet) is None


@settings(max_examples=40, deadline=None)
@given(st.lists(st.booleans(), max_size=30), st.integers(1, 5))
def test_the_breaker_opens_after_consecutive_failures_only(
    outcomes: list[bool], threshold: int
) -> None:
    breaker = Breaker(threshold=threshold, probe_seconds=30)
    run = 0
    for now, ok in enumerate(outcomes):
        if breaker.state is BreakerState.open:
            break
        breaker = breaker.succeeded() if ok else breaker.failed(float(now), "boom")
        run = 0 if ok else run + 1
        assert (breaker.state is BreakerState.open) == (run >= threshold)
        assert breaker.up == (run < threshold)


def test_the_breaker_probes_and_recovers() -> None:
    breaker = Breaker(threshold=2, probe_seconds=30).failed(0, "x").failed(1, "timeout")
    assert breaker.state is BreakerState.open and not breaker.up
    assert breaker.last_error == "timeout"
    assert breaker.tick(30).state is BreakerState.open  # not yet
    probing = breaker.tick(31)
    assert probing.state is BreakerState.half_open and probing.up  # one probe goes through
    assert probing.failed(32).state is BreakerState.open  # one failure while probing: down
    assert probing.failed(32).opened_at == 32
    assert probing.succeeded() == Breaker(threshold=2, probe_seconds=30)  # back up, reset


@settings(max_examples=40, deadline=None)
@given(fleets(), st.lists(wants, max_size=8))
def test_model_pressure_loads_each_missing_model_once(
    fleet: list[BackendView], waiting: list[Want]
) -> None:
    decisions = pressure(waiting, fleet)
    loaded = {m for b in fleet if b.up for m in b.loaded}
    views = {b.name: b for b in fleet}
    assert len(set(decisions.values())) == len(decisions)  # one backend per model
    for name, model in decisions.items():
        assert model not in loaded and any(w.model == model for w in waiting)
        assert views[name].up and views[name].serves(model)


def test_pressure_picks_the_least_busy_capable_backend() -> None:
    fleet = [
        BackendView("busy", models=frozenset("ab"), loaded=frozenset("a"), outstanding=50),
        BackendView("idle", models=frozenset("ab"), loaded=frozenset("a")),
        BackendView("other", models=frozenset("a")),
    ]
    assert pressure([Want(model="b"), Want(model="a")], fleet) == {"idle": "b"}


@settings(max_examples=40, deadline=None)
@given(fleets(), st.lists(st.tuples(wants, st.sampled_from([f"b{i}" for i in range(6)]))))
def test_stealing_moves_one_model_to_a_capable_backend(
    fleet: list[BackendView], queued: list[tuple[Want, str]]
) -> None:
    idle = fleet[0]
    taken = take(idle.name, queued, fleet)
    assert len(set(taken)) == len(taken)
    assert len({queued[i][0].model for i in taken}) <= 1
    for index in taken:
        want, owner = queued[index]
        assert owner != idle.name and idle.up and capable(want, idle)


def test_stealing_takes_a_run_of_the_loaded_model_first() -> None:
    busy = BackendView("busy", loaded=frozenset("a"), outstanding=200)
    idle = BackendView("idle", loaded=frozenset("b"))
    queued = [(Want(model="a", cost=10), "busy")] + [(Want(model="b", cost=10), "busy")] * 3
    assert take("idle", queued, [busy, idle]) == [1, 2, 3]


def test_an_idle_backend_loads_a_model_nobody_has_and_takes_its_jobs() -> None:
    busy = BackendView("busy", models=frozenset("ab"), loaded=frozenset("a"), outstanding=60)
    idle = BackendView("idle", models=frozenset("ab"), loaded=frozenset("a"))
    queued = [(Want(model="b", cost=5), "busy"), (Want(model="a", cost=5), "busy")] * 2
    model, taken = claim("idle", queued, [busy, idle])
    assert model == "b" and [queued[i][0].model for i in taken] == ["b", "b"]
    # once "b" is loaded somewhere, nobody else loads it for these jobs
    warm = replace(busy, loaded=frozenset("ab"))
    assert claim("idle", queued, [warm, idle])[0] is None
    assert claim("idle", queued, [busy, replace(idle, up=False)]) == (None, [])


def test_an_idle_backend_steals_sooner_than_arrivals_move() -> None:
    warm = BackendView("warm", loaded=frozenset("a"), outstanding=100)
    cold = BackendView("cold", loaded=frozenset("b"), outstanding=10)
    want = Want(model="a", cost=5)
    policy = Policy(slack_seconds=0, ratio=16, steal_ratio=4)
    assert choose(want, [warm, cold], policy) == warm  # 100 s < 16 x 20 s: stays warm
    idle = replace(cold, outstanding=0)  # out of work: 100 s > 4 x 10 s, it takes them
    assert take("cold", [(want, "warm")] * 3, [warm, idle], policy)


@settings(max_examples=40, deadline=None)
@given(fleets(), st.lists(st.tuples(wants, st.sampled_from([f"b{i}" for i in range(6)]))))
def test_a_claim_loads_only_a_missing_wanted_model_and_takes_what_it_can_run(
    fleet: list[BackendView], queued: list[tuple[Want, str]]
) -> None:
    idle = fleet[0]
    model, taken = claim(idle.name, queued, fleet)
    if model is not None:
        assert idle.up and idle.serves(model)
        assert model not in {m for b in fleet if b.up for m in b.loaded}
        assert any(want.model == model for want, _ in queued)
    assert len({queued[i][0].model for i in taken}) <= 1
    for index in taken:
        want, owner = queued[index]
        assert owner != idle.name and capable(want, idle)
