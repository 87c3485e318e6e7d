"""The names of the metrics a training step logs (metrics.jsonl, trackers, callbacks), in one place.

    from mathgrpo import metrics as M
    row[M.REWARD], row[M.reward_mean("accuracy")], row[M.KL]
    M.TRL_NAMES[M.LR] == "learning_rate"        # the name TRL's GRPOTrainer logs the same number under

Who writes what: the rollout statistics from sampling.py (`rollout_metrics`), the times from trainer.py
(`step_metrics`), the update's from loss.py (`grpo_loss` returns token sums `<name>_sum`, `loss.token_means` turns them into means) and
update.py, the `groups/*` counts from sampling.py (dynamic sampling). logger.py, report.py and the TRL front door
read them by these names. Evaluation's per-problem metrics (pass@k, maj@k, ...) are evaluate.py's own table.
"""

from __future__ import annotations

# --- the rollout (sampling.rollout_metrics): over every rank's rows -------------------------------------------
REWARD = "reward"  # mean weighted total of the scored rows
REWARD_STD = "reward_std"
FRAC_ZERO_STD = "frac_zero_std"  # groups whose rewards are all equal
COMPLETION_LENGTH_MEAN = "completion_length_mean"  # tokens
COMPLETION_LENGTH_MAX = "completion_length_max"
TRUNCATED_FRAC = "truncated_frac"  # completions cut at generation.max_new_tokens
TRUNCATED_REWARD = "truncated_reward"  # mean reward of the cut completions (NaN when none was cut)
MAX_NEW_TOKENS = "max_new_tokens"  # logged only under a length curriculum


def reward_mean(name: str) -> str:
    """One reward function's mean over the step's rows (NaN where it returned None)."""
    return f"rewards/{name}/mean"


def reward_std(name: str) -> str:
    return f"rewards/{name}/std"


def is_reward_mean(key: str) -> bool:
    return key.startswith("rewards/") and key.endswith("/mean")


# --- the update (loss.grpo_loss token sums -> loss.token_means; update.policy_update) -------------------------
LOSS = "loss"
GRAD_NORM = "grad_norm"  # before clipping
SKIPPED_STEPS = "skipped_steps"  # fp16 loss scaling only: optimizer steps skipped for inf/NaN gradients (scale halved)
LOSS_SCALE = "loss_scale"  # fp16 loss scaling only: the scale after this step's update
LR = "lr"
NUM_TOKENS = "num_tokens"  # completion tokens in the loss, all ranks
KL = "kl"  # token mean of the k3 estimator to the reference (beta > 0 only)
ENTROPY = "entropy"  # token mean of the policy's entropy
ENTROPY_COEF = "entropy_coef"  # the entropy bonus's coefficient (adaptive control: mean over the update's steps, after each)
CLIP_LOW = "clip_ratio/low"  # tokens clipped below 1 - epsilon (negative advantages)
CLIP_HIGH = "clip_ratio/high"
CLIP_REGION = "clip_ratio/region"  # either
RATIO_MEAN = "ratio/mean"  # mean importance ratio
# the sampler-trainer mismatch (the engine's log-probs vs the update's old log-probs; fast engine only)
SAMPLER_LOGP_DIFF = "sampler/logp_diff"  # token mean |log pi_train - log pi_sampler|
SAMPLER_LOGP_DIFF_MAX = "sampler/logp_diff_max"
SAMPLER_RATIO_MEAN = "sampler/ratio_mean"  # token ratio pi_train / pi_sampler, before the correction's cap
SAMPLER_RATIO_STD = "sampler/ratio_std"
SAMPLER_RATIO_MIN = "sampler/ratio_min"
SAMPLER_RATIO_MAX = "sampler/ratio_max"


def summed(name: str) -> str:
    """The token sum `grpo_loss` returns for a token-mean metric (`kl` -> `kl_sum`)."""
    return f"{name}_sum"


# --- times (the slowest rank) ---------------------------------------------------------------------------------
STEP_TIME = "step_time"  # seconds
GEN_TIME = "gen_time"  # rollout and scoring
UPDATE_TIME = "update_time"
TOKENS_PER_S = "tokens_per_s"  # completion tokens per second of step time

# --- dynamic sampling (sampling.sample_step) --------------------------------------------------------------------
GROUPS_GENERATED = "groups/generated"
GROUPS_DROPPED = "groups/dropped"  # all rewards equal
GROUPS_KEPT = "groups/kept"
GROUPS_SURPLUS = "groups/surplus"  # informative beyond a rank's need, not trained on
GROUPS_ROUNDS = "groups/rounds"  # extra rounds generated

# mathgrpo name -> the name TRL 1.16 logs the same number under (the rest keep their names); the front door
# (trl_compat) renames with this table. TRL's num_tokens is a running total of prompt + completion tokens.
TRL_NAMES = {
    FRAC_ZERO_STD: "frac_reward_zero_std", COMPLETION_LENGTH_MEAN: "completions/mean_length",
    COMPLETION_LENGTH_MAX: "completions/max_length", TRUNCATED_FRAC: "completions/clipped_ratio",
    LR: "learning_rate", CLIP_REGION: "clip_ratio/region_mean", CLIP_LOW: "clip_ratio/low_mean",
    CLIP_HIGH: "clip_ratio/high_mean", NUM_TOKENS: "completion_tokens",
}
