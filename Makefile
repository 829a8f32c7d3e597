# The two commands of the README: `make demo` (the main job) and `make test` (the suite).
# Both create ./.venv and install everything they need into it. torch is installed first and
# pinned, because a bare `torch` requirement would pull a multi-GB CUDA build on this machine.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed
TORCH  ?= torch==2.13.0

export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: install demo test test-fast lint bench clean browser

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH)"
	$(PIP) install -q -e ".[triton,viz,hf,dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/selfattn demo

# The head view is tested in Debian's headless chromium; install it when absent. A failure
# here (no root, no apt) is tolerated: the browser test then skips and says why.
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	  { apt-get update -qq && apt-get install -y -qq chromium >/dev/null; } || \
	  echo "chromium could not be installed: tests/test_browser.py will skip"

test: $(STAMP) browser
	$(PY) -m pytest -q tests

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow" tests

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks examples
	$(VENV)/bin/ruff format --check src tests benchmarks examples

bench: $(STAMP)
	$(PY) benchmarks/cpu.py

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache
