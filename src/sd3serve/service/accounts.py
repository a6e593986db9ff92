"""Keys, credits and what belongs to a key (its rate limit, its webhook secret): every read and change of them that
the API makes, the admin API's included."""

from __future__ import annotations

from decimal import Decimal

from sd3serve.errors import RateLimited
from sd3serve.ledger import KeyInfo, Ledger
from sd3serve.settings import Settings

__all__ = ["Accounts", "KeyInfo"]


class Accounts:
    def __init__(self, ledger: Ledger, settings: Settings) -> None:
        self._ledger = ledger
        self._settings = settings

    async def authenticate(self, api_key: str | None) -> KeyInfo:
        """The key's account: InvalidApiKey (401) if it is missing, unknown or revoked."""
        return await self._ledger.run(lambda tx: tx.keys.authenticate(api_key))

    async def count_generation(self, key: KeyInfo) -> None:
        """Count a generation request against the key's rate limit: RateLimited (429) past it."""
        limit = self._settings.rate_limit_per_minute
        if limit > 0:
            decision = await self._ledger.run(lambda tx: tx.rates.hit(key_id=key.id, per_minute=limit))
            if not decision.allowed:
                raise RateLimited(limit, decision.reset_at)

    async def rotate_webhook_secret(self, key: KeyInfo) -> str:
        """A new webhook signing secret for the key (it replaces the old one at once)."""
        return await self._ledger.run(lambda tx: tx.webhooks.rotate_secret(key_id=key.id))

    # --- the admin API --------------------------------------------------------------------------------------

    async def create_key(self, *, credits: Decimal, name: str) -> tuple[KeyInfo, str]:
        """The new key's account and the key itself (shown once, stored only as a digest)."""
        return await self._ledger.run(lambda tx: tx.keys.create(credits=credits, name=name))

    async def list_keys(self) -> list[KeyInfo]:
        return await self._ledger.run(lambda tx: tx.keys.all())

    async def add_credits(self, key_id: int, credits: Decimal) -> KeyInfo:
        return await self._ledger.run(lambda tx: tx.keys.add_credits(key_id, credits))

    async def revoke(self, key_id: int) -> KeyInfo:
        return await self._ledger.run(lambda tx: tx.keys.revoke(key_id))
