#!/usr/bin/env bash
# The full merge benchmark behind docs/performance.md. Needs ~25 GB free under $DATA and the
# anchors venv (benchmarks/setup_anchors.sh). Results: JSON lines under $DATA/results; then
#   python benchmarks/report.py $DATA/results/{bf16-1g-n2,fp32-2g-n2,bf16-1g-n8,bf16-small-n2}.jsonl --plot docs/performance.png
#   python benchmarks/report.py --svd $DATA/results/svd-n*.jsonl
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
DATA=${DATA:-/tmp/distac-bench}
RES=${RES:-$DATA/results}
mkdir -p "$RES"
gen() { [ -d "$DATA/$1" ] || $PY benchmarks/gen_checkpoints.py --out "$DATA/$1" "${@:2}"; }
gen bf16-1g --params 0.5e9 --n 8 --dtype bfloat16 --fisher 2
gen fp32-2g --params 0.5e9 --n 2 --dtype float32
gen bf16-small --params 2e7 --n 8 --dtype bfloat16

bench() { $PY benchmarks/bench_merge.py run --rss-cap-mb "${CAP:-10000}" --timeout "${TIMEOUT:-420}" "$@"; }
# 1. every shared method, 1 GB bf16 checkpoints, N=2; distac runs first and again last (A/B/A)
bench --data "$DATA/bf16-1g" --n 2 --results "$RES/bf16-1g-n2.jsonl" --runs \
ta_distac,ta_mergekit,ta_fusionbench,ties_tensor_distac,ties_tensor_mergekit,ties_global_distac,\
ties_global_fusionbench,dare_distac,dare_mergekit,dare_fusionbench,gm_distac,ta_distac,ties_tensor_distac
# 2. fp32 (2 GB per checkpoint), task arithmetic
bench --data "$DATA/fp32-2g" --n 2 --results "$RES/fp32-2g-n2.jsonl" --runs ta_distac,ta_mergekit,ta_fusionbench,ta_distac
# 3. N=8 (9 GB read), task arithmetic
bench --data "$DATA/bf16-1g" --n 8 --results "$RES/bf16-1g-n8.jsonl" --runs ta_distac,ta_mergekit,ta_distac
# 4. SVD methods (whole-model; exact SVD on 2 CPU cores is too slow for the 1 GB set)
bench --data "$DATA/bf16-small" --n 2 --results "$RES/bf16-small-n2.jsonl" --runs \
ta_distac,tsvm_exact_distac,tsvm_lowrank_distac,isoc_distac
# 5. exact vs randomized SVD per matrix (N=2: k = r/2; N=8: k = r/8), and O(n) thresholds vs argsort
$PY benchmarks/bench_svd.py --data "$DATA/bf16-1g" --n 8 \
  --tensors model.layers.0.self_attn.k_proj.weight,model.layers.0.self_attn.q_proj.weight,model.layers.0.mlp.gate_proj.weight \
  > "$RES/svd-n8.jsonl"
$PY benchmarks/bench_thresholds.py --repeat 2 > "$RES/thresholds.txt"
