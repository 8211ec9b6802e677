#!/bin/bash
# GPU acceptance, call 2: Qwen2.5-14B shapes inside 16 GiB (issue 17), adapter export (disk)
# Cut off by the call's limit? Call it again at once on the warm machine: the run resumes from /tmp/st14.
set -u
mkdir -p /tmp/site && python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .dev4/*.whl 2>&1 | tail -1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 EMLOC_HOME=/tmp/emloc-home HF_HUB_OFFLINE=1
rm -rf /tmp/l8b /tmp/st8; df -h /tmp | tail -1
T0=$(date +%s)
# a second call on the same warm machine keeps the model (its tokenizer is written last) and resumes the run
[ -f /tmp/q14/tokenizer_config.json ] || python3 benchmarks/make_random_model.py --arch qwen2.5-14b --out /tmp/q14 --shards 6 2>&1 | tail -1
echo "model built in $(( $(date +%s) - T0 )) s"
timeout $(( ${LIMIT:-560} - ( $(date +%s) - T0 ) )) python3 benchmarks/bench_streamed.py --model-dir /tmp/q14 --work /tmp/st14 --part run --ratio auto --cap-gib 16 --exports adapter > $OUT/streamed-run-14b.json 2> /tmp/run14.err; echo "run rc=$? at $(( $(date +%s) - T0 )) s"
tail -5 /tmp/run14.err; cp /tmp/run14.err $OUT/; cp /tmp/st14/run/manifest.json $OUT/manifest-14b.json 2>/dev/null
python3 - <<'PY'
import json,os
d=json.load(open(os.environ['OUT']+'/streamed-run-14b.json'))['run']
print({k:d.get(k) for k in ('stream_original','ratio','lambda_','total_s','error','failed_in','plan')})
for s,v in d.get('stages',{}).items(): print(s,{k:v.get(k) for k in ('status','wall_s','measured_peak_gib','predicted_peak_gib','peak_rss_gib','within_cap','anchor_chunks')})
PY
