"""The queue policy, driven directly: examples, then properties over random arrivals."""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from easel.errors import QueueFull, UserQueueFull
from easel.jobs import GenerationRequest
from easel.queue.backoff import retry_delay
from easel.queue.run_times import RunTimes
from easel.queue.scheduler import (
    Entry,
    FairQueue,
    Policy,
    check_queue_cap,
    check_user_cap,
    user_cap,
)

NO_AGING = Policy(aging_seconds=None)


def entry(
    job_id: str,
    user: str,
    priority: int = 0,
    route: str = "mock",
    cost: float = 1.0,
    at: float = 0.0,
    key: str | None = "k",
) -> Entry:
    return Entry(job_id, user, priority, route, cost, enqueued_at=at, batch_key=key)


def _id(queued: Entry | None) -> str | None:
    return None if queued is None else queued.job_id


def served(queue: FairQueue, now: float | None = None) -> list[str]:
    order = []
    while (next_entry := queue.pop(now=now)) is not None:
        order.append(next_entry.job_id)
    return order


def test_higher_tier_first_then_fifo() -> None:
    queue = FairQueue(NO_AGING)
    queue.push(entry("low", "a", priority=-1))
    queue.push(entry("std1", "a"))
    queue.push(entry("std2", "a"))
    queue.push(entry("premium", "b", priority=10))
    assert served(queue) == ["premium", "std1", "std2", "low"]


def test_equal_jobs_alternate_between_users_like_round_robin() -> None:
    queue = FairQueue(NO_AGING)
    for i in range(3):
        queue.push(entry(f"a{i}", "alice"))
    queue.push(entry("b0", "bob"))
    queue.push(entry("c0", "carol"))
    assert served(queue) == ["a0", "b0", "c0", "a1", "a2"]


def test_a_user_arriving_late_goes_before_one_just_served() -> None:
    queue = FairQueue(NO_AGING)
    for i in range(4):
        queue.push(entry(f"a{i}", "alice"))
    assert _id(queue.pop()) == "a0"
    queue.push(entry("b0", "bob"))
    assert served(queue) == ["b0", "a1", "a2", "a3"]


def test_fair_share_is_by_cost_not_by_count() -> None:
    """50 big jobs cannot starve small ones: service alternates by work done."""
    queue = FairQueue(NO_AGING)
    for i in range(50):
        queue.push(entry(f"big{i}", "heavy", cost=10.0))
    for i in range(20):
        queue.push(entry(f"small{i}", "light", cost=1.0))
    order = served(queue)
    # the light user is served first and all its 20 units of work fit in the time the
    # heavy user gets 2-3 jobs: the light user's last job runs within the first few big ones
    assert order.index("small19") < 24
    assert order[0] in {"big0", "small0"} and order.index("small0") <= 1


def test_weights_give_users_proportional_shares() -> None:
    queue = FairQueue(Policy(aging_seconds=None, weights={"gold": 3.0}))
    for i in range(40):
        queue.push(entry(f"g{i}", "gold"))
        queue.push(entry(f"s{i}", "silver"))
    first = served(queue)[:40]
    assert Counter(j[0] for j in first) == {"g": 30, "s": 10}


def test_accounts_are_per_service_and_weights_name_one_or_every_service() -> None:
    """Two services' carol are two accounts (equal jobs alternate between them, each
    counted apart); ``bot/carol`` weighs bot's carol only, a bare ``dave`` every dave."""
    policy = Policy(aging_seconds=None, weights={"bot/carol": 3.0, "dave": 2.0})
    assert policy.weight("bot", "carol") == 3.0 and policy.weight("web", "carol") == 1.0
    assert policy.weight("bot", "dave") == policy.weight(None, "dave") == 2.0
    queue = FairQueue(NO_AGING)
    for i in range(3):
        queue.push(Entry(f"b{i}", "carol", 0, "mock", service="bot"))
    queue.push(Entry("w0", "carol", 0, "mock", service="web"))
    assert queue.user_counts() == {"bot/carol": 3, "web/carol": 1}
    assert queue.queued_for("carol", "web") == 1 and queue.queued_for("carol") == 0
    assert served(queue) == ["b0", "w0", "b1", "b2"]  # not behind bot's carol's backlog


def test_aging_gives_a_starving_tier_one_decision_in_four() -> None:
    queue = FairQueue(Policy(aging_seconds=60, aged_every=4))
    for i in range(3):
        queue.push(entry(f"old{i}", f"patient{i}", priority=0, at=0.0))
    for i in range(20):
        queue.push(entry(f"p{i}", "vip", priority=10, at=1.0))
    assert [_id(queue.pop(now=30.0)) for _ in range(2)] == ["p0", "p1"]  # not yet aged
    assert queue.position("old0") == 18
    # starving from 60 s: one decision in four goes to its tier, the rest to premium work
    assert [_id(queue.pop(now=61.0)) for _ in range(9)] == [
        "p2", "old0", "p3", "p4", "p5", "old1", "p6", "p7", "p8",
    ]  # fmt: skip
    assert queue.position("old2") == 0


