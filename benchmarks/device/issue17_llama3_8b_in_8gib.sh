#!/bin/bash
# GPU acceptance, call 1: Llama-3-8B shapes inside 8 GiB (issue 17), then anchors at 1,000 x 512 tokens
# SKIP_RUN=1: only the anchors, in a second call on the same warm machine (they need the run's emulator);
# MODES=none or MODES=blocks: one side of the anchors comparison per call (each lands in anchors-partial-8b.json)
# SKIP_RUN=1 ANCHOR_RATIO=0.2 on a fresh machine: the anchors part builds the emulator alone (Stage 1, ~40 s) first
set -u
mkdir -p /tmp/site && python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .dev4/*.whl 2>&1 | tail -1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 EMLOC_HOME=/tmp/emloc-home HF_HUB_OFFLINE=1
python3 -c "import torch,transformers,peft;print(torch.__version__,transformers.__version__,peft.__version__, torch.cuda.get_device_name())"
python3 -c "import emloc_engine.run.orchestrator, emloc_engine.weights.streamed, emloc_engine.weights.gguf_source; print('imports ok')" || exit 1
free -g | head -2; df -h /tmp | tail -1
T0=$(date +%s)
# a later call on the same warm machine keeps the model (its tokenizer is written last) and the run's emulator
[ -f /tmp/l8b/tokenizer_config.json ] || python3 benchmarks/make_random_model.py --arch llama3-8b --out /tmp/l8b --shards 4 2>&1 | tail -2
echo "model built in $(( $(date +%s) - T0 )) s"
if [ -z "${SKIP_RUN:-}" ]; then
timeout ${RUN_T:-440} python3 benchmarks/bench_streamed.py --model-dir /tmp/l8b --work /tmp/st8 --part run --ratio auto --cap-gib 8 --exports ${EXPORTS:-merged,adapter} > $OUT/streamed-run-8b.json 2> /tmp/run8.err; echo "run rc=$? at $(( $(date +%s) - T0 )) s"
tail -5 /tmp/run8.err
python3 - <<'PY'
import json,os
d=json.load(open(os.environ['OUT']+'/streamed-run-8b.json'))['run']
print({k:d.get(k) for k in ('stream_original','ratio','lambda_','total_s','error','failed_in','plan')})
for s,v in d.get('stages',{}).items(): print(s,{k:v.get(k) for k in ('status','wall_s','measured_peak_gib','predicted_peak_gib','peak_rss_gib','peak_anon_rss_gib','within_cap','anchor_chunks')})
PY
fi
REM=$(( ${LIMIT:-560} - ( $(date +%s) - T0 ) ))
echo "anchors part gets $REM s"
if [ -z "${SKIP_ANCHORS:-}" ] && [ $REM -gt 60 ]; then timeout -k 5 $REM python3 benchmarks/bench_streamed.py --model-dir /tmp/l8b --work /tmp/st8 --part anchors --cap-gib 15.5 --examples ${EXAMPLES:-1000} --modes ${MODES:-none,blocks} ${ANCHOR_RATIO:+--anchor-ratio $ANCHOR_RATIO} > $OUT/streamed-anchors-8b.json 2> $OUT/anc.err; echo "anchors rc=$?"; grep -v Warn $OUT/anc.err | tail -8; fi
cp /tmp/st8/bench_streamed-anchors.partial.json $OUT/anchors-partial-8b.json 2>/dev/null; cp /tmp/run8.err $OUT/ 2>/dev/null; cp /tmp/st8/run/manifest.json $OUT/manifest-8b.json 2>/dev/null; true
