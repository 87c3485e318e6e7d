"""metrics.py is the one home of the logged metric names: the writers (loss, trainer) use exactly its names, and its
TRL table is the one the front door renames with."""

from __future__ import annotations

import numpy as np
import torch

from mathgrpo import metrics as M
from mathgrpo.loss import grpo_loss, token_means
from mathgrpo.sampling import rollout_metrics


def test_grpo_loss_metrics_are_the_summed_names():
    torch.manual_seed(0)
    logp = torch.randn(4, 5)
    _, m = grpo_loss(logp, logp + 0.1, logp - 0.2, torch.randn(4), torch.ones(4, 5), beta=0.04,
                     entropy=torch.rand(4, 5))
    means = [M.CLIP_LOW, M.CLIP_HIGH, M.CLIP_REGION, M.RATIO_MEAN, M.KL, M.ENTROPY]
    assert set(m) == {M.summed(k) for k in means} | {M.NUM_TOKENS}
    assert set(token_means(m)) == set(means) | {M.NUM_TOKENS}


def test_rollout_metrics_use_the_module_names():
    per = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, np.nan], [1.0, 1.0]], dtype=np.float32)  # [N, R]
    got = rollout_metrics(np.array([3, 4, 5, 6]), np.array([False, True, False, False]), ["a", "b"], per,
                          np.nansum(per, axis=1), 2)
    assert set(got) == {M.REWARD, M.REWARD_STD, M.FRAC_ZERO_STD, M.COMPLETION_LENGTH_MEAN, M.COMPLETION_LENGTH_MAX,
                        M.TRUNCATED_FRAC, M.TRUNCATED_REWARD, M.reward_mean("a"), M.reward_std("a"), M.reward_mean("b"),
                        M.reward_std("b")}
    assert got[M.TRUNCATED_REWARD] == 1.0  # the cut row (row 1) scored 0 + 1
    assert all(M.is_reward_mean(M.reward_mean(n)) for n in "ab") and not M.is_reward_mean(M.reward_std("a"))


def test_the_trl_table_is_the_front_doors():
    from mathgrpo.trl_compat import state

    assert state.TRL_METRIC_NAMES is M.TRL_NAMES  # the door renames with metrics.py's table, not a copy
    assert len(set(M.TRL_NAMES.values())) == len(M.TRL_NAMES)  # one TRL name per metric
