"""GRPO math: KL, clipped loss, loss types (token log-probs: logprobs.py; group advantages: advantages.py).

Pure functions, no model or trainer state; the update (update.py) calls `grpo_loss` once per micro-batch.
Semantics follow TRL's GRPOTrainer (loss types, clip metrics, KL estimator, reward scaling) so
runs are comparable; variants are registry names: `LOSS_TYPES` (each loss type's policy term, normaliser and
token-count scope in one `LossType`; `aggregate` is the one function that normalises) and `IMPORTANCE_LEVELS`.
The loss's settings travel as one `LossParams`, built once per update from the config. Check with `pytest tests/test_loss.py -q`; `tests/test_trl_loss.py` compares the loss and
its gradients with TRL 1.16's own `GRPOTrainer._compute_loss` for every loss type and option.

Gradient accumulation contract (how the trainer must call `grpo_loss`):
  one optimiser step covers rows R on this rank, split into micro-batches m_1..m_k. For every m_j pass
      seq_count   = len(R)                              (rows in the whole step, not in m_j)
      token_count = effective_mask(mask_R, truncated_R, mask_truncated).sum()   (tokens in R)
  and call `.backward()` on each micro-batch loss as is (no division by k). The summed gradient
  then equals that of a single `grpo_loss` over R, for every loss type.
  Under DDP (gradients averaged over W ranks) "dapo" and "cispo" want the global token mean: pass
  token_count = global_tokens / W. "bnpo" is TRL's per-micro-batch token mean averaged over its
  K accumulation steps: pass `row_norm` = `LOSS_TYPES["bnpo"].row_norms(...)[rows]` (each row's tokens-of-its-batch x K),
  which makes it independent of how the trainer cuts micro-batches for memory.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Callable

import torch
from torch import Tensor

from . import metrics as M
from .registry import lookup

# ----------------------------------------------------------------------------- loss

# `grpo_loss` stats that are not logged: the entropy summed over the policy term's tokens, and their count (the
# tokens the entropy bonus acts on); update.py takes them out for adaptive entropy control (update.EntropyControl).
BONUS_ENTROPY, BONUS_TOKENS = "_bonus_entropy", "_bonus_tokens"


def kl_k3(logp: Tensor, logp_ref: Tensor) -> Tensor:
    """k3 estimator of KL(pi || ref) per token [N, T]: exp(d) - d - 1 with d = ref - logp (>= 0, unbiased)."""
    d = logp_ref - logp
    return torch.exp(d) - d - 1


def effective_mask(mask: Tensor, truncated: Tensor | None = None, mask_truncated: bool = False) -> Tensor:
    """Completion mask [N, T] (float) with truncated rows zeroed when mask_truncated (DAPO overlong filtering).
    The trainer computes token_count from this, so counts match what `grpo_loss` sums."""
    m = mask.float()
    if mask_truncated and truncated is not None:
        if truncated.shape != mask.shape[:1]:
            raise ValueError(f"effective_mask: truncated {tuple(truncated.shape)} must be [N] (mask {tuple(mask.shape)})")
        m = m * (~truncated.bool()).to(m)[:, None]
    return m


def high_entropy_mask(entropy: Tensor, mask: Tensor, top_quantile: float, threshold: Tensor | None = None) -> Tensor:
    """Bool [N, T]: the completion tokens whose entropy is at least the (1 - top_quantile) quantile of the
    entropies under `mask` (torch.quantile, linear interpolation), i.e. the top `top_quantile` share by entropy
    (TRL's `top_entropy_quantile`, "Beyond the 80/20 Rule"); 0.0 keeps only the highest, 1.0 every token.
    threshold [N]: each row's quantile taken beforehand over a larger pool (`entropy_threshold`; the update pools
    TRL's micro-batch of rows over ranks, whatever micro-batches it cuts for memory); None: over this call's tokens."""
    if not 0.0 <= top_quantile <= 1.0:
        raise ValueError(f"high_entropy_mask: top_quantile must be in [0, 1], got {top_quantile}")
    if entropy.shape != mask.shape:
        raise ValueError(f"high_entropy_mask: entropy {tuple(entropy.shape)} must match mask {tuple(mask.shape)}")
    keep = mask.bool()
    if threshold is None:
        threshold = entropy_threshold(entropy[keep], top_quantile)
        if threshold is None:
            return torch.zeros_like(keep)
    else:
        threshold = threshold.to(entropy.device).float()[:, None]  # [N, 1]
    return (entropy.float() >= threshold) & keep


def entropy_threshold(values: Tensor, top_quantile: float) -> Tensor | None:
    """The (1 - top_quantile) quantile of a pool's token entropies [K] (None for an empty pool: nothing kept)."""
    values = values.float()
    return torch.quantile(values, 1.0 - top_quantile) if values.numel() else None


def off_policy_mask(advantages: Tensor, logp: Tensor, logp_behaviour: Tensor, mask: Tensor, threshold: float) -> Tensor:
    """[N, 1] 1.0 = keep: DeepSeek-V3.2's off-policy sequence mask (TRL's off_policy_mask_threshold). A sequence
    with a negative advantage whose mean KL(behaviour || current) estimate, mean(behaviour - logp), exceeds the
    threshold is dropped from the policy term. advantages [N, 1]; the rest [N, T]."""
    kl = torch.nan_to_num(logp_behaviour.float() - logp.detach().float(), nan=0.0)  # [N, T]
    seq_kl = (kl * mask).sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1.0)  # [N, 1]
    return ((advantages >= 0) | (seq_kl <= threshold)).to(mask.dtype)


