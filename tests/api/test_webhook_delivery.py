"""Webhook sending against local receivers, driven round by round with the store's clock injected: the documented
retry schedule and its last retry, back-off respected, one deadline per attempt (trickling and hanging receivers),
per-key and per-host bounds with two keys, leases that outlive an attempt, and the connection pinned to the checked
address."""

from __future__ import annotations

import itertools
import socket
import ssl
import uuid
from collections.abc import Awaitable, Callable, Iterator
from contextlib import aclosing
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import anyio
import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from helpers.ledger import Store, open_store, sharing
from helpers.webhook_receiver import Receiver
from sd3serve.ledger.schema import WebhookDelivery
from sd3serve.ledger.webhooks import RETRY_DELAYS_S
from sd3serve.service.webhook_delivery import WebhookSender
from sd3serve.settings import Settings


class Clock:
    def __init__(self) -> None:
        self.now = datetime(2026, 1, 1, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


@dataclass
class Env:
    tmp_path: Path
    clock: Clock
    credits: Store
    store: Store
    key_a: int
    key_b: int
    receiver: Receiver

    def settings(self, **kw: Any) -> Settings:
        values: dict[str, Any] = {"data_dir": self.tmp_path, "device": "cpu", "webhook_allow_private": True} | kw
        return Settings(**values)

    def sending(self, settings: Settings | None = None, *, owner: str = "p1", **kw: Any) -> aclosing[WebhookSender]:
        """A sender for ``async with``, closed at the end (``kw``: its resolver, its TLS verification)."""
        return aclosing(WebhookSender(self.store.ledger, owner=owner, settings=settings or self.settings(), **kw))

    def add(self, key_id: int, url: str) -> str:
        """A pending delivery due now, as a finished task's subscription makes it."""
        msg_id = f"msg_{uuid.uuid4().hex}"
        with Session(self.credits.engine) as s, s.begin():
            s.add(WebhookDelivery(id=msg_id, key_id=key_id, task_id=f"task-{msg_id}", url=url,
                                  payload='{"type": "task.completed"}', status="pending",
                                  next_attempt_at=self.clock(), created_at=self.clock()))  # fmt: skip
        return msg_id

    def state(self, msg_id: str) -> tuple[str, int]:
        with Session(self.credits.engine) as s:
            d = s.get_one(WebhookDelivery, msg_id)
            return d.status, d.attempts

    def next_attempt_at(self, msg_id: str) -> datetime:
        with Session(self.credits.engine) as s:
            at = s.scalars(select(WebhookDelivery.next_attempt_at).where(WebhookDelivery.id == msg_id)).one()
            return at if at.tzinfo else at.replace(tzinfo=UTC)


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    credits = open_store(f"sqlite:///{tmp_path / 'sd3serve.db'}")
    credits.create_schema()
    clock = Clock()
    store = sharing(credits, clock=clock)
    key_a = credits.create_key(credits=1, name="a")[0].id
    key_b = credits.create_key(credits=1, name="b")[0].id
    store.rotate_secret(key_id=key_a)
    store.rotate_secret(key_id=key_b)
    receiver = Receiver()
    try:
        yield Env(tmp_path, clock, credits, store, key_a, key_b, receiver)
    finally:
        receiver.close()
        credits.close()


def local_names(calls: list[str] | None = None) -> Callable[[str, int], Awaitable[list[str]]]:
    """A resolver that puts every *.test name on loopback (so that per-host limits see different hosts)."""

    async def resolve(host: str, port: int) -> list[str]:
        if calls is not None:
            calls.append(host)
        return ["127.0.0.1"]

    return resolve


async def until(condition: Callable[[], object], timeout: float = 60) -> None:
    """Poll ``condition`` every 20 ms until it holds; AssertionError after ``timeout`` s (a generous bound)."""
    deadline = anyio.current_time() + timeout
    while not condition():
        if anyio.current_time() > deadline:
            raise AssertionError(f"condition not reached in {timeout:g} s")
        await anyio.sleep(0.02)


async def one_round(sender: WebhookSender) -> int:
    started = await sender.round()
    with anyio.fail_after(60):
        await sender.wait_idle()
    return started


@pytest.mark.anyio
async def test_the_documented_schedule_is_kept_to_the_second_and_the_last_retry_is_sent(env: Env) -> None:
    assert RETRY_DELAYS_S == (5, 30, 120, 600, 1800, 3600, 7200, 14400)  # README: 5 s, 30 s, 2 min ... 4 h
    failing = env.add(env.key_a, env.receiver.url("/fail"))
    fine = env.add(env.key_b, env.receiver.url("/ok"))

    async with env.sending() as sender:
        assert await one_round(sender) == 2  # both keys' first attempts
        assert env.state(fine) == ("delivered", 1)
        for attempt, delay in enumerate(RETRY_DELAYS_S, start=1):
            assert env.state(failing) == ("pending", attempt)
            assert env.next_attempt_at(failing) == env.clock() + timedelta(seconds=delay)
            env.clock.advance(delay - 1)
            assert await one_round(sender) == 0  # never before its back-off time
            env.clock.advance(1)
            assert await one_round(sender) == 1  # the retry, at its time; the last one too
        assert env.state(failing) == ("failed", 1 + len(RETRY_DELAYS_S))  # given up after the last retry
        env.clock.advance(30 * 24 * 3600)
        assert await one_round(sender) == 0  # nothing after it
    assert env.receiver.hits("/fail") == 9 and env.receiver.hits("/ok") == 1
    times = [at for at, _, _ in env.store.attempts(delivery_id=failing)]
    gaps = [(b - a).total_seconds() for a, b in itertools.pairwise(times)]
    assert gaps == list(RETRY_DELAYS_S)


@pytest.mark.anyio
async def test_a_success_on_the_last_retry_is_delivered(env: Env) -> None:
    last = env.add(env.key_a, env.receiver.url(f"/fail-first/{len(RETRY_DELAYS_S)}"))

    async with env.sending() as sender:
        await one_round(sender)
        for delay in RETRY_DELAYS_S:
            env.clock.advance(delay)
            await one_round(sender)
    assert env.state(last) == ("delivered", 9)
    assert [code for _, code, _ in env.store.attempts(delivery_id=last)] == [500] * 8 + [204]


@pytest.mark.anyio
async def test_trickling_and_hanging_receivers_cost_one_deadline_and_never_hold_another_key(env: Env) -> None:
    trickle = env.add(env.key_a, env.receiver.url("/trickle", "a.test"))
    hang = env.add(env.key_a, env.receiver.url("/hang", "a.test"))
    other = env.add(env.key_b, env.receiver.url("/ok", "b.test"))

    async with env.sending(env.settings(webhook_timeout_s=1.5), resolve=local_names()) as sender:
        assert await sender.round() == 3
        await until(lambda: env.state(other) == ("delivered", 1))
        with anyio.fail_after(60):  # a per-read timeout would trickle on for ever
            await sender.wait_idle()
    for msg_id in (trickle, hang):
        assert env.state(msg_id) == ("pending", 1)  # a failed attempt, retried on schedule
        [(_, code, error)] = env.store.attempts(delivery_id=msg_id)
        assert code is None and error is not None and "within 1.5 s" in error


@pytest.mark.anyio
async def test_one_keys_slow_receivers_hold_at_most_its_own_slots(env: Env) -> None:
    slow = [env.add(env.key_a, env.receiver.url(path, "a.test")) for path in ["/hang", "/trickle"]]

    settings = env.settings(webhook_timeout_s=120, webhook_per_key=4, webhook_per_host=8)
    async with env.sending(settings, resolve=local_names()) as sender:
        assert await sender.round() == 2
        env.clock.advance(1)  # four more of key A, and one of key B, after A's first two
        slow.extend(env.add(env.key_a, env.receiver.url(path, "a.test")) for path in ["/hang", "/trickle"] * 2)
        other = env.add(env.key_b, env.receiver.url("/ok", "b.test"))
        assert await sender.round() == 3  # two more of key A fill its four slots; key B's goes on
        await until(lambda: env.state(other) == ("delivered", 1), timeout=30)
        await until(lambda: sender.in_flight == 4)  # key A's four slots, still held by its receivers
        assert await sender.round() == 0  # A's other two wait for A's own slots
        assert all(env.state(msg_id) == ("pending", 0) for msg_id in slow)
    assert env.receiver.most_active[f"a.test:{env.receiver.port}"] == 4


@pytest.mark.anyio
async def test_one_host_gets_at_most_its_bound_from_all_keys(env: Env) -> None:
    shared = f"shared.test:{env.receiver.port}"
    for key_id in (env.key_a, env.key_b):
        for _ in range(3):
            env.add(key_id, env.receiver.url("/hang", "shared.test"))

    settings = env.settings(webhook_timeout_s=120, webhook_per_key=4, webhook_per_host=4)
    async with env.sending(settings, resolve=local_names()) as sender:
        assert await sender.round() == 4
        await until(lambda: env.receiver.active[shared] == 4)
        assert await sender.round() == 0  # the other two wait for the host
        elsewhere = env.add(env.key_b, env.receiver.url("/ok", "b.test"))
        assert await sender.round() == 1  # key B still has a slot, and another host is free
        await until(lambda: env.state(elsewhere) == ("delivered", 1))
    assert env.receiver.most_active[shared] == 4


@pytest.mark.anyio
async def test_the_lease_outlives_the_attempt_and_a_dead_process_is_taken_over(env: Env) -> None:
    slow = env.add(env.key_a, env.receiver.url("/hang"))
    settings = env.settings(webhook_timeout_s=100)

    async with env.sending(settings) as first, env.sending(settings, owner="p2") as second:
        assert first.lease_s > settings.webhook_timeout_s
        assert await first.round() == 1
        await until(lambda: env.receiver.hits("/hang") == 1)
        env.clock.advance(settings.webhook_timeout_s)  # as long as an attempt may last
        other = env.add(env.key_b, env.receiver.url("/ok"))
        assert await one_round(second) == 1  # key B's delivery; key A's attempt is still p1's
        assert env.state(other) == ("delivered", 1) and env.receiver.hits("/hang") == 1
        await first.aclose()  # p1 dies mid-attempt: nothing recorded, its lease runs out
        assert env.state(slow) == ("pending", 0)
        env.clock.advance(first.lease_s - settings.webhook_timeout_s + 1)
        env.receiver.released.set()
        assert await one_round(second) == 1  # taken over
    assert env.state(slow) == ("delivered", 1)
    ids = [headers["webhook-id"] for path, headers, _ in env.receiver.requests if path == "/hang"]
    assert ids == [slow, slow]  # the same message, sent again only after p1's lease ran out


@pytest.mark.anyio
async def test_the_connection_goes_to_the_checked_address(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    """A name that resolves to a public address when checked and to loopback afterwards (DNS rebinding)."""
    answers = {"rebind.test": ["93.184.215.14", "127.0.0.1", "127.0.0.1"]}
    calls: list[str] = []
    real = socket.getaddrinfo

    def fake_getaddrinfo(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        name = host.decode() if isinstance(host, bytes) else host  # HTTP clients pass the IDNA bytes
        if name in answers:
            calls.append(name)
            address = answers[name].pop(0) if len(answers[name]) > 1 else answers[name][0]
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, port))]
        return real(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", fake_getaddrinfo)
    rebound = env.add(env.key_a, env.receiver.url("/ok", "rebind.test"))
    settings = env.settings(webhook_allow_private=False, webhook_timeout_s=3)

    async with env.sending(settings) as sender:  # the system resolver
        assert await one_round(sender) == 1
    assert calls == ["rebind.test"]  # resolved once for the attempt
    assert env.receiver.hits("/ok") == 0  # loopback never reached
    assert env.state(rebound) == ("pending", 1)  # a failed attempt (the public address is not reachable here)


@pytest.mark.anyio
async def test_the_original_host_goes_in_the_host_header(env: Env) -> None:
    msg_id = env.add(env.key_a, env.receiver.url("/ok", "hooks.test"))
    calls: list[str] = []

    async with env.sending(resolve=local_names(calls)) as sender:
        await one_round(sender)
    assert env.state(msg_id) == ("delivered", 1) and calls == ["hooks.test"]
    [(_, headers, _)] = env.receiver.requests
    assert headers["host"] == f"hooks.test:{env.receiver.port}" and headers["webhook-id"] == msg_id
    assert headers["content-type"] == "application/json"


@pytest.mark.anyio
async def test_the_next_address_is_tried_only_when_one_cannot_connect(env: Env) -> None:
    """A name with two addresses, the first refusing connections (the receiver listens on 127.0.0.1 only): the
    second gets the delivery. With every address refusing, the attempt fails with the connection's error."""
    two = env.add(env.key_a, env.receiver.url("/ok", "two.test"))
    down = env.add(env.key_b, env.receiver.url("/ok", "down.test"))

    async def resolve(host: str, port: int) -> list[str]:
        return ["127.0.0.2", "127.0.0.1"] if host == "two.test" else ["127.0.0.2", "127.0.0.3"]

    async with env.sending(resolve=resolve) as sender:
        assert await one_round(sender) == 2
    assert env.state(two) == ("delivered", 1) and env.receiver.hits("/ok") == 1
    assert env.state(down) == ("pending", 1)
    [(_, _, error)] = env.store.attempts(delivery_id=down)
    assert error is not None and error.startswith("ConnectError")


@pytest.mark.anyio
async def test_any_error_is_a_failed_attempt_and_an_unsendable_url_is_given_up(env: Env) -> None:
    broken = env.add(env.key_a, "http://a.test/\x00")  # stored before URLs were checked as the sender reads them
    flaky = env.add(env.key_a, env.receiver.url("/ok", "flaky.test"))
    other = env.add(env.key_b, env.receiver.url("/ok", "b.test"))

    async def resolve(host: str, port: int) -> list[str]:
        if host == "flaky.test":
            raise RuntimeError("resolver exploded")
        return ["127.0.0.1"]

    async with env.sending(resolve=resolve) as sender:
        assert await one_round(sender) == 3
    assert env.state(broken) == ("failed", 1)  # it can never be sent: given up at once, not re-claimed for ever
    assert env.state(flaky) == ("pending", 1)  # retried on schedule
    [(_, _, error)] = env.store.attempts(delivery_id=flaky)
    assert error == "RuntimeError: resolver exploded"
    assert env.state(other) == ("delivered", 1)


def _test_ca() -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """(a server context with a certificate for hooks.test only, a client context that trusts its CA)."""
    import tempfile

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    def cert(name: str, key: Any, issuer: x509.Name, signer: Any, ca: bool) -> x509.Certificate:
        now = datetime.now(UTC)
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(issuer)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(hours=1))
            .not_valid_after(now + timedelta(hours=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if not ca:
            builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        return builder.sign(signer, hashes.SHA256())

    ca_key, leaf_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = cert("test CA", ca_key, x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test CA")]), ca_key, True)
    leaf = cert("hooks.test", leaf_key, ca.subject, ca_key, False)
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "c.pem").write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
        (Path(d) / "k.pem").write_bytes(leaf_key.private_bytes(serialization.Encoding.PEM,
                                        serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))  # fmt: skip
        server.load_cert_chain(Path(d) / "c.pem", Path(d) / "k.pem")
    client = ssl.create_default_context(cadata=ca.public_bytes(serialization.Encoding.PEM).decode())
    return server, client


@pytest.mark.anyio
async def test_tls_to_the_pinned_address_names_the_host_and_checks_its_certificate(env: Env) -> None:
    server_tls, client_tls = _test_ca()
    names: list[str | None] = []

    def seen(_sock: ssl.SSLObject, name: str | None, _ctx: ssl.SSLContext) -> None:
        names.append(name)

    server_tls.sni_callback = seen
    tls_receiver = Receiver(tls=server_tls)
    try:
        good = env.add(env.key_a, f"https://hooks.test:{tls_receiver.port}/ok")
        wrong = env.add(env.key_b, f"https://other.test:{tls_receiver.port}/ok")  # the certificate is not for it

        async with env.sending(resolve=local_names(), verify=client_tls) as sender:
            assert await one_round(sender) == 2
        assert env.state(good) == ("delivered", 1)
        assert env.state(wrong) == ("pending", 1)
        assert sorted(n or "" for n in names) == ["hooks.test", "other.test"]  # SNI: the URL's host, not the IP
        [(_, headers, _)] = tls_receiver.requests
        assert headers["host"] == f"hooks.test:{tls_receiver.port}"
    finally:
        tls_receiver.close()
