"""The gate before the queue: rate limits, per-service caps and moderation.

Everything here runs at admission, before a job costs anything; refusals are 4xx/429 with
a code. Tokens themselves are checked earlier, by the middleware (``easel.api.auth``).
"""

from __future__ import annotations

import time

from easel.config import Safety
from easel.errors import ServiceQueueFull
from easel.jobs import GenerationRequest
from easel.safety.moderation import DenyList, HttpClassifier, Moderator, moderate
from easel.safety.ratelimit import TokenBuckets
from easel.safety.services import Permission, Service, ServiceToken
from easel.store.base import JobStore


def service_tokens(safety: Safety) -> list[ServiceToken]:
    return [
        ServiceToken(
            Service(entry.service, frozenset(Permission(s) for s in entry.scopes)),
            entry.token.get_secret_value().encode(),
        )
        for entry in safety.tokens
    ]


class Gate:
    def __init__(self, safety: Safety, store: JobStore) -> None:
        """``store``: where a service's active jobs are counted (shared by every replica)."""
        self.safety = safety
        self.store = store
        self.user_rates = (
            TokenBuckets(safety.user_rate, safety.user_burst) if safety.user_rate else None
        )
        self.service_rates = (
            TokenBuckets(safety.service_rate, safety.service_burst) if safety.service_rate else None
        )
        self.moderators: list[Moderator] = []
        if safety.deny_words or safety.deny_patterns:
            self.moderators.append(DenyList(safety.deny_words, safety.deny_patterns))
        self._classifier = HttpClassifier(safety.moderation_url) if safety.moderation_url else None
        if self._classifier is not None:
            self.moderators.append(self._classifier)

    async def check(self, request: GenerationRequest, service: Service | None) -> None:
        """Refuse what the caller may not submit now; raises a 4xx/429 EaselError."""
        now = time.monotonic()
        if self.service_rates is not None and service is not None:
            self.service_rates.check(service.name, now, f"service {service.name!r}")
        if self.user_rates is not None:
            key = f"{service.name if service else ''}\0{request.user_id}"
            self.user_rates.check(key, now, f"user {request.user_id!r}")
        cap = self.safety.service_max_active
        if cap is not None and service is not None:
            active = await self.store.service_active_count(service.name)
            if active >= cap:
                raise ServiceQueueFull(
                    f"service {service.name!r} has {active} queued or running jobs, its cap",
                    count=active,
                )
        if self.moderators and (request.moderate or self.safety.moderate_all):
            await moderate(request, self.moderators)

    async def close(self) -> None:
        if self._classifier is not None:
            await self._classifier.close()