def test_position_matches_serving_order() -> None:
    queue = FairQueue(NO_AGING)
    for job_id, user, priority in [("a0", "a", 0), ("a1", "a", 0), ("b0", "b", 0), ("p", "c", 5)]:
        queue.push(entry(job_id, user, priority))
    assert [queue.position(j) for j in ("p", "a0", "b0", "a1")] == [0, 1, 2, 3]
    assert queue.position("missing") is None


def test_pop_skips_routes_the_worker_cannot_serve() -> None:
    queue = FairQueue(NO_AGING)
    queue.push(entry("gpu", "a", route="diffusers"))
    queue.push(entry("cpu", "a", route="mock"))
    assert _id(queue.pop(["mock"])) == "cpu"
    assert queue.pop(["mock"]) is None
    assert len(queue) == 1


def test_batches_take_compatible_jobs_next_in_line_only() -> None:
    queue = FairQueue(NO_AGING)
    queue.push(entry("a0", "a", key="512"))
    queue.push(entry("b0", "b", key="512"))
    queue.push(entry("c0", "c", key="1024"))
    queue.push(entry("d0", "d", key="512"))
    assert [e.job_id for e in queue.pop_batch(None, 4)] == ["a0", "b0"]  # c0 breaks the run
    assert [e.job_id for e in queue.pop_batch(None, 4)] == ["c0"]
    assert [e.job_id for e in queue.pop_batch(None, 4)] == ["d0"]
    queue.push(entry("x", "x", key=None))
    queue.push(entry("y", "y", key=None))
    assert [e.job_id for e in queue.pop_batch(None, 4)] == ["x"]  # no key: never batched


def test_remove_and_push_front() -> None:
    queue = FairQueue(NO_AGING)
    queue.push(entry("a0", "a"))
    queue.push(entry("b0", "b"))
    queue.push(entry("a1", "a"))
    first = queue.pop()
    assert first is not None and queue.remove("b0") is not None and queue.remove("b0") is None
    queue.push_front(first)
    assert served(queue) == ["a0", "a1"]
    queue.push(entry("x", "a"))
    with pytest.raises(ValueError):
        queue.push(entry("x", "a"))


def test_caps() -> None:
    assert user_cap(None, default=10, limit=100) == 10
    assert user_cap(50, default=10, limit=100) == 50
    assert user_cap(500, default=10, limit=100) == 100
    check_user_cap("alice", active=1, cap=2)
    with pytest.raises(UserQueueFull) as refused:
        check_user_cap("alice", active=2, cap=2)
    assert refused.value.status == 429 and refused.value.to_dict()["count"] == 2
    check_queue_cap(5, None)
    with pytest.raises(QueueFull) as full:
        check_queue_cap(5, 5)
    assert full.value.code == "queue_full" and full.value.to_dict()["count"] == 5


def test_retry_delay_grows_and_is_capped() -> None:
    delays = [retry_delay(n, base=1.0, cap=8.0, jitter=0.0) for n in range(1, 7)]
    assert delays == [1.0, 2.0, 4.0, 8.0, 8.0, 8.0]
    assert 0.5 <= retry_delay(1, base=1.0, jitter=0.5) <= 1.0


def test_run_times_learn_per_shape_and_fall_back_per_unit() -> None:
    times = RunTimes(alpha=0.5)
    small = GenerationRequest(prompt="x", width=64, height=64, steps=10)
    other = GenerationRequest(prompt="x", width=128, height=128, steps=10)
    assert times.estimate("mock", small) is None
    times.observe("mock", small, 2.0)
    times.observe("mock", small, 4.0)  # EWMA halfway: 3 s
    assert times.estimate("mock", small) == pytest.approx(3.0)
    # an unseen shape: the per-unit rate, 4x the pixels of the small one
    assert times.estimate("mock", other) == pytest.approx(4 * 3.0)
    assert times.eta("mock", small, cost_ahead=small.cost * 2, workers=2) == pytest.approx(6.0)
    assert times.averages()[0]["seconds_per_image"] == pytest.approx(3.0)


# -- properties ---------------------------------------------------------------------------

AGING = 50.0
operation = st.one_of(
    st.tuples(st.just("push"), st.sampled_from("abcd"), st.sampled_from([-1, 0, 0, 10])),
    st.tuples(st.just("pop"), st.just(""), st.just(0)),
    st.tuples(st.just("cancel"), st.just(""), st.integers(0, 50)),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(operation, max_size=120))
