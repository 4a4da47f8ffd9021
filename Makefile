# Single entry points. `make demo` and `make test` install first (idempotent: seconds when done).
PYTHON ?= python3

.PHONY: install demo test lint bench

install:
	bash tools/install.sh

demo: install
	$(PYTHON) experiments/demo.py

test: install
	$(PYTHON) -m pytest -q

lint:
	$(PYTHON) -m ruff check .

bench:
	$(PYTHON) benchmarks/layer_speed.py --out work_dirs/bench/layer_speed.json
