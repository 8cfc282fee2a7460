"""Redis SIGKILLed under 200 jobs in flight, restarted on its AOF: every job succeeds.

The real deployment: redis-server with ``appendonly yes`` / ``appendfsync always``, one
``easel serve --redis`` API process and two ``easel worker`` processes (the scripted mock
of ``tests/redis_worker.py``, which logs every run). 200 jobs are accepted while the four
slots are held, then the slots are freed and, once results flow, Redis dies while jobs are
queued,
running and having their results committed; the API answers 503 meanwhile; after the
restart every accepted job ends ``succeeded``: none failed, none lost. Run with ``-s`` to
see the figures.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest

from easel.errors import StoreUnavailable
from easel.jobs import Job, JobState
from tests.redis_server import RedisServer
from tests.test_scale_out import SMALL, Cluster, _open_store, _submit_many, _wait_for

JOBS = 200
OUTAGE_SECONDS = 3.0
"""Longer than two leases (1.2 s here): the leases of the jobs running at the kill run
out while Redis is away, as in a real restart that replays a large AOF."""


def _worker_lines(cluster: Cluster, text: str) -> int:
    """Worker log lines with ``text``: "is unavailable" (the workers noticed the outage),
    "its outcome is kept" (a final write met it and is kept for a retry)."""
    return sum(
        log.read_text(errors="replace").count(text) for log in cluster.base.glob("worker-*.log")
    )


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_redis_sigkill_with_200_jobs_in_flight_fails_and_loses_none(tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "redis", aof=True).start()
    cluster = Cluster(server.url, tmp_path)
    cluster.env["EASEL_CONCURRENCY"] = "2"
    try:
        api = cluster.start_api()
        cluster.start_worker("a")
        cluster.start_worker("b")
        cluster.wait_for_workers(2)
        # the four slots are held while the 200 are submitted, then freed: all 200 in line
        blockers = [
            cluster.submit(prompt=f"blocker {i} [sleep:0.1]", steps=150, user_id="blocker")["id"]
            for i in range(4)
        ]
        for blocker in blockers:
            cluster.wait_until(blocker, "running")
        bodies = [
            {**SMALL, "prompt": f"outage {i} [sleep:0.02]", "steps": 5,
             "user_id": f"user{i % 10}", "max_user_queue_size": JOBS}
            for i in range(JOBS)
        ]  # fmt: skip
        began = time.monotonic()
        accepted = [job["id"] for job in asyncio.run(_submit_many([api.url], bodies))]
        assert len(set(accepted)) == JOBS
        for blocker in blockers:
            httpx.delete(f"{api.url}/v1/jobs/{blocker}", timeout=10).raise_for_status()
        runner, store = _open_store(server.url, cluster.prefix)

        def listed() -> dict[str, Job]:
            for _ in range(5):  # the test's own connection may be the one Redis cut
                with contextlib.suppress(StoreUnavailable):
                    return {job.id: job for job in runner.run(store.list_jobs(limit=10 * JOBS))}
            raise AssertionError("Redis did not come back")

        def states() -> Counter[str]:
            jobs = listed()
            return Counter(str(jobs[i].state) if i in jobs else "lost" for i in accepted)

        try:
            _wait_for(lambda: states()[JobState.succeeded] >= 1, "results to flow")
            at_kill = states()
            server.kill()
            killed = time.monotonic()

            # the API answers 503 at once meanwhile, for reads and for submissions
            ask = time.monotonic()
            read = httpx.get(f"{api.url}/v1/jobs/{accepted[-1]}", timeout=10)
            sent = httpx.post(f"{api.url}/v1/jobs", json={**SMALL, "prompt": "x"}, timeout=10)
            answered_in = time.monotonic() - ask
            for response in (read, sent):
                assert response.status_code == 503, response.text
                assert response.json()["error"]["code"] == "store_unavailable"
            _wait_for(lambda: _worker_lines(cluster, "is unavailable") > 0, "workers to notice")
            time.sleep(OUTAGE_SECONDS - (time.monotonic() - killed))  # the scenario's length
            server.start()
            down_for = time.monotonic() - killed

            deadline = time.monotonic() + 120
            while (now := states())[JobState.succeeded] < JOBS and time.monotonic() < deadline:
                time.sleep(0.2)
            drained_in = time.monotonic() - killed
            jobs = listed()
        finally:
            runner.run(store.close())
            runner.close()
        runs = Counter(
            line.split(" ", 1)[1].rsplit(" ", 1)[0]
            for line in cluster.run_log.read_text().splitlines()
            if line.startswith("done ")
        )
        ran_again = sum(1 for body in bodies if runs[str(body["prompt"])] > 1)
        print(
            f"\nRedis SIGKILL with {JOBS} jobs accepted ({time.monotonic() - began:.1f}s in all)"
            f"\n  at the kill: {dict(at_kill)}"
            f"\n  API during the outage: 503 store_unavailable in {answered_in * 1000:.0f} ms"
            f"\n  Redis down for {down_for:.1f}s; worker results kept for a retry: "
            f"{_worker_lines(cluster, 'its outcome is kept')} log lines"
            f"\n  after the restart: {dict(now)} ({drained_in:.1f}s after the kill)"
            f"\n  jobs whose run was repeated (lease lost in the outage): {ran_again}; "
            f"attempts: {dict(Counter(jobs[i].attempts for i in accepted))}"
        )
        assert now == {JobState.succeeded: JOBS}  # 0 failed, 0 lost
        assert all((cluster.data / "outputs" / jobs[i].images[0].path).is_file() for i in accepted)
        succeeded = cluster.succeeded_events()
        assert all(succeeded[i] >= 1 for i in accepted)
    finally:
        cluster.close()
        server.stop()
