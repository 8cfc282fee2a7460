"""Mock end-to-end jobs/s through Redis: easel and arq side by side, same Redis, same run.

    python benchmarks/redis_throughput.py [--jobs 2000] [--workers 1 4]

Starts one redis-server on a free loopback port with AOF ``appendfsync always`` (what
easel's README asks for durable 2xx), then for each worker count:

- **easel**: N ``easel worker --redis`` processes; jobs are submitted from this process
  through ``Runtime.submit`` (admission, the fair queue across 100 users, the ``queued``
  event: what ``POST /v1/jobs`` runs, minus HTTP), 32 at a time. Every job is leased,
  heartbeated if long, announced (queued, started, succeeded) and completed through Redis.
  Two backends: ``noop`` (defined here: returns at once, no image: the same no-op as
  arq's) and ``mock`` (8x8 px, 1 step, no delay: it also draws a PNG and writes it and
  its sidecar, each fsynced, and sends a progress event: easel's own end to end);
- **arq**: N arq worker processes running a no-op coroutine, jobs enqueued with
  ``ArqRedis.enqueue_job``, 32 at a time; ``poll_delay`` lowered from 0.5 s to 0.01 s,
  else a worker idles up to half a second between jobs.

Each side runs one job at a time per worker process (easel ``--concurrency 1``, arq
``max_jobs=1``: a GPU worker) and ten (``--concurrency 10``, arq's default
``max_jobs=10``).

Time runs from the first submission to the last job done (easel: the ``succeeded`` state
zset holds N; arq: its queue is empty, which it is only once every job finished).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from redis.asyncio import Redis


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def redis_server(directory: Path) -> Iterator[str]:
    port = free_port()
    server = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "yes", "--appendfsync", "always", "--dir", str(directory)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise SystemExit("redis-server did not start") from None
                time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        server.terminate()
        server.wait(timeout=30)


def start(command: list[str], env: dict[str, str]) -> list[subprocess.Popen[bytes]]:
    return [
        subprocess.Popen(command, env={**os.environ, **env},
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ]  # fmt: skip


def stop(processes: list[subprocess.Popen[bytes]]) -> None:
    for process in processes:
        process.send_signal(signal.SIGTERM)
    for process in processes:
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


async def wait_until(check: Callable[[], Awaitable[bool]], timeout: float = 600) -> float:
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise SystemExit("timed out")
        await asyncio.sleep(0.01)
    return time.perf_counter()


async def bounded(jobs: int, submit: Callable[[int], Awaitable[Any]], width: int = 32) -> None:
    limit = asyncio.Semaphore(width)

    async def one(i: int) -> None:
        async with limit:
            await submit(i)

    await asyncio.gather(*(one(i) for i in range(jobs)))


# -- easel --------------------------------------------------------------------------------


async def run_easel(
    url: str, workers: int, jobs: int, data: Path, backend: str, concurrency: int
) -> float:
    from easel.backends.registry import create
    from easel.config import Settings
    from easel.jobs import GenerationRequest
    from easel.runtime.facade import Runtime
    from easel.runtime.registry import RedisRegistry

    prefix = f"bench:{uuid.uuid4().hex[:8]}:"
    env = {"EASEL_REDIS_PREFIX": prefix, "EASEL_MOCK_STEP_DELAY": "0"}
    command = [sys.executable, __file__, "--easel-worker", "worker", "--redis", url,
               "--backend", backend, "--data-dir", str(data),
               "--concurrency", str(concurrency)]  # fmt: skip
    processes = [p for _ in range(workers) for p in start(command, env)]
    registry = RedisRegistry(url, prefix=prefix)
    await registry.open()
    settings = Settings(redis_url=url, redis_prefix=prefix, data_dir=data, backend=backend,
                        concurrency=0, max_user_queue_size=100_000,
                        max_user_queue_size_limit=100_000)  # fmt: skip
    runtime = Runtime(settings, backends={backend: create(backend)})
    await runtime.start(workers=False)
    client = Redis.from_url(url)
    try:
        await wait_until(lambda: _count(registry, workers * concurrency), timeout=60)

        async def submit(i: int) -> None:
            request = GenerationRequest(prompt=f"job {i}", user_id=f"user{i % 100}",
                                        width=8, height=8, steps=1)  # fmt: skip
            await runtime.submit(request)

        async def all_done() -> bool:
            return int(await client.zcard(prefix + "state:succeeded")) >= jobs

        began = time.perf_counter()
        await bounded(jobs, submit)
        finished = await wait_until(all_done)
    finally:
        stop(processes)
        await runtime.stop()
        await registry.close()
        await client.aclose()
    return jobs / (finished - began)


async def _count(registry: Any, workers: int) -> bool:
    return len(await registry.list()) >= workers


def register_noop() -> None:
    from easel.backends.base import Backend, Capability, GenerationResult, RunContext
    from easel.backends.registry import register
    from easel.jobs import GenerationRequest

    @register("noop")
    class NoopBackend(Backend):
        """The benchmark's job: nothing at all (no image, so nothing is written)."""

        name = "noop"
        capabilities = frozenset({Capability.txt2img, Capability.seed})

        def __init__(self, **_options: object) -> None:
            pass

        async def generate(
            self, request: GenerationRequest, context: RunContext
        ) -> GenerationResult:
            return GenerationResult(images=[], seeds=[])


