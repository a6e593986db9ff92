"""The application's state, typed: built once in the lifespan and read by the routes through ``api/deps.py``."""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import FastAPI

from sd3serve.api.metrics import Metrics
from sd3serve.api.service import GenerationService
from sd3serve.api.streams import StreamHub
from sd3serve.engine.protocol import Engine
from sd3serve.settings import Settings
from sd3serve.store.credits import CreditStore
from sd3serve.store.idempotency import IdempotencyStore
from sd3serve.store.ratelimit import RateLimiter
from sd3serve.store.recovery import Recovery
from sd3serve.store.tasks import TaskStore
from sd3serve.store.webhooks import WebhookStore


@dataclass(frozen=True)
class AppState:
    settings: Settings
    metrics: Metrics
    store: CreditStore
    tasks: TaskStore
    idempotency: IdempotencyStore
    webhooks: WebhookStore
    rate_limiter: RateLimiter
    recovery: Recovery
    engine: Engine
    service: GenerationService
    streams: StreamHub


def app_state(app: FastAPI) -> AppState:
    state: AppState | None = getattr(app.state, "sd3", None)
    if state is None:
        raise RuntimeError("the application has not started (its lifespan builds the state)")
    return state
