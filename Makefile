# Single entry points. `make demo` and `make test` install first (idempotent: seconds when done).
PYTHON ?= python3
# pytest-xdist workers for `make test` (CI has 2 cores; files stay whole, their fixtures shared)
TEST_WORKERS ?= 2

.PHONY: install demo test lint bench

install:
	bash tools/install.sh

demo: install
	$(PYTHON) experiments/demo.py

test: install
	$(PYTHON) -m pytest -q -n $(TEST_WORKERS) --dist loadfile

lint:
	$(PYTHON) -m ruff check .

bench:
	$(PYTHON) benchmarks/layer_speed.py --out work_dirs/bench/layer_speed.json
