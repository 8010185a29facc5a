# Two commands do all the set-up on a fresh machine (Python 3.10+ with venv):
#   make demo   runs the main job      make test   runs the test suite
VENV ?= .venv
BIN := $(VENV)/bin
# Ray on a single machine: every port on 127.0.0.1, no usage reporting; gloo over loopback
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER ?= 0
export RAY_USAGE_STATS_ENABLED ?= 0
export GLOO_SOCKET_IFNAME ?= lo

.PHONY: setup demo test
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

demo: setup
	$(BIN)/epserve demo

test: setup
	$(BIN)/python -m pytest -q
