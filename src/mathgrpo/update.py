"""The update stage: num_iterations optimizer steps over one rollout, in token-budgeted micro-batches.

    optimizer, scheduler = make_optimizer(model, cfg)
    metrics = policy_update(model, optimizer, scheduler, ref, completions, advantages, cfg, world)
    optimizer.zero_grad(set_to_none=True)     # the caller frees the last gradients (the trainer does)

policy_update leaves the last iteration's gradients (averaged over ranks, clipped) on the parameters, so tests
and benchmarks read them directly; the trainer's update stage frees them before the next generation.
"""

from __future__ import annotations

import math

import torch

from . import metrics as M
from .config import Config
from .distributed import SINGLE, World
from .fsdp import is_sharded
from .loss import LOSS_TYPES, LossParams, effective_mask, grpo_loss, token_means
from .modelinfo import is_quantized
from .models import Reference, completion_logprobs
from .packing import packed_microbatches, to_device
from .rollout import Completions


def make_optimizer(model, cfg: Config):
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("no trainable parameters: enable model.lora or full fine-tuning")
    t = cfg.trainer
    opt = torch.optim.AdamW(params, lr=t.learning_rate, betas=(t.adam_beta1, t.adam_beta2),
                            weight_decay=t.weight_decay)
    total = max(1, t.max_steps * cfg.grpo.num_iterations)

    def factor(i: int) -> float:
        if i < t.warmup_steps:
            return (i + 1) / (t.warmup_steps + 1)
        frac = (i - t.warmup_steps) / max(1, total - t.warmup_steps)
        return {"constant": 1.0, "linear": 1.0 - frac, "cosine": 0.5 * (1 + math.cos(math.pi * frac))}[t.lr_scheduler]

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


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


