"""Helpers of the two-key isolation tests (tests/isolation)."""

from __future__ import annotations

import httpx

V1 = "/v1/stable-diffusion-3.5-turbo-txt2img"
V2 = "/v2/stable-diffusion-3.5-turbo-txt2img"


def h(key: str, **more: str) -> dict[str, str]:
    return {"x-api-key": key, **more}


def credits(c: httpx.Client, key: str) -> float:
    return float(c.get("/v1/get-user-credits", headers=h(key)).json()["credits"])


def status(c: httpx.Client, key: str, task_id: str) -> str:
    return str(c.get(f"/v2/requests/{task_id}/status", headers=h(key)).json()["status"])
