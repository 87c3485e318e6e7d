#!/usr/bin/env bash
# Issue 13, round 4, third call (H200, device tool): the one-launch draw (fast_draw) against the torch sampler in
# the decode step, its CUDA tests, and the 8 x 16k GRPO step on the final defaults.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .wheels-nobnb/*.whl 2>&1 | tail -1
export PYTHONPATH=src:/tmp/site PYTHONUNBUFFERED=1
O=${OUT:-/tmp/out}; mkdir -p "$O"
timeout 90 python3 -m pytest -q -p no:cacheprovider tests/test_rollout_kernels.py tests/test_rollout_fast.py \
  -k "draw or pdl or one_launch or greedy or lora_logprobs or matmul_paths or leave or compacted or eos" \
  > $O/tests.log 2>&1; echo "tests rc=$?"; tail -3 $O/tests.log
timeout 80 python3 benchmarks/decode.py --steps 30 --modes fused --rows 1 8 64 256 --contexts 2048 \
  --set sampler=torch "" --json $O/draw.json > $O/draw.log 2>&1; echo "draw rc=$?"
timeout 170 python3 benchmarks/step.py --workloads lora-4k --new-tokens 16384 --methods mathgrpo --steps 2 \
  --out $O/step16k.jsonl > $O/step16k.log 2>&1; echo "step16k rc=$?"
grep -A 12 "^copy bandwidth" $O/draw.log | grep -v "^$"
grep -E "step [0-9]|Error" $O/step16k.log | cut -c1-250
