"""Credits: the only place where balances change.

A request's cost is *held* (taken from the balance) when it is admitted, in one conditional UPDATE, so two
concurrent requests can never spend the same credit; the hold is *captured* when the images are delivered or
*released* (returned) when the request fails. Deleting the hold row is what makes each happen at most once.

Lock order. Every transaction that changes more than one of these rows takes them in one order: the key rows
first (lowest id first, ``lock_keys``), then task rows, then hold rows. Two transactions then never wait on each
other in a cycle (on PostgreSQL a cycle is a deadlock: one of them fails). Hold creation, capture, release,
cancel, revoke and recovery all follow it; expiry touches only finished tasks and their children.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal

from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

from sd3serve.errors import InsufficientCredits, InvalidApiKey, InvalidRequest
from sd3serve.ledger.schema import MICRO, ApiKey, Hold

MAX_BALANCE = Decimal(9 * 10**12)  # credits; a balance is a signed 64-bit count of micro-credits (≈ 9.22e12)


def to_micro(credits: Decimal | int | float | str) -> int:
    """Credits as micro-credits; InvalidRequest for an amount finer than one micro-credit or beyond any balance."""
    micro = Decimal(str(credits)) * MICRO
    if not micro.is_finite() or micro != micro.to_integral_value() or abs(micro) > MAX_BALANCE * MICRO:
        raise InvalidRequest(f"{credits} is not an amount of credits the store can keep (at most {MAX_BALANCE}, "
                             "in steps of 0.000001)")  # fmt: skip
    return int(micro)


def from_micro(micro: int) -> float:
    return micro / MICRO


@dataclass(frozen=True)
class CreditHold:
    id: int
    key_id: int
    amount_micro: int

    @classmethod
    def of(cls, row: Hold) -> CreditHold:
        return cls(id=row.id, key_id=row.key_id, amount_micro=row.amount_micro)


def lock_keys(s: Session, key_ids: list[int]) -> list[int]:
    """In the caller's transaction: lock these key rows, lowest id first (the first step of the lock order), as
    an UPDATE of them would (PostgreSQL ``FOR NO KEY UPDATE``; SQLite has one writer and needs none). Returns
    the ids that exist."""
    if not key_ids:
        return []
    wanted = select(ApiKey.id).where(ApiKey.id.in_(sorted(set(key_ids)))).order_by(ApiKey.id)
    return list(s.scalars(wanted.with_for_update(key_share=True)))


class Credits:
    """Balances and holds, in the caller's transaction."""

    def __init__(self, session: Session) -> None:
        self.s = session

    def hold(self, *, key_id: int, credits: Decimal, request_id: str, owner: str = "") -> CreditHold:
        """Take ``credits`` from the balance for a request in flight, or raise InsufficientCredits (InvalidApiKey
        for a key that is gone or revoked). ``owner``: the server process (if it dies, recovery returns it)."""
        amount = to_micro(credits)
        res = self.s.execute(
            update(ApiKey)
            .where(ApiKey.id == key_id, ApiKey.balance_micro >= amount, ApiKey.revoked_at.is_(None))
            .values(balance_micro=ApiKey.balance_micro - amount)
        )
        if res.rowcount != 1:  # type: ignore[attr-defined]
            row = self.s.get(ApiKey, key_id)
            if row is None or row.revoked_at is not None:
                raise InvalidApiKey("invalid or revoked API key")
            raise InsufficientCredits(from_micro(row.balance_micro), from_micro(amount))
        row_hold = Hold(key_id=key_id, request_id=request_id, amount_micro=amount, owner=owner)
        self.s.add(row_hold)
        self.s.flush()
        return CreditHold.of(row_hold)

    def exists(self, hold: CreditHold) -> bool:
        return self.s.scalar(select(Hold.id).where(Hold.id == hold.id)) is not None

    def capture(self, hold: CreditHold) -> bool:
        """Spend the hold; False if it is gone (settled before)."""
        if self.s.execute(delete(Hold).where(Hold.id == hold.id)).rowcount != 1:  # type: ignore[attr-defined]
            return False
        self.s.execute(
            update(ApiKey).where(ApiKey.id == hold.key_id).values(spent_micro=ApiKey.spent_micro + hold.amount_micro)
        )
        return True

    def release(self, hold: CreditHold) -> bool:
        """Return the hold to the balance; False if it is gone (settled before)."""
        if self.s.execute(delete(Hold).where(Hold.id == hold.id)).rowcount != 1:  # type: ignore[attr-defined]
            return False
        self.s.execute(
            update(ApiKey)
            .where(ApiKey.id == hold.key_id)
            .values(balance_micro=ApiKey.balance_micro + hold.amount_micro)
        )
        return True

    def release_where(self, *where: object) -> int:
        """Return every hold matching ``where`` (whose keys the caller locked), lowest id first; how many."""
        holds = self.s.scalars(select(Hold).where(*where).order_by(Hold.id)).all()  # type: ignore[arg-type]
        return sum(self.release(CreditHold.of(h)) for h in holds)

    def balance_micro(self, key_id: int) -> int:
        return int(self.s.scalar(select(ApiKey.balance_micro).where(ApiKey.id == key_id)) or 0)
