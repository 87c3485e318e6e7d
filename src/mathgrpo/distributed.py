"""Data-parallel GRPO over torchrun ranks: who does what, and the few collectives the loop needs.

    torchrun --nproc_per_node=4 -m mathgrpo train cfg.yaml           # 4 GPUs (NCCL) or 4 CPU processes (gloo)
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29400 \\
             --rdzv_id=JOB -m mathgrpo train cfg.yaml                   # 2 nodes (shared output_dir)

Without torchrun (no WORLD_SIZE > 1 in the environment) there is no process group and every helper
here is a no-op on `SINGLE`, so the one-process run is exactly the plain loop.

How a step is split. `trainer.prompts_per_step` is global: every rank draws the same global batch
from the seeded sampler and takes its contiguous share (`World.share`), so a group of G completions
never spans ranks and advantages stay rank-local. Each rank samples with its own seed (`rank_seed`):
a 2-rank run therefore samples different completions than a 1-rank run with the same config, and the
two agree on the *update* of a given rollout, not on the rollout (tests/test_distributed.py).

How gradients are combined. With LoRA (and with trainer.fsdp=off) every rank keeps a full replica of the
trainable weights and averages its gradients with the others after the last micro-batch of an optimizer step
(`all_reduce_grads`), the arithmetic of DistributedDataParallel without its wrapper. The DDP wrapper does not
fit this loop: the loss is computed from the body and lm_head weight called directly
(`models.completion_logprobs`, no full logits), not from `model.forward`, so DDP's forward never runs; and
ranks run different numbers of micro-batches (token-budgeted), which DDP only tolerates under `Join`. LoRA
gradients are a few MB, so overlapping their reduction with the backward pass would save nothing measurable.

Full fine-tuning (model.lora=false) on several ranks is sharded with FSDP2 instead (`trainer.fsdp`): fsdp.py.

How the loss is normalised (the contract of loss.py). One process over the global rows R (N rows,
T tokens) minimises L = sum_{i in R} l_i / D with D = N (grpo), T (dapo) or N * max_len (dr_grpo).
Rank r minimises L_r = sum_{i in R_r} l_i / D_r; the averaged gradient (1/W) sum_r grad L_r equals
grad L exactly when D_r = D / W, i.e. seq_count = N / W and token_count = T / W (`loss_counts`).
"bnpo" is normalised by the tokens of each rank's own local batches (TRL normalises it per process and
micro-batch; loss.bnpo_row_norms): its gradient is the mean of the ranks' own token-mean gradients, equal to
the 1-rank gradient only when ranks hold equal token counts. "scale_rewards=batch" divides by the std of
the global batch: the trainer gathers every rank's rewards before computing advantages (sampling.rank_advantages).
The logged loss is the mean of the ranks' losses, which is L.

Eval sharding: `shard(items, rank, world)` splits contiguously, `gather_objects(items)` concatenates
every rank's list in rank order on all ranks, so `gather_objects(shard(xs, r, w)) == xs`.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.distributed as tdist

from .loss import LOSS_TYPES
from .registry import lookup

RANK_SEED_STRIDE = 104_729_003  # far apart, so rank seeds and the trainer's seed + 1 never collide
BUCKET_BYTES = 32 << 20  # gradients are averaged in flat buckets of at most this size


@dataclass(frozen=True)
class World:
    """This process's place among the ranks; `SINGLE` (size 1) makes every collective a no-op."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")  # where collective tensors live (cuda:LOCAL_RANK under NCCL)

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # --- splitting the work ---------------------------------------------------------------------------

    def share(self, prompts_per_step: int) -> int:
        """Prompts per rank; the global batch must split evenly so every rank runs whole groups."""
        if prompts_per_step % self.size:
            raise ValueError(f"trainer.prompts_per_step={prompts_per_step} does not split over {self.size} ranks: "
                             f"it is the global number of prompts per step and must be a multiple of the number "
                             f"of ranks (torchrun --nproc_per_node x --nnodes)")
        return prompts_per_step // self.size

    def mine(self, batch: list) -> list:
        """This rank's contiguous share of the global batch (equal shares, see `share`)."""
        k = self.share(len(batch))
        return batch[self.rank * k:(self.rank + 1) * k]

    # --- collectives (no-ops on one rank) -------------------------------------------------------------

    def barrier(self) -> None:
        if self.distributed:
            tdist.barrier()

    def any(self, flag: bool) -> bool:
        """True on every rank if it is True on one (a stop signal seen by one rank stops them all together)."""
        if not self.distributed:
            return bool(flag)
        t = torch.tensor([float(flag)], device=self.device)
        tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
        return bool(t.item())

    def broadcast_object(self, obj):
        """Rank 0's `obj` on every rank (rank 0 decides the run dir, timestamps included)."""
        if not self.distributed:
            return obj
        box = [obj]
        tdist.broadcast_object_list(box, src=0)
        return box[0]

    def broadcast_params(self, params: list[torch.Tensor]) -> None:
        """Copy rank 0's values into every replica (as DDP does when it wraps a model). FSDP2 shards (DTensors)
        are not replicas, each rank holds its own part: they are left alone."""
        if self.distributed:
            with torch.no_grad():
                for p in params:
                    if not _is_dtensor(p):
                        tdist.broadcast(p.data, src=0)

    def gather_objects(self, items: list) -> list:
        """Every rank's `items` concatenated in rank order, on every rank."""
        if not self.distributed:
            return list(items)
        out: list = [None] * self.size
        tdist.all_gather_object(out, list(items))
        return [x for part in out for x in part]

    def loss_counts(self, loss_type: str, rows: int, tokens: float) -> tuple[float, float]:
        """(seq_count, token_count) to pass to every micro-batch's `grpo_loss` so that averaging the ranks'
        gradients gives the gradient over the global batch (see the module docstring)."""
        local = lookup(LOSS_TYPES, loss_type, "loss_counts: loss_type").local_tokens  # how its counts combine
        if not self.distributed:
            return float(rows), float(tokens)
        t = torch.tensor([float(rows), float(tokens)], dtype=torch.float64, device=self.device)
        tdist.all_reduce(t)
        seq_count, token_count = (t / self.size).tolist()
        return seq_count, float(tokens) if local else token_count

    def match_microbatches(self, groups: list[list[int]]) -> list[list[int]]:
        """`groups` (row indices per micro-batch) split until this rank runs as many micro-batches as the rank
        with the most: under FSDP2 every forward and backward is a collective (layer all-gathers, gradient
        reduce-scatters), so all ranks must run the same number of them. Ranks hold equally many rows, so the
        count never exceeds the rows; halving the largest micro-batch keeps every one within the token budget."""
        if not self.distributed:
            return groups
        t = torch.tensor([len(groups)], device=self.device)
        tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
        groups, target = list(groups), int(t.item())
        while len(groups) < target:
            i = max(range(len(groups)), key=lambda j: len(groups[j]))
            half = len(groups[i]) // 2
            groups[i:i + 1] = [groups[i][:half], groups[i][half:]]
        return groups

    def all_reduce_grads(self, params: list[torch.Tensor], bucket_bytes: int = BUCKET_BYTES) -> None:
        """Average the gradients of `params` over ranks in place, in flat buckets (DDP's arithmetic).
        A parameter without a gradient on this rank contributes zeros, so every rank sends the same buckets."""
        if not self.distributed:
            return
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        for bucket in _buckets([p.grad for p in params], bucket_bytes):
            flat = torch.cat([g.reshape(-1) for g in bucket])  # [sum numel]
            tdist.all_reduce(flat)
            flat.div_(self.size)  # gloo has no AVG op
            offset = 0
            for g in bucket:
                g.copy_(flat[offset:offset + g.numel()].view_as(g))
                offset += g.numel()

    def all_sum(self, t: torch.Tensor) -> torch.Tensor:
        """t summed over ranks (a copy on the collective device; t itself on one rank)."""
        if not self.distributed:
            return t
        out = t.to(self.device, copy=True)
        tdist.all_reduce(out)
        return out

    def reduce_metrics(self, metrics: dict[str, float], op: str = "mean") -> dict[str, float]:
        """Per-key mean (equal-sized ranks: the mean of rank means is the global mean) or max over ranks."""
        if not self.distributed:
            return dict(metrics)
        keys = sorted(metrics)  # the same order on every rank
        t = torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64, device=self.device)
        tdist.all_reduce(t, op={"mean": tdist.ReduceOp.SUM, "max": tdist.ReduceOp.MAX}[op])
        if op == "mean":
            t /= self.size
        values = dict(zip(keys, t.tolist()))
        return {k: values[k] for k in metrics}

    # --- set-up -----------------------------------------------------------------------------------------

    def model_device(self, device: str) -> str:
        """model.device for this rank: `auto`/`cuda` become cuda:LOCAL_RANK when ranks share a host's GPUs."""
        if self.device.type == "cuda" and device in ("auto", "cuda"):
            return f"cuda:{self.local_rank}"
        return device


