#!/usr/bin/env bash
# The main job on a CPU machine, end to end (what `make demo` runs):
#   1. set up .venv   2. build a small real labelled corpus (scikit-learn's handwritten digits)
#   3. shard its train and val splits with data_prep
#   4. pre-train the tiny_cpu recipe with 2 CPU ranks under the deepspeed launcher, on the train
#      split's images (labels unused), with the eval worker beside it probing every export on a suite of
#      two datasets: the digits, and the digits with 10% of the training labels (the low-shot setting)
#   5. summarise the run (loss, throughput, probe top-1 per export and the suite's mean) and print the
#      TensorBoard command
# RUN=runs/demo by default; rerunning resumes (delete $RUN to start over).
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=${RUN:-runs/demo}
NPROC=${NPROC:-2}
bash scripts/setup_env.sh
PY=.venv/bin/python

if [ ! -d "$RUN/digits/img/train_10pc" ]; then
    $PY -m data_prep.demo_corpus --digits --out "$RUN/digits/img" --size 64
fi
for split in train train_10pc val; do
    .venv/bin/xtra-shard "$RUN/digits/img/$split" --output "$RUN/digits/$split" --name "$split" --shard-samples 400
done

DIGITS="$RUN/digits"
EVAL=(eval.suite=digits eval.poll_seconds=5 "eval.datasets=[{name: digits, train: $DIGITS/train/manifest.json, \
val: $DIGITS/val/manifest.json}, {name: digits_10pc, train: $DIGITS/train_10pc/manifest.json, val: $DIGITS/val/manifest.json}]")
echo "[main] eval worker: $PY launchers/eval_worker.py --run-dir $RUN/tiny_cpu ${EVAL[*]}"
$PY launchers/eval_worker.py --run-dir "$RUN/tiny_cpu" "${EVAL[@]}" &
WORKER=$!
trap 'kill $WORKER 2>/dev/null || true' EXIT

# A quiet console: DeepSpeed's launcher at --log_level=error (its INFO lines restate the command), and on a
# machine without GPUs the accelerator named (else every process notes that it found none); the ranks' own
# library output goes to $RUN/tiny_cpu/logs/ (logging.verbose=true prints it too).
command -v nvidia-smi >/dev/null || export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}
echo "[main] pre-training: deepspeed --num_gpus $NPROC launchers/pretrain.py --config ds_configs/tiny_cpu.yaml"
.venv/bin/deepspeed --log_level=error --num_gpus "$NPROC" launchers/pretrain.py --config ds_configs/tiny_cpu.yaml \
    data.train="$RUN/digits/train/manifest.json" run_dir="$RUN/tiny_cpu" "$@"

echo "[main] training finished; the eval worker evaluates the exports still waiting, then exits"
kill -USR1 $WORKER
wait $WORKER
trap - EXIT

$PY launchers/summarize_run.py "$RUN/tiny_cpu"
