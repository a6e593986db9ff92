"""Per-key request limits per minute, counted in the database so every server process shares them."""

from __future__ import annotations

import time
from dataclasses import dataclass

from sqlalchemy import delete
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from sd3serve.ledger.schema import RateWindow


@dataclass(frozen=True)
class RateDecision:
    allowed: bool
    reset_at: float  # unix time when the current window ends


class RateWindows:
    """The ``rate_windows`` counters, in the caller's transaction."""

    def __init__(self, session: Session) -> None:
        self.s = session

    def hit(self, *, key_id: int, per_minute: int, now: float | None = None) -> RateDecision:
        """Count one request of the key in the current minute (one atomic upsert)."""
        now = time.time() if now is None else now
        window = int(now // 60)
        insert = pg_insert if self.s.get_bind().dialect.name == "postgresql" else sqlite_insert
        upsert = (
            insert(RateWindow)
            .values(key_id=key_id, window=window, count=1)
            .on_conflict_do_update(
                index_elements=[RateWindow.key_id, RateWindow.window], set_={"count": RateWindow.count + 1}
            )
            .returning(RateWindow.count)
        )
        count = int(self.s.execute(upsert).scalar_one())
        return RateDecision(allowed=count <= per_minute, reset_at=(window + 1) * 60.0)

    def prune(self, *, before_window: int) -> None:
        """Drop the windows that ended before ``before_window`` (a minute number)."""
        self.s.execute(delete(RateWindow).where(RateWindow.window < before_window))
