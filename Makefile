# Quickstart: `make demo` (synth -> shards -> train -> evaluate) and `make test`.
# Both create or reuse .venv and install the project into it from pyproject.toml.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
DEMO   ?= demo_out

.PHONY: demo test lint bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m shardgen synth --out $(DEMO)/raw --images 40 --seed 0 --workers 2
	$(PY) -m shardgen build --annotations $(DEMO)/raw/annotations --images $(DEMO)/raw/images \
		--out $(DEMO)/shards --mode binary --workers 2
	$(PY) -m trainer --config demo
	$(PY) -m evaluate --checkpoint $(DEMO)/run/best.pt --data $(DEMO)/shards --split test --out $(DEMO)/eval
	@echo "demo: shards in $(DEMO)/shards, checkpoints and logs (metrics.csv, tb/) in $(DEMO)/run,"
	@echo "      report in $(DEMO)/eval/report.html"

test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m pytest -q

lint: $(STAMP)
	$(PY) -m ruff check .

bench: $(STAMP)
	$(PY) bench/run_all.py

clean:
	rm -rf $(DEMO)
