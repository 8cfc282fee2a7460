"""Durable job state behind one small interface (``base.JobStore``)."""

from easel.store.base import JobStore
from easel.store.sqlite import SqliteStore

__all__ = ["JobStore", "SqliteStore"]
