"""The error catalogue: every code round-trips through the HTTP API and the Python client.

The server is the real app on uvicorn with one extra route that raises the class named in
its path; the client is the real :class:`AsyncClient`. A code that came back as another
class (``rate_limited`` as ``QueueFull``, as it once did) fails here.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator

import httpx
import pytest

from easel import errors
from easel.api import create_app
from easel.client import AsyncClient
from easel.config import Settings
from easel.errors import CATALOGUE, ERRORS, EaselError, GenerationError, MockFailure
from easel.jobs import GenerationRequest, Job, JobError, JobState, job_error
from tests.servers import serve


@pytest.fixture(scope="module")
def raising(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    data = tmp_path_factory.mktemp("errors") / "data"
    app = create_app(Settings(data_dir=data, backend="mock", mock_step_delay=0.0))

    async def raise_code(code: str) -> None:
        raise ERRORS[code](f"a sentence about {code}", count=3)

    app.add_api_route("/test/raise/{code}", raise_code, methods=["GET"])
    with serve(app) as url:
        yield url


def test_the_catalogue_holds_every_class_once_and_draws_it() -> None:
    defined = {
        cls for cls in vars(errors).values() if inspect.isclass(cls) and issubclass(cls, EaselError)
    }
    assert set(CATALOGUE) == defined
    assert len(ERRORS) == len(CATALOGUE)  # no two classes share a code
    tree = errors.__doc__ or ""
    for cls in CATALOGUE:
        assert f"{cls.__name__} " in tree and f"{cls.status} {cls.code}" in tree, cls


async def test_every_code_round_trips_to_its_own_class(raising: str) -> None:
    async with AsyncClient(raising, retries=0) as client:
        for code, cls in ERRORS.items():
            answer = httpx.get(f"{raising}/test/raise/{code}")
            body = answer.json()["error"]
            assert (answer.status_code, body["code"]) == (cls.status, code)
            assert (body["message"], body["count"]) == (f"a sentence about {code}", 3)
            with pytest.raises(EaselError) as raised:
                await client._request("GET", f"/test/raise/{code}")
            assert type(raised.value) is cls, code
            assert (raised.value.code, raised.value.status) == (code, cls.status)
            assert raised.value.message == f"a sentence about {code}"
    print(f"{len(ERRORS)} codes round-tripped")


def test_an_unknown_code_keeps_its_code_and_the_class_of_its_status() -> None:
    exc = errors.error_for("brand_new_limit", "from a newer server", 429)
    assert isinstance(exc, errors.QueueFull)
    assert (exc.code, exc.status) == ("brand_new_limit", 429)


def test_a_failed_job_raises_the_class_of_its_code() -> None:
    request = GenerationRequest(prompt="x")
    for code, cls in ERRORS.items():
        job = Job(
            request=request,
            backend="mock",
            state=JobState.failed,
            error=JobError(code=code, message="m"),
        )
        assert type(job_error(job)) is cls
    job = Job(
        request=request,
        backend="mock",
        state=JobState.failed,
        error=JobError(code="odd", message="m"),
    )
    assert type(job_error(job)) is GenerationError and job_error(job).code == "odd"
    assert isinstance(
        job_error(Job(request=request, backend="mock", state=JobState.cancelled)), errors.Cancelled
    )


async def test_a_failed_job_through_the_client_is_its_class(raising: str) -> None:
    async with AsyncClient(raising, retries=0) as client:
        job = await client.generate(prompt="[mock:fail]", width=64, height=64, steps=1)
    assert job.state is JobState.failed
    assert type(job_error(job)) is MockFailure
