"""Sampler names: the one table reads every tool's spelling (A1111's whole list included),
and admission sends a sampler only to a backend that runs it.

The fleet tests put the packaged mock, restricted to Draw Things' samplers (a local engine
lacking "DPM fast", as diffusers does), beside an ``automatic1111`` backend whose engine is
a second ``easel serve`` speaking A1111's API (the session's peer, tests/conftest.py).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import webuiapi
from hypothesis import given
from hypothesis import strategies as st

from easel.api import create_app
from easel.backends import registry
from easel.backends.base import sampler_capabilities
from easel.backends.mock import MockBackend
from easel.config import Settings
from easel.errors import InvalidRequest, SamplerUnsupported
from easel.jobs import GenerationRequest, JobState
from easel.queue.admission import route_request
from easel.queue.routing import BackendView
from easel.runtime.facade import Runtime
from easel.samplers import (
    A1111_SAMPLERS,
    A1111_SCHEDULERS,
    DRAWTHINGS_SAMPLERS,
    SAMPLERS,
    SamplerName,
    Schedule,
    a1111_sampler,
    parse_sampler,
)
from tests._backends import DrawThingsSamplersMock
from tests.engines import run_job, runtime_with
from tests.servers import Process, serve

# A1111 1.10's own lists (modules/sd_samplers_kdiffusion.py, sd_samplers_timesteps.py,
# sd_schedulers.py), written out here so that the table cannot drift from them unseen.
A1111_110 = (
    "DPM++ 2M", "DPM++ SDE", "DPM++ 2M SDE", "DPM++ 2M SDE Heun", "DPM++ 2S a", "DPM++ 3M SDE",
    "Euler a", "Euler", "LMS", "Heun", "DPM2", "DPM2 a", "DPM fast", "DPM adaptive", "Restart",
    "DDIM", "DDIM CFG++", "PLMS", "UniPC", "LCM",
)  # fmt: skip
A1111_110_ALIASES = {
    "k_dpm_fast": "DPM fast",
    "k_dpm_ad": "DPM adaptive",
    "k_dpmpp_2s_a": "DPM++ 2S a",
    "restart": "Restart",
    "ddim_cfgpp": "DDIM CFG++",
    "k_dpmpp_3m_sde": "DPM++ 3M SDE",
    "k_euler_a": "Euler a",
    "dpmpp_2s_ancestral": "DPM++ 2S a",  # ComfyUI's
    "dpm_adaptive": "DPM adaptive",
}
A1111_110_SCHEDULE_TYPES = {
    "automatic": "Automatic", "uniform": "Uniform", "karras": "Karras",
    "exponential": "Exponential", "polyexponential": "Polyexponential",
    "sgm_uniform": "SGM Uniform", "kl_optimal": "KL Optimal",
    "align_your_steps": "Align Your Steps", "simple": "Simple", "normal": "Normal",
    "ddim": "DDIM", "beta": "Beta",
}  # fmt: skip
# Draw Things' ``SamplerType`` enum names (its schema), 0-19.
DRAWTHINGS_ENUM = (
    "DPMPP2MKarras", "EulerA", "DDIM", "PLMS", "DPMPPSDEKarras", "UniPC", "LCM",
    "EulerASubstep", "DPMPPSDESubstep", "TCD", "EulerATrailing", "DPMPPSDETrailing",
    "DPMPP2MAYS", "EulerAAYS", "DPMPPSDEAYS", "DPMPP2MTrailing", "DDIMTrailing",
    "UniPCTrailing", "UniPCAYS", "TCDTrailing",
)  # fmt: skip


def test_every_a1111_sampler_and_alias_parses() -> None:
    assert tuple(A1111_SAMPLERS) == A1111_110
    for name in A1111_110:
        parsed = parse_sampler(name)
        assert (parsed.name, parsed.schedule, parsed.in_a1111) == (name, None, True)
        assert parse_sampler(name.upper()).name == name
    for alias, name in A1111_110_ALIASES.items():
        assert parse_sampler(alias).name == name, alias
    assert parse_sampler("DPM++ 2S a Karras") == SamplerName("DPM++ 2S a", Schedule.karras)
    assert not parse_sampler("DPM++ 2S").in_a1111  # diffusers' singlestep, not A1111's
    assert not parse_sampler("Euler a Substep").in_a1111


def test_every_a1111_schedule_type_joins_a_sampler() -> None:
    assert dict(A1111_SCHEDULERS) == A1111_110_SCHEDULE_TYPES
    for name, label in A1111_110_SCHEDULE_TYPES.items():
        for spelling in (name, label):
            joined = a1111_sampler("DPM fast", spelling)
            assert joined is not None and parse_sampler(joined).sampler == "DPM fast"
    assert a1111_sampler("Euler", "kl_optimal") == "Euler KL Optimal"
    assert parse_sampler("Euler KL Optimal").a1111 == ("Euler", "KL Optimal")
    assert parse_sampler("euler_kl_optimal").comfyui == ("euler", "kl_optimal")
    assert a1111_sampler("DPM++ 2M", "polyexponential") == "DPM++ 2M Polyexponential"
    # A1111 clients send the schedule twice: in the name and as the scheduler
    assert a1111_sampler("UniPC Align Your Steps", "align_your_steps") == "UniPC AYS"
    assert a1111_sampler("DPM++ 2M Karras", "Karras") == "DPM++ 2M Karras"
    assert parse_sampler("UniPC AYS").a1111_label == "UniPC Align Your Steps"
    with pytest.raises(InvalidRequest, match="unknown schedule"):
        a1111_sampler("Euler", "wobbly")


def test_draw_things_enum_names_are_its_table_in_order() -> None:
    assert len(DRAWTHINGS_SAMPLERS) == len(DRAWTHINGS_ENUM) == 20
    for index, name in enumerate(DRAWTHINGS_ENUM):
        assert parse_sampler(name).drawthings == index, name


def _respell(text: str, case: int, separator: str) -> str:
    cased = (text, text.lower(), text.upper())[case]
    return cased.replace(" ", separator)


@given(
    sampler=st.sampled_from(SAMPLERS),
    schedule=st.sampled_from([None, *Schedule]),
    case=st.integers(0, 2),
    separator=st.sampled_from([" ", "_", "-", ""]),
)
def test_every_name_round_trips_in_any_spelling(
    sampler: str, schedule: Schedule | None, case: int, separator: str
) -> None:
    """sampler x schedule -> easel's name -> respelt (case, separators) -> the same name;
    and A1111's (sampler, schedule type) pair reads back to it where A1111 has one."""
    name = SamplerName(sampler, schedule)
    assert parse_sampler(_respell(name.name, case, separator)) == name
    a1111, schedule_type = name.a1111
    if name.in_a1111:
        assert a1111_sampler(a1111, schedule_type) == name.name
        assert parse_sampler(name.a1111_label) == name


