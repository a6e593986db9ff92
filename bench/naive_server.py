"""A naive server, written only to compare against: one FastAPI route calling diffusers'
``StableDiffusion3Pipeline`` on one thread. No queue, no batching, no credits.

    python bench/naive_server.py MODEL_DIR PORT

torch's thread count comes from SD3SERVE_THREADS as in the server; OMP_WAIT_POLICY is left as the environment
has it (bench/serving.py gives every system the same).
"""

from __future__ import annotations

import io
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from sd3serve.settings import Settings
from sd3serve.threads import set_thread_counts, thread_report

set_thread_counts(Settings())  # before diffusers loads; imports torch

import torch  # noqa: E402
import uvicorn  # noqa: E402
from diffusers import StableDiffusion3Pipeline  # noqa: E402
from fastapi import FastAPI  # noqa: E402
from fastapi.responses import Response  # noqa: E402
from pydantic import BaseModel  # noqa: E402

from sd3serve.engine.pipeline import t5_length  # noqa: E402


class Body(BaseModel):
    prompt: str
    steps: int = 4
    width: int = 1024
    height: int = 1024
    seed: int = 0
    guidance_scale: float = 1.0


def build(model_dir: str) -> FastAPI:
    # One thread loads and runs the pipeline, like the server's engine thread: requests wait their turn, and torch
    # always runs on the same thread (FastAPI's pool would spread calls over threads, each with its OpenMP pool).
    torch_thread = ThreadPoolExecutor(max_workers=1)
    pipe = torch_thread.submit(StableDiffusion3Pipeline.from_pretrained, model_dir, local_files_only=True).result()
    pipe.set_progress_bar_config(disable=True)
    t5_window = t5_length(pipe)  # the model's own T5 window, as the engine pads to (256 for SD3.5, 16 for the demo)
    app = FastAPI()

    @app.get("/readyz")
    def ready() -> dict[str, str]:
        return {"status": "ready"}

    @app.get("/threads")
    def threads() -> dict[str, Any]:
        return torch_thread.submit(thread_report).result()

    def run(body: Body) -> bytes:
        image = pipe(
            body.prompt, num_inference_steps=body.steps, width=body.width, height=body.height,
            guidance_scale=body.guidance_scale, generator=torch.Generator().manual_seed(body.seed),
            max_sequence_length=t5_window,
        ).images[0]  # fmt: skip
        buf = io.BytesIO()
        image.save(buf, format="JPEG", quality=95)
        return buf.getvalue()

    @app.post("/generate")
    def generate(body: Body) -> Response:  # a sync route: FastAPI runs it on its thread pool, which waits here
        return Response(torch_thread.submit(run, body).result(), media_type="image/jpeg")

    return app


if __name__ == "__main__":
    uvicorn.run(build(sys.argv[1]), host="127.0.0.1", port=int(sys.argv[2]), log_level="warning")
