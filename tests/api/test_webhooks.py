"""Signed webhooks through a live server, verified by an independent library (standardwebhooks): retries with
back-off, a restart between attempts, event filters, and targets refused on private networks."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from helpers.ledger import Store, open_store
from helpers.webhook_receiver import Receiver
from live_server import SMALL, run_live_server
from sd3serve.settings import Settings
from stub_engine import StubEngine
from waiting import wait_for

SUBMIT = "/v2/stable-diffusion-3.5-turbo-txt2img"


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


def test_signed_delivery_survives_failures_and_a_restart(tmp_path: Path, receiver: Receiver) -> None:
    """The real back-off is kept (tests/api/test_webhook_delivery.py drives it with a clock); here an operator's
    retry_now makes each retry due once the failed attempt is recorded."""
    settings = Settings(data_dir=tmp_path, device="cpu", webhook_allow_private=True)
    first = run_live_server(settings, engine=StubEngine())
    server = next(first)
    key = server.new_key(5)
    h = {"x-api-key": key}
    with server.client() as c:
        secret = c.post("/v1/webhook-secret", headers=h).json()["secret"]
        assert secret.startswith("whsec_")
        body = {**SMALL, "webhook_url": receiver.url("/fail-first/2")}
        task_id = c.post(SUBMIT, json=body, headers=h).json()["request_id"]
        store = _store(tmp_path)
        wait_for(lambda: _state(store, task_id) == ("pending", 1))  # the first attempt got 500
    first.close()  # the server goes away between attempts; the delivery lives in the database

    second = run_live_server(settings, engine=StubEngine())
    try:
        next(second)
        store.retry_now(task_id=task_id)
        wait_for(lambda: _state(store, task_id) == ("pending", 2))
        store.retry_now(task_id=task_id)
        wait_for(lambda: 204 in receiver.statuses)
        assert receiver.statuses == [500, 500, 204]
        ids = {hit.headers["webhook-id"] for hit in receiver.requests}
        assert len(ids) == 1  # one message, retried
        _, headers, body = receiver.requests[-1]
        payload = Webhook(secret).verify(body, headers)  # raises unless the signature is right
        assert payload["type"] == "task.completed"
        assert payload["data"]["request_id"] == task_id and payload["data"]["output"][0].endswith("/images/0")
        wait_for(lambda: store.deliveries(task_id=task_id)[0][1:] == ("delivered", 3))
        with pytest.raises(WebhookVerificationError):
            Webhook(secret).verify(body + b" ", headers)  # a tampered body fails verification
    finally:
        second.close()


def _store(tmp_path: Path) -> Store:
    """The server's ledger, as another process opens it."""
    return open_store(f"sqlite:///{tmp_path / 'sd3serve.db'}")


def _state(store: Store, task_id: str) -> tuple[str, int] | None:
    """(status, attempts) of the task's one delivery, None before it exists."""
    found = store.deliveries(task_id=task_id)
    return found[0][1:] if found else None


def _enqueued(engine: Any, task_id: str) -> bool:
    from sqlalchemy.orm import Session

    from sd3serve.ledger.schema import TaskWebhook

    with Session(engine) as s:
        return s.get_one(TaskWebhook, task_id).enqueued


def test_events_filter_and_refused_targets(tmp_path: Path) -> None:
    receiver = Receiver()
    gen = run_live_server(Settings(data_dir=tmp_path, device="cpu", webhook_allow_private=False),
                          engine=StubEngine())  # fmt: skip
    server = next(gen)
    try:
        key = server.new_key(5)
        h = {"x-api-key": key}
        with server.client() as c:
            no_secret = c.post(SUBMIT, json={**SMALL, "webhook_url": "https://93.184.215.14/x"}, headers=h)
            assert no_secret.status_code == 400 and "/v1/webhook-secret" in no_secret.json()["error"]
            c.post("/v1/webhook-secret", headers=h)
            for url, words in [(receiver.url("/ok"), "not a public address"), ("ftp://93.184.215.14/x", "http"),
                               ("http://169.254.169.254/latest", "not a public address")]:  # fmt: skip
                r = c.post(SUBMIT, json={**SMALL, "webhook_url": url}, headers=h)
                assert r.status_code == 400 and words in r.json()["error"], r.text
            bad_event = c.post(SUBMIT, json={**SMALL, "webhook_url": receiver.url("/ok"), "webhook_events": ["done"]},
                               headers=h)  # fmt: skip
            assert bad_event.status_code == 400 and "webhook_events" in bad_event.json()["error"]
            assert c.get("/v1/get-user-credits", headers=h).json() == {"credits": 5}  # nothing held for refusals
    finally:
        gen.close()
        receiver.close()


def test_only_the_chosen_events_are_sent(tmp_path: Path) -> None:
    receiver = Receiver()
    gen = run_live_server(Settings(data_dir=tmp_path, device="cpu", webhook_allow_private=True), engine=StubEngine())
    server = next(gen)
    try:
        key = server.new_key(5)
        h = {"x-api-key": key}
        with server.client() as c:
            c.post("/v1/webhook-secret", headers=h)
            quiet = c.post(SUBMIT, json={**SMALL, "webhook_url": receiver.url("/ok"), "webhook_events": ["failed"]},
                           headers=h).json()["request_id"]  # fmt: skip
            loud = c.post(SUBMIT, json={**SMALL, "webhook_url": receiver.url("/ok")}, headers=h).json()["request_id"]
            wait_for(lambda: len(receiver.requests) == 1)
            store = _store(tmp_path)
            wait_for(lambda: _enqueued(store.engine, quiet))  # its outcome was looked at: completed, not wanted
            assert store.deliveries(task_id=quiet) == []
            assert len(receiver.requests) == 1
            assert json.loads(receiver.requests[0].body)["data"]["request_id"] == loud
    finally:
        gen.close()
        receiver.close()
