# Two commands do all set-up on a fresh machine:
#   make demo   builds a small model + adapters with tools/, merges them, verifies, prints a summary
#   make test   runs the test suite
# Both create/refresh the local virtualenv .venv (torch pinned to the CPU build 2.13.0).

PYTHON ?= python3
VENV   := .venv
VPY    := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: venv demo test bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q torch==2.13.0
	$(VPY) -m pip install -q -e ".[test]"
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(VPY) tools/demo.py --out demo-out

test: $(STAMP)
	$(VPY) -m pytest -q -m "not slow"

clean:
	rm -rf demo-out .pytest_cache
