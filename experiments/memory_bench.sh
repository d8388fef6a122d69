#!/usr/bin/env bash
# The long-memory benchmark in one command: trains omnimem, window and dense models on the synthetic
# orbiting-camera world (the three in parallel on one GPU, same number of steps each), then runs
# experiments/eval_memory.py on them. Re-running resumes unfinished training and skips finished models.
#
#   bash experiments/memory_bench.sh [out_dir=runs/memory_bench] [steps=4914]
#
# The plot (out_dir/memory_bench.png) needs matplotlib: pip install 'omnimem-jax[plot]' (or, in a
# checkout, pip install -e '.[plot]'); without it eval_memory.py says so in one line and writes the JSON.
#
# benchmarks/results/memory_bench_h100.json came from these flags on one H100 (jax 0.11.2), 4914 steps
# for omnimem and dense, 4907 for window (it was stopped by a time budget).
set -euo pipefail
out=${1:-runs/memory_bench}
steps=${2:-4914}
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$(pwd)" XLA_PYTHON_CLIENT_PREALLOCATE=false
python=${PYTHON:-python3}
mkdir -p "$out"
pids=()
for mode in omnimem window dense; do
  if [[ -f "$out/$mode/export/omnimem.json" ]]; then
    echo "$mode: $out/$mode/export exists, not retraining"
    continue
  fi
  "$python" experiments/train.py --mode="$mode" --run_dir="$out/$mode" --world_width=72 --num_chunks=9 \
    --learning_rate=5e-4 --steps="$steps" --log_every=100 --save_every=1000 \
    --export="$out/$mode/export" >"$out/$mode.log" 2>&1 &
  pids+=($!)
  echo "$mode: training (log: $out/$mode.log)"
done
for pid in "${pids[@]}"; do
  wait "$pid" || { echo "error: a training run failed; see $out/*.log" >&2; exit 1; }
done
"$python" experiments/eval_memory.py \
  --checkpoints="omnimem:$out/omnimem/export,window:$out/window/export,dense:$out/dense/export" \
  --num_chunks=18 --recall_chunks=9 --num_videos=8 --output="$out/memory_bench.json"
