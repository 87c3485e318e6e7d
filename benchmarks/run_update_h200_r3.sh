#!/bin/bash
# Issue 17, third round: the notebook shape's update (qlora-2k) against TRL's, on the H200 device tool.
#   bash benchmarks/run_update_h200_r3.sh profile   # call 1: profiles + variants, ours and TRL's; release cost
#   bash benchmarks/run_update_h200_r3.sh final     # call 2: the fix measured; lora-1k / uneven-8k re-measured
#   BUDGET=220 bash benchmarks/run_update_h200_r3.sh rest   # what call 2 did not reach (lora-1k gckeep, uneven-8k)
#   BUDGET=230 bash benchmarks/run_update_h200_r3.sh uneven # TRL's steady 512-step prefix of uneven-8k (2 steps)
# (from the repo root, wheels in $WHEELS, default .wheels). Each part runs under a share of BUDGET seconds;
# logs and JSON lines under $OUT; a summary (benchmarks/summarize_r3.py) last.
set -u
cd "$(dirname "$0")/.."
MODE=${1:-profile}
source benchmarks/device_lib.sh
if [ "$MODE" = rest ]; then  # what the final call did not reach: lora-1k partial checkpointing, uneven-8k
    part 30 make.log python3 benchmarks/step.py --worker make --model-dir $M --shape 1.5b --device cuda
    part 100 update-lora.log python3 benchmarks/update.py --workloads lora-1k --steps 3 --model-dir $M \
        --out "$O/update.jsonl" --variants gc=none:fused=1 gc=layer:fused=1 gc=layer:fused=1:gckeep=7 \
        gc=layer:fused=1:gckeep=14
    part 60 update-uneven.log python3 benchmarks/update.py --workloads uneven-8k --steps 3 --model-dir $M \
        --out "$O/update.jsonl" --variants pack=1:gc=none:fused=1
elif [ "$MODE" = uneven ]; then  # the uneven step's TRL estimate from a steady (second) step, not a first one
    part 30 make.log python3 benchmarks/step.py --worker make --model-dir $M --shape 1.5b --device cuda
    part 190 step-uneven-trl.log python3 benchmarks/step.py --workloads uneven-8k --model-dir $M --trl-steps 2 \
        --out "$O/step.jsonl" --methods trl:gen_steps=512
elif [ "$MODE" = profile ]; then
    part 100 update-qlora.log python3 benchmarks/update.py --workloads qlora-2k --profile --steps 5 --model-dir $M \
        --out "$O/update.jsonl" --variants lora=peft gc=layer:prof=1 gc=none:lora=peft gc=none lmhead=torch \
        fused=1:prof=1 gc=none:fused=1
    part 110 step-qlora.log python3 benchmarks/step.py --workloads qlora-2k --model-dir $M --steps 5 --trl-steps 3 \
        --out "$O/step.jsonl" --methods mathgrpo:gen=canned trl:gen=canned:prof=1
    part 80 release.log python3 benchmarks/update.py --workloads qlora-2k --release-check --steps 3 --model-dir $M \
        --out "$O/update.jsonl"
else  # tests first, then qlora-2k ours (variants) and TRL's, then lora-1k and uneven-8k (ours only)
    part 25 make.log python3 benchmarks/step.py --worker make --model-dir $M --shape 1.5b --device cuda
    part 20 tests.log python3 -m pytest -q -p no:cacheprovider tests/test_packing.py -k cuda
    tail -1 "$O/tests.log" | tee -a "$O/summary.txt"
    part 40 update-qlora.log python3 benchmarks/update.py --workloads qlora-2k --steps 5 --sync-check --model-dir $M \
        --out "$O/update.jsonl" --variants gc=layer lora=peft fused=1
    part 35 step-qlora.log python3 benchmarks/step.py --workloads qlora-2k --model-dir $M --trl-steps 4 \
        --out "$O/step.jsonl" --methods trl:gen=canned
    part 30 update-lora.log python3 benchmarks/update.py --workloads lora-1k --steps 2 --model-dir $M \
        --out "$O/update.jsonl" --variants gc=layer:fused=1 gc=layer:fused=1:gckeep=14 gc=none:fused=1
    part 25 update-uneven.log python3 benchmarks/update.py --workloads uneven-8k --steps 2 --model-dir $M \
        --out "$O/update.jsonl" --variants pack=1:gc=none:fused=1
fi
echo "== summary"; cat "$O/summary.txt"
python3 benchmarks/summarize_r3.py "$O"
