"""Real servers for tests: uvicorn on a free loopback port, in a thread of its own."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import uvicorn
from fastapi import FastAPI

from easel.api.limits import WebSocketProtocol


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextmanager
def serve(app: FastAPI) -> Iterator[str]:
    """Run ``app`` on 127.0.0.1:<free port> until the block ends; yields the base URL."""
    port = free_port()
    config = uvicorn.Config(
        app, host="127.0.0.1", port=port, log_level="warning", ws=WebSocketProtocol
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def run_job(server: str, body: dict[str, Any], timeout: float = 60) -> dict[str, Any]:
    """POST a job, follow its events (SSE) to the end, and return the final record."""
    with httpx.Client(base_url=server, timeout=timeout) as http:
        response = http.post("/v1/jobs", json=body)
        if response.status_code != 202:
            raise AssertionError(response.text)
        job_id = response.json()["id"]
        with http.stream("GET", f"/v1/jobs/{job_id}/events") as events:
            for line in events.iter_lines():
                if line.startswith("event: ") and line[7:] in {"succeeded", "failed", "cancelled"}:
                    break
        job: dict[str, Any] = http.get(f"/v1/jobs/{job_id}").json()
        return job


def easel_command() -> str:
    """The ``easel`` console script of the interpreter running the tests."""
    return str(Path(sys.executable).with_name("easel"))


@contextmanager
def easel_serve(
    data_dir: Path, *args: str, env: dict[str, str] | None = None, start_timeout: float = 30
) -> Iterator[Process]:
    """``easel serve`` as a real process on a free port; killed (not asked) at the end."""
    port = free_port()
    log = open(data_dir.parent / f"serve-{port}.log", "wb")  # noqa: SIM115
    process = subprocess.Popen(
        [easel_command(), "serve", "--port", str(port), "--data-dir", str(data_dir), *args],
        stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + start_timeout
    while True:
        try:
            if httpx.get(f"{url}/health").status_code == 200:
                break
        except httpx.TransportError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            process.wait()
            log.close()
            raise RuntimeError(Path(log.name).read_text())
        time.sleep(0.05)
    try:
        yield Process(process, url, Path(log.name))
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()
        log.close()


@dataclass
class Process:
    popen: subprocess.Popen[bytes]
    url: str
    log: Path
