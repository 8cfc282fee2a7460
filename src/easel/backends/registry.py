"""Backend kinds by name: a table of easel's own, plus the ``easel.backends`` entry points.

A kind is built lazily from ``"module:attribute"`` so that naming the table costs no
import (the diffusers kind pulls in torch only when it is built). Third-party packages add
kinds with an entry point in the ``easel.backends`` group; a kind listed here wins.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from importlib.metadata import entry_points
from typing import Any

from easel.backends.base import Backend
from easel.errors import InvalidRequest

BackendFactory = Callable[..., Backend]

BUILTIN: dict[str, str] = {
    "mock": "easel.backends.mock:MockBackend",
    "mock-audio": "easel.backends.mock:MockAudioBackend",
    "diffusers": "easel.backends.diffusers.backend:create",
    "automatic1111": "easel.backends.automatic1111:Automatic1111Backend",
    "openai": "easel.backends.openai:OpenAIBackend",
    "comfyui": "easel.backends.comfyui:ComfyUIBackend",
    "hosted": "easel.backends.hosted:HostedBackend",
    "drawthings": "easel.backends.drawthings:DrawThingsBackend",
    "hibari": "easel.backends.audio.speech:HibariBackend",
    "diffusers-audio": "easel.backends.audio.sound:DiffusersAudioBackend",
    "tangoflux": "easel.backends.audio.tangoflux:TangoFluxBackend",
    "piper": "easel.backends.audio.piper:PiperBackend",
}
ENTRY_POINT_GROUP = "easel.backends"

_registered: dict[str, BackendFactory] = {}


def register(kind: str) -> Callable[[BackendFactory], BackendFactory]:
    """Decorator: add (or replace) a kind in this process, e.g. an embedding program's own."""

    def decorate(built: BackendFactory) -> BackendFactory:
        _registered[kind] = built
        return built

    return decorate


def kinds() -> dict[str, str]:
    """Every known kind -> where its factory lives."""
    found = {ep.name: ep.value for ep in entry_points(group=ENTRY_POINT_GROUP)}
    return found | BUILTIN | {kind: "" for kind in _registered}


def available() -> list[str]:
    return sorted(kinds())


def factory(kind: str) -> BackendFactory:
    if kind in _registered:
        return _registered[kind]
    try:
        target = kinds()[kind]
    except KeyError:
        raise InvalidRequest(
            f"unknown backend {kind!r}; available backends are: {', '.join(available())}"
        ) from None
    module, _, attribute = target.partition(":")
    built: BackendFactory = getattr(importlib.import_module(module), attribute)
    return built


def create(kind: str, **options: Any) -> Backend:
    """Build a backend by kind; options are the backend's own keyword arguments."""
    return factory(kind)(**options)
