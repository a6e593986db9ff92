"""mutmut's verdicts per module, as a Markdown table (run after `mutmut run`; `make mutate` does).

    .venv/bin/python bench/mutation_scores.py [PATTERN]     e.g. "sd3serve.ledger*"

Score = killed / (killed + survived + no tests): a mutant with no test reaching its function counts as surviving.
Timeouts count as killed (the mutant made the tests hang); mutants not run yet ("not checked") are left out.
"""

from __future__ import annotations

import fnmatch
import subprocess
import sys
from collections import Counter, defaultdict
from pathlib import Path

KILLED = {"killed", "timeout", "caught by type check", "segfault"}
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


def module_of(mutant: str) -> str:
    """sd3serve.ledger.credits.xǁCreditStoreǁhold__mutmut_3 -> sd3serve.ledger.credits"""
    parts = mutant.split(".")
    return ".".join(p for p in parts[:-1])


def main() -> int:
    pattern = sys.argv[1] if len(sys.argv) > 1 else "*"
    by_module: dict[str, Counter[str]] = defaultdict(Counter)
    survivors: list[str] = []
    for name, status in sorted(verdicts().items()):
        if not fnmatch.fnmatch(name, pattern) or status == "not checked":
            continue
        by_module[module_of(name)][status] += 1
        if status in MISSED:
            survivors.append(f"{name}: {status}")
    print("| module | mutants run | killed | survived | no tests | score |")
    print("| --- | --- | --- | --- | --- | --- |")
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
    return f"| {module} | {run} | {killed} | {counts['survived']} | {counts['no tests']} | {score} |"


if __name__ == "__main__":
    raise SystemExit(main())
