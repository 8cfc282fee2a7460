"""The fleet file: easel.toml with [[backends]], validated before anything runs."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from easel.backends import available
from easel.backends.base import Capability
from easel.config import Settings
from easel.fleet import FleetFileError, fleet_of, load_settings, only

DOCS = Path(__file__).parent.parent / "docs"
CAPABILITIES = [capability.value for capability in Capability]


def _toml_block(markdown: Path) -> str:
    blocks = re.findall(r"```toml\n(.*?)```", markdown.read_text(), flags=re.DOTALL)
    assert blocks, f"no toml block in {markdown}"
    return str(blocks[0])


def _load(path: Path, **overrides: object) -> Settings:
    return load_settings(path, kinds=available(), capabilities=CAPABILITIES, **overrides)


def test_the_documented_fleet_file_loads(tmp_path: Path) -> None:
    path = tmp_path / "easel.toml"
    path.write_text(_toml_block(DOCS / "fleet.md"))
    settings = _load(path)
    preview, gpu = settings.backends
    assert (preview.name, preview.kind, preview.slots, preview.tags) == (
        "preview", "mock", 2, ["cheap"]
    )  # fmt: skip
    assert preview.options == {"step_delay": 0.01}
    assert gpu.kind == "diffusers" and gpu.speed == 2.0 and gpu.timeouts.job_seconds == 600
    assert gpu.breaker.failures == 3 and settings.routing.affinity_slack_seconds == 10
    assert settings.routing.balance_ratio == 16 and settings.routing.steal_ratio == 4
    assert fleet_of(settings) == settings.backends


def test_env_vars_and_options_win_over_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "easel.toml"
    path.write_text('port = 8100\nmax_attempts = 4\n[[backends]]\nname = "a"\nkind = "mock"\n')
    monkeypatch.setenv("EASEL_PORT", "8200")
    settings = _load(path, max_attempts=5)
    assert (settings.port, settings.max_attempts, settings.backends[0].name) == (8200, 5, "a")


def test_every_problem_is_named_with_its_key_path(tmp_path: Path) -> None:
    path = tmp_path / "easel.toml"
    path.write_text(
        "[[backends]]\nname = 'a'\nkind = 'mock'\nslots = 0\n"
        "[[backends]]\nname = 'a'\nkind = 'comfy'\ncapabilities = ['txt2img', 'fly']\n"
        "[[backends]]\nname = 'b c'\nkind = 'mock'\nspeeed = 2\n"
    )
    with pytest.raises(FleetFileError) as caught:
        _load(path)
    problems = caught.value.problems
    assert caught.value.path == path
    assert any(p.startswith("backends[0].slots: ") for p in problems)
    assert any(p.startswith("backends[2].name: ") for p in problems)
    assert any(p.startswith("backends[2].speeed: Extra inputs") for p in problems)
    # the cross-entry checks run once each entry is valid
    path.write_text(
        "[[backends]]\nname = 'a'\nkind = 'mock'\n"
        "[[backends]]\nname = 'a'\nkind = 'comfy'\ncapabilities = ['txt2img', 'fly']\n"
    )
    with pytest.raises(FleetFileError) as caught:
        _load(path)
    assert caught.value.problems == [
        "backends[1].name: 'a' is already the name of backends[0]; names must be unique",
        f"backends[1].kind: unknown kind 'comfy'; available kinds are: {', '.join(available())}",
        "backends[1].capabilities[1]: unknown capability 'fly'; known capabilities are: "
        + ", ".join(sorted(CAPABILITIES)),
    ]


def test_a_file_that_is_not_toml_or_not_there(tmp_path: Path) -> None:
    path = tmp_path / "easel.toml"
    path.write_text("[[backends]\n")
    with pytest.raises(FleetFileError, match="not valid TOML"):
        _load(path)
    with pytest.raises(FleetFileError, match="cannot read it"):
        _load(tmp_path / "missing.toml")


def test_single_backend_settings_are_a_one_entry_fleet() -> None:
    [mock] = fleet_of(Settings(mock_step_delay=0.5, concurrency=3))
    assert (mock.name, mock.kind, mock.slots) == ("mock", "mock", 3)
    assert mock.options["step_delay"] == 0.5
    [diffusers] = fleet_of(Settings(model="/models/sd"))
    assert diffusers.kind == "diffusers" and diffusers.options["model"] == "/models/sd"


def test_only_picks_entries_by_name(tmp_path: Path) -> None:
    path = tmp_path / "easel.toml"
    path.write_text("".join(f"[[backends]]\nname = '{n}'\nkind = 'mock'\n" for n in "abc"))
    specs = _load(path).backends
    assert [spec.name for spec in only(specs, ["c", "a"])] == ["a", "c"]
    with pytest.raises(FleetFileError, match="no backend named 'x'"):
        only(specs, ["x"])


def test_easel_serve_refuses_a_bad_file_without_a_traceback(tmp_path: Path) -> None:
    path = tmp_path / "easel.toml"
    path.write_text("[[backends]]\nname = 'gpu0'\nkind = 'comfy'\n")
    run = subprocess.run(
        [Path(sys.executable).with_name("easel"), "serve", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "EASEL_DATA_DIR": str(tmp_path / "data")},
    )
    assert run.returncode == 2
    assert f"config_invalid: {path}" in run.stderr
    assert "backends[0].kind: unknown kind 'comfy'" in run.stderr
    assert "Traceback" not in run.stderr
    assert not (tmp_path / "data").exists()  # refused before anything was touched


def test_the_documented_request_is_valid() -> None:
    import json

    from easel.jobs import GenerationRequest

    block = re.findall(r"```json\n(.*?)```", (DOCS / "fleet.md").read_text(), flags=re.DOTALL)
    request = GenerationRequest.model_validate(json.loads(block[0]))
    assert (request.backend, request.tags, request.fallback) == ("gpu0", ["gpu"], True)
