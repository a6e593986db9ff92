"""``sd3serve.threads``: the thread settings are applied before torch starts. Each check runs in a fresh
interpreter, so this process's torch keeps its own settings."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from sd3serve.settings import Settings


def run_python(code: str, **env: str | None) -> str:
    """stdout of `python -c code` with the environment changed by `env` (None: unset)."""
    environ = {k: v for k, v in os.environ.items() if k not in env}
    environ |= {k: v for k, v in env.items() if v is not None}
    res = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=environ, capture_output=True,
                         text=True, timeout=120)  # fmt: skip
    assert res.returncode == 0, res.stderr
    return res.stdout


def test_cli_does_not_import_torch() -> None:
    # libgomp reads OMP_WAIT_POLICY when torch loads: the CLI must get to configure_threads first.
    assert run_python("import sys, sd3serve.cli; print('torch' in sys.modules)").strip() == "False"


CONFIGURE = """
    import json, os, sys, threading
    from sd3serve.settings import Settings
    from sd3serve.threads import configure_threads
    configure_threads(Settings())
    import torch
    seen = []
    t = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))  # as the engine's thread sees it
    t.start(); t.join()
    print(json.dumps({"threads": torch.get_num_threads(), "thread": seen[0],
                      "policy": os.environ.get("OMP_WAIT_POLICY")}))
"""


def test_threads_setting_sets_torchs_thread_count() -> None:
    out = json.loads(run_python(CONFIGURE, SD3SERVE_THREADS="1", OMP_NUM_THREADS=None))
    assert out["threads"] == 1 and out["thread"] == 1


def test_threads_default_to_the_cores_available() -> None:
    out = json.loads(run_python(CONFIGURE, SD3SERVE_THREADS=None, OMP_NUM_THREADS="1"))
    assert out["threads"] == len(os.sched_getaffinity(0))


@pytest.mark.parametrize(("given", "expected"), [(None, "PASSIVE"), ("ACTIVE", "ACTIVE")])
def test_wait_policy_is_passive_only_when_unset(given: str | None, expected: str) -> None:
    out = json.loads(run_python(CONFIGURE, OMP_WAIT_POLICY=given))
    assert out["policy"] == expected


@pytest.mark.parametrize(
    ("options", "device", "width", "expected"),
    [
        ({"threads": 2}, "cpu", 192, (1, 2, 2)),  # small transformer: a worker per core, denoise on one thread
        ({"threads": 1}, "cpu", 192, (1, 1, 1)),
        ({"threads": 3}, "cpu", 192, (1, 3, 3)),  # decode on all cores, one worker at a time
        ({"threads": 2, "model_workers": 1}, "cpu", 192, (1, 2, 1)),
        ({"threads": 4}, "cpu", 511, (1, 4, 4)),
        ({"threads": 4}, "cpu", 512, (4, 4, 1)),  # the width at which a transformer counts as large
        ({"threads": 16, "model_workers": 4}, "cpu", 192, (1, 16, 4)),
        ({"threads": 8}, "cpu", 1536, (8, 8, 1)),  # SD3.5-sized: one worker on every core
        ({"threads": 8, "model_workers": 2}, "cpu", 1536, (4, 8, 2)),
        ({"threads": 2, "denoise_threads": 2, "decode_threads": 1, "model_workers": 1}, "cpu", 192, (2, 1, 1)),
        ({"threads": 8}, "cuda", 1536, (None, None, 1)),  # CUDA: torch's setting left as it is
        ({"threads": 8, "model_workers": 2}, "cuda", 1536, (None, None, 2)),
    ],
)
def test_phase_thread_plan(options: dict[str, int], device: str, width: int, expected: tuple) -> None:
    from sd3serve.threads import phase_threads

    plan = phase_threads(Settings(**options), device_type=device, transformer_width=width)  # type: ignore[arg-type]
    assert (plan.denoise, plan.decode, plan.workers) == expected


def test_torch_threads_is_restored() -> None:
    import torch

    from sd3serve.threads import torch_threads

    before = torch.get_num_threads()
    with torch_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with pytest.raises(KeyError), torch_threads(before + 1):
        raise KeyError
    assert torch.get_num_threads() == before
    with torch_threads(None):
        assert torch.get_num_threads() == before


FRESH_BLOCK = """
    import ctypes, json, resource
    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = (ctypes.c_size_t,)
    libc.free.argtypes = (ctypes.c_void_p,)
    size = 64 * 2**20  # a 1024² activation's size: above glibc's largest mmap threshold and a thread heap's size
    def faults_of_a_fresh_block():
        p = libc.malloc(size)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        ctypes.memset(p, 1, size)
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
        libc.free(p)
        return faults
