#!/usr/bin/env bash
# Issue 13, round 4, second call (H200, device tool): the decode table on the new defaults (PDL, attend's
# min_chunk by batch), the LoRA modes at 64 x 2k, the 8 x 16k GRPO step (checkpointing on and off), a profile.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .wheels-nobnb/*.whl 2>&1 | tail -1
export PYTHONPATH=src:/tmp/site PYTHONUNBUFFERED=1
O=${OUT:-/tmp/out}; mkdir -p "$O"
D="python3 benchmarks/decode.py --steps 30"
timeout 90 $D --modes default fused --rows 1 8 64 256 --contexts 2048 8192 16384 --max-kv-gib 40 \
  --json $O/grid.json > $O/grid.log 2>&1; echo "grid rc=$?"
timeout 70 $D --modes lora-copy lora-in_place lora-none --rows 64 --contexts 2048 --json $O/lora.json \
  > $O/lora.log 2>&1; echo "lora rc=$?"
timeout 250 python3 benchmarks/step.py --workloads lora-4k --new-tokens 16384 --methods mathgrpo mathgrpo:gc=none \
  --steps 2 --out $O/step16k.jsonl > $O/step16k.log 2>&1; echo "step16k rc=$?"
timeout 45 $D --modes fused --rows 8 --contexts 2048 --steps 10 --profile 8x2048 > $O/prof.log 2>&1; echo "prof rc=$?"
for f in grid lora; do grep -A 40 "^copy bandwidth" $O/$f.log | grep -v "^$"; done
grep -E "step [0-9]|Error" $O/step16k.log | cut -c1-300
grep -A 20 "^profile" $O/prof.log