# -- admission per backend ---------------------------------------------------------------


@pytest.fixture
def peer(engine_peer: tuple[Process, str]) -> Process:
    return engine_peer[0]


async def test_a_sampler_goes_only_to_a_backend_that_runs_it(peer: Process, tmp_path: Path) -> None:
    local = DrawThingsSamplersMock(name="local")
    a1111 = registry.create("automatic1111", name="a1111", url=peer.url)
    async with runtime_with(tmp_path, local, a1111) as runtime:
        ran = {}
        for name in ("DPM fast", "k_dpm_ad", "DPM++ SDE Substep"):
            request = GenerationRequest(
                prompt="x", width=64, height=64, steps=2, scheduler=name, user_id="routed"
            )
            job, _ = await run_job(runtime, request)
            assert job.state is JobState.succeeded, job.error
            ran[name] = job.backend
        named = GenerationRequest(prompt="x", scheduler="DPM fast", backend="local")
        with pytest.raises(SamplerUnsupported, match=r"local does not run sampler DPM fast \(it"):
            await runtime.submit(named)
    # A1111 has no Substep: that one ran here; the engine got A1111's own names
    assert ran == {"DPM fast": "a1111", "k_dpm_ad": "a1111", "DPM++ SDE Substep": "local"}
    jobs = httpx.get(f"{peer.url}/v1/jobs", params={"user_id": "routed"}).json()["jobs"]
    assert sorted(job["request"]["scheduler"] for job in jobs) == ["DPM adaptive", "DPM fast"]


async def test_a_sampler_no_backend_runs_is_refused_naming_what_they_run(
    tmp_path: Path,
) -> None:
    one, two = DrawThingsSamplersMock(name="one"), DrawThingsSamplersMock(name="two")
    async with runtime_with(tmp_path, one, two) as runtime:
        with pytest.raises(SamplerUnsupported) as refused:
            await runtime.submit(GenerationRequest(prompt="x", scheduler="DPM fast"))
        with pytest.raises(InvalidRequest, match="unknown sampler"):
            await runtime.submit(GenerationRequest(prompt="x", scheduler="Wobbly 3M"))
    assert refused.value.code == "sampler_unsupported" and refused.value.status == 422
    message = refused.value.message
    assert "one does not run sampler DPM fast (it runs: DDIM, DDIM Trailing" in message
    assert "two does not run sampler DPM fast" in message and "UniPC AYS" in message


