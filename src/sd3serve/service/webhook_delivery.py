"""Sending webhooks: Standard Webhooks signatures, targets checked against private networks, sent concurrently.

Each message carries ``webhook-id`` (the delivery's id, the same on every retry), ``webhook-timestamp`` (unix
seconds) and ``webhook-signature`` (``v1,`` + base64 of HMAC-SHA256 over ``id.timestamp.body`` with the key's
secret), as https://www.standardwebhooks.com specifies, so any Standard Webhooks library verifies it.

One attempt has one deadline for all of it (resolving the name, connecting, sending, the answer's status and
headers; the body is not read), so a receiver that trickles or hangs costs at most ``webhook_timeout_s``. The name
is resolved once per attempt, every address is checked, and the connection goes to exactly the checked address
(the URL's host stays in the Host header and the TLS server name): no second lookup can move it elsewhere. Each
process sends up to ``webhook_concurrency`` deliveries at once, at most ``webhook_per_key`` of one key and
``webhook_per_host`` to one host, so one key's slow receiver never holds another key's deliveries.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import ipaddress
import logging
import socket
import ssl
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import httpx

from sd3serve.ledger import Ledger
from sd3serve.ledger.webhooks import Delivery
from sd3serve.settings import Settings

log = logging.getLogger(__name__)

POLL_S = 1.0  # how often each process looks for finished tasks and due deliveries
CANDIDATES = 200  # due deliveries looked at per round to fill the free slots
Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[[str, int], Awaitable[list[str]]]  # (host, port) -> the addresses it has, in preference order
NAT64 = ipaddress.IPv6Network("64:ff9b::/96")


class TargetRefused(Exception):
    """The webhook target cannot or may not be sent to; the message says why."""


@dataclass(frozen=True)
class Target:
    """A webhook URL as the sender sends to it."""

    url: httpx.URL
    host: str  # the name to resolve and the TLS server name (IDNA, lower case), or the IP address
    port: int
    literal: Address | None  # the host, when it is an IP address

    @property
    def https(self) -> bool:
        return self.url.scheme == "https"


def parse_target(url: str) -> Target:
    """``url`` as the sender sends to it, or TargetRefused: http(s), a host, no credentials, printable ASCII only.
    The request is built exactly as for sending, so whatever passes here can be sent."""
    if any(ord(c) < 0x21 or ord(c) == 0x7F for c in url):
        raise TargetRefused("webhook_url must not contain spaces or control characters (percent-encode them)")
    try:
        parsed = httpx.URL(url)
        host, port = parsed.raw_host.decode("ascii"), parsed.port
    except Exception as e:  # httpx raises InvalidURL, ValueError or UnicodeError for what it cannot send
        raise TargetRefused(f"webhook_url is not a URL the server can send to: {e}") from None
    if parsed.scheme not in ("http", "https") or not host:
        raise TargetRefused("webhook_url must be an absolute http:// or https:// URL")
    if parsed.userinfo:
        raise TargetRefused("webhook_url must not contain credentials (user:password@)")
    if port is not None and not 0 < port < 65536:
        raise TargetRefused(f"webhook_url is not a URL the server can send to: port {port} does not exist")
    try:
        literal: Address | None = ipaddress.ip_address(host)
    except ValueError:
        literal = None
    target = Target(url=parsed, host=host, port=port or (443 if parsed.scheme == "https" else 80), literal=literal)
    try:
        _request(target, "::1" if isinstance(literal, ipaddress.IPv6Address) else "127.0.0.1", headers={}, body="",
                 timeout_s=1.0)  # fmt: skip
    except Exception as e:
        raise TargetRefused(f"webhook_url is not a URL the server can send to: {e}") from None
    return target


def _embedded_ipv4(address: Address) -> list[ipaddress.IPv4Address]:
    """IPv4 addresses an IPv6 address leads to (NAT64, 6to4, Teredo client): they are checked too."""
    if isinstance(address, ipaddress.IPv4Address):
        return []
    found = [address.sixtofour] if address.sixtofour is not None else []
    if address.teredo is not None:
        found.append(address.teredo[1])
    if address in NAT64:
        found.append(ipaddress.IPv4Address(int(address) & 0xFFFFFFFF))
    return found


def address_problem(address: Address, *, allow_private: bool) -> str | None:
    """Why a webhook may not be sent to ``address``, or None. Never to a multicast, broadcast, unspecified or
    reserved IPv4 address (nothing there is one receiver); unless ``allow_private``, only to public unicast addresses:
    no loopback, private, shared (CGNAT) or link-local (cloud metadata) ones, also not inside an IPv6 address."""
    mapped = address.ipv4_mapped if isinstance(address, ipaddress.IPv6Address) else None
    for a in [mapped] if mapped is not None else [address, *_embedded_ipv4(address)]:
        reserved = isinstance(a, ipaddress.IPv4Address) and a.is_reserved  # 240.0.0.0/4 with the broadcast address
        if a.is_multicast or a.is_unspecified or reserved:
            return "not a unicast address"
        if allow_private:
            continue
        site_local = isinstance(a, ipaddress.IPv6Address) and a.is_site_local
        if not a.is_global or a.is_private or a.is_loopback or a.is_link_local or site_local:
            return "not a public address (set SD3SERVE_WEBHOOK_ALLOW_PRIVATE=true to allow private targets)"
    return None


def checked_addresses(target: Target, addresses: Sequence[str], *, allow_private: bool) -> list[str]:
    """The addresses ``target`` resolved to, each checked; TargetRefused when there is none or any is refused
    (a name that also points inside the network is refused as a whole)."""
    if not addresses:
        raise TargetRefused(f"webhook_url: {target.host!r} has no address")
    out = []
    for text in addresses:
        address = ipaddress.ip_address(text.split("%", 1)[0])  # an IPv6 scope (fe80::1%eth0) is not part of it
        if (problem := address_problem(address, allow_private=allow_private)) is not None:
            shown = f"{address} is" if target.literal is not None else f"{target.host} resolves to {address}, which is"
            raise TargetRefused(f"webhook_url: {shown} {problem}")
        out.append(str(address))
    return out


def _getaddrinfo(host: str, port: int) -> list[str]:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as e:
        raise TargetRefused(f"webhook_url: cannot resolve {host!r} ({e})") from None
    return [str(info[4][0]) for info in infos]


async def system_resolve(host: str, port: int) -> list[str]:
    """The system resolver, in a worker thread (the attempt's deadline abandons a slow lookup)."""
    return await asyncio.to_thread(_getaddrinfo, host, port)


def target_problem(url: str, *, allow_private: bool) -> str | None:
    """Why ``url`` may not receive webhooks, or None: the checks of an attempt, with the system resolver (blocking:
    call it from a worker thread). When private targets are allowed a name is not resolved here (each attempt
    resolves and checks it), so that names only reachable later are accepted."""
    try:
        target = parse_target(url)
        literal = target.literal
        if literal is None and allow_private:
            return None
        addresses = [str(literal)] if literal is not None else _getaddrinfo(target.host, target.port)
        checked_addresses(target, addresses, allow_private=allow_private)
    except TargetRefused as e:
        return str(e)
    return None


def sign(secret: str, msg_id: str, timestamp: int, body: str) -> str:
    key = base64.b64decode(secret.removeprefix("whsec_"))
    mac = hmac.new(key, f"{msg_id}.{timestamp}.{body}".encode(), hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode("ascii")


def _request(target: Target, address: str, *, headers: dict[str, str], body: str, timeout_s: float) -> httpx.Request:
    """The POST to ``target`` over a connection to exactly ``address``: the URL's host in Host and in TLS SNI (and
    the certificate is checked against it)."""
    extensions: dict[str, object] = {"timeout": httpx.Timeout(timeout_s).as_dict()}
    if target.https and target.literal is None:
        extensions["sni_hostname"] = target.host.rstrip(".")
    return httpx.Request(
        "POST", target.url.copy_with(host=address), content=body,
        headers={**headers, "host": target.url.netloc.decode("ascii")}, extensions=extensions,
    )  # fmt: skip


@dataclass(frozen=True)
class Outcome:
    status_code: int | None
    error: str | None
    permanent: bool  # it can never succeed: given up at once


class WebhookSender:
    """This process's sending: picks due deliveries within its limits each round and sends each in its own task."""

    def __init__(
        self, ledger: Ledger, *, settings: Settings, owner: str | None = None, resolve: Resolver = system_resolve,
        verify: ssl.SSLContext | bool = True,
    ) -> None:  # fmt: skip
        """``owner``: the name its leases go by (this process's instance id by default)."""
        self.ledger, self.settings, self.resolve = ledger, settings, resolve
        self.owner = ledger.instance_id if owner is None else owner
        self.deadline_s = settings.webhook_timeout_s
        # Longer than an attempt can take, with room to record it: no other process sends the same attempt.
        self.lease_s = 2 * self.deadline_s + 60
        self._client = httpx.AsyncClient(
            follow_redirects=False, trust_env=False, verify=verify, timeout=self.deadline_s,
            # one connection per attempt, to its pinned address: never reused for another host of the same address
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=0),
        )  # fmt: skip
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._per_key: Counter[int] = Counter()
        self._per_host: Counter[str] = Counter()

    @property
    def in_flight(self) -> int:
        return len(self._tasks)

    async def round(self) -> int:
        """Enqueue what finished and start what is due and fits the limits; returns how many attempts started."""
        await self.ledger.run(lambda tx: tx.webhooks.enqueue_finished())
        free = self.settings.webhook_concurrency - len(self._tasks)
        if free <= 0:
            return 0
        per_key, per_host = self.settings.webhook_per_key, self.settings.webhook_per_host
        full = [k for k, n in self._per_key.items() if n >= per_key]
        due = await self.ledger.run(lambda tx: tx.webhooks.due(limit=CANDIDATES, per_key=per_key, skip_keys=full))
        picked: dict[str, tuple[int, str]] = {}
        for d in due:
            host = _host_of(d.url)
            if d.id in self._tasks or self._per_key[d.key_id] >= per_key or self._per_host[host] >= per_host:
                continue
            picked[d.id] = (d.key_id, host)
            self._per_key[d.key_id] += 1
            self._per_host[host] += 1
            if len(picked) == free:
                break
        try:
            ids = list(picked)
            leased = await self.ledger.run(lambda tx: tx.webhooks.lease(ids, owner=self.owner, seconds=self.lease_s))
        except BaseException:
            for key_id, host in picked.values():
                self._release(key_id, host)
            raise
        for delivery in leased:
            _, host = picked.pop(delivery.id)
            self._tasks[delivery.id] = asyncio.create_task(self._deliver(delivery, host), name=f"webhook {delivery.id}")
        for key_id, host in picked.values():  # leased by another process meanwhile
            self._release(key_id, host)
        return len(leased)

    async def wait_idle(self) -> None:
        """Until every attempt started so far is recorded (tests, shutdown)."""
        while self._tasks:
            await asyncio.wait(list(self._tasks.values()))

    async def aclose(self) -> None:
        """Stop the attempts in flight (their leases run out and another round sends them) and the client."""
        if self._client.is_closed:
            return
        for task in list(self._tasks.values()):
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*self._tasks.values(), return_exceptions=True)
        await self._client.aclose()

    async def run(self) -> None:
        try:
            while True:
                try:
                    await self.round()
                except Exception as e:  # the database may be away; try again next round
                    log.warning("webhook delivery failed: %s", e)
                await asyncio.sleep(POLL_S)
        finally:
            await asyncio.shield(self.aclose())

    def _release(self, key_id: int, host: str) -> None:
        self._per_key[key_id] -= 1
        self._per_host[host] -= 1
        if self._per_key[key_id] <= 0:
            del self._per_key[key_id]
        if self._per_host[host] <= 0:
            del self._per_host[host]

    async def _deliver(self, d: Delivery, host: str) -> None:
        try:
            start = time.perf_counter()
            outcome = await self.attempt(d)
            duration_ms = (time.perf_counter() - start) * 1000
            await self.ledger.run(lambda tx: tx.webhooks.record(
                d, status_code=outcome.status_code, error=outcome.error, duration_ms=duration_ms,
                give_up=outcome.permanent,
            ))  # fmt: skip
            if outcome.error or not (outcome.status_code and 200 <= outcome.status_code < 300):
                log.info("webhook %s to %s: attempt %d failed (%s)", d.id, d.url, d.attempts + 1,
                         outcome.error or outcome.status_code)  # fmt: skip
        except Exception as e:  # recording failed (the database is away): the lease runs out, the attempt is retried
            log.warning("webhook %s: could not record the attempt: %s", d.id, e)
        finally:
            del self._tasks[d.id]
            self._release(d.key_id, host)

    async def attempt(self, d: Delivery) -> Outcome:
        """One attempt within the deadline; whatever goes wrong is its error, never an exception."""
        try:
            target = parse_target(d.url)
        except TargetRefused as e:
            return Outcome(None, str(e), True)
        if not d.secret:
            return Outcome(None, "the key has no webhook secret", True)
        try:
            async with asyncio.timeout(self.deadline_s):
                return Outcome(await self._post(d, target), None, False)
        except TimeoutError:
            error = f"no complete answer within {self.deadline_s:g} s (SD3SERVE_WEBHOOK_TIMEOUT_S)"
        except TargetRefused as e:  # DNS may have changed since submission: retried, it may change back
            error = str(e)
        except Exception as e:
            error = f"{type(e).__name__}: {e}"
        return Outcome(None, error[:500], False)

    async def _post(self, d: Delivery, target: Target) -> int:
        allow_private = self.settings.webhook_allow_private
        if target.literal is not None:
            addresses = checked_addresses(target, [str(target.literal)], allow_private=allow_private)
        else:
            addresses = checked_addresses(target, await self.resolve(target.host, target.port),
                                          allow_private=allow_private)  # fmt: skip
        timestamp = int(time.time())
        headers = {
            "content-type": "application/json",
            "webhook-id": d.id,
            "webhook-timestamp": str(timestamp),
            "webhook-signature": sign(d.secret, d.id, timestamp, d.payload),
            "user-agent": "sd3serve-webhooks",
        }
        for i, address in enumerate(addresses):  # each one checked above; the next only when one cannot connect
            request = _request(target, address, headers=headers, body=d.payload, timeout_s=self.deadline_s)
            try:
                response = await self._client.send(request, stream=True)
            except httpx.ConnectError:
                if i == len(addresses) - 1:
                    raise
                continue
            await response.aclose()  # the status is the answer; the body is not read
            return response.status_code
        raise AssertionError("unreachable: checked_addresses returns at least one address")


def _host_of(url: str) -> str:
    try:
        return parse_target(url).host
    except TargetRefused:
        return ""


async def webhook_loop(ledger: Ledger, *, settings: Settings) -> None:
    await WebhookSender(ledger, settings=settings).run()