def test_no_job_lost_or_duplicated_and_tiers_respected(ops: list[tuple[str, str, int]]) -> None:
    """Time advances one unit per operation; each pop is one job served."""
    queue = FairQueue(Policy(aging_seconds=AGING))
    pushed: list[Entry] = []
    popped: list[Entry] = []
    removed: list[str] = []
    for now, (kind, user, value) in enumerate(ops):
        if kind == "push":
            new = entry(f"j{len(pushed)}", user, value, cost=1.0 + len(pushed) % 3, at=now)
            pushed.append(new)
            queue.push(new)
        elif kind == "pop":
            queue.age(now)
            queued = list(queue.order())
            got = queue.pop(now=now)
            if got is not None:
                assert got is queued[0]  # the head of the serving order is what is served
                # priority is respected up to aging: a lower tier goes before a higher one
                # only when one of its jobs has waited past the bound
                higher = [e for e in queued if e.priority > got.priority]
                starving = [
                    e for e in queued
                    if e.priority == got.priority and now - e.enqueued_at >= AGING
                ]  # fmt: skip
                assert not higher or starving
                popped.append(got)
        elif pushed:
            victim = pushed[value % len(pushed)].job_id
            if queue.remove(victim) is not None:
                removed.append(victim)
        for index, waiting in enumerate(list(queue.order())):
            place = queue.place(waiting.job_id)
            assert place is not None and place.position == index
    left = served(queue)
    everything = [e.job_id for e in popped] + removed + left
    assert Counter(everything) == Counter(e.job_id for e in pushed)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.tuples(st.sampled_from("abcde"), st.sampled_from([0, 0, -1])), max_size=40),
    st.integers(1, 3),
)
def test_no_job_waits_past_the_aging_bound_plus_its_turn(
    arrivals: list[tuple[str, int]], per_tick: int
) -> None:
    """A premium user keeps the worker saturated forever; every standard job is still
    served within the aging bound plus the rounds the top tier's users take."""
    queue = FairQueue(Policy(aging_seconds=AGING))
    waits: dict[str, float] = {}
    floods = 0
    horizon = len(arrivals) + int(AGING) + 8 * len(arrivals) + 20
    for now in range(horizon):
        if now < len(arrivals):
            user, priority = arrivals[now]
            queue.push(entry(f"j{now}", user, priority, at=now))
        for _ in range(per_tick):  # premium work arrives as fast as it is served
            queue.push(entry(f"flood{floods}", "flood", 10, at=now))
            floods += 1
        for _ in range(per_tick):
            got = queue.pop(now=now)
            if got is not None and not got.job_id.startswith("flood"):
                waits[got.job_id] = now - got.enqueued_at
    assert len(waits) == len(arrivals)  # nothing starves
    # once aged, a job shares the top tier with at most 6 users (flood + a..e), one job
    # per user per round; a user's own aged jobs queue behind each other
    bound = AGING + 6 * len(arrivals) / per_tick + 6
    assert max(waits.values(), default=0.0) <= bound


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from("abcde"), min_size=1, max_size=60))
def test_round_robin_bounds_any_users_wait(users: list[str]) -> None:
    """With equal jobs all queued up front, a user's k-th job runs within k rounds."""
    queue = FairQueue(NO_AGING)
    for i, user in enumerate(users):
        queue.push(entry(f"j{i}", user))
    order = served(queue)
    per_user: Counter[str] = Counter()
    distinct = len(set(users))
    by_id = {f"j{i}": user for i, user in enumerate(users)}
    for position, job_id in enumerate(order):
        user = by_id[job_id]
        per_user[user] += 1
        assert position < per_user[user] * distinct
    for user in set(users):  # FIFO inside each user
        mine = [int(j[1:]) for j in order if by_id[j] == user]
        assert mine == sorted(mine)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.sampled_from("abc"), st.booleans()), max_size=60), st.integers(1, 4))
def test_user_caps_are_never_exceeded(ops: list[tuple[str, bool]], cap: int) -> None:
    """Admission with ``check_user_cap`` keeps every user at or under the cap."""
    queue = FairQueue(NO_AGING)
    running: Counter[str] = Counter()
    for i, (user, submit) in enumerate(ops):
        if submit:
            try:
                check_user_cap(user, queue.queued_for(user) + running[user], cap)
            except UserQueueFull:
                continue
            queue.push(entry(f"j{i}", user))
        elif (got := queue.pop()) is not None:
            running[got.user_id] += 1
        for name in "abc":
            assert queue.queued_for(name) + running[name] <= cap
