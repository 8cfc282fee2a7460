"""The example bot in docs/bots.md runs, as written, against a real server."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import httpx

from easel.api import create_app
from easel.config import Settings
from tests.servers import serve

DOCS = Path(__file__).parent.parent / "docs"


def _python_block(markdown: Path) -> str:
    blocks = re.findall(r"```python\n(.*?)```", markdown.read_text(), flags=re.DOTALL)
    assert blocks, f"no python block in {markdown}"
    return str(blocks[0])


def test_the_bot_serves_many_users(tmp_path: Path) -> None:
    bot = tmp_path / "bot.py"
    bot.write_text(_python_block(DOCS / "bots.md"))
    # 4 steps of 50 ms: bob's first two jobs are still in the queue when his third arrives
    settings = Settings(data_dir=tmp_path / "data", mock_step_delay=0.05, backend="mock")
    with serve(create_app(settings)) as url:
        run = subprocess.run(
            [sys.executable, str(bot), "--server", url, "--out", str(tmp_path / "out")],
            capture_output=True,
            text=True,
            timeout=60,
        )
        jobs = httpx.get(f"{url}/v1/jobs").json()["jobs"]
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    by_user = {user: [line for line in lines if line.startswith(f"[{user}]")] for user in
               ("alice", "bob", "carol")}  # fmt: skip

    assert by_user["bob"].count("[bob] you already have 2 pictures in the works; wait for one") == 1
    assert sum("photo" in line for line in by_user["bob"]) == 2
    assert sum("photo" in line for line in by_user["alice"]) == 1
    assert "[alice] drawing..." in by_user["alice"]
    assert by_user["carol"][-1] == "[carol] that failed: the mock backend was asked to fail"

    photos = sorted(path.name for path in (tmp_path / "out").glob("*.png"))
    assert len(photos) == 3 and len(list((tmp_path / "out").glob("*.json"))) == 3
    assert {job["request"]["user_id"] for job in jobs} == {"chat:alice", "chat:bob", "chat:carol"}
    [alice] = [job for job in jobs if job["request"]["user_id"] == "chat:alice"]
    assert alice["request"]["priority"] == 10  # premium
    assert {job["request"]["priority"] for job in jobs if job is not alice} == {0}
