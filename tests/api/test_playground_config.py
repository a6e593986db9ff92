"""The playground's configuration (`GET /playground/config.json`) carries the contract's fields, defaults and limits
(/work/shared/spec/api-contract.md, "Request body"), read from the request schemas, so the page never holds a
limit of its own; the event-stream path is offered only where the server has the route."""

from __future__ import annotations

from fastapi import APIRouter, FastAPI

from sd3serve.api.routes.playground import EVENTS_PATH, has_route, request_fields
from sd3serve.api.schemas import Img2ImgRequest


def test_the_fields_carry_the_contracts_defaults_and_limits() -> None:
    fields = request_fields()
    assert fields["prompt"]["type"] == "string" and fields["prompt"]["maxLength"] == 10000
    assert fields["prompt"]["minLength"] == 1 and "default" not in fields["prompt"]
    assert (fields["steps"]["default"], fields["steps"]["minimum"], fields["steps"]["maximum"]) == (4, 1, 70)
    assert (fields["guidance_scale"]["minimum"], fields["guidance_scale"]["maximum"]) == (1, 15)
    assert fields["guidance_scale"]["default"] == 1
    seed = fields["seed"]
    assert (seed["default"], seed["minimum"], seed["maximum"]) == (98552302, -1, 2**32 - 1)
    for side in ("width", "height"):
        assert (fields[side]["default"], fields[side]["minimum"], fields[side]["maximum"]) == (1024, 64, 2048)
        assert "16" in fields[side]["description"]
    assert (fields["batch_size"]["default"], fields["batch_size"]["minimum"], fields["batch_size"]["maximum"]) == (
        1, 1, 10)  # fmt: skip
    assert (fields["image_quality"]["minimum"], fields["image_quality"]["maximum"]) == (10, 100)
    assert fields["negative_prompt"]["default"] == "low quality, blurry"
    assert fields["base64"]["default"] is False and fields["base64"]["type"] == "boolean"


def test_enumerations_are_resolved_from_their_definitions() -> None:
    fields = request_fields()
    assert fields["sampler"]["default"] == "dpmpp_2m" and "euler" in fields["sampler"]["enum"]
    assert "uni_pc_bh2" in fields["sampler"]["enum"] and len(fields["sampler"]["enum"]) >= 29
    assert fields["scheduler"]["default"] == "sgm_uniform"
    assert set(fields["scheduler"]["enum"]) >= {"simple", "sgm_uniform", "karras", "exponential", "ddim_uniform",
                                                "beta", "normal", "linear_quadratic", "kl_optimal"}  # fmt: skip
    assert fields["image_format"]["enum"] == ["jpeg", "png", "webp"] and fields["image_format"]["default"] == "jpeg"
    assert fields["aspect_ratio"]["default"] == "custom" and "21:9" in fields["aspect_ratio"]["enum"]
    for prop in fields.values():
        assert "$ref" not in prop and "allOf" not in prop


def test_image_to_image_adds_the_strength() -> None:
    strength = request_fields(Img2ImgRequest)["strength"]
    assert (strength["default"], strength["minimum"], strength["maximum"]) == (0.7, 0, 1)
    assert "strength" not in request_fields()


def test_the_event_stream_is_offered_only_where_its_route_exists() -> None:
    bare = FastAPI()
    assert not has_route(bare, EVENTS_PATH.format(task_id="0"))
    router = APIRouter()

    @router.get(EVENTS_PATH)
    def events(task_id: str) -> None:
        return None

    app = FastAPI()
    app.include_router(router)
    assert has_route(app, EVENTS_PATH.format(task_id="0"))
    assert has_route(app, "/v2/requests/abc/events")
    assert not has_route(app, "/v2/requests/abc/events/more")
    assert not has_route(app, "/v2/requests/abc")
