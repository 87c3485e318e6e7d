"""DAPO dynamic sampling (sampling.py) with a fake rollout and a reward whose flat groups are known in advance:
kept/dropped groups, extra rounds, the cap, seeds, the sampler's position, and two gloo ranks deciding together."""

from __future__ import annotations

import os
import socket

import numpy as np
import pytest
import torch
import torch.distributed as tdist
import torch.multiprocessing as mp

from helpers import tiny_overrides
from mathgrpo import distributed as D
from mathgrpo.config import load_config
from mathgrpo.data import Problem
from mathgrpo.scoring import RewardSet
from mathgrpo.rollout import Completions
from mathgrpo.sampling import ROUND_SEED_STRIDE, flat_groups, sample_step
from mathgrpo.trainer import Sampler

G, PAD = 4, 7


class FakePrompts:
    prefill = ""

    def ids(self, text: str) -> list[int]:
        return [int(text.split()[1])]

    def text(self, text: str) -> str:
        return text


class FakeRollout:
    """Completion j of prompt p: j + 1 + p % 3 tokens of id 100 + p, text str(j); every call is recorded."""

    def __init__(self):
        self.calls = []

    def generate(self, prompt_ids, n, sampling):
        self.calls.append(([p[0] for p in prompt_ids], sampling.seed, sampling.max_new_tokens))
        lengths = [j + 1 + p[0] % 3 for p in prompt_ids for j in range(n)]
        width = max(lengths)
        mask = torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]
        ids = torch.where(mask, torch.tensor([100 + p[0] for p in prompt_ids for _ in range(n)])[:, None], PAD)
        return Completions([p for p in prompt_ids for _ in range(n)], ids, mask,
                           [str(j) for _ in prompt_ids for j in range(n)], torch.zeros(len(lengths), dtype=torch.bool))


def problems(n: int) -> list[Problem]:
    return [Problem(id=str(i), problem=f"p {i}", gold="", solution="") for i in range(n)]


def known_reward(flat: set[int]):
    """0 for every completion of a problem in `flat` (a group with no spread), else the completion's index."""

    def reward(completions, problem, **kwargs):
        return [0.0 if int(p.split()[1]) in flat else float(c) for c, p in zip(completions, problem)]

    return reward


def cfg(tmp_path, **extra):
    over = {"trainer.prompts_per_step": 4, "grpo.num_generations": G, "grpo.dynamic_sampling": True, **extra}
    return load_config(None, tiny_overrides("unused", tmp_path, **over), base={})


def run(c, flat: set[int], n_problems=8, world=D.SINGLE, seed_base=1000):
    rollout, sampler = FakeRollout(), Sampler(n_problems, seed=3)
    got = sample_step(seed_base, sampler, problems(n_problems), rollout, FakePrompts(),
                      RewardSet([(known_reward(flat), 1.0)]), c, world, PAD, step=5)
    return got, rollout, sampler


def test_flat_groups_direct():
    assert flat_groups(np.array([1, 1, 1, 0, 2, 2, 2, 2, 0.5, 0.5]), 2).tolist() == [True, False, True, True, True]


def test_flat_groups_leave_unscorable_rows_out():
    """A row no reward could score (every reward None: NaN in per) has advantage 0 and joins neither the mean nor the
    std, so flatness is decided on the scored rows alone, as the advantages are."""
    nan = float("nan")
    total = np.array([1, 1, 1, 0,  1, 0, 0, 0,  1, 1, 0, 0,  2, 2, 0, 0])  # nansum totals: an unscored row counts as 0
    per = np.array([[1, nan], [1, nan], [1, nan], [nan, nan],  # [1, 1, 1, None]: flat
                    [1, nan], [nan, nan], [nan, nan], [nan, nan],  # one scored row: flat
                    [1, nan], [1, nan], [0, nan], [nan, nan],  # [1, 1, 0, None]: informative
                    [nan, 2], [nan, 2], [nan, 0], [nan, 0]])  # every row scored by the second reward: informative
    assert flat_groups(total, 4, per).tolist() == [True, True, False, False]
    assert flat_groups(total, 4).tolist() == [False, False, False, False]  # the totals alone: 0 for unscored


