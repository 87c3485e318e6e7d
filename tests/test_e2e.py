"""One short end-to-end run with the real SmolLM2-135M model (the embedded default's model)."""

from __future__ import annotations

import json

import pytest

from mathgrpo.presets import resolve
from mathgrpo.trainer import train


@pytest.mark.slow
def test_real_smollm2_trains_a_few_steps(tmp_path):
    cfg = resolve("demo", None, [  # the embedded preset, shortened
        "trainer.max_steps=2", "trainer.prompts_per_step=2", "grpo.num_generations=4", "generation.max_new_tokens=24",
        f"trainer.output_dir={tmp_path}", "trainer.run_name=e2e", "trainer.save_steps=2", "trainer.eval_at_end=false",
        "grpo.beta=0.04"]).config
    run = train(cfg, quiet=True)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert all(r["completion_length_mean"] > 0 for r in rows)
    comp = [json.loads(line) for line in (run / "completions.jsonl").read_text().splitlines()]
    assert any(c["completion"].strip() for c in comp)  # a real model writes text
    assert (run / "checkpoints" / "checkpoint-2" / "adapter" / "adapter_model.safetensors").is_file()
    assert (run / "report.md").is_file()
