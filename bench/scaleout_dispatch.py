"""How a v2 task reaches the replica that runs it, two ways, measured roughly side by side (interleaved):

- ``handle``: a Ray Serve deployment-handle call carrying the task (its hold, owner, request and job), what
  sd3serve does (scaleout_tasks.py), awaited until the replica answers;
- ``queue``: a replica claiming the oldest unclaimed row of a PostgreSQL table with ``FOR UPDATE SKIP LOCKED``
  (one round trip), the alternative design; its pickup latency adds half the poll interval on average unless
  LISTEN/NOTIFY wakes it.

Prints per-dispatch milliseconds (p50 and mean) for each. Needs PostgreSQL at 127.0.0.1:5432 (a scratch
database is created and dropped).

    PYTHONPATH=src:bench python bench/scaleout_dispatch.py [--n 300]
"""

from __future__ import annotations

import argparse
import statistics
import time
import uuid

import psycopg
import ray
from ray import serve

from sd3serve.api.schemas import Txt2ImgRequest
from sd3serve.ledger.credits import CreditHold

PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=16)
class Runner:
    async def run_task(self, hold: CreditHold, owner: str, req: Txt2ImgRequest, job: object, task_id: str) -> str:
        return task_id


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=300)
    a = parser.parse_args()
    req = Txt2ImgRequest.model_validate({"prompt": "a red circle on a blue background", "width": 512, "height": 512})
    job = req.to_job()
    hold = CreditHold(id=1, key_id=1, amount_micro=1_000_000)

    db = f"dispatch_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{db}"')
    ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        handle = serve.run(Runner.bind(), name="dispatch", route_prefix=None)
        with psycopg.connect(f"postgresql://postgres@127.0.0.1:5432/{db}", autocommit=True) as conn:
            conn.execute("CREATE TABLE q (id bigserial PRIMARY KEY, owner text, payload text NOT NULL)")
            conn.execute("INSERT INTO q (payload) SELECT %s FROM generate_series(1, %s)",
                         (req.model_dump_json(), a.n + 10))  # fmt: skip
            handle.run_task.remote(hold, "o", req, job, "warm").result()
            times: dict[str, list[float]] = {"handle": [], "queue": []}
            for i in range(a.n):
                start = time.perf_counter()
                handle.run_task.remote(hold, "owner", req, job, str(i)).result()
                times["handle"].append(time.perf_counter() - start)
                start = time.perf_counter()
                conn.execute(
                    "UPDATE q SET owner = 'me' WHERE id = (SELECT id FROM q WHERE owner IS NULL ORDER BY id "
                    "FOR UPDATE SKIP LOCKED LIMIT 1) RETURNING payload"
                ).fetchone()
                times["queue"].append(time.perf_counter() - start)
        print(f"\n{a.n} dispatches each, interleaved; milliseconds per dispatch\n")
        print("| way | p50 ms | mean ms |")
        print("| --- | --- | --- |")
        for way, xs in times.items():
            print(f"| {way} | {statistics.median(xs) * 1e3:.2f} | {statistics.fmean(xs) * 1e3:.2f} |")
    finally:
        serve.shutdown()
        ray.shutdown()
        with psycopg.connect(PG_ADMIN, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')


if __name__ == "__main__":
    main()
