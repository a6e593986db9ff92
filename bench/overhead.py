"""HTTP overhead: the same request through the engine directly and through the server, interleaved.

    .venv/bin/python bench/overhead.py [--runs 10] [--size 1024] [--steps 4] [--model PATH]

"direct" is the engine's pipeline (built as the server builds it) plus JPEG encoding in this process; "http" is POST
/v1/stable-diffusion-3.5-turbo-txt2img to `sd3serve serve` in another process (same model, same request),
end to end with auth, credits and the response. Runs alternate so that machine noise hits both alike; the
figure to read is the median of the per-pair ratios http / direct (target <= 1.05).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import httpx

from common import URL, rich_key, sd3serve
from sd3serve.api.schemas import parse_txt2img
from sd3serve.engine.pipeline import build_pipeline
from sd3serve.imaging import encode_image
from sd3serve.settings import Settings


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--model", type=Path, default=None, help="default: the embedded demo model")
    args = ap.parse_args()

    data_dir = Path(tempfile.mkdtemp(prefix="sd3bench-"))
    settings = Settings(model=args.model, data_dir=data_dir, device="cpu")
    body = {
        "prompt": "a red circle on a blue background",
        "width": args.size,
        "height": args.size,
        "steps": args.steps,
        "seed": 1234,
    }
    req = parse_txt2img(body)
    pipeline = build_pipeline(settings)  # the engine's pipeline as the server builds it

    key = rich_key(data_dir)
    with sd3serve(data_dir, args.model) as server, httpx.Client(base_url=server.url, timeout=600) as client:

        def direct() -> bytes:
            result = pipeline(req.to_job())
            return encode_image(result.images[0], req.image_format, req.image_quality)

        def http() -> bytes:
            r = client.post(URL, json=body, headers={"x-api-key": key})
            r.raise_for_status()
            return r.content

        assert direct() == http(), "the server and the engine should give the same bytes"  # also warms up
        ratios, t_direct, t_http = [], [], []
        for i in range(args.runs):
            order = (direct, http) if i % 2 == 0 else (http, direct)
            times = {}
            for fn in order:
                t0 = time.perf_counter()
                fn()
                times[fn.__name__] = time.perf_counter() - t0
            t_direct.append(times["direct"])
            t_http.append(times["http"])
            ratios.append(times["http"] / times["direct"])
        print(
            f"request: {args.size}x{args.size}, {args.steps} steps, dpmpp_2m/sgm_uniform, jpeg q95; {args.runs} pairs"
        )
        print(f"direct (engine + JPEG) median {statistics.median(t_direct):.3f} s")
        print(f"http (end to end)      median {statistics.median(t_http):.3f} s")
        print(f"median ratio http/direct: {statistics.median(ratios):.3f}  (target <= 1.05)")


if __name__ == "__main__":
    main()
