"""``easel jobs|queue|health|backends|models``, ``--json`` and the exit codes (0 ok, 1 job
failed, 2 usage or config, 3 server unreachable): every command in-process through typer's
runner against a real server on loopback, and the failure paths a user meets first as real
processes (one line on stderr, never a traceback)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner, Result

from easel.cli import app
from easel.client import Client
from easel.config import Safety, Settings
from easel.jobs import JobState
from easel.tiny import TINY_FAMILIES
from tests.servers import free_port, serve

SMALL = ["--width", "64", "--height", "64", "--steps", "2"]
TOKEN = "cli-token-0123456789"


def easel(*args: str, env: dict[str, str] | None = None) -> Result:
    result = CliRunner().invoke(app, list(args), env=env)
    # a traceback would surface as an exception other than the exit typer raises
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    return result


def test_jobs_show_watch_list_and_json(server: str, tmp_path: Path) -> None:
    out = str(tmp_path)
    made = easel("generate", "a fox", *SMALL, "--url", server, "--output-dir", out, "--json")
    assert made.exit_code == 0, made.output
    report = json.loads(made.stdout)
    job_id = report["job_id"]
    assert report["state"] == "succeeded" and Path(report["files"][0]["file"]).is_file()

    shown = easel("jobs", "show", job_id, "--url", server)
    assert shown.exit_code == 0
    assert "state:     succeeded" in shown.stdout and "prompt:    a fox" in shown.stdout
    assert json.loads(easel("jobs", "show", job_id, "--url", server, "--json").stdout)["id"] == (
        job_id
    )
    listed = json.loads(easel("jobs", "list", "--url", server, "--json").stdout)
    assert job_id in [job["id"] for job in listed["jobs"]]

    watched = easel("jobs", "watch", job_id, "--url", server)
    assert watched.exit_code == 0 and "job 1 succeeded" in watched.stderr
    lines = easel("jobs", "watch", job_id, "--url", server, "--json").stdout.splitlines()
    assert json.loads(lines[-1])["type"] == "succeeded"
    assert all(json.loads(line)["job_id"] == job_id for line in lines)

    failed = easel(
        "generate", "[mock:fail]", *SMALL, "--url", server, "--output-dir", out, "--json"
    )
    assert failed.exit_code == 1
    failure = json.loads(failed.stdout)
    assert failure["state"] == "failed" and failure["error"]["code"] == "mock_failure"
    assert f"failed {failure['job_id']}: mock_failure" in failed.stderr
    watched_failure = easel("jobs", "watch", failure["job_id"], "--url", server)
    assert watched_failure.exit_code == 1 and "mock_failure" in watched_failure.stderr

    missing = easel("jobs", "show", "no-such-job", "--url", server)
    assert missing.exit_code == 2 and "job_not_found" in missing.stderr  # refused: 404


def test_health_backends_and_models_as_json(server: str) -> None:
    health = easel("health", "--url", server, "--json")
    assert health.exit_code == 0 and json.loads(health.stdout)["status"] == "healthy"
    assert easel("health", "--url", server).stdout.startswith("healthy: easel ")
    backends = json.loads(easel("backends", "--url", server, "--json").stdout)
    assert [b["name"] for b in backends["backends"]] == ["mock"]
    models = json.loads(easel("models", "list", "--url", server, "--json").stdout)
    assert {m["backend"] for m in models["models"]} == {"mock"}


def test_queue_shows_running_and_queued_jobs_and_cancel_ends_them(slow_server: str) -> None:
    with Client(slow_server, user_id="ann") as client:
        running = client.submit("the long one", steps=150, width=64, height=64)
        waiting = client.submit("the next one", steps=150, width=64, height=64)
        deadline = time.monotonic() + 30
        while client.get(running.id).state is JobState.queued:
            assert time.monotonic() < deadline, "the first job never started"
            time.sleep(0.05)  # no event to await from here: its record is polled

    queued = easel("queue", "--url", slow_server, "--user-id", "ann", "--json")
    assert queued.exit_code == 0, queued.output
    view = json.loads(queued.stdout)
    assert view["queue"]["running"] == 1 and view["queue"]["queued"] == 1
    states = {job["id"]: (job["state"], job["position"], job["prompt"]) for job in view["jobs"]}
    assert states[running.id][0] == "running"
    assert states[waiting.id] == ("queued", 0, "the next one")
    table = easel("queue", "--url", slow_server, "--user-id", "ann")
    assert "1 running, 1 queued" in table.stdout and waiting.id in table.stdout

    for job in (waiting, running):
        cancelled = easel("jobs", "cancel", job.id, "--url", slow_server, "--json")
        assert cancelled.exit_code == 0
        assert json.loads(cancelled.stdout)["job_id"] == job.id
    watched = easel("jobs", "watch", running.id, "--url", slow_server, "--json")
    assert watched.exit_code == 1  # cancelled is not succeeded
    assert json.loads(watched.stdout.splitlines()[-1])["type"] == "cancelled"
    empty = easel("queue", "--url", slow_server)
    assert "the queue is empty" in empty.stdout


@pytest.fixture
def token_server(tmp_path: Path) -> Iterator[str]:
    from easel.api import create_app

    settings = Settings(
        data_dir=tmp_path / "tokens",
        mock_step_delay=0.0,
        safety=Safety.model_validate({"tokens": [{"service": "cli", "token": TOKEN}]}),
    )
    with serve(create_app(settings)) as url:
        yield url


def test_token_from_the_option_or_easel_token(token_server: str) -> None:
    refused = easel("jobs", "list", "--url", token_server)
    assert refused.exit_code == 2 and "unauthorized" in refused.stderr  # a config error
    assert easel("jobs", "list", "--url", token_server, "--token", TOKEN).exit_code == 0
    assert easel("queue", "--url", token_server, env={"EASEL_TOKEN": TOKEN}).exit_code == 0


DOWN = ["--url", "http://127.0.0.1:{port}"]
UNREACHABLE = [
    ["health"],
    ["queue"],
    ["backends"],
    ["jobs", "list"],
    ["jobs", "show", "some-id"],
    ["jobs", "cancel", "some-id"],
    ["jobs", "watch", "some-id"],
    ["models", "list"],
    ["generate", "a fox", "--output-dir", "{tmp}"],
]


@pytest.mark.parametrize("command", UNREACHABLE, ids=lambda c: " ".join(c[:2]))
def test_an_unreachable_server_exits_3_with_one_line(command: list[str], tmp_path: Path) -> None:
    port = str(free_port())
    args = [a.replace("{tmp}", str(tmp_path)) for a in command]
    result = easel(*args, *(a.replace("{port}", port) for a in DOWN))
    assert result.exit_code == 3, result.output
    assert result.stdout == ""
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("error server_unreachable: ") and "easel serve" in line


USAGE = {
    "unknown state": (["jobs", "list", "--state", "bogus"], "bogus"),
    "audio and speech": (["generate", "x", "--audio", "--speech"], "not both"),
    "no tiny family": (["models", "make-tiny", "{tmp}/m", "--family", "nope"], "stable-audio"),
    "no project": (["project", "run"], "give a project folder"),
    "missing job id": (["jobs", "show"], "JOB_ID"),
    "queue limit": (["queue", "--limit", "0"], "--limit"),
    "worker without redis": (["worker"], "--redis"),
}


@pytest.mark.parametrize("case", USAGE)
def test_usage_errors_exit_2(case: str, tmp_path: Path) -> None:
    args, expected = USAGE[case]
    result = easel(*(a.replace("{tmp}", str(tmp_path)) for a in args))
    assert result.exit_code == 2, result.output
    assert expected in result.output


# -- as real processes ----------------------------------------------------------------------


def _processes(*commands: list[str], env: dict[str, str]) -> list[subprocess.CompletedProcess[str]]:
    """Run the commands as ``python -m easel`` processes at once; their outcomes in order."""
    started = [
        subprocess.Popen(
            [sys.executable, "-m", "easel", *command],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for command in commands
    ]
    done = []
    for process, command in zip(started, commands, strict=True):
        stdout, stderr = process.communicate(timeout=110)
        done.append(subprocess.CompletedProcess(command, process.returncode, stdout, stderr))
    return done


@pytest.mark.slow
def test_failure_paths_as_processes_are_one_line_each(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("EASEL_", "TRANSFORMERS_"))}
    down = f"http://127.0.0.1:{free_port()}"
    health, watch, generate, tiny, model = _processes(
        ["health", "--url", down],
        ["jobs", "watch", "some-id", "--url", down, "--json"],
        ["generate", "a fox", "--url", down, "--output-dir", str(tmp_path)],
        ["models", "make-tiny", str(tmp_path / "m"), "--family", "nope"],
        ["serve", "--model", "/nonexistent", "--data-dir", str(tmp_path / "data")],
        env=env,
    )
    for result in (health, watch, generate):
        assert result.returncode == 3, result.stderr
        (line,) = result.stderr.strip().splitlines()
        assert f"could not talk to easel at {down}" in line and "`easel serve`" in line
    assert tiny.returncode == 2
    (line,) = tiny.stderr.strip().splitlines()
    assert line == (
        f"error invalid_request: unknown family 'nope'; families are: {', '.join(TINY_FAMILIES)}"
    )
    assert model.returncode == 2
    (line,) = model.stderr.strip().splitlines()
    assert "model '/nonexistent' does not exist" in line
    for result in (health, watch, generate, tiny, model):
        assert "Traceback" not in result.stderr and result.stdout == ""


@pytest.mark.slow
def test_easel_serve_logs_one_line_per_job_state_change(tmp_path: Path) -> None:
    """Two real ``easel serve`` processes, text and JSON logs; their stderr read back."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("EASEL_")}
    servers = []
    for log_format in ("text", "json"):
        port = free_port()
        with (tmp_path / f"{log_format}.log").open("w") as log:  # the child keeps its copy
            process = subprocess.Popen(
                [sys.executable, "-m", "easel", "serve", "--port", str(port), "--log-format",
                 log_format, "--data-dir", str(tmp_path / log_format),
                 "--mock-load-seconds", "0.01"],
                stdout=subprocess.DEVNULL, stderr=log, env=env,
            )  # fmt: skip
        servers.append((process, f"http://127.0.0.1:{port}", tmp_path / f"{log_format}.log"))
    try:
        jobs: dict[str, tuple[str, str]] = {}
        for process, url, log_path in servers:
            _until_healthy(process, url, log_path)
            with Client(url, user_id="ann") as client:
                done = client.generate("a fox", width=64, height=64, steps=2)
                broken = client.generate("[mock:fail]", width=64, height=64, steps=2)
            jobs[url] = (done.id, broken.id)
    finally:
        for process, _, _ in servers:
            process.terminate()
            process.wait(timeout=30)
    (_, text_url, text_log), (_, json_url, json_log) = servers
    ok, failed = jobs[text_url]
    text = [line for line in text_log.read_text().splitlines() if "easel.jobs:" in line]
    assert [line.split(" (")[0] for line in text] == [
        f"INFO easel.jobs: job {ok} queued",
        f"INFO easel.jobs: job {ok} started",
        f"INFO easel.jobs: job {ok} succeeded",
        f"INFO easel.jobs: job {failed} queued",
        f"INFO easel.jobs: job {failed} started",
        f"INFO easel.jobs: job {failed} failed",
    ]
    assert text[0].endswith("(position 0)") or "(position 0, eta " in text[0]
    assert text[1].endswith("started (loading model mock)")  # the first job loads it
    assert text[2].endswith("succeeded (1 file)")
    assert text[4].endswith("started")  # in memory since
    assert text[5].endswith("failed (mock_failure: the mock backend was asked to fail)")
    assert "connection open" not in text_log.read_text()  # nor closed: jobs are logged
    ok, failed = jobs[json_url]
    records = [json.loads(line) for line in json_log.read_text().splitlines()]
    states = [
        (r["job_id"], r["message"].split()[2]) for r in records if r["logger"] == "easel.jobs"
    ]
    assert states == [
        (ok, "queued"), (ok, "started"), (ok, "succeeded"),
        (failed, "queued"), (failed, "started"), (failed, "failed"),
    ]  # fmt: skip
    assert all(r["user_id"] == "ann" for r in records if r["logger"] == "easel.jobs")


