"""The pipelined worker keeps every promise while results are finished off the backend's path.

Saves are held at a gate (a storage whose ``save`` waits for the test), so "results in
flight" lasts exactly as long as a test needs: no sleeps, no timing.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import AsyncIterable
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

import easel.runtime.worker as worker_module
from easel.backends.base import GenerationResult, RunContext
from easel.backends.mock import MockBackend
from easel.config import Settings
from easel.events.bus import InProcessEventBus, Subscription
from easel.jobs import Event, EventType, GenerationRequest, ImageRef, Job, JobState, Phase
from easel.results.files import LocalStorage
from easel.runtime._ahead import Ahead
from easel.runtime._finisher import in_results_thread
from easel.runtime.facade import Runtime


class GatedStorage(LocalStorage):
    """``save`` announces itself (``saving``), then waits until its job is let through."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.loop = asyncio.get_running_loop()
        self.saving: asyncio.Queue[str] = asyncio.Queue()
        self._open: dict[str, threading.Event] = {}
        self._all = threading.Event()
        self._lock = threading.Lock()

    def _gate(self, job_id: str) -> threading.Event:
        with self._lock:
            return self._open.setdefault(job_id, threading.Event())

    def release(self, job_id: str) -> None:
        self._gate(job_id).set()

    def release_all(self) -> None:
        self._all.set()
        with self._lock:
            for gate in self._open.values():
                gate.set()

    def save(self, job: Job, result: GenerationResult) -> list[ImageRef]:
        self.loop.call_soon_threadsafe(self.saving.put_nowait, job.id)
        gate = self._gate(job.id)
        if self._all.is_set():
            gate.set()
        if not gate.wait(30):
            raise TimeoutError("the test never released this save")
        return super().save(job, result)


class HeldBus(InProcessEventBus):
    """Holds ``succeeded`` announcements until released: a crash can land between the
    commit and the announcement."""

    def __init__(self) -> None:
        super().__init__()
        self.held = asyncio.Event()
        self.holding = asyncio.Event()

    async def publish(self, event: Event) -> Event:
        if event.type is EventType.succeeded:
            self.holding.set()
            await self.held.wait()
        return await super().publish(event)


def _settings(tmp_path: Path, depth: int = 1) -> Settings:
    return Settings(data_dir=tmp_path / "data", backend="mock", results_depth=depth)


def _request(prompt: str) -> GenerationRequest:
    return GenerationRequest(prompt=prompt, width=64, height=64, steps=3, seed=1)


def _drain(subscription: Subscription) -> list[Event]:
    """Events already delivered to a subscription (offer is synchronous)."""
    events = []
    while not subscription.queue.empty():
        if (event := subscription.queue.get_nowait()) is not None:
            events.append(event)
    return events


async def _until(subscription: AsyncIterable[Event], job_id: str, type: EventType) -> None:
    async for event in subscription:
        if event.job_id == job_id and event.type is type:
            return


@pytest.fixture
async def gated(tmp_path: Path) -> GatedStorage:
    return GatedStorage(tmp_path / "out")


async def test_the_next_job_runs_while_results_are_in_flight(
    tmp_path: Path, gated: GatedStorage
) -> None:
    runtime = Runtime(_settings(tmp_path, depth=1), storage=gated)
    await runtime.start()
    try:
        everything = runtime.bus.subscribe()
        watch = runtime.bus.subscribe()
        first, second, third = [
            (await runtime.submit(_request(name))).id for name in ("one", "two", "three")
        ]
        assert await gated.saving.get() == first
        # the backend is free: the second job runs while the first one's results wait
        await _until(watch, second, EventType.progress)
        # depth 1: the second call's results wait for the first's; the third may be
        # claimed ahead, but nothing else starts
        assert (third, EventType.started) not in {(e.job_id, e.type) for e in _drain(watch)}
        gated.release(first)
        assert await gated.saving.get() == second
        gated.release_all()
        for job_id in (first, second, third):
            assert (await runtime.wait(job_id, timeout=30)).state is JobState.succeeded
        events = _drain(everything)
    finally:
        gated.release_all()
        await runtime.stop()

    for job_id in (first, second, third):
        types = [event.type for event in events if event.job_id == job_id]
        assert types == [
            EventType.queued, EventType.started, *[EventType.progress] * 3, EventType.succeeded
        ]  # fmt: skip
    order = [(event.job_id, event.type) for event in events]
    assert order.index((second, EventType.started)) < order.index((first, EventType.succeeded))


