"""easel: a self-hosted generation server. One fair queue, many backends, many clients."""

from __future__ import annotations

from typing import TYPE_CHECKING

from easel.constants import VERSION as __version__
from easel.errors import EaselError
from easel.jobs import (
    Event,
    EventType,
    GenerationRequest,
    ImageRef,
    Job,
    JobKind,
    JobState,
    JobView,
)

if TYPE_CHECKING:  # imported on first use (below): the client pulls in httpx and websockets
    from easel.client import AsyncClient, Client
    from easel.quick import quick_generate

__all__ = [
    "AsyncClient",
    "Client",
    "EaselError",
    "Event",
    "EventType",
    "GenerationRequest",
    "ImageRef",
    "Job",
    "JobKind",
    "JobState",
    "JobView",
    "__version__",
    "quick_generate",
]


def __getattr__(name: str) -> object:
    # The client pulls in httpx and websockets: import it only when it is asked for.
    if name in {"AsyncClient", "Client"}:
        from easel import client

        return getattr(client, name)
    if name == "quick_generate":
        from easel import quick

        return quick.quick_generate
    raise AttributeError(f"module 'easel' has no attribute {name!r}")