def policy_update(model, optimizer, scheduler, ref: Reference, comp: Completions, adv: torch.Tensor,
                  cfg: Config, world: World = SINGLE) -> dict:
    """num_iterations optimizer steps over one rollout (this rank's rows); returns this rank's averaged loss
    metrics. With several ranks, gradients are averaged over ranks before each step (distributed.py).
    The last iteration's gradients stay on the parameters: the caller frees them (generation wants the memory).
    No host sync inside the micro-batch loop: the rollout's tensors are read to the host once (the log-prob passes
    check each micro-batch's token ids on that copy), each micro-batch's inputs go to the GPU asynchronously (pinned), and the loss metrics and
    the gradient norm are summed on the device and read once at the end (top_entropy_quantile < 1 still
    syncs per micro-batch: its quantile is taken over a data-dependent selection)."""
    g, t = cfg.grpo, cfg.trainer
    device = next(p for p in model.parameters() if p.requires_grad).device
    mask = comp.completion_mask.float().cpu()  # [N, T] host copies: one sync each, here
    ids = comp.completion_ids.cpu()  # [N, T]
    truncated, adv_host = comp.truncated.cpu(), adv.float().cpu()  # [N], [N]
    n_rows = mask.shape[0]
    lengths = [int(n) for n in mask.sum(1).tolist()]
    split = packed_microbatches if t.pack_sequences else microbatches
    groups = split([len(p) + int(n) for p, n in zip(comp.prompt_ids, lengths)], t.max_tokens_per_microbatch)
    sharded = is_sharded(model)
    if sharded:  # every FSDP2 forward and backward is a collective: the same number of micro-batches on every rank
        groups = world.match_microbatches(groups)
    loss_params = LossParams.from_config(cfg)
    eff = effective_mask(mask, truncated, loss_params.mask_truncated)  # [N, T]
    tokens = float(eff.sum())
    seq_count, token_count = world.loss_counts(loss_params.loss_type, n_rows, tokens)
    row_norms = LOSS_TYPES[loss_params.loss_type].row_norms
    row_norm = row_norms(eff, g.bnpo_batch_rows) if row_norms else None  # [N]
    widths = [max(1, max(lengths[i] for i in rows)) for rows in groups]
    inputs = [dict(advantages=to_device(adv_host[rows], device), mask=to_device(mask[rows, :w], device),
                   truncated=to_device(truncated[rows], device),
                   row_norm=None if row_norm is None else to_device(row_norm[rows], device))
              for rows, w in zip(groups, widths)]

    def logp_of(m, k: int, with_entropy: bool = False):  # [len(rows), T_rows] (and entropy, same shape)
        rows = groups[k]
        return completion_logprobs(m, [comp.prompt_ids[i] for i in rows], ids[rows, :widths[k]],
                                   chunk_size=t.logprob_chunk_size, temperature=max(cfg.generation.temperature, 1e-6),
                                   with_entropy=with_entropy,
                                   lengths=[lengths[i] for i in rows] if t.pack_sequences else None)

    fixed: dict[str, dict[int, torch.Tensor]] = {"old": {}, "ref": {}}
    with torch.no_grad():
        for k in range(len(groups)):
            if g.beta > 0:
                with ref.context(model) as rm:
                    fixed["ref"][k] = logp_of(rm, k)
    sums: dict[str, torch.Tensor] = {}  # on the device until the end
    for it in range(g.num_iterations):
        optimizer.zero_grad(set_to_none=True)
        for k in range(len(groups)):
            logp, entropy = logp_of(model, k, with_entropy=True)  # entropy: logged, and top_entropy_quantile
            if it == 0 and g.num_iterations > 1:
                # The old policy is this iteration's policy: its log-probs are taken from this very pass (same
                # dropout mask, so the first ratio is exactly 1, and no extra forward pass).
                fixed["old"][k] = logp.detach()
            x = inputs[k]
            loss, m = grpo_loss(logp, fixed["old"].get(k), fixed["ref"].get(k), x["advantages"], x["mask"], loss_params,
                                token_count=token_count, seq_count=seq_count, row_norm=x["row_norm"],
                                truncated=x["truncated"], entropy=entropy, metrics_on_device=True)
            loss.backward()
            # token sums: token-weighted means over micro-batches and ranks below
            for key, v in {**m, M.LOSS: loss.detach()}.items():
                sums[key] = sums[key] + v / g.num_iterations if key in sums else v / g.num_iterations
        params = [p for p in model.parameters() if p.requires_grad]
        if not sharded:  # (FSDP2 reduce-scatters, averaging over ranks, in every backward)
            world.all_reduce_grads(params)  # after the last micro-batch: ranks may run different numbers of them
        # the global norm, also over FSDP2's DTensor gradients (a replicated DTensor: the same float on every rank);
        # max_grad_norm=0 means no clipping (torch would scale every gradient to 0)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm or float("inf"))
        grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
        optimizer.step()
        scheduler.step()
        sums[M.GRAD_NORM] = sums.get(M.GRAD_NORM, 0.0) + grad_norm.detach().float() / g.num_iterations
    host = dict(zip(sums, torch.stack([v.float().to(device) for v in sums.values()]).tolist()))  # the one read
    # every rank returns the global token means (TRL's global_masked_mean); the mean over ranks of sums is sum / W
    summed = world.reduce_metrics({k: v for k, v in host.items() if k.endswith("_sum") or k == M.NUM_TOKENS})
    means = {**token_means(summed), M.NUM_TOKENS: summed[M.NUM_TOKENS] * world.size}  # tokens in the loss, all ranks
    return {**{k: v for k, v in host.items() if k not in summed}, **means}


def release_memory(cfg: Config, model) -> bool:
    """generation.release_memory, its null resolved: on for a 4/8-bit base (the notebook's NF4 + LoRA: the fast
    engine's dequantised copy, 2.4 GiB at 1.5B, would otherwise sit through the update: peak 6.78 -> 4.98 GiB
    on the H200 for ~0.1 s per step: 35 ms in the update, 60 ms in the next generate, a graph re-capture included,
    docs/benchmarks.md), off otherwise."""
    on = cfg.generation.release_memory
    return is_quantized(model) if on is None else on


def update_stage(model, optimizer, scheduler, ref: Reference, comp: Completions, adv: torch.Tensor, cfg: Config,
                 world: World = SINGLE, rollout=None) -> dict:
    """The trainer's update stage (after its seeding): with generation.release_memory the rollout backend's KV cache
    and owned weight copies are freed first (the update's activations get their memory); policy_update; the
    gradients freed (generation gets theirs); the backend's weights synced (the released copies come back).
    Returns the update's metrics and the learning rate. Benchmarks call it."""
    if rollout is not None and release_memory(cfg, model) and hasattr(rollout, "release"):
        rollout.release(weights=True)
    metrics = policy_update(model, optimizer, scheduler, ref, comp, adv, cfg, world)
    optimizer.zero_grad(set_to_none=True)
    metrics = {**metrics, M.LR: scheduler.get_last_lr()[0]}
    if rollout is not None:
        rollout.sync_weights(model)
    return metrics
