"""v2 tasks on Ray Serve: accepted on the replica that received the submission, run on the replica Ray routes
them to.

The submitting replica creates the task and its hold (as the plain server does), then calls
``SD3Replica.run_task`` through a deployment handle: Ray's router picks the less loaded replica, the call counts
as an ongoing request there (the autoscaler sees it), and past ``max_ongoing_requests`` it waits in the router
like any HTTP request. Past ``max_queued_requests`` too an accepted task is never refused: it stays QUEUED on the
submitter, which tries again every ``BACKPRESSURE_RETRY_S``.

The replica that runs it first takes the task and its hold over (owner = its own instance, in one transaction,
only if the submitter still owns them), so that if it dies, recovery fails the task uncharged as for any dead
process. If the call itself fails (the runner died), the submitter fails the task and returns the hold at once;
a hold already captured or returned stays as it is, so this never refunds a delivered task or charges twice.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from ray.serve.exceptions import BackPressureError

from sd3serve.ledger import CreditHold, Reservation, Tx
from sd3serve.service.generation import GenerationService
from sd3serve.service.order import Order

log = logging.getLogger(__name__)

BACKPRESSURE_RETRY_S = 0.5  # an accepted task the router cannot queue yet (QUEUED meanwhile) tries again this often
LOST = "the replica running this task stopped before it finished; nothing was charged, retry"


class HandleDispatch:
    """``GenerationService.dispatch`` on a replica: run each accepted v2 task through the deployment handle."""

    def __init__(self, handle: Callable[[], Any], service: GenerationService, owner: Callable[[], str]) -> None:
        self.handle = handle  # the deployment's handle, made on first use (inside the replica's event loop)
        self.service = service
        self.owner = owner  # this process's instance id now (it changes if it was presumed dead)

    async def __call__(self, reservation: Reservation, order: Order, task_id: str) -> None:
        try:
            while True:
                try:
                    await self.handle().run_task.remote(reservation.hold, self.owner(), order, task_id)
                    return
                except BackPressureError:  # every replica is full and the router's queue too: the task waits
                    await asyncio.sleep(BACKPRESSURE_RETRY_S)
        except asyncio.CancelledError:  # this replica stops; the runner goes on (or recovery fails the task)
            raise
        except Exception as e:
            log.warning("task %s: the replica running it failed: %s", task_id, e)
            ttl = timedelta(seconds=self.service.settings.task_ttl_s)

            def failed(tx: Tx, _hold: CreditHold) -> None:
                tx.tasks.fail(task_id, error=LOST, ttl=ttl)

            await self.service.ledger.call(reservation.fail, also=failed)


async def run_dispatched(
    service: GenerationService, *, owner: str, hold: CreditHold, order: Order, task_id: str
) -> None:
    """On the replica Ray routed the task to: take it and its hold over from ``owner`` (the submitter) and run it
    (until done, failed or cancelled)."""
    ledger = service.ledger
    here = ledger.instance_id
    if not await ledger.run(lambda tx: tx.tasks.hand_over(task_id, hold=hold, owner=owner, new_owner=here)):
        log.info("task %s was settled before it could run here", task_id)
        return
    runner = service.run_here(Reservation(ledger, hold), order, task_id)
    await asyncio.shield(runner)  # a cancelled call (its caller stopped) leaves the run going here
