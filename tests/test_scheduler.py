"""The queue policy, driven directly: examples, then properties over random arrivals."""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from easel.errors import UserQueueFull
from easel.scheduler import Entry, FairQueue, RunTimes, check_user_cap, user_cap


def entry(
    job_id: str, user: str, priority: int = 0, route: str = "mock", cost: float = 1.0
) -> Entry:
    return Entry(job_id=job_id, user_id=user, priority=priority, route=route, cost=cost)


def _id(queued: Entry | None) -> str | None:
    return None if queued is None else queued.job_id


def served(queue: FairQueue) -> list[str]:
    order = []
    while (next_entry := queue.pop()) is not None:
        order.append(next_entry.job_id)
    return order


def test_higher_tier_first_then_fifo() -> None:
    queue = FairQueue()
    queue.push(entry("low", "a", priority=-1))
    queue.push(entry("std1", "a"))
    queue.push(entry("std2", "a"))
    queue.push(entry("premium", "b", priority=10))
    assert served(queue) == ["premium", "std1", "std2", "low"]


def test_round_robin_between_users_of_a_tier() -> None:
    queue = FairQueue()
    for i in range(3):
        queue.push(entry(f"a{i}", "alice"))
    queue.push(entry("b0", "bob"))
    queue.push(entry("c0", "carol"))
    assert served(queue) == ["a0", "b0", "c0", "a1", "a2"]


def test_a_user_arriving_late_is_served_next_round() -> None:
    queue = FairQueue()
    for i in range(4):
        queue.push(entry(f"a{i}", "alice"))
    assert _id(queue.pop()) == "a0"
    queue.push(entry("b0", "bob"))
    assert served(queue) == ["a1", "b0", "a2", "a3"]


def test_position_matches_serving_order() -> None:
    queue = FairQueue()
    for job_id, user, priority in [("a0", "a", 0), ("a1", "a", 0), ("b0", "b", 0), ("p", "c", 5)]:
        queue.push(entry(job_id, user, priority))
    assert [queue.position(j) for j in ("p", "a0", "b0", "a1")] == [0, 1, 2, 3]
    assert queue.position("missing") is None


def test_pop_skips_routes_the_worker_cannot_serve() -> None:
    queue = FairQueue()
    queue.push(entry("gpu", "a", route="diffusers"))
    queue.push(entry("cpu", "a", route="mock"))
    assert _id(queue.pop(["mock"])) == "cpu"
    assert queue.pop(["mock"]) is None
    assert len(queue) == 1


def test_remove_and_push_front() -> None:
    queue = FairQueue()
    queue.push(entry("a0", "a"))
    queue.push(entry("a1", "a"))
    assert queue.remove("a0") is not None and queue.remove("a0") is None
    queue.push_front(entry("a0", "a"))
    assert served(queue) == ["a0", "a1"]
    with pytest.raises(ValueError):
        queue.push(entry("x", "a"))
        queue.push(entry("x", "a"))


def test_user_cap_resolution_and_check() -> None:
    assert user_cap(None, default=10, limit=100) == 10
    assert user_cap(50, default=10, limit=100) == 50
    assert user_cap(500, default=10, limit=100) == 100
    check_user_cap("alice", active=1, cap=2)
    with pytest.raises(UserQueueFull) as refused:
        check_user_cap("alice", active=2, cap=2)
    assert refused.value.status == 429 and "2" in refused.value.message


def test_run_times_learn_and_estimate() -> None:
    times = RunTimes(alpha=0.5)
    assert times.estimate("mock", 1.0) is None
    times.observe("mock", cost=2.0, seconds=4.0)
    assert times.estimate("mock", 1.0) == pytest.approx(2.0)
    times.observe("mock", cost=1.0, seconds=4.0)  # 4 s/unit, halfway: 3 s/unit
    assert times.estimate("mock", 1.0) == pytest.approx(3.0)
    # 2 units ahead shared by 2 workers, then its own unit: 2 units at 3 s
    assert times.eta("mock", cost_ahead=2.0, cost=1.0, workers=2) == pytest.approx(6.0)
    assert times.eta("other", cost_ahead=2.0, cost=1.0, workers=2) is None


# -- properties ---------------------------------------------------------------------------

operation = st.one_of(
    st.tuples(st.just("push"), st.sampled_from("abcd"), st.sampled_from([-1, 0, 0, 10])),
    st.tuples(st.just("pop"), st.just(""), st.just(0)),
    st.tuples(st.just("cancel"), st.just(""), st.integers(0, 50)),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(operation, max_size=80))
def test_no_job_lost_or_duplicated_and_tiers_respected(ops: list[tuple[str, str, int]]) -> None:
    queue = FairQueue()
    pushed: list[Entry] = []
    popped: list[Entry] = []
    removed: list[str] = []
    for kind, user, value in ops:
        if kind == "push":
            new = entry(f"j{len(pushed)}", user, value, cost=1.0 + len(pushed) % 3)
            pushed.append(new)
            queue.push(new)
        elif kind == "pop":
            queued = list(queue.order())
            got = queue.pop()
            if got is not None:
                # never a lower tier while a higher one waits
                assert got.priority == max(e.priority for e in queued)
                # the head of the serving order is what was served
                assert got == queued[0]
                popped.append(got)
        elif pushed:
            victim = pushed[value % len(pushed)].job_id
            if queue.remove(victim) is not None:
                removed.append(victim)
    order = list(queue.order())
    for index, queued in enumerate(order):
        place = queue.place(queued.job_id)
        assert place is not None and place.position == index
        # partial FIFOs are costed at their mean: bounded by the cheapest and dearest job
        costs = [e.cost for e in order]
        low, high = min(costs) * index, max(costs) * index
        assert low - 1e-9 <= place.cost_ahead <= high + 1e-9
    left = served(queue)
    everything = [e.job_id for e in popped] + removed + left
    assert Counter(everything) == Counter(e.job_id for e in pushed)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from("abcde"), min_size=1, max_size=60))
def test_round_robin_bounds_any_users_wait(users: list[str]) -> None:
    """With all jobs queued up front, a user's k-th job runs within k rounds of users."""
    queue = FairQueue()
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
    # FIFO inside each user
    for user in set(users):
        mine = [int(j[1:]) for j in order if by_id[j] == user]
        assert mine == sorted(mine)
