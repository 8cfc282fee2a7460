"""Prompt expansion against a loopback Ollama stand-in (tests/ollama_server.py), fitted with
CLIP's real BPE vocabulary (open-clip-torch's file)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from easel.projects.expand import (
    _open_clip_tokenizer,
    count_tokens,
    expand_prompt,
    fit_tokens,
    open_clip_vocab,
)
from easel.projects.files import OllamaSettings
from tests.ollama_server import OllamaStandIn
from tests.servers import serve
from tests.test_projects import CONFIG, PROMPTS, easel, make_project

LONG = (
    'Here is your prompt: "'
    + ", ".join(f"a breathtaking alpine lake number {n} under glowing auroras" for n in range(12))
    + '"'
)


@pytest.fixture(scope="module")
def clip() -> object:
    if open_clip_vocab() is None:
        pytest.fail("open-clip-torch is not installed (pip install --no-deps open-clip-torch)")
    return _open_clip_tokenizer()


@pytest.fixture
def ollama() -> Iterator[tuple[OllamaStandIn, str]]:
    stand_in = OllamaStandIn(LONG)
    with serve(stand_in.app) as url:
        yield stand_in, url
        stand_in.release()


def test_clip_vocabulary_is_the_real_one(clip: object) -> None:
    assert len(clip) == 49408  # type: ignore[arg-type]
    ids = clip("a photo of a cat", add_special_tokens=False)["input_ids"]  # type: ignore[operator]
    assert ids == [320, 1125, 539, 320, 2368]  # CLIP's own ids


def test_fitting_keeps_whole_words_within_75_tokens(clip: object) -> None:
    text = LONG.strip('"')
    fitted = fit_tokens(text, clip)  # type: ignore[arg-type]
    assert count_tokens(text, clip) > 75  # type: ignore[arg-type]
    assert count_tokens(fitted, clip) <= 75  # type: ignore[arg-type]
    next_word = text.split()[len(fitted.split())]
    assert count_tokens(f"{fitted} {next_word}", clip) > 75  # type: ignore[arg-type]
    assert text.startswith(fitted)
    assert fit_tokens("a red fox", clip) == "a red fox"  # type: ignore[arg-type]


@pytest.mark.parametrize("api", ["chat", "generate"])
def test_expansion_asks_ollama_and_fits_the_answer(
    api: str, ollama: tuple[OllamaStandIn, str], clip: object
) -> None:
    stand_in, url = ollama
    settings = OllamaSettings(
        server_url=url, model="llama2", system_message="You write prompts.",
        prompt="Write a prompt about:", api=api, fallback_prompt="a calm lake",
    )  # fmt: skip
    expansion = expand_prompt(settings, "mountains")
    assert expansion.source == "expanded"
    assert expansion.prompt.startswith("a breathtaking alpine lake number 0")
    assert count_tokens(expansion.prompt, clip) <= 75  # type: ignore[arg-type]
    assert expansion.details["cut"] is True
    path, body = stand_in.requests[-1]
    assert path == f"/api/{api}"
    if api == "chat":
        assert body["messages"] == [
            {"role": "system", "content": "You write prompts."},
            {"role": "user", "content": "Write a prompt about:\n\nmountains"},
        ]
    else:
        assert body["system"] == "You write prompts."
        assert body["prompt"] == "Write a prompt about:\n\nmountains"


def test_a_timeout_or_an_error_uses_the_fallback(ollama: tuple[OllamaStandIn, str]) -> None:
    _, url = ollama
    hanging = OllamaSettings(
        server_url=url, model="hang", prompt="Write a prompt", timeout=0.5,
        fallback_prompt="a calm lake",
    )  # fmt: skip
    timed_out = expand_prompt(hanging, "mountains")
    assert (timed_out.source, timed_out.prompt) == ("fallback", "a calm lake")
    assert timed_out.details["reason"] == "timed out"
    missing = expand_prompt(hanging.model_copy(update={"model": "nope"}), "mountains")
    assert missing.source == "fallback" and "not found" in missing.details["reason"]


def test_project_run_with_ollama_records_the_expansion(
    server: str, ollama: tuple[OllamaStandIn, str], tmp_path: Path
) -> None:
    _, url = ollama
    config = CONFIG.replace('"http://localhost:11434"', f'"{url}"')
    config = config.replace(
        "width: 512\n  height: 512\n  num_steps: 30", "width: 64\n  height: 64\n  num_steps: 2"
    )
    prompts = PROMPTS.replace("{width: 768, height: 512}", "{}")
    make_project(tmp_path, server, prompts=prompts, config=config)
    result = easel("project", "run", "project_name", "--all", "--ollama", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    metadata = next((tmp_path / "outputs").rglob("metadata/001.yaml"))
    record = yaml.safe_load(metadata.read_text())
    assert record["prompt_source"]["kind"] == "expanded"
    assert record["prompt"] == record["prompt_source"]["prompt"]
    assert record["prompt"].startswith("a breathtaking alpine lake")
    assert record["prompt_source"]["instruction"].endswith(
        "A beautiful mountain landscape with a lake and trees"
    )
    assert record["negative_prompt"] == "ugly, blurry, low quality"  # the set's own wins
