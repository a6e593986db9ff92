"""Sending webhooks: Standard Webhooks signatures, targets checked against private networks, one loop per process.

Each message carries ``webhook-id`` (the delivery's id, the same on every retry), ``webhook-timestamp`` (unix
seconds) and ``webhook-signature`` (``v1,`` + base64 of HMAC-SHA256 over ``id.timestamp.body`` with the key's
secret), as https://www.standardwebhooks.com specifies, so any Standard Webhooks library verifies it.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import ipaddress
import logging
import socket
import time
from urllib.parse import urlsplit

import httpx
from fastapi.concurrency import run_in_threadpool

from sd3serve.settings import Settings
from sd3serve.store.webhooks import Delivery, WebhookStore

log = logging.getLogger(__name__)

POLL_S = 1.0  # how often each process looks for finished tasks and due deliveries


def sign(secret: str, msg_id: str, timestamp: int, body: str) -> str:
    key = base64.b64decode(secret.removeprefix("whsec_"))
    mac = hmac.new(key, f"{msg_id}.{timestamp}.{body}".encode(), hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode("ascii")


def target_problem(url: str, *, allow_private: bool) -> str | None:
    """Why ``url`` may not receive webhooks, or None: http(s) only, and (unless allowed) no address that is not
    public — loopback, private, link-local (cloud metadata), multicast or reserved — so that a webhook cannot
    reach into the server's own network."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return "webhook_url is not a valid URL"
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return "webhook_url must be an absolute http:// or https:// URL"
    if allow_private:
        return None
    try:
        infos = socket.getaddrinfo(parts.hostname, port or (443 if parts.scheme == "https" else 80))
    except (OSError, UnicodeError):
        return f"webhook_url: cannot resolve {parts.hostname!r}"
    for info in infos:
        address = ipaddress.ip_address(info[4][0])
        if not address.is_global:
            return (f"webhook_url: {parts.hostname} resolves to {address}, which is not a public address "
                    "(set SD3SERVE_WEBHOOK_ALLOW_PRIVATE=true to allow private targets)")  # fmt: skip
    return None


async def send(client: httpx.AsyncClient, d: Delivery, settings: Settings) -> tuple[int | None, str | None, bool]:
    """(status code, error, permanent): one attempt."""
    problem = await run_in_threadpool(target_problem, d.url, allow_private=settings.webhook_allow_private)
    if problem is not None:
        return None, problem, True  # checked again at delivery time: DNS may have changed since submission
    if not d.secret:
        return None, "the key has no webhook secret", True
    timestamp = int(time.time())
    headers = {
        "content-type": "application/json",
        "webhook-id": d.id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": sign(d.secret, d.id, timestamp, d.payload),
        "user-agent": "sd3serve-webhooks",
    }
    try:
        r = await client.post(d.url, content=d.payload, headers=headers, timeout=settings.webhook_timeout_s)
    except httpx.HTTPError as e:
        return None, f"{type(e).__name__}: {e}"[:500], False
    return r.status_code, None, False


async def deliver_due(store: WebhookStore, *, owner: str, settings: Settings, client: httpx.AsyncClient) -> int:
    """Enqueue what finished, send what is due; returns how many attempts were made."""
    await run_in_threadpool(store.enqueue_finished)
    due = await run_in_threadpool(store.claim, owner=owner)
    for d in due:
        start = time.perf_counter()
        status, error, permanent = await send(client, d, settings)
        duration_ms = (time.perf_counter() - start) * 1000
        await run_in_threadpool(store.record, d, status_code=status, error=error, duration_ms=duration_ms,
                                give_up=permanent)  # fmt: skip
        if error or not (status and 200 <= status < 300):
            log.info("webhook %s to %s: attempt %d failed (%s)", d.id, d.url, d.attempts + 1, error or status)
    return len(due)


async def webhook_loop(store: WebhookStore, *, owner: str, settings: Settings) -> None:
    async with httpx.AsyncClient(follow_redirects=False) as client:
        while True:
            try:
                await deliver_due(store, owner=owner, settings=settings, client=client)
            except Exception as e:  # the database may be away; try again next round
                log.warning("webhook delivery failed: %s", e)
            await asyncio.sleep(POLL_S)