SINGLE = World()


def _buckets(grads: list[torch.Tensor], limit: int) -> Iterator[list[torch.Tensor]]:
    """Consecutive runs of same-dtype/device gradients of at most `limit` bytes (a larger one goes alone)."""
    cur: list[torch.Tensor] = []
    size = 0
    for g in grads:
        n = g.numel() * g.element_size()
        if cur and (size + n > limit or g.dtype != cur[0].dtype or g.device != cur[0].device):
            yield cur
            cur, size = [], 0
        cur.append(g)
        size += n
    if cur:
        yield cur


def _is_dtensor(t) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def current() -> World:
    """The World of an already initialised process group, else SINGLE (for code that did not start it)."""
    if not (tdist.is_available() and tdist.is_initialized()) or tdist.get_world_size() == 1:
        return SINGLE
    local = int(os.environ.get("LOCAL_RANK", "0"))
    nccl = "nccl" in str(tdist.get_backend())  # "nccl", or "cpu:gloo,cuda:nccl" for a mixed group
    device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
    return World(tdist.get_rank(), tdist.get_world_size(), local, device)


@contextlib.contextmanager
def process_group(model_device: str = "auto") -> Iterator[World]:
    """The World this process runs in. Under torchrun with WORLD_SIZE > 1, start the process group (NCCL on
    CUDA with device LOCAL_RANK, gloo when the model runs on CPU) and end it on exit; join one that the
    caller already started; otherwise yield SINGLE and touch nothing."""
    if tdist.is_available() and tdist.is_initialized():
        yield current()
        return
    if env_world_size() <= 1:
        yield SINGLE
        return
    local = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and not model_device.startswith("cpu")
    if use_cuda:
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
        tdist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        tdist.init_process_group("gloo")
    try:
        yield World(tdist.get_rank(), tdist.get_world_size(), local, device)
    finally:
        tdist.destroy_process_group()


