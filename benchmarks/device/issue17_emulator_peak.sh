#!/bin/bash
# device: where the emulator build's GPU peak comes from (issue 17: the 14B's build measured 6.47 GiB, planned 5.22).
# Two-block models of Qwen2.5-14B and Llama-3-8B shapes, built with the budgets of the 2026-12-06 runs
# (allowed 13.73 and 6.80 GiB; 64 x 512 calibration tokens), under the allocator's history.
set -u
mkdir -p /tmp/site && python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .dev4/*.whl 2>&1 | tail -1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 EMLOC_HOME=/tmp/emloc-home HF_HUB_OFFLINE=1
python3 -c "import torch,transformers;print(torch.__version__,transformers.__version__, torch.cuda.get_device_name())"
for A in ${ARCHS:-qwen2.5-14b:13.73 llama3-8b:6.80}; do
  python3 benchmarks/device/emulator_peak_trace.py --arch ${A%%:*} --budget-gib ${A##*:} --out $OUT/peak-trace-${A%%:*}.json 2>&1 | grep -v Warn | tail -40
done