# ----------------------------------------------------------------------------- loss types
# A loss type is one `LossType` in `LOSS_TYPES`: its per-token policy term, its normaliser (the one place that
# decides how token losses become the scalar, verl's `agg_loss`), whether its token count stays rank-local, and
# whether it needs per-row batch denominators. The update, the distributed counts and the tests read it from there.


@dataclass(frozen=True)
class LossCounts:
    """The denominators of one optimizer step (see the module docstring's accumulation contract)."""

    seq_count: float  # rows of the step (global / W under several ranks)
    token_count: float  # effective tokens of the step (global / W, or this rank's for a local-token type)
    max_completion_length: int | None = None  # dr_grpo's fixed length
    row_norm: Tensor | None = None  # [N] bnpo: each row's batch tokens x K; None: this call is the one batch


def _clipped_surrogate(ratio, adv, logp, p):  # grpo, bnpo, dr_grpo, dapo: PPO's pessimistic clipped objective
    clipped = ratio.clamp(1 - p.epsilon_low, 1 + p.eps_high)
    if p.delta is not None:  # two-sided clipping: the unclipped ratio is capped too, so large ratios with
        ratio = ratio.clamp(max=p.delta)  # negative advantages cannot blow up (TRL's delta)
    return -torch.min(ratio * adv, clipped * adv)


def _cispo_term(ratio, adv, logp, p):  # MiniMax-M1: the clipped ratio is a stop-gradient weight on log p
    return -ratio.clamp(max=p.eps_high).detach() * adv * logp


def _sapo_term(ratio, adv, logp, p):  # SAPO: a sigmoid gate instead of a hard clip, its own temperature per sign
    tau = torch.where(adv > 0, p.sapo_temperature_pos, p.sapo_temperature_neg)
    return -torch.sigmoid(tau * (ratio - 1)) * 4 / tau * adv


def _seq_mean_norm(loss_sum_rows, n_tokens_rows, c: LossCounts):  # mean over sequences of per-sequence means
    return (loss_sum_rows / n_tokens_rows.clamp(min=1.0)).sum() / c.seq_count


def _token_norm(loss_sum_rows, n_tokens_rows, c: LossCounts):  # mean over the tokens of the global batch
    return loss_sum_rows.sum() / max(c.token_count, 1.0)


def _batch_token_norm(loss_sum_rows, n_tokens_rows, c: LossCounts):  # mean of the local batches' token means
    if c.row_norm is None:  # this call is the one local batch
        return loss_sum_rows.sum() / n_tokens_rows.sum().clamp(min=1.0)
    return (loss_sum_rows / c.row_norm).sum()


