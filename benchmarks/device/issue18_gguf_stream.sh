#!/bin/bash
# GPU benchmark (issue 18): emulator build straight from a Q4_K_M-sized GGUF of Llama-3-8B shapes (streamed) vs
# convert-then-build. Three calls on one warm machine: PATHS=write (the 5.2 GB GGUF), then PATHS=streamed, then
# PATHS=convert; the JSON in $OUT accumulates (each step saved as it ends) when /tmp is kept between calls.
# 2026-12-06, H100: write + streamed in one call did not finish in 400 s.
set -u
mkdir -p /tmp/site && python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .dev4/*.whl 2>&1 | tail -1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 EMLOC_HOME=/tmp/emloc-home HF_HUB_OFFLINE=1
free -g | head -2; df -h /tmp | tail -1
T0=$(date +%s)
timeout ${T:-560} python3 benchmarks/bench_gguf_stream.py --work /tmp/ggufbench --json /tmp/gguf-stream.json --paths ${PATHS:-streamed} 2>&1 | grep -v '^ ' | tail -8
echo "gguf ${PATHS:-streamed} rc=$? in $(( $(date +%s) - T0 )) s"
cp /tmp/gguf-stream.json $OUT/gguf-stream-${PATHS:-streamed}.json 2>/dev/null; true
