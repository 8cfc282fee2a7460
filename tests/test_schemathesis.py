"""schemathesis, over easel's own OpenAPI document, against a real server: no 5xx, ever,
and every answer as documented (status, content type, schema, headers).

It generates requests from every operation's schema (valid and invalid ones) and fails on
any server error. The streams (SSE) are left out: they answer by never ending.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from easel.api import create_app
from easel.config import Limits, Settings
from tests.servers import serve

CHECKS = (
    "not_a_server_error",
    "status_code_conformance",  # every status answered is documented (400, 422, ...)
    "content_type_conformance",
    "response_schema_conformance",
    "response_headers_conformance",
    "unsupported_method",  # an undeclared method: 405 with Allow
)
"""Left out: ``positive_data_acceptance``, since a schema-valid request may still exceed
the server's limits (pixels, steps: settings, not schema) or find no finished job."""


def test_no_request_gets_a_server_error(tmp_path: Path) -> None:
    settings = Settings(
        data_dir=tmp_path / "data",
        backend="mock",
        mock_step_delay=0.0,
        max_user_queue_size=1000,
        limits=Limits(max_pixels=256 * 256, max_steps=8, max_batch_size=2),
    )
    command = shutil.which("schemathesis") or str(Path(sys.executable).with_name("schemathesis"))
    with serve(create_app(settings)) as url:
        result = subprocess.run(
            [
                command, "run", f"{url}/openapi.json",
                "--checks", ",".join(CHECKS),
                "--max-examples", "25",
                "--exclude-path-regex", "events",
                "--request-timeout", "20",
                "--workers", "1",
                "--generation-deterministic",
                "--no-color",
            ],
            capture_output=True, text=True, timeout=600,
        )  # fmt: skip
    report = result.stdout[-4000:] + result.stderr[-2000:]
    assert result.returncode == 0, report
    cases = [line.strip() for line in report.splitlines() if line.strip().endswith("passed")]
    print(f"schemathesis: {cases[-1] if cases else report}")
    assert "500" not in [line.split()[0] for line in report.splitlines() if line.strip()]
