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

Full fine-tuning (model.lora=false) on several ranks is sharded with FSDP2 (`trainer.fsdp=auto`, the default;
`use_fsdp`): `shard_model` makes every decoder layer an FSDP group and the causal LM the root group (embeddings,
final norm and lm_head, one group also when tied), so weights, gradients and AdamW state are split over ranks.
Each backward reduce-scatters the gradients, averaging over ranks as `all_reduce_grads` does, and clipping sees
the global norm of the DTensor gradients. Three places need care:
  - the log-prob pass, which never calls `model.forward`, runs as a registered forward method of the root, so
    the root group is gathered around it (`shard_model` says why); every forward and backward is a collective,
    so ranks run equally many micro-batches (`World.match_microbatches`);
  - sampling and evaluation run on the whole model gathered once (`gathered`, `GatheredRollout`), with no
    collective inside: ranks may generate different lengths and numbers of batches, and the `fast` backend
    reads plain tensors, re-read after each gathering;
  - checkpoints are gathered to rank 0 and written in the replicated layout, and scattered from rank 0 on load
    (`full_state_dicts`, `load_full_state_dicts`): a run resumes on any number of ranks, sharded or not.
The full fine-tuning reference model (beta > 0) is copied before sharding and sharded the same way. Every rank
still loads the whole model before sharding and holds it whole while sampling, so the saving is in the update:
gradients, Adam state and the reference are split (tests/test_fsdp.py checks the update against one rank's).

How the loss is normalised (the contract of loss.py). One process over the global rows R (N rows,
T tokens) minimises L = sum_{i in R} l_i / D with D = N (grpo), T (dapo) or N * max_len (dr_grpo).
Rank r minimises L_r = sum_{i in R_r} l_i / D_r; the averaged gradient (1/W) sum_r grad L_r equals
grad L exactly when D_r = D / W, i.e. seq_count = N / W and token_count = T / W (`loss_counts`).
"bnpo" keeps the rank-local token count (TRL normalises it per process): its gradient is the mean of
the ranks' own token-mean gradients, equal to the 1-rank gradient only when ranks hold equal token counts.
The logged loss is the mean of the ranks' losses, which is L.

Eval sharding: `shard(items, rank, world)` splits contiguously, `gather_objects(items)` concatenates
every rank's list in rank order on all ranks, so `gather_objects(shard(xs, r, w)) == xs`.
"""

from __future__ import annotations

import contextlib
import functools
import os
import weakref
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.distributed as tdist

# loss type -> whether its token count is rank-local (else global / W); see the module docstring.
LOCAL_TOKEN_COUNT: dict[str, bool] = {"grpo": False, "dr_grpo": False, "dapo": False, "bnpo": True}

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
        if loss_type not in LOCAL_TOKEN_COUNT:
            raise ValueError(f"loss_counts: unknown loss_type {loss_type!r}; known: {sorted(LOCAL_TOKEN_COUNT)} "
                             f"(a new loss type must say in distributed.LOCAL_TOKEN_COUNT how its counts combine)")
        if not self.distributed:
            return float(rows), float(tokens)
        t = torch.tensor([float(rows), float(tokens)], dtype=torch.float64, device=self.device)
        tdist.all_reduce(t)
        seq_count, token_count = (t / self.size).tolist()
        return seq_count, float(tokens) if LOCAL_TOKEN_COUNT[loss_type] else token_count

    def match_microbatches(self, groups: list[list[int]]) -> list[list[int]]:
        """`groups` (row indices per micro-batch) split until this rank runs as many micro-batches as the rank
        with the most: under FSDP2 every forward and backward is a collective (layer all-gathers, gradient
        reduce-scatters), so all ranks must run the same number of them. Ranks hold equally many rows, so the
        count never exceeds the rows; halving the largest micro-batch keeps every one within the token budget."""
        if not self.distributed:
            return groups
        t = torch.tensor([len(groups)], device=self.device)
        tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
        groups = list(groups)
        while len(groups) < int(t.item()):
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


# --- FSDP2: full fine-tuning sharded over ranks ---------------------------------------------------------------

def use_fsdp(setting: str, lora: bool, world: World) -> bool:
    """trainer.fsdp -> whether to shard the policy: auto and on for full fine-tuning over several ranks (one rank
    has nothing to shard over), never with LoRA (auto keeps LoRA replicated; on says so), never with off."""
    if setting not in ("auto", "on", "off"):
        raise ValueError(f"trainer.fsdp: {setting!r} is not one of auto, on, off")
    if setting == "on" and lora:
        raise ValueError("trainer.fsdp=on shards full fine-tuning only, and model.lora=true: LoRA keeps a replica "
                         "on every rank (its gradients and Adam state are small, and sampling needs the whole "
                         "base anyway); set model.lora=false to shard, or trainer.fsdp=auto/off to replicate")
    return setting != "off" and not lora and world.distributed


def _is_dtensor(t) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def is_sharded(model) -> bool:
    """True for a model that `shard_model` sharded (its parameters are DTensor shards outside `gathered`)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def shard_model(model, world: World) -> None:
    """FSDP2 in place over all ranks: one group per decoder layer, then the root (the causal LM itself) whose group
    holds every other parameter: embeddings, final norm and lm_head, so a tied lm_head (one Parameter shared with
    the embeddings) stays in one group. Parameters become DTensors sharded on dim 0; gradients and the optimizer
    state built on them are sharded the same way, and each backward reduce-scatters gradients, averaging them
    over ranks (the mean of `all_reduce_grads`, so the `loss_counts` contract is unchanged).

    The log-prob pass (`models.completion_logprobs`) calls the decoder body and the lm_head weight directly,
    never `model.forward`, so the root's forward hooks would not gather the root group and it would meet DTensor
    shards. It is therefore registered as a forward method of the root (`register_fsdp_forward_method`): the
    root group is gathered around it, stays gathered through its backward (FSDP2 never reshards the root after
    forward) and is reduce-scattered and resharded after it, as for `model.forward`; the layers gather and free
    themselves in their own forward and backward hooks. The root runs first in every pass, so it is the state
    FSDP2 initialises as the root."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    from .models import backbone_and_head

    body, _ = backbone_and_head(model)
    layers = getattr(body, "layers", None)
    if layers is None or hasattr(model, "peft_config"):
        raise ValueError(f"trainer.fsdp: cannot shard {type(model).__name__}: FSDP2 sharding needs a plain causal LM "
                         f"(no peft wrapper) whose body lists its decoder layers in `.layers`; set trainer.fsdp=off")
    mesh = init_device_mesh(world.device.type, (world.size,))
    for layer in layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    model.fsdp_logprob_pass = functools.partial(_logprob_pass, model)
    register_fsdp_forward_method(model, "fsdp_logprob_pass")


def _logprob_pass(model, *args, **kwargs) -> torch.Tensor:
    from .models import unsharded_completion_logprobs

    # a copy, not a view: FSDP hooks the output for the backward, and an in-place op on a view would lose the hook
    return unsharded_completion_logprobs(model, *args, **kwargs).clone()


def sharded_logprobs(model, *args, **kwargs) -> torch.Tensor:
    """`models.completion_logprobs` of a sharded model (see `shard_model`). Every rank must run the same passes."""
    logp = model.fsdp_logprob_pass(*args, **kwargs)
    if not torch.is_grad_enabled() and model not in _GATHERED:
        model.reshard()  # no backward follows to free the root group (the reference and old log-prob passes)
        _forget_forward_order(model)
    return logp


_GATHERED: "weakref.WeakSet" = weakref.WeakSet()  # sharded models inside `gathered`


@contextlib.contextmanager
def gathered(model) -> Iterator[None]:
    """The whole of a sharded model unsharded on every rank for the duration, with no collective inside: for
    sampling and evaluation, where ranks run different numbers of forward passes (different lengths, batches)
    and backends read weight tensors directly. Every rank enters together. The layers are told not to reshard
    after their forward (FSDP2's per-layer hooks still run; their unshard is a no-op on gathered parameters),
    and `model.generate` does not sync ranks; on exit every group is resharded. Costs the full weights in memory
    while open, as a replica would. A no-op for a model that is not sharded, and inside another `gathered` of
    the same model."""
    if not is_sharded(model) or model in _GATHERED:
        yield
        return
    from torch.distributed.fsdp import FSDPModule

    groups = [m for m in model.modules() if isinstance(m, FSDPModule)]
    layers = [m for m in groups if m is not model]  # the root never reshards after forward: leave its setting
    for m in layers:
        m.set_reshard_after_forward(False, recurse=False)
    for m in groups:
        m.unshard()
    _GATHERED.add(model)
    try:
        yield
    finally:
        _GATHERED.discard(model)
        for m in groups:
            m.reshard()
        for m in layers:
            m.set_reshard_after_forward(True, recurse=False)
        _forget_forward_order(model)


def _forget_forward_order(model) -> None:
    """FSDP2 records every forward of a group (for backward prefetching) and clears the record in the backward;
    forward-only passes (sampling, the frozen reference) would grow it without end. Private attributes, guarded:
    a torch without them keeps the record, which only costs memory."""
    from torch.distributed.fsdp import FSDPModule

    for m in model.modules():
        if isinstance(m, FSDPModule):
            state = m._get_fsdp_state()
            order = getattr(getattr(state, "_comm_ctx", None), "post_forward_order", None)
            if order is not None:
                order.clear()
            groups = getattr(state, "_fsdp_param_groups", None) or [getattr(state, "_fsdp_param_group", None)]
            for group in groups:  # (one group per state before torch 2.12, a list since)
                getattr(group, "_post_forward_indices", []).clear()


class GatheredRollout:
    """A rollout backend over a sharded policy: each `generate` runs on the gathered model (`gathered`) after the
    backend's `sync_weights`, so backends that read weight tensors (fast) see plain tensors, never shards, and
    re-read them when FSDP re-allocated them. `sync_weights` outside generation is therefore deferred to the next
    `generate`; everything else (release, ...) is the backend's."""

    def __init__(self, backend, model):
        self.backend, self.model = backend, model

    def generate(self, prompt_ids, n, sampling):
        with gathered(self.model):
            self.backend.sync_weights(self.model)
            return self.backend.generate(prompt_ids, n, sampling)

    def sync_weights(self, model) -> None:
        self.model = model

    def __getattr__(self, name):
        return getattr(self.__dict__["backend"], name)


def rollout_for(model, make: Callable):
    """`make()` (a rollout backend on `model`) as it is, or for a sharded model built on the gathered weights and
    wrapped in `GatheredRollout`."""
    if not is_sharded(model):
        return make()
    with gathered(model):
        return GatheredRollout(make(), model)


def full_state_dicts(model, optimizer=None) -> tuple[dict | None, dict | None]:
    """A sharded model's (and optimizer's) full state dicts on rank 0's CPU, in the layout of the replicated path
    so that checkpoints do not depend on sharding: `model.state_dict()` without the keys of tied duplicates (as
    `save_pretrained` writes it) and `optimizer.state_dict()` keyed by parameter index. Other ranks get
    (None, None). A collective: every rank calls it."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)  # gathered one tensor at a time, to rank 0
    weights = get_model_state_dict(model, options=opts)
    optim = get_optimizer_state_dict(model, optimizer, options=opts) if optimizer is not None else None
    if tdist.get_rank() != 0:
        return None, None
    seen, tied = set(), set()  # the names of a shared Parameter after its first (lm_head.weight when tied)
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            tied.add(name)
        seen.add(id(p))
    weights = {k: v for k, v in weights.items() if k not in tied}
    if optim is not None:
        index = {fqn: i for i, fqn in enumerate(f for g in optim["param_groups"] for f in g["params"])}
        optim = {"state": {index[f]: s for f, s in optim["state"].items()},
                 "param_groups": [{**g, "params": [index[f] for f in g["params"]]} for g in optim["param_groups"]]}
    return weights, optim


def load_full_state_dicts(model, optimizer, weights: dict | None, optim: dict | None) -> None:
    """The inverse of `full_state_dicts`: rank 0 passes the full state dicts (replicated layout), the other ranks
    None; rank 0's tensors are broadcast and every rank keeps its shard. A collective: every rank calls it."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)

    opts = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    set_model_state_dict(model, weights or {}, options=opts)
    if optimizer is None:
        return
    if optim is not None:  # parameter index -> name, in the optimizer's own parameter order
        names = {id(p): n for n, p in model.named_parameters()}
        fqns = [names[id(p)] for g in optimizer.param_groups for p in g["params"]]
        optim = {"state": {fqns[i]: s for i, s in optim["state"].items()},
                 "param_groups": [{**g, "params": [fqns[i] for i in g["params"]]} for g in optim["param_groups"]]}
    set_optimizer_state_dict(model, optimizer, optim or {}, options=opts)


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


def is_main() -> bool:
    """True on rank 0 (or without a process group): the rank that writes files."""
    return current().is_main
