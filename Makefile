# Two entry points: `make demo` runs the main job, `make test` runs the whole test suite.
# Both create the virtual environment on first use: everything (torch CPU build, TotalSegmentator, vtk,
# slicer-core, ...) is resolved in ONE pip call against constraints.txt.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv demo test lint lock clean

venv: $(STAMP)

$(STAMP): requirements.txt constraints.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade "pip>=24"
	$(BIN)/python -m pip install --quiet -c constraints.txt -r requirements.txt -e .
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/lnstaging stage --side R 4R 7 10L

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .

# Re-resolve the pinned set (needs network access to PyPI).
lock:
	rm -rf /tmp/lns-lock && $(PYTHON) -m venv /tmp/lns-lock
	/tmp/lns-lock/bin/python -m pip install --quiet --upgrade "pip>=24"
	/tmp/lns-lock/bin/python -m pip install --quiet -r requirements.txt
	(echo "# Exact versions resolved together (one pip call); regenerate with \`make lock\`."; echo "torch==2.13.0"; \
	 /tmp/lns-lock/bin/python -m pip freeze | grep -v -iE "^(torch|pip|setuptools)==") > constraints.txt

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
