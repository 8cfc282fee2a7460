"""Fan-out pacing: a burst of sends is spread over loop iterations, in arrival order."""

from __future__ import annotations

import asyncio
import itertools

import pytest

from easel.events.pacing import Pacer, pacer


async def test_at_most_per_turn_sends_per_iteration_first_come_first_served() -> None:
    gate = Pacer(per_turn=3)
    granted: list[int] = []

    async def send(i: int) -> None:
        await gate.turn()
        granted.append(i)

    tasks = [asyncio.create_task(send(i)) for i in range(10)]
    seen = [0]
    while len(granted) < 10:
        await asyncio.sleep(0)  # one loop iteration
        seen.append(len(granted))
    await asyncio.gather(*tasks)
    assert granted == list(range(10))
    assert max(b - a for a, b in itertools.pairwise(seen)) <= 3
    assert len(seen) > 10 // 3  # spread over iterations, not all at once


async def test_a_cancelled_waiter_leaves_the_line_and_the_others_go_on() -> None:
    gate = Pacer(per_turn=1)
    first, second, third = (asyncio.create_task(gate.turn()) for _ in range(3))
    await asyncio.sleep(0)  # the first takes this iteration's send; the others wait
    assert first.done() and not second.done()
    second.cancel()
    await asyncio.wait_for(third, 5)
    assert second.cancelled()


async def test_one_pacer_per_loop() -> None:
    assert pacer() is pacer()


def test_per_turn_must_be_positive() -> None:
    with pytest.raises(ValueError):
        Pacer(per_turn=0)