# -- arq ----------------------------------------------------------------------------------


async def noop(ctx: dict[str, Any], i: int) -> None:
    """The job: nothing at all."""


def arq_worker(url: str, queue: str, max_jobs: int) -> None:
    """Runs in its own process (``--arq-worker``)."""
    from arq.connections import RedisSettings
    from arq.worker import Worker

    worker = Worker(
        functions=[noop], redis_settings=RedisSettings.from_dsn(url), queue_name=queue,
        max_jobs=max_jobs, poll_delay=0.01, keep_result=60, handle_signals=True,
    )  # fmt: skip
    worker.run()


async def run_arq(url: str, workers: int, jobs: int, max_jobs: int) -> float:
    from arq.connections import RedisSettings, create_pool

    queue = f"arq:bench:{uuid.uuid4().hex[:8]}"
    command = [sys.executable, __file__, "--arq-worker", url, queue, str(max_jobs)]
    processes = [p for _ in range(workers) for p in start(command, {})]
    pool = await create_pool(RedisSettings.from_dsn(url))
    try:
        await asyncio.sleep(3)  # the workers start (they announce nothing we could wait for)

        async def submit(i: int) -> None:
            await pool.enqueue_job("noop", i, _queue_name=queue)

        async def all_done() -> bool:
            return int(await pool.zcard(queue)) == 0

        began = time.perf_counter()
        await bounded(jobs, submit)
        finished = await wait_until(all_done)
    finally:
        stop(processes)
        await pool.aclose()
    return jobs / (finished - began)


def main() -> None:
    if len(sys.argv) == 5 and sys.argv[1] == "--arq-worker":
        arq_worker(sys.argv[2], sys.argv[3], int(sys.argv[4]))
        return
    register_noop()
    if len(sys.argv) > 1 and sys.argv[1] == "--easel-worker":
        from easel.cli import app

        app(sys.argv[2:])
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=2000)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 4])
    args = parser.parse_args()
    if shutil.which("redis-server") is None:
        raise SystemExit("redis-server is not installed: apt-get install redis-server")
    with tempfile.TemporaryDirectory(prefix="easel-redis-bench-") as tmp, \
            redis_server(Path(tmp)) as url:  # fmt: skip
        print(
            f"easel vs arq through one Redis (AOF appendfsync always), {args.jobs} jobs per "
            f"run, {os.cpu_count()} CPUs, submitter, workers and Redis on the same CPUs"
        )
        print("  worker processes x jobs at a time   easel no-op     arq no-op   easel/arq"
              "   easel mock (PNG + sidecar fsynced)")  # fmt: skip
        for workers in args.workers:
            for each in (1, 10):
                data = Path(tmp) / f"data{workers}-{each}"
                noop = asyncio.run(run_easel(url, workers, args.jobs, data, "noop", each))
                arq = asyncio.run(run_arq(url, workers, args.jobs, max_jobs=each))
                mock = asyncio.run(run_easel(url, workers, args.jobs, data, "mock", each))
                print(
                    f"  {workers} x {each:2d}{'':28}{noop:6.0f} jobs/s {arq:6.0f} jobs/s"
                    f"   {noop / arq:5.2f}   {mock:6.0f} jobs/s",
                    flush=True,
                )


if __name__ == "__main__":
    main()
