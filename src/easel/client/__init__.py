"""Clients of an easel server: :class:`AsyncClient`, the blocking :class:`Client` that wraps
it, and :func:`quick_generate` (which can also run easel in this process, no server)."""

from __future__ import annotations

from easel.client._async import AsyncClient
from easel.client._quick import quick_generate
from easel.client._sync import Client

__all__ = ["AsyncClient", "Client", "quick_generate"]
