"""What one key can hold open, and what that costs the others: event streams and base64 result downloads are counted
per key and per process (429 / 503 with Retry-After), share one database poll per process, and a stalled reader
holds no shared slot; bad stream and task-id input is a 400; the connection cap answers the API's JSON error."""

from __future__ import annotations

import base64
import contextlib
import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import event

from helpers.postgres import database_url, pg_database
from live_server import LiveServer
from sd3serve.service.streams import stream_limit
from sd3serve.settings import Settings
from served import (
    FLAT,
    LARGE_BASE64,
    HoldingEngine,
    NoiseEngine,
    connect,
    error_of,
    held_streams,
    read_head,
    send_get,
    serve,
    submit,
    wait_status,
)
from stub_engine import StubEngine
from waiting import wait_for


def settings(tmp_path: Path, **overrides: Any) -> Settings:
    return Settings(data_dir=tmp_path, device="cpu", shutdown_grace_s=5, **overrides)


@contextlib.contextmanager
def holding_server(tmp_path: Path, **overrides: Any) -> Iterator[tuple[LiveServer, HoldingEngine, httpx.Client]]:
    """A server whose v2 tasks stay PROCESSING (so their event streams stay open) until the block ends."""
    engine = HoldingEngine()
    with serve(settings(tmp_path, **overrides), engine) as server, httpx.Client(base_url=server.url, timeout=30) as c:
        try:
            yield server, engine, c
        finally:
            engine.release.set()


def open_events(stack: contextlib.ExitStack, c: httpx.Client, api_key: str, task_id: str) -> httpx.Response:
    """An event stream, left open until ``stack`` closes; for a 200, its first event has been read."""
    r = stack.enter_context(c.stream("GET", f"/v2/requests/{task_id}/events", headers={"x-api-key": api_key}))
    if r.status_code == 200:
        lines = r.iter_lines()
        stack.callback(lines.close)  # kept open with the stream: closing the iterator would close the response
        assert next(line for line in lines if line.startswith("event:")) in ("event: queued", "event: progress")
    return r


# --- limits on open streams ---------------------------------------------------------------------------------


def test_a_key_holds_at_most_its_streams_and_other_keys_are_unaffected(tmp_path: Path) -> None:
    with holding_server(tmp_path, max_streams_per_key=3) as (server, _, c), contextlib.ExitStack() as stack:
        a, b = server.new_key(10), server.new_key(10)
        task_a, task_b = submit(c, a, FLAT), submit(c, b, FLAT)
        first = [open_events(stack, c, a, task_a) for _ in range(3)]  # at the limit: every one opens
        assert [r.status_code for r in first] == [200, 200, 200]
        with c.stream("GET", f"/v2/requests/{task_a}/events", headers={"x-api-key": a}) as past:  # one past it
            assert past.status_code == 429 and past.headers["retry-after"] == "5"
            assert "SD3SERVE_MAX_STREAMS_PER_KEY=3" in error_of(past)
        assert open_events(stack, c, b, task_b).status_code == 200  # another key: its own limit
        assert c.get(f"/v2/requests/{task_a}/status", headers={"x-api-key": a}).status_code == 200  # polling is free
        first[0].close()  # a stream that ends gives its slot back
        wait_for(lambda: held_streams(server, a) == 2, 30)
        assert open_events(stack, c, a, task_a).status_code == 200


def test_streams_of_all_keys_together_are_capped_and_leave_other_requests_alone(tmp_path: Path) -> None:
    with holding_server(tmp_path, max_streams=4, max_streams_per_key=3) as (server, _, c), contextlib.ExitStack() as st:
        a, b, third = server.new_key(10), server.new_key(10), server.new_key(10)
        task_a, task_b, task_c = submit(c, a, FLAT), submit(c, b, FLAT), submit(c, third, FLAT)
        assert [open_events(st, c, a, task_a).status_code for _ in range(3)] == [200] * 3
        assert open_events(st, c, b, task_b).status_code == 200  # the 4th stream of the process
        with c.stream("GET", f"/v2/requests/{task_c}/events", headers={"x-api-key": third}) as past:
            assert past.status_code == 503 and past.headers["retry-after"] == "5"
            assert "SD3SERVE_MAX_STREAMS" in error_of(past)
        assert c.get("/healthz").status_code == 200
        assert c.get(f"/v2/requests/{task_c}/status", headers={"x-api-key": third}).status_code == 200
        assert held_streams(server) == 4


def test_streams_never_take_more_than_half_of_the_connections() -> None:
    assert stream_limit(Settings(max_connections=10, max_streams=256)) == 5
    assert stream_limit(Settings(max_connections=1000, max_streams=100)) == 100
    assert stream_limit(Settings(max_connections=0, max_streams=7)) == 7  # no connection cap
    assert stream_limit(Settings(max_connections=1, max_streams=7)) == 1
    assert stream_limit(Settings()) == 256


