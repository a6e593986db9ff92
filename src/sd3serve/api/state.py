"""The running services of an app (``service/runtime.py``), as its lifespan left them on ``app.state``."""

from __future__ import annotations

from fastapi import FastAPI

from sd3serve.service import Services


def app_state(app: FastAPI) -> Services:
    state: Services | None = getattr(app.state, "sd3", None)
    if state is None:
        raise RuntimeError("the application has not started (its lifespan starts the services)")
    return state
