"""A short summary of one benchmarks/run_update_h200_r3.sh call: update variants, profiles, step rows, release.

    python benchmarks/summarize_r3.py <out folder holding update.jsonl / step.jsonl>
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from step import summarize  # noqa: E402

PROFILE_KEYS = ["wall_s", "idle_s", "kernel_launches", "dequant_s", "matmul_s", "lora_matmul_s", "attention_s",
                "lmhead_s", "optimizer_s", "copy_s", "elementwise_s", "triton_s", "other_s", "grad_passes",
                "no_grad_passes", "grad_tokens", "no_grad_tokens", "recomputes"]


def _lines(path: str) -> list[dict]:
    if not os.path.isfile(path):
        return []
    return [json.loads(x) for x in open(path) if x.strip()]


def _fmt(v) -> str:
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def main(folder: str) -> None:
    upd = _lines(os.path.join(folder, "update.jsonl"))
    for r in upd:
        if r.get("variant") == "release-check":
            print("RELEASE " + json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()
                                           if k not in ("rounds",)}))
            continue
        print("UPDATE " + " | ".join(_fmt(r.get(k, "")) for k in ("workload", "variant", "microbatches", "update_s",
                                                                  "first_s", "ref_pass_s", "peak_gib", "pct_of_peak",
                                                                  "error")))
    for r in upd:
        if "profile" in r:
            p = r["profile"]
            print(f"PROFILE {r['workload']} {r['variant']}: " + ", ".join(f"{k}={_fmt(p[k])}" for k in PROFILE_KEYS if k in p))
            for k in p.get("top", [])[:8]:
                print(f"    {k['s']:.4f} s  x{k['n']}  {k['kernel'][:90]}")
    rows = _lines(os.path.join(folder, "step.jsonl"))
    peak = next((r["matmul_peak_tflops"] for r in rows if "device" in r), None)
    for r in rows:
        if "steps" not in r:
            continue
        s = summarize(r, peak)
        print("STEP " + " | ".join(_fmt(s.get(k, "")) for k in ("workload", "method", "steps", "step_s", "gen_s",
                                                                "update_s", "peak_gen_gib", "peak_update_gib",
                                                                "mfu_pct")))
        print("     per-step update_s: " + ", ".join(f"{x['update_s']:.3f}" for x in r["steps"]))
        if "profile" in r:
            p = r["profile"]
            print(f"PROFILE {r['workload']} {r['method']}: " + ", ".join(f"{k}={_fmt(p[k])}" for k in PROFILE_KEYS if k in p))
            for k in p.get("top", [])[:8]:
                print(f"    {k['s']:.4f} s  x{k['n']}  {k['kernel'][:90]}")


if __name__ == "__main__":
    main(sys.argv[1])
