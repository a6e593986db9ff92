"""`make mutate`: mutmut over a fixed-seed random sample of each module's mutants, to fit in an hour on 2 cores.

    .venv/bin/python bench/mutation_sample.py [--per-module N] [--seed S] [--max-children C] [--open] [PATTERN]

mutmut generates every mutant and its type check (`type_check_command` in pyproject.toml) names those that do not
type-check; from the others this draws N per module (all of them where a module has fewer), the same ones on every
run for the same code and seed, and hands their names to `mutmut run`, which tests only those. `make mutate-all`
runs every mutant instead. bench/mutation_scores.py then prints the scores with their 95 % intervals.
"""

from __future__ import annotations

import argparse
import fnmatch
import os
import random
import sys
from collections import defaultdict
from pathlib import Path


def module_of(mutant: str) -> str:
    """sd3serve.ledger.credits.xǁCreditStoreǁhold__mutmut_3 -> sd3serve.ledger.credits"""
    return mutant.rpartition(".")[0]


def generate() -> tuple[dict[str, list[str]], set[str]]:
    """Every mutant by module, and the names the type checker rejects, from mutmut's own generation."""
    from mutmut.__main__ import create_mutants
    from mutmut.configuration import config
    from mutmut.mutation.data import SourceFileMutationData
    from mutmut.mutation.file_mutation import filter_mutants_with_type_checker
    from mutmut.utils.file_utils import copy_also_copy_files, copy_src_dir, setup_source_paths, walk_mutatable_files

    Path("mutants").mkdir(exist_ok=True)
    copy_src_dir()
    copy_also_copy_files()
    setup_source_paths()
    create_mutants(2)
    rejected = set(filter_mutants_with_type_checker()) if config().type_check_command else set()
    by_module: dict[str, list[str]] = defaultdict(list)
    for path in walk_mutatable_files():
        data = SourceFileMutationData(path=path)
        data.load()
        for name in data.exit_code_by_key:
            by_module[module_of(name)].append(name)
    return by_module, rejected


def sample(names: list[str], per_module: int, seed: int, module: str) -> list[str]:
    names = sorted(names)
    if len(names) <= per_module:
        return names
    return sorted(random.Random(f"{seed}/{module}").sample(names, per_module))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("pattern", nargs="?", default="*", help='mutant names, e.g. "sd3serve.ledger*"')
    parser.add_argument("--per-module", type=int, default=18)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-children", type=int, default=2)
    parser.add_argument("--open", action="store_true",
                        help="run only the sampled mutants not yet killed (new ones, survivors, no tests): after "
                             "adding tests, the rest keep their verdicts")  # fmt: skip
    args = parser.parse_args()

    by_module, rejected = generate()
    chosen: list[str] = []
    print("| module | mutants | not type-checking | sampled |\n| --- | --- | --- | --- |")
    for module, names in sorted(by_module.items()):
        names = [n for n in names if fnmatch.fnmatch(n, args.pattern)]
        if not names:
            continue
        valid = [n for n in names if n not in rejected]
        picked = sample(valid, args.per_module, args.seed, module)
        chosen += picked
        print(f"| {module} | {len(names)} | {len(names) - len(valid)} | {len(picked)} |")
    print(f"{len(chosen)} mutants sampled (seed {args.seed}, {args.per_module} per module)", flush=True)
    if not chosen:
        return 1
    Path("mutants/sample.txt").write_text("\n".join(chosen) + "\n")
    if args.open:
        # Adding tests never revives a killed mutant, and mutmut resets the verdicts of a function it re-mutates.
        from mutation_scores import KILLED, verdicts

        done = verdicts()
        chosen = [name for name in chosen if done.get(name) not in KILLED]
        print(f"{len(chosen)} of them not killed yet: running those", flush=True)
        if not chosen:
            return 0
    mutmut = str(Path(sys.executable).with_name("mutmut"))
    os.execv(mutmut, [mutmut, "run", "--max-children", str(args.max_children), *chosen])


if __name__ == "__main__":
    raise SystemExit(main())
