"""Who is working: live workers, what they serve and run, and how fresh their heartbeat is.

Every runtime beats for its own workers; ``GET /v1/workers`` lists them. Embedded, the
registry is a dict; scaled out, it is in Redis with Redis server time, so a heartbeat's
age is right whatever the clocks of the hosts, and a worker that stops beating (killed,
host lost) drops off the list after ``WORKER_TTL_BEATS`` missed beats.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod

from pydantic import BaseModel, Field
from redis import exceptions as redis_errors
from redis.asyncio import Redis

from easel import constants as keys
from easel.store.redis import connect, unavailable


class WorkerInfo(BaseModel):
    id: str
    backend: str
    models: list[str]
    capabilities: list[str]
    current_jobs: list[str] = Field(description="Ids of the jobs it runs now (a batch: several).")
    host: str
    pid: int
    started_at: float
    heartbeat_age_seconds: float | None = Field(
        default=None, description="Seconds since its last heartbeat."
    )
    kind: str = Field(default="", description="The backend's kind (mock, diffusers...).")
    tags: list[str] = Field(default_factory=list, description="The fleet file's tags.")
    loaded: list[str] = Field(default_factory=list, description="Models loaded now.")
    state: str = Field(default="up", description="Its breaker: up, down or probing.")
    speed: float | None = Field(default=None, description="Work units per second measured.")
    last_error: str | None = None


class WorkerRegistry(ABC):
    async def open(self) -> None:
        """Connect."""

    async def close(self) -> None:
        """Disconnect."""

    @abstractmethod
    async def beat(self, info: WorkerInfo, ttl: float) -> None:
        """Record a heartbeat; the worker is listed for ``ttl`` seconds unless it beats again."""

    @abstractmethod
    async def remove(self, worker_id: str) -> None:
        """A worker that stopped cleanly leaves the list at once."""

    @abstractmethod
    async def list(self) -> list[WorkerInfo]:
        """Live workers, by id."""


class LocalRegistry(WorkerRegistry):
    """The embedded registry: this process's workers."""

    def __init__(self) -> None:
        self._beats: dict[str, tuple[WorkerInfo, float, float]] = {}  # info, at, ttl

    async def beat(self, info: WorkerInfo, ttl: float) -> None:
        self._beats[info.id] = (info, time.monotonic(), ttl)

    async def remove(self, worker_id: str) -> None:
        self._beats.pop(worker_id, None)

    async def list(self) -> list[WorkerInfo]:
        now = time.monotonic()
        return [
            info.model_copy(update={"heartbeat_age_seconds": round(now - at, 3)})
            for info, at, ttl in sorted(self._beats.values(), key=lambda b: b[0].id)
            if now - at <= ttl
        ]


_BEAT = f"""
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local key = ARGV[1] .. '{keys.WORKER}' .. ARGV[2]
redis.call('HSET', key, 'info', ARGV[3], 'at', string.format('%.17g', now))
redis.call('PEXPIRE', key, math.floor(tonumber(ARGV[4]) * 1000))
redis.call('ZADD', ARGV[1] .. '{keys.WORKERS}', string.format('%.17g', now + ARGV[4]), ARGV[2])
"""

_LIST = f"""
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local workers = ARGV[1] .. '{keys.WORKERS}'
redis.call('ZREMRANGEBYSCORE', workers, '-inf', string.format('%.17g', now))
local out = {{}}
for _, id in ipairs(redis.call('ZRANGE', workers, 0, -1)) do
  local f = redis.call('HMGET', ARGV[1] .. '{keys.WORKER}' .. id, 'info', 'at')
  if f[1] then
    out[#out + 1] = f[1]
    out[#out + 1] = string.format('%.6f', now - tonumber(f[2]))
  end
end
return out
"""


class RedisRegistry(WorkerRegistry):
    def __init__(
        self,
        url: str,
        *,
        prefix: str = keys.DEFAULT_PREFIX,
        socket_timeout: float = keys.SOCKET_TIMEOUT_SECONDS,
    ) -> None:
        self.url = url
        self.prefix = prefix
        self.socket_timeout = socket_timeout
        self._redis: Redis | None = None

    async def open(self) -> None:
        self._redis = connect(self.url, socket_timeout=self.socket_timeout)
        self._beat = self._redis.register_script(_BEAT)
        self._list = self._redis.register_script(_LIST)

    async def close(self) -> None:
        if self._redis is not None:
            await self._redis.aclose()
            self._redis = None

    def _client(self) -> Redis:
        if self._redis is None:
            raise RuntimeError("the worker registry is not open")
        return self._redis

    async def beat(self, info: WorkerInfo, ttl: float) -> None:
        self._client()
        try:
            await self._beat(args=[self.prefix, info.id, info.model_dump_json(), repr(ttl)])
        except redis_errors.RedisError as exc:
            raise unavailable(exc, self.url) from exc

    async def remove(self, worker_id: str) -> None:
        client = self._client()
        try:
            async with client.pipeline(transaction=True) as pipe:
                pipe.zrem(self.prefix + keys.WORKERS, worker_id)
                pipe.delete(self.prefix + keys.WORKER + worker_id)
                await pipe.execute()
        except redis_errors.RedisError as exc:
            raise unavailable(exc, self.url) from exc

    async def list(self) -> list[WorkerInfo]:
        self._client()
        try:
            flat = await self._list(args=[self.prefix])
        except redis_errors.RedisError as exc:
            raise unavailable(exc, self.url) from exc
        return [
            WorkerInfo.model_validate_json(flat[i]).model_copy(
                update={"heartbeat_age_seconds": round(float(flat[i + 1]), 3)}
            )
            for i in range(0, len(flat), 2)
        ]