def test_a_group_flat_but_for_an_unscorable_row_is_dropped(tmp_path):
    order = Sampler(8, seed=3).next(8)

    def reward(completions, problem, **kwargs):  # order[0]: [1, 1, 1, None]; the rest: the completion's index
        return [(None if c == "3" else 1.0) if int(p.split()[1]) == order[0] else float(c)
                for c, p in zip(completions, problem)]

    rollout, sampler = FakeRollout(), Sampler(8, seed=3)
    got = sample_step(1000, sampler, problems(8), rollout, FakePrompts(), RewardSet([(reward, 1.0)]), cfg(tmp_path),
                      D.SINGLE, PAD, step=5)
    assert [int(p.id) for p in got.problems] == order[1:5] and got.metrics["groups/dropped"] == 1


def test_off_is_the_plain_draw(tmp_path):
    order = Sampler(8, seed=3).next(4)
    got, rollout, sampler = run(cfg(tmp_path, **{"grpo.dynamic_sampling": False}), flat=set(order))
    assert [p.id for p in got.problems] == [str(i) for i in order] and got.metrics == {} and got.note is None
    assert rollout.calls == [(order, 1000, 8)] and sampler.position == 4


def test_one_extra_round_fills_the_step_as_predicted(tmp_path):
    order = Sampler(8, seed=3).next(8)
    # round 0 draws order[0:4]: 1 and 2 are flat -> keeps 2, needs 2; informative share 2/4 -> the next round draws
    # min(4, ceil(2 / 0.5)) = 4 prompts, order[4:8], of which order[4] is flat: keeps order[5], order[6]; surplus 1
    flat = {order[1], order[2], order[4]}
    got, rollout, sampler = run(cfg(tmp_path), flat)
    assert [p.id for p in got.problems] == [str(order[i]) for i in (0, 3, 5, 6)]
    assert got.metrics == {"groups/generated": 8.0, "groups/dropped": 3.0, "groups/kept": 4.0, "groups/surplus": 1.0,
                           "groups/rounds": 1.0}
    assert got.note is None and sampler.position == 8
    assert rollout.calls == [(order[:4], 1000, 8), (order[4:], 1000 + ROUND_SEED_STRIDE, 8)]
    # the rows are the kept groups' own completions and rewards, padded to the widest round
    comp = got.completions
    assert comp.completion_ids.shape[0] == 16 and got.totals.tolist() == [0.0, 1.0, 2.0, 3.0] * 4
    for k, i in enumerate((0, 3, 5, 6)):
        p = order[i]
        for j in range(G):
            row = k * G + j
            n = j + 1 + p % 3
            assert comp.completion_mask[row].sum() == n and (comp.completion_ids[row, :n] == 100 + p).all()
            assert (comp.completion_ids[row, n:] == PAD).all() and comp.prompt_ids[row] == [p]
    assert not flat_groups(got.totals, G).any()


def test_an_extra_round_draws_what_the_informative_share_predicts(tmp_path):
    order = Sampler(8, seed=3).next(8)
    # 3 of 4 informative: needs 1 at a share of 3/4 -> draws ceil(1 / 0.75) = 2 prompts, keeps the first informative
    got, rollout, sampler = run(cfg(tmp_path), flat={order[0]})
    assert [c[0] for c in rollout.calls] == [order[:4], order[4:6]] and sampler.position == 6
    assert [int(p.id) for p in got.problems] == order[1:5] and got.metrics["groups/surplus"] == 1


def test_no_flat_group_is_the_plain_step(tmp_path):
    got, rollout, _ = run(cfg(tmp_path), flat=set())
    plain, _, _ = run(cfg(tmp_path, **{"grpo.dynamic_sampling": False}), flat=set())
    assert len(rollout.calls) == 1 and got.completions is not None
    assert torch.equal(got.completions.completion_ids, plain.completions.completion_ids) and got.metrics["groups/dropped"] == 0


