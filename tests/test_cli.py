"""The ``easel`` command line, run in-process by typer's runner and once as a real script."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from PIL import Image
from typer.testing import CliRunner

from easel.cli import app
from tests.servers import free_port

SMALL = ["--width", "64", "--height", "64", "--steps", "2"]

runner = CliRunner()


def _written(output: str) -> list[Path]:
    """The paths ``easel generate`` printed, one a line."""
    return [Path(line) for line in output.splitlines() if line.endswith((".png", ".json"))]


def test_generate_embedded_writes_png_and_sidecar(tmp_path: Path) -> None:
    result = runner.invoke(
        app,
        [
            "generate",
            "a red fox",
            *SMALL,
            "--seed",
            "9",
            "--output-dir",
            str(tmp_path / "out"),
            "--data-dir",
            str(tmp_path / "data"),
        ],
    )
    assert result.exit_code == 0, result.output
    png, sidecar = _written(result.output)
    assert png.parent == tmp_path / "out"
    assert sidecar == png.with_suffix(".json")
    with Image.open(png) as image:
        assert image.size == (64, 64)
    metadata = json.loads(sidecar.read_text())
    assert metadata["seed"] == 9
    assert metadata["request"]["prompt"] == "a red fox"


def test_generate_via_a_server(server: str, tmp_path: Path) -> None:
    result = runner.invoke(
        app,
        [
            "generate",
            "a red fox",
            *SMALL,
            "--batch-size",
            "2",
            "--server",
            server,
            "--user-id",
            "cli",
            "--output-dir",
            str(tmp_path),
        ],
    )
    assert result.exit_code == 0, result.output
    written = _written(result.output)
    assert len(written) == 4
    assert all(path.is_file() and path.parent == tmp_path for path in written)
    assert json.loads(written[1].read_text())["request"]["user_id"] == "cli"


@pytest.mark.parametrize("where", ["embedded", "server"])
def test_a_refused_request_exits_2_with_its_code(where: str, server: str, tmp_path: Path) -> None:
    """A refusal is a usage error (exit 2), whether the server or embedded admission says no;
    only a job that ran and failed exits 1."""
    target = ["--server", server] if where == "server" else ["--data-dir", str(tmp_path / "d")]
    result = runner.invoke(
        app, ["generate", "a fox", "--width", "100", *target, "--output-dir", str(tmp_path)]
    )
    assert result.exit_code == 2
    assert "invalid_request" in result.output
    assert "multiple of 8" in result.output
    assert "Traceback" not in result.output
    out = ["--output-dir", str(tmp_path)]
    unknown = runner.invoke(app, ["generate", "a fox", *SMALL, "--model", "nope", *target, *out])
    assert unknown.exit_code == 2 and "model_not_found" in unknown.output


def test_a_failed_job_exits_1(server: str, tmp_path: Path) -> None:
    result = runner.invoke(
        app, ["generate", "[mock:fail]", *SMALL, "--server", server, "--output-dir", str(tmp_path)]
    )
    assert result.exit_code == 1
    assert "mock_failure" in result.output
    assert not list(tmp_path.glob("*.png"))


def test_jobs_and_models_commands(server: str, tmp_path: Path) -> None:
    generated = runner.invoke(
        app, ["generate", "a fox", *SMALL, "--server", server, "--output-dir", str(tmp_path)]
    )
    job_id = _written(generated.output)[0].stem.rsplit("-", 1)[0]

    listed = runner.invoke(app, ["jobs", "list", "--server", server])
    assert listed.exit_code == 0 and job_id in listed.output
    shown = runner.invoke(app, ["jobs", "get", job_id, "--server", server])
    assert shown.exit_code == 0
    assert json.loads(shown.output)["state"] == "succeeded"
    finished = runner.invoke(app, ["jobs", "cancel", job_id, "--server", server])
    assert finished.exit_code == 2 and "job_finished" in finished.output  # a refusal
    missing = runner.invoke(app, ["jobs", "get", "no-such-job", "--server", server])
    assert missing.exit_code == 2 and "job_not_found" in missing.output

    models = runner.invoke(app, ["models", "list", "--server", server])
    assert models.exit_code == 0 and "mock" in models.output


def test_models_make_tiny(tmp_path: Path) -> None:
    result = runner.invoke(app, ["models", "make-tiny", str(tmp_path / "tiny")])
    assert result.exit_code == 0, result.output
    assert Path(result.stdout.strip()) == tmp_path / "tiny"
    assert (tmp_path / "tiny" / "model_index.json").is_file()


def test_generate_with_a_diffusers_model(tiny_model_dir: Path, tmp_path: Path) -> None:
    result = runner.invoke(
        app,
        [
            "generate",
            "a red fox",
            "--backend",
            "diffusers",
            "--model",
            str(tiny_model_dir),
            *SMALL,
            "--output-dir",
            str(tmp_path),
            "--data-dir",
            str(tmp_path / "data"),
        ],
    )
    assert result.exit_code == 0, result.output
    png, sidecar = _written(result.output)
    with Image.open(png) as image:
        assert image.size == (64, 64)
    assert json.loads(sidecar.read_text())["backend"] == "diffusers"


def test_the_console_script_serves_and_generates(tmp_path: Path) -> None:
    easel = Path(sys.executable).with_name("easel")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {key: value for key, value in os.environ.items() if not key.startswith("EASEL_")}
    log_file = tmp_path / "serve.log"
    with log_file.open("wb") as log:
        server = subprocess.Popen(
            [easel, "serve", "--port", str(port), "--data-dir", str(tmp_path / "data")],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
    try:
        deadline = time.monotonic() + 30
        while True:
            assert server.poll() is None, log_file.read_text()
            try:
                if httpx.get(f"{url}/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "easel serve did not become healthy"
            time.sleep(0.1)
        first_line = log_file.read_text().splitlines()[0]
        assert "easel: serving backend 'mock'" in first_line

        generated = subprocess.run(
            [
                easel,
                "generate",
                "a red fox",
                *SMALL,
                "--server",
                url,
                "--output-dir",
                str(tmp_path / "out"),
            ],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
        )
        assert generated.returncode == 0, generated.stdout + generated.stderr
        png, sidecar = _written(generated.stdout)
        assert png.is_file() and sidecar.is_file()
    finally:
        server.terminate()
        returncode = server.wait(timeout=15)
    # uvicorn shuts down gracefully, then re-raises the signal it caught: -SIGTERM is clean
    assert returncode in {0, -signal.SIGTERM}, log_file.read_text()
    assert "Application shutdown complete" in log_file.read_text()


def test_help_shows_defaults_and_brackets() -> None:
    serve_help = CliRunner().invoke(app, ["serve", "--help"], env={"COLUMNS": "200"}).output
    generate_help = CliRunner().invoke(app, ["generate", "--help"], env={"COLUMNS": "200"}).output

    assert "[default: 127.0.0.1]" in serve_help
    assert "[default: 8000]" in serve_help
    assert "[[backends]]" in serve_help  # not eaten as markup
    assert "[default: outputs]" in generate_help
