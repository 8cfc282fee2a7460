"""``python -m tests.redis_worker worker --redis URL ...``: easel's own CLI, with the mock
backend swapped for a test-only subclass (registered under the same name, so the API
processes, which run the plain mock, admit its jobs). Prompt markers:

- ``[sleep:S]``: S seconds per step (a long job to kill or stop midway);
- ``[exit]``: the worker process dies the moment it starts the job (a poison job);
- ``[noimage]``: no image comes back, so nothing is written (queue throughput tests).

With ``EASEL_TEST_RUN_LOG`` set, every run appends ``start|done <prompt> <pid>`` to that
file (O_APPEND: lines from many processes do not interleave), so tests count runs.
"""

from __future__ import annotations

import os
import re

from easel.backends import mock
from easel.backends.base import GenerationResult, RunContext
from easel.backends.registry import register
from easel.jobs import GenerationRequest

_SLEEP = re.compile(r"\[sleep:([0-9.]+)\]")


def _log(what: str, requests: list[GenerationRequest]) -> None:
    path = os.environ.get("EASEL_TEST_RUN_LOG")
    if path:
        lines = "".join(f"{what} {r.prompt} {os.getpid()}\n" for r in requests)
        with open(path, "a") as log:
            log.write(lines)


class ScriptedMock(mock.MockBackend):
    def _generate(
        self, requests: list[GenerationRequest], contexts: list[RunContext]
    ) -> list[GenerationResult]:
        _log("start", requests)
        if any("[exit]" in r.prompt for r in requests):
            os._exit(3)  # a crash: no cleanup, no requeue, the lease is all that is left
        sleep = _SLEEP.search(requests[0].prompt)
        self.step_delay = float(sleep.group(1)) if sleep else 0.0
        if all("[noimage]" in r.prompt for r in requests):
            results = [GenerationResult(images=[], seeds=[]) for _ in requests]
        else:
            results = super()._generate(requests, contexts)
        _log("done", requests)
        return results


register("mock")(ScriptedMock)

if __name__ == "__main__":
    from easel.cli import app

    app()
