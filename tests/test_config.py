"""Settings by the names users bring: knob aliases, unknown keys and variables refused with the
valid ones, devices checked at start (the console script, as a user runs it)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from easel.config import Settings, unknown_env_vars, valid_keys_at
from easel.errors import InvalidRequest
from easel.jobs import GenerationRequest


def test_enable_knobs_are_aliases_of_easels_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EASEL_DIFFUSERS__ENABLE_VAE_TILING", "true")
    settings = Settings.model_validate(
        {
            "diffusers": {
                "enable_attention_slicing": True,
                "enable_vae_slicing": True,
                "enable_model_cpu_offload": True,
                "enable_sequential_cpu_offload": False,
            }
        }
    )

    options = settings.diffusers
    assert (options.attention_slicing, options.vae_slicing, options.vae_tiling) == (
        True,
        True,
        True,
    )
    assert options.offload == "model"
    sequential = {"diffusers": {"enable_sequential_cpu_offload": True}}
    assert Settings.model_validate(sequential).diffusers.offload == "sequential"
    with pytest.raises(ValidationError, match="choose one"):
        Settings.model_validate(
            {"diffusers": {"enable_model_cpu_offload": True, "offload": "sequential"}}
        )


def test_unknown_keys_and_env_vars_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValidationError, match="extra_forbidden"):
        Settings.model_validate({"diffusers": {"enable_xformers": True}})
    assert "vae_tiling" in (valid_keys_at(("diffusers", "enable_xformers")) or [])
    assert "enable_vae_tiling" in (valid_keys_at(("diffusers", "x")) or [])
    assert "max_steps" in (valid_keys_at(("limits", "x")) or [])

    environ = {
        "EASEL_PORT": "1",
        "EASEL_DIFFUSERS__VAE_TILING": "1",
        "EASEL_DIFFUSERS__ENABLE_VAE_SLICING": "1",
        "EASEL_SERVER": "http://x",
        "EASEL_TEST_RUN_LOG": "x",
        "EASEL_PROT": "1",
        "EASEL_DIFFUSERS__VAE_TILLING": "1",
        "EASEL_LIMITS__MAX_STEPS__X": "1",
        "HOME": "/",
    }
    assert unknown_env_vars(environ) == [
        "EASEL_DIFFUSERS__VAE_TILLING",
        "EASEL_LIMITS__MAX_STEPS__X",
        "EASEL_PROT",
    ]
    monkeypatch.setenv("EASEL_PROT", "8001")
    with pytest.raises(ValidationError, match=r"EASEL_PROT: no such setting.*EASEL_PORT"):
        Settings()


def test_the_diffusers_server_scheduler_style_is_a_scheduler() -> None:
    karras = GenerationRequest.model_validate(
        {"prompt": "x", "scheduler_type": "dpmsolver++", "karras_sigmas": True}
    )
    plain = GenerationRequest.model_validate({"prompt": "x", "scheduler_type": "euler_a"})

    assert (karras.scheduler, plain.scheduler) == ("DPM++ 2M Karras", "Euler a")
    with pytest.raises(ValidationError, match="unknown sampler 'warp'"):
        GenerationRequest.model_validate({"prompt": "x", "scheduler_type": "warp"})


def _easel(
    *args: str, env: dict[str, str] | None = None, cwd: Path
) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("EASEL_")}
    return subprocess.run(
        [sys.executable, "-m", "easel", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**environ, **(env or {})},
        cwd=cwd,
        check=False,
    )


def test_serve_refuses_bad_settings_at_start_without_a_traceback(tmp_path: Path) -> None:
    config = tmp_path / "easel.toml"
    config.write_text("bogus_key = 1\n[diffusers]\nenable_vae_tiling = true\n")

    from_file = _easel("serve", "--config", str(config), cwd=tmp_path)
    from_env = _easel("serve", env={"EASEL_DIFFUSERS__ENABLE_XFORMERS": "1"}, cwd=tmp_path)
    device = _easel("serve", "--model", str(tmp_path), "--device", "cuda:7", cwd=tmp_path)

    assert from_file.returncode == 2, from_file.stderr
    assert (
        "bogus_key: Extra inputs are not permitted: unknown key; valid keys here: host, port"
        in from_file.stderr
    )
    assert from_env.returncode == 2
    assert (
        "diffusers.enable_xformers: Extra inputs are not permitted: unknown key" in from_env.stderr
    )
    assert "enable_vae_slicing" in from_env.stderr
    assert device.returncode == 2
    assert "device 'cuda:7' does not exist on this machine; it has: cpu" in " ".join(
        device.stderr.split()
    )
    for result in (from_file, from_env, device):
        assert "Traceback" not in result.stderr


def test_check_device_names_the_devices_that_exist() -> None:
    pytest.importorskip("torch")
    from easel.backends.diffusers.devices import available_devices, check_device

    assert check_device("cpu") == "cpu"
    assert check_device("auto") in available_devices()
    with pytest.raises(InvalidRequest, match="it has: cpu"):
        check_device("quantum")


def test_serve_names_a_missing_or_pickled_model_before_serving(tmp_path: Path) -> None:
    evil = tmp_path / "evil.ckpt"
    evil.write_bytes(b"\0" * 2_000_000)

    missing = _easel("serve", "--model", str(tmp_path / "nope"), cwd=tmp_path)
    pickled = _easel("serve", "--model", str(evil), cwd=tmp_path)

    assert missing.returncode == 2
    assert "does not exist; easel loads models from disk" in " ".join(missing.stderr.split())
    assert pickled.returncode == 2
    assert "evil.ckpt is a pickled checkpoint" in " ".join(pickled.stderr.split())
    assert "Traceback" not in missing.stderr + pickled.stderr
