#!/bin/bash
# GPU benchmark (issue 18): emulator build straight from a Q4_K_M-sized GGUF of Llama-3-8B shapes (streamed) vs
# convert-then-build. PATHS=streamed or PATHS=convert (one per call: each takes minutes); the JSON in $OUT
# accumulates when the same --work is kept between calls on a warm machine (else each call rebuilds the GGUF).
set -u
mkdir -p /tmp/site && python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .dev4/*.whl 2>&1 | tail -1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 EMLOC_HOME=/tmp/emloc-home HF_HUB_OFFLINE=1
free -g | head -2; df -h /tmp | tail -1
T0=$(date +%s)
timeout ${T:-560} python3 benchmarks/bench_gguf_stream.py --work /tmp/ggufbench --json /tmp/gguf-stream.json --paths ${PATHS:-streamed} 2>&1 | grep -v '^ ' | tail -8
echo "gguf ${PATHS:-streamed} rc=$? in $(( $(date +%s) - T0 )) s"
cp /tmp/gguf-stream.json $OUT/gguf-stream-${PATHS:-streamed}.json 2>/dev/null; true