def rank_seed(seed: int, rank: int) -> int:
    """A deterministic seed per rank; rank 0 keeps `seed`, so a 1-rank run is the plain run."""
    return (seed + RANK_SEED_STRIDE * rank) % (2**31)


def batch_line(prompts_per_step: int, group: int, world: World, max_tokens: int, iterations: int,
               sharded: bool = False) -> str:
    """The start-up line that says what one step is, globally and per rank, and how the weights are held."""
    n = prompts_per_step * group
    how = ("weights, gradients and optimizer state sharded over ranks with FSDP2" if sharded
           else "replicated weights, gradients averaged over ranks")
    where = (f"over {world.size} ranks ({prompts_per_step // world.size} prompts / {n // world.size} completions "
             f"per rank; {how})" if world.distributed else "on 1 rank")
    steps = f"{iterations} optimizer step{'s' if iterations > 1 else ''}"
    return (f"global step = {prompts_per_step} prompts x G={group} = {n} completions {where}, "
            f"micro-batches of <= {max_tokens} tokens accumulated into {steps} per rollout")


# --- for sharded evaluation (any code running under torchrun) ---------------------------------------------

def shard(items: list, rank: int, world: int) -> list:
    """Contiguous share `rank` of `world` (sizes differ by at most one; the first ranks get the extra)."""
    if not 0 <= rank < world:
        raise ValueError(f"shard: rank {rank} is not in [0, {world})")
    q, r = divmod(len(items), world)
    start = rank * q + min(rank, r)
    return list(items[start:start + q + (rank < r)])


def gather_objects(items: list) -> list:
    """Every rank's picklable `items` concatenated in rank order, on every rank; `items` itself without a
    process group. `gather_objects(shard(xs, rank, world)) == xs`."""
    return current().gather_objects(items)
