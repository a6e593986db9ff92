"""Python function calls per thread of every Python process started with this directory on PYTHONPATH and
SD3BENCH_CALLS_DIR set: bench/scaleout.py's count-only run, where Ray starts the processes (its proxy, the
replicas, its own agents), so a launcher like bench/callcount.py cannot wrap them. Every 0.5 s a thread of its own
writes the counts so far, by thread name, with the process's title, to $SD3BENCH_CALLS_DIR/PID.json.

Threads that Python did not start (a C++ thread calling into Python) are not counted. For counts only: the
profiler slows every call.
"""

from __future__ import annotations

import os

if os.environ.get("SD3BENCH_CALLS_DIR"):
    import collections
    import json
    import sys
    import threading
    import time
    from pathlib import Path
    from types import FrameType
    from typing import Any

    _counts: collections.Counter[str] = collections.Counter()
    _DUMPER = "sd3bench-callcount"

    def _profile(frame: FrameType, event: str, arg: Any) -> None:
        if event == "call":
            _counts[threading.current_thread().name] += 1

    def _dump_forever(path: Path) -> None:
        sys.setprofile(None)  # this thread's calls are not the program's
        while True:
            time.sleep(0.5)
            title = Path(f"/proc/{os.getpid()}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps({"title": title.strip(), "counts": dict(_counts)}))
            os.replace(tmp, path)

    threading.setprofile(_profile)
    sys.setprofile(_profile)
    _out = Path(os.environ["SD3BENCH_CALLS_DIR"]) / f"{os.getpid()}.json"
    threading.Thread(target=_dump_forever, args=(_out,), name=_DUMPER, daemon=True).start()
