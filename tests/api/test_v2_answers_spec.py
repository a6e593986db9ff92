"""The answers of the generation routes, as the contract (/work/shared/spec/api-contract.md) and docs/api.md write
them, built from a task or a delivery without a server: v2 status and result bodies (absolute image URLs, the
metrics, 422 once FAILED), a base64 result written piece by piece that is still one JSON document with every image
whole, and v1's headers and bodies (bytes, or base64 JSON with every image)."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
from typing import Any

import pytest

from sd3serve.api.routes.common import cost_headers, credits_header, delivery_headers, image_response
from sd3serve.api.routes.v2 import BASE64_PIECE, _status_body, _task_answer, base64_result, result_body
from sd3serve.api.schemas import ImageFormat
from sd3serve.service import COMPLETED, FAILED, TaskView
from sd3serve.service.generation import Delivery
from sd3serve.service.order import Output

BASE = "https://sd.example.com"


def task(**fields: Any) -> TaskView:
    defaults: dict[str, Any] = {"id": "abc", "status": COMPLETED, "seed": 7, "base64": False,
                                "media_type": "image/png", "progress_step": 0, "progress_total": 0, "error": None,
                                "inference_time": 1.234567, "image_count": 2}  # fmt: skip
    return TaskView(**(defaults | fields))


def test_a_completed_result_has_one_absolute_url_per_image_and_its_metrics() -> None:
    body = result_body(task(), BASE).model_dump(exclude_none=True)
    assert body == {"request_id": "abc", "status": COMPLETED, "seed": 7, "metrics": {"inference_time": 1.2346},
                    "output": [f"{BASE}/v2/requests/abc/images/0", f"{BASE}/v2/requests/abc/images/1"]}  # fmt: skip


@pytest.mark.parametrize("status", ["QUEUED", "PROCESSING", FAILED, "CANCELLED"])
def test_an_unfinished_or_failed_result_has_no_output(status: str) -> None:
    body = result_body(task(status=status, error="boom" if status == FAILED else None), BASE)
    assert body.output == [] and body.metrics == {} and body.status == status and body.seed == 7
    assert (body.error == "boom") == (status == FAILED)


def test_a_failed_task_answers_422_with_the_same_body_and_others_200() -> None:
    failed = task(status=FAILED, error="the model failed")
    answer = _task_answer(_status_body(failed), failed)
    assert answer.status_code == 422
    assert json.loads(answer.body) == {"request_id": "abc", "status": FAILED, "error": "the model failed"}
    for status in ("QUEUED", "PROCESSING", COMPLETED, "CANCELLED"):
        t = task(status=status)
        assert _task_answer(_status_body(t), t).status_code == 200


def test_status_shows_progress_only_while_there_is_some() -> None:
    assert _status_body(task(status="QUEUED")).progress is None
    running = _status_body(task(status="PROCESSING", progress_step=3, progress_total=8))
    assert running.progress == {"step": 3, "steps": 8}
    started = _status_body(task(status="PROCESSING", progress_step=0, progress_total=8))
    assert started.progress == {"step": 0, "steps": 8}


class Reads:
    def __init__(self, images: list[bytes]) -> None:
        self.images = images
        self.asked: list[int] = []

    async def image(self, key: Any, task_id: str, index: int) -> tuple[bytes, str]:
        self.asked.append(index)
        return self.images[index], "image/png"


def collect(view: TaskView, images: list[bytes]) -> tuple[list[bytes], Reads]:
    reads = Reads(images)

    async def run() -> list[bytes]:
        return [piece async for piece in base64_result(view, reads, None, asyncio.Semaphore(1))]  # type: ignore[arg-type]

    return asyncio.run(run()), reads


def test_a_base64_result_is_one_json_document_with_every_image_whole() -> None:
    big = bytes(range(256)) * (BASE64_PIECE // 256 * 2 + 7)  # more than two pieces, not a whole number of them
    small = b"\x89PNG tiny"
    pieces, reads = collect(task(base64=True, image_count=3), [big, small, b""])
    document = json.loads(b"".join(pieces))
    assert document == {"request_id": "abc", "status": COMPLETED, "seed": 7, "metrics": {"inference_time": 1.2346},
                        "output": [base64.b64encode(big).decode(), base64.b64encode(small).decode(), ""]}  # fmt: skip
    assert reads.asked == [0, 1, 2]
    assert max(len(p) for p in pieces) <= BASE64_PIECE * 4 // 3  # written in pieces, never the whole image at once
    assert BASE64_PIECE % 3 == 0  # whole base64 quanta: the pieces concatenate to the base64 of the whole image


def test_a_base64_result_without_images() -> None:
    pieces, _ = collect(task(base64=True, image_count=0, inference_time=None), [])
    assert json.loads(b"".join(pieces)) == {"request_id": "abc", "status": COMPLETED, "output": [], "seed": 7,
                                            "metrics": {"inference_time": 0.0}}  # fmt: skip


@pytest.mark.parametrize(("value", "text"), [(3, "3"), (3.0, "3"), (2.5, "2.5"), (0, "0"), (100.25, "100.25"),
                                             (1000000, "1000000"), (1234567.5, "1234567.5"), (0.000001, "0.000001"),
                                             (9 * 10**12, "9000000000000"), (-0.0, "0"),
                                             (-0.0000001, "0")])  # fmt: skip  # never a negative zero
def test_credit_headers_are_whole_numbers_when_whole(value: float, text: str) -> None:
    assert credits_header(value) == text


def test_cost_headers_and_the_replay_marker() -> None:
    assert cost_headers(cost=2, remaining=8.5) == {"x-remaining-credits": "8.5", "x-cost": "2"}
    replayed = cost_headers(cost=2, remaining=8, replayed=True)
    assert replayed == {"x-remaining-credits": "8", "x-cost": "2", "idempotent-replayed": "true"}


def delivery(**fields: Any) -> Delivery:
    defaults: dict[str, Any] = {"files": [b"one", b"two"], "seed": 42, "seconds": 1.23456, "cost": 2.0,
                                "remaining": 98.0, "prompt_truncated": False}  # fmt: skip
    return Delivery(**(defaults | fields))


def test_every_generation_answer_has_the_contracts_headers() -> None:
    headers = delivery_headers(delivery())
    assert headers == {"x-remaining-credits": "98", "x-cost": "2", "x-generation-time": "1.235", "x-seed-value": "42"}
    truncated = delivery_headers(delivery(prompt_truncated=True, replayed=True))
    assert truncated["x-prompt-truncated"] == "true" and truncated["idempotent-replayed"] == "true"


def test_v1_answers_the_first_images_bytes_or_base64_json_with_every_image() -> None:
    raw = image_response(delivery(), Output(ImageFormat.png, 95))
    assert raw.status_code == 200 and raw.body == b"one" and raw.media_type == "image/png"
    assert raw.headers["x-seed-value"] == "42" and raw.headers["x-cost"] == "2"
    jpeg = image_response(delivery(), Output(ImageFormat.jpeg, 95))
    assert jpeg.media_type == "image/jpeg"
    encoded = image_response(delivery(), dataclasses.replace(Output(ImageFormat.webp, 80), base64=True))
    assert encoded.status_code == 200 and encoded.headers["content-type"] == "application/json"
    assert json.loads(encoded.body) == {"image": base64.b64encode(b"one").decode(), "seed": 42,
                                        "images": [base64.b64encode(b"one").decode(),
                                                   base64.b64encode(b"two").decode()]}  # fmt: skip
    assert encoded.headers["x-remaining-credits"] == "98"


def test_a_client_that_left_gets_499_and_no_image() -> None:
    gone = image_response(None, Output(ImageFormat.png, 95))
    assert gone.status_code == 499 and gone.body == b""
