#!/bin/bash
# GPU acceptance (issue 21): every VLM stage's peak vs the model's inference peak at the planner's rho,
# random weights of real shapes. MODELS="Qwen2.5-VL-7B InternVL2.5-8B" by default; T per model (s).
set -u
mkdir -p /tmp/site && python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .dev4/*.whl 2>&1 | tail -1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 EMLOC_HOME=/tmp/emloc-home HF_HUB_OFFLINE=1
for M in ${MODELS:-Qwen2.5-VL-7B InternVL2.5-8B}; do
  T0=$(date +%s)
  timeout ${T:-420} python3 benchmarks/bench_vlm.py --model $M --work /tmp/vlm-$M --out $OUT/vlm-$M.json ${ANCHOR:+--anchor $ANCHOR} ${ARGS:-} 2> /tmp/vlm-$M.err | tail -30
  echo "$M rc=$? in $(( $(date +%s) - T0 )) s"; tail -4 /tmp/vlm-$M.err; cp /tmp/vlm-$M.err $OUT/; rm -rf /tmp/vlm-$M
done
