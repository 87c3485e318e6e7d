"""The public hooks the benchmarks use instead of private names: answers' cache controls (benchmarks.rewards)
and FastRollout.decode_loop_step (benchmarks.decode). FastRollout.logits_hook: tests/test_bench_step.py."""

from __future__ import annotations

import torch

from benchmarks import common


def test_answer_caches_count_and_clear():
    from mathgrpo import answers

    answers.clear_caches()
    assert answers.checked_pairs() == 0
    assert answers.is_equivalent("\\frac{1}{2}", "0.5")  # not equal as strings: math-verify decides, cached
    assert answers.checked_pairs() == 1
    answers.clear_caches()
    assert answers.checked_pairs() == 0


def test_decode_loop_step_draws_and_decodes_at_the_context():
    from mathgrpo.rollout.fast import FastRollout

    model = common.random_qwen2("tiny", "cpu", torch.float32)
    eng = FastRollout(model, common.synthetic_tokenizer(common.SHAPES["tiny"]["vocab_size"]))
    step = eng.decode_loop_step(rows=3, context=20)
    k_before = eng.k_cache[0][:3, :, 19].clone()  # the column this step writes
    logits_before = eng._logits[:3].clone()
    step()
    assert not torch.equal(eng.k_cache[0][:3, :, 19], k_before)  # K of the drawn tokens written at position 19
    assert not torch.equal(eng._logits[:3], logits_before) and torch.isfinite(eng._logits[:3]).all()
