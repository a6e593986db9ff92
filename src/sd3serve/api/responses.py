"""Responses that hold a per-key stream slot (``service/streams.py``) for as long as they are being sent."""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

from fastapi.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from sd3serve.service.streams import StreamSlot


class HeldStreamingResponse(StreamingResponse):
    """A streaming response that holds a stream slot until it ends, however it ends (completed, the client gone,
    cut off), and closes its body generator then, so the generator's own cleanup runs at once."""

    def __init__(self, content: AsyncIterator[Any], slot: StreamSlot, **kwargs: Any) -> None:
        super().__init__(content, **kwargs)
        self._slot = slot

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._slot.release()
            if isinstance(self.body_iterator, AsyncGenerator):
                await self.body_iterator.aclose()
