"""Clients of an easel server: :class:`AsyncClient` and the blocking :class:`Client` that
wraps it (``grpc``: Draw Things-style clients).

The client imports the vocabulary (``jobs``, ``errors``, ``views``), ``proto`` and
``results.metadata`` only: never a server module. ``easel.quick_generate``, which can also
run easel in this process, lives in ``easel.quick``, above both.
"""

from __future__ import annotations

from easel.client._async import AsyncClient
from easel.client._sync import Client

__all__ = ["AsyncClient", "Client"]
