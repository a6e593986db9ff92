"""Results, images and task status belong to the key that submitted them."""

from __future__ import annotations

import httpx

from helpers.two_keys import V2, h, status
from live_server import SMALL, LiveServer
from waiting import wait_for


def test_another_key_cannot_read_status_result_or_images(stub_server: LiveServer) -> None:
    a, b = stub_server.new_key(5), stub_server.new_key(5)
    with stub_server.client() as c:
        task_a = c.post(V2, json={**SMALL, "batch_size": 2}, headers=h(a)).json()["request_id"]
        task_b = c.post(V2, json=SMALL, headers=h(b)).json()["request_id"]
        wait_for(lambda: status(c, a, task_a) == "COMPLETED" and status(c, b, task_b) == "COMPLETED")
        for path in ("status", "images/0", "images/1", "events"):
            assert c.get(f"/v2/requests/{task_a}/{path}", headers=h(a)).status_code == 200, path
            r = c.get(f"/v2/requests/{task_a}/{path}", headers=h(b))
            assert r.status_code == 404, (path, r.text)
        assert c.get(f"/v2/requests/{task_a}", headers=h(a)).status_code == 200
        assert c.get(f"/v2/requests/{task_a}", headers=h(b)).status_code == 404
        # The other key's own task is its own to read, not the first key's.
        assert c.get(f"/v2/requests/{task_b}/images/0", headers=h(b)).status_code == 200
        assert c.get(f"/v2/requests/{task_b}/images/0", headers=h(a)).status_code == 404


def test_image_index_edges(stub_server: LiveServer) -> None:
    key = stub_server.new_key(5)
    with stub_server.client() as c:
        task = c.post(V2, json={**SMALL, "batch_size": 3}, headers=h(key)).json()["request_id"]
        wait_for(lambda: status(c, key, task) == "COMPLETED")
        codes = [c.get(f"/v2/requests/{task}/images/{i}", headers=h(key)).status_code for i in range(4)]
        assert codes == [200, 200, 200, 404]  # the last image, and one past it
        assert c.get(f"/v2/requests/{task}/images/-1", headers=h(key)).status_code in (400, 404, 422)


def _result_urls(c: httpx.Client, key: str, task: str) -> list[str]:
    return list(c.get(f"/v2/requests/{task}", headers=h(key)).json()["output"])


def test_each_key_sees_its_own_images(stub_server: LiveServer) -> None:
    a, b = stub_server.new_key(5), stub_server.new_key(5)
    with stub_server.client() as c:
        ta = c.post(V2, json={**SMALL, "seed": 1}, headers=h(a)).json()["request_id"]
        tb = c.post(V2, json={**SMALL, "seed": 2}, headers=h(b)).json()["request_id"]
        wait_for(lambda: status(c, a, ta) == "COMPLETED" and status(c, b, tb) == "COMPLETED")
        img_a = c.get(f"/v2/requests/{ta}/images/0", headers=h(a)).content
        img_b = c.get(f"/v2/requests/{tb}/images/0", headers=h(b)).content
        assert img_a != img_b  # the stub paints the seed: each key got its own request's picture
        assert len(_result_urls(c, a, ta)) == len(_result_urls(c, b, tb)) == 1
