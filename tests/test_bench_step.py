"""benchmarks.step's uneven workload: seeded lengths, imposed identically, counted on real tokens."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from benchmarks import common
from benchmarks.step import force_fast_lengths, impose_lengths


def test_uneven_lengths_are_seeded_and_cut_at_the_cap():
    w = common.WORKLOADS["uneven-8k"]
    a, b = common.drawn_lengths(w), common.drawn_lengths(w)
    assert a == b and len(a) == 64 and max(a) == 8192 and min(a) >= 1
    big = common.Workload(None, 500, 8, 8192, 8, median=1536)  # 4,000 draws: the distribution's own shares
    lens = torch.tensor(common.drawn_lengths(big), dtype=torch.float64)
    assert 0.13 < float((lens >= 8192).double().mean()) < 0.17
    assert 1300 < float(lens.median()) < 1750
    assert common.drawn_lengths(common.WORKLOADS["lora-1k"]) == [1024] * 64


def test_canned_and_imposed_completions_follow_the_drawn_lengths():
    args = SimpleNamespace(shape="tiny", prompt_len=4)
    w = common.Workload(None, 2, 4, 16, 4, median=4)
    lengths = common.drawn_lengths(w)
    comp = common.canned_completions(args, w)
    assert comp.completion_mask.sum(1).tolist() == lengths
    assert comp.truncated.tolist() == [k >= 16 for k in lengths]
    for i, k in enumerate(lengths):  # EOS (0) ends every row below the cap, and nothing else is 0 inside a row
        row = comp.completion_ids[i, :k].tolist()
        assert (row[-1] == 0) == (k < 16) and 0 not in row[:-1]
    sampled = common.canned_completions(args, common.Workload(None, 2, 4, 16, 4))  # full length, as ignore_eos gives
    cut = impose_lengths(sampled, lengths, cap=16)
    assert cut.completion_mask.sum(1).tolist() == lengths
    assert cut.truncated.tolist() == comp.truncated.tolist()
    assert all(cut.completion_ids[i, k - 1] == 0 for i, k in enumerate(lengths) if k < 16)


def test_useful_flops_count_real_tokens_only():
    args = SimpleNamespace(shape="tiny")
    assert common.update_flops(args, [(10, 5), (20, 15)]) == common.update_flops(args, [(10, 5)]) + \
        common.update_flops(args, [(20, 15)])
    assert common.update_flops(args, [(10, 5)]) < common.update_flops(args, [(20, 5)])


def test_fast_engine_finishes_rows_at_the_forced_lengths():
    """force_fast_lengths through FastRollout.logits_hook: every row ends (EOS) at its drawn length, also after
    finished rows left the batch (check_every=2: the hook then sees an index tensor of live rows)."""
    from mathgrpo.rollout.base import SamplingConfig
    from mathgrpo.rollout.fast import FastRollout

    model = common.random_qwen2("tiny", "cpu", torch.float32)
    eng = FastRollout(model, common.synthetic_tokenizer(common.SHAPES["tiny"]["vocab_size"]), check_every=2)
    lengths, cap = [3, 12, 5, 12, 1, 7], 12  # prompt-major: 2 prompts x 3
    force_fast_lengths(eng, lengths, eos=0, cap=cap)
    comp = eng.generate([[5, 6, 7], [8, 9]], 3, SamplingConfig(max_new_tokens=cap, temperature=1.0, seed=0))
    assert comp.lengths.tolist() == lengths
    assert comp.truncated.tolist() == [k >= cap for k in lengths]
    assert eng.compactions > 0