def _until_healthy(process: subprocess.Popen[bytes], url: str, log: Path) -> None:
    deadline = time.monotonic() + 60
    while True:
        assert process.poll() is None, log.read_text()
        try:
            if httpx.get(f"{url}/health").status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, "easel serve did not become healthy"
        time.sleep(0.1)  # a process starting has no event to await


@pytest.mark.slow
def test_generate_with_the_tiny_pipeline_prints_no_third_party_warnings(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """As a user runs it: no TRANSFORMERS_VERBOSITY, no warning filters of the test suite."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("EASEL_", "TRANSFORMERS_"))}
    env.pop("PYTHONWARNINGS", None)
    (result,) = _processes(
        ["generate", "a red fox", *SMALL, "--backend", "diffusers", "--model",
         str(tiny_model_dir), "--output-dir", str(tmp_path), "--data-dir", str(tmp_path / "d")],
        env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.split()) == 2  # the PNG and its sidecar
    for noise in ("torchvision", "Warning", "warn", "deprecated", "Traceback"):
        assert noise not in result.stderr, result.stderr


def test_ctrl_c_while_watching_exits_130_with_one_line(slow_server: str) -> None:
    with Client(slow_server) as client:
        job = client.submit("the long one", steps=150, width=64, height=64)
        watcher = subprocess.Popen(
            [sys.executable, "-m", "easel", "jobs", "watch", job.id, "--url", slow_server,
             "--json"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert watcher.stdout is not None
        first = json.loads(watcher.stdout.readline())  # it is following the job's events now
        assert first["job_id"] == job.id
        watcher.send_signal(signal.SIGINT)
        _, stderr = watcher.communicate(timeout=60)
        assert watcher.returncode == 130
        (line,) = stderr.strip().splitlines()
        assert line.startswith("interrupted; jobs already submitted to a server keep running")
        assert client.get(job.id).state is not JobState.cancelled  # only the watch ended
