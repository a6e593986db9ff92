"""Progress as events: the engine's thread reports (step, steps); the event loop reads the latest value."""

from __future__ import annotations

import asyncio
import threading


class ProgressChannel:
    """The latest (step, steps) of one request. ``report`` is the engine's callback: it never blocks on I/O
    (a lock held for two assignments, and a wake-up handed to the event loop); readers on the loop wait for a
    change with ``changed()``, so a slow database delays only the reader, never the model."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._lock = threading.Lock()
        self._value: tuple[int, int] | None = None
        self._event = asyncio.Event()

    def report(self, step: int, steps: int) -> None:
        with self._lock:
            self._value = (step, steps)
        if not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._event.set)

    @property
    def latest(self) -> tuple[int, int] | None:
        with self._lock:
            return self._value

    async def changed(self) -> tuple[int, int]:
        """Wait until a value was reported since the last call, and return the latest."""
        await self._event.wait()
        self._event.clear()
        value = self.latest
        assert value is not None
        return value
