"""benchmarks/step.py's uneven workload: seeded lengths, imposed identically, counted on real tokens."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import step  # noqa: E402


def test_uneven_lengths_are_seeded_and_cut_at_the_cap():
    w = step.WORKLOADS["uneven-8k"]
    a, b = step.drawn_lengths(w), step.drawn_lengths(w)
    assert a == b and len(a) == 64 and max(a) == 8192 and min(a) >= 1
    big = step.Workload(None, 500, 8, 8192, 8, median=1536)  # 4,000 draws: the distribution's own shares
    lens = torch.tensor(step.drawn_lengths(big), dtype=torch.float64)
    assert 0.13 < float((lens >= 8192).double().mean()) < 0.17
    assert 1300 < float(lens.median()) < 1750
    assert step.drawn_lengths(step.WORKLOADS["lora-1k"]) == [1024] * 64


def test_canned_and_imposed_completions_follow_the_drawn_lengths():
    args = SimpleNamespace(shape="tiny", prompt_len=4)
    w = step.Workload(None, 2, 4, 16, 4, median=4)
    lengths = step.drawn_lengths(w)
    comp = step.canned_completions(args, w)
    assert comp.completion_mask.sum(1).tolist() == lengths
    assert comp.truncated.tolist() == [k >= 16 for k in lengths]
    for i, k in enumerate(lengths):  # EOS (0) ends every row below the cap, and nothing else is 0 inside a row
        row = comp.completion_ids[i, :k].tolist()
        assert (row[-1] == 0) == (k < 16) and 0 not in row[:-1]
    sampled = step.canned_completions(args, step.Workload(None, 2, 4, 16, 4))  # full length, as ignore_eos gives
    cut = step.impose_lengths(sampled, lengths, cap=16)
    assert cut.completion_mask.sum(1).tolist() == lengths
    assert cut.truncated.tolist() == comp.truncated.tolist()
    assert all(cut.completion_ids[i, k - 1] == 0 for i, k in enumerate(lengths) if k < 16)


def test_useful_flops_count_real_tokens_only():
    args = SimpleNamespace(shape="tiny")
    assert step.update_flops(args, [(10, 5), (20, 15)]) == step.update_flops(args, [(10, 5)]) + \
        step.update_flops(args, [(20, 15)])
    assert step.update_flops(args, [(10, 5)]) < step.update_flops(args, [(20, 5)])
