"""mutmut's verdicts per module, as a Markdown table (run after `mutmut run`; `make mutate` does).

    .venv/bin/python bench/mutation_scores.py [--sample] [--areas] [PATTERN]     e.g. "sd3serve.ledger*"

Score = killed / (killed + survived + no tests): a mutant with no test reaching its function counts as surviving.
Timeouts count as killed (the mutant made the tests hang); mutants not run yet ("not checked") are left out, and so
are those mypy rejects ("caught by type check": they are not programs `make test` would let through). The interval is
Wilson's 95 % score interval, which is what a sample (`--sample`: only the names `make mutate` drew, in
mutants/sample.txt) says about all of a module's mutants. ``--areas`` adds up the modules of each area (the ledger,
the service, the routes, ...).
"""

from __future__ import annotations

import fnmatch
import math
import subprocess
import sys
from collections import Counter, defaultdict
from pathlib import Path

KILLED = {"killed", "timeout", "segfault"}
MISSED = {"survived", "no tests", "suspicious"}


def verdicts() -> dict[str, str]:
    mutmut = Path(sys.executable).with_name("mutmut")
    out = subprocess.run([str(mutmut), "results", "--all", "true"], cwd=Path.cwd(), capture_output=True, text=True,
                         check=True).stdout  # fmt: skip
    found = {}
    for line in out.splitlines():
        name, sep, status = line.strip().rpartition(": ")
        if sep and "__mutmut_" in name:
            found[name] = status
    return found


AREAS = (
    "sd3serve.ledger", "sd3serve.service", "sd3serve.api.routes", "sd3serve.api.middleware",
    "sd3serve.api.openai_schemas", "sd3serve.engine.batching", "sd3serve.engine.memory", "sd3serve.scaleout",
)  # fmt: skip


def area_of(module: str) -> str:
    return next((a for a in AREAS if module == a or module.startswith(a + ".")), module)


def module_of(mutant: str) -> str:
    """sd3serve.ledger.credits.xǁCreditStoreǁhold__mutmut_3 -> sd3serve.ledger.credits"""
    parts = mutant.split(".")
    return ".".join(p for p in parts[:-1])


def main() -> int:
    args = sys.argv[1:]
    sampled = "--sample" in args
    areas = "--areas" in args
    args = [a for a in args if a not in ("--sample", "--areas")]
    pattern = args[0] if args else "*"
    chosen = set(Path("mutants/sample.txt").read_text().split()) if sampled else None
    by_module: dict[str, Counter[str]] = defaultdict(Counter)
    survivors: list[str] = []
    for name, status in sorted(verdicts().items()):
        if not fnmatch.fnmatch(name, pattern) or status == "not checked":
            continue
        if chosen is not None and name not in chosen:
            continue
        module = module_of(name)
        by_module[area_of(module) if areas else module][status] += 1
        if status in MISSED:
            survivors.append(f"{name}: {status}")
    print("| module | type check | mutants run | killed (timeout) | survived | no tests | score | 95 % interval |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    total: Counter[str] = Counter()
    for module, counts in sorted(by_module.items()):
        total.update(counts)
        print(_row(module, counts))
    if len(by_module) > 1:
        print(_row("**all**", total))
    if survivors:
        print(f"\n{len(survivors)} not killed (`mutmut show NAME` shows the diff):")
        print("\n".join(f"    {s}" for s in survivors))
    return 0


def _row(module: str, counts: Counter[str]) -> str:
    killed = sum(counts[s] for s in KILLED)
    missed = sum(counts[s] for s in MISSED)
    run = killed + missed
    score = f"{100 * killed / run:.0f} %" if run else "-"
    low, high = wilson(killed, run)
    interval = f"{100 * low:.0f}-{100 * high:.0f} %" if run else "-"
    return (f"| {module} | {counts['caught by type check']} | {run} | {killed} ({counts['timeout']}) | "
            f"{counts['survived']} | {counts['no tests']} | {score} | {interval} |")  # fmt: skip


def wilson(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson's score interval for a proportion: sound for small samples and for scores near 0 or 100 %."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


if __name__ == "__main__":
    raise SystemExit(main())
