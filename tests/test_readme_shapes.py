"""Every deployment shape README.md shows, run as written: the commands are read from the
README itself, and only this machine's values are put in (a free port through
``EASEL_PORT``, the test's Redis address and folders, the tiny model for a real one).

``test_every_deployment_command_is_run_by_a_test`` keeps the list honest: a command added
to the README fails it until a test runs it.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.servers import easel_command, free_port

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
FLEET_DOC = ROOT / "docs" / "fleet.md"
QUICKSTART = ".venv/bin/easel serve"
MODEL_SERVE = "easel serve --model /path/to/stable-diffusion"
FLEET_SERVE = "easel serve --config easel.toml"
REDIS = "redis-server --appendonly yes --appendfsync always"
API_REPLICA = (
    "easel serve  --redis redis://10.0.0.5:6379/0 --concurrency 0 --data-dir /shared/easel"
)
DIFFUSERS_WORKER = (
    "easel worker --redis redis://10.0.0.5:6379/0 --backend diffusers --model /models/sdxl"
    " --data-dir /shared/easel"
)
FLEET_WORKER = "easel worker --redis URL --config easel.toml --only gpu0"
MIXED_SERVE = "easel serve --redis URL"

SHAPES = {
    QUICKSTART: "test_the_quickstart_server_runs_jobs",
    MODEL_SERVE: "test_a_server_of_a_model_folder_runs_it",
    FLEET_SERVE: "test_the_fleet_file_runs_in_one_process",
    REDIS: "test_a_fleet_file_worker_serves_api_replicas",
    API_REPLICA: "test_a_fleet_file_worker_serves_api_replicas",
    DIFFUSERS_WORKER: "test_the_readme_scale_out_commands_run_jobs",  # test_fleet_redis.py
    FLEET_WORKER: "test_a_fleet_file_worker_serves_api_replicas",
    MIXED_SERVE: "test_an_api_process_with_workers_on_redis_runs_jobs",
}
"""Each deployment command of the README -> the test that runs it as written."""

SMALL = {"prompt": "a lighthouse", "width": 64, "height": 64, "steps": 2}


def readme_commands() -> set[str]:
    """Lines of the README's bash blocks that start easel or Redis (backslash continuations
    joined, comments dropped), and inline `easel serve|worker ...` that name a deployment
    (``--redis``, ``--config``, ``--model``)."""
    text = README.read_text()
    found: set[str] = set()
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.DOTALL):
        for line in block.replace("\\\n", " ").splitlines():
            command = re.sub(r"\s+#.*$", "", line).strip()
            if re.match(r"(\.venv/bin/)?easel (serve|worker)|redis-server", command):
                found.add(command)
    prose = re.sub(r"```.*?```", "", text, flags=re.DOTALL)
    for span in re.findall(r"`([^`]+)`", prose):
        command = " ".join(span.split())
        if re.match(r"easel (serve|worker) .*--(redis|config|model) \S", command):
            found.add(command)
    return found


def _normal(command: str) -> str:
    return " ".join(command.split())


def test_every_deployment_command_is_run_by_a_test() -> None:
    shown = {_normal(command) for command in readme_commands()}
    covered = {_normal(command) for command in SHAPES}
    assert shown - covered == set(), "README commands no test runs"
    assert covered - shown == set(), "commands tested here that the README no longer shows"
    sources = "".join(path.read_text() for path in (ROOT / "tests").glob("test_*.py"))
    for test in set(SHAPES.values()):
        assert f"def {test}(" in sources, test


# -- running them ---------------------------------------------------------------------


def _words(command: str, **values: str) -> list[str]:
    """The command's words with this machine's values put in for the README's."""
    words = [values.get(word, word) for word in command.split()]
    if words[0] == ".venv/bin/easel":
        words[0] = easel_command()  # the venv the tests run in
    elif words[0] == "easel":
        words[0] = easel_command()
    return words


class Processes:
    def __init__(self, base: Path) -> None:
        self.base = base
        self.stack = ExitStack()
        self.started = 0

    def start(self, words: list[str], *, cwd: Path, env: dict[str, str] | None = None) -> None:
        self.started += 1
        log = self.stack.enter_context((self.base / f"{self.started}.log").open("wb"))
        process = subprocess.Popen(
            words, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}
        )

        def stop() -> None:
            if process.poll() is None:
                process.kill()
            process.wait()

        self.stack.callback(stop)

    def logs(self) -> str:
        return "\n".join(path.read_text(errors="replace") for path in self.base.glob("*.log"))


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[Processes]:
    (tmp_path / "logs").mkdir()
    running = Processes(tmp_path / "logs")
    with running.stack:
        yield running


def _until(
    check: Callable[[], Any], what: str, logs: Callable[[], str], timeout: float = 120
) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if value := check():
                return value
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}; logs:\n{logs()[-4000:]}")
        time.sleep(0.1)


