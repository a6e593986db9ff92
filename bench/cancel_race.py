"""Cancel racing completion on one database, many times: how often each side won, how many cancel answers
disagreed with the money, and how many database errors (deadlocks) reached a caller.

    .venv/bin/python bench/cancel_race.py sqlite:///build/race.db 400
    .venv/bin/python bench/cancel_race.py postgresql://postgres@127.0.0.1:5432/NAME 300   # an empty database
"""

from __future__ import annotations

import sys
import uuid
from decimal import Decimal
from pathlib import Path

from sqlalchemy.exc import DBAPIError

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # helpers.ledger, helpers.races
from helpers.ledger import creation, open_store
from helpers.races import race_cancel_and_completion


def main(url: str, rounds: int) -> None:
    credits = open_store(url)
    credits.create_schema()
    tasks = credits
    key = credits.create_key(credits=2 * rounds)[0].id
    wrong = errors = won = 0
    for _ in range(rounds):
        tid = f"race-{uuid.uuid4().hex}"
        create = creation(task_id=tid, key_id=key, seed=1, media_type="image/png", owner="bench")
        res = credits.reserve(key_id=key, credits=Decimal(2), request_id=tid, owner="bench", with_hold=create)
        answer, complete = race_cancel_and_completion(tasks, res, task_id=tid, key_id=key)
        completed = complete == "ok"
        errors += isinstance(complete, DBAPIError)
        if isinstance(answer, DBAPIError):
            errors += 1
            continue
        assert isinstance(answer, tuple)
        view, cancelled = answer
        won += cancelled
        final = tasks.get(task_id=tid, key_id=key).status
        if cancelled != (final == "CANCELLED") or cancelled == completed or view.status != final:
            wrong += 1
    key_now = credits.get_key(key_id=key)
    print(
        f"{credits.engine.dialect.name}: {rounds} races, cancel won {won}, completion won {rounds - won}, "
        f"wrong answers {wrong}, database errors {errors}, balance {key_now.credits:g} spent {key_now.spent:g}"
    )
    credits.close()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
