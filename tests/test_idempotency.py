"""``Idempotency-Key`` on job submission, over real HTTP."""

from __future__ import annotations

import httpx

JOB = {"prompt": "a red fox", "width": 64, "height": 64, "steps": 1}


def _submit(url: str, key: str, user: str) -> httpx.Response:
    return httpx.post(
        f"{url}/v1/jobs", json={**JOB, "user_id": user}, headers={"Idempotency-Key": key}
    )


def test_the_same_key_returns_the_same_job(server: str) -> None:
    first = _submit(server, "order-1", "alice")
    again = _submit(server, "order-1", "alice")
    assert first.status_code == again.status_code == 202
    assert again.json()["id"] == first.json()["id"]
    assert [job["id"] for job in httpx.get(f"{server}/v1/jobs").json()["jobs"]] == [
        first.json()["id"]
    ]


def test_keys_belong_to_their_user(server: str) -> None:
    alice = _submit(server, "order-1", "alice").json()["id"]
    bob = _submit(server, "order-1", "bob").json()["id"]
    other_key = _submit(server, "order-2", "alice").json()["id"]
    assert len({alice, bob, other_key}) == 3
    listed = httpx.get(f"{server}/v1/jobs").json()["jobs"]
    assert sorted(job["id"] for job in listed) == sorted([alice, bob, other_key])
