"""OMP_WAIT_POLICY unset against PASSIVE, on an idle CPU and with another process burning one core.

    .venv/bin/python bench/threads.py [--images 8] [--size 512] [--steps 4] [--placements thread second]

Each cell is the engine (pipeline + JPEG, bench/engine_worker.py) in its own process with OMP_WAIT_POLICY unset
or PASSIVE and torch's default thread count here (the cores available), running torch on
  thread: one dedicated thread that also loaded the model (as the server's engine thread), or
  second: a second thread after the main thread loaded and warmed up (two OpenMP pools, as bench/serving.py
          timed its in-process engine before).
All cells' processes run side by side, one request at a time in turn (order shuffled each round, a pause
between requests), first on the CPU as it is,
then with a busy-looping process pinned to the first core. Prints per cell the median seconds per image, process
CPU seconds per image and context switches per image of the torch thread, then the ratios unset / PASSIVE.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from common import EngineWorker, thread_env
from sd3serve.threads import available_cores, describe

POLICIES = ("unset", "PASSIVE")
# Between requests: an unset policy leaves the last request's OpenMP threads spinning for a while after it ends,
# which would slow whichever cell runs next.
SETTLE_S = 0.2


@contextlib.contextmanager
def burning(core: int) -> Iterator[None]:
    """A process that keeps one core busy (a Python busy loop pinned to it)."""
    code = f"import os\nos.sched_setaffinity(0, {{{core}}})\nwhile True:\n    pass\n"
    proc = subprocess.Popen([sys.executable, "-c", code])
    try:
        yield
    finally:
        proc.kill()
        proc.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=8, help="per cell and load")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--placements", nargs="+", choices=["thread", "second", "main"], default=["thread", "second"])
    ap.add_argument("--model", type=Path, default=None, help="default: the embedded demo model")
    args = ap.parse_args()

    cells = [(policy, placement) for placement in args.placements for policy in POLICIES]
    workers: dict[tuple[str, str], EngineWorker] = {}
    try:
        for policy, placement in cells:
            env = thread_env(None if policy == "unset" else policy)
            workers[policy, placement] = EngineWorker(env, args.model, placement)
        print(f"machine: {available_cores()} cores available (os.sched_getaffinity), shared with other jobs")
        for (policy, placement), w in workers.items():
            report = {k: v for k, v in w.report.items() if k not in ("ready", "placement")}
            print(f"  {policy:<8} {placement:<7} {describe(report)}")
        print(f"{args.size}x{args.size}, {args.steps} steps, {args.images} images per cell and load, interleaved")
        print(f"{'load':<12} {'policy':<8} {'torch on':<9} {'s/img':>7} {'cpu s/img':>10} {'switches/img':>13}")

        results: dict[tuple[str, str, str], tuple[float, float, float]] = {}
        first_core = min(os.sched_getaffinity(0))
        loads: dict[str, contextlib.AbstractContextManager[None]] = {
            "none": contextlib.nullcontext(),
            "1 core busy": burning(first_core),
        }
        for load, context in loads.items():
            with context:
                samples: dict[tuple[str, str], list[dict[str, float]]] = {cell: [] for cell in cells}
                for r in range(-1, args.images):  # round -1 warms up under this load
                    for cell in random.Random(r).sample(cells, len(cells)):
                        time.sleep(SETTLE_S)
                        out = workers[cell].call("generate", prompt="a red circle on a blue background",
                                                 size=args.size, steps=args.steps, seed=r)  # fmt: skip
                        if r >= 0:
                            samples[cell].append(out)
            for policy, placement in cells:
                xs = samples[policy, placement]
                row = tuple(statistics.median(x[k] for x in xs) for k in ("wall", "cpu", "switches"))
                results[load, policy, placement] = row  # type: ignore[assignment]
                print(f"{load:<12} {policy:<8} {placement:<9} {row[0]:>7.3f} {row[1]:>10.3f} {row[2]:>13.0f}",
                      flush=True)  # fmt: skip

        print("\nunset / PASSIVE, seconds per image")
        print(f"{'load':<12} " + " ".join(f"{'torch on ' + p:>16}" for p in args.placements))
        for load in loads:
            ratios = [results[load, "unset", p][0] / results[load, "PASSIVE", p][0] for p in args.placements]
            print(f"{load:<12} " + " ".join(f"{x:>16.2f}" for x in ratios))
    finally:
        for w in workers.values():
            w.close()


if __name__ == "__main__":
    main()
