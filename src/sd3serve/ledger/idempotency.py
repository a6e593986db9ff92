"""Idempotent retries: the first answer to an ``Idempotency-Key`` is kept with the ledger for 24 hours.

A request with a key first *claims* it (a row with no answer yet: ``Ledger.claim``). Its answer is written in the
same transaction that charges it, so a retry either finds the answer of a charged request or finds nothing and
runs; a failed request gives its claim back and charges nothing.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import delete, update
from sqlalchemy.orm import Session

from sd3serve.errors import IdempotencyConflict, IdempotencyInProgress
from sd3serve.ledger.schema import IdempotencyRecord

IDEMPOTENCY_TTL = timedelta(hours=24)


@dataclass(frozen=True)
class Claim:
    key_id: int
    idem_key: str


def fingerprint(route: str, canonical_request: str) -> str:
    return hashlib.sha256(f"{route}\n{canonical_request}".encode()).hexdigest()


class Idempotency:
    """The ``idempotency`` rows, in the caller's transaction."""

    def __init__(self, session: Session) -> None:
        self.s = session

    def forget_expired(self, claim: Claim) -> None:
        """Drop this key's claim of ``claim.idem_key`` if it is older than the 24 hours it is kept."""
        self.s.execute(
            delete(IdempotencyRecord).where(
                IdempotencyRecord.key_id == claim.key_id,
                IdempotencyRecord.idem_key == claim.idem_key,
                IdempotencyRecord.created_at < datetime.now(UTC) - IDEMPOTENCY_TTL,
            )
        )

    def insert_claim(self, claim: Claim, *, fingerprint: str) -> None:
        """A claim with no answer yet; IntegrityError (at commit or flush) if the key was claimed before."""
        self.s.add(IdempotencyRecord(key_id=claim.key_id, idem_key=claim.idem_key, fingerprint=fingerprint))
        self.s.flush()

    def earlier_answer(self, claim: Claim, *, fingerprint: str) -> bytes:
        """The answer of the request that claimed the key first. IdempotencyConflict if it had another body;
        IdempotencyInProgress while it still runs, or if its claim was just given back."""
        row = self.s.get(IdempotencyRecord, (claim.key_id, claim.idem_key))
        if row is None:
            raise IdempotencyInProgress("a request with this Idempotency-Key just failed; retry")
        if row.fingerprint != fingerprint:
            raise IdempotencyConflict(
                "this Idempotency-Key was used with another request body (or route) in the last 24 hours; "
                "use a new key for a new request"
            )
        if row.answer is None:
            raise IdempotencyInProgress("a request with this Idempotency-Key is still running; retry shortly")
        return row.answer

    def answer(self, claim: Claim, answer: bytes) -> None:
        """Record the answer of the claimed request (in the transaction that charges it)."""
        self.s.execute(
            update(IdempotencyRecord)
            .where(IdempotencyRecord.key_id == claim.key_id, IdempotencyRecord.idem_key == claim.idem_key)
            .values(answer=answer)
        )

    def abandon(self, claim: Claim) -> None:
        """The request failed (nothing charged): give the key back so that a retry runs."""
        self.s.execute(
            delete(IdempotencyRecord).where(
                IdempotencyRecord.key_id == claim.key_id,
                IdempotencyRecord.idem_key == claim.idem_key,
                IdempotencyRecord.answer.is_(None),
            )
        )

    def delete_expired(self) -> int:
        res = self.s.execute(
            delete(IdempotencyRecord).where(IdempotencyRecord.created_at < datetime.now(UTC) - IDEMPOTENCY_TTL)
        )
        return int(res.rowcount)  # type: ignore[attr-defined]
