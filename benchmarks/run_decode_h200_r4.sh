#!/usr/bin/env bash
# Issue 13, round 4, on the H200 (device tool): programmatic dependent launch, W prefetch under it, attend's
# tiling and one-launch attention, as engine variants of the decode step (decode.py --set), plus the CUDA tests.
#   bash benchmarks/run_decode_h200_r4.sh            # variants; logs and JSON under $OUT
set -u
export PYTHONPATH=src PYTHONUNBUFFERED=1
O=${OUT:-/tmp/out}; mkdir -p "$O"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
timeout 110 python3 -m pytest -q -p no:cacheprovider tests/test_rollout_kernels.py tests/test_rollout_fast.py \
  -k "pdl or one_launch or greedy_matches_hf_generate_on_kernels or lora_logprobs or matmul_paths or leave or compacted" \
  > $O/tests.log 2>&1; echo "tests rc=$?"; tail -3 $O/tests.log
D="python3 benchmarks/decode.py --steps 30 --modes fused"
timeout 170 $D --rows 1 8 64 --contexts 2048 --json $O/d2k.json \
  --set pdl=0 "" pre=2 pre=4 min_chunk=128 one=1 one=1:min_chunk=128:pre=2 > $O/d2k.log 2>&1; echo "2k rc=$?"
timeout 80 $D --rows 8 --contexts 16384 --json $O/d16k.json --set pdl=0 "" pre=2 min_chunk=128 one=1 \
  > $O/d16k.log 2>&1; echo "16k rc=$?"
for f in d2k d16k; do grep -A 40 "^copy bandwidth" $O/$f.log | grep -v "^$"; grep -iE "error|Traceback" $O/$f.log | head -5; done
