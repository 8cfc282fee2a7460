"""Backends: one module per engine, each declaring its capabilities (see ``base``)."""

from easel.backends.base import (
    Backend,
    Capability,
    GenerationResult,
    ModelInfo,
    RunContext,
    available,
    create,
    register,
)

__all__ = [
    "Backend",
    "Capability",
    "GenerationResult",
    "ModelInfo",
    "RunContext",
    "available",
    "create",
    "register",
]