def _seq_sum_norm(loss_sum_rows, n_tokens_rows, c: LossCounts):  # luspo: mean over sequences of token sums
    return loss_sum_rows.sum() / c.seq_count


def _fixed_len_norm(loss_sum_rows, n_tokens_rows, c: LossCounts):  # no length bias, fixed denominator
    return loss_sum_rows.sum() / (c.seq_count * c.max_completion_length)


def bnpo_row_norms(mask: Tensor, batch_rows: int | None = None) -> Tensor:  # [N, T] -> [N]
    """bnpo's per-row denominator: the tokens of the row's local batch times the number K of local batches.
    TRL 1.16 normalises bnpo by the tokens of each micro-batch (per_device_train_batch_size rows) and divides
    by its K accumulation steps; here the batches are consecutive runs of `batch_rows` rows of the rank's
    rollout (None: one batch), whatever micro-batches the trainer cuts for memory. `mask` is the effective mask."""
    n = mask.shape[0]
    tokens = mask.float().sum(-1)  # [N]
    batch = batch_ids(n, batch_rows, mask.device)  # [N] batch index of each row
    per_batch = torch.zeros(int(batch.max()) + 1 if n else 0, device=mask.device).index_add_(0, batch, tokens)
    return per_batch.clamp(min=1.0)[batch] * per_batch.numel()  # [N]


def batch_ids(n: int, batch_rows: int | None, device=None) -> Tensor:  # -> [n]
    """Index of each row's local batch: consecutive runs of `batch_rows` rows (None: one batch). TRL's micro-batch
    (per_device_train_batch_size rows): bnpo's denominators and the entropy quantile's pool are taken over it."""
    rows = n if not batch_rows else min(batch_rows, n)
    return torch.arange(n, device=device) // max(rows, 1)


@dataclass(frozen=True)
class LossType:
    """Everything that makes a loss type, in one place."""

    term: Callable  # (ratio [N,T]|[N,1], advantages [N,1], logp [N,T], LossParams) -> per-token policy loss
    normalise: Callable[[Tensor, Tensor, LossCounts], Tensor]  # (row loss sums [N], row tokens [N], counts) -> loss
    local_tokens: bool = False  # token count rank-local (not the global count / W): see distributed.py
    row_norms: Callable[[Tensor, int | None], Tensor] | None = None  # per-row denominators (bnpo)
    needs_max_len: bool = False  # dr_grpo: counts.max_completion_length


# cispo's epsilon_high is the ratio cap itself (TRL: "eps_max", 5.0 recommended), not 1 + epsilon_high.
LOSS_TYPES: dict[str, LossType] = {
    "grpo": LossType(_clipped_surrogate, _seq_mean_norm),
    "bnpo": LossType(_clipped_surrogate, _batch_token_norm, local_tokens=True, row_norms=bnpo_row_norms),
    "dr_grpo": LossType(_clipped_surrogate, _fixed_len_norm, needs_max_len=True),
    "dapo": LossType(_clipped_surrogate, _token_norm),
    "cispo": LossType(_cispo_term, _token_norm),
    "sapo": LossType(_sapo_term, _seq_mean_norm),
    "luspo": LossType(_clipped_surrogate, _seq_sum_norm),  # length-unbiased: a sequence's loss grows with its length
}


def aggregate(loss_type: str, per_token: Tensor, mask: Tensor, counts: LossCounts) -> Tensor:
    """The scalar loss of masked per-token losses [N, T] (mask [N, T] float): the one function that decides
    normalisation, by the loss type's `normalise` (verl's agg_loss)."""
    return LOSS_TYPES[loss_type].normalise((per_token * mask).sum(-1), mask.sum(-1), counts)


def _sequence_log_ratio(log_ratio: Tensor, mask: Tensor) -> Tensor:  # [N, T] -> [N, 1]
    # GSPO: one importance weight per sequence, the length-normalised sum of token log-ratios.
    return ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)


