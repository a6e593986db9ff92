"""Cancel racing completion: two threads released together on one accepted task (tests/ledger/test_cancel_races.py
and bench/cancel_race.py)."""

from __future__ import annotations

import threading
from datetime import timedelta

from sqlalchemy.exc import DBAPIError

from helpers.ledger import Store, completion
from sd3serve.errors import ReservationLost
from sd3serve.ledger import Reservation

TTL = timedelta(hours=1)


def race_cancel_and_completion(
    tasks: Store, reservation: Reservation, *, task_id: str, key_id: int
) -> tuple[object, object]:
    """(the cancel's answer or its exception, "ok" or the completion's ReservationLost / DBAPIError)."""
    start = threading.Barrier(2)
    out: dict[str, object] = {}

    def cancel() -> None:
        start.wait()
        try:
            out["cancel"] = tasks.cancel(task_id=task_id, key_id=key_id, ttl=TTL)
        except BaseException as e:
            out["cancel"] = e

    worker = threading.Thread(target=cancel)
    worker.start()
    start.wait()
    try:
        reservation.capture(deliver=completion(task_id, images=[b"png"], inference_time=0.1, steps=2, ttl=TTL))
        out["complete"] = "ok"
    except (ReservationLost, DBAPIError) as e:
        out["complete"] = e
    finally:
        worker.join()
    return out["cancel"], out["complete"]
