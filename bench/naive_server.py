"""A naive server, written only to compare against: one FastAPI route calling diffusers'
``StableDiffusion3Pipeline`` under a lock. No queue, no batching, no credits.

    python bench/naive_server.py MODEL_DIR PORT
"""

from __future__ import annotations

import io
import sys
import threading

import torch
import uvicorn
from diffusers import StableDiffusion3Pipeline
from fastapi import FastAPI
from fastapi.responses import Response
from pydantic import BaseModel

from sd3serve.engine.pipeline import t5_length


class Body(BaseModel):
    prompt: str
    steps: int = 4
    width: int = 1024
    height: int = 1024
    seed: int = 0
    guidance_scale: float = 1.0


def build(model_dir: str) -> FastAPI:
    pipe = StableDiffusion3Pipeline.from_pretrained(model_dir, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    t5_window = t5_length(pipe)  # the model's own T5 window, as the engine pads to (256 for SD3.5, 16 for the demo)
    lock = threading.Lock()
    app = FastAPI()

    @app.get("/readyz")
    def ready() -> dict[str, str]:
        return {"status": "ready"}

    @app.post("/generate")
    def generate(body: Body) -> Response:  # a sync route: FastAPI runs it on its thread pool
        with lock:
            image = pipe(
                body.prompt, num_inference_steps=body.steps, width=body.width, height=body.height,
                guidance_scale=body.guidance_scale, generator=torch.Generator().manual_seed(body.seed),
                max_sequence_length=t5_window,
            ).images[0]  # fmt: skip
        buf = io.BytesIO()
        image.save(buf, format="JPEG", quality=95)
        return Response(buf.getvalue(), media_type="image/jpeg")

    return app


if __name__ == "__main__":
    uvicorn.run(build(sys.argv[1]), host="127.0.0.1", port=int(sys.argv[2]), log_level="warning")
