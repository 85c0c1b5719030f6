# Every target creates/refreshes .venv first (scripts/setup_env.sh; cheap when up to date).
PY := .venv/bin/python

.PHONY: setup demo test bench clean

setup:
	bash scripts/setup_env.sh

demo: setup  ## the main job on the CPU: corpus -> shards -> 2-rank DeepSpeed pre-training -> summary
	bash scripts/main_job.sh

test: setup  ## the test suite (what CI runs)
	$(PY) -m pytest -q

bench: setup  ## every benchmark (figures: docs/PERFORMANCE.md)
	$(PY) bench/bench_model.py
	$(PY) bench/bench_shard.py
	$(PY) bench/bench_loader.py
	$(PY) bench/bench_engine.py
	$(PY) bench/bench_eval.py

clean:
	rm -rf .venv runs .pytest_cache
