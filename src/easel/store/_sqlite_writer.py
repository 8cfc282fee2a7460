"""The embedded store's one writer: a thread that owns the SQLite connection.

Every call becomes one operation on that thread. It takes all operations waiting at once,
runs each in its own savepoint and commits them with one fsync: group commit, so durable
submissions scale with concurrency instead of being capped by the disk's fsync rate. An
operation that raises is rolled back alone; the others of its batch commit.
"""

from __future__ import annotations

import asyncio
import queue
import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from easel.errors import StoreUnavailable

T = TypeVar("T")
Op = Callable[[sqlite3.Connection], Any]
MAX_BATCH = 1024
"""Operations committed together at most."""


class Writer:
    """One connection on one thread; a batch of operations per transaction. ``setup``
    prepares the connection (pragmas, schema, functions) on that thread."""

    def __init__(self, path: Path, setup: Callable[[sqlite3.Connection], None]) -> None:
        self.path = path
        self._setup = setup
        self._ops: queue.SimpleQueue[tuple[Op, asyncio.Future[Any]] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        ready: queue.SimpleQueue[BaseException | None] = queue.SimpleQueue()
        self._thread = threading.Thread(
            target=self._serve, args=(ready,), name="easel-sqlite", daemon=True
        )
        self._thread.start()
        if (error := ready.get()) is not None:
            raise StoreUnavailable(f"cannot open the job database {self.path}: {error}")

    def stop(self) -> None:
        if self._thread is not None:
            self._ops.put(None)
            self._thread.join()
            self._thread = None

    async def run(self, op: Callable[[sqlite3.Connection], T]) -> T:
        if self._thread is None or self._loop is None:
            raise StoreUnavailable("the job store is closed")
        future: asyncio.Future[T] = self._loop.create_future()
        self._ops.put((op, future))
        return await future

    def _serve(self, ready: queue.SimpleQueue[BaseException | None]) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            self._setup(conn)
        except (sqlite3.Error, OSError) as exc:
            ready.put(exc)
            return
        ready.put(None)
        try:
            while (first := self._ops.get()) is not None:
                batch = [first]
                while len(batch) < MAX_BATCH:
                    try:
                        item = self._ops.get_nowait()
                    except queue.Empty:
                        break
                    if item is None:
                        self._ops.put(None)  # stop after this batch
                        break
                    batch.append(item)
                self._run_batch(conn, batch)
        finally:
            conn.close()

    def _run_batch(
        self, conn: sqlite3.Connection, batch: list[tuple[Op, asyncio.Future[Any]]]
    ) -> None:
        outcomes: list[tuple[asyncio.Future[Any], Any, BaseException | None]] = []
        try:
            conn.execute("BEGIN IMMEDIATE")
            for op, future in batch:
                conn.execute("SAVEPOINT op")
                try:
                    result = op(conn)
                except Exception as exc:
                    conn.execute("ROLLBACK TO op")
                    outcomes.append((future, None, exc))
                else:
                    outcomes.append((future, result, None))
                conn.execute("RELEASE op")
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            failure = StoreUnavailable(f"the job database failed: {exc}")
            outcomes = [(future, None, failure) for _, future in batch]
        for future, result, error in outcomes:
            future.get_loop().call_soon_threadsafe(_settle, future, result, error)


def _settle(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if future.cancelled():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
