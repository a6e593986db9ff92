"""Which webhook targets are refused, by the code the sender uses: at submission (400, nothing charged, for either
key) and at delivery. Non-unicast addresses never; private ones only when allowed; IPv6 and IPv4 inside IPv6 too."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import pytest

from live_server import SMALL, run_live_server
from sd3serve.service.webhook_delivery import TargetRefused, parse_target, target_problem
from sd3serve.settings import Settings
from stub_engine import StubEngine

SUBMIT = "/v2/stable-diffusion-3.5-turbo-txt2img"

NOT_UNICAST = [
    "http://224.0.0.1/x", "http://239.255.255.250:1900/", "http://255.255.255.255/", "http://0.0.0.0/",
    "http://240.0.0.1/", "http://[ff02::1]/", "http://[::]/", "http://[::ffff:224.0.0.1]/", "http://[::ffff:0.0.0.0]/",
]  # fmt: skip
PRIVATE = [
    "http://127.0.0.1:8080/x", "http://10.1.2.3/", "http://192.168.0.1/", "http://172.16.0.1/", "http://100.64.0.1/",
    "http://169.254.169.254/latest", "http://[::1]/", "http://[fe80::1]/", "http://[fc00::1]/",
    "http://[fec0::1]/", "http://[::ffff:127.0.0.1]/", "http://[::ffff:10.0.0.1]/",
    "http://[64:ff9b::7f00:1]/", "http://[2002:7f00:1::]/",
]  # fmt: skip
PUBLIC = ["http://93.184.215.14/x", "https://93.184.215.14:8443/a?b=c", "http://[2606:2800:21f:cb07:6820:80da:af6b:8b2c]/",
          "http://[::ffff:93.184.215.14]/"]  # fmt: skip
UNSENDABLE = [
    ("http://93.184.215.14/\x00", "control characters"), ("http://93.184.215.14/a b", "spaces"),
    ("http://93.184.215.14/\x7f", "control characters"), ("http://93.184.215.14/\r\nx-evil: 1", "control characters"),
    ("ftp://93.184.215.14/x", "http"), ("http:///x", "http"), ("//93.184.215.14/x", "http"),
    ("http://user:pw@93.184.215.14/", "credentials"), ("http://93.184.215.14:99999/", "not a URL"),
    ("http://exa mple.com/", "spaces"),
]  # fmt: skip


@pytest.mark.parametrize("url", NOT_UNICAST)
@pytest.mark.parametrize("allow_private", [False, True])
def test_non_unicast_targets_are_refused_even_when_private_ones_are_allowed(url: str, allow_private: bool) -> None:
    problem = target_problem(url, allow_private=allow_private)
    assert problem is not None and "not a unicast address" in problem


@pytest.mark.parametrize("url", PRIVATE)
def test_private_targets_are_refused_unless_allowed(url: str) -> None:
    problem = target_problem(url, allow_private=False)
    assert problem is not None and "not a public address" in problem
    assert target_problem(url, allow_private=True) is None


@pytest.mark.parametrize("url", PUBLIC)
def test_public_targets_pass(url: str) -> None:
    assert target_problem(url, allow_private=False) is None


@pytest.mark.parametrize(("url", "words"), UNSENDABLE)
def test_urls_the_sender_cannot_send_to_are_refused(url: str, words: str) -> None:
    with pytest.raises(TargetRefused, match=words):
        parse_target(url)
    for allow_private in (False, True):
        problem = target_problem(url, allow_private=allow_private)
        assert problem is not None and words in problem


@pytest.mark.parametrize(
    ("answers", "words"),
    [(["93.184.215.14", "10.0.0.1"], "not a public address"), (["224.0.0.251"], "not a unicast address"),
     (["2606:2800:21f:cb07:6820:80da:af6b:8b2c", "::ffff:127.0.0.1"], "not a public address"), ([], "no address")],
)  # fmt: skip
def test_a_name_is_refused_when_any_of_its_addresses_is(
    answers: list[str], words: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    def fake_getaddrinfo(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        assert host == "hooks.example"
        return [(socket.AF_INET6 if ":" in a else socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, port))
                for a in answers]  # fmt: skip

    monkeypatch.setattr(socket, "getaddrinfo", fake_getaddrinfo)
    problem = target_problem("https://hooks.example/in", allow_private=False)
    assert problem is not None and words in problem and "hooks.example" in problem


def test_the_api_refuses_unsendable_and_non_unicast_targets_for_either_key(tmp_path: Path) -> None:
    gen = run_live_server(Settings(data_dir=tmp_path, device="cpu", webhook_allow_private=True), engine=StubEngine())
    server = next(gen)
    try:
        keys = [server.new_key(5), server.new_key(5)]
        with server.client() as c:
            for key in keys:
                h = {"x-api-key": key}
                c.post("/v1/webhook-secret", headers=h)
                for url, words in [("http://93.184.215.14/hook\x00", "webhook_url"),
                                   ("http://93.184.215.14/a\tb", "webhook_url"),
                                   ("http://224.0.0.1/hook", "not a unicast address"),
                                   ("http://0.0.0.0:8080/hook", "not a unicast address")]:  # fmt: skip
                    r = c.post(SUBMIT, json={**SMALL, "webhook_url": url}, headers=h)
                    assert r.status_code == 400 and words in r.json()["error"], r.text
                assert c.get("/v1/get-user-credits", headers=h).json() == {"credits": 5}  # nothing held
    finally:
        gen.close()
