#!/usr/bin/env bash
# The main job on a CPU machine, end to end (what `make demo` runs):
#   1. set up .venv   2. build a small real-image corpus   3. shard it with data_prep
#   4. pre-train the tiny_cpu recipe with 2 CPU ranks under the deepspeed launcher
#   5. summarise the run and print the TensorBoard command
# RUN=runs/demo by default; rerunning resumes (delete $RUN to start over).
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=${RUN:-runs/demo}
NPROC=${NPROC:-2}
bash scripts/setup_env.sh
PY=.venv/bin/python

if [ ! -d "$RUN/corpus" ]; then
    $PY launchers/make_demo_corpus.py --out "$RUN/corpus" --n 1200
fi
.venv/bin/xtra-shard "$RUN/corpus" --output "$RUN/shards" --name train --shard-samples 100 --max-side 96

echo "[main] pre-training: deepspeed --num_gpus $NPROC launchers/pretrain.py --config ds_configs/tiny_cpu.yaml"
.venv/bin/deepspeed --num_gpus "$NPROC" launchers/pretrain.py --config ds_configs/tiny_cpu.yaml \
    data.train="$RUN/shards/manifest.json" run_dir="$RUN/tiny_cpu" "$@"

$PY launchers/summarize_run.py "$RUN/tiny_cpu"
