"""What the benchmarks share: a server process on a free port, a key with credits to spare, the engine in a
process of its own, the thread environment every process of a benchmark gets, and a round of v2 tasks."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import httpx

from sd3serve.ledger import Database
from sd3serve.settings import Settings

URL = "/v1/stable-diffusion-3.5-turbo-txt2img"
SUBMIT = "/v2/stable-diffusion-3.5-turbo-txt2img"
BENCH_DIR = Path(__file__).resolve().parent


def thread_env(wait_policy: str | None, threads: int = 0) -> dict[str, str]:
    """This process's environment with OMP_WAIT_POLICY set (None: unset) and SD3SERVE_THREADS, for subprocesses
    that should all run torch alike. libgomp reads the policy when torch loads, so it has to be in the environment
    of each process from its start."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if wait_policy is not None:
        env["OMP_WAIT_POLICY"] = wait_policy
    return env | {"SD3SERVE_THREADS": str(threads)}


CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def _stat(pid: int) -> list[str]:
    """/proc/PID/stat's fields after the command name (field 3 is index 0)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat[stat.rindex(")") + 2 :].split()


def proc_counts(pid: int) -> tuple[int, float]:
    """The process's minor page faults and CPU seconds (user + system, all its threads) so far: fields 10, 14 and
    15 of /proc/PID/stat."""
    fields = _stat(pid)
    return int(fields[7]), (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def descendants(pid: int) -> list[int]:
    """The process and every live process below it (children of each of its threads, recursively)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        for children in Path(f"/proc/{p}/task").glob("*/children"):
            with contextlib.suppress(OSError):
                todo += [int(c) for c in children.read_text().split()]
    return out


def tree_counts(pid: int) -> tuple[int, float]:
    """Minor faults and CPU seconds of a whole process tree (a Ray system: the driver, Ray's own processes and the
    replicas), its reaped processes' included (cminflt, cutime, cstime): fields 10-15 of /proc/PID/stat."""
    faults, ticks = 0, 0
    for p in descendants(pid):
        with contextlib.suppress(OSError):  # gone since it was listed: counted in its parent's c-fields
            f = _stat(p)
            faults += int(f[7]) + int(f[8])
            ticks += sum(int(x) for x in f[11:15])
    return faults, ticks / CLOCK_TICKS


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_ready(url: str, proc: subprocess.Popen[bytes], timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"server exited: {proc.args}")
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        time.sleep(0.2)
    sys.exit(f"server not ready: {proc.args}")


def v2_round(client: httpx.Client, base: str, key: str, bodies: Iterable[dict[str, object]]) -> tuple[float, list[str]]:
    """Each of ``bodies`` submitted as a v2 task to ``base`` (a server, or an application's route prefix on it),
    one after the other, then the statuses polled every 50 ms until all are COMPLETED (exit if one ends otherwise):
    seconds from the first submission to the last completion, and the task ids."""
    h = {"x-api-key": key}
    start = time.perf_counter()
    tasks = []
    for body in bodies:
        r = client.post(base + SUBMIT, json=body, headers=h)
        r.raise_for_status()
        tasks.append(r.json()["request_id"])
    pending = set(tasks)
    while pending:
        for task in list(pending):
            status = client.get(f"{base}/v2/requests/{task}/status", headers=h).json()["status"]
            if status == "COMPLETED":
                pending.discard(task)
            elif status not in ("QUEUED", "PROCESSING"):
                sys.exit(f"{base}: task {task} ended {status}")
        time.sleep(0.05)
    return time.perf_counter() - start, tasks


def rich_key(data_dir: Path) -> str:
    """A key with more credits than any benchmark spends, in the data dir's SQLite store."""
    db = Database.open(Settings(data_dir=data_dir).resolved_database_url)
    db.create_schema()
    with db.transaction() as tx:
        key = tx.keys.create(credits=10**9, name="bench")[1]
    db.close()
    return key


@dataclass(frozen=True)
class Server:
    url: str
    pid: int


@contextlib.contextmanager
def sd3serve(
    data_dir: Path,
    model: Path | None = None,
    *,
    env: dict[str, str] | None = None,
    stderr: TextIO | None = None,
    launcher: Sequence[str] = (),
    **settings: object,
) -> Iterator[Server]:
    """`sd3serve serve` in its own process, on the CPU, on a free port; `env`: its environment (default: ours);
    `launcher`: what runs the module instead of plain Python (bench/callcount.py, to count its calls)."""
    port = free_port()
    env = {**(os.environ if env is None else env), "SD3SERVE_DATA_DIR": str(data_dir), "SD3SERVE_PORT": str(port),
           "SD3SERVE_DEVICE": "cpu", "SD3SERVE_LOG_LEVEL": "warning"}  # fmt: skip
    env |= {f"SD3SERVE_{k.upper()}": str(v) for k, v in settings.items()}
    if model is not None:
        env["SD3SERVE_MODEL"] = str(model)
    proc = subprocess.Popen([sys.executable, *launcher, "-m", "sd3serve", "serve"], env=env, stderr=stderr)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, proc)
        yield Server(url=url, pid=proc.pid)
    finally:
        proc.terminate()
        proc.wait(timeout=60)


class EngineWorker:
    """bench/engine_worker.py: the engine and JPEG encoding in a process of its own, one request at a time."""

    def __init__(self, env: dict[str, str], model: Path | None = None, placement: str = "thread") -> None:
        cmd = [sys.executable, str(BENCH_DIR / "engine_worker.py"), "--placement", placement]
        if model is not None:
            cmd += ["--model", str(model)]
        self.proc = subprocess.Popen(cmd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.report: dict[str, Any] = self._answer()  # sent once the model is loaded and warm

    def _answer(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            sys.exit(f"engine worker exited: {self.proc.args}")
        return dict(json.loads(line))

    def call(self, op: str, **request: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"op": op, **request}) + "\n")
        self.proc.stdin.flush()
        return self._answer()

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        self.proc.wait(timeout=60)
