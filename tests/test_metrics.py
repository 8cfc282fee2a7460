"""Prometheus metrics are labelled from the job record, so every replica labels alike."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import httpx

from easel.api import create_app
from easel.config import Settings
from tests.servers import serve


def _samples(url: str) -> dict[str, float]:
    text = httpx.get(f"{url}/metrics").text
    return {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line and not line.startswith("#")
    }


def test_a_job_submitted_through_another_replica_keeps_its_labels(
    tmp_path: Path, redis_url: str
) -> None:
    """Replica A runs the job that API-only replica B accepted: A labels it from the
    record (backend, model), never ``unknown``, and measures its wait and run too."""
    common = {"redis_url": redis_url, "redis_prefix": f"metrics:{uuid.uuid4().hex[:8]}:",
              "backend": "mock", "mock_step_delay": 0.0}  # fmt: skip
    first = Settings.model_validate({"data_dir": tmp_path / "a", "concurrency": 1, **common})
    second = Settings.model_validate({"data_dir": tmp_path / "b", "concurrency": 0, **common})
    finished = 'easel_jobs_finished_total{backend="mock",state="succeeded"}'
    with serve(create_app(first)) as a, serve(create_app(second)) as b:
        body = {"prompt": "a kite", "width": 64, "height": 64, "steps": 2}
        job_id = httpx.post(f"{b}/v1/jobs", json=body).json()["id"]
        deadline = time.monotonic() + 30
        while _samples(a).get(finished) != 1 or _samples(b).get(finished) != 1:
            assert time.monotonic() < deadline, (_samples(a), httpx.get(f"{b}/v1/jobs/{job_id}"))
            time.sleep(0.05)
        for samples in (_samples(a), _samples(b)):
            assert not any('backend="unknown"' in name for name in samples), samples
            assert samples['easel_job_run_seconds_count{backend="mock",model=""}'] == 1
            assert samples['easel_job_wait_seconds_count{backend="mock",model=""}'] == 1