def _runs_a_job(
    url: str, processes: Processes, *, timeout: float = 120, **body: Any
) -> dict[str, Any]:
    """Diffusers in a process (import, load) can take minutes on a loaded 2-core machine."""
    _until(
        lambda: httpx.get(f"{url}/health").status_code == 200,
        "no server",
        processes.logs,
        timeout=timeout,
    )
    response = httpx.post(f"{url}/v1/jobs", json={**SMALL, **body}, timeout=30)
    assert response.status_code == 202, response.text
    job_id = response.json()["id"]

    def final() -> dict[str, Any] | None:
        job: dict[str, Any] = httpx.get(f"{url}/v1/jobs/{job_id}").json()
        return job if job["state"] in {"succeeded", "failed", "cancelled"} else None

    job: dict[str, Any] = _until(final, f"job {job_id} did not end", processes.logs, timeout)
    assert job["state"] == "succeeded", job
    image = httpx.get(f"{url}/v1/jobs/{job_id}/images/0")
    assert image.status_code == 200 and image.content[:4] in {b"\x89PNG", b"RIFF"}
    return job


def _redis(processes: Processes, base: Path) -> str:
    """README's redis-server line, on a free loopback port in a folder of the test's."""
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    port = free_port()
    extra = ["--port", str(port), "--bind", "127.0.0.1", "--dir", str(base), "--save", ""]
    processes.start(_words(REDIS) + extra, cwd=base)
    url = f"redis://127.0.0.1:{port}/0"

    def answers() -> bool:
        import redis

        try:
            return bool(redis.Redis(port=port, socket_timeout=1).ping())
        except redis.exceptions.ConnectionError:
            return False

    _until(answers, "redis-server did not start", processes.logs, timeout=20)
    return url


def _fleet_folder(base: Path, tiny_model_dir: Path) -> Path:
    """docs/fleet.md's easel.toml, as written, in a folder whose models/ holds the tiny model."""
    blocks = re.findall(r"```toml\n(.*?)```", FLEET_DOC.read_text(), flags=re.DOTALL)
    (base / "easel.toml").write_text(blocks[0])
    (base / "models").mkdir()
    shutil.copytree(tiny_model_dir, base / "models" / tiny_model_dir.name)
    return base


@pytest.mark.slow
def test_the_quickstart_server_runs_jobs(tmp_path: Path, processes: Processes) -> None:
    """``.venv/bin/easel serve`` in an empty folder: the mock, said in its first log line."""
    port = free_port()
    processes.start(_words(QUICKSTART), cwd=tmp_path, env={"EASEL_PORT": str(port)})
    _runs_a_job(f"http://127.0.0.1:{port}", processes)
    assert "serving backend 'mock'" in processes.logs().splitlines()[0]
    assert (tmp_path / "easel-data").is_dir()  # the default data dir, where it was started


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_a_server_of_a_model_folder_runs_it(
    tmp_path: Path, processes: Processes, tiny_model_dir: Path
) -> None:
    port = free_port()
    words = _words(MODEL_SERVE, **{"/path/to/stable-diffusion": str(tiny_model_dir)})
    processes.start(words, cwd=tmp_path, env={"EASEL_PORT": str(port)})
    job = _runs_a_job(f"http://127.0.0.1:{port}", processes, timeout=300)
    assert job["backend"] == "diffusers"


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_the_fleet_file_runs_in_one_process(
    tmp_path: Path, processes: Processes, tiny_model_dir: Path
) -> None:
    """docs/fleet.md's file (port 8000 in it; ``EASEL_PORT`` wins, as documented)."""
    folder = _fleet_folder(tmp_path, tiny_model_dir)
    port = free_port()
    processes.start(_words(FLEET_SERVE), cwd=folder, env={"EASEL_PORT": str(port)})
    url = f"http://127.0.0.1:{port}"
    assert _runs_a_job(url, processes, backend="preview")["backend"] == "preview"
    assert _runs_a_job(url, processes, timeout=300, backend="gpu0")["backend"] == "gpu0"


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_a_fleet_file_worker_serves_api_replicas(
    tmp_path: Path, processes: Processes, tiny_model_dir: Path
) -> None:
    """Redis as the README starts it, an API replica with no fleet file, and a worker
    running the fleet file's ``gpu0`` (a diffusers backend over ``models/``)."""
    folder = _fleet_folder(tmp_path, tiny_model_dir)
    url = _redis(processes, tmp_path)
    port = free_port()
    shared = {"redis://10.0.0.5:6379/0": url, "/shared/easel": str(folder / "easel-data")}
    processes.start(_words(API_REPLICA, **shared), cwd=folder, env={"EASEL_PORT": str(port)})
    processes.start(_words(FLEET_WORKER, URL=url), cwd=folder)
    api = f"http://127.0.0.1:{port}"
    _until(
        lambda: httpx.get(f"{api}/v1/workers").json()["workers"],
        "no worker registered",
        processes.logs,
        timeout=300,
    )
    assert _runs_a_job(api, processes, timeout=300)["backend"] == "gpu0"


@pytest.mark.slow
def test_an_api_process_with_workers_on_redis_runs_jobs(
    tmp_path: Path, processes: Processes
) -> None:
    """``easel serve --redis URL``: the API process runs workers too (the mock here)."""
    url = _redis(processes, tmp_path)
    port = free_port()
    processes.start(_words(MIXED_SERVE, URL=url), cwd=tmp_path, env={"EASEL_PORT": str(port)})
    job = _runs_a_job(f"http://127.0.0.1:{port}", processes)
    assert job["backend"] == "mock" and job["worker_id"]


if __name__ == "__main__":  # print what the README shows, for a person checking the list
    print("\n".join(sorted(readme_commands())), file=sys.stdout)
