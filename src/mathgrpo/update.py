"""The update stage: num_iterations optimizer steps over one rollout, in token-budgeted micro-batches.

    optimizer, scheduler = make_optimizer(model, cfg)
    metrics = policy_update(model, optimizer, scheduler, ref, completions, advantages, cfg, world)
    optimizer.zero_grad(set_to_none=True)     # the caller frees the last gradients (the trainer does)

policy_update leaves the last iteration's gradients (averaged over ranks, clipped) on the parameters, so tests
and benchmarks read them directly; the trainer's update stage frees them before the next generation.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass

import torch

from . import metrics as M
from .config import AUTO, Config
from .distributed import SINGLE, World
from .fsdp import is_sharded
from .correction import mismatch_stats, sampler_weights
from .loss import (BONUS_ENTROPY, BONUS_TOKENS, LOSS_TYPES, LossParams, batch_ids, effective_mask, entropy_threshold,
                   grpo_loss, token_means)
from .memory_plan import value
from .modelinfo import compute_dtype, is_quantized
from .models import Reference, completion_logprobs
from .packing import packed_microbatches, to_device
from .registry import lookup
from .rollout import Completions


def make_optimizer(model, cfg: Config):
    """AdamW over the trainable parameters and its LambdaLR schedule. Where the update computes in fp16 (a model
    loaded in float16: GPUs without bf16), the optimizer carries a loss scaler (`loss_scaler`)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("no trainable parameters: enable model.lora or full fine-tuning")
    t = cfg.trainer
    opt = torch.optim.AdamW(params, lr=t.learning_rate, betas=(t.adam_beta1, t.adam_beta2),
                            weight_decay=t.weight_decay)
    opt.loss_scaler = make_loss_scaler(model, params)
    total = max(1, t.max_steps * cfg.grpo.num_iterations * cfg.grpo.mini_batches)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda i: lr_factor(i, t.lr_scheduler, t.warmup_steps, total))


# trainer.lr_scheduler -> the multiplier after the warm-up, of the fraction of the remaining steps done
# (transformers' get_scheduler shapes of the same names)
LR_SCHEDULES = {"constant": lambda frac: 1.0, "constant_with_warmup": lambda frac: 1.0,
                "linear": lambda frac: max(0.0, 1.0 - frac),
                "cosine": lambda frac: max(0.0, 0.5 * (1.0 + math.cos(math.pi * frac)))}


def lr_factor(i: int, name: str, warmup: int, total: int) -> float:
    """The learning-rate multiplier of optimizer step i (0-based) of `total`: transformers' schedule `name`,
    except that a warm-up step i < warmup runs at (i+1)/(warmup+1) where transformers' runs at i/warmup (its
    first step at lr 0). `constant` has no warm-up (config.validate refuses one)."""
    shape = lookup(LR_SCHEDULES, name, "trainer.lr_scheduler")
    if name != "constant" and i < warmup:
        return (i + 1) / (warmup + 1)
    return shape((i - warmup) / max(1, total - warmup))


def make_loss_scaler(model, params: list[torch.nn.Parameter]):
    """torch.amp.GradScaler where the update's forward runs under fp16 autocast (fp16 gradients underflow without
    it), else None. The scaled loss's gradients are unscaled before clipping; a step whose gradients hold inf/NaN
    is skipped and the scale halved (logged: metrics.SKIPPED_STEPS). The trainable weights must be fp32 (LoRA's
    adapters are): fp16 weights would take fp16 Adam updates."""
    if compute_dtype(model) != torch.float16:
        return None
    half = [p for p in params if p.dtype == torch.float16]
    if half:
        raise ValueError(f"{len(half)} trainable parameters are float16 (full fine-tuning of an fp16 model): the "
                         "update needs fp32 weights for fp16 loss scaling; train LoRA adapters (model.lora=true, fp32 "
                         "adapters over the fp16 base) or load the model in float32 (model.dtype=float32)")
    return torch.amp.GradScaler(params[0].device.type)