# name -> fn(masked token log-ratios [N, T], mask [N, T]) -> log importance weights [N, T] or [N, 1].
IMPORTANCE_LEVELS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "token": lambda log_ratio, mask: log_ratio,
    "sequence": _sequence_log_ratio,
}


@dataclass(frozen=True)
class LossParams:
    """The loss's settings, built once per update from the config (`from_config`); the same for every micro-batch."""

    loss_type: str = "grpo"
    epsilon_low: float = 0.2
    epsilon_high: float | None = None  # None: epsilon_low
    beta: float = 0.04
    max_completion_length: int | None = None
    mask_truncated: bool = False
    importance_sampling_level: str = "token"
    use_bias_correction_kl: bool = True
    sapo_temperature_pos: float = 1.0
    sapo_temperature_neg: float = 1.05
    top_entropy_quantile: float = 1.0
    delta: float | None = None  # two-sided clipping cap of the ratio (clipped loss types)
    entropy_coef: float = 0.0  # entropy bonus: loss - coef * token-mean entropy (needs the entropy's gradient)
    off_policy_mask_threshold: float | None = None  # DeepSeek-V3.2's off-policy sequence mask; None = off
    sampler_correction: str = "none"  # correction.SAMPLER_CORRECTIONS: how update.py weights the sampler mismatch
    sampler_correction_max: float | None = 3.0
    sampler_correction_min: float | None = None

    @property
    def eps_high(self) -> float:
        return self.epsilon_low if self.epsilon_high is None else self.epsilon_high

    @classmethod
    def from_config(cls, cfg) -> "LossParams":
        """The loss's settings of a `Config` (its `grpo` section, and the step's generation.max_new_tokens)."""
        g = cfg.grpo
        return cls(loss_type=g.loss_type, epsilon_low=g.epsilon, epsilon_high=g.epsilon_high, beta=g.beta,
                   max_completion_length=cfg.generation.max_new_tokens, mask_truncated=g.mask_truncated_completions,
                   importance_sampling_level=g.importance_sampling_level,
                   use_bias_correction_kl=g.use_bias_correction_kl, sapo_temperature_pos=g.sapo_temperature_pos,
                   sapo_temperature_neg=g.sapo_temperature_neg, top_entropy_quantile=g.top_entropy_quantile,
                   delta=g.delta, entropy_coef=g.entropy_coef, off_policy_mask_threshold=g.off_policy_mask_threshold,
                   sampler_correction=g.sampler_correction, sampler_correction_max=g.sampler_correction_max,
                   sampler_correction_min=g.sampler_correction_min)


