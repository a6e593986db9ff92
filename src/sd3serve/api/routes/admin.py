"""The HTTP admin API: keys and credits, behind a separate admin key (``SD3SERVE_ADMIN_KEY``).

Disabled (404) unless the admin key is set; the server refuses to start with a weak one.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable
from decimal import Decimal
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Depends, Path, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, BeforeValidator, Field, ValidationError

from sd3serve.api.body import read_json
from sd3serve.api.deps import AccountsDep, AdminDep
from sd3serve.api.schemas import ErrorResponse
from sd3serve.service import KeyInfo
from sd3serve.service.amounts import CREDIT_DECIMALS, MAX_CREDITS_PER_CALL

router = APIRouter(prefix="/admin", tags=["admin"])

ADMIN_BODY_BYTES = 4096  # the admin bodies are a few fields

_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {
        "model": ErrorResponse,
        "description": "Bad input (credits not a JSON number, out of range; top-up of a revoked key)",
    },
    403: {"model": ErrorResponse, "description": "Missing or wrong x-admin-key"},
    404: {"model": ErrorResponse, "description": "Admin API disabled, or no such key"},
    413: {"model": ErrorResponse, "description": "Body too large"},
}

KeyId = Annotated[int, Path(ge=1, le=2**63 - 1, description="the key's id")]


@dataclasses.dataclass(frozen=True)
class NewKey(KeyInfo):
    key: str  # the API key; shown only here, stored only as a digest


def _json_number(value: object) -> object:
    """Credits are a JSON number (``10``, ``2.5``): a string ("10") or a boolean is refused, not converted."""
    if isinstance(value, str | bool):
        raise ValueError(f"credits must be a JSON number such as 10 or 2.5, not {type(value).__name__} {value!r}")
    return value


Credits = Annotated[Decimal, BeforeValidator(_json_number)]


class NewKeyIn(BaseModel):
    credits: Credits = Field(ge=0, le=MAX_CREDITS_PER_CALL, decimal_places=CREDIT_DECIMALS, allow_inf_nan=False)
    name: str = Field("", max_length=200)


class CreditsIn(BaseModel):
    credits: Credits = Field(gt=0, le=MAX_CREDITS_PER_CALL, decimal_places=CREDIT_DECIMALS, allow_inf_nan=False)


Model = TypeVar("Model", bound=BaseModel)


def admin_body(model: type[Model]) -> Callable[..., Awaitable[Model]]:  # pragma: no mutate block (runs at import)
    """A dependency that reads and validates the body only after the admin key was checked: FastAPI reads a
    declared body parameter before it runs any dependency, so an anonymous client could make it parse anything."""

    async def read(request: Request, _: AdminDep) -> Model:
        data = await read_json(request, limit=ADMIN_BODY_BYTES)
        try:
            return model.model_validate(data)
        except ValidationError as e:
            raise RequestValidationError([{**err, "loc": ("body", *err["loc"])} for err in e.errors()]) from None

    return read


def _documented_body(model: type[BaseModel]) -> dict[str, Any]:  # pragma: no mutate block (runs at import)
    schema = {"required": True, "content": {"application/json": {"schema": model.model_json_schema()}}}
    return {"requestBody": schema}


@router.post("/keys", summary="Create a key", responses=_ERRORS, openapi_extra=_documented_body(NewKeyIn))
async def create_key(body: Annotated[NewKeyIn, Depends(admin_body(NewKeyIn))], accounts: AccountsDep) -> NewKey:
    info, plaintext = await accounts.create_key(credits=body.credits, name=body.name)
    return NewKey(**dataclasses.asdict(info), key=plaintext)


@router.get("/keys", summary="List keys", responses=_ERRORS)
async def list_keys(_: AdminDep, accounts: AccountsDep) -> list[KeyInfo]:
    return await accounts.list_keys()


@router.post(
    "/keys/{key_id}/credits",
    summary="Add credits to a key",
    responses=_ERRORS,
    openapi_extra=_documented_body(CreditsIn),
)
async def add_credits(
    key_id: KeyId, body: Annotated[CreditsIn, Depends(admin_body(CreditsIn))], accounts: AccountsDep
) -> KeyInfo:
    return await accounts.add_credits(key_id, body.credits)


@router.post("/keys/{key_id}/revoke", summary="Revoke a key", responses=_ERRORS)
async def revoke_key(key_id: KeyId, _: AdminDep, accounts: AccountsDep) -> KeyInfo:
    return await accounts.revoke(key_id)
