#!/bin/bash
# device: issue 23, image models. FLUX.1-dev shapes in a 24 GiB cap and SDXL shapes in a 12 GiB cap at 1024x1024,
# every stage's peak and time, plain LoRA's beside (random weights built from configs; nothing downloaded).
# The device image may lack diffusers: carry its wheel in .dev5/ (on this machine:
#   /work/main/.venv/bin/pip download diffusers==0.42.1 --no-deps -d .dev5 ; echo .dev5/ >> .git/info/exclude)
# and run with carry [".dev5"]. FLUX.1-dev takes ~20-25 min (24 GB random transformer written and read),
# so it runs alone (MODEL=flux-dev), SDXL in a second call (MODEL=sdxl). A run longer than one call is split over
# back-to-back calls on the warm machine: LAST=inference, then FROM=emulator LAST=emulator, FROM=train LAST=correct,
# FROM=plain_lora (each later call keeps /tmp/img-bench, whose results-MODEL.json gathers the stages; the JSON in
# $OUT has them all; images-MODEL-capN.partial.json in $OUT is rewritten after every stage).
# RATIO (default 0.5) is the emulator's ρ; ANCHOR=1 adds the anchored training stage (train_anchored);
# SKIP="correct plain_lora" leaves stages out; BATCH (default 1) is the calibration and held-out batch (the run's
# default is 4: each batch streams the original once).
set -u
mkdir -p /tmp/site
python3 -c "import diffusers" 2>/dev/null || \
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .dev5/*.whl 2>&1 | tail -2
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 EMLOC_HOME=/tmp/emloc-home HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import torch,transformers,peft,diffusers;print(torch.__version__,transformers.__version__,peft.__version__,diffusers.__version__)"
case "${MODEL:-flux-dev}" in
  flux-dev) CAP=24 ;;
  sdxl) CAP=12 ;;
esac
python3 benchmarks/bench_images.py --model "${MODEL:-flux-dev}" --cap-gib $CAP --resolution 1024 --steps ${STEPS:-10} \
  --ratio ${RATIO:-0.5} --batch ${BATCH:-1} ${ANCHOR:+--anchor} ${PROBE:+--probe} ${SKIP:+--skip $SKIP} ${FROM:+--from-stage $FROM} ${LAST:+--last-stage $LAST} --work /tmp/img-bench --out $OUT/images-${MODEL:-flux-dev}-cap${CAP}.json 2>&1 | grep -v "it/s" | tail -60
