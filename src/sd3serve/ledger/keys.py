"""API keys: created with their plaintext shown once, kept as SHA-256 digests, credited, revoked."""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from sd3serve.errors import InvalidApiKey, InvalidRequest, NotFound
from sd3serve.ledger.credits import MAX_BALANCE, from_micro, to_micro
from sd3serve.ledger.schema import ApiKey, Task
from sd3serve.ledger.tasks import Tasks

KEY_PREFIX = "sk-"
REVOKED_MESSAGE = "cancelled: the key was revoked; nothing was charged"


def digest(api_key: str) -> str:
    return hashlib.sha256(api_key.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class KeyInfo:
    id: int
    name: str
    prefix: str
    credits: float
    spent: float
    created_at: datetime
    revoked: bool

    @classmethod
    def of(cls, row: ApiKey) -> KeyInfo:
        return cls(
            id=row.id,
            name=row.name,
            prefix=row.prefix,
            credits=from_micro(row.balance_micro),
            spent=from_micro(row.spent_micro),
            created_at=row.created_at,
            revoked=row.revoked_at is not None,
        )


class Keys:
    """The ``api_keys`` rows, in the caller's transaction."""

    def __init__(self, session: Session) -> None:
        self.s = session

    def create(self, *, credits: Decimal | int, name: str = "") -> tuple[KeyInfo, str]:
        """A new key; the plaintext is returned here once and stored only as its sha256 digest."""
        if Decimal(str(credits)) < 0:
            raise ValueError("credits must not be negative")
        plaintext = KEY_PREFIX + secrets.token_urlsafe(32)
        row = ApiKey(
            name=name, digest=digest(plaintext), prefix=plaintext[:10], balance_micro=to_micro(credits), spent_micro=0
        )
        self.s.add(row)
        self.s.flush()
        self.s.refresh(row)
        return KeyInfo.of(row), plaintext

    def all(self) -> list[KeyInfo]:
        return [KeyInfo.of(r) for r in self.s.scalars(select(ApiKey).order_by(ApiKey.id))]

    def get(self, key_id: int) -> KeyInfo:
        row = self.s.get(ApiKey, key_id, populate_existing=True)
        if row is None:
            raise NotFound(f"no key with id {key_id}")
        return KeyInfo.of(row)

    def balance(self, key_id: int) -> float:
        return self.get(key_id).credits

    def authenticate(self, api_key: str | None) -> KeyInfo:
        """The key's record, or InvalidApiKey for a missing, unknown or revoked key."""
        if not api_key:
            raise InvalidApiKey("missing x-api-key header")
        wanted = digest(api_key)
        row = self.s.scalars(select(ApiKey).where(ApiKey.digest == wanted)).first()
        if row is None or not secrets.compare_digest(row.digest, wanted) or row.revoked_at is not None:
            raise InvalidApiKey("invalid or revoked API key")
        return KeyInfo.of(row)

    def add_credits(self, key_id: int, credits: Decimal | int) -> KeyInfo:
        """Add to a live key's balance, atomically bounded by MAX_BALANCE (the column stays a 64-bit integer).
        A revoked key is refused (InvalidRequest): its credits could never be spent. Returns the key as the
        UPDATE left it."""
        amount = to_micro(credits)
        row = self.s.execute(
            update(ApiKey)
            .where(
                ApiKey.id == key_id,
                ApiKey.revoked_at.is_(None),
                ApiKey.balance_micro <= to_micro(MAX_BALANCE) - amount,
            )
            .values(balance_micro=ApiKey.balance_micro + amount)
            .returning(ApiKey)
        ).scalar_one_or_none()
        if row is None:
            existing = self.s.get(ApiKey, key_id)
            if existing is None:
                raise NotFound(f"no key with id {key_id}")
            if existing.revoked_at is not None:
                raise InvalidRequest(f"key {key_id} is revoked: credits cannot be added to it")
            raise InvalidRequest(f"the balance would exceed the maximum of {MAX_BALANCE} credits")
        return KeyInfo.of(row)

    def revoke(self, key_id: int) -> KeyInfo:
        """Revoke a key and, in the same transaction, cancel its unfinished v2 tasks and return their holds (a
        revoked key can no longer read results, so nothing it cannot collect is charged). Returns the key as the
        transaction left it."""
        # The key row first (the lock order): a hold of this key waits, then finds the key revoked.
        res = self.s.execute(
            update(ApiKey).where(ApiKey.id == key_id, ApiKey.revoked_at.is_(None)).values(revoked_at=datetime.now(UTC))
        )
        if res.rowcount != 1 and self.s.get(ApiKey, key_id) is None:  # type: ignore[attr-defined]
            raise NotFound(f"no key with id {key_id}")
        Tasks(self.s).cancel_where(Task.key_id == key_id, error=REVOKED_MESSAGE, ttl=timedelta(hours=1))
        return self.get(key_id)
