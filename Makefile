# Two entry points for a fresh machine (Debian/Ubuntu, Python 3.11):
#   make serve  install everything, then run the product: serve run serve_config.yaml
#   make test   install everything, then run the test suite
# Also: make demo (the CLI on the sample dialogue), make bench, make lint.
# Both are idempotent: the install steps are skipped once done.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
SYSTEM_PACKAGES := ffmpeg espeak-ng sox postgresql chromium chromium-driver

.PHONY: setup system-packages serve demo test lint bench

setup: system-packages $(VENV)/.installed

system-packages:
	@missing=""; for p in ffmpeg ffprobe espeak-ng sox chromium chromedriver; do command -v $$p >/dev/null || missing=1; done; \
	ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing=1; \
	if [ -n "$$missing" ]; then \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $(SYSTEM_PACKAGES); \
	fi

$(VENV)/.installed: pyproject.toml
	[ -x $(BIN)/python ] || $(PYTHON) -m venv $(VENV)
	[ -x $(BIN)/uv ] || $(BIN)/pip install -q uv
	$(BIN)/uv pip install --python $(BIN)/python -q -e ".[test]"
	touch $@

serve: setup
	$(BIN)/serve run serve_config.yaml

demo: setup
	$(BIN)/ecg-analyze tests/fixtures/dialogue_en.flac

test: setup
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

bench: setup
	$(BIN)/python benchmarks/bench_pipeline.py
	$(BIN)/python benchmarks/bench_serve.py
