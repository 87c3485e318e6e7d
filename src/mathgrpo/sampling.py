"""One step's rollout: draw prompts, sample G completions each, score them; DAPO's dynamic sampling.

    got = sample_step(step_seed, sampler, data.train, rollout, prompts, rewards, cfg, world, pad_id)
    got.problems, got.completions       # this rank's problems [P], their completions [N = P * G rows]
    got.scores, got.totals              # rewards [N, R], weighted totals [N]; got.advantages: the trainer's, later
    got.metrics, got.note               # groups/* counts (global); a log line when a step came out short
    rank_advantages(world, got.scores, got.totals, G, ...)   # this rank's advantages [N], over the global batch
    rollout_metrics(...)                # the rollout's reward and length statistics, over every rank's rows

The problem order (`Sampler`: a seeded permutation per epoch, its position checkpointed) and the step's seed
(`step_seed`) live here too; reward inputs are built by `scoring.reward_inputs`, as in evaluation.

Plain (grpo.dynamic_sampling off): `prompts_per_step` prompts from the sampler, this rank's contiguous share,
sampled with the step's rank seed and scored, exactly as the loop always did.

Dynamic sampling (DAPO, arXiv:2503.14476 sec. 3.2; verl's `filter_groups`): a group whose G rewards are all equal
has zero advantage and adds no policy gradient. Such groups are dropped and further rounds draw more prompts until
every rank holds its share of `prompts_per_step` informative groups, or `grpo.dynamic_sampling_max_rounds` extra
rounds were generated. Decided globally, in lockstep: after every round the ranks exchange how many groups they
still need, so all draw the same number of prompts from the (global) sampler, whose position therefore stays the
same on every rank and in the checkpoint: a resumed run repeats the uninterrupted one. An extra round draws, per
rank, the most any rank still needs divided by the informative share seen so far in this step (at most a full
share: no round generates more than a plain step); a rank that is already full skips its share of that round.
Informative groups beyond a rank's need are not trained on (`groups/surplus`). Out of rounds, every rank trains on
as many groups as the emptiest rank has (ranks keep equal shares, which FSDP2's matched micro-batches and the loss
counts rely on), and the log says so; when a rank has none, the step trains on its first round as drawn (the
plain step). Round k of a step samples with seed step_seed + k * ROUND_SEED_STRIDE (per rank),
round 0 with the plain step's seed, so a step without flat groups is the plain step.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

import numpy as np
import torch

from . import metrics as M
from .config import Config
from .advantages import group_advantages, normalized_sum_advantages, unscorable_as_nan, zero_std_fraction
from .data import Problem
from .distributed import World, rank_seed
from .scoring import RewardSet, reward_inputs
from .rollout import Completions, sampling_from

ROUND_SEED_STRIDE = 15_485_863  # a prime: round seeds stay clear of the next steps' seeds (step_seed + 1, + 2, ...)


@dataclass
class Sampler:
    """Deterministic problem order: a fresh seeded permutation every epoch; its position is checkpointed."""

    n: int
    seed: int
    epoch: int = 0
    position: int = 0
    order: list[int] = field(default_factory=list)

    def next(self, k: int) -> list[int]:
        out = []
        while len(out) < k:
            if not self.order or self.position >= len(self.order):
                if self.order:
                    self.epoch += 1
                self.order = list(range(self.n))
                random.Random(self.seed + self.epoch).shuffle(self.order)
                self.position = 0
            out.append(self.order[self.position])
            self.position += 1
        return out

    def state(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "order": self.order}


def step_seed(seed: int, step: int) -> int:
    return (seed * 1_000_003 + step) % (2**31)


@dataclass
class RolloutBatch:
    """One step's rollout on this rank, rows prompt-major (N = len(problems) * G)."""

    problems: list[Problem]  # [P] this rank's prompts, one per group, in the order of the completions' groups
    completions: Completions  # [N rows]: completion_ids / mask [N, T], texts / truncated [N]
    scores: np.ndarray  # [N, R] per-reward values (None -> NaN)
    totals: np.ndarray  # [N] weighted totals
    metrics: dict = field(default_factory=dict)  # global counts (dynamic sampling only)
    note: str | None = None  # a line for the log (dynamic sampling ran out of rounds)
    advantages: torch.Tensor | None = None  # [N], set by the trainer's advantage stage (over every rank's rows)


def score_rollout(rewards: RewardSet, problems: list[Problem], comp: Completions, prompts, max_completion_len: int,
                  **settings) -> tuple[np.ndarray, np.ndarray]:
    """Scores [N, R] and totals [N] of `comp` (len(problems) * G rows, prompt-major), the rewards receiving
    `scoring.reward_inputs` (prompts as `prompts.text` renders them, its `.prefill`). The TRL front door's
    evaluation can call this with its dataset prompts as `prompts`."""
    G = len(comp.texts) // max(1, len(problems))
    return rewards.score(comp.texts, **reward_inputs(
        problems, G, prompts=[prompts.text(p.problem) for p in problems], prefill=prompts.prefill,
        completion_ids=[r[m].tolist() for r, m in zip(comp.completion_ids, comp.completion_mask)],
        truncated=comp.truncated.tolist(), max_completion_len=max_completion_len, **settings))


