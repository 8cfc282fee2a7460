"""Admission rate and mock end-to-end throughput of a real ``easel serve``.

    python benchmarks/throughput.py [--jobs 4000] [--connections 32]

Starts ``easel serve`` (mock backend, no step delay, its own temp data dir) on a free
loopback port and measures, in one run:

1. admission: durable submissions per second accepted by ``POST /v1/jobs`` with the API
   alone (``--concurrency 0``). Each 202 is sent only after SQLite committed the job
   (WAL, ``synchronous=FULL``). Measured with ``wrk`` when it is installed (a C load
   generator: ``apt-get install wrk``), and always with a Python one;
2. the same with one worker draining the queue meanwhile, and end to end: jobs per second
   from the first submission to the last ``succeeded`` event (64x64, 1 step: the server's
   own overhead, not a model's), with 1 and 4 workers.

The Python load generator speaks HTTP/1.1 over raw keep-alive sockets: an HTTP client
library costs more CPU per request than the server under test. On a 2-core machine it
still takes CPU from the server, which is why ``wrk`` is preferred.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import websockets


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def post_jobs(port: int, bodies: list[bytes], connections: int) -> list[float]:
    """Send every body over ``connections`` keep-alive sockets; returns per-request latency."""
    queue: asyncio.Queue[bytes] = asyncio.Queue()
    for body in bodies:
        queue.put_nowait(body)
    latencies: list[float] = []

    async def connection() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        while not queue.empty():
            body = queue.get_nowait()
            began = time.perf_counter()
            writer.write(
                b"POST /v1/jobs HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
                b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
            )
            status = await reader.readline()
            length = 0
            while (line := await reader.readline()) != b"\r\n":
                name, _, value = line.partition(b":")
                if name.lower() == b"content-length":
                    length = int(value)
            await reader.readexactly(length)
            if b" 202 " not in status:
                raise RuntimeError(f"submission refused: {status!r}")
            latencies.append(time.perf_counter() - began)
        writer.close()

    await asyncio.gather(*(connection() for _ in range(connections)))
    return latencies


async def measure(port: int, bodies: list[bytes], connections: int) -> dict[str, float]:
    """Admission and end-to-end rates with the worker draining the queue meanwhile."""
    jobs = len(bodies)
    async with websockets.connect(f"ws://127.0.0.1:{port}/v1/events", max_queue=None) as ws:

        async def count_done() -> float:
            done = 0
            while done < jobs:
                event = json.loads(await ws.recv())
                if event["type"] in ("succeeded", "failed"):
                    done += 1
            return time.perf_counter()

        counter = asyncio.create_task(count_done())
        began = time.perf_counter()
        await post_jobs(port, bodies, connections)
        admitted = time.perf_counter()
        finished = await asyncio.wait_for(counter, timeout=600)
    return {
        "admission_per_s": jobs / (admitted - began),
        "end_to_end_per_s": jobs / (finished - began),
    }


@contextmanager
def easel_serve(*args: str) -> Iterator[int]:
    """A real ``easel serve`` (mock backend, no step delay, temp data dir); yields its port."""
    data_dir = Path(tempfile.mkdtemp(prefix="easel-bench-"))
    port = free_port()
    easel = shutil.which("easel") or str(Path(sys.executable).with_name("easel"))
    env = {**os.environ, "EASEL_MOCK_STEP_DELAY": "0"}
    server = subprocess.Popen(
        [easel, "serve", "--port", str(port), "--data-dir", str(data_dir), *args],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                httpx.get(f"http://127.0.0.1:{port}/health").raise_for_status()
                break
            except httpx.HTTPError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise SystemExit("easel serve did not start") from None
                time.sleep(0.1)
        yield port
    finally:
        server.terminate()
        server.wait(timeout=30)
        shutil.rmtree(data_dir, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=4000)
    parser.add_argument("--connections", type=int, default=32)
    args = parser.parse_args()

    bodies = [
        json.dumps(
            {"prompt": f"job {i}", "width": 64, "height": 64, "steps": 1,
             "user_id": f"user{i % 100}", "max_user_queue_size": 1000}
        ).encode()
        for i in range(args.jobs)
    ]  # fmt: skip
    print(
        f"easel throughput: {args.jobs} jobs from 100 users, {args.connections} connections, "
        f"{os.cpu_count()} CPUs, SQLite WAL synchronous=FULL, load generator on the same CPUs"
    )
    if shutil.which("wrk"):
        with easel_serve("--concurrency", "0") as port:
            rate, p50, p99 = run_wrk(port, args.connections, seconds=8)
        print(f"  admission, API only, wrk     {rate:8.0f} jobs/s   p50 {p50} p99 {p99}")
    else:
        print("  admission, API only, wrk     (wrk not installed: apt-get install wrk)")
    with easel_serve("--concurrency", "0") as port:
        began = time.perf_counter()
        latencies = asyncio.run(post_jobs(port, bodies, args.connections))
        admission = args.jobs / (time.perf_counter() - began)
    latencies.sort()
    print(
        f"  admission, API only, Python  {admission:8.0f} jobs/s   "
        f"p50 {percentile(latencies, 50):.1f}ms p99 {percentile(latencies, 99):.1f}ms"
    )
    for workers in (1, 4):
        with easel_serve("--concurrency", str(workers)) as port:
            results = asyncio.run(measure(port, bodies, args.connections))
        print(
            f"  {workers} worker(s): admission {results['admission_per_s']:6.0f} jobs/s, "
            f"end to end (mock, 1 step) {results['end_to_end_per_s']:5.0f} jobs/s"
        )


_WRK_SCRIPT = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
local i = 0
request = function()
  i = i + 1
  local body = string.format('{"prompt":"job %d","width":64,"height":64,"steps":1,'
    .. '"user_id":"user%d","max_user_queue_size":1000}', i, i % 100)
  return wrk.format(nil, "/v1/jobs", nil, body)
end
done = function(summary, latency, requests)
  io.write(string.format("RESULT %d %d %.1f %.1f\\n", summary.requests, summary.duration,
    latency:percentile(50) / 1000, latency:percentile(99) / 1000))
  io.write(string.format("ERRORS %d\\n", summary.errors.status + summary.errors.connect))
end
"""


def run_wrk(port: int, connections: int, seconds: int) -> tuple[float, str, str]:
    """Durable submissions/s from wrk, and its p50/p99 latency."""
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write(_WRK_SCRIPT)
    output = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "-s", script.name,
         f"http://127.0.0.1:{port}"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    os.unlink(script.name)
    fields = dict(
        line.split(" ", 1) for line in output.splitlines() if line[:6] in ("RESULT", "ERRORS")
    )
    requests, micros, p50, p99 = fields["RESULT"].split()
    if int(fields["ERRORS"]) != 0:
        raise SystemExit(f"wrk saw {fields['ERRORS']} non-2xx answers or connection errors")
    return int(requests) / (int(micros) / 1e6), f"{p50}ms", f"{p99}ms"


def percentile(sorted_values: list[float], pct: float) -> float:
    return sorted_values[min(int(len(sorted_values) * pct / 100), len(sorted_values) - 1)] * 1000


if __name__ == "__main__":
    main()
