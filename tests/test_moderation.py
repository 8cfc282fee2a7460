"""Moderation: deny-lists and an HTTP classifier, refusing before any GPU time."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi import FastAPI, Request

from easel.errors import ModerationUnavailable, PromptRejected
from easel.jobs import GenerationRequest
from easel.safety.moderation import DenyList, HttpClassifier, moderate
from tests.servers import free_port, serve


async def test_deny_list_words_are_whole_words_in_prompt_or_negative() -> None:
    deny = DenyList(words=["gore"], patterns=[r"\bminor(s)?\b"])
    assert (await deny.review(GenerationRequest(prompt="a gorgeous view"))).allowed
    refused = await deny.review(GenerationRequest(prompt="GORE everywhere"))
    assert not refused.allowed and "gore" in refused.reason.lower()
    negative = GenerationRequest(prompt="a cat", negative_prompt="no minors please")
    assert not (await deny.review(negative)).allowed
    with pytest.raises(PromptRejected) as rejected:
        await moderate(GenerationRequest(prompt="gore"), [deny])
    assert rejected.value.code == "prompt_rejected" and rejected.value.status == 422


@pytest.fixture
def classifier_url() -> Iterator[str]:
    """A real HTTP classification endpoint on loopback: flags prompts with 'dragon'."""
    app = FastAPI()

    @app.post("/classify")
    async def classify(request: Request) -> dict[str, object]:
        text = (await request.json())["input"]
        return {"flagged": "dragon" in text, "reason": "dragons are not allowed here"}

    with serve(app) as url:
        yield f"{url}/classify"


async def test_http_classifier(classifier_url: str) -> None:
    classifier = HttpClassifier(classifier_url)
    try:
        assert (await classifier.review(GenerationRequest(prompt="a cat"))).allowed
        verdict = await classifier.review(GenerationRequest(prompt="a red dragon"))
        assert not verdict.allowed and verdict.reason == "dragons are not allowed here"
    finally:
        await classifier.close()


async def test_an_unreachable_classifier_refuses_rather_than_lets_through() -> None:
    classifier = HttpClassifier(f"http://127.0.0.1:{free_port()}/classify", timeout=1.0)
    try:
        with pytest.raises(ModerationUnavailable) as failed:
            await classifier.review(GenerationRequest(prompt="a cat"))
        assert failed.value.code == "moderation_unavailable" and failed.value.status == 503
    finally:
        await classifier.close()
