"""``easel serve``'s HTTP server: uvicorn, with a shutdown bounded by the grace period.

uvicorn's own shutdown waits for every open request to end before the app hears of it,
and a client waiting on a job (an SSE or websocket subscriber, a request that waits for
its images) ends only when its job ends: SIGTERM could hang for as long as the queue
lasted. Here SIGTERM first drains the runtime (stop claiming; running jobs get
``shutdown_grace_seconds``, the rest go back to the queue unspent; every client's event
stream then ends, after its job's last event), and only then lets uvicorn close what is
left, cancelling stragglers after :data:`~easel.constants.SHUTDOWN_STRAGGLERS_SECONDS`.
"""

from __future__ import annotations

import socket
from typing import Any

import uvicorn
from fastapi import FastAPI

from easel.constants import SHUTDOWN_STRAGGLERS_SECONDS


class GracefulServer(uvicorn.Server):
    """A uvicorn server whose shutdown drains the app's runtime first."""

    def __init__(self, config: uvicorn.Config, app: FastAPI, grace: float) -> None:
        super().__init__(config)
        self.app = app
        self.grace = grace

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        for server in self.servers:
            server.close()  # no new connections while the jobs in hand finish
        runtime = getattr(self.app.state, "runtime", None)
        if runtime is not None:
            await runtime.drain(self.grace)
        await super().shutdown(sockets)


def run(app: FastAPI, *, grace: float, **options: Any) -> None:
    """Serve ``app`` until SIGTERM/SIGINT (``options`` as for ``uvicorn.Config``)."""
    config = uvicorn.Config(app, timeout_graceful_shutdown=SHUTDOWN_STRAGGLERS_SECONDS, **options)
    GracefulServer(config, app, grace).run()
