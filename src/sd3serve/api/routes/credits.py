"""``GET /v1/get-user-credits``."""

from __future__ import annotations

from fastapi import APIRouter

from sd3serve.api.deps import ApiKeyDep
from sd3serve.api.schemas import CreditsResponse, ErrorResponse

router = APIRouter(tags=["credits"])


@router.get(
    "/v1/get-user-credits",
    summary="Remaining credits of the calling key",
    responses={401: {"model": ErrorResponse, "description": "Missing, unknown or revoked API key"}},
)
async def get_user_credits(key: ApiKeyDep) -> CreditsResponse:
    return CreditsResponse(credits=key.credits)
