"""Reading a JSON body with a size limit."""

from __future__ import annotations

import json
from typing import Any

from fastapi import Request

from sd3serve.errors import InvalidRequest, PayloadTooLarge


def _reject_constant(name: str) -> Any:
    raise InvalidRequest(f"malformed JSON: {name} is not a valid JSON number")


async def read_json(request: Request, *, limit: int) -> Any:
    """The decoded body; 413 past ``limit`` bytes (checked while streaming), 400 when it is not JSON."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"request body too large: {declared} bytes, the limit is {limit}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"request body too large: over {limit} bytes")
        chunks.append(chunk)
    raw = b"".join(chunks)
    if not raw.strip():
        raise InvalidRequest("the request body is empty: send a JSON object")
    try:
        return json.loads(raw, parse_constant=_reject_constant)
    except InvalidRequest:
        raise
    except (ValueError, RecursionError) as e:
        raise InvalidRequest(f"malformed JSON: {str(e)[:200]}") from None