def _step(optimizer, scheduler, scaler, sums: dict, device) -> None:
    """optimizer.step() and scheduler.step(); with a loss scaler its step (skipped where the unscaled gradients hold
    inf/NaN: counted in metrics.SKIPPED_STEPS) and update (metrics.LOSS_SCALE: the scale after it). The schedule steps
    after a skipped step too: it counts update attempts, as checkpoints do."""
    if scaler is None:
        optimizer.step()
        scheduler.step()
        return
    scale = scaler.get_scale()
    scaler.step(optimizer)
    scaler.update()
    skipped = scaler.get_scale() < scale
    sums[M.SKIPPED_STEPS] = sums.get(M.SKIPPED_STEPS, 0.0) + torch.tensor(float(skipped), device=device)
    sums[M.LOSS_SCALE] = torch.tensor(float(scaler.get_scale()), device=device)
    with warnings.catch_warnings():  # torch would warn of a schedule step with no optimizer step before it
        if skipped:
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step()`")
        scheduler.step()


def loss_scaler(optimizer):
    """The optimizer's loss scaler (make_optimizer), None where the update needs none."""
    return getattr(optimizer, "loss_scaler", None)


def microbatches(total_lengths: list[int], budget: int) -> list[list[int]]:
    """Row groups whose padded size (rows x longest row) stays within `budget` tokens; similar lengths
    are grouped (stable sort) so short completions are not padded to long ones."""
    order = sorted(range(len(total_lengths)), key=lambda i: total_lengths[i])
    groups, cur, longest = [], [], 0
    for i in order:
        new_longest = max(longest, total_lengths[i])
        if cur and new_longest * (len(cur) + 1) > budget:
            groups.append(cur)
            cur, new_longest = [], total_lengths[i]
        cur.append(i)
        longest = new_longest
    if cur:
        groups.append(cur)
    return groups


def minibatch_rows(n_rows: int, mini_batches: int) -> list[list[int]]:
    """The rows of each optimizer step of a pass: with several mini-batches the rollout's rows shuffled (torch's
    global generator, which the trainer seeds per step: resumes repeat it) and cut into that many contiguous runs,
    as TRL shuffles and splits its generation batch; one mini-batch: every row in order (no draw)."""
    if mini_batches > n_rows:
        raise ValueError(f"grpo.mini_batches={mini_batches} is more than the {n_rows} completions of this rank's "
                         f"rollout: every optimizer step needs rows")
    order = torch.randperm(n_rows).tolist() if mini_batches > 1 else list(range(n_rows))
    size, extra = divmod(n_rows, mini_batches)
    cuts = [j * size + min(j, extra) for j in range(mini_batches + 1)]
    return [order[cuts[j]:cuts[j + 1]] for j in range(mini_batches)]


@dataclass
class EntropyControl:
    """Adaptive entropy control (Skywork-OR1; TRL's use_adaptive_entropy): the entropy bonus's coefficient, moved
    after every optimizer step by the step's mean entropy over the policy term's tokens on all ranks (TRL's
    window-global mean over mask x entropy_mask). The trainer owns one per run (`from_config`, None for the static
    bonus) and saves its `state_dict` in checkpoints; policy_update asks `applied()` before each optimizer step and
    calls `observe` after it. Check with `pytest tests/test_update_options.py -k adaptive -q`."""

    coef: float  # the coefficient (grpo.entropy_coef to start with)
    target: float  # grpo.entropy_target, nats
    delta: float = 0.005
    low: float = 0.0
    high: float = 1.0
    last_entropy: float = math.inf  # the last step's measurement; inf: no bonus before the first one (as TRL)

    @classmethod
    def from_config(cls, cfg: Config) -> "EntropyControl | None":
        g = cfg.grpo
        if g.entropy_target is None:
            return None
        return cls(g.entropy_coef, g.entropy_target, g.entropy_coef_delta, g.entropy_coef_min, g.entropy_coef_max)

    def applied(self) -> float:
        """The coefficient of the next optimizer step: the bonus acts only while the entropy is at or below target."""
        return self.coef if self.last_entropy <= self.target else 0.0

    def observe(self, entropy_sum: float, tokens: float) -> None:
        """After an optimizer step: its entropy summed over the policy term's tokens (all ranks) and their count."""
        entropy = entropy_sum / max(tokens, 1.0)
        if entropy <= self.target:
            self.coef = min(self.coef + self.delta, self.high)
        else:
            self.coef = max(self.coef - self.delta, self.low)
        self.last_entropy = entropy

    def state_dict(self) -> dict:
        return {"coef": self.coef, "last_entropy": self.last_entropy}

    def load_state_dict(self, state: dict) -> None:
        self.coef, self.last_entropy = float(state["coef"]), float(state["last_entropy"])


class _Plan:
    """One rollout's optimizer steps: the rows of each micro-batch (its index k), which step it belongs to, each step's
    counts (loss.py's accumulation contract), and per row bnpo's denominator and the entropy quantile's pool."""

    def __init__(self, comp: Completions, eff: torch.Tensor, lengths: list[int], cfg: Config, world: World,
                 loss_type: str, sharded: bool, budget: int):
        g, t = cfg.grpo, cfg.trainer
        n = eff.shape[0]
        split = packed_microbatches if t.pack_sequences else microbatches
        kind = LOSS_TYPES[loss_type]
        tokens = float(eff.sum()) / g.mini_batches  # TRL: the rollout's tokens / steps_per_generation per step
        self.groups: list[list[int]] = []  # micro-batch k -> rows
        self.steps: list[list[int]] = []  # optimizer step j -> its micro-batches k
        self.counts: list[tuple[float, float]] = []  # step j -> (seq_count, token_count)
        self.row_norm = torch.zeros(n) if kind.row_norms else None  # [N]
        self.pool = torch.zeros(n, dtype=torch.long)  # [N] entropy pool, numbered within its step
        for rows in minibatch_rows(n, g.mini_batches):
            local = split([len(comp.prompt_ids[i]) + lengths[i] for i in rows], budget)
            groups = [[rows[i] for i in grp] for grp in local]
            if sharded:  # every FSDP2 forward and backward is a collective: equal micro-batch counts on every rank
                groups = world.match_microbatches(groups)
            self.steps.append(list(range(len(self.groups), len(self.groups) + len(groups))))
            self.groups += groups
            self.counts.append(world.loss_counts(loss_type, len(rows), tokens))
            if kind.row_norms:
                self.row_norm[rows] = kind.row_norms(eff[rows], g.bnpo_batch_rows)
            self.pool[rows] = batch_ids(len(rows), g.bnpo_batch_rows)
        self.widths = [max(1, max(lengths[i] for i in rows)) for rows in self.groups]

    def pools_split(self, j: int) -> bool:
        """Whether a pool of step j spans several micro-batches (its quantile then needs a pass of its own)."""
        seen: dict[int, int] = {}
        for k in self.steps[j]:
            for i in self.groups[k]:
                if seen.setdefault(int(self.pool[i]), k) != k:
                    return True
        return False


def policy_update(model, optimizer, scheduler, ref: Reference, comp: Completions, adv: torch.Tensor,
                  cfg: Config, world: World = SINGLE, entropy_control: EntropyControl | None = None) -> dict:
    """num_iterations passes over one rollout (this rank's rows), each of mini_batches optimizer steps; returns this
    rank's averaged loss metrics. With several ranks, gradients are averaged over ranks before each step
    (distributed.py). The last step's gradients stay on the parameters: the caller frees them (generation wants the
    memory). The old log-probs are taken once, before the first step: the first mini-batch's from its own first
    pass (same dropout mask: its first ratio is exactly 1), the others' from a pass without gradient. With the
    engine's log-probs (Completions.logprobs) the policy term is weighted by the sampler correction and the mismatch
    is logged. No host sync inside the micro-batch loop: the rollout's tensors are read to the host once (the
    log-prob passes check each micro-batch's token ids on that copy), each micro-batch's inputs go to the GPU
    asynchronously (pinned), and the loss metrics and the gradient norm are summed on the device and read once at the
    end (top_entropy_quantile < 1 syncs once per optimizer step for its quantile, over TRL's pool).
    entropy_control (grpo.entropy_target; the caller's, updated in place): each optimizer step's bonus coefficient
    comes from it, and its measurement (one reduction over ranks and one host read per optimizer step) moves it;
    None with grpo.entropy_target set: a fresh one for this call (the trainer passes its own, which lives on)."""
    g, t = cfg.grpo, cfg.trainer
    device = next(p for p in model.parameters() if p.requires_grad).device
    scaler = loss_scaler(optimizer)  # fp16 compute: the loss scaled for the backward, gradients unscaled before clipping
    mask = comp.completion_mask.float().cpu()  # [N, T] host copies: one sync each, here
    ids = comp.completion_ids.cpu()  # [N, T]
    truncated, adv_host = comp.truncated.cpu(), adv.float().cpu()  # [N], [N]
    sampler = None if comp.logprobs is None else comp.logprobs.float().cpu()  # [N, T] the engine's log-probs
    lengths = [int(n) for n in mask.sum(1).tolist()]
    loss_params = LossParams.from_config(cfg)
    eff = effective_mask(mask, truncated, loss_params.mask_truncated)  # [N, T]
    budget = value(t.max_tokens_per_microbatch, "trainer.max_tokens_per_microbatch")
    chunk = value(t.logprob_chunk_size, "trainer.logprob_chunk_size")
    sharded = is_sharded(model)
    plan = _Plan(comp, eff, lengths, cfg, world, loss_params.loss_type, sharded, budget)
    groups, widths = plan.groups, plan.widths
    inputs = [dict(advantages=to_device(adv_host[rows], device), mask=to_device(mask[rows, :w], device),
                   truncated=to_device(truncated[rows], device),
                   row_norm=None if plan.row_norm is None else to_device(plan.row_norm[rows], device),
                   sampler=None if sampler is None else to_device(sampler[rows, :w], device),
                   eff=to_device(eff[rows, :w], device))
              for rows, w in zip(groups, widths)]

    def logp_of(m, k: int, with_entropy: bool | str = False):  # [len(rows), T_rows] (and entropy, same shape)
        rows = groups[k]
        return completion_logprobs(m, [comp.prompt_ids[i] for i in rows], ids[rows, :widths[k]],
                                   chunk_size=chunk, temperature=max(cfg.generation.temperature, 1e-6),
                                   with_entropy=with_entropy,
                                   lengths=[lengths[i] for i in rows] if t.pack_sequences else None)

    fixed: dict[str, dict[int, torch.Tensor]] = {"old": {}, "ref": {}, "weight": {}}
    mismatch: list[dict] = []
    first = set(plan.steps[0])  # the first step's old log-probs come from its own first pass
    own_old = g.num_iterations > 1 or g.mini_batches > 1
    with torch.no_grad():
        for k in range(len(groups)):
            if g.beta > 0:
                with ref.context(model) as rm:
                    fixed["ref"][k] = logp_of(rm, k)
            if own_old and k not in first:
                fixed["old"][k] = logp_of(model, k)

    def behaviour(k: int, logp: torch.Tensor) -> None:  # the old log-probs of micro-batch k are known: the correction
        if k in fixed["weight"] or inputs[k]["sampler"] is None:
            return
        x = inputs[k]
        fixed["weight"][k] = sampler_weights(logp, x["sampler"], x["eff"], loss_params.sampler_correction,
                                             loss_params.sampler_correction_max, loss_params.sampler_correction_min)
        mismatch.append(mismatch_stats(logp, x["sampler"], x["eff"]))

    entropy_control = entropy_control or EntropyControl.from_config(cfg)
    # adaptive control may apply a bonus at any step, so its entropy always carries the gradient
    entropy_grad = "grad" if loss_params.entropy_coef or entropy_control is not None else True
    optimizer_steps = g.num_iterations * len(plan.steps)
    sums: dict[str, torch.Tensor] = {}  # on the device until the end
    coefs: list[float] = []  # the coefficient after each optimizer step (adaptive control; logged as TRL logs it)
    for it in range(g.num_iterations):
        for j, step in enumerate(plan.steps):
            optimizer.zero_grad(set_to_none=True)
            if entropy_control is not None:  # the same coefficient for every micro-batch of the step
                loss_params = dataclasses.replace(loss_params, entropy_coef=entropy_control.applied())
            measured = torch.zeros(2, dtype=torch.float64, device=device)  # [2] entropy sum, tokens of this step
            thresholds = _entropy_thresholds(plan, j, model, logp_of, inputs, loss_params, world)
            for k in step:
                logp, entropy = logp_of(model, k, with_entropy=entropy_grad)  # entropy: logged, quantile, bonus
                if own_old and k in first and it == 0:
                    fixed["old"][k] = logp.detach()
                behaviour(k, fixed["old"].get(k, logp.detach()))
                x = inputs[k]
                seq_count, token_count = plan.counts[j]
                if loss_params.top_entropy_quantile < 1.0:  # each row's quantile over its pool
                    threshold = thresholds[groups[k]] if thresholds is not None else _local_thresholds(
                        entropy.detach(), x["eff"].bool(), [int(plan.pool[i]) for i in groups[k]],
                        loss_params.top_entropy_quantile)
                else:
                    threshold = None
                loss, m = grpo_loss(logp, fixed["old"].get(k), fixed["ref"].get(k), x["advantages"], x["mask"],
                                    loss_params, token_count=token_count, seq_count=seq_count, row_norm=x["row_norm"],
                                    truncated=x["truncated"], entropy=entropy, entropy_threshold=threshold,
                                    sampling_weight=fixed["weight"].get(k), logp_sampler=x["sampler"],
                                    metrics_on_device=True)
                (scaler.scale(loss) if scaler is not None else loss).backward()
                bonus = m.pop(BONUS_ENTROPY), m.pop(BONUS_TOKENS)  # (not logged)
                if entropy_control is not None:
                    measured += torch.stack(bonus).double()
                # token sums: token-weighted means over micro-batches and ranks below; the loss: a mean over steps
                for key, v in m.items():
                    sums[key] = sums[key] + v / g.num_iterations if key in sums else v / g.num_iterations
                sums[M.LOSS] = sums.get(M.LOSS, 0.0) + loss.detach() / optimizer_steps
            params = [p for p in model.parameters() if p.requires_grad]
            if not sharded:  # (FSDP2 reduce-scatters, averaging over ranks, in every backward)
                world.all_reduce_grads(params)  # after the last micro-batch: ranks may run different numbers of them
            if scaler is not None:  # after the reduction: an inf on any rank is on every rank, which all skip alike
                scaler.unscale_(optimizer)
            # the global norm, also over FSDP2's DTensor gradients (a replicated DTensor: the same float on every
            # rank); max_grad_norm=0 means no clipping (torch would scale every gradient to 0)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm or float("inf"))
            grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
            _step(optimizer, scheduler, scaler, sums, device)
            if g.ref_sync_steps and scheduler.last_epoch % g.ref_sync_steps == 0:  # TRL: at global_step multiples
                ref.sync(model, g.ref_sync_alpha)
            sums[M.GRAD_NORM] = sums.get(M.GRAD_NORM, 0.0) + grad_norm.detach().float() / optimizer_steps
            if entropy_control is not None:  # sum and token count reduced jointly: the global token mean
                entropy_control.observe(*world.all_sum(measured).tolist())
                coefs.append(entropy_control.coef)
    host = dict(zip(sums, torch.stack([v.float().to(device) for v in sums.values()]).tolist()))  # the one read
    # every rank returns the global token means (TRL's global_masked_mean); the mean over ranks of sums is sum / W
    summed = world.reduce_metrics({k: v for k, v in host.items() if k.endswith("_sum") or k == M.NUM_TOKENS})
    means = {**token_means(summed), M.NUM_TOKENS: summed[M.NUM_TOKENS] * world.size}  # tokens in the loss, all ranks
    if coefs or loss_params.entropy_coef:  # the same on every rank
        means[M.ENTROPY_COEF] = sum(coefs) / len(coefs) if coefs else loss_params.entropy_coef
    return {**{k: v for k, v in host.items() if k not in summed}, **means, **_mismatch_metrics(mismatch, world)}


def _entropy_thresholds(plan: _Plan, j: int, model, logp_of, inputs, params: LossParams,
                        world: World) -> torch.Tensor | None:
    """Each row's entropy quantile [N] for optimizer step j, taken as TRL takes it: over the tokens of its pool (TRL's
    micro-batch, grpo.bnpo_batch_rows rows of the step) pooled over ranks, with the current policy. None where each
    pool lies in one micro-batch of one rank (`_local_thresholds` takes it there, from the pass that runs anyway);
    else from a pass without gradient over the step's micro-batches (the price of a quantile that does not depend
    on trainer.max_tokens_per_microbatch)."""
    if params.top_entropy_quantile >= 1.0 or (not world.distributed and not plan.pools_split(j)):
        return None
    pooled: dict[int, list[torch.Tensor]] = {}
    with torch.no_grad():
        for k in plan.steps[j]:
            _, entropy = logp_of(model, k, with_entropy=True)  # [B, T]
            keep = inputs[k]["eff"].bool()
            for r, i in enumerate(plan.groups[k]):
                pooled.setdefault(int(plan.pool[i]), []).append(entropy[r][keep[r]].float().cpu())
    local = {p: torch.cat(v) for p, v in pooled.items()}
    everyone = world.gather_objects([local])  # TRL gathers each micro-batch's entropies over processes
    values = {p: torch.cat([part[p] for part in everyone if p in part]) for p in local}
    thresholds = torch.zeros(plan.pool.shape[0])
    for i in set(i for k in plan.steps[j] for i in plan.groups[k]):
        q = entropy_threshold(values[int(plan.pool[i])], params.top_entropy_quantile)
        thresholds[i] = float("inf") if q is None else q
    return thresholds


def _local_thresholds(entropy: torch.Tensor, keep: torch.Tensor, pools: list[int], q: float) -> torch.Tensor:
    """[B] each row's entropy quantile over the rows of its pool in this micro-batch (which holds the whole pool)."""
    out = torch.empty(len(pools), device=entropy.device)
    for pool in set(pools):
        rows = [r for r, p in enumerate(pools) if p == pool]
        value = entropy_threshold(entropy[rows][keep[rows]], q)
        out[rows] = float("inf") if value is None else value
    return out


def _mismatch_metrics(parts: list[dict], world: World) -> dict:
    """The sampler-trainer mismatch over the rollout and all ranks: mean and max |delta log p|, the token ratio's
    mean, std, min and max (`sampler/*`); nothing where the backend returned no log-probs."""
    if not parts:  # (every rank runs the same backend: all return log-probs or none does)
        return {}
    total = {key: torch.stack([p[key] for p in parts]) for key in parts[0]}
    sums = world.reduce_metrics({k: float(total[k].sum()) for k in ("abs", "dev", "dev_sq", "tokens")})
    highs = world.reduce_metrics({"abs_max": float(total["abs_max"].max()), "ratio_max": float(total["ratio_max"].max()),
                                  "neg_ratio_min": -float(total["ratio_min"].min())}, op="max")
    n = max(sums["tokens"], 1.0)
    dev = sums["dev"] / n  # mean of r - 1
    return {M.SAMPLER_LOGP_DIFF: sums["abs"] / n, M.SAMPLER_LOGP_DIFF_MAX: highs["abs_max"],
            M.SAMPLER_RATIO_MEAN: 1 + dev, M.SAMPLER_RATIO_STD: max(sums["dev_sq"] / n - dev * dev, 0.0) ** 0.5,
            M.SAMPLER_RATIO_MIN: -highs["neg_ratio_min"], M.SAMPLER_RATIO_MAX: highs["ratio_max"]}


def release_memory(cfg: Config, model) -> bool:
    """generation.release_memory, its null resolved: on for a 4/8-bit base (the notebook's NF4 + LoRA: the fast
    engine's dequantised copy, 2.4 GiB at 1.5B, would otherwise sit through the update: peak 6.78 -> 4.98 GiB
    on the H200 for ~0.1 s per step: 35 ms in the update, 60 ms in the next generate, a graph re-capture included,
    docs/benchmarks.md), off otherwise."""
    on = cfg.generation.release_memory
    return is_quantized(model) if on in (None, AUTO) else on


def update_stage(model, optimizer, scheduler, ref: Reference, comp: Completions, adv: torch.Tensor, cfg: Config,
                 world: World = SINGLE, rollout=None, entropy_control: EntropyControl | None = None) -> dict:
    """The trainer's update stage (after its seeding): with generation.release_memory the rollout backend's KV cache
    and owned weight copies are freed first (the update's activations get their memory); policy_update; the
    gradients freed (generation gets theirs); the backend's weights synced (the released copies come back).
    Returns the update's metrics and the learning rate. Benchmarks call it."""
    if rollout is not None and release_memory(cfg, model) and hasattr(rollout, "release"):
        rollout.release(weights=True)
    metrics = policy_update(model, optimizer, scheduler, ref, comp, adv, cfg, world, entropy_control=entropy_control)
    optimizer.zero_grad(set_to_none=True)
    metrics = {**metrics, M.LR: scheduler.get_last_lr()[0]}
    if rollout is not None:
        rollout.sync_weights(model)
    return metrics
