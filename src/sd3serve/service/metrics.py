"""Prometheus metrics, one registry per app (so several apps in one process never collide)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from sd3serve.engine.protocol import EngineStats

__all__ = ["CONTENT_TYPE_LATEST", "Metrics"]

_SECONDS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "sd3serve_requests", "HTTP requests by route and status", ["method", "route", "status"], registry=r
        )
        self.in_flight = Gauge("sd3serve_requests_in_flight", "HTTP requests being served", registry=r)
        self.queue_depth = Gauge("sd3serve_queue_depth", "Requests waiting for the engine", registry=r)
        self.batch_images = Histogram(
            "sd3serve_batch_images", "Images per forward batch", buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32), registry=r
        )
        self.batch_seconds = Histogram("sd3serve_batch_seconds", "Seconds per batch", buckets=_SECONDS, registry=r)
        self.generation_seconds = Histogram(
            "sd3serve_generation_seconds", "Seconds from admission to images, per request", buckets=_SECONDS,
            registry=r,
        )  # fmt: skip
        self.images = Counter("sd3serve_images", "Images delivered", registry=r)
        self.credits_charged = Counter("sd3serve_credits_charged", "Credits charged", registry=r)
        self.prompt_cache_hits = Gauge("sd3serve_prompt_cache_hits", "Prompt-embedding cache hits", registry=r)
        self.prompt_cache_misses = Gauge("sd3serve_prompt_cache_misses", "Prompt-embedding cache misses", registry=r)
        self.prompt_cache_entries = Gauge("sd3serve_prompt_cache_entries", "Prompts in the cache", registry=r)
        self.prompt_cache_bytes = Gauge("sd3serve_prompt_cache_bytes", "Bytes the prompt cache holds", registry=r)
        self.engine_running = Gauge("sd3serve_engine_running", "Requests in the batch on the model", registry=r)
        self.engine_batches = Gauge("sd3serve_engine_batches", "Batches run since start", registry=r)
        self.engine_failed_batches = Gauge("sd3serve_engine_failed_batches", "Batches that raised", registry=r)
        self.engine_aborted = Gauge(
            "sd3serve_engine_aborted", "Requests stopped early because every requester was gone", registry=r
        )

    def observe_batch(self, images: int, seconds: float) -> None:
        self.batch_images.observe(images)
        self.batch_seconds.observe(seconds)

    def observe_engine(self, stats: EngineStats) -> None:
        self.queue_depth.set(stats.queued)
        self.engine_running.set(stats.running)
        self.engine_batches.set(stats.batches)
        self.engine_failed_batches.set(stats.failed_batches)
        self.engine_aborted.set(stats.aborted)
        self.prompt_cache_hits.set(stats.prompt_cache_hits)
        self.prompt_cache_misses.set(stats.prompt_cache_misses)
        self.prompt_cache_entries.set(stats.prompt_cache_entries)
        self.prompt_cache_bytes.set(stats.prompt_cache_bytes)

    def render(self) -> bytes:
        return generate_latest(self.registry)
