# Two commands do everything on a fresh machine: `make serve` and `make test`. `make serve` installs only what
# serving needs; `make test` adds the dev tools and Debian's chromium. Settings come from SD3SERVE_* variables.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
SERVE_STAMP := $(VENV)/.installed-serve
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
JS_DEPS := tests/js/node_modules/.package-lock.json

.PHONY: serve test test-stress lint docs bench mutate mutate-open mutate-all mutate-hand clean

# What serving needs, and nothing else.
$(SERVE_STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# constraints.txt pins torch to the local CPU build: a newer torch would pull GBs of CUDA packages.
	$(PY) -m pip install -q -c constraints.txt -e .
	@$(PY) -c 'import torch, sys; v = torch.__version__; print("torch", v); sys.exit(0 if v.startswith("2.13.0") else "torch must be 2.13.0, got " + v)'
	@! $(PY) -m pip list 2>/dev/null | grep -i '^nvidia-' || (echo "nvidia-* packages found: something asked for another torch" && false)
	touch $(SERVE_STAMP)

# The tests also need the dev tools and a headless browser: Debian's chromium, which Playwright drives through
# its executable_path (Playwright's own browser download is never used).
$(STAMP): $(SERVE_STAMP)
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	@! $(PY) -m pip list 2>/dev/null | grep -i '^nvidia-' || (echo "nvidia-* packages found: something asked for another torch" && false)
	command -v chromium >/dev/null || ($(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq chromium)
	touch $(STAMP)

# The tests also run the Ray Serve scale-out (tests/test_ray.py): the `ray` extra, for `make test` only.
$(VENV)/.installed-ray: $(STAMP)
	$(PY) -m pip install -q -c constraints.txt -e '.[dev,ray]' segmind  # segmind: the SDK tests/test_ray.py drives
	@! $(PY) -m pip list 2>/dev/null | grep -i '^nvidia-' || (echo "nvidia-* packages found: something asked for another torch" && false)
	touch $@

serve: $(SERVE_STAMP)
	$(VENV)/bin/sd3serve serve

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests bench tools
	$(VENV)/bin/mypy
	$(VENV)/bin/hadolint Dockerfile

# npm packages for the JavaScript client tests (tests/api/test_seed_example_js.py, the OpenAI node client). Without
# npm nothing is installed, and those tests skip, saying why.
$(JS_DEPS): tests/js/package.json tests/js/package-lock.json
	@if command -v npm >/dev/null 2>&1; then cd tests/js && npm ci --no-audit --no-fund; \
	else echo "npm not found: tests/js/node_modules not installed (the seed JavaScript example test needs node and npm)"; fi

# The reference in docs/ as a site (MkDocs, Material theme); --strict: a broken link or anchor fails the build.
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --quiet

test: lint docs $(VENV)/.installed-ray $(JS_DEPS)
	HF_HUB_OFFLINE=1 $(PY) -m pytest

# The whole suite in random order (pytest-randomly; the seed is printed) with both cores kept busy by stress-ng,
# as a loaded CI machine would: what passes only on an idle machine is flaky. Debian's stress-ng is installed once.
test-stress: lint $(VENV)/.installed-ray $(JS_DEPS)
	command -v stress-ng >/dev/null || ($(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq stress-ng)
	stress-ng --cpu 2 --quiet & load=$$!; \
	HF_HUB_OFFLINE=1 $(PY) -m pytest -p randomly $(PYTEST_ARGS); rc=$$?; kill $$load; wait $$load; exit $$rc

# Mutation testing with mutmut (docs/testing.md). `make mutate`: a fixed-seed sample of MUTATE_PER_MODULE mutants
# per module (49 minutes on 2 cores, measured); `make mutate MODULE=ledger.credits`: every mutant of one area (a dotted
# prefix under sd3serve); `make mutate-all`: every mutant (hours). MUTATE_CHILDREN=1 on a busy machine. The start,
# the end and the load average are printed for the record; mypy must be on PATH for mutmut's type check.
# One torch thread (OMP_NUM_THREADS, SD3SERVE_THREADS): mutmut forks each mutant's test run from its own process,
# which ran the clean tests, and a fork after torch's OpenMP pool has run hangs at the child's first parallel op
# (the mutant would be reported "timeout", i.e. killed).
MUTATE_CHILDREN ?= 2
MUTATE_PER_MODULE ?= 18
MUTMUT_ENV := env -u PYTHONPATH PATH=$(CURDIR)/$(VENV)/bin:$$PATH OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 SD3SERVE_THREADS=1
mutate: $(VENV)/.installed-ray
	@date -u +"start %H:%M:%S"; uptime
ifdef MODULE
	$(MUTMUT_ENV) $(VENV)/bin/mutmut run --max-children $(MUTATE_CHILDREN) "sd3serve.$(MODULE)*" || true
	@date -u +"end %H:%M:%S"; uptime
	$(PY) bench/mutation_scores.py "sd3serve.$(MODULE)*"
else
	$(MUTMUT_ENV) $(PY) bench/mutation_sample.py --per-module $(MUTATE_PER_MODULE) --max-children $(MUTATE_CHILDREN) || true
	@date -u +"end %H:%M:%S"; uptime
	$(PY) bench/mutation_scores.py --sample
endif

# The sample again, running only its mutants not killed yet (after new tests; a changed function is re-run anyway).
mutate-open: $(VENV)/.installed-ray
	@date -u +"start %H:%M:%S"; uptime
	$(MUTMUT_ENV) $(PY) bench/mutation_sample.py --open --per-module $(MUTATE_PER_MODULE) --max-children $(MUTATE_CHILDREN) || true
	@date -u +"end %H:%M:%S"; uptime
	$(PY) bench/mutation_scores.py --sample --areas

mutate-all: $(VENV)/.installed-ray
	@date -u +"start %H:%M:%S"; uptime
	$(MUTMUT_ENV) $(VENV)/bin/mutmut run --max-children $(MUTATE_CHILDREN) || true
	@date -u +"end %H:%M:%S"; uptime
	$(PY) bench/mutation_scores.py

# The hand-planted mutants of bench/mutate.py: modules outside mutmut's selection, and what its operators cannot
# express (about 40 pytest runs).
mutate-hand: $(STAMP)
	$(PY) bench/mutate.py

bench: $(STAMP)
	$(PY) bench/overhead.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache tests/js/node_modules mutants

# Retrain the demo model shipped in src/sd3serve/models/demo (about 50 minutes on 2 cores) with its tooling,
# tools/sd3demo, which is not part of the package: `make train-demo DEMO_OUT=DIR`.
DEMO_OUT ?= build/demo
.PHONY: train-demo
train-demo: $(STAMP)
	PYTHONPATH=tools $(PY) -m sd3demo.train --out $(DEMO_OUT) --minutes 50 --seed 0 --threads 2
