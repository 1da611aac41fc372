# The README's commands. Every step installs what it needs: a fresh clone needs only python3.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup train build demo serve test lint clean loadtest

$(STAMP): requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

# the compiled CPU ops (kernels/csrc/ -> build/ext/, keyed by a hash of sources and flags):
# a no-op when up to date, rebuilt when a source changed
setup: $(STAMP)
	$(PY) kernels/build_ext.py --quiet

train: setup  ## train the two-tower model, OverArch and task heads -> build/weights/
	$(PY) -m training

build: setup  ## (re)build model_repository/ from the synthetic catalog
	$(PY) -m builder

# `make demo CATALOG=DIR` demos your catalog (docs/catalog.md) or a MovieLens directory instead
CATALOG ?=
demo: setup  ## build if needed, start Triton, query, measure, stop
	$(PY) -m serving.demo $(if $(CATALOG),--catalog "$(CATALOG)")

# `make serve REPOSITORY=DIR` serves a repository built with `python -m builder --repository DIR`;
# without it, model_repository/ (built first if needed). `python -m serving.serve --help`: options.
REPOSITORY ?=
serve: setup  ## build if needed, run Triton in the foreground (Ctrl-C stops)
	$(PY) -m serving.serve $(if $(REPOSITORY),--repository $(REPOSITORY))

test: setup  ## the whole suite (starts real servers)
	$(PY) -m pytest -q tests

# `make loadtest`: Locust, headless and time-bounded, against a server that is already running
# (`make serve` in another shell). Override e.g. MODEL=baseline USERS=16 DURATION=1m MIX=filtered
# PROTOCOL=grpc; HISTORY=N sends an N-item history with every request (retrieval and unified;
# 0 = none); the ports follow TRITON_HTTP_PORT / TRITON_GRPC_PORT / TRITON_METRICS_PORT.
TRITON_HOST ?= 127.0.0.1
TRITON_HTTP_PORT ?= 8000
TRITON_GRPC_PORT ?= 8001
TRITON_METRICS_PORT ?= 8002
MODEL ?= unified
USERS ?= 8
DURATION ?= 30s
MIX ?= mixed
HISTORY ?= 0
PROTOCOL ?= http
LOADTEST_OUT ?= runs/loadtest
LOADTEST_USER = $(if $(filter grpc,$(PROTOCOL)),GrpcTritonUser,HttpTritonUser)

loadtest: setup  ## Locust vs a running server: CSV + HTML in runs/loadtest/, one-line summary
	@mkdir -p $(LOADTEST_OUT)
	$(VENV)/bin/locust -f loadtest/locustfile.py $(LOADTEST_USER) --headless --only-summary \
	  -u $(USERS) -r $(USERS) -t $(DURATION) --stop-timeout 10 \
	  --host http://$(TRITON_HOST):$(TRITON_HTTP_PORT) \
	  --triton-grpc-url $(TRITON_HOST):$(TRITON_GRPC_PORT) \
	  --triton-metrics-url http://$(TRITON_HOST):$(TRITON_METRICS_PORT)/metrics \
	  --triton-model $(MODEL) --triton-mix $(MIX) --triton-history $(HISTORY) \
	  --csv $(LOADTEST_OUT)/$(MODEL)-$(PROTOCOL) --html $(LOADTEST_OUT)/$(MODEL)-$(PROTOCOL).html \
	  --triton-summary-json $(LOADTEST_OUT)/$(MODEL)-$(PROTOCOL)-summary.json

lint: setup
	$(PY) -m ruff check .

clean:
	rm -rf build logs .triton model_repository/*/1/*.pt model_repository/*/1/schema.json \
	  fresh_items model_repository/*/[2-9] model_repository/*/[1-9][0-9]*
