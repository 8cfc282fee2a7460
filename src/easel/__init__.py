"""easel: a self-hosted generation server. One fair queue, many backends, many clients."""

from __future__ import annotations

__version__ = "0.1.0"

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
    if name in {"AsyncClient", "Client", "quick_generate"}:
        from easel import client

        return getattr(client, name)
    raise AttributeError(f"module 'easel' has no attribute {name!r}")
