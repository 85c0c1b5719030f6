# Every target creates/refreshes .venv first (scripts/setup_env.sh; cheap when up to date).
PY := .venv/bin/python

.PHONY: setup demo lint test test-fast bench clean

setup:
	bash scripts/setup_env.sh

demo: setup  ## the main job on the CPU: corpus -> shards -> 2-rank DeepSpeed pre-training -> summary
	bash scripts/main_job.sh

lint: setup  ## ruff (pyflakes, import order, bugbear, line length 120)
	.venv/bin/ruff check .

test: lint  ## lint, then the whole test suite (what CI runs)
	$(PY) -m pytest -q

test-fast: lint  ## the edit loop: lint and the tests that take seconds (no training runs)
	$(PY) -m pytest -q -m "not slow"

bench: setup  ## every benchmark (figures: docs/PERFORMANCE.md)
	$(PY) bench/bench_model.py
	$(PY) bench/bench_shard.py
	$(PY) bench/bench_loader.py
	$(PY) bench/bench_engine.py
	$(PY) bench/bench_eval.py

clean:
	rm -rf .venv runs .pytest_cache