def _generate_and_score(batch: list[Problem], seed: int, rollout, prompts, rewards: RewardSet, cfg: Config):
    G = cfg.grpo.num_generations
    torch.manual_seed(seed)
    comp = rollout.generate([prompts.ids(p.problem) for p in batch], G, sampling_from(
        cfg.generation, seed, max_new_tokens=cfg.generation.max_new_tokens))
    per, total = score_rollout(rewards, batch, comp, prompts, cfg.generation.max_new_tokens,
                               overlong_buffer=cfg.rewards.overlong_buffer)
    return comp, per, total


def flat_groups(total: np.ndarray, group: int, per: np.ndarray | None = None) -> np.ndarray:
    """Bool [P]: groups whose advantages are all 0, from totals [P * group] (prompt-major) and, when given, the
    per-reward scores [P * group, R]: a row that no reward could score (all NaN in `per`) joins neither its group's
    mean nor its std (advantages.unscorable_as_nan, as the trainer's advantage stage), so a group is flat when its
    scored totals are all equal or fewer than two rows are scored ([1, 1, 1, None] is flat)."""
    total = torch.as_tensor(np.asarray(total, dtype=np.float64))  # [N]
    if per is not None:
        total = unscorable_as_nan(torch.as_tensor(np.asarray(per, dtype=np.float64)), total)
    grouped = total.reshape(-1, group)  # [P, G]; NaN: unscored
    scored = ~torch.isnan(grouped)
    hi = torch.where(scored, grouped, -math.inf).amax(dim=1)
    lo = torch.where(scored, grouped, math.inf).amin(dim=1)
    return ((scored.sum(dim=1) < 2) | (hi == lo)).numpy()


def take_groups(parts: list[tuple], picks: list[tuple[int, int]], group: int, pad_id: int) -> RolloutBatch:
    """The groups `picks` = [(part, group index)] of rounds `parts` = [(batch, comp, per, total)] as one rollout:
    rows in pick order, completions right-padded with pad_id to the widest round."""
    rows = [(parts[p], g * group + j) for p, g in picks for j in range(group)]
    width = max([parts[p][1].completion_ids.shape[1] for p, _ in picks] + [1])
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)  # [N, T]
    mask = torch.zeros((len(rows), width), dtype=torch.bool)  # [N, T]
    with_lp = all(parts[p][1].logprobs is not None for p, _ in picks)
    logprobs = torch.zeros((len(rows), width), dtype=torch.float32) if with_lp else None
    for i, ((_, c, _, _), r) in enumerate(rows):
        w = c.completion_ids.shape[1]
        ids[i, :w], mask[i, :w] = c.completion_ids[r], c.completion_mask[r].bool()
        if with_lp:
            logprobs[i, :w] = c.logprobs[r]
    comp = Completions(prompt_ids=[c.prompt_ids[r] for (_, c, _, _), r in rows], completion_ids=ids,
                       completion_mask=mask, texts=[c.texts[r] for (_, c, _, _), r in rows],
                       truncated=torch.stack([c.truncated[r] for (_, c, _, _), r in rows]) if rows
                       else torch.zeros(0, dtype=torch.bool), logprobs=logprobs,
                       gen_seconds=sum(parts[p][1].gen_seconds for p in sorted({p for p, _ in picks})))
    n_rewards = parts[0][2].shape[1]
    per = np.stack([part[2][r] for part, r in rows]) if rows else np.zeros((0, n_rewards), np.float32)
    total = np.asarray([part[3][r] for part, r in rows], dtype=np.float32)
    return RolloutBatch([parts[p][0][g] for p, g in picks], comp, per, total)


