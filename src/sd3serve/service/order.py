"""An order: one generation request in the service's terms, whichever wire it came from (v1, v2, image-to-image,
OpenAI). Routes decode their body into an order; the service runs it and never sees the wire format."""

from __future__ import annotations

import json
from dataclasses import dataclass

from sd3serve.engine.init_image import InitImage
from sd3serve.engine.job import GenerationJob
from sd3serve.imaging import ImageFormat
from sd3serve.ledger.idempotency import fingerprint

__all__ = ["GenerationJob", "InitImage", "Order", "Output", "Webhook"]


@dataclass(frozen=True)
class Output:
    """How the images are delivered: file format and quality, and whether a v2 result holds them as base64."""

    image_format: ImageFormat
    quality: int
    base64: bool = False

    @property
    def media_type(self) -> str:
        return self.image_format.media_type


@dataclass(frozen=True)
class Webhook:
    """v2: where the outcome is POSTed, and which outcomes."""

    url: str
    events: tuple[str, ...]


@dataclass(frozen=True)
class Order:
    """What to make (the job, LoRA adapters included), how to deliver it, and what identifies it for an
    Idempotency-Key: ``request`` is the request as canonical JSON (stored with a v2 task) and ``route`` the kind of
    endpoint, so an answer is replayed only to the same request on the same kind of endpoint."""

    job: GenerationJob
    output: Output
    request: str
    route: str
    webhook: Webhook | None = None

    @property
    def fingerprint(self) -> str:
        """Everything the request asks for: the generation and, for v2, where and what to POST."""
        canonical = self.request
        if self.webhook is not None:
            hook = {"webhook_url": self.webhook.url, "webhook_events": sorted(set(self.webhook.events))}
            canonical += "\n" + json.dumps(hook, sort_keys=True)
        return fingerprint(self.route, canonical)
