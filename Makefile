# The README's commands. Every step installs what it needs: a fresh clone needs only python3.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup build demo serve test lint clean

$(STAMP): requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

setup: $(STAMP)

build: setup  ## (re)build model_repository/ from the synthetic catalog
	$(PY) -m builder

demo: setup  ## build if needed, start Triton, query, measure, stop
	$(PY) -m serving.demo

serve: setup  ## build if needed, run Triton in the foreground (Ctrl-C stops)
	$(PY) -m serving.serve

test: setup  ## the whole suite (starts real servers)
	$(PY) -m pytest -q tests

lint: setup
	$(PY) -m ruff check .

clean:
	rm -rf build logs .triton model_repository/*/1/*.pt model_repository/*/1/schema.json
