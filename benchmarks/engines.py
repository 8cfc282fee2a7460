"""What does a remote-engine backend add to a job? The same jobs, direct and through easel.

    python benchmarks/engines.py [--jobs 30] [--steps 10]

A peer ``easel serve`` (mock, no step delay) is the engine. The same small txt2img jobs
(64x64) run one after another:

- **direct**: the engine alone: its A1111 ``txt2img`` called straight from httpx;
- **automatic1111 / openai / drawthings**: submitted to an embedded easel whose one backend
  is that adapter, pointed at the peer (easel's queue + the adapter + the engine).

It prints the mean and p95 seconds per job and what the adapter adds to direct.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx
from tests.servers import easel_serve, free_port

from easel.backends import registry
from easel.config import Settings
from easel.jobs import GenerationRequest, JobState
from easel.runtime.facade import Runtime


async def direct(url: str, jobs: int, steps: int) -> list[float]:
    """The engine alone: the same A1111 call the adapter makes, straight from httpx."""
    times = []
    body = {"prompt": "bench", "width": 64, "height": 64, "steps": steps}
    async with httpx.AsyncClient(base_url=url, timeout=60) as http:
        for _ in range(jobs):
            began = time.perf_counter()
            answer = await http.post("/sdapi/v1/txt2img", json=body)
            assert answer.status_code == 200 and answer.json()["images"]
            times.append(time.perf_counter() - began)
    return times


async def through(
    kind: str, options: dict[str, object], data: Path, jobs: int, steps: int
) -> list[float]:
    backend = registry.create(kind, name=kind, **options)
    runtime = Runtime(Settings(data_dir=data / kind), backends={kind: backend})
    times = []
    async with runtime:
        for _ in range(jobs):
            began = time.perf_counter()
            view = await runtime.submit(
                GenerationRequest(prompt="bench", width=64, height=64, steps=steps)
            )
            job = await runtime.wait(view.id, timeout=60)
            assert job.state is JobState.succeeded, job.error
            times.append(time.perf_counter() - began)
    return times


def line(name: str, times: list[float], base: float | None) -> str:
    mean = statistics.fmean(times)
    p95 = sorted(times)[int(0.95 * (len(times) - 1))]
    extra = f"  +{(mean - base) * 1000:6.1f} ms vs direct" if base is not None else ""
    return f"  {name:14s} mean {mean * 1000:7.1f} ms  p95 {p95 * 1000:7.1f} ms{extra}"


async def main(jobs: int, steps: int) -> None:
    with tempfile.TemporaryDirectory() as folder:
        data = Path(folder)
        grpc_port = free_port()
        env = {"EASEL_MOCK_STEP_DELAY": "0"}
        args = ("--backend", "mock", "--grpc-port", str(grpc_port))
        (data / "peer").mkdir()
        with easel_serve(data / "peer" / "data", *args, env=env) as peer:
            base = await direct(peer.url, jobs, steps)
            rows = [("direct", base)]
            for kind, options in (
                ("automatic1111", {"url": peer.url, "poll_seconds": 0.05}),
                ("openai", {"url": f"{peer.url}/v1", "extensions": True}),
                ("drawthings", {"address": f"127.0.0.1:{grpc_port}"}),
            ):
                rows.append((kind, await through(kind, options, data, jobs, steps)))
    mean = statistics.fmean(base)
    print(
        f"remote engines: {jobs} jobs each, 64x64, {steps} mock steps, one at a time, "
        "peer easel on loopback"
    )
    for name, times in rows:
        print(line(name, times, None if name == "direct" else mean))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=30)
    parser.add_argument("--steps", type=int, default=10)
    options = parser.parse_args()
    asyncio.run(main(options.jobs, options.steps))
