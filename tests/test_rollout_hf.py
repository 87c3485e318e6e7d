"""The hf rollout backend: prompt-major layout, EOS/stop handling, LoRA-merged sampling copy."""

from __future__ import annotations

import pytest
import torch

from mathgrpo.config import ModelConfig
from mathgrpo.models import load_model
from mathgrpo.rollout import SamplingConfig
from mathgrpo.rollout.hf import HFRollout


def _lora_model(path):
    # float32 everywhere: under bf16 (auto on CUDA) merged and unmerged weights round differently, and a random
    # model's near-tied logits make greedy paths diverge for that reason alone
    model, tok = load_model(ModelConfig(name_or_path=path, dtype="float32", lora_r=4, lora_alpha=8, lora_dropout=0.0),
                            trainable=True)
    with torch.no_grad():  # non-zero B so the adapter changes the output
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    return model, tok


def _reference_greedy(model, tok, prompts, n, max_new):
    out = []
    for p in prompts:
        ids = torch.tensor([p], device=model.device)
        seq = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=max_new, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        out.extend([seq[0, len(p):].tolist()] * n)
    return out


@pytest.mark.integration
def test_merged_copy_samples_like_the_peft_model_and_follows_updates(tiny_model_dir):
    model, tok = _lora_model(tiny_model_dir)
    model.eval()
    prompts = [tok("What is 2 + 3?")["input_ids"], tok("Hi")["input_ids"]]
    r = HFRollout(model, tok)
    assert r.model is not model  # a merged plain copy
    greedy = SamplingConfig(max_new_tokens=6, temperature=0.0)
    comp = r.generate(prompts, 2, greedy)
    ref = _reference_greedy(model, tok, prompts, 2, 6)
    for i, row in enumerate(ref):
        assert comp.completion_ids[i, :len(row)].tolist() == row
    assert comp.completion_ids.shape[0] == 4 and len(comp.texts) == 4
    with torch.no_grad():  # an "optimizer step"
        for name, p in model.named_parameters():
            if "lora_A" in name:
                p.add_(torch.randn_like(p))
    r.sync_weights(model)
    comp2 = r.generate(prompts, 1, greedy)
    ref2 = _reference_greedy(model, tok, prompts, 1, 6)
    for i, row in enumerate(ref2):
        assert comp2.completion_ids[i, :len(row)].tolist() == row


@pytest.mark.integration
def test_unmerged_and_ignore_eos_truncation(tiny_model_dir):
    model, tok = _lora_model(tiny_model_dir)
    r = HFRollout(model, tok, merge_lora=False)
    assert r.model is model
    comp = r.generate([[1, 2, 3]], 3, SamplingConfig(max_new_tokens=5, temperature=1.0, ignore_eos=True, seed=0))
    assert comp.completion_mask.all() and comp.truncated.all() and comp.completion_ids.shape == (3, 5)
    again = r.generate([[1, 2, 3]], 3, SamplingConfig(max_new_tokens=5, temperature=1.0, ignore_eos=True, seed=0))
    assert torch.equal(comp.completion_ids, again.completion_ids)  # seeded


def test_min_p_and_repetition_penalty_reach_generate(tiny_model_dir, monkeypatch):
    """TRL's min_p and repetition_penalty: the hf backend hands them to transformers' generate (its processors);
    the fast engine samples both itself (test_rollout_fast), so auto keeps it."""
    import pytest

    from mathgrpo.config import GenerationConfig
    from mathgrpo.rollout import make_rollout, sampling_from
    from mathgrpo.rollout.fast_sampling import check_sampling

    model, tok = _lora_model(tiny_model_dir)
    r = HFRollout(model, tok, merge_lora=False)
    seen = []
    orig = model.generate
    monkeypatch.setattr(model, "generate", lambda **kw: seen.append(kw) or orig(**kw))
    gen = GenerationConfig(min_p=0.1, repetition_penalty=1.3, temperature=1.0, max_new_tokens=4)
    r.generate([[1, 2, 3]], 2, sampling_from(gen, seed=0))
    assert seen[-1]["min_p"] == 0.1 and seen[-1]["repetition_penalty"] == 1.3
    r.generate([[1, 2, 3]], 2, SamplingConfig(max_new_tokens=4, temperature=1.0, seed=0))
    assert "min_p" not in seen[-1] and "repetition_penalty" not in seen[-1]  # off: generate's own defaults
    assert not isinstance(make_rollout(gen, model, tok), HFRollout)  # auto: the engine applies the penalty itself
    check_sampling(sampling_from(gen))
    with pytest.raises(ValueError, match="repetition_penalty must be > 0"):
        check_sampling(SamplingConfig(max_new_tokens=4, repetition_penalty=0.0))
