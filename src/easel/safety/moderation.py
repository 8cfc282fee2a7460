"""Prompt moderation: refuse a prompt at admission, before any GPU time is spent.

A :class:`Moderator` looks at the prompt and negative prompt of a request that asks for
moderation (``moderate: true``, or every request when the server says so). The default
is a deny-list of words and regular expressions from settings; an optional second one
asks an HTTP classification endpoint.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

import httpx

from easel.errors import ModerationUnavailable, PromptRejected
from easel.jobs import GenerationRequest


@dataclass(frozen=True)
class Verdict:
    allowed: bool
    reason: str = ""


ALLOWED = Verdict(True)


class Moderator(Protocol):
    async def review(self, request: GenerationRequest) -> Verdict: ...


class DenyList:
    """Whole words (case-insensitive) and regular expressions that a prompt may not contain."""

    def __init__(self, words: Iterable[str] = (), patterns: Iterable[str] = ()) -> None:
        words = [w.strip() for w in words if w.strip()]
        self._words = (
            re.compile(r"\b(" + "|".join(map(re.escape, words)) + r")\b", re.IGNORECASE)
            if words
            else None
        )
        self._patterns = [re.compile(p, re.IGNORECASE) for p in patterns]

    def verdict(self, text: str) -> Verdict:
        if self._words is not None and (match := self._words.search(text)):
            return Verdict(False, f"the prompt contains the denied word {match.group(0)!r}")
        for pattern in self._patterns:
            if pattern.search(text):
                return Verdict(False, f"the prompt matches a denied pattern ({pattern.pattern})")
        return ALLOWED

    async def review(self, request: GenerationRequest) -> Verdict:
        for text in (request.prompt, request.negative_prompt):
            if not (verdict := self.verdict(text)).allowed:
                return verdict
        return ALLOWED


class HttpClassifier:
    """Asks ``POST url {"input": text}`` and expects ``{"flagged": bool, "reason": str}``.

    An endpoint that cannot answer refuses nothing silently: the request fails with 503,
    so an outage of moderation never lets unreviewed prompts through.
    """

    def __init__(self, url: str, *, timeout: float = 5.0) -> None:
        self.url = url
        self._client = httpx.AsyncClient(timeout=timeout)

    async def review(self, request: GenerationRequest) -> Verdict:
        text = (
            request.prompt
            if not request.negative_prompt
            else (f"{request.prompt}\n{request.negative_prompt}")
        )
        try:
            response = await self._client.post(self.url, json={"input": text})
            response.raise_for_status()
            body = response.json()
        except (httpx.HTTPError, ValueError) as exc:
            raise ModerationUnavailable(
                f"the moderation service at {self.url} did not answer: {exc}"
            ) from exc
        if body.get("flagged"):
            return Verdict(False, str(body.get("reason") or "flagged by the moderation service"))
        return ALLOWED

    async def close(self) -> None:
        await self._client.aclose()


async def moderate(request: GenerationRequest, moderators: Sequence[Moderator]) -> None:
    """Raise ``PromptRejected`` with the first reason any moderator gives."""
    for moderator in moderators:
        verdict = await moderator.review(request)
        if not verdict.allowed:
            raise PromptRejected(verdict.reason)
