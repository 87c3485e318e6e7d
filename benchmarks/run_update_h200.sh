#!/bin/bash
# One device call for issue 17 (the update near the compute floor), in priority order, each part under a share of
# BUDGET seconds: GPU tests, copy ceiling, update variants (lora-1k, uneven-8k), step.py side by side with TRL
# (update ratio from gen=canned; qlora-2k), attention alone. Logs and JSON lines under $OUT; a summary last.
#   bash benchmarks/run_update_h200.sh          (from the repo root, wheels in $WHEELS, default .wheels)
set -u
cd "$(dirname "$0")/.."
BUDGET=${BUDGET:-570}
source benchmarks/device_lib.sh
part 90 tests.log python3 -m pytest -q -p no:cacheprovider tests/test_lmhead.py tests/test_packing.py -k "cuda or layouts"
tail -1 "$O/tests.log" | tee -a "$O/summary.txt"
LM=""; grep -q "failed" "$O/tests.log" && LM=":lmhead=torch"
part 110 update-lora.log python3 benchmarks/update.py --workloads lora-1k --sync-check --model-dir $M --out "$O/update.jsonl" \
    --variants gc=none:fused=1:lmhead=torch gc=none:fused=1$LM pack=1:gc=none:fused=1$LM gc=layer:fused=1$LM
part 160 update-uneven.log python3 benchmarks/update.py --workloads uneven-8k --profile --model-dir $M --out "$O/update.jsonl" \
    --variants pack=1:gc=none:fused=1:attn=varlen:lmhead=torch pack=1:gc=none:fused=1:attn=varlen$LM \
    pack=1:gc=none:fused=1$LM:prof=1 gc=none:fused=1$LM pack=1:gc=layer:fused=1$LM
part 130 step-uneven.log python3 benchmarks/step.py --workloads uneven-8k --model-dir $M --steps 2 --trl-steps 1 \
    --out "$O/step.jsonl" --methods mathgrpo:gen=canned:pack=1:gc=none:fused=1$LM trl:gen=canned
part 110 step-qlora.log python3 benchmarks/step.py --workloads qlora-2k --model-dir $M --steps 2 --trl-steps 2 \
    --out "$O/step.jsonl" --methods mathgrpo mathgrpo:gen=canned trl:gen=canned
part 60 attention.log python3 benchmarks/update.py --attention --workloads lora-1k uneven-8k
echo "== summary"; cat "$O/summary.txt"
for f in update-lora update-uneven; do echo "== $f"; grep -A12 "^workload |" "$O/$f.log" | tail -8; grep -A3 '"syncs"\|sync_sites' "$O/$f.log" | head -14; done
grep -h '"wall_s"' -A8 "$O/update-uneven.log" | head -20
for f in step-uneven step-qlora; do echo "== $f"; grep -B2 -A6 "^workload | method" "$O/$f.log" | tail -7; done
echo "== attention"; grep ATTN_TOTAL "$O/attention.log"
