"""The TRL front door with TRL's DAPO-era options: top_entropy_quantile, mask_truncated_completions and
trl.rewards.get_soft_overlong_punishment (TRL's own when TRL is installed, mathgrpo's twin otherwise)."""

from __future__ import annotations

import json
import warnings

import pytest

from mathgrpo.rewards import REWARDS, get_soft_overlong_punishment, soft_overlong_penalty
from mathgrpo.trl_compat import GRPOConfig, GRPOTrainer

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest


def test_options_map_without_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cfg = GRPOConfig(top_entropy_quantile=0.2, mask_truncated_completions=True, max_steps=3).to_mathgrpo_config(
            on_cuda=True)
    assert cfg.grpo.top_entropy_quantile == 0.2 and cfg.grpo.mask_truncated_completions
    assert GRPOConfig(max_steps=1).to_mathgrpo_config(on_cuda=True).grpo.top_entropy_quantile == 1.0
    with pytest.raises(ValueError, match="top_entropy_quantile must be in"):
        GRPOConfig(top_entropy_quantile=1.5, max_steps=1).to_mathgrpo_config(on_cuda=True)


def test_soft_overlong_punishment_equals_trls():
    trl_rewards = pytest.importorskip("trl.rewards")
    for max_len, cache in [(100, 20), (16, 0), (10, 10)]:
        ids = [[1] * n for n in range(0, max_len + 5)]
        ours = get_soft_overlong_punishment(max_len, cache)(completion_ids=ids)
        theirs = trl_rewards.get_soft_overlong_punishment(max_len, cache)(completion_ids=ids)
        assert ours == pytest.approx(theirs, abs=1e-12)
    assert get_soft_overlong_punishment(100, 20)(completion_ids=[[1] * 90]) == [-0.5]  # TRL's docstring example
    # the built-in `overlong` reward is the same formula, with the step's cap and rewards.overlong_buffer
    assert REWARDS["overlong"]([""] * 3, completion_ids=[[1] * 70, [1] * 90, [1] * 100], max_completion_len=100,
                               overlong_buffer=20) == [0.0, -0.5, -1.0]


@pytest.mark.integration
def test_a_trl_script_with_the_dapo_options_runs(tiny_model_dir, tmp_path):
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer

    trl_rewards = pytest.importorskip("trl.rewards")
    punish = trl_rewards.get_soft_overlong_punishment(max_completion_len=6, soft_punish_cache=4)
    ds = Dataset.from_dict({"prompt": [f"{i} + {i} =" for i in range(4)]})
    args = GRPOConfig(output_dir=str(tmp_path / "o"), per_device_train_batch_size=4, num_generations=2,
                      max_completion_length=6, max_steps=2, logging_steps=1, save_strategy="no", learning_rate=1e-3,
                      bf16=False, gradient_checkpointing=False, disable_tqdm=True, top_entropy_quantile=0.2,
                      mask_truncated_completions=False, log_completions=True)
    trainer = GRPOTrainer(model=AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                          reward_funcs=[punish, lambda completions, **kw: [len(set(c)) / 10 for c in completions]],
                          args=args, train_dataset=ds, processing_class=AutoTokenizer.from_pretrained(tiny_model_dir),
                          peft_config=LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"]))
    assert trainer.cfg.grpo.top_entropy_quantile == 0.2
    trainer.train()
    logs = [h for h in trainer.state.log_history if "entropy" in h]
    assert len(logs) == 2 and all(h["entropy"] > 0 for h in logs)
    recs = [json.loads(line) for line in (tmp_path / "o" / "completions.jsonl").read_text().splitlines()]
    for h in logs:
        lengths = [r["length"] for r in recs if r["step"] == h["step"]]
        want = sum(soft_overlong_penalty(n, 6, 4) for n in lengths) / len(lengths)
        assert h["rewards/soft_overlong_punishment_reward/mean"] == pytest.approx(want, abs=1e-6)
