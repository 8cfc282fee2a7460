"""Backends: the engines a job runs on.

``base`` is the protocol every backend implements (capabilities, models, ``generate``);
``registry`` names the kinds (``mock``, ``diffusers``, entry points); one module or
subpackage per engine. Backends import the vocabulary only: never the queue, store,
runtime or API.
"""

from easel.backends.base import (
    Backend,
    Capability,
    GenerationResult,
    ModelInfo,
    RunContext,
)
from easel.backends.registry import available, create

__all__ = [
    "Backend",
    "Capability",
    "GenerationResult",
    "ModelInfo",
    "RunContext",
    "available",
    "create",
]