async def test_succeeded_is_announced_only_after_files_and_record_are_durable(
    tmp_path: Path,
) -> None:
    runtime = Runtime(_settings(tmp_path, depth=2))
    await runtime.start()
    checked = []
    try:
        async with runtime.bus.subscribe(types={EventType.succeeded}) as succeeded:
            ids = [(await runtime.submit(_request(f"job {i}"))).id for i in range(4)]
            async for event in succeeded:
                record = await runtime.store.get(event.job_id)
                assert record.state is JobState.succeeded
                assert event.images and record.images == event.images
                assert all(runtime.storage.path(ref).stat().st_size > 0 for ref in record.images)
                checked.append(event.job_id)
                if len(checked) == len(ids):
                    break
    finally:
        await runtime.stop()
    assert sorted(checked) == sorted(ids)


async def test_a_job_cancelled_while_its_results_are_in_flight_is_discarded(
    tmp_path: Path, gated: GatedStorage
) -> None:
    runtime = Runtime(_settings(tmp_path), storage=gated)
    await runtime.start()
    try:
        everything = runtime.bus.subscribe()
        job_id = (await runtime.submit(_request("cancel me late"))).id
        assert await gated.saving.get() == job_id
        await runtime.cancel(job_id)
        gated.release_all()
        await runtime.workers[0].finisher.drain()
        record = await runtime.store.get(job_id)
        events = _drain(everything)
    finally:
        gated.release_all()
        await runtime.stop()
    assert record.state is JobState.cancelled and record.images == []
    assert EventType.succeeded not in {event.type for event in events}


async def test_a_lease_lost_while_results_are_in_flight_is_honoured(
    tmp_path: Path, gated: GatedStorage
) -> None:
    """The reaper put the job back while its results were being written: those results
    are void; the job runs again and succeeds once, from its second run."""
    runtime = Runtime(_settings(tmp_path, depth=2), storage=gated)
    await runtime.start()
    try:
        everything = runtime.bus.subscribe()
        job_id = (await runtime.submit(_request("slow disk"))).id
        assert await gated.saving.get() == job_id
        worker = runtime.workers[0]
        await runtime.store.requeue(job_id, worker_id=worker.id)  # as expire_leases would
        runtime._wakeup.set()
        assert await gated.saving.get() == job_id  # the second run's results
        gated.release_all()
        done = await runtime.wait(job_id, timeout=30)
        await worker.finisher.drain()
        events = _drain(everything)
    finally:
        gated.release_all()
        await runtime.stop()
    assert done.state is JobState.succeeded and done.attempts == 2
    assert [event.type for event in events].count(EventType.succeeded) == 1


async def _crash(runtime: Runtime) -> None:
    """Stop the process the hard way: workers killed mid-flight, nothing put back."""
    tasks = runtime.supervisor._tasks
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    tasks.clear()
    runtime.workers.clear()
    await runtime.stop(grace=0)


async def test_a_crash_while_results_are_encoded_runs_the_job_again(
    tmp_path: Path, gated: GatedStorage
) -> None:
    first = Runtime(_settings(tmp_path), storage=gated)
    await first.start()
    job_id = (await first.submit(_request("crash in flight"))).id
    assert await gated.saving.get() == job_id
    await _crash(first)
    gated.release_all()  # the orphaned save thread ends; nothing commits it

    second = Runtime(_settings(tmp_path))
    await second.start()
    try:
        assert (await second.store.get(job_id)).state in {JobState.queued, JobState.running}
        done = await second.wait(job_id, timeout=30)
    finally:
        await second.stop()
    assert done.state is JobState.succeeded and done.attempts == 2
    assert second.storage.path(done.images[0]).is_file()


async def test_a_crash_after_the_commit_keeps_the_durable_result(tmp_path: Path) -> None:
    bus = HeldBus()
    first = Runtime(_settings(tmp_path), bus=bus)
    await first.start()
    job_id = (await first.submit(_request("committed, not announced"))).id
    await bus.holding.wait()
    await _crash(first)

    second = Runtime(_settings(tmp_path))
    await second.start()
    try:
        done = await second.wait(job_id, timeout=30)
    finally:
        await second.stop()
    assert done.state is JobState.succeeded and done.attempts == 1
    assert second.storage.path(done.images[0]).is_file()