def test_out_of_rounds_trains_on_what_there_is_and_says_so(tmp_path):
    order = Sampler(8, seed=3).next(16)  # two epochs' worth of draws
    informative = order[0]  # one problem with spread; the sampler reshuffles after 8 draws
    got, rollout, sampler = run(cfg(tmp_path, **{"grpo.dynamic_sampling_max_rounds": 2}),
                                flat=set(range(8)) - {informative})
    # round 0: 1 of 4 informative; rounds 1, 2 draw min(4, ceil(3 * 4 / 1)) = 4, then min(4, ceil(3 * 8 / n)) = 4
    assert [c[0] for c in rollout.calls] == [order[:4], order[4:8], order[8:12]]
    kept = [int(p.id) for p in got.problems]
    expect = [informative] + [p for p in order[8:12] if p == informative]
    assert kept == expect[:4]
    assert got.metrics["groups/kept"] == len(kept) and got.metrics["groups/rounds"] == 2
    assert got.metrics["groups/generated"] == 12 and got.metrics["groups/dropped"] == 12 - len(expect)
    assert "dynamic sampling found" in got.note and "grpo.dynamic_sampling_max_rounds=2" in got.note
    assert sampler.position == 4  # 12 drawn: one epoch of 8, then 4 of the next


def test_nothing_informative_falls_back_to_the_first_round(tmp_path):
    order = Sampler(8, seed=3).next(4)
    got, rollout, _ = run(cfg(tmp_path, **{"grpo.dynamic_sampling_max_rounds": 1}), flat=set(range(8)))
    assert [int(p.id) for p in got.problems] == order and len(rollout.calls) == 2
    assert got.metrics["groups/kept"] == 0 and "first round as drawn" in got.note


def test_the_cap_of_zero_rounds_never_generates_more(tmp_path):
    order = Sampler(8, seed=3).next(4)
    got, rollout, _ = run(cfg(tmp_path, **{"grpo.dynamic_sampling_max_rounds": 0}), flat={order[0]})
    assert len(rollout.calls) == 1 and [int(p.id) for p in got.problems] == order[1:]
    assert "training on 3" in got.note


# ----------------------------------------------------------------------------- two gloo ranks


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, tmp: str, flat: list[int], out: dict):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    tdist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        world = D.current()
        got, rollout, sampler = run(cfg(tmp), set(flat), n_problems=16, world=world)
        torch.save({"ids": [p.id for p in got.problems], "metrics": got.metrics, "calls": rollout.calls,
                    "sampler": sampler.state(), "note": got.note}, os.path.join(tmp, f"rank{rank}.pt"))
    finally:
        tdist.destroy_process_group()


@pytest.mark.distributed
def test_two_ranks_decide_together_and_keep_equal_shares(tmp_path):
    order = Sampler(16, seed=3).next(16)
    # round 0 (4 global prompts, 2 per rank): rank 0 gets order[0:2] (both informative), rank 1 order[2:4] (one
    # flat): needs 0 and 1, informative share 3/4 -> next round draws max(ceil(1 / 0.75)) = 2 per rank, 4 global:
    # order[4:6] go to rank 0 (full: skipped), order[6:8] to rank 1, which keeps order[6]
    flat = [order[3], order[7]]
    mp.spawn(_worker, args=(_free_port(), str(tmp_path), flat, {}), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert r0["ids"] == [str(order[0]), str(order[1])] and r1["ids"] == [str(order[2]), str(order[6])]
    assert [c[0] for c in r0["calls"]] == [order[0:2]] and [c[0] for c in r1["calls"]] == [order[2:4], order[6:8]]
    assert r1["calls"][1][1] == D.rank_seed(1000 + ROUND_SEED_STRIDE, 1)
    assert r0["sampler"] == r1["sampler"] and r0["sampler"]["position"] == 8
    assert r0["metrics"] == r1["metrics"] == {"groups/generated": 6.0, "groups/dropped": 2.0, "groups/kept": 4.0,
                                              "groups/surplus": 0.0, "groups/rounds": 1.0}
    assert r0["note"] is None
