"""Hand-planted mutants, for what mutmut (``make mutate``, configured in pyproject.toml) cannot do.

    .venv/bin/python bench/mutate.py [--only SUBSTRING ...] [--list] [--no-baseline]    (or: make mutate-hand)

mutmut measures the serving code (the ledger, the service, the routes, webhooks, middleware, batching, the memory
plan, scale-out, the OpenAI schemas) with its own operators: swapped comparisons and operators, changed numbers and
strings, removed call arguments (a dropped ``.where`` condition), ``None`` for assignments. The list below keeps
only two kinds of mutant: those in modules outside mutmut's selection (the request schema, the samplers, the noise,
the pipeline, jobs), and, inside it, those its operators cannot express: a dropped statement, one disjunct of a
condition dropped, one function called in place of another, a variable replaced by a constant, a reordering.

A mutant is *killed* when its tests fail (or cannot even import it), *survived* when they pass. Each mutant is an
exact snippet of the current source and its replacement: when the source changes under it, the mutant is reported
as "snippet not found" (or "ambiguous" if the snippet occurs more than once) instead of being run, so that the list
can be kept up to date by hand. A mutant that cannot change any observable behaviour is marked ``equivalent``
with the reason; it is still run and shown, but not counted in the score. Every other survivor is a missing test.

The copy lives in a temporary directory and goes first on PYTHONPATH, ahead of the editable install, so the
working tree is never modified. The tests come from this checkout's tests/; each selection is a few files
(SQLite only for the ledger).
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "src/sd3serve"
TIMEOUT_S = 240  # per mutant; a mutant that hangs its tests counts as killed ("timeout")
SQLITE = ["-k", "not postgresql"]


@dataclass(frozen=True)
class Mutant:
    name: str
    file: str  # under src/sd3serve
    original: str
    replacement: str
    tests: tuple[str, ...]  # pytest arguments
    equivalent: str = ""  # why no test can tell the mutant from the original


def _m(name: str, file: str, original: str, replacement: str, *tests: str, equivalent: str = "") -> Mutant:
    return Mutant(name, file, original, replacement, tests, equivalent)


def _without_owner_check(name: str, then: str) -> Mutant:
    """``Tasks._mine`` (every read of a task by its key) no longer checks the task's key; ``then``: the start of the
    line after the check."""
    check = '        if task is None{}:\n            raise NotFound(f"no task {{task_id!r}} for this key")\n'
    return _m(name, "ledger/tasks.py", check.format(" or task.key_id != key_id") + "        " + then,
              check.format("") + "        " + then, *TASK_TESTS)  # fmt: skip


CREDITS_TESTS = ("tests/ledger/test_credits.py", "tests/ledger/test_key_digests.py", *SQLITE)
TASK_TESTS = ("tests/ledger/test_tasks.py", "tests/ledger/test_task_images.py", "tests/ledger/test_mutants_store.py",
              *SQLITE)  # fmt: skip
IDEM_TESTS = ("tests/ledger/test_idempotency_store.py", "tests/ledger/test_mutants_store.py", *SQLITE)
SCHEMA_TESTS = ("tests/api/test_schemas.py", "tests/api/test_schema_limits.py")
# The samplers that follow ComfyUI are checked against its reference outputs (test_comfy_parity.py); dpmpp_2m_cfg_pp,
# which keeps this project's update, against its pins (test_sampler_pins.py).
COMFY = "tests/engine/test_comfy_parity.py"
PINS_2M_CFG_PP = ("tests/engine/test_sampler_pins.py", "-k", "dpmpp_2m_cfg_pp and output_is_pinned")
NOISE_TESTS = ("tests/engine/test_noise.py",)
QUEUE_TESTS = ("tests/engine/test_queue_limits.py",)
ONE_PATH = "tests/api/test_one_path.py"

MUTANTS: list[Mutant] = [
    # --- bugs an audit planted ------------------------------------------------------------------------------
    _m("digest returns the plaintext key", "ledger/keys.py",
       'return hashlib.sha256(api_key.encode("utf-8")).hexdigest()', "return api_key", *CREDITS_TESTS),
    _m("steps le=70 -> lt=70", "api/schemas.py",
       "Field(ge=1, le=70)", "Field(ge=1, lt=70)", *SCHEMA_TESTS),
    _m("dpmpp_2m_cfg_pp keeps the guided x0 as history", "engine/samplers.py",
       "        old, h_last = at.uncond, h\n", "        old, h_last = at.denoised, h\n", *PINS_2M_CFG_PP),
    _m("pipeline noise from seed + 1", "engine/pipeline.py",
       "BatchNoise([seed for j in jobs for seed in j.seeds])",
       "BatchNoise([seed + 1 for j in jobs for seed in j.seeds])",
       *NOISE_TESTS),
    _m("job seeds are seed + i + 1", "engine/job.py",
       "[self.seed + i for i in range(self.batch_size)]", "[self.seed + i + 1 for i in range(self.batch_size)]",
       "tests/engine/test_job.py"),
    _without_owner_check("reads without the owner check", "return task"),
    # --- ledger/keys.py, ledger/credits.py, ledger/ledger.py ------------------------------------------------
    _m("a revoked key still authenticates", "ledger/keys.py",
       "compare_digest(row.digest, wanted) or row.revoked_at is not None:", "compare_digest(row.digest, wanted):",
       *CREDITS_TESTS),
    _m("capture does not count the spend", "ledger/credits.py",
       "values(spent_micro=ApiKey.spent_micro + hold.amount_micro)", "values(spent_micro=ApiKey.spent_micro)",
       *CREDITS_TESTS),
    _m("release refunds a hold twice", "ledger/credits.py",
       "        \"\"\"Return the hold to the balance; False if it is gone (settled before).\"\"\"\n"
       "        if self.s.execute(delete(Hold).where(Hold.id == hold.id)).rowcount != 1:"
       "  # type: ignore[attr-defined]\n"
       "            return False\n",
       "        \"\"\"Return the hold to the balance; False if it is gone (settled before).\"\"\"\n"
       "        self.s.execute(delete(Hold).where(Hold.id == hold.id))\n",
       *CREDITS_TESTS),
    _m("capture refunds instead of charging", "ledger/ledger.py",
       "            if gone or not tx.credits.capture(hold):", "            if gone or not tx.credits.release(hold):",
       *CREDITS_TESTS),
    _m("capture ignores a hold that is gone (no ReservationLost)", "ledger/ledger.py",
       "            if gone or not tx.credits.capture(hold):", "            if not (tx.credits.capture(hold) or True):",
       *CREDITS_TESTS),
    _m("cancel_where does not return the holds", "ledger/tasks.py",
       "            Credits(self.s).release_where(Hold.id.in_(hold_ids))", "            pass", *TASK_TESTS),
    # --- ledger/tasks.py ---------------------------------------------------------------------------------
    _m("image() always returns image 0", "ledger/tasks.py",
       "self.s.get(TaskImage, (task_id, index))", "self.s.get(TaskImage, (task_id, 0))", *TASK_TESTS),
    # --- ledger/recovery.py -----------------------------------------------------------------------------
    _m("heartbeat says alive when its instance row is gone", "ledger/recovery.py",
       "        return bool(res.rowcount == 1)", "        return bool(res.rowcount >= 0)", *TASK_TESTS),
    # --- ledger/idempotency.py --------------------------------------------------------------------------
    _m("a claim ignores a fingerprint mismatch", "ledger/idempotency.py",
       "        if row.fingerprint != fingerprint:", "        if False:", *IDEM_TESTS),
    # --- api/schemas.py ---------------------------------------------------------------------------------
    _m("batch_size up to 11", "api/schemas.py",
       "Field(ge=1, le=MAX_BATCH_SIZE)", "Field(ge=1, le=MAX_BATCH_SIZE + 1)", *SCHEMA_TESTS),
    _m("width from 48", "api/schemas.py",
       'width: Annotated[int, Field(ge=64, le=2048', 'width: Annotated[int, Field(ge=48, le=2048', *SCHEMA_TESTS),
    _m("height up to 2047", "api/schemas.py",
       'height: Annotated[int, Field(ge=64, le=2048', 'height: Annotated[int, Field(ge=64, lt=2048', *SCHEMA_TESTS),
    _m("seed from -2", "api/schemas.py", "Field(ge=-1, le=MAX_SEED", "Field(ge=-2, le=MAX_SEED", *SCHEMA_TESTS),
    _m("guidance below 15", "api/schemas.py", "Field(ge=1, le=15,", "Field(ge=1, lt=15,", *SCHEMA_TESTS),
    _m("image_quality from 1", "api/schemas.py", "Field(ge=10, le=100)", "Field(ge=1, le=100)", *SCHEMA_TESTS),
    _m("stripped prompt of exactly 10000 refused", "api/schemas.py",
       "if len(stripped) > 10000:", "if len(stripped) >= 10000:", *SCHEMA_TESTS),
    _m("height not rounded to 16", "api/schemas.py",
       "return w - w % SIZE_MULTIPLE, h - h % SIZE_MULTIPLE", "return w - w % SIZE_MULTIPLE, h", *SCHEMA_TESTS),
    _m("v1 accepts batch_size 2 without base64", "api/schemas.py",
       "req.batch_size > 1 and not req.base64", "req.batch_size > 2 and not req.base64", *SCHEMA_TESTS),
    # --- engine/samplers.py -----------------------------------------------------------------------------
    _m("euler_cfg_pp: guided ε̂ instead of the unconditional", "engine/samplers.py",
       "x = _comb((c, x), (-c * a_s, uncond), (a_t, guided))",
       "x = _comb((c, x), (-c * a_s, guided), (a_t, guided))", COMFY),
    _m("dpmpp_2s_ancestral_cfg_pp: plain second stage", "engine/samplers.py",
       "torch.lerp(model.with_uncond(u, st.at(s_mid))[1], x, s_down / s)",
       "torch.lerp(model(u, st.at(s_mid)), x, s_down / s)", COMFY),
    _m("RF ancestral step: σ_down on the wrong side", "engine/samplers.py",
       "s_down = s_next * (1 + (s_next / s - 1) * eta)", "s_down = s_next * (1 - (s_next / s - 1) * eta)", COMFY),
    _m("dpmpp_2m: second-order term twice as large", "engine/samplers.py",
       "c = (1 - a) * h / (2 * h_last) if old is not None else 0.0",
       "c = (1 - a) * h / h_last if old is not None else 0.0",
       COMFY),
    _m("euler_ancestral: no re-noising at eta = 1", "engine/samplers.py",
       "x = torch.lerp(at.denoised, x, s_down / at.s)  # x + (σ_down-σ)·(x-D)/σ\n        if eta > 0:",
       "x = torch.lerp(at.denoised, x, s_down / at.s)  # x + (σ_down-σ)·(x-D)/σ\n        if eta > 1:",
       "tests/engine/test_samplers.py", "-k", "test_moments_match_data and euler_ancestral"),
    _m("SDE solvers start at σ = 1 (λ = -∞)", "engine/samplers.py",
       "if len(sig) > 1 and sig[0] >= 1.0 else sig", "if len(sig) > 1 and sig[0] > 1.0 else sig", COMFY),
    # --- engine/noise.py --------------------------------------------------------------------------------
    _m("noise drawn in the latent's dtype", "engine/noise.py",
       "generator=g, device=device, dtype=torch.float32)", "generator=g, device=device, dtype=like.dtype)",
       *NOISE_TESTS),
    _m("generators in reverse seed order", "engine/noise.py",
       "[_ImageNoise(s) for s in seeds or []]", "[_ImageNoise(s) for s in reversed(seeds or [])]", *NOISE_TESTS),
    _m("a new generator at every draw", "engine/noise.py",
       "if key not in self.start:", "if True:", *NOISE_TESTS),
    _m("step noise: a new generator at every draw", "engine/noise.py",
       "if self._step is None:", "if True:", "tests/engine/test_comfy_parity.py"),
    _m("batch size check only one way", "engine/noise.py",
       "if like.shape[0] != len(self._images):", "if like.shape[0] < len(self._images):", *NOISE_TESTS),
    _m("noise always drawn on the latent's device", "engine/noise.py",
       'device = like.device if on_device else torch.device("cpu")\n        per_image',
       "device = like.device\n        per_image", *NOISE_TESTS,
       equivalent="the tests run on the CPU, where the latent's device is the CPU; the difference (CPU noise for "
       "non-*_gpu samplers on CUDA) can only show on a GPU machine"),
    # --- engine/batching.py -----------------------------------------------------------------------------
    _m("an expired request stays in the queue", "engine/batching.py",
       "        if p in self._queue:\n            self._queue.remove(p)\n", "        if p in self._queue:\n",
       "tests/engine/test_engine_guard.py", "tests/engine/test_mutants_engine.py", "-k", "time_out or expires"),
    _m("a chunked request goes back to the front of the queue", "engine/batching.py",
       "self._queue.append(p)  # the rest after", "self._queue.insert(0, p)  # the rest after",
       "tests/engine/test_engine_guard.py", "-k", "yields_to_small"),
    _m("Retry-After may be 0", "engine/batching.py",
       "return max(1, round(waiting_batches * self._batch_avg_s))", "return round(waiting_batches * self._batch_avg_s)",
       *QUEUE_TESTS),
    # --- engine/pipeline.py -----------------------------------------------------------------------------
    _m("VAE tiling from 1536 px instead of above", "engine/pipeline.py",
       "side > VAE_TILING_ABOVE", "side >= VAE_TILING_ABOVE",
       "tests/engine/test_acceleration.py", "-k", "decode_tiles or auto_tiles"),
    _m("the model ignores which jobs are live (live_rows dropped)", "engine/pipeline.py",
       "            live_rows=live_rows,\n        )", "            live_rows=None,\n        )",
       "tests/engine/test_engine_guard.py", "-k", "abandoned_job"),
    _m("aborted rows still go through the model", "engine/pipeline.py",
       "if rows is None or len(rows) == x.shape[0]:", "if rows is None or len(rows) > 0:",
       "tests/engine/test_engine_guard.py", "tests/engine/test_mutants_engine.py",
       "-k", "abandoned_job or aborted_job"),

]  # fmt: skip


@dataclass
class Outcome:
    mutant: Mutant
    status: str  # killed, survived, timeout, snippet not found, ambiguous (n), baseline failed
    seconds: float = 0.0


def copy_source(dest: Path) -> Path:
    """src/ copied to ``dest``; the trained demo weights are linked, not copied (no mutant touches them)."""
    big = ROOT / PACKAGE / "models" / "demo"
    shutil.copytree(ROOT / "src", dest / "src", ignore=lambda d, names: ["demo"] if Path(d) == big.parent else [])
    if big.exists():
        (dest / PACKAGE / "models" / "demo").symlink_to(big, target_is_directory=True)
    return dest / "src"


def run_tests(src: Path, tests: tuple[str, ...]) -> tuple[str, float]:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(p for p in (str(src), os.environ.get("PYTHONPATH", "")) if p),
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
        "PYTHONDONTWRITEBYTECODE": "1",
    }
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-o", f"timeout={TIMEOUT_S}", *tests]
    start = time.monotonic()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, timeout=TIMEOUT_S + 60)
    except subprocess.TimeoutExpired:
        return "timeout", time.monotonic() - start
    seconds = time.monotonic() - start
    if proc.returncode == 0:
        return "survived", seconds
    if proc.returncode == 5:
        return "no tests ran", seconds
    return "killed", seconds


def check_import_path(src: Path) -> None:
    """The copy, not the editable install, must be what the tests import."""
    env = {**os.environ, "PYTHONPATH": str(src)}
    out = subprocess.run(
        [sys.executable, "-c", "import sd3serve; print(sd3serve.__file__)"], env=env, capture_output=True, text=True
    )
    if not out.stdout.strip().startswith(str(src)):
        sys.exit(f"the tests would import sd3serve from {out.stdout.strip() or out.stderr}, not from {src}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", action="append", help="run the mutants whose name contains this (may be repeated)")
    ap.add_argument("--list", action="store_true", help="list the mutants and whether their snippets are found")
    ap.add_argument("--no-baseline", action="store_true", help="skip running each test selection unmutated first")
    args = ap.parse_args()
    mutants = [m for m in MUTANTS if not args.only or any(o in m.name for o in args.only)]

    outcomes: list[Outcome] = []
    with tempfile.TemporaryDirectory(prefix="sd3mutate-") as tmp:
        src = copy_source(Path(tmp))
        check_import_path(src)
        if not args.list and not args.no_baseline:
            # Every selection must pass on the unmutated copy, or a "killed" would mean nothing.
            for tests in dict.fromkeys(m.tests for m in mutants):
                status, seconds = run_tests(src, tests)
                shown = "ok" if status == "survived" else status.upper()
                print(f"baseline {shown:>11} {seconds:5.0f} s  {' '.join(tests)}", flush=True)
                if status != "survived":
                    sys.exit("a test selection fails without any mutant: fix that first")
        for m in mutants:
            path = src.parent / PACKAGE / m.file
            text = path.read_text()
            count = text.count(m.original)
            if count != 1:
                outcomes.append(Outcome(m, "snippet not found" if count == 0 else f"ambiguous ({count} matches)"))
            elif args.list:
                outcomes.append(Outcome(m, "found"))
            else:
                path.write_text(text.replace(m.original, m.replacement))
                try:
                    status, seconds = run_tests(src, m.tests)
                finally:
                    path.write_text(text)
                outcomes.append(Outcome(m, status, seconds))
            o = outcomes[-1]
            print(f"{o.status:>20} {o.seconds:5.0f} s  {m.file}: {m.name}", flush=True)

    report(outcomes)


def report(outcomes: list[Outcome]) -> None:
    print()
    w = max([len("mutant"), *(len(o.mutant.name) for o in outcomes)])
    print(f"| {'mutant':<{w}} | {'file':<20} | {'result':<28} |")
    print(f"|{'-' * (w + 2)}|{'-' * 22}|{'-' * 30}|")
    for o in outcomes:
        result = o.status + (" (equivalent)" if o.mutant.equivalent and o.status == "survived" else "")
        print(f"| {o.mutant.name:<{w}} | {o.mutant.file:<20} | {result:<28} |")
    counted = [o for o in outcomes if o.status in ("killed", "timeout", "survived") and not o.mutant.equivalent]
    killed = sum(o.status in ("killed", "timeout") for o in counted)
    equivalent = [o for o in outcomes if o.mutant.equivalent]
    missing = [o for o in outcomes if o.status not in ("killed", "timeout", "survived", "found")]
    if counted:
        print(f"\nscore: {killed}/{len(counted)} killed ({100 * killed / len(counted):.0f} %), "
              f"{len(equivalent)} equivalent not counted, {len(missing)} not run")  # fmt: skip
    for o in equivalent:
        print(f"  equivalent: {o.mutant.name}: {o.mutant.equivalent}")
    for o in missing:
        print(f"  not run: {o.mutant.name} ({o.mutant.file}): {o.status}; update its snippet in bench/mutate.py")
    survivors = [o for o in counted if o.status == "survived"]
    for o in survivors:
        print(f"  SURVIVED: {o.mutant.name} ({o.mutant.file}): a test is missing")
    if survivors or missing:
        sys.exit(1)


if __name__ == "__main__":
    main()
