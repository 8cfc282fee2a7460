"""Real ``redis-server`` processes for tests, each on a free loopback port (never the system
service): started, killed and restarted over the same data directory."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import redis

from tests.servers import free_port


def redis_server_command() -> str | None:
    return shutil.which("redis-server")


class RedisServer:
    """One redis-server; ``aof=True`` runs it as easel's README asks (appendfsync always)."""

    def __init__(self, directory: Path, *, aof: bool = True) -> None:
        self.directory = directory
        self.aof = aof
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None
        directory.mkdir(parents=True, exist_ok=True)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        command = redis_server_command()
        if command is None:
            raise RuntimeError("redis-server is not installed: apt-get install redis-server")
        persistence = (
            ["--appendonly", "yes", "--appendfsync", "always"] if self.aof
            else ["--appendonly", "no"]
        )  # fmt: skip
        self.process = subprocess.Popen(
            [command, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--dir", str(self.directory), "--daemonize", "no", "--protected-mode", "yes",
             "--logfile", str(self.directory / "redis.log"), *persistence],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 10
        client = redis.Redis(port=self.port, socket_timeout=1)
        try:
            while True:
                try:
                    if client.ping():
                        return self
                except redis.exceptions.BusyLoadingError:
                    pass
                except redis.exceptions.ConnectionError:
                    if self.process.poll() is not None or time.monotonic() > deadline:
                        log = self.directory / "redis.log"
                        raise RuntimeError(log.read_text() if log.exists() else "no log") from None
                time.sleep(0.02)
        finally:
            client.close()

    def kill(self) -> None:
        """SIGKILL: no shutdown, no final save; only what the AOF has survives."""
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait()
        self.process = None

    def restart(self) -> RedisServer:
        self.kill()
        return self.start()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None
