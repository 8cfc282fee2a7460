"""The native API end to end: a real uvicorn server on loopback, real HTTP and websockets."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image
from websockets.sync.client import connect

from easel.config import Settings
from easel.results.metadata import parse_infotext

FINAL = {"succeeded", "failed", "cancelled"}
SMALL = {"width": 64, "height": 64, "steps": 3}


def submit(url: str, **fields: Any) -> dict[str, Any]:
    response = httpx.post(f"{url}/v1/jobs", json={**SMALL, **fields})
    assert response.status_code == 202, response.text
    body: dict[str, Any] = response.json()
    return body


def events_until_final(url: str, job_ids: set[str], after: int = 0) -> list[dict[str, Any]]:
    """Every event from ``after`` until each of ``job_ids`` has ended."""
    seen: list[dict[str, Any]] = []
    pending = set(job_ids)
    with connect(f"{url.replace('http', 'ws')}/v1/events?after={after}") as ws:
        while pending:
            event = json.loads(ws.recv(timeout=20))
            seen.append(event)
            if event["type"] in FINAL:
                pending.discard(event["job_id"])
    return seen


def hold_worker(url: str) -> str:
    """Occupy the only worker with a long job; returns its id once it is running."""
    blocker: str = submit(url, prompt="blocker", steps=150, user_id="blocker")["id"]
    with connect(f"{url.replace('http', 'ws')}/v1/events?job_id={blocker}") as ws:
        while json.loads(ws.recv(timeout=20))["type"] != "started":
            pass
    return blocker


def test_job_runs_end_to_end_with_events_in_order(server: str, settings: Settings) -> None:
    response = httpx.post(
        f"{server}/v1/jobs", json={"prompt": "a red fox", "negative_prompt": "blurry", **SMALL}
    )
    assert response.status_code == 202
    job = response.json()
    assert response.headers["location"] == f"/v1/jobs/{job['id']}"
    assert job["state"] == "queued" and job["position"] == 0
    seed = job["request"]["seed"]
    assert isinstance(seed, int)  # random when absent, and recorded

    events = [e for e in events_until_final(server, {job["id"]}) if e["job_id"] == job["id"]]
    assert [(e["type"], e.get("step")) for e in events] == [
        ("queued", None), ("started", None),
        ("progress", 1), ("progress", 2), ("progress", 3),
        ("succeeded", None),
    ]  # fmt: skip
    assert all(e["total"] == 3 for e in events if e["type"] == "progress")
    assert [e["id"] for e in events] == sorted(e["id"] for e in events)

    done = httpx.get(f"{server}/v1/jobs/{job['id']}").json()
    assert done["state"] == "succeeded" and done["attempts"] == 1
    assert [(i["index"], i["seed"]) for i in done["images"]] == [(0, seed)]

    png = httpx.get(f"{server}/v1/jobs/{job['id']}/images/0")
    assert png.headers["content-type"] == "image/png"
    image = Image.open(io.BytesIO(png.content))
    assert image.size == (64, 64)
    params = parse_infotext(image.text["parameters"])  # type: ignore[attr-defined]
    assert params["prompt"] == "a red fox" and params["negative_prompt"] == "blurry"
    assert params["Seed"] == str(seed) and params["Steps"] == "3" and params["Size"] == "64x64"

    sidecar = settings.resolved_output_dir / Path(done["images"][0]["path"]).with_suffix(".json")
    meta = json.loads(sidecar.read_text())
    assert meta["seed"] == seed and meta["request"]["prompt"] == "a red fox"
    assert meta["job_id"] == job["id"]


def test_batch_gives_one_image_per_seed(server: str) -> None:
    job = submit(server, prompt="batch", batch_size=3, seed=41)
    events_until_final(server, {job["id"]})
    images = httpx.get(f"{server}/v1/jobs/{job['id']}").json()["images"]
    assert [i["seed"] for i in images] == [41, 42, 43]
    single = submit(server, prompt="batch", seed=42)
    events_until_final(server, {single["id"]})
    again = httpx.get(f"{server}/v1/jobs/{single['id']}/images/0").content
    second = httpx.get(f"{server}/v1/jobs/{job['id']}/images/1").content
    assert _pixels(again) == _pixels(second)  # image i of a batch is reproducible alone


def _pixels(png: bytes) -> bytes:
    return Image.open(io.BytesIO(png)).tobytes()


@pytest.mark.parametrize(
    ("body", "status", "code", "words"),
    [
        ({"prompt": "x", "width": 65}, 422, "invalid_request", "multiple of 8"),
        ({"prompt": "x", "width": 4096, "height": 4096}, 422, "invalid_request", "pixels"),
        ({"prompt": "x", "steps": 1000}, 422, "invalid_request", "steps"),
        ({"prompt": "x", "batch_size": 64}, 422, "invalid_request", "batch_size"),
        ({"prompt": ""}, 422, "invalid_request", "prompt"),
        ({"prompt": "x" * 5000}, 422, "invalid_request", "prompt"),
        ({"prompt": "x", "colour": "red"}, 422, "invalid_request", "colour"),
        ({"prompt": "x", "kind": "img2img"}, 422, "invalid_request", "init_image"),
        ({"prompt": "x", "init_image": "not base64!"}, 422, "invalid_request", "base64"),
        (
            {"prompt": "x", "init_image": base64.b64encode(b"GIF89a").decode()},
            422,
            "invalid_request",
            "not an image",
        ),
        ({"prompt": "x", "backend": "nope"}, 422, "invalid_request", "served backends"),
        ({"prompt": "x", "model": "nope"}, 404, "model_not_found", "served models"),
        ({"prompt": "x", "priority": 99}, 422, "invalid_request", "priority"),
    ],
)
def test_bad_requests_get_a_4xx_with_a_code_and_leave_no_job(
    server: str, body: dict[str, Any], status: int, code: str, words: str
) -> None:
    response = httpx.post(f"{server}/v1/jobs", json=body)
    assert response.status_code == status
    error = response.json()["error"]
    assert error["code"] == code and words in error["message"]
    assert httpx.get(f"{server}/v1/jobs").json()["jobs"] == []


def test_malformed_json_and_unknown_routes(server: str) -> None:
    bad = httpx.post(
        f"{server}/v1/jobs", content=b"{oops", headers={"content-type": "application/json"}
    )
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_json"
    missing = httpx.get(f"{server}/v1/jobs/does-not-exist")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "job_not_found"
    assert httpx.get(f"{server}/nowhere").json()["error"]["code"] == "not_found"


def test_img2img_with_an_init_image(server: str) -> None:
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), (255, 0, 0)).save(buffer, "PNG")
    init = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    job = submit(server, prompt="redder", init_image=init, strength=0.5)
    assert job["request"]["kind"] == "img2img"
    events_until_final(server, {job["id"]})
    assert httpx.get(f"{server}/v1/jobs/{job['id']}").json()["state"] == "succeeded"


def test_cancel_a_queued_job(slow_server: str) -> None:
    blocker = hold_worker(slow_server)
    queued = submit(slow_server, prompt="never runs")
    cancelled = httpx.delete(f"{slow_server}/v1/jobs/{queued['id']}")
    assert cancelled.status_code == 200 and cancelled.json()["state"] == "cancelled"
    httpx.delete(f"{slow_server}/v1/jobs/{blocker}")
    events = events_until_final(slow_server, {queued["id"], blocker})
    mine = [e["type"] for e in events if e["job_id"] == queued["id"]]
    assert mine == ["queued", "cancelled"]
    again = httpx.delete(f"{slow_server}/v1/jobs/{queued['id']}")
    assert again.status_code == 409 and again.json()["error"]["code"] == "job_finished"


def test_cancel_a_running_job_stops_it_without_a_result(slow_server: str) -> None:
    blocker = hold_worker(slow_server)
    assert httpx.delete(f"{slow_server}/v1/jobs/{blocker}").json()["state"] == "cancelled"
    events = events_until_final(slow_server, {blocker})
    types = [e["type"] for e in events if e["job_id"] == blocker]
    assert types[-1] == "cancelled" and "succeeded" not in types
    steps = [e["step"] for e in events if e["type"] == "progress"]
    assert max(steps) < 150  # stopped at a step boundary, not run to the end
    job = httpx.get(f"{slow_server}/v1/jobs/{blocker}").json()
    assert job["state"] == "cancelled" and job["images"] == []
    follow = submit(slow_server, prompt="next")  # the worker is free again
    events_until_final(slow_server, {follow["id"]}, after=events[-1]["id"])


def test_per_user_cap_is_429(slow_server: str) -> None:
    blocker = hold_worker(slow_server)
    submit(slow_server, prompt="one", user_id="alice", max_user_queue_size=2)
    submit(slow_server, prompt="two", user_id="alice", max_user_queue_size=2)
    refused = httpx.post(
        f"{slow_server}/v1/jobs",
        json={"prompt": "three", "user_id": "alice", "max_user_queue_size": 2, **SMALL},
    )
    assert refused.status_code == 429
    assert refused.json()["error"]["code"] == "user_queue_full"
    submit(slow_server, prompt="bob is fine", user_id="bob", max_user_queue_size=2)
    httpx.delete(f"{slow_server}/v1/jobs/{blocker}")


def test_priority_then_round_robin_order(slow_server: str) -> None:
    blocker = hold_worker(slow_server)
    ids = {}
    for name, user, extra in [
        ("a1", "alice", {}), ("a2", "alice", {}), ("a3", "alice", {}),
        ("b1", "bob", {}), ("vip", "carol", {"premium": True}),
    ]:  # fmt: skip
        ids[submit(slow_server, prompt=name, user_id=user, **extra)["id"]] = name
    positions = {name: httpx.get(f"{slow_server}/v1/jobs/{i}").json()["position"]
                 for i, name in ids.items()}  # fmt: skip
    assert positions == {"vip": 0, "a1": 1, "b1": 2, "a2": 3, "a3": 4}
    httpx.delete(f"{slow_server}/v1/jobs/{blocker}")
    events = events_until_final(slow_server, set(ids))
    started = [ids[e["job_id"]] for e in events if e["type"] == "started" and e["job_id"] in ids]
    assert started == ["vip", "a1", "b1", "a2", "a3"]


def test_a_failing_backend_fails_the_job_with_its_reason(server: str) -> None:
    job = submit(server, prompt="please [mock:fail]")
    events = events_until_final(server, {job["id"]})
    failed = [e for e in events if e["type"] == "failed"]
    assert failed and failed[0]["error"]["code"] == "mock_failure"
    record = httpx.get(f"{server}/v1/jobs/{job['id']}").json()
    assert record["state"] == "failed" and record["error"]["code"] == "mock_failure"


def test_events_filtered_by_user_and_resumed_after_an_id(server: str) -> None:
    alice = submit(server, prompt="a", user_id="alice")
    bob = submit(server, prompt="b", user_id="bob")
    everything = events_until_final(server, {alice["id"], bob["id"]})
    cut = everything[2]["id"]
    with connect(f"{server.replace('http', 'ws')}/v1/events?user_id=bob&after={cut}") as ws:
        rest: list[dict[str, Any]] = []
        while not rest or rest[-1]["type"] not in FINAL:
            rest.append(json.loads(ws.recv(timeout=10)))
    expected = [e["id"] for e in everything if e["user_id"] == "bob" and e["id"] > cut]
    assert [e["id"] for e in rest] == expected


def test_list_jobs_filters(server: str) -> None:
    first = submit(server, prompt="a", user_id="alice")
    second = submit(server, prompt="b", user_id="bob")
    events_until_final(server, {first["id"], second["id"]})
    listed = httpx.get(f"{server}/v1/jobs", params={"user_id": "alice"}).json()["jobs"]
    assert [j["id"] for j in listed] == [first["id"]]
    done = httpx.get(f"{server}/v1/jobs", params={"state": "succeeded"}).json()["jobs"]
    assert {j["id"] for j in done} == {first["id"], second["id"]}
    bad = httpx.get(f"{server}/v1/jobs", params={"state": "nope"})
    assert bad.status_code == 422 and bad.json()["error"]["code"] == "invalid_request"


def test_health_models_and_docs(server: str) -> None:
    assert httpx.get(f"{server}/health").json()["status"] == "healthy"
    models = httpx.get(f"{server}/v1/models").json()
    assert models["models"][0]["backend"] == "mock"
    assert "txt2img" in models["backends"][0]["capabilities"]
    assert httpx.get(f"{server}/docs").status_code == 200
    paths = httpx.get(f"{server}/openapi.json").json()["paths"]
    assert {"/v1/jobs", "/v1/jobs/{job_id}", "/v1/jobs/{job_id}/images/{index}", "/health"} <= set(
        paths
    )


def test_list_filters_pages_and_moves(tmp_path: Path) -> None:
    """API only (no workers): jobs stay queued, so they can be moved."""
    from easel.api import create_app
    from tests.servers import serve

    settings = Settings(data_dir=tmp_path / "data", backend="mock", concurrency=0)
    with serve(create_app(settings)) as url:
        made = [submit(url, prompt=f"{word} fox", user_id="u") for word in ("red", "blue", "red")]
        page = httpx.get(f"{url}/v1/jobs", params={"q": "Red", "limit": 1}).json()["jobs"]
        assert [j["id"] for j in page] == [made[2]["id"]]
        older = httpx.get(f"{url}/v1/jobs", params={"q": "red", "before": page[0]["id"]})
        assert [j["id"] for j in older.json()["jobs"]] == [made[0]["id"]]
        none = httpx.get(f"{url}/v1/jobs", params={"model": "other", "since": 0}).json()
        assert none["jobs"] == []
        moved = httpx.post(f"{url}/v1/jobs/{made[2]['id']}/move", json={"to": "front"})
        assert moved.status_code == 200 and moved.json()["position"] == 0
        line = httpx.get(f"{url}/v1/queue/jobs", params={"user_id": "u"}).json()["jobs"]
        assert [j["id"] for j in line] == [made[2]["id"], made[0]["id"], made[1]["id"]]
        assert [j["prompt"] for j in line] == ["red fox", "red fox", "blue fox"]
        httpx.delete(f"{url}/v1/jobs/{made[1]['id']}")
        refused = httpx.post(f"{url}/v1/jobs/{made[1]['id']}/move", json={"to": "back"})
        assert refused.status_code == 409 and refused.json()["error"]["code"] == "job_not_queued"
        bad = httpx.post(f"{url}/v1/jobs/{made[0]['id']}/move", json={"to": "middle"})
        assert bad.status_code == 422
