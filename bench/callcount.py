"""Run a Python module or script (``python bench/callcount.py -m MODULE ARGS...`` or ``... SCRIPT.py ARGS...``)
counting its Python function calls per
thread; SIGUSR1 writes the counts so far, by thread name, as JSON to $SD3BENCH_CALLS_FILE.

For counts only: the profiler slows every call, so bench/serving.py never times a process started this way.
"""

from __future__ import annotations

import collections
import json
import os
import runpy
import signal
import sys
import threading
from types import FrameType
from typing import Any

_counts: collections.Counter[str] = collections.Counter()


def _profile(frame: FrameType, event: str, arg: Any) -> None:
    if event == "call":
        _counts[threading.current_thread().name] += 1


def _dump(signum: int, frame: FrameType | None) -> None:
    sys.setprofile(None)  # the dump's own calls are not the program's
    counts = dict(_counts)
    path = os.environ["SD3BENCH_CALLS_FILE"]
    with open(path + ".tmp", "w") as f:
        json.dump(counts, f)
    os.replace(path + ".tmp", path)
    sys.setprofile(_profile)


def main() -> None:
    if len(sys.argv) < 2 or (sys.argv[1] == "-m" and len(sys.argv) < 3):
        sys.exit(__doc__)
    signal.signal(signal.SIGUSR1, _dump)
    threading.setprofile(_profile)
    sys.setprofile(_profile)
    if sys.argv[1] == "-m":
        module, sys.argv = sys.argv[2], [sys.argv[2], *sys.argv[3:]]
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    else:
        sys.argv = sys.argv[1:]
        sys.path.insert(0, os.path.dirname(os.path.abspath(sys.argv[0])))
        runpy.run_path(sys.argv[0], run_name="__main__")


if __name__ == "__main__":
    main()
