#!/bin/bash
# Issue 17, fourth round: the notebook shape's update (qlora-2k) with qlora.NF4LoRA (one autograd node per 4-bit
# LoRA projection, the new default) against the addmm path before it, peft's path and TRL's, on the H200 device tool.
#   BUDGET=330 bash benchmarks/run_update_h200_r4.sh
# (The first call gave make 25 s and tests 30 s: make was cut before the tokenizer was written, so step.py's rows
# failed, and pytest was cut before its summary; 45 / 60 s now.)
# (from the repo root, wheels in $WHEELS, default .wheels: bitsandbytes needed). Variants alternate within a process
# (update.py) and across processes (step.py: ours, TRL, ours before, TRL again) so the run-to-run spread shows.
set -u
cd "$(dirname "$0")/.."
source benchmarks/device_lib.sh
part 45 make.log python3 benchmarks/step.py --worker make --model-dir $M --shape 1.5b --device cuda
part 60 tests.log python3 -m pytest -q -p no:cacheprovider tests/test_lora_4bit.py tests/test_rollout_fast.py -k "4bit or nf4 or cuda"
tail -1 "$O/tests.log" | tee -a "$O/summary.txt"
part 60 update-qlora.log python3 benchmarks/update.py --workloads qlora-2k --profile --steps 5 --model-dir $M \
    --out "$O/update.jsonl" --variants lora=nf4 lora=addmm:prof=1 lora=peft lora=nf4 lora=addmm lora=nf4
part 140 step-qlora.log python3 benchmarks/step.py --workloads qlora-2k --model-dir $M --steps 4 --trl-steps 4 \
    --out "$O/step.jsonl" --methods mathgrpo:gen=canned trl:gen=canned mathgrpo:gen=canned:lora=addmm trl:gen=canned \
    mathgrpo:gen=canned
echo "== summary"; cat "$O/summary.txt"
python3 benchmarks/summarize_r3.py "$O"
