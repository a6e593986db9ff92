# Two commands do everything on a fresh machine: `make serve` and `make test`. `make serve` installs only what
# serving needs; `make test` adds the dev tools and Debian's chromium. Settings come from SD3SERVE_* variables.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
SERVE_STAMP := $(VENV)/.installed-serve
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: serve test lint bench clean

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

serve: $(SERVE_STAMP)
	$(VENV)/bin/sd3serve serve

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/mypy
	$(VENV)/bin/hadolint Dockerfile

test: lint
	HF_HUB_OFFLINE=1 $(PY) -m pytest

bench: $(STAMP)
	$(PY) bench/overhead.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache tests/js/node_modules
