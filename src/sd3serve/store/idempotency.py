"""Idempotent retries: the first answer to an ``Idempotency-Key`` is kept with the ledger for 24 hours.

A request with a key first *claims* it (a row with no answer yet). Its answer is written in the same transaction
that charges it (a step of ``CreditStore.capture`` or ``reserve``), so a retry either finds the answer of a
charged request or finds nothing and runs; a failed request gives its claim back and charges nothing.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import Engine, delete, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from sd3serve.errors import IdempotencyConflict, IdempotencyInProgress
from sd3serve.store.credits import CreditHold, SessionStep
from sd3serve.store.models import IdempotencyRecord

IDEMPOTENCY_TTL = timedelta(hours=24)


@dataclass(frozen=True)
class Claim:
    key_id: int
    idem_key: str


def fingerprint(route: str, canonical_request: str) -> str:
    return hashlib.sha256(f"{route}\n{canonical_request}".encode()).hexdigest()


class IdempotencyStore:
    def __init__(self, engine: Engine) -> None:
        self._session = sessionmaker(engine, expire_on_commit=False)

    def begin(self, *, key_id: int, idem_key: str, fingerprint: str) -> bytes | None:
        """Claim ``idem_key`` for a new request (None: run it), or return the answer of the first request that
        used it. IdempotencyConflict if that one had another body; IdempotencyInProgress while it still runs."""
        with self._session.begin() as s:
            s.execute(
                delete(IdempotencyRecord).where(
                    IdempotencyRecord.key_id == key_id,
                    IdempotencyRecord.idem_key == idem_key,
                    IdempotencyRecord.created_at < datetime.now(UTC) - IDEMPOTENCY_TTL,
                )
            )
        try:
            with self._session.begin() as s:
                s.add(IdempotencyRecord(key_id=key_id, idem_key=idem_key, fingerprint=fingerprint))
            return None
        except IntegrityError:
            pass  # claimed before: by an earlier request, or by a concurrent one that won the insert
        with self._session() as s:
            row = s.get(IdempotencyRecord, (key_id, idem_key))
            if row is None:  # the other claim was given back meanwhile
                raise IdempotencyInProgress("a request with this Idempotency-Key just failed; retry")
            if row.fingerprint != fingerprint:
                raise IdempotencyConflict(
                    "this Idempotency-Key was used with another request body (or route) in the last 24 hours; "
                    "use a new key for a new request"
                )
            if row.answer is None:
                raise IdempotencyInProgress("a request with this Idempotency-Key is still running; retry shortly")
            return row.answer

    @staticmethod
    def answered(claim: Claim, answer: bytes) -> SessionStep:
        """A step of the charging transaction: record the answer of the claimed request."""

        def record(s: Session, _hold: CreditHold) -> None:
            s.execute(
                update(IdempotencyRecord)
                .where(IdempotencyRecord.key_id == claim.key_id, IdempotencyRecord.idem_key == claim.idem_key)
                .values(answer=answer)
            )

        return record

    def abandon(self, claim: Claim) -> None:
        """The request failed (nothing charged): give the key back so that a retry runs."""
        with self._session.begin() as s:
            s.execute(
                delete(IdempotencyRecord).where(
                    IdempotencyRecord.key_id == claim.key_id,
                    IdempotencyRecord.idem_key == claim.idem_key,
                    IdempotencyRecord.answer.is_(None),
                )
            )

    def delete_expired(self) -> int:
        with self._session.begin() as s:
            res = s.execute(
                delete(IdempotencyRecord).where(IdempotencyRecord.created_at < datetime.now(UTC) - IDEMPOTENCY_TTL)
            )
            return int(res.rowcount)  # type: ignore[attr-defined]