async def test_depth_zero_finishes_in_line(tmp_path: Path, gated: GatedStorage) -> None:
    runtime = Runtime(_settings(tmp_path, depth=0), storage=gated)
    await runtime.start()
    try:
        first, second = [(await runtime.submit(_request(n))).id for n in ("a", "b")]
        assert await gated.saving.get() == first
        assert (await runtime.store.get(second)).state is JobState.queued
        gated.release_all()
        assert (await runtime.wait(second, timeout=30)).state is JobState.succeeded
    finally:
        gated.release_all()
        await runtime.stop()


def test_results_depth_is_a_setting() -> None:
    assert Settings().results_depth == 2
    with pytest.raises(ValueError):
        Settings(results_depth=-1)
    assert MockBackend().batches


@pytest.mark.skipif(not hasattr(os, "setpriority"), reason="per-thread nice is Linux's")
async def test_results_threads_run_at_a_lower_cpu_priority() -> None:
    """``results_nice``: encoding yields the CPU to the event loop and the backends."""
    base = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    assert Settings().results_nice == 10
    own = await in_results_thread(
        lambda: os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    )
    assert own == min(19, base + 10)


class LoopPreviews(MockBackend):
    """An async backend (a remote engine's adapter) reporting previews from the loop."""

    async def generate(self, request: GenerationRequest, context: RunContext) -> GenerationResult:
        picture = Image.new("RGB", (512, 512), "teal")
        for step in range(1, request.steps + 1):
            context.progress(step, request.steps, picture)
            await asyncio.sleep(0)
        return GenerationResult(images=[picture], seeds=request.seeds, model="mock")


async def test_previews_from_the_loop_are_encoded_off_it_and_published_in_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    encoded_on: set[str] = set()
    encode = worker_module._jpeg_base64

    def recording(image: Image.Image, max_side: int = 256) -> str:
        encoded_on.add(threading.current_thread().name)
        return encode(image, max_side)

    monkeypatch.setattr(worker_module, "_jpeg_base64", recording)
    runtime = Runtime(_settings(tmp_path), backends={"mock": LoopPreviews()})
    await runtime.start()
    try:
        async with runtime.bus.subscribe(types={EventType.progress}) as progress:
            job_id = (await runtime.submit(_request("previews"))).id
            assert (await runtime.wait(job_id, timeout=30)).state is JobState.succeeded
            events = _drain(progress)
    finally:
        await runtime.stop()
    assert [event.step for event in events] == [1, 2, 3]
    assert all(event.preview for event in events)
    assert encoded_on and all(name.startswith("easel-results") for name in encoded_on)


class HeldBackend(MockBackend):
    """The mock, but a prompt in ``hold`` waits in the backend after its last step until
    the test lets it go."""

    def __init__(self) -> None:
        super().__init__()
        self.hold: dict[str, asyncio.Event] = {}
        self.ran: list[str] = []
        self.running: asyncio.Queue[str] = asyncio.Queue()
        self.held_ahead: list[Any] = []  # what the worker claimed ahead (set by the test)

    async def generate(self, request: GenerationRequest, context: RunContext) -> GenerationResult:
        self.ran.append(request.prompt)
        self.running.put_nowait(request.prompt)
        result = await super().generate(request, context)  # every step reported
        if (gate := self.hold.get(request.prompt)) is not None:
            await gate.wait()
        return result


async def _holding_ahead(tmp_path: Path, **settings: object) -> tuple[Runtime, HeldBackend, str]:
    """A runtime whose worker runs "hold" (held in the backend) and has claimed the job
    "next" ahead, not started; returns it, its backend and the id of "next"."""
    backend = HeldBackend()
    backend.hold["hold"] = asyncio.Event()
    runtime = Runtime(
        Settings(data_dir=tmp_path / "data", backend="mock", **settings),  # type: ignore[arg-type]
        backends={"mock": backend},
    )
    await runtime.start()
    worker = runtime.workers[0]
    claimed = asyncio.Event()
    claim_ahead = worker._claim_ahead

    async def signalling() -> object:
        held = await claim_ahead()
        if held is not None:
            backend.held_ahead.append(held)
            claimed.set()
        return held

    worker._ahead = Ahead(signalling)  # type: ignore[arg-type]
    await runtime.submit(_request("hold"))
    next_id = (await runtime.submit(_request("next"))).id
    assert await backend.running.get() == "hold"
    await asyncio.wait_for(claimed.wait(), 30)
    assert [job.id for job in worker._held_ahead] == [next_id]
    return runtime, backend, next_id


