"""Keys, credits and what belongs to a key (its rate limit, its webhook secret): every read and change of them that
the API makes, the admin API's included."""

from __future__ import annotations

from decimal import Decimal

from sd3serve.blocking import run_blocking
from sd3serve.errors import RateLimited
from sd3serve.settings import Settings
from sd3serve.store.credits import CreditStore, KeyInfo
from sd3serve.store.ratelimit import RateLimiter
from sd3serve.store.webhooks import WebhookStore

__all__ = ["Accounts", "KeyInfo"]


class Accounts:
    def __init__(
        self, store: CreditStore, webhooks: WebhookStore, rate_limiter: RateLimiter, settings: Settings
    ) -> None:
        self._store = store
        self._webhooks = webhooks
        self._rate_limiter = rate_limiter
        self._settings = settings

    async def authenticate(self, api_key: str | None) -> KeyInfo:
        """The key's account: InvalidApiKey (401) if it is missing, unknown or revoked."""
        return await run_blocking(self._store.authenticate, api_key=api_key)

    async def count_generation(self, key: KeyInfo) -> None:
        """Count a generation request against the key's rate limit: RateLimited (429) past it."""
        limit = self._settings.rate_limit_per_minute
        if limit > 0:
            decision = await run_blocking(self._rate_limiter.hit, key_id=key.id, per_minute=limit)
            if not decision.allowed:
                raise RateLimited(limit, decision.reset_at)

    async def rotate_webhook_secret(self, key: KeyInfo) -> str:
        """A new webhook signing secret for the key (it replaces the old one at once)."""
        return await run_blocking(self._webhooks.rotate_secret, key_id=key.id)

    # --- the admin API --------------------------------------------------------------------------------------

    async def create_key(self, *, credits: Decimal, name: str) -> tuple[KeyInfo, str]:
        """The new key's account and the key itself (shown once, stored only as a digest)."""
        return await run_blocking(self._store.create_key, credits=credits, name=name)

    async def list_keys(self) -> list[KeyInfo]:
        return await run_blocking(self._store.list_keys)

    async def add_credits(self, key_id: int, credits: Decimal) -> KeyInfo:
        return await run_blocking(self._store.add_credits, key_id=key_id, credits=credits)

    async def revoke(self, key_id: int) -> KeyInfo:
        return await run_blocking(self._store.revoke, key_id=key_id)
