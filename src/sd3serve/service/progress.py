"""Progress as events: the engine's thread reports (step, steps) and, while someone watches, previews; the event
loop reads the latest value."""

from __future__ import annotations

import asyncio
import base64
import io
import math
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

PREVIEW_MIN_SIDE = 64  # a preview smaller than this (the demo's 16x16 latents) is scaled up, by 4 at most
PREVIEW_MAX_SCALE = 4
PREVIEW_QUALITY = 80  # JPEG


@dataclass
class Preview:
    """One step's x0 estimate of a task's first image: (h, w, 3) uint8 at the latent grid."""

    step: int
    steps: int
    rgb: np.ndarray = field(repr=False)
    _data: dict[str, Any] | None = field(default=None, repr=False)

    def data(self) -> dict[str, Any]:
        """The ``preview`` of a progress event: a small JPEG, base64, encoded once however many streams show it."""
        if self._data is None:
            image = Image.fromarray(self.rgb)
            scale = min(PREVIEW_MAX_SCALE, math.ceil(PREVIEW_MIN_SIDE / max(image.size)))
            if scale > 1:
                image = image.resize((image.width * scale, image.height * scale), Image.Resampling.BILINEAR)
            buf = io.BytesIO()
            image.save(buf, format="JPEG", quality=PREVIEW_QUALITY)
            self._data = {"step": self.step, "width": image.width, "height": image.height, "media_type": "image/jpeg",
                          "image": base64.b64encode(buf.getvalue()).decode("ascii")}  # fmt: skip
        return self._data


class PreviewBoard:
    """Per process: the latest preview of each task run here, and the preview streams watching each task. A task
    is previewed only while at least one stream watches it: the engine asks ``watched`` before computing one."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._wakers: dict[str, set[Callable[[], None]]] = {}
        self._latest: dict[str, Preview] = {}

    def watch(self, task_id: str, wake: Callable[[], None]) -> Callable[[], None]:
        """Watch a task's previews: ``wake()`` is called on the event loop at each new one. Returns the unwatch."""
        with self._lock:
            self._wakers.setdefault(task_id, set()).add(wake)

        def unwatch() -> None:
            with self._lock:
                wakers = self._wakers.get(task_id)
                if wakers is not None:
                    wakers.discard(wake)
                    if not wakers:
                        del self._wakers[task_id]
                        self._latest.pop(task_id, None)

        return unwatch

    def watched(self, task_id: str) -> bool:
        return task_id in self._wakers  # a plain read: asked by the engine's thread at every model call

    def watching(self) -> int:
        """How many tasks some preview stream watches now."""
        with self._lock:
            return len(self._wakers)

    def latest(self, task_id: str) -> Preview | None:
        with self._lock:
            return self._latest.get(task_id)

    def post(self, task_id: str, preview: Preview) -> None:
        with self._lock:
            if task_id not in self._wakers:
                return
            self._latest[task_id] = preview

    def wake(self, task_id: str) -> None:
        """On the event loop: tell the task's streams that a preview came."""
        with self._lock:
            wakers = list(self._wakers.get(task_id, ()))
        for wake in wakers:
            wake()

    def forget(self, task_id: str) -> None:
        """The task ended: drop its last preview (its streams go on to the final event)."""
        with self._lock:
            self._latest.pop(task_id, None)


class ProgressChannel:
    """The latest (step, steps) of one request. Called as the engine's progress callback, it never blocks on I/O
    (a lock held for two assignments, and a wake-up handed to the event loop); readers on the loop wait for a
    change with ``changed()``, so a slow database delays only the reader, never the model. With a ``previews``
    board it is also the engine's preview listener for ``task_id``."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, *, previews: PreviewBoard | None = None, task_id: str = ""
    ) -> None:
        self._loop = loop
        self._lock = threading.Lock()
        self._value: tuple[int, int] | None = None
        self._event = asyncio.Event()
        self._previews = previews
        self._task_id = task_id

    def __call__(self, step: int, steps: int) -> None:
        self.report(step, steps)

    def report(self, step: int, steps: int) -> None:
        with self._lock:
            self._value = (step, steps)
        if not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._event.set)

    def wants_preview(self) -> bool:
        return self._previews is not None and self._previews.watched(self._task_id)

    def preview(self, step: int, steps: int, rgb: np.ndarray) -> None:
        if self._previews is None:
            return
        self._previews.post(self._task_id, Preview(step=step, steps=steps, rgb=rgb))
        if not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._previews.wake, self._task_id)

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