def sample_step(base_seed: int, sampler, problems: list[Problem], rollout, prompts, rewards: RewardSet, cfg: Config,
                world: World, pad_id: int, step: int = 0) -> RolloutBatch:
    """The step's rollout (see the module docstring). base_seed: the trainer's step_seed(seed, step);
    cfg.generation.max_new_tokens: the step's value (an int); step: only for the log line."""
    P, G = cfg.trainer.prompts_per_step, cfg.grpo.num_generations

    def draw(n_per_rank: int) -> list[Problem]:  # every rank draws the same global prompts and takes its share
        return world.mine([problems[i] for i in sampler.next(n_per_rank * world.size)])

    def seed_of(k: int) -> int:
        return rank_seed((base_seed + ROUND_SEED_STRIDE * k) % (2**31), world.rank)

    share = world.share(P)
    batch = draw(share)
    first = (batch, *_generate_and_score(batch, seed_of(0), rollout, prompts, rewards, cfg))
    if not cfg.grpo.dynamic_sampling:
        return RolloutBatch(*first)
    parts, kept = [first], []
    generated = dropped = surplus = 0
    k = 0
    while True:
        batch, comp, per, total = parts[-1]
        if comp is not None:
            flat = flat_groups(total, G, per)
            informative = [g for g in range(len(batch)) if not flat[g]]
            take = informative[:share - len(kept)]
            kept += [(len(parts) - 1, g) for g in take]
            generated += len(batch)
            dropped += int(flat.sum())
            surplus += len(informative) - len(take)
        counts = world.gather_objects([(share - len(kept), generated, generated - dropped)])  # per rank
        needs = [c[0] for c in counts]
        if max(needs) == 0 or k == cfg.grpo.dynamic_sampling_max_rounds:
            break
        k += 1
        seen, useful = sum(c[1] for c in counts), sum(c[2] for c in counts)
        n = max(min(share, math.ceil(need * seen / useful)) if useful else share for need in needs if need)
        batch = draw(n)
        need_here = share - len(kept)
        parts.append((batch, *_generate_and_score(batch, seed_of(k), rollout, prompts, rewards, cfg)) if need_here
                     else (batch, None, None, None))  # full already: this rank's share of the round is skipped
    fewest = share - max(needs)  # groups per rank every rank can train on
    sums = np.sum([c for c in world.gather_objects([(generated, dropped, surplus + len(kept) - fewest)])], axis=0)
    metrics = {M.GROUPS_GENERATED: float(sums[0]), M.GROUPS_DROPPED: float(sums[1]),
               M.GROUPS_KEPT: float(fewest * world.size), M.GROUPS_SURPLUS: float(sums[2]), M.GROUPS_ROUNDS: float(k)}
    note = None
    if fewest < share:
        what = (f"training on {fewest * world.size} ({fewest} per rank)" if fewest else
                "training on the first round as drawn, as without dynamic sampling")
        note = (f"step {step}: dynamic sampling found {P - sum(needs)} of {P} informative groups after {k} extra "
                f"round{'s' if k != 1 else ''} (grpo.dynamic_sampling_max_rounds={cfg.grpo.dynamic_sampling_max_rounds}"
                f"; {int(sums[0])} groups generated, {int(sums[1])} with all rewards equal); {what}")
    if fewest == 0:
        out = RolloutBatch(*first)
        metrics[M.GROUPS_KEPT] = 0.0
    elif len(parts) == 1 and kept == [(0, g) for g in range(share)]:
        out = RolloutBatch(*first)  # nothing dropped: the plain step as it is
    else:
        out = take_groups(parts, kept[:fewest], G, pad_id)
    out.metrics, out.note = metrics, note
    return out


# --- the step's reward statistics and advantages (over every rank's rows) ---------------------------------------

def rollout_metrics(lengths: np.ndarray, truncated: np.ndarray, names: list[str], per: np.ndarray,
                    total: np.ndarray, group: int) -> dict:
    """Reward and length statistics of a rollout: lengths/truncated/total [N], per [N, R], whole groups."""
    lens = lengths.astype(np.float64)
    # as TRL 1.16: rows no reward could score (all None) are left out; stds are unbiased (Bessel)
    scored = unscorable_as_nan(torch.from_numpy(per), torch.from_numpy(total)).numpy()  # [N]
    m = {M.REWARD: _nanmean(scored), M.REWARD_STD: _nanstd(scored),
         M.FRAC_ZERO_STD: zero_std_fraction(torch.from_numpy(scored), group),
         M.COMPLETION_LENGTH_MEAN: float(lens.mean()), M.COMPLETION_LENGTH_MAX: float(lens.max()),
         M.TRUNCATED_FRAC: float(truncated.astype(np.float64).mean()), M.TRUNCATED_REWARD: _nanmean(scored[truncated])}
    for j, name in enumerate(names):
        col = per[:, j]
        m[M.reward_mean(name)] = _nanmean(col)
        m[M.reward_std(name)] = _nanstd(col)
    return m


def _nanmean(x: np.ndarray) -> float:
    return float(np.nanmean(x)) if np.isfinite(x).any() else float("nan")


def _nanstd(x: np.ndarray) -> float:  # Bessel's correction, as TRL's nanstd; NaN with fewer than 2 values
    return float(np.nanstd(x, ddof=1)) if np.isfinite(x).sum() > 1 else float("nan")


def rank_advantages(world: World, per: np.ndarray, total: np.ndarray, group: int, scale_rewards: str,
                    aggregation: str = "sum_then_normalize", weights: np.ndarray | None = None) -> torch.Tensor:
    """This rank's advantages [N] (rows prompt-major): rows no reward could score are NaN (advantage 0, out of
    their group's statistics), and the advantages are computed over the global batch (every rank's rows in rank
    order), so scale_rewards=batch divides by the global std, as TRL 1.16 does; groups never span ranks.
    aggregation=normalize_then_sum: from each function's rewards per [N, R] and their weights (GDPO)."""
    if aggregation == "normalize_then_sum":
        everyone = torch.cat(world.gather_objects([torch.from_numpy(per)]))  # [W * N, R]
        adv = normalized_sum_advantages(everyone, torch.from_numpy(np.asarray(weights)), group)
    else:
        mine = unscorable_as_nan(torch.from_numpy(per), torch.from_numpy(total))  # [N]
        adv = group_advantages(torch.cat(world.gather_objects([mine])), group, scale_rewards)  # [W * N]
    n = len(per)
    return adv[world.rank * n:(world.rank + 1) * n]
