"""Soak: hold a server at capacity for a bounded time and watch errors and memory.

    .venv/bin/python bench/soak.py [--minutes 3] [--concurrency 8] [--size 256] [--model DIR]

Starts `sd3serve serve` (loopback only), then `concurrency` clients send requests back to back until the time is
up: v1 jpeg/png/base64 batches, v2 tasks polled to the end, v2 tasks followed over Server-Sent Events, v2 tasks
cancelled while queued or running, and v1 requests sent twice with one Idempotency-Key (the retry must be
replayed, not charged); varied prompts, seeds and samplers. Prints requests served, statuses, the checks on
replays and cancels, and the server's resident memory after warm-up (the first fifth of the run) against the
end: the growth should stay under 5%, with no 5xx.
"""

from __future__ import annotations

import argparse
import random
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
from httpx_sse import connect_sse

from common import URL, rich_key, sd3serve
from sd3serve.catalogue import SAMPLER_INFO

PROMPTS = ["a red circle", "a blue square on a yellow background", "a green triangle at the top left", "a star"]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=3.0)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--model", type=Path, default=None)
    args = ap.parse_args()

    data_dir = Path(tempfile.mkdtemp(prefix="sd3soak-"))
    key = rich_key(data_dir)
    with sd3serve(data_dir, args.model, max_queue=1000) as server:
        base = server.url
        statuses: Counter[int] = Counter()
        checks: Counter[str] = Counter()
        lock = threading.Lock()
        stop_at = time.monotonic() + args.minutes * 60
        # adaptive step sizes (dpm_adaptive, up to 120 calls) would skew the load
        samplers = [name for name, info in SAMPLER_INFO.items() if info.calls_per_step is not None]

        def client(i: int) -> None:
            rng = random.Random(i)
            h = {"x-api-key": key}
            with httpx.Client(base_url=base, timeout=600) as c:
                while time.monotonic() < stop_at:
                    body = {"prompt": rng.choice(PROMPTS), "width": args.size, "height": args.size,
                            "seed": rng.randrange(2**32), "sampler": rng.choice(samplers),
                            "image_format": rng.choice(["jpeg", "png", "webp"])}  # fmt: skip
                    kind = rng.random()
                    if kind < 0.15:
                        r = c.post(URL, json={**body, "batch_size": 2, "base64": True}, headers=h)
                    elif kind < 0.25:  # an idempotent retry: the same answer again, charged once
                        idem = {**h, "Idempotency-Key": f"soak-{i}-{rng.randrange(2**62)}"}
                        first = c.post(URL, json=body, headers=idem)
                        r = c.post(URL, json=body, headers=idem)
                        ok = first.status_code != 200 or (
                            r.content == first.content and r.headers.get("idempotent-replayed") == "true"
                        )
                        with lock:
                            checks["replays"] += 1
                            checks["replay mismatches"] += not ok
                    elif kind < 0.33:  # followed over Server-Sent Events to its end
                        r = c.post("/v2/stable-diffusion-3.5-turbo-txt2img", json=body, headers=h)
                        if r.status_code == 200:
                            task_id = r.json()["request_id"]
                            with connect_sse(c, "GET", f"/v2/requests/{task_id}/events", headers=h) as events:
                                last = [e.event for e in events.iter_sse()][-1]
                            with lock:
                                checks["event streams"] += 1
                                checks["streams not ending in completed"] += last != "completed"
                    elif kind < 0.4:  # cancelled, queued or running: must end CANCELLED
                        r = c.post("/v2/stable-diffusion-3.5-turbo-txt2img", json=body, headers=h)
                        if r.status_code == 200:
                            task_id = r.json()["request_id"]
                            time.sleep(rng.random() * 0.5)
                            r = c.post(f"/v2/requests/{task_id}/cancel", headers=h)
                            with lock:
                                checks["cancels"] += 1
                                checks["cancels that ended otherwise"] += r.json()["status"] not in (
                                    "CANCELLED",
                                    "COMPLETED",
                                )
                    elif kind < 0.5:
                        r = c.post("/v2/stable-diffusion-3.5-turbo-txt2img", json=body, headers=h)
                        if r.status_code == 200:
                            task = r.json()
                            done = ("COMPLETED", "FAILED")
                            while c.get(task["status_url"], headers=h).json()["status"] not in done:
                                time.sleep(0.2)
                            r = c.get(task["response_url"], headers=h)
                    else:
                        r = c.post(URL, json=body, headers=h)
                    with lock:
                        statuses[r.status_code] += 1

        threads = [threading.Thread(target=client, args=(i,)) for i in range(args.concurrency)]
        start = time.monotonic()
        for t in threads:
            t.start()
        samples: list[tuple[float, float]] = []
        while any(t.is_alive() for t in threads):
            samples.append((time.monotonic() - start, rss_mb(server.pid)))
            time.sleep(2)
        total = args.minutes * 60
        after_warmup = [m for t, m in samples if t >= total / 5]
        warm, end = after_warmup[0], after_warmup[-1]
        served = sum(statuses.values())
        errors = {code: n for code, n in statuses.items() if code != 200}
        print(f"soak: {args.minutes:g} min, {args.concurrency} clients, {args.size}x{args.size}, mixed v1/v2")
        print(f"requests served: {served} ({served / total:.2f}/s), other statuses: {errors or 'none'}")
        print("checks: " + ", ".join(f"{k} {v}" for k, v in sorted(checks.items())))
        print(f"server RSS: after warm-up {warm:.0f} MB, at the end {end:.0f} MB, peak {max(after_warmup):.0f} MB; "
              f"growth {100 * (end - warm) / warm:+.1f}% (target < 5%)")  # fmt: skip


if __name__ == "__main__":
    main()