@pytest.fixture
def picky_server(tmp_path: Path) -> Iterator[str]:
    """An A1111 door in front of the restricted mock alone."""
    runtime = Runtime(
        Settings(data_dir=tmp_path / "data"),
        backends={"local": DrawThingsSamplersMock(name="local")},
    )
    with serve(create_app(runtime=runtime)) as url:
        yield url


def _api(url: str) -> webuiapi.WebUIApi:
    host, port = url.removeprefix("http://").split(":")
    return webuiapi.WebUIApi(host=host, port=int(port))


def test_sdapi_refuses_a_sampler_no_backend_runs_as_a1111_does(picky_server: str) -> None:
    answer = httpx.post(
        f"{picky_server}/sdapi/v1/txt2img",
        json={"prompt": "x", "sampler_name": "DPM fast", "steps": 1},
    )
    assert answer.status_code == 404
    body = answer.json()
    assert set(body) == {"error", "detail", "body", "errors"}
    assert body["detail"].startswith("Sampler not found here: no backend of this fleet runs")
    assert "local does not run sampler DPM fast" in body["detail"]
    assert "Euler a" in body["detail"] and body["errors"] == f"404: {body['detail']}"
    api = _api(picky_server)
    with pytest.raises(RuntimeError, match="Sampler not found"):
        api.txt2img(prompt="x", sampler_name="DPM fast", steps=1)
    listed = api.util_get_sampler_names()
    assert "DPM fast" not in listed and {"Euler a", "UniPC", "DPM++ 2M", "DDIM"} <= set(listed)
    assert api.txt2img(prompt="x", sampler_name="UniPC", scheduler="sgm_uniform", steps=1).images


def test_sdapi_lists_and_runs_what_the_fleet_runs(peer: Process, tmp_path: Path) -> None:
    runtime = Runtime(
        Settings(data_dir=tmp_path / "data"),
        backends={
            "local": DrawThingsSamplersMock(name="local"),
            "a1111": registry.create("automatic1111", name="a1111", url=peer.url),
        },
    )
    with serve(create_app(runtime=runtime)) as url:
        api = _api(url)
        listed = httpx.get(f"{url}/sdapi/v1/samplers").json()
        result = api.txt2img(prompt="x", sampler_name="DPM fast", steps=2, width=64, height=64)
        schedulers = httpx.get(f"{url}/sdapi/v1/schedulers").json()
    names = [s["name"] for s in listed]
    assert names[: len(A1111_110)] == list(A1111_110)  # A1111's own, in its order
    assert {"k_dpm_fast"} == set(next(s for s in listed if s["name"] == "DPM fast")["aliases"])
    assert "TCD" in names  # the local one runs it
    assert len(result.images) == 1
    assert {s["name"]: s["label"] for s in schedulers} == A1111_110_SCHEDULE_TYPES


def test_routing_reads_the_samplers_workers_advertise() -> None:
    """An API-only replica knows other processes' backends only by what their workers
    advertise: a "DPM fast" job goes to one that lists it (or ``sampler:*``)."""
    skills = frozenset({"txt2img", "scheduler", "seed"})
    picky = DrawThingsSamplersMock(name="dt")
    dt = BackendView("dt", skills | sampler_capabilities(picky), outstanding=0.0)
    anything = BackendView("a1111", skills | sampler_capabilities(MockBackend()), outstanding=9)
    older = BackendView("older", skills)  # lists no sampler: not filtered by them
    assert sampler_capabilities(MockBackend()) == {"sampler:*"}
    assert len(sampler_capabilities(picky)) == len(DRAWTHINGS_SAMPLERS)
    fast = GenerationRequest(prompt="x", scheduler="k_dpm_fast")
    assert route_request(fast, [dt, anything], {}) == "a1111"
    assert route_request(GenerationRequest(prompt="x", scheduler="UniPC ays"), [dt], {}) == "dt"
    assert route_request(fast, [dt, older], {}) == "older"
    with pytest.raises(SamplerUnsupported, match=r"dt does not run sampler DPM fast \(it runs"):
        route_request(fast, [dt], {})


def test_the_mock_runs_every_sampler_easel_knows(tmp_path: Path) -> None:
    mock = MockBackend()
    assert mock.samplers() == list(SAMPLERS)
    mock.check(GenerationRequest(prompt="x", scheduler="DDIM CFG++"))
    with pytest.raises(InvalidRequest, match="unknown sampler"):
        mock.check(GenerationRequest(prompt="x", scheduler="Wobbly 3M"))
