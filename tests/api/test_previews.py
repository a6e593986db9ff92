"""Live previews over HTTP: ``GET /v2/requests/{id}/events?preview=true`` on the demo model, one step at a time.

The engine holds after every step until the test has read that step's event, so each step's event is seen."""

from __future__ import annotations

import base64
import io
import json
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest
from httpx_sse import connect_sse
from PIL import Image

from gated import GatedEngine
from live_server import LiveServer, run_live_server
from sd3serve.engine.job import GenerationJob
from sd3serve.settings import Settings
from waiting import wait_for

SUBMIT = "/v2/stable-diffusion-3.5-turbo-txt2img"
BODY = {"prompt": "a yellow square at the top right on a blue background", "width": 256, "height": 256, "steps": 4,
        "seed": 11}  # fmt: skip


class SteppedEngine(GatedEngine):
    """Waits for the gate before each batch, then (while ``hold``) for one ``step`` release after every step."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.step = threading.Semaphore(0)
        self.hold = False

    def _run_gated(
        self, jobs: list[GenerationJob], progress: Any, live: object = None, previews: object = None
    ) -> list:
        def stepping(done: int, total: int) -> None:
            progress(done, total)
            if self.hold and done >= 1:
                assert self.step.acquire(timeout=60), "the test did not release the step"

        return super()._run_gated(jobs, stepping, live, previews)


@pytest.fixture(scope="module")
def stepped(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LiveServer, SteppedEngine]]:
    settings = Settings(device="cpu", data_dir=tmp_path_factory.mktemp("previews"), batch_wait_ms=0)
    engine = SteppedEngine(settings)
    gen = run_live_server(settings, engine=engine)
    server = next(gen)
    engine.gate, engine.hold = threading.Event(), True
    try:
        yield server, engine
    finally:
        engine.hold = False
        engine.gate.set()
        for _ in range(8):
            engine.step.release()
        gen.close()


def events(c: httpx.Client, key: str, task_id: str, *, preview: bool = True, **headers: str) -> Any:
    url = f"/v2/requests/{task_id}/events" + ("?preview=true" if preview else "")
    return connect_sse(c, "GET", url, headers={"x-api-key": key, **headers})


def picture(data: dict[str, Any]) -> np.ndarray:
    p = data["preview"]
    assert p["media_type"] == "image/jpeg"
    image = Image.open(io.BytesIO(base64.b64decode(p["image"])))
    assert image.format == "JPEG" and image.size == (p["width"], p["height"])
    return np.asarray(image.convert("RGB")).astype(float)


def test_a_preview_per_step_that_ends_as_the_picture_and_resumes(stepped: tuple[LiveServer, SteppedEngine]) -> None:
    server, engine = stepped
    service = server.app.state.sd3.service
    key, other = server.new_key(5), server.new_key(5)
    with server.client() as c:
        task_id = c.post(SUBMIT, json=BODY, headers={"x-api-key": key}).json()["request_id"]
        assert engine.paused.wait(60)

        # Another key never sees this task's stream, previews or not, and watches nothing.
        assert c.get(f"/v2/requests/{task_id}/events?preview=true", headers={"x-api-key": other}).status_code == 404
        assert not service.previews.watched(task_id)

        # A plain stream beside it stays as it was: no preview in any event.
        plain: list[tuple[str, dict[str, Any]]] = []

        def read_plain() -> None:
            with server.client() as c2, events(c2, key, task_id, preview=False) as source:
                plain.extend((s.event, json.loads(s.data)) for s in source.iter_sse())

        reader = threading.Thread(target=read_plain)
        reader.start()

        seen: list[tuple[int, dict[str, Any]]] = []
        with events(c, key, task_id) as source:
            it = source.iter_sse()
            assert next(it).event == "queued"
            wait_for(lambda: service.previews.watched(task_id))
            engine.gate.set()
            for sse in it:
                assert sse.event == "progress", sse.event
                data = json.loads(sse.data)
                seen.append((int(sse.id), data))
                if data["step"] == 2:
                    break  # disconnect, the engine holding after step 2
                if data["step"] >= 1:
                    engine.step.release()
        with_previews = [(i, d) for i, d in seen if d["step"] >= 1]
        assert [d["step"] for _, d in with_previews] == [1, 2]  # every step, each with its own picture
        assert all(d["preview"]["step"] == d["step"] and i == d["step"] + 1 for i, d in with_previews)
        assert all("preview" not in d for _, d in seen if d["step"] == 0)

        # Resuming after step 2's event (id 3), previews still on: steps 3 and 4, then the result.
        resumed: list[tuple[str, str, dict[str, Any]]] = []
        with events(c, key, task_id, **{"Last-Event-ID": "3"}) as source:
            it = source.iter_sse()
            wait_for(lambda: service.previews.watched(task_id))
            engine.step.release()  # step 2's hold
            for sse in it:
                resumed.append((sse.id, sse.event, json.loads(sse.data)))
                if sse.event == "progress":
                    engine.step.release()
        assert [(i, e) for i, e, _ in resumed] == [("4", "progress"), ("5", "progress"), ("1000", "completed")]
        assert [d["preview"]["step"] for _, e, d in resumed if e == "progress"] == [3, 4]
        reader.join(60)
        assert not service.previews.watched(task_id)  # every preview stream closed: nothing computed any more

        # The last preview is the picture, small: mean colour and layout agree with the final image.
        last = picture(resumed[1][2])
        final_bytes = c.get(f"/v2/requests/{task_id}/images/0", headers={"x-api-key": key}).content
        final = Image.open(io.BytesIO(final_bytes)).convert("RGB").resize(last.shape[1::-1], Image.Resampling.BOX)
        final_px = np.asarray(final).astype(float)
        assert np.abs(last.mean((0, 1)) - final_px.mean((0, 1))).max() < 15
        assert np.corrcoef(last.ravel(), final_px.ravel())[0, 1] > 0.9

    assert plain and plain[-1][0] == "completed"
    assert all(set(d) == {"step", "steps", "eta_s"} for e, d in plain if e == "progress")


def test_the_parameter_is_documented(stepped: tuple[LiveServer, SteppedEngine]) -> None:
    server, _ = stepped
    spec = httpx.get(f"{server.url}/openapi.json").json()
    params = {p["name"]: p for p in spec["paths"]["/v2/requests/{task_id}/events"]["get"]["parameters"]}
    assert params["preview"]["in"] == "query" and params["preview"]["schema"]["type"] == "boolean"
    assert "x0 estimate" in params["preview"]["description"]
