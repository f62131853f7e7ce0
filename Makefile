# The two commands a newcomer needs (see README.md):
#   make demo   runs the main job
#   make test   runs the test suite (what CI runs)
# Each installs the project into .venv on first use (scripts/setup_venv.sh).

VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.adaspkv-installed

.PHONY: demo test test-fast setup clean-venv

$(STAMP): pyproject.toml scripts/setup_venv.sh
	VENV=$(VENV) scripts/setup_venv.sh

setup: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/adaspkv demo $(ARGS)

# Tests run in TEST_WORKERS processes (pytest-xdist), a test file to a process so that its module
# fixtures (a stock engine's tokens, a trained model) are built once. Two on a 2-core machine: 28 min
# serial, 19 min in two (much of a vLLM engine's start-up is one thread: imports, compile).
TEST_WORKERS ?= 2
XDIST := -n $(TEST_WORKERS) --dist loadfile

# Everything that runs without a GPU, the vLLM engine tests included.
test: $(STAMP)
	$(PY) -m pytest $(XDIST) $(PYTEST_ARGS)

# The quick loop while developing: leaves out the tests marked slow.
test-fast: $(STAMP)
	$(PY) -m pytest $(XDIST) -m "not slow and not gpu" $(PYTEST_ARGS)

clean-venv:
	rm -rf $(VENV)
