"""Dependencies of the routes: the running services and the caller's key, as ``Annotated`` aliases.

Each is ``async def``: none blocks, and FastAPI runs a plain ``def`` dependency on the thread pool, a thread hop per
dependency and request. The dependencies of every request (the key, the generation call) take the services whole
rather than one part each: each dependency in the tree costs every request its resolution."""

from __future__ import annotations

import secrets
from collections.abc import Awaitable, Callable
from typing import Annotated, Any

from fastapi import Depends, Header, Request

from sd3serve.api.state import app_state
from sd3serve.errors import Forbidden, InvalidApiKey, NotFound
from sd3serve.service import Accounts, GenerationService, KeyInfo, Services, StreamHub, TaskReads
from sd3serve.settings import Settings


async def get_services(request: Request) -> Services:
    return app_state(request.app)


ServicesDep = Annotated[Services, Depends(get_services)]


def _part(name: str) -> Any:
    """A dependency that returns one of the services."""

    async def get(services: ServicesDep) -> Any:
        return getattr(services, name)

    get.__name__ = f"get_{name}"
    return Depends(get)


SettingsDep = Annotated[Settings, _part("settings")]
ServiceDep = Annotated[GenerationService, _part("service")]
ReadsDep = Annotated[TaskReads, _part("reads")]
AccountsDep = Annotated[Accounts, _part("accounts")]
StreamHubDep = Annotated[StreamHub, _part("streams")]


async def get_api_key(
    request: Request,
    services: ServicesDep,
    x_api_key: Annotated[str | None, Header(alias="x-api-key", description="your API key")] = None,
) -> KeyInfo:
    key = await services.accounts.authenticate(x_api_key)
    request.state.key_id = key.id  # for the access log: the key's id, never the key
    return key


ApiKeyDep = Annotated[KeyInfo, Depends(get_api_key)]


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


def counted(key_dependency: Callable[..., Awaitable[KeyInfo]]) -> Callable[..., Awaitable[KeyInfo]]:
    """The key ``key_dependency`` finds, counted against its rate limit (generation requests only: polling is free)."""

    async def counted_key(services: ServicesDep, key: KeyInfo = Depends(key_dependency)) -> KeyInfo:  # noqa: B008
        await services.accounts.count_generation(key)
        return key

    return counted_key


GenerationKeyDep = Annotated[KeyInfo, Depends(counted(get_api_key))]


async def get_bearer_key(
    request: Request,
    services: ServicesDep,
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
    key = await services.accounts.authenticate(api_key)
    request.state.key_id = key.id
    return key


BearerKeyDep = Annotated[KeyInfo, Depends(get_bearer_key)]


BearerGenerationKeyDep = Annotated[KeyInfo, Depends(counted(get_bearer_key))]


async def require_admin(
    settings: SettingsDep,
    x_admin_key: Annotated[str | None, Header(alias="x-admin-key", description="the admin key")] = None,
) -> None:
    if settings.admin_key is None:
        raise NotFound("not found: the admin API is disabled (set SD3SERVE_ADMIN_KEY to enable it)")
    expected = settings.admin_key.get_secret_value().encode()
    if not x_admin_key or not secrets.compare_digest(x_admin_key.encode(), expected):
        raise Forbidden("missing or wrong x-admin-key")


AdminDep = Annotated[None, Depends(require_admin)]
