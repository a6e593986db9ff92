"""Dependencies of the routes: the typed application state and the caller's key, as ``Annotated`` aliases."""

from __future__ import annotations

import secrets
from typing import Annotated, Any

from fastapi import Depends, Header, Request

from sd3serve.api.metrics import Metrics
from sd3serve.api.service import GenerationService
from sd3serve.api.state import AppState, app_state
from sd3serve.api.streams import StreamHub
from sd3serve.engine.protocol import Engine
from sd3serve.errors import Forbidden, InvalidApiKey, NotFound, RateLimited
from sd3serve.settings import Settings
from sd3serve.store.credits import CreditStore, KeyInfo
from sd3serve.store.tasks import TaskStore


def get_state(request: Request) -> AppState:
    return app_state(request.app)


StateDep = Annotated[AppState, Depends(get_state)]


def _part(name: str) -> Any:
    """A dependency that returns one part of the application state."""

    def get(state: StateDep) -> Any:
        return getattr(state, name)

    get.__name__ = f"get_{name}"
    return Depends(get)


SettingsDep = Annotated[Settings, _part("settings")]
StoreDep = Annotated[CreditStore, _part("store")]
EngineDep = Annotated[Engine, _part("engine")]
TaskStoreDep = Annotated[TaskStore, _part("tasks")]
MetricsDep = Annotated[Metrics, _part("metrics")]
ServiceDep = Annotated[GenerationService, _part("service")]
StreamHubDep = Annotated[StreamHub, _part("streams")]


def get_api_key(
    request: Request,
    store: StoreDep,
    x_api_key: Annotated[str | None, Header(alias="x-api-key", description="your API key")] = None,
) -> KeyInfo:
    # A sync dependency: FastAPI runs it on the thread pool, off the event loop.
    key = store.authenticate(api_key=x_api_key)
    request.state.key_id = key.id  # for the access log: the key's id, never the key
    return key


ApiKeyDep = Annotated[KeyInfo, Depends(get_api_key)]


def request_id(request: Request) -> str:
    rid: str = request.state.request_id
    return rid


RequestIdDep = Annotated[str, Depends(request_id)]

IdempotencyKeyDep = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        min_length=1,
        max_length=255,
        description="Optional. A retry with the same key and body within 24 hours gets the first answer (v2: the "
        "same request_id) and is charged once; the same key with another body is a 422; while the first request "
        "still runs, 409 with Retry-After.",
    ),
]


def _count_generation(key: KeyInfo, state: AppState) -> KeyInfo:
    limit = state.settings.rate_limit_per_minute
    if limit > 0:
        decision = state.rate_limiter.hit(key_id=key.id, per_minute=limit)
        if not decision.allowed:
            raise RateLimited(limit, decision.reset_at)
    return key


def get_generation_key(key: ApiKeyDep, state: StateDep) -> KeyInfo:
    """The caller's key, counted against its rate limit (generation requests only: polling is free)."""
    return _count_generation(key, state)


GenerationKeyDep = Annotated[KeyInfo, Depends(get_generation_key)]


def get_bearer_key(
    request: Request,
    store: StoreDep,
    authorization: Annotated[str | None, Header(description="`Bearer <your API key>`, as OpenAI's clients send it")]
    = None,
    x_api_key: Annotated[str | None, Header(alias="x-api-key", description="your API key (wins over Bearer)")] = None,
) -> KeyInfo:
    """The caller's key from ``x-api-key`` or else ``Authorization: Bearer`` (the OpenAI-compatible routes)."""
    api_key = x_api_key
    if not api_key and authorization:
        scheme, _, token = authorization.strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise InvalidApiKey("the Authorization header must be 'Bearer <your API key>'")
        api_key = token.strip()
    if not api_key:
        raise InvalidApiKey("missing API key: send 'Authorization: Bearer <your API key>' (or x-api-key)")
    key = store.authenticate(api_key=api_key)
    request.state.key_id = key.id
    return key


BearerKeyDep = Annotated[KeyInfo, Depends(get_bearer_key)]


def get_bearer_generation_key(key: BearerKeyDep, state: StateDep) -> KeyInfo:
    """A Bearer (or x-api-key) key, counted against its rate limit like every generation request."""
    return _count_generation(key, state)


BearerGenerationKeyDep = Annotated[KeyInfo, Depends(get_bearer_generation_key)]


def require_admin(
    settings: SettingsDep,
    x_admin_key: Annotated[str | None, Header(alias="x-admin-key", description="the admin key")] = None,
) -> None:
    if settings.admin_key is None:
        raise NotFound("not found: the admin API is disabled (set SD3SERVE_ADMIN_KEY to enable it)")
    expected = settings.admin_key.get_secret_value().encode()
    if not x_admin_key or not secrets.compare_digest(x_admin_key.encode(), expected):
        raise Forbidden("missing or wrong x-admin-key")


AdminDep = Annotated[None, Depends(require_admin)]
