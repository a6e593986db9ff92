"""What a key may read of its v2 tasks: status and progress, result images, the queue position of a task waiting
here. Every read names the key, so another key's task is a 404."""

from __future__ import annotations

from sd3serve.engine.protocol import Engine
from sd3serve.ledger import KeyInfo, Ledger
from sd3serve.ledger.tasks import CANCELLED, COMPLETED, FAILED, QUEUED, TaskProgress, TaskView

__all__ = ["CANCELLED", "COMPLETED", "FAILED", "QUEUED", "TaskProgress", "TaskReads", "TaskView"]


class TaskReads:
    def __init__(self, ledger: Ledger, model_engine: Engine) -> None:
        self._ledger = ledger
        self._model_engine = model_engine

    async def get(self, key: KeyInfo, task_id: str) -> TaskView:
        """The key's task: NotFound (404) if it has none of that id."""
        return await self._ledger.run(lambda tx: tx.tasks.get(task_id=task_id, key_id=key.id))

    async def image(self, key: KeyInfo, task_id: str, index: int) -> tuple[bytes, str]:
        """(file bytes, media type) of one image of the key's finished task."""
        return await self._ledger.run(lambda tx: tx.tasks.image(task_id=task_id, key_id=key.id, index=index))

    def position(self, task_id: str) -> int | None:
        """Where a task waits in this process's queue (0: next), or None if it does not wait here."""
        return self._model_engine.position(task_id)
