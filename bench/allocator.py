"""What the allocator setting costs and buys: `sd3serve serve` with SD3SERVE_MALLOC_TUNING=on and =off, side by
side, the same requests taking turns; per size, the median seconds per image, minor page faults per image, and the
process's resident memory after the images (VmRSS) and at its peak (VmHWM).

    .venv/bin/python bench/allocator.py [--sizes 512 1024] [--requests 6] [--steps 4]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import URL, proc_counts, rich_key, sd3serve, thread_env


def status_mb(pid: int, field: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[512, 1024])
    ap.add_argument("--requests", type=int, default=6, help="per size and setting")
    ap.add_argument("--steps", type=int, default=4)
    args = ap.parse_args()
    data_dir = Path(tempfile.mkdtemp(prefix="sd3alloc-"))
    key = rich_key(data_dir)
    env = thread_env("PASSIVE")
    with contextlib.ExitStack() as stack:
        servers = {
            mode: stack.enter_context(sd3serve(data_dir, env=env, malloc_tuning=mode, max_queue=100))
            for mode in ("on", "off")
        }
        client = stack.enter_context(httpx.Client(timeout=600, headers={"x-api-key": key}))
        print(f"{'size':>5} {'malloc':>6} {'s/image':>8} {'faults/image':>12} {'VmRSS MB':>9} {'VmHWM MB':>9}")
        for size in args.sizes:
            seconds: dict[str, list[float]] = {mode: [] for mode in servers}
            faults = dict.fromkeys(servers, 0)
            for i in range(args.requests + 1):  # the first of each size warms up, untimed
                for mode, server in (servers.items() if i % 2 else reversed(servers.items())):
                    body = {"prompt": "a red circle on a blue background", "width": size, "height": size,
                            "steps": args.steps, "seed": i}  # fmt: skip
                    before, t0 = proc_counts(server.pid)[0], time.perf_counter()
                    client.post(f"{server.url}{URL}", json=body).raise_for_status()
                    if i:
                        seconds[mode].append(time.perf_counter() - t0)
                        faults[mode] += proc_counts(server.pid)[0] - before
            for mode, server in servers.items():
                print(f"{size:>5} {mode:>6} {statistics.median(seconds[mode]):>8.3f} "
                      f"{faults[mode] / args.requests:>12.0f} {status_mb(server.pid, 'VmRSS'):>9.0f} "
                      f"{status_mb(server.pid, 'VmHWM'):>9.0f}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
