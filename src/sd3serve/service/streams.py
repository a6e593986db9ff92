"""Long responses, per process: how many each key may hold open, and one poll of the database for all event streams.

A *stream* is a response that stays open while the client reads it: an event stream (``/v2/requests/{id}/events``)
or a base64 result download. Each holds a slot counted against its key (``max_streams_per_key``, 429 past it) and
against the process (``max_streams``, never more than half of ``max_connections``; 503 past it), so one key cannot
take the connections that every other key needs.

Event streams do not read the database themselves: each watches its task through the hub, and one poller per
process reads the status and progress of every watched task in a single query (``Tasks.progress_of``) a few
times a second, then wakes the streams whose task changed. The database load of N streams is that of one; a task
run by another process is followed the same way, through its row.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable

from sd3serve.errors import Overloaded, TooManyStreams
from sd3serve.ledger import Ledger, Tx
from sd3serve.ledger.tasks import TaskProgress
from sd3serve.settings import Settings

log = logging.getLogger(__name__)

POLL_S = 0.2  # how often the poller reads the watched tasks' rows
LARGE_READS = 4  # base64 images read from the database at once per process (each is in memory while it is read)
RETRY_AFTER_S = 5


def stream_limit(settings: Settings) -> int:
    """Streams this process holds at most: ``max_streams``, and never more than half of ``max_connections``."""
    if settings.max_connections:
        return max(1, min(settings.max_streams, settings.max_connections // 2))
    return settings.max_streams


class StreamSlot:
    """One open stream, counted against its key and the process until ``release()`` (idempotent)."""

    def __init__(self, hub: StreamHub, key_id: int) -> None:
        self._hub = hub
        self.key_id = key_id
        self._held = True

    def release(self) -> None:
        if self._held:
            self._held = False
            self._hub._release(self.key_id)


class Watch:
    """A stream's view of one task: the latest status and progress the poller saw, and a wake-up on change."""

    def __init__(self, hub: StreamHub, task_id: str, first: TaskProgress) -> None:
        self._hub = hub
        self.task_id = task_id
        self.latest: TaskProgress | None = first  # None: the task's row is gone (it expired)
        self._changed = asyncio.Event()

    def _update(self, state: TaskProgress | None) -> None:
        if state != self.latest:
            self.latest = state
            self._changed.set()

    def poke(self) -> None:
        """Wake the stream without a change of the row (a live preview came)."""
        self._changed.set()

    async def changed(self, timeout: float) -> bool:
        """Wait until the task changed since the last call (True), or ``timeout`` seconds (False)."""
        try:
            await asyncio.wait_for(self._changed.wait(), timeout)
        except TimeoutError:
            return False
        self._changed.clear()
        return True

    def close(self) -> None:
        self._hub._unwatch(self)


class StreamHub:
    def __init__(self, ledger: Ledger, *, per_key: int, total: int, poll_s: float = POLL_S) -> None:
        self._ledger = ledger
        self.per_key = per_key
        self.total = total
        self.poll_s = poll_s
        self._lock = threading.Lock()  # slots are taken on the thread pool (sync routes) and released on the loop
        self._by_key: dict[int, int] = {}
        self._open = 0
        self._watches: dict[str, set[Watch]] = {}
        self._watched = asyncio.Event()
        self.polls = 0  # database reads made for the streams (tests and metrics)
        self.reads = asyncio.Semaphore(LARGE_READS)

    # --- slots ----------------------------------------------------------------------------------------------

    def open(self, key_id: int) -> StreamSlot:
        """A slot for a new stream of this key: TooManyStreams (429) at the key's limit, Overloaded (503) at the
        process's."""
        with self._lock:
            held = self._by_key.get(key_id, 0)
            if held >= self.per_key:
                raise TooManyStreams(
                    f"this key already holds {held} open streams (event streams and base64 result downloads), "
                    f"the most it may (SD3SERVE_MAX_STREAMS_PER_KEY={self.per_key}): close one, or poll "
                    "GET /v2/requests/{id}/status instead",
                    retry_after_s=RETRY_AFTER_S,
                )
            if self._open >= self.total:
                raise Overloaded(
                    f"this server holds as many open streams as it allows ({self.total}, SD3SERVE_MAX_STREAMS): "
                    "poll GET /v2/requests/{id}/status, or retry later",
                    retry_after_s=RETRY_AFTER_S,
                )
            self._by_key[key_id] = held + 1
            self._open += 1
        return StreamSlot(self, key_id)

    def _release(self, key_id: int) -> None:
        with self._lock:
            self._open -= 1
            left = self._by_key[key_id] - 1
            if left:
                self._by_key[key_id] = left
            else:
                del self._by_key[key_id]

    def held(self, key_id: int | None = None) -> int:
        """Open streams of one key, or of everyone."""
        with self._lock:
            return self._open if key_id is None else self._by_key.get(key_id, 0)

    # --- watching tasks (on the event loop) -----------------------------------------------------------------

    def watch(self, task_id: str, first: TaskProgress) -> Watch:
        w = Watch(self, task_id, first)
        self._watches.setdefault(task_id, set()).add(w)
        self._watched.set()
        return w

    def _unwatch(self, w: Watch) -> None:
        watchers = self._watches.get(w.task_id)
        if watchers is not None:
            watchers.discard(w)
            if not watchers:
                del self._watches[w.task_id]

    async def run(self) -> None:
        """The poller: while any task is watched, read them all in one query every ``poll_s`` and wake the streams
        whose task changed. Runs for the life of the app."""
        while True:
            if not self._watches:
                self._watched.clear()
                await self._watched.wait()
            task_ids = list(self._watches)
            try:
                states = await self._ledger.run(_progress_of(task_ids))
            except Exception as e:  # the database may be away: the streams wait, and the next poll tries again
                log.warning("event streams: could not read task progress: %s", e)
            else:
                self.polls += 1
                for task_id in task_ids:
                    for w in list(self._watches.get(task_id, ())):
                        w._update(states.get(task_id))
            await asyncio.sleep(self.poll_s)


def _progress_of(task_ids: list[str]) -> Callable[[Tx], dict[str, TaskProgress]]:
    return lambda tx: tx.tasks.progress_of(task_ids)