def test_streams_share_one_poll_of_the_database(tmp_path: Path) -> None:
    """12 streams read the task table about as often as 1 (one poll per process, fanned out in memory)."""
    with holding_server(tmp_path) as (server, _, c), contextlib.ExitStack() as stack:
        keys = [server.new_key(10) for _ in range(2)]
        tasks = [submit(c, k, FLAT) for k in keys for _ in range(2)]
        selects = [0]

        @event.listens_for(server.store.engine, "before_cursor_execute")
        def count(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
            if statement.lstrip().upper().startswith("SELECT") and "FROM tasks" in statement:
                selects[0] += 1

        def reads_in(window_s: float) -> int:
            selects[0] = 0
            time.sleep(window_s)  # a measurement window, not a wait for something
            return selects[0]

        open_events(stack, c, keys[0], tasks[0])
        one = reads_in(2.0)
        for i in range(11):
            open_events(stack, c, keys[i % 2], tasks[i % 4])
        twelve = reads_in(2.0)
        print(f"task-table reads in 2 s: 1 stream {one}, 12 streams {twelve}")
        assert one > 0 and twelve <= 3 * one + 5


# --- base64 downloads: stalled readers ----------------------------------------------------------------------


def large_result(server: LiveServer, c: httpx.Client, api_key: str) -> str:
    task_id = submit(c, api_key, LARGE_BASE64)
    wait_status(c, api_key, task_id, "COMPLETED")
    return task_id


def stalled_download(server: LiveServer, api_key: str, task_id: str) -> socket.socket:
    """A client that asks for a large base64 result, takes its headers, and then reads nothing."""
    sock = connect(server, receive_buffer=4096)
    send_get(sock, f"/v2/requests/{task_id}", api_key)
    status, _, _ = read_head(sock)
    assert status == 200
    return sock


def test_stalled_base64_readers_of_one_key_do_not_delay_another_keys_download(tmp_path: Path) -> None:
    with (
        serve(settings(tmp_path, max_streams_per_key=5), NoiseEngine()) as server,
        httpx.Client(base_url=server.url, timeout=30) as c,  # the deadline of the other key's download
    ):
        a, b = server.new_key(100), server.new_key(100)
        task_a, task_b = large_result(server, c, a), large_result(server, c, b)
        stalled = [stalled_download(server, a, task_a) for _ in range(5)]  # more than the 4 image reads at once
        try:
            wait_for(lambda: held_streams(server, a) == 5, 30)
            past = c.get(f"/v2/requests/{task_a}", headers={"x-api-key": a})  # the key's 6th download
            assert past.status_code == 429 and "SD3SERVE_MAX_STREAMS_PER_KEY" in past.json()["error"]
            r = c.get(f"/v2/requests/{task_b}", headers={"x-api-key": b})
            assert r.status_code == 200
            output = r.json()["output"]
            assert len(output) == 4 and all(base64.b64decode(o)[:8] == b"\x89PNG\r\n\x1a\n" for o in output)
            assert r.json()["status"] == "COMPLETED" and r.json()["seed"] >= 0
        finally:
            for sock in stalled:
                sock.close()


def test_a_reader_that_takes_nothing_is_cut_off_after_the_write_timeout(tmp_path: Path) -> None:
    with (
        serve(settings(tmp_path, write_timeout_s=1), NoiseEngine()) as server,
        httpx.Client(base_url=server.url, timeout=30) as c,
    ):
        a = server.new_key(100)
        task_a = large_result(server, c, a)
        stalled = [stalled_download(server, a, task_a) for _ in range(2)]
        try:
            assert held_streams(server, a) == 2
            wait_for(lambda: held_streams(server, a) == 0, 60)  # cut off: their slots are back
            r = c.get(f"/v2/requests/{task_a}", headers={"x-api-key": a})  # a reader that reads gets it all
            assert r.status_code == 200 and len(r.json()["output"]) == 4
        finally:
            for sock in stalled:
                sock.close()


def test_base64_result_over_events_is_the_result_body(tmp_path: Path) -> None:
    with serve(settings(tmp_path), NoiseEngine()) as server, httpx.Client(base_url=server.url, timeout=60) as c:
        a = server.new_key(100)
        task_a = submit(c, a, {**LARGE_BASE64, "width": 64, "height": 64, "batch_size": 2})
        wait_status(c, a, task_a, "COMPLETED")
        with c.stream("GET", f"/v2/requests/{task_a}/events", headers={"x-api-key": a}) as r:
            lines = list(r.iter_lines())
        data = next(line for line in lines if line.startswith("data: "))
        assert lines[:2] == ["id: 1000", "event: completed"]
        result = c.get(f"/v2/requests/{task_a}", headers={"x-api-key": a}).json()
        assert json.loads(data.removeprefix("data: ")) == result


# --- bad input ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stub_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    with serve(settings(tmp_path_factory.mktemp("stub")), StubEngine()) as server:
        yield server


@pytest.mark.parametrize("value", [b"\xb2", b"\xc2\xb2", b"1\xb2", b"abc", b"-1", b"1e3"])
def test_a_last_event_id_that_is_not_one_of_ours_is_400(stub_server: LiveServer, value: bytes) -> None:
    with httpx.Client(base_url=stub_server.url, timeout=30) as c:
        key = stub_server.new_key(5)
        task_id = submit(c, key, FLAT)
        r = c.get(f"/v2/requests/{task_id}/events", headers={"x-api-key": key, "Last-Event-ID": value})
        assert r.status_code == 400 and r.headers["content-type"] == "application/json"
        assert "Last-Event-ID" in r.json()["error"] and "digits" in r.json()["error"]
        wait_status(c, key, task_id, "COMPLETED")
        ok = c.get(f"/v2/requests/{task_id}/events", headers={"x-api-key": key, "Last-Event-ID": "3"})
        assert ok.status_code == 200 and "event: completed" in ok.text


@pytest.fixture(params=["sqlite", "postgresql"])
def any_database(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Settings]:
    if request.param == "sqlite":
        yield settings(tmp_path)
        return
    with pg_database("sd3serve_test") as name:
        yield settings(tmp_path, database_url=database_url(name))


TASK_ROUTES = [
    ("GET", "/v2/requests/{}/status"), ("GET", "/v2/requests/{}"), ("GET", "/v2/requests/{}/images/0"),
    ("GET", "/v2/requests/{}/events"), ("POST", "/v2/requests/{}/cancel"), ("DELETE", "/v2/requests/{}"),
]  # fmt: skip


def test_control_characters_in_a_task_id_are_400_on_every_route(any_database: Settings) -> None:
    with serve(any_database, StubEngine()) as server, httpx.Client(base_url=server.url, timeout=30) as c:
        key = server.new_key(5)
        h = {"x-api-key": key}
        real = submit(c, key, FLAT)
        for bad in ["%00", f"{real}%00", "a%01b", "a%1F", "a%7F", "a%0Ab", "%C2%85", "a%20b", "a.b", "x" * 65]:
            for method, route in TASK_ROUTES:
                r = c.request(method, route.format(bad), headers=h)
                assert r.status_code == 400, (method, route, bad, r.status_code, r.text)
                assert "request_id" in r.json()["error"]
        wait_status(c, key, real, "COMPLETED")
        assert c.get(f"/v2/requests/{real}", headers=h).status_code == 200
        assert c.get("/v2/requests/no-such-task/status", headers=h).status_code == 404


# --- the connection cap ---------------------------------------------------------------------------------------


def test_the_connection_cap_answers_the_documented_json_error(tmp_path: Path) -> None:
    with serve(settings(tmp_path, max_connections=4), StubEngine()) as server:
        idle = [connect(server) for _ in range(4)]
        try:
            with httpx.Client(base_url=server.url, timeout=5) as c:
                r = wait_for(lambda: (res := c.get("/healthz")).status_code == 503 and res, 10)
        finally:
            for sock in idle:
                sock.close()
        assert r.headers["content-type"] == "application/json" and r.headers["retry-after"] == "1"
        assert "SD3SERVE_MAX_CONNECTIONS" in r.json()["error"]
        with httpx.Client(base_url=server.url, timeout=5) as c:
            wait_for(lambda: c.get("/healthz").status_code == 200, 10)


def test_a_stream_follows_a_task_run_by_another_process(any_database: Settings) -> None:
    """Two servers on one database: the stream is opened on the one that does not run the task."""
    runner, other = HoldingEngine(), HoldingEngine()
    try:
        with (
            serve(any_database, runner) as first,
            serve(any_database, other) as second,
            httpx.Client(base_url=first.url, timeout=30) as c1,
            httpx.Client(base_url=second.url, timeout=30) as c2,
        ):
            key = first.new_key(5)
            task_id = submit(c1, key, FLAT)
            with c2.stream("GET", f"/v2/requests/{task_id}/events", headers={"x-api-key": key}) as r:
                assert r.status_code == 200
                names: list[str] = []
                for line in r.iter_lines():
                    if line.startswith("event:"):
                        names.append(line.removeprefix("event: "))
                        runner.release.set()  # the run ends while the other process's stream listens
            assert names[-1] == "completed" and set(names[:-1]) <= {"queued", "progress"}
    finally:
        runner.release.set()
        other.release.set()