async def test_a_job_claimed_ahead_and_cancelled_never_runs(tmp_path: Path) -> None:
    runtime, backend, next_id = await _holding_ahead(tmp_path)
    try:
        everything = runtime.bus.subscribe(job_id=next_id, after=0)
        await runtime.cancel(next_id)
        backend.hold["hold"].set()
        await runtime.workers[0].finisher.drain()
        after = (await runtime.submit(_request("after"))).id
        assert (await runtime.wait(after, timeout=30)).state is JobState.succeeded
        record = await runtime.store.get(next_id)
        events = [event.type for event in _drain(everything)]
    finally:
        backend.hold["hold"].set()
        await runtime.stop()
    assert record.state is JobState.cancelled
    assert "next" not in backend.ran
    assert EventType.started not in events


async def test_a_lease_lost_while_claimed_ahead_is_honoured(tmp_path: Path) -> None:
    """The reaper took the job back while it waited to start: it is not started from the
    stale claim; it runs once, from the queue."""
    runtime, backend, next_id = await _holding_ahead(tmp_path, heartbeat_seconds=0.05)
    try:
        events = runtime.bus.subscribe(job_id=next_id, after=0)
        worker = runtime.workers[0]
        flag = worker._cancels[next_id]
        await runtime.store.requeue(next_id, worker_id=worker.id)  # as expire_leases would
        assert await asyncio.to_thread(flag.wait, 30)  # the heartbeat saw it
        backend.hold["hold"].set()
        done = await runtime.wait(next_id, timeout=30)
        await worker.finisher.drain()
        types = [event.type for event in _drain(events)]
    finally:
        backend.hold["hold"].set()
        await runtime.stop()
    assert done.state is JobState.succeeded
    assert types.count(EventType.started) == 1 and types.count(EventType.succeeded) == 1
    assert backend.ran.count("next") == 1


async def test_a_crash_while_a_job_is_claimed_ahead_runs_it_again(tmp_path: Path) -> None:
    first, backend, next_id = await _holding_ahead(tmp_path)
    await _crash(first)
    [held] = backend.held_ahead
    await asyncio.wait([held.heartbeat], timeout=30)
    assert held.heartbeat.cancelled()  # the dead worker's lease is left to expire
    backend.hold["hold"].set()  # the orphaned backend call ends; nothing commits it

    second = Runtime(_settings(tmp_path))
    await second.start()
    try:
        done = await second.wait(next_id, timeout=60)
    finally:
        await second.stop()
    assert done.state is JobState.succeeded
    assert second.storage.path(done.images[0]).is_file()


async def test_stopping_gives_a_job_claimed_ahead_back_unspent(tmp_path: Path) -> None:
    runtime, backend, next_id = await _holding_ahead(tmp_path)
    stopping = asyncio.create_task(runtime.stop(grace=30))
    await asyncio.sleep(0)  # the worker is told to stop while "hold" still runs
    backend.hold["hold"].set()
    await stopping
    again = Runtime(_settings(tmp_path))
    await again.start(workers=False)
    try:
        record = await again.store.get(next_id)
    finally:
        await again.stop()
    assert record.state is JobState.queued and record.attempts == 0
    assert "next" not in backend.ran


async def test_a_job_whose_model_must_load_first_says_so_when_it_starts(tmp_path: Path) -> None:
    """The signal the progress display shows: a cold backend's first job starts with the
    phase ``loading_model`` and the model's name; the next job for that model (in memory
    now) starts without it; a job for another model loads again."""
    settings = Settings(
        data_dir=tmp_path / "data", backend="mock", mock_load_seconds=0.05, mock_models=["other"]
    )
    async with Runtime(settings) as runtime:
        events = runtime.bus.subscribe()
        jobs = []
        for model in (None, "mock", "other"):
            view = await runtime.submit(_request("p").model_copy(update={"model": model}))
            assert (await runtime.wait(view.id, timeout=30)).state is JobState.succeeded
            jobs.append(view.id)
        seen = _drain(events)
    started = {e.job_id: (e.phase, e.model) for e in seen if e.type is EventType.started}
    assert started == {
        jobs[0]: (Phase.loading_model, "mock"),
        jobs[1]: (None, None),
        jobs[2]: (Phase.loading_model, "other"),
    }
    first = [e.type for e in seen if e.job_id == jobs[0]]
    assert first == [EventType.queued, EventType.started, *[EventType.progress] * 3,
                     EventType.succeeded]  # fmt: skip