def grpo_loss(
    logp: Tensor,
    logp_old: Tensor | None,
    logp_ref: Tensor | None,
    advantages: Tensor,
    mask: Tensor,
    params: LossParams | None = None,
    *,
    token_count: float | None = None,
    seq_count: float | None = None,
    row_norm: Tensor | None = None,
    truncated: Tensor | None = None,
    entropy: Tensor | None = None,
    entropy_threshold: Tensor | None = None,
    sampling_weight: Tensor | None = None,
    logp_sampler: Tensor | None = None,
    metrics_on_device: bool = False,
    **options,
) -> tuple[Tensor, dict[str, float]]:
    """Policy term of `params.loss_type` + beta * k3 KL, normalised by the loss type. Returns (scalar loss, metrics).

    logp, logp_old, logp_ref, mask: [N, T]; advantages: [N]. logp_old None means one update per
    rollout (ratio 1, gradient still flows); logp_ref may be None only when beta == 0.
    params: the loss's settings (`LossParams`, built once from the config); or give its fields as keywords
    (`loss_type="dapo", beta=0.0`), a shorthand for `LossParams(**options)`.
    token_count / seq_count / row_norm (bnpo): see the module docstring (defaults: this call's own counts).
    use_bias_correction_kl (TRL 1.16's default): the KL term is multiplied by the importance ratio, which
    changes its gradient even where the ratio is 1 (d ratio / d logp = ratio).
    Metrics are sums over this call's tokens (`*_sum`) and `num_tokens`, so that callers can form
    token-weighted means over micro-batches and ranks (`token_means`); `ratio/mean` etc. as TRL logs them.
    With an entropy and metrics_on_device, also `BONUS_ENTROPY` / `BONUS_TOKENS`: its sum over the policy term's
    tokens and their count (not metrics to log: the update's adaptive entropy control measures with them).
    entropy [N, T] (no gradient): logged as "entropy"; with top_entropy_quantile < 1 only the tokens of
    `high_entropy_mask` keep their policy-gradient term (the KL term and the normaliser keep every token, as TRL);
    entropy_threshold [N]: each row's quantile, taken over a larger pool by the caller (else over this call's tokens).
    entropy_coef > 0: the loss minus coef x the entropy of the policy-term tokens summed and divided by the step's
    token_count (the entropy must then carry its gradient: with_entropy="grad").
    sampling_weight [N, T] or [N, 1] (`correction.sampler_weights`): multiplies the policy term (the sampler
    correction).
    off_policy_mask_threshold: sequences dropped by `off_policy_mask` against logp_sampler [N, T] (the engine's
    log-probs) when given, else against logp_old.
    metrics_on_device: the metrics as 0-d tensors where they were computed (no device sync; the update reads
    them once per step) instead of floats.
    """
    fn = "grpo_loss"
    if params is not None and options:
        raise TypeError(f"{fn}: pass the loss's settings as params or as keywords, not both ({sorted(options)})")
    if params is None:
        known = {f.name for f in fields(LossParams)}
        if set(options) - known:
            raise TypeError(f"{fn}: unexpected keyword(s) {sorted(set(options) - known)}")
        params = LossParams(**options)
    p = params
    loss_type, beta = p.loss_type, p.beta
    kind = lookup(LOSS_TYPES, loss_type, f"{fn}: loss_type")  # both names checked before any tensor work
    lookup(IMPORTANCE_LEVELS, p.importance_sampling_level, f"{fn}: importance_sampling_level")
    if logp.dim() != 2 or mask.shape != logp.shape or advantages.shape != logp.shape[:1]:
        raise ValueError(f"{fn}: need logp/mask [N, T] and advantages [N]; got {tuple(logp.shape)}, "
                         f"{tuple(mask.shape)}, {tuple(advantages.shape)}")
    for name, t in (("logp_old", logp_old), ("logp_ref", logp_ref), ("entropy", entropy),
                    ("logp_sampler", logp_sampler)):
        if t is not None and t.shape != logp.shape:
            raise ValueError(f"{fn}: {name} {tuple(t.shape)} must match logp {tuple(logp.shape)}")
    if row_norm is not None and row_norm.shape != logp.shape[:1]:
        raise ValueError(f"{fn}: row_norm {tuple(row_norm.shape)} must be [N] = {tuple(logp.shape[:1])}")
    if beta != 0.0 and logp_ref is None:
        raise ValueError(f"{fn}: beta={beta} needs logp_ref (pass beta=0.0 to train without a reference)")
    if kind.needs_max_len and not p.max_completion_length:
        raise ValueError(f"{fn}: loss_type {loss_type!r} needs max_completion_length")
    eps_low, eps_high = p.epsilon_low, p.eps_high

    m = effective_mask(mask, truncated, p.mask_truncated).to(logp.device)  # [N, T]
    keep = m.bool()  # [N, T]
    logp = logp.float()
    adv = advantages.float().to(logp.device)[:, None]  # [N, 1]
    old = logp.detach() if logp_old is None else logp_old.float()
    # Padding positions can hold arbitrary log-probs; zeroing the log-ratio there (before exp) keeps
    # inf/NaN out of both the loss and its gradient, where multiplying by the mask afterwards would not.
    log_ratio = torch.where(keep, logp - old, torch.zeros_like(logp))  # [N, T]
    ratio = torch.exp(IMPORTANCE_LEVELS[p.importance_sampling_level](log_ratio, m))  # [N, T] or [N, 1]
    per_token = kind.term(ratio, adv, torch.where(keep, logp, torch.zeros_like(logp)), p)
    pg_keep = keep  # [N, T] the tokens whose policy term counts (and the entropy bonus's)
    if p.top_entropy_quantile < 1.0:
        if entropy is None:
            raise ValueError(f"{fn}: top_entropy_quantile={p.top_entropy_quantile} needs the per-token entropy")
        pg_keep = high_entropy_mask(entropy.detach(), m, p.top_entropy_quantile, entropy_threshold)  # [N, T]
        per_token = per_token * pg_keep
    if p.off_policy_mask_threshold is not None:
        behaviour = old if logp_sampler is None else logp_sampler.to(logp.device)
        per_token = per_token * off_policy_mask(adv, logp, behaviour, m, p.off_policy_mask_threshold)  # [N, T]
    if sampling_weight is not None:  # the sampler correction: a constant weight on the policy term
        per_token = per_token * sampling_weight.to(logp.device).float()
    kl = None
    if logp_ref is not None:
        kl = kl_k3(logp, torch.where(keep, logp_ref.float(), logp))  # [N, T]; 0 at padding
        if p.use_bias_correction_kl:
            kl = kl * ratio  # [N, T]; a sequence-level ratio [N, 1] broadcasts, as in TRL
        if beta != 0.0:
            per_token = per_token + beta * kl
    counts = LossCounts(float(logp.shape[0] if seq_count is None else seq_count),
                        float(m.sum() if token_count is None else token_count), p.max_completion_length,
                        None if row_norm is None else row_norm.to(logp.device).float())
    loss = aggregate(loss_type, per_token, m, counts)
    if p.entropy_coef:
        if entropy is None or not entropy.requires_grad:
            raise ValueError(f"{fn}: entropy_coef={p.entropy_coef} needs the entropy with its gradient "
                             f"(completion_logprobs(..., with_entropy='grad'))")
        loss = loss - p.entropy_coef * (entropy.float() * pg_keep).sum() / max(counts.token_count, 1.0)

    with torch.no_grad():
        ratio_t = ratio.expand_as(m)  # [N, T]
        if loss_type == "cispo":  # the tokens whose weight the cap lowers (TRL's cispo_clip_ratio)
            low = torch.zeros_like(m)
            high = ((ratio_t > eps_high) & (adv > 0)).float()
        else:  # tokens whose gradient the clip removes (for sapo: where the hard clip would have)
            low = ((ratio_t < 1 - eps_low) & (adv < 0)).float()
            high = ((ratio_t > 1 + eps_high) & (adv > 0)).float()
        stats = {
            M.summed(M.CLIP_LOW): (low * m).sum(),
            M.summed(M.CLIP_HIGH): (high * m).sum(),
            M.summed(M.CLIP_REGION): (torch.maximum(low, high) * m).sum(),
            M.summed(M.RATIO_MEAN): (ratio_t * m).sum(),
            M.NUM_TOKENS: m.sum(),
        }
        if kl is not None:
            stats[M.summed(M.KL)] = (kl * m).sum()
        if entropy is not None:
            stats[M.summed(M.ENTROPY)] = (entropy.float() * m).sum()
        if metrics_on_device:
            if entropy is not None:  # adaptive entropy control's measurement: TRL's mask x entropy_mask
                stats[BONUS_ENTROPY] = (entropy.float() * pg_keep).sum()
                stats[BONUS_TOKENS] = pg_keep.sum().float()
            return loss, stats
        values = torch.stack(list(stats.values())).tolist()  # one device sync for all metrics
    return loss, dict(zip(stats, values))


def token_means(sums: dict[str, float]) -> dict[str, float]:
    """`grpo_loss` metrics summed over micro-batches (and ranks) -> token-weighted means: `kl_sum` / num_tokens
    -> `kl`, and so on (TRL's `global_masked_mean`); other keys are kept as they are."""
    n = max(sums.get("num_tokens", 0.0), 1.0)
    return {(k[:-4] if k.endswith("_sum") else k): (v / n if k.endswith("_sum") else v) for k, v in sums.items()}
