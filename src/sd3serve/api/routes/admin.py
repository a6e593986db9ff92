"""The HTTP admin API: keys and credits, behind a separate admin key (``SD3SERVE_ADMIN_KEY``).

Disabled (404) unless the admin key is set; the server refuses to start with a weak one.
"""

from __future__ import annotations

import dataclasses
from datetime import datetime
from decimal import Decimal
from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel, Field

from sd3serve.api.deps import AdminDep, StoreDep
from sd3serve.api.schemas import ErrorResponse
from sd3serve.store.credits import KeyInfo

router = APIRouter(prefix="/admin", tags=["admin"])

_ERRORS: dict[int | str, dict[str, Any]] = {
    403: {"model": ErrorResponse, "description": "Missing or wrong x-admin-key"},
    404: {"model": ErrorResponse, "description": "Admin API disabled, or no such key"},
}


class KeyOut(BaseModel):
    id: int
    name: str
    prefix: str
    credits: float
    spent: float
    created_at: datetime
    revoked: bool

    @classmethod
    def of(cls, k: KeyInfo) -> KeyOut:
        return cls(**dataclasses.asdict(k))


class NewKeyIn(BaseModel):
    credits: Decimal = Field(ge=0, le=10**12, allow_inf_nan=False)
    name: str = Field("", max_length=200)


class NewKeyOut(KeyOut):
    key: str = Field(description="the API key; shown only here, stored only as a digest")


class CreditsIn(BaseModel):
    credits: Decimal = Field(gt=0, le=10**12, allow_inf_nan=False)


@router.post("/keys", summary="Create a key", responses=_ERRORS)
def create_key(body: NewKeyIn, _: AdminDep, store: StoreDep) -> NewKeyOut:
    info, plaintext = store.create_key(credits=body.credits, name=body.name)
    return NewKeyOut(**KeyOut.of(info).model_dump(), key=plaintext)


@router.get("/keys", summary="List keys", responses=_ERRORS)
def list_keys(_: AdminDep, store: StoreDep) -> list[KeyOut]:
    return [KeyOut.of(k) for k in store.list_keys()]


@router.post("/keys/{key_id}/credits", summary="Add credits to a key", responses=_ERRORS)
def add_credits(key_id: int, body: CreditsIn, _: AdminDep, store: StoreDep) -> KeyOut:
    return KeyOut.of(store.add_credits(key_id=key_id, credits=body.credits))


@router.post("/keys/{key_id}/revoke", summary="Revoke a key", responses=_ERRORS)
def revoke_key(key_id: int, _: AdminDep, store: StoreDep) -> KeyOut:
    return KeyOut.of(store.revoke(key_id=key_id))
