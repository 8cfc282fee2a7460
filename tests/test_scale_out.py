"""Scaled out for real: ``easel serve --redis`` API processes and ``easel worker`` processes
on loopback, sharing one real redis-server (AOF, ``appendfsync always``).

Workers run ``python -m tests.redis_worker`` (the real CLI with a scripted mock, see that
module) and log every run, so a job run twice cannot hide.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from websockets.sync.client import connect

from easel.client import AsyncClient
from easel.jobs import GenerationRequest, Job, JobState
from easel.store.redis import RedisStore
from tests.redis_server import RedisServer
from tests.servers import Process, easel_serve

ROOT = Path(__file__).resolve().parent.parent
HEARTBEAT = 1.0
FINAL = {"succeeded", "failed", "cancelled"}
SMALL = {"width": 8, "height": 8, "steps": 1}


class Cluster:
    """API processes and worker processes sharing one Redis under one key prefix."""

    def __init__(self, url: str, base: Path, *, max_attempts: int = 3) -> None:
        self.url = url
        self.base = base
        self.prefix = f"scale:{uuid.uuid4().hex[:8]}:"
        self.data = base / "data"
        self.run_log = base / "runs.log"
        self.run_log.touch()
        self.env = {
            "EASEL_REDIS_PREFIX": self.prefix,
            "EASEL_HEARTBEAT_SECONDS": str(HEARTBEAT),
            "EASEL_LEASE_SECONDS": str(1.2 * HEARTBEAT),
            "EASEL_MAX_ATTEMPTS": str(max_attempts),
            "EASEL_MOCK_STEP_DELAY": "0",
            "EASEL_SHUTDOWN_GRACE_SECONDS": "5",
            "EASEL_TEST_RUN_LOG": str(self.run_log),
        }
        self.apis: list[Process] = []
        self.workers: dict[str, subprocess.Popen[bytes]] = {}
        self._stack = ExitStack()

    def start_api(self) -> Process:
        api = self._stack.enter_context(
            easel_serve(self.data, "--redis", self.url, "--concurrency", "0", env=self.env)
        )
        self.apis.append(api)
        return api

    def start_worker(self, name: str, **env: str) -> subprocess.Popen[bytes]:
        log = open(self.base / f"worker-{name}.log", "ab")  # noqa: SIM115
        self._stack.callback(log.close)
        process = subprocess.Popen(
            [sys.executable, "-m", "tests.redis_worker", "worker", "--redis", self.url,
             "--data-dir", str(self.data)],
            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
            env={**os.environ, **self.env, **env},
        )  # fmt: skip
        self.workers[name] = process
        return process

    def heal(self) -> None:
        """Start again every worker that died (a poison job, a test's kill -9)."""
        for name, process in list(self.workers.items()):
            if process.poll() is not None:
                self.start_worker(name)

    def wait_for_workers(self, count: int, timeout: float = 30) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            workers: list[dict[str, Any]] = self.get("/v1/workers")["workers"]
            if len(workers) >= count:
                return workers
            time.sleep(0.1)
        raise TimeoutError(f"fewer than {count} workers registered")

    def get(self, path: str, api: int = 0) -> Any:
        response = httpx.get(self.apis[api].url + path, timeout=10)
        response.raise_for_status()
        return response.json()

    def submit(self, api: int = 0, **fields: Any) -> dict[str, Any]:
        response = httpx.post(f"{self.apis[api].url}/v1/jobs", json={**SMALL, **fields})
        assert response.status_code == 202, response.text
        body: dict[str, Any] = response.json()
        return body

    def runs(self, prompt: str) -> Counter[str]:
        """How often each phase ('start', 'done') of the job with this prompt ran."""
        return Counter(
            line.split(" ", 1)[0]
            for line in self.run_log.read_text().splitlines()
            if line.split(" ", 1)[1].rsplit(" ", 1)[0] == prompt
        )

    def pid_of(self, worker_id: str) -> int:
        for worker in self.get("/v1/workers")["workers"]:
            if worker["id"] == worker_id:
                return int(worker["pid"])
        raise LookupError(worker_id)

    def wait_until(self, job_id: str, *states: str, timeout: float = 30) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            job: dict[str, Any] = self.get(f"/v1/jobs/{job_id}")
            if job["state"] in states:
                return job
            time.sleep(0.02)
        raise TimeoutError(f"job {job_id} never reached {states}")

    def wait_for_step(self, job_id: str, step: int, timeout: float = 30) -> None:
        """Until the job's ``progress`` events reach ``step`` (read from the event stream)."""
        url = f"{self.apis[0].url.replace('http', 'ws')}/v1/events?job_id={job_id}&after=0"
        with connect(url) as events:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                event = json.loads(events.recv(timeout=timeout))
                if event["type"] == "progress" and event["step"] >= step:
                    return
                assert event["type"] not in FINAL, event
        raise TimeoutError(f"job {job_id} never reached step {step}")

    def wait_until_idle(self, worker_id: str, *, beat_since: float) -> None:
        """Until ``worker_id`` has beaten since ``beat_since`` (monotonic) with no job."""
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            for worker in self.get("/v1/workers")["workers"]:
                fresh = time.monotonic() - worker["heartbeat_age_seconds"] > beat_since
                if worker["id"] == worker_id and fresh and not worker["current_jobs"]:
                    return
            time.sleep(0.05)
        raise TimeoutError(f"worker {worker_id} never reported back idle")

    def succeeded_events(self) -> Counter[str]:
        """``succeeded`` events per job id, read straight from the stream."""
        client = redis.Redis.from_url(self.url, decode_responses=True)
        try:
            entries: list[tuple[str, dict[str, str]]] = client.xrange(  # type: ignore[assignment]
                self.prefix + "events"
            )
        finally:
            client.close()
        return Counter(fields["j"] for _id, fields in entries if fields["t"] == "succeeded")

    def close(self) -> None:
        for process in self.workers.values():
            if process.poll() is None:
                process.send_signal(signal.SIGCONT)
                process.kill()
            process.wait()
        self._stack.close()


@pytest.fixture(scope="module")
def cluster(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """Two API processes and two worker processes."""
    cluster = Cluster(redis_url, tmp_path_factory.mktemp("cluster"))
    try:
        cluster.start_api()
        cluster.start_api()
        cluster.start_worker("a")
        cluster.start_worker("b")
        cluster.wait_for_workers(2)
        yield cluster
    finally:
        cluster.close()


async def _submit_many(urls: list[str], bodies: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Through easel's client, as a bot would: a submission whose connection broke (a busy
    machine, a keep-alive closed under it) is sent again with its Idempotency-Key."""
    limits = asyncio.Semaphore(16)
    clients = [AsyncClient(url, retries=5) for url in urls]
    try:

        async def one(i: int, body: dict[str, Any]) -> dict[str, Any]:
            async with limits:
                view = await clients[i % len(clients)].submit(**body)
                return view.model_dump(mode="json")

        return await asyncio.gather(*(one(i, body) for i, body in enumerate(bodies)))
    finally:
        for client in clients:
            await client.aclose()


def _open_store(url: str, prefix: str) -> tuple[asyncio.Runner, RedisStore]:
    runner = asyncio.Runner()
    store = RedisStore(url, prefix=prefix)
    runner.run(store.open())
    return runner, store


def test_a_thousand_jobs_from_ten_users_complete_exactly_once(cluster: Cluster) -> None:
    bodies = [
        {**SMALL, "prompt": f"bulk {user} {i}", "user_id": f"user{user}",
         "max_user_queue_size": 200}
        for i in range(100) for user in range(10)
    ]  # fmt: skip
    accepted = asyncio.run(_submit_many([api.url for api in cluster.apis], bodies))
    ids = {job["id"] for job in accepted}
    assert len(ids) == 1000
    runner, store = _open_store(cluster.url, cluster.prefix)
    try:
        deadline = time.monotonic() + 90
        while True:
            jobs = runner.run(store.list_jobs(state=JobState.succeeded, limit=5000))
            done = {job.id for job in jobs} & ids
            if len(done) == len(ids) or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert len(done) == 1000
        assert all(job.attempts == 1 for job in jobs if job.id in ids)
        assert all((cluster.data / "outputs" / job.images[0].path).is_file()
                   for job in jobs if job.id in ids)  # fmt: skip
    finally:
        runner.run(store.close())
        runner.close()
    succeeded = cluster.succeeded_events()
    assert all(succeeded[job_id] == 1 for job_id in ids)
    runs = Counter(line.rsplit(" ", 1)[0] for line in cluster.run_log.read_text().splitlines())
    assert all(runs[f"done bulk {u} {i}"] == 1 for u in range(10) for i in range(100))
    # both workers took part, through both API processes
    pids = {line.rsplit(" ", 1)[1] for line in cluster.run_log.read_text().splitlines()}
    assert len(pids) >= 2


def test_kill_9_of_a_worker_mid_job_completes_it_on_the_other(cluster: Cluster) -> None:
    cluster.heal()
    cluster.wait_for_workers(2)
    prompt = "kill me [sleep:0.05]"
    job = cluster.submit(prompt=prompt, steps=40)  # 2 s
    running = cluster.wait_until(job["id"], "running")
    victim = running["worker_id"]
    cluster.wait_for_step(job["id"], 5)  # mid-job
    os.kill(cluster.pid_of(victim), signal.SIGKILL)
    done = cluster.wait_until(job["id"], "succeeded", "failed", timeout=30)
    assert done["state"] == "succeeded"
    assert done["attempts"] == 2 and done["worker_id"] != victim
    assert cluster.runs(prompt) == {"start": 2, "done": 1}  # the killed run never finished
    assert cluster.succeeded_events()[job["id"]] == 1
    cluster.heal()


def test_a_stopped_worker_loses_its_job_within_two_heartbeats(cluster: Cluster) -> None:
    """SIGSTOP: the process is alive but silent; its missed heartbeats give the job back."""
    cluster.heal()
    cluster.wait_for_workers(2)
    prompt = "stop me [sleep:0.05]"
    job = cluster.submit(prompt=prompt, steps=30)
    running = cluster.wait_until(job["id"], "running")
    hung = running["worker_id"]
    pid = cluster.pid_of(hung)
    os.kill(pid, signal.SIGSTOP)
    stopped_at = time.monotonic()
    try:
        while True:
            current = cluster.get(f"/v1/jobs/{job['id']}")
            if current["worker_id"] != hung:
                break
            assert time.monotonic() - stopped_at < 10, "the job was never put back"
            time.sleep(0.02)
        requeued_after = time.monotonic() - stopped_at
    finally:
        os.kill(pid, signal.SIGCONT)
        resumed = time.monotonic()
    assert requeued_after <= 2 * HEARTBEAT, requeued_after
    done = cluster.wait_until(job["id"], "succeeded", "failed")
    assert done["state"] == "succeeded" and done["worker_id"] != hung
    # the woken worker finds its lease gone and drops its result; then it reports idle
    cluster.wait_until_idle(hung, beat_since=resumed)
    assert cluster.succeeded_events()[job["id"]] == 1
    assert cluster.get(f"/v1/jobs/{job['id']}")["worker_id"] == done["worker_id"]


def test_a_poison_job_fails_after_exactly_max_attempts(cluster: Cluster) -> None:
    """Each run kills its worker; dead workers are started again (as a supervisor would)."""
    cluster.heal()
    prompt = "poison [exit]"
    job = cluster.submit(prompt=prompt)
    stop = threading.Event()

    def supervise() -> None:
        while not stop.is_set():
            cluster.heal()
            time.sleep(0.1)

    supervisor = threading.Thread(target=supervise, daemon=True)
    supervisor.start()
    try:
        final = cluster.wait_until(job["id"], "failed", "succeeded", timeout=60)
    finally:
        stop.set()
        supervisor.join()
    assert final["state"] == "failed" and final["error"]["code"] == "worker_lost"
    assert final["attempts"] == 3
    assert cluster.runs(prompt) == {"start": 3}
    cluster.heal()


def test_a_websocket_client_resuming_on_another_replica_misses_nothing(cluster: Cluster) -> None:
    first, second = (api.url.replace("http", "ws") for api in cluster.apis)
    user = f"ws-{uuid.uuid4().hex[:6]}"
    with connect(f"{first}/v1/events?user_id={user}") as reference:
        jobs = [cluster.submit(api=i % 2, prompt=f"ws {i}", user_id=user, steps=3,
                               max_user_queue_size=50)["id"] for i in range(20)]  # fmt: skip
        part: list[dict[str, Any]] = []
        with connect(f"{first}/v1/events?user_id={user}&after=0") as client:
            while len(part) < 25:  # then the connection drops
                part.append(json.loads(client.recv(timeout=20)))
        ended = {e["job_id"] for e in part if e["type"] in FINAL}
        # events go on meanwhile: one more job ends while this client is away
        cluster.wait_until(next(j for j in jobs if j not in ended), "succeeded")
        resume = f"{second}/v1/events?user_id={user}&after={part[-1]['id']}"
        rest = _until_final(resume, [j for j in jobs if j not in ended])
        expected = _until_final(reference, jobs)
    assert [e["id"] for e in part + rest] == [e["id"] for e in expected]
    assert Counter(e["type"] for e in expected)["succeeded"] == 20


def _wait_for(condition: Callable[[], bool], what: str, timeout: float = 30) -> None:
    """Until ``condition()`` holds (it watches another thread's progress)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout:.0f}s for {what}")
        time.sleep(0.01)


def _until_final(source: Any, jobs: list[str]) -> list[dict[str, Any]]:
    pending, seen = set(jobs), list[dict[str, Any]]()
    with ExitStack() as stack:
        ws = stack.enter_context(connect(source)) if isinstance(source, str) else source
        while pending:
            try:
                event = json.loads(ws.recv(timeout=20))
            except TimeoutError:
                raise AssertionError(
                    f"{len(seen)} events, still waiting for {pending}: "
                    f"{Counter(e['type'] for e in seen)}"
                ) from None
            seen.append(event)
            if event["type"] in FINAL:
                pending.discard(event["job_id"])
    return seen


def test_redis_killed_and_restarted_with_aof_loses_no_accepted_job(tmp_path: Path) -> None:
    """Submissions keep coming while Redis is SIGKILLed and restarted from its AOF: every
    202 ends succeeded; meanwhile the API answers 503 store_unavailable, never hangs."""
    server = RedisServer(tmp_path / "redis", aof=True).start()
    cluster = Cluster(server.url, tmp_path, max_attempts=5)
    accepted: list[str] = []
    refused: Counter[str] = Counter()
    stop = threading.Event()
    try:
        api = cluster.start_api()
        cluster.start_worker("only")
        cluster.wait_for_workers(1)

        def submit_forever() -> None:
            with httpx.Client(timeout=10) as client:
                i = 0
                while not stop.is_set():
                    i += 1
                    body = {**SMALL, "prompt": f"aof {i} [sleep:0.01]", "steps": 3,
                            "max_user_queue_size": 1000}  # fmt: skip
                    try:
                        response = client.post(f"{api.url}/v1/jobs", json=body)
                    except httpx.TransportError as exc:
                        refused[type(exc).__name__] += 1
                        continue
                    if response.status_code == 202:
                        accepted.append(response.json()["id"])
                    else:
                        refused[response.json()["error"]["code"]] += 1
                    time.sleep(0.005)

        submitter = threading.Thread(target=submit_forever, daemon=True)
        submitter.start()
        _wait_for(lambda: len(accepted) >= 20, "submissions to flow")
        server.kill()
        began = time.monotonic()
        down = httpx.post(f"{api.url}/v1/jobs", json={**SMALL, "prompt": "down"}, timeout=10)
        assert down.status_code == 503 and down.json()["error"]["code"] == "store_unavailable"
        assert time.monotonic() - began < 3
        _wait_for(lambda: refused["store_unavailable"] >= 5, "submissions to be refused")
        before_restart = len(accepted)
        server.start()
        deadline = time.monotonic() + 20
        while len(accepted) < before_restart + 20 and time.monotonic() < deadline:
            time.sleep(0.1)  # the API recovered: submissions are accepted again
        stop.set()
        submitter.join()
        assert len(accepted) >= before_restart + 20 and refused["store_unavailable"] > 0
        runner, store = _open_store(server.url, cluster.prefix)
        try:
            deadline = time.monotonic() + 60
            while True:
                jobs = {j.id: j for j in runner.run(store.list_jobs(limit=100_000))}
                states = Counter(jobs[i].state if i in jobs else "lost" for i in accepted)
                if states[JobState.succeeded] == len(accepted) or time.monotonic() > deadline:
                    break
                time.sleep(0.2)
            assert states == {JobState.succeeded: len(accepted)}
        finally:
            runner.run(store.close())
            runner.close()
    finally:
        stop.set()
        cluster.close()
        server.stop()


def test_sigterm_stops_claiming_at_once_and_requeues_what_outlives_the_grace(
    redis_url: str, tmp_path: Path
) -> None:
    cluster = Cluster(redis_url, tmp_path)
    try:
        cluster.start_api()
        first = cluster.start_worker("first", EASEL_SHUTDOWN_GRACE_SECONDS="5")
        cluster.wait_for_workers(1)
        short = cluster.submit(prompt="short [sleep:0.05]", steps=10)  # 0.5 s: fits the grace
        cluster.wait_until(short["id"], "running")
        behind = cluster.submit(prompt="behind")
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=15) == 0
        done = cluster.get(f"/v1/jobs/{short['id']}")
        assert done["state"] == "succeeded" and done["attempts"] == 1
        waiting = cluster.get(f"/v1/jobs/{behind['id']}")
        assert waiting["state"] == "queued" and waiting["attempts"] == 0  # never claimed
        assert cluster.get("/v1/workers")["workers"] == []  # it left the registry

        second = cluster.start_worker("second", EASEL_SHUTDOWN_GRACE_SECONDS="0.5")
        assert cluster.wait_until(behind["id"], "succeeded")["attempts"] == 1
        long = cluster.submit(prompt="long [sleep:0.05]", steps=100)  # 5 s: outlives it
        running = cluster.wait_until(long["id"], "running")
        deadline = time.monotonic() + 10
        while True:  # the registry shows what it runs
            [listed] = cluster.get("/v1/workers")["workers"]
            if listed["current_jobs"] == [long["id"]] or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert listed["id"] == running["worker_id"] and listed["current_jobs"] == [long["id"]]
        assert listed["backend"] == "mock" and "txt2img" in listed["capabilities"]
        stopped_at = time.monotonic()
        second.send_signal(signal.SIGTERM)
        assert second.wait(timeout=15) == 0
        assert time.monotonic() - stopped_at < 5
        back = cluster.get(f"/v1/jobs/{long['id']}")
        assert back["state"] == "queued" and back["attempts"] == 0  # no attempt spent

        cluster.start_worker("third")
        final = cluster.wait_until(long["id"], "succeeded", timeout=30)
        assert final["attempts"] == 1
        assert cluster.runs("long [sleep:0.05]") == {"start": 2, "done": 1}
        assert cluster.succeeded_events()[long["id"]] == 1
    finally:
        cluster.close()


@pytest.mark.slow
@pytest.mark.timeout(400)  # 10,000 jobs through 8 processes: ~60 s on an idle 2-core machine
def test_eight_workers_claiming_ten_thousand_jobs_run_none_twice(
    redis_url: str, tmp_path: Path
) -> None:
    cluster = Cluster(redis_url, tmp_path)
    runner, store = _open_store(redis_url, cluster.prefix)
    try:

        async def enqueue_all() -> list[str]:
            async def one(i: int) -> str:
                request = GenerationRequest(
                    prompt=f"many {i} [noimage]", user_id=f"u{i % 50}", width=8, height=8, steps=1
                )
                job = await store.enqueue(Job(request=request, backend="mock"), user_cap=10_000)
                return job.id

            ids: list[str] = []
            for start in range(0, 10_000, 500):
                ids += await asyncio.gather(*(one(i) for i in range(start, start + 500)))
            return ids

        ids = runner.run(enqueue_all())
        # a lease of several heartbeats: what is tested is that no claim is ever shared, not
        # how a starved machine's late heartbeats lose leases (the SIGSTOP test does that)
        for i in range(8):
            cluster.start_worker(
                f"w{i}", EASEL_TEST_RUN_LOG=str(tmp_path / f"runs-{i}.log"),
                EASEL_LEASE_SECONDS=str(5 * HEARTBEAT),
            )  # fmt: skip
        deadline = time.monotonic() + 360
        while (stats := runner.run(store.stats())).queued + stats.running:
            assert time.monotonic() < deadline, stats
            time.sleep(0.5)
        jobs = runner.run(store.list_jobs(state=JobState.succeeded, limit=20_000))
        others = [runner.run(store.get(i)) for i in set(ids) - {job.id for job in jobs}]
        assert not others, [(job.state, job.error, job.runs) for job in others]
        assert len(jobs) == 10_000
        assert all(job.attempts == 1 for job in jobs)
        runs: Counter[str] = Counter()
        for i in range(8):
            runs.update(line.rsplit(" ", 1)[0] for line in
                        (tmp_path / f"runs-{i}.log").read_text().splitlines())  # fmt: skip
        assert len(runs) == 20_000 and set(runs.values()) == {1}  # start and done, once each
        busy = sum(1 for i in range(8) if (tmp_path / f"runs-{i}.log").stat().st_size)
        assert busy == 8
    finally:
        runner.run(store.close())
        runner.close()
        cluster.close()
