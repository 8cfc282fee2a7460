"""ETA policy (queue/estimates.py): pricing from samples and curves, and the projection.

Property tests drive the pure policy; the last tests check it against a real runtime: the
projection agrees with the real order of completion of a burst-mode worker, waiting jobs
get updated ETAs in ``queued`` events, and a premium arrival pushes standard ETAs out.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from easel.backends.mock import MockBackend
from easel.config import Settings
from easel.jobs import EventType, GenerationRequest, JobState
from easel.queue.estimates import (
    Announced,
    CostBook,
    Estimate,
    Lane,
    Shape,
    Waiting,
    material,
    project,
    spread,
)
from easel.runtime.facade import Runtime


def _shape(steps: int = 20, side: int = 512, model: str | None = "m", batch: int = 1) -> Shape:
    request = GenerationRequest(
        prompt="x", steps=steps, width=side, height=side, model=model, batch_size=batch
    )
    return Shape.of("gpu", request)


def _true_cost(shape: Shape) -> float:
    """A pipeline-like truth: overhead, per step, per step-megapixel."""
    return 0.4 + 0.01 * shape.steps * shape.batch + 0.05 * shape.cost


@given(st.lists(st.floats(0.01, 100), min_size=1, max_size=40))
def test_spread_is_ordered_and_within_the_samples(samples: list[float]) -> None:
    est = spread(samples)
    assert min(samples) <= est.low <= est.mid <= est.high <= max(samples)


@given(
    st.lists(
        st.tuples(st.sampled_from([5, 10, 20, 40]), st.sampled_from([64, 256, 512, 1024])),
        min_size=3,
        max_size=12,
        unique=True,
    ),
    st.sampled_from([8, 30, 50]),
    st.sampled_from([128, 768]),
)
@settings(max_examples=60, deadline=None)
def test_the_fitted_curve_prices_unseen_shapes_like_the_truth(
    seen: list[tuple[int, int]], steps: int, side: int
) -> None:
    book = CostBook()
    for s, w in seen:
        shape = _shape(s, w)
        book.observe(shape, _true_cost(shape))
    shapes = {(s.steps, s.width) for s in (_shape(s, w) for s, w in seen)}
    if len({s for s, _ in shapes}) < 2 or len({w for _, w in shapes}) < 2:
        return  # a curve needs the shapes to differ in steps and in size
    unseen = _shape(steps, side)
    priced = book.price(unseen)
    assert priced is not None
    assert abs(priced.mid - _true_cost(unseen)) <= 0.05 * _true_cost(unseen)


def test_a_measured_shape_is_priced_by_its_own_samples_with_their_spread() -> None:
    book = CostBook()
    shape = _shape()
    for seconds in (1.0, 1.1, 0.9, 1.0, 1.2, 0.8, 1.0):
        book.observe(shape, seconds)
    priced = book.price(shape)
    assert priced is not None and priced.mid == 1.0
    assert priced.low < 1.0 < priced.high
    assert book.price(_shape(steps=40)) is None  # one shape: no curve yet


def test_model_loads_are_measured_apart_and_charged_on_a_switch() -> None:
    book = CostBook()
    warm = _shape(model="a")
    for _ in range(3):
        book.observe(warm, 1.0)
    book.observe_cold(warm, 6.0)
    assert book.load("gpu", "a") == 5.0
    assert book.price(warm) == Estimate(1.0, 1.0, 1.0)  # the cold run is not a sample
    one = Estimate(1.0, 1.0, 1.0)
    lanes = [Lane("gpu", model="a")]
    jobs = [Waiting("1", "gpu", "a", one), Waiting("2", "gpu", "b", one)]
    second = project(jobs, lanes, lambda route, model: 5.0)[1]
    assert second.wait.mid == 1.0 and second.run.mid == 6.0


@given(
    st.lists(st.floats(0.1, 10), min_size=1, max_size=30),
    st.integers(1, 4),
    st.lists(st.floats(0, 5), min_size=4, max_size=4),
)
def test_projection_serves_in_order_and_never_idles_a_lane(
    runs: list[float], lanes_count: int, busy: list[float]
) -> None:
    lanes = [Lane("gpu", free_in=Estimate(b, b, b)) for b in busy[:lanes_count]]
    jobs = [Waiting(str(i), "gpu", None, Estimate(r, r, r)) for i, r in enumerate(runs)]
    projected = project(jobs, lanes, lambda route, model: 0.0)
    assert [p.job_id for p in projected] == [j.job_id for j in jobs]
    starts = [p.wait.mid for p in projected]
    assert starts == sorted(starts)  # list scheduling in serving order
    total_work = sum(runs) + sum(b for b in busy[:lanes_count])
    # the last start is no later than the work before it spread over the lanes, plus one job
    assert starts[-1] <= total_work / lanes_count + max(runs) + max(busy[:lanes_count]) + 1e-6
    assert all(p.wait.low <= p.wait.mid <= p.wait.high for p in projected)


def test_a_job_no_lane_serves_waits_behind_everything() -> None:
    one = Estimate(1.0, 1.0, 1.0)
    projected = project(
        [Waiting("a", "gpu", None, one), Waiting("b", "elsewhere", None, one)],
        [Lane("gpu")],
        lambda route, model: 0.0,
    )
    assert projected[1].wait.mid == 1.0


@given(
    st.lists(
        st.tuples(st.floats(0.1, 10), st.one_of(st.none(), st.floats(0.25, 4))),
        min_size=1,
        max_size=25,
    ),
    st.integers(1, 3),
    st.integers(1, 3),
)
def test_another_backend_takes_a_job_only_where_it_would_finish_it_sooner(
    jobs: list[tuple[float, float | None]], own_lanes: int, other_lanes: int
) -> None:
    """Jobs of route ``a``; some may also run on ``b`` at another speed. Each job ends no
    later than it would if it were bound to its own route, and one bound to its route
    (no ``elsewhere``) runs there at its own price."""
    lanes = [Lane("a")] * own_lanes + [Lane("b")] * other_lanes
    waiting = []
    for i, (r, factor) in enumerate(jobs):
        elsewhere = {} if factor is None else {"b": Estimate(r, r, r).scaled(factor)}
        waiting.append(Waiting(str(i), "a", None, Estimate(r, r, r), elsewhere))
    projected = project(waiting, lanes, lambda route, model: 0.0)
    for k, job in enumerate(waiting):
        bound = replace(job, elsewhere={})
        alone = project([*waiting[:k], bound], lanes, lambda route, model: 0.0)[-1]
        assert projected[k].total.mid <= alone.total.mid + 1e-9
        assert projected[k].run.mid in (job.run.mid, *(e.mid for e in job.elsewhere.values()))
        if not job.elsewhere:
            assert projected[k].run == job.run
    if own_lanes == 1 and other_lanes and all(f is not None and f < 1 for _, f in jobs):
        assert projected[0].run.mid < waiting[0].run.mid  # a free faster backend takes it


def test_prices_on_other_backends_scale_by_measured_speed() -> None:
    book = CostBook()
    fast = _shape()
    for _ in range(3):
        book.observe(fast, 2.0)
    slow = replace(fast, backend="slow")
    speeds = {"gpu": 4.0, "slow": 1.0}
    assert book.prices(fast, ["slow"], speeds) == {"slow": Estimate(8.0, 8.0, 8.0)}
    assert book.prices(slow, ["gpu"], speeds) == {"gpu": Estimate(2.0, 2.0, 2.0)}
    book.observe(slow, 5.0)  # its own measurement wins over the speed ratio
    assert book.prices(fast, ["slow"], speeds) == {"slow": Estimate(5.0, 5.0, 5.0)}
    assert book.prices(fast, ["unknown"], {}) == {"unknown": Estimate(2.0, 2.0, 2.0)}


@given(st.lists(st.floats(0.1, 10), min_size=2, max_size=30))
def test_the_range_of_a_wait_sums_the_spreads_of_the_runs_ahead(runs: list[float]) -> None:
    """Each run spread +-20%: the wait's p10-p90 widens like the square root of the runs
    ahead (independent times), not like their sum, and always holds the mid."""
    jobs = [Waiting(str(i), "gpu", None, Estimate(0.8 * r, r, 1.2 * r)) for i, r in enumerate(runs)]
    projected = project(jobs, [Lane("gpu")], lambda route, model: 0.0)
    last = projected[-1]
    ahead = runs[:-1]
    assert last.wait.mid == pytest.approx(sum(ahead))
    width = last.wait.high - last.wait.low
    assert width == pytest.approx(0.4 * sum(r * r for r in ahead) ** 0.5, rel=1e-6)
    assert width <= 0.4 * sum(ahead) + 1e-9
    total = last.total
    assert total.low <= total.mid <= total.high and total.mid == pytest.approx(sum(runs))


def test_cold_runs_price_a_shape_less_the_load_its_model_takes() -> None:
    """A deployment's first runs of a model load it: kept apart, the load is what cold
    runs take over warm ones (or over the warm curve's price), and cold-only shapes are
    priced without it."""
    book = CostBook()
    for steps, side in ((5, 64), (10, 64), (5, 256), (10, 256)):
        warm = _shape(steps, side, model="a")
        for _ in range(3):
            book.observe(warm, _true_cost(warm))
    cold_only = _shape(20, 512, model="b")
    for _ in range(3):
        book.observe_cold(cold_only, _true_cost(cold_only) + 3.0)
    assert book.load("gpu", "b") == pytest.approx(3.0, rel=0.05)
    priced = book.price(cold_only)
    assert priced is not None and priced.mid == pytest.approx(_true_cost(cold_only), rel=0.1)
    assert book.samples(cold_only) == 0


def test_material_changes_are_position_or_a_moved_end() -> None:
    said = Announced(position=2, at=100.0, end=120.0)
    assert material(None, said) and not material(said, said)
    assert material(said, Announced(1, 101.0, 120.0))  # another position
    # counting down as said is no news, however much time passed
    assert not material(said, Announced(2, 115.0, 120.0))
    # an end moved by more than 10% of what is left and more than 1 s is
    assert material(said, Announced(2, 110.0, 121.5))
    assert not material(said, Announced(2, 110.0, 120.9))  # under 1 s
    assert not material(said, Announced(2, 80.0, 123.0))  # under 10% of 43 s


# -- against a real runtime ----------------------------------------------------------------


def _runtime(tmp_path: Path, **options: float) -> Runtime:
    settings = Settings(
        data_dir=tmp_path / "data", backend="mock", max_user_queue_size=100,
        eta_update_seconds=0.05,
    )  # fmt: skip
    backend = MockBackend(**options)  # type: ignore[arg-type]
    return Runtime(settings, backends={"mock": backend})


async def test_the_projection_agrees_with_the_real_order_of_completion(tmp_path: Path) -> None:
    runtime = _runtime(tmp_path)
    await runtime.start(workers=False)
    try:
        measured = GenerationRequest(prompt="x", steps=1, width=64, height=64)
        runtime.run_times.observe("mock", measured, 0.01)
        users = ["ann", "ann", "ann", "bob", "cat", "bob", "ann"]
        ids = []
        for i, user in enumerate(users):
            request = GenerationRequest(
                prompt=f"p{i}", user_id=user, steps=1, width=64, height=64,
                premium=(i == 4),
            )  # fmt: skip
            ids.append((await runtime.submit(request)).id)
        projected = await runtime.etas.projections()
        assert projected is not None and not projected.unknown
        by_eta = sorted(ids, key=lambda job_id: projected.by_id[job_id].wait.mid)
        worker = runtime.worker_for(runtime.backends["mock"])
        async with runtime.bus.subscribe(types={EventType.started}) as started:
            await worker.run(burst=True)
            order = [started.queue.get_nowait() for _ in range(len(ids))]
        assert [event.job_id for event in order if event is not None] == by_eta
        assert by_eta[0] == ids[4]  # the premium job, then fair share between users
    finally:
        await runtime.stop()


async def test_a_premium_arrival_pushes_standard_etas_out_and_says_so(tmp_path: Path) -> None:
    runtime = _runtime(tmp_path, step_delay=0.02)
    await runtime.start(workers=False)
    try:
        small: dict[str, Any] = {"steps": 2, "width": 64, "height": 64}
        for _ in range(3):  # measured: 2 steps of 20 ms
            runtime.run_times.observe("mock", GenerationRequest(prompt="m", **small), 2.0)
        standard = [
            await runtime.submit(GenerationRequest(prompt=f"s{i}", user_id="ann", **small))
            for i in range(3)
        ]
        last = standard[-1]
        assert last.wait_eta_seconds == 4.0 and last.run_eta_seconds == 2.0
        assert last.eta_seconds == 6.0 and last.position == 2
        async with runtime.bus.subscribe(job_id=last.id, types={EventType.queued}) as updates:
            for _ in range(2):
                premium = GenerationRequest(prompt="vip", user_id="vip", premium=True, **small)
                await runtime.submit(premium)
            async for event in updates:
                if event.position == 4:
                    break
        assert event.eta_seconds == 10.0 and event.wait_eta_seconds == 8.0
        assert event.run_eta_seconds == 2.0
        view = await runtime.get(last.id)
        assert view.position == 4 and view.eta_seconds == 10.0
        assert view.state is JobState.queued
    finally:
        await runtime.stop()


async def test_a_steady_clients_next_jobs_are_counted_at_submit_where_they_will_run(
    tmp_path: Path,
) -> None:
    """A bot submits every 0.35 s (its jobs gone already: cancelled here); ann queues
    three. Fair share will let the bot's next jobs in ahead of ann's third, as many as ann
    has ahead of it (two): her ETA at submit counts them. When the bot really submits
    them, they are queued ahead of hers and her ETA stays what it said."""
    runtime = _runtime(tmp_path)
    await runtime.start(workers=False)
    try:
        small: dict[str, Any] = {"steps": 2, "width": 64, "height": 64}
        for _ in range(3):  # measured: 2 s a run
            runtime.run_times.observe("mock", GenerationRequest(prompt="m", **small), 2.0)
        for i in range(10):  # for 3.5 s: MIN_SEEN
            bot = await runtime.submit(GenerationRequest(prompt=f"b{i}", user_id="bot", **small))
            await runtime.cancel(bot.id)
            await asyncio.sleep(0.35)
        ann = [await runtime.submit(GenerationRequest(prompt=f"a{i}", user_id="ann", **small))
               for i in range(3)]  # fmt: skip
        first, third = ann[0], ann[-1]
        assert (first.position, first.eta_seconds) == (0, 2.0)  # nothing can go before it
        assert third.position == 2 and third.run_eta_seconds == 2.0
        assert third.wait_eta_seconds == 8.0  # her two, and the bot's two to come
        assert third.eta_low_seconds is not None and third.eta_high_seconds is not None
        assert third.eta_low_seconds < 10.0 < third.eta_high_seconds
        for i in range(2):
            await runtime.submit(GenerationRequest(prompt=f"n{i}", user_id="bot", **small))
        later = await runtime.get(third.id)
        assert later.position == 4 and later.wait_eta_seconds == 8.0
        assert later.eta_seconds == third.eta_seconds == 10.0
    finally:
        await runtime.stop()


async def test_etas_count_every_backend_that_may_run_a_job_at_its_measured_speed(
    tmp_path: Path,
) -> None:
    """Two mock backends, ``fast`` measured 2.5x as fast as ``slow``: a job that either may
    run is projected on the one that ends it first; a job pinned to ``slow`` waits for it."""
    settings = Settings(
        data_dir=tmp_path / "data", backend="mock", max_user_queue_size=100,
        eta_update_seconds=60,
    )  # fmt: skip
    backends = {"fast": MockBackend(name="fast"), "slow": MockBackend(name="slow")}
    runtime = Runtime(settings, backends=backends)
    await runtime.start(workers=False)
    try:
        small: dict[str, Any] = {"steps": 2, "width": 64, "height": 64}
        request = GenerationRequest(prompt="m", **small)
        for _ in range(3):
            runtime.run_times.observe("fast", request, 1.0)  # only fast ran this shape
        runtime.fleet.observe_speed("fast", request.cost, 1.0)
        runtime.fleet.observe_speed("slow", request.cost, 2.5)
        views = [
            await runtime.submit(GenerationRequest(prompt=f"p{i}", user_id="ann", **small))
            for i in range(4)
        ]
        etas = [(await runtime.get(view.id)).eta_seconds for view in views]
        # fast runs 0-1 and 1-2; slow ends the third at 2.5; fast the fourth at 3
        assert etas == [1.0, 2.0, 2.5, 3.0]
        pinned = await runtime.submit(
            GenerationRequest(prompt="s", user_id="ann", backend="slow", **small)
        )
        assert pinned.backend == "slow"
        seen = await runtime.get(pinned.id)
        assert seen.run_eta_seconds == 2.5  # slow's speed, never fast's
        assert seen.wait_eta_seconds == 2.5  # behind the third job on slow, not after fast's
    finally:
        await runtime.stop()


async def test_an_api_only_replica_gives_the_etas_the_worker_measured(
    tmp_path: Path, redis_url: str
) -> None:
    """Scaled out on a real Redis: an API-only replica (no backend, no worker) and a worker
    replica. The run times the worker measured are kept in the store, so the API replica
    gives a queued job an ETA, the same one the worker replica gives."""
    prefix = f"etas:{tmp_path.name}:"

    def settings(name: str, concurrency: int) -> Settings:
        return Settings(
            data_dir=tmp_path / name, concurrency=concurrency, redis_url=redis_url,
            redis_prefix=prefix, output_dir=tmp_path / "out", max_user_queue_size=100,
        )  # fmt: skip

    api = Runtime(settings("api", 0))
    worker = Runtime(settings("worker", 1), backends={"mock": MockBackend(step_delay=0.02)})
    small: dict[str, Any] = {"steps": 2, "width": 64, "height": 64}
    async with api, worker:
        assert not api.backends and not api.workers
        for i in range(3):  # each its own user: nobody submits steadily (no arrivals)
            view = await api.submit(GenerationRequest(prompt=f"m{i}", user_id=f"m{i}", **small))
            assert (await api.wait(view.id, 30)).state is JobState.succeeded
        await worker.timings.flushed()
        blocker = await api.submit(GenerationRequest(prompt="b", steps=150, width=64, height=64))
        async with api.bus.subscribe(job_id=blocker.id, types={EventType.started}) as started:
            if (await api.get(blocker.id)).state is JobState.queued:
                await anext(aiter(started))
        queued = [
            await api.submit(GenerationRequest(prompt=f"q{i}", user_id="ann", **small))
            for i in range(2)
        ]
        on_api = [await api.get(view.id) for view in queued]
        on_worker = [await worker.get(view.id) for view in queued]
        assert [view.position for view in on_api] == [0, 1]
        measured = worker.run_times.price("mock", queued[0].request)
        assert measured is not None and on_api[0].run_eta_seconds is not None
        assert on_api[0].run_eta_seconds >= measured.mid - 1e-3  # shown to the ms
        # the serving order from the Redis store: the second waits for the first's run
        assert on_api[1].wait_eta_seconds is not None
        assert on_api[1].wait_eta_seconds >= measured.mid - 1e-3
        # the same projection on both replicas (the blocker's time left shrinks between
        # the reads: compare what does not depend on when each was read)
        for seen, there in zip(on_api, on_worker, strict=True):
            assert (seen.position, seen.run_eta_seconds) == (there.position, there.run_eta_seconds)
        assert on_worker[0].wait_eta_seconds and on_api[0].wait_eta_seconds  # blocker counted
        apart = []
        for replica in (api, worker):
            waiting = (await replica.queue())["waiting"]  # one projection, one instant
            assert isinstance(waiting, list)
            wait = {row["job_id"]: row["wait_eta_seconds"] for row in waiting}
            apart.append(wait[queued[1].id] - wait[queued[0].id])
        assert apart[0] == pytest.approx(apart[1], abs=2e-3) and apart[0] > 0
        await api.cancel(blocker.id)
