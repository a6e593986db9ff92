"""``POST /v1/webhook-secret``: the key's webhook signing secret, new each call and shown only in the answer."""

from __future__ import annotations

from fastapi import APIRouter
from pydantic import BaseModel, Field

from sd3serve.api.deps import AccountsDep, ApiKeyDep
from sd3serve.api.schemas import ErrorResponse

router = APIRouter(tags=["webhooks"])


class WebhookSecretResponse(BaseModel):
    secret: str = Field(description="whsec_ + base64: verify the webhook-signature header of deliveries with it")


@router.post(
    "/v1/webhook-secret",
    summary="Create (or replace) this key's webhook signing secret",
    description="Deliveries for this key's v2 tasks are signed with it (Standard Webhooks). It is shown only here; "
    "calling again replaces it at once, for deliveries not yet sent too.",
    responses={401: {"model": ErrorResponse, "description": "Missing, unknown or revoked API key"}},
)
async def rotate_webhook_secret(key: ApiKeyDep, accounts: AccountsDep) -> WebhookSecretResponse:
    return WebhookSecretResponse(secret=await accounts.rotate_webhook_secret(key))
