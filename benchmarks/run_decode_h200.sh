#!/usr/bin/env bash
# Issue 13, round 3, on the H200 (device tool): the decode step on fast_matmul's table against cuBLAS, the
# kernel profile at 8 x 2k, and the decode engine's CUDA tests. Logs and JSON under $OUT.
set -u
export PYTHONPATH=src PYTHONUNBUFFERED=1
O=${OUT:-/tmp/out}; mkdir -p "$O"
D="python3 benchmarks/decode.py --steps 30 --linear table cublas"
timeout 120 $D --modes fused default --rows 1 8 64 --contexts 2048 --json $O/d2k.json > $O/d2k.log 2>&1; echo "2k rc=$?"
timeout 60 $D --modes fused default --rows 8 --contexts 8192 16384 --json $O/d16k.json > $O/d16k.log 2>&1; echo "16k rc=$?"
timeout 50 python3 benchmarks/decode.py --steps 10 --modes fused --rows 8 --contexts 2048 --profile 8x2048 \
  > $O/prof.log 2>&1; echo "profile rc=$?"
timeout 95 python3 -m pytest -q -p no:cacheprovider tests/test_rollout_kernels.py tests/test_rollout_fast.py \
  -k "cuda or matmul_paths or greedy_matches_hf_generate_on_kernels or lora_logprobs or selection" \
  > $O/tests.log 2>&1; echo "tests rc=$?"; tail -3 $O/tests.log
timeout 50 $D --dtype fp16 --modes default --rows 8 64 --contexts 2048 --json $O/dfp16.json > $O/dfp16.log 2>&1
echo "fp16 rc=$?"
for f in d2k d16k dfp16; do grep -A 30 "^copy bandwidth" $O/$f.log | grep -v "^$"; done
grep -A 22 "^profile" $O/prof.log