"""
ALLOCATOR = FRESH_BLOCK + """
    from sd3serve import allocator
    from sd3serve.engine.pipeline import build_pipeline
    from sd3serve.settings import Settings
    pipe = build_pipeline(Settings(device="cpu"))
    faults_of_a_fresh_block()
    print(json.dumps({"tuned": allocator.is_tuned(), "faults": faults_of_a_fresh_block()}))
"""
# The engine's threads start after the process has started (uvicorn, then the model's workers): their blocks are
# kept only if malloc was tuned before any thread had an arena of its own.
ON_A_WORKER_THREAD = FRESH_BLOCK + """
    import os, threading
    from sd3serve import allocator
    from sd3serve.settings import Settings
    from sd3serve.threads import configure_threads
    when = os.environ["TUNED"]
    configure_threads(Settings(device="cpu", malloc_tuning="auto" if when == "at start" else "off"))
    out = {}
    def worker():
        libc.free(libc.malloc(100))  # this thread's first malloc: its arena is chosen here
        if when != "at start":  # as the pipeline does where the device was not known at the start, or a replica
            allocator.tune_allocator()
        faults_of_a_fresh_block()
        out["faults"] = faults_of_a_fresh_block()
        out["tuned"] = allocator.is_tuned()
    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    print(json.dumps(out))
"""


@pytest.mark.parametrize("when", ["at start", "late", "by the environment"])
def test_tuned_at_start_a_worker_thread_keeps_its_freed_blocks(when: str) -> None:
    """`configure_threads` (the first call of `serve` and `generate`) tunes before any thread exists, and a Ray
    replica's process has glibc's environment variables from its start; tuned later, a thread with its own arena
    still gets a 64 MiB block from mmap and faults its pages in every time."""
    from sd3serve.allocator import ENVIRONMENT

    env = ENVIRONMENT if when == "by the environment" else dict.fromkeys(ENVIRONMENT)
    out = json.loads(run_python(ON_A_WORKER_THREAD, TUNED=when, SD3SERVE_MALLOC_TUNING=None, **env))
    pages = 64 * 2**20 // os.sysconf("SC_PAGE_SIZE")
    assert out["tuned"], out
    assert (out["faults"] > pages // 2) if when == "late" else (out["faults"] < pages // 10), out


def test_the_device_is_known_to_be_a_cpu_without_torch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from sd3serve import allocator

    monkeypatch.setattr(allocator, "GPU_NODES", (str(tmp_path / "nvidia[0-9]*"), str(tmp_path / "kfd")))
    assert allocator.cpu_only("cpu") and allocator.cpu_only("auto")
    assert not allocator.cpu_only("cuda") and not allocator.cpu_only("cuda:1")
    (tmp_path / "nvidia0").touch()  # a GPU's device node: "auto" may mean CUDA, which only torch can tell
    assert not allocator.cpu_only("auto") and allocator.cpu_only("cpu")
    (tmp_path / "nvidia0").unlink()
    (tmp_path / "kfd").touch()
    assert not allocator.cpu_only("auto")
    (tmp_path / "nvidia0").touch()
    (tmp_path / "kfd").unlink()
    (tmp_path / "nvidiactl").touch()
    (tmp_path / "nvidia0").unlink()
    assert allocator.cpu_only("auto")  # nvidiactl alone is no GPU


@pytest.mark.parametrize("setting", [None, "off", "on"])
def test_allocator_tuning_keeps_freed_memory(setting: str | None) -> None:
    """Tuned (the CPU default), a freed 64 MiB block is reused without faulting its pages in again."""
    out = json.loads(run_python(ALLOCATOR, SD3SERVE_MALLOC_TUNING=setting))
    pages = 64 * 2**20 // os.sysconf("SC_PAGE_SIZE")
    if setting == "off":
        assert not out["tuned"] and out["faults"] > pages // 2, out
    else:
        assert out["tuned"] and out["faults"] < pages // 10, out


def test_allocator_is_left_alone_on_cuda() -> None:
    from sd3serve import allocator

    assert not allocator.wanted("auto", "cuda") and allocator.wanted("on", "cuda")
    assert allocator.wanted("auto", "cpu") and not allocator.wanted("off", "cpu")
