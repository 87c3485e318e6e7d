"""FSDP2 (`fully_shard`) for full fine-tuning over torchrun ranks (`trainer.fsdp`; the replicated scheme and the
collectives are in distributed.py).

    torchrun --nproc_per_node=4 -m mathgrpo train cfg.yaml model.lora=false     # sharded (trainer.fsdp=auto)

Full fine-tuning (model.lora=false) on several ranks is sharded (`trainer.fsdp=auto`, the default; `use_fsdp`):
`shard_model` makes every decoder layer an FSDP group and the causal LM the root group (embeddings, final norm
and lm_head, one group also when tied), so weights, gradients and AdamW state are split over ranks.
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
"""

from __future__ import annotations

import contextlib
import functools
import weakref
from typing import Callable, Iterator

import torch
import torch.distributed as tdist

from .distributed import World
from .modelinfo import SHARDED_LOGPROBS, is_peft


def use_fsdp(setting: str, lora: bool, world: World) -> bool:
    """trainer.fsdp -> whether to shard the policy: auto and on for full fine-tuning over several ranks (one rank
    has nothing to shard over), never with LoRA (auto keeps LoRA replicated; on says so), never with off."""
    if setting == "on" and lora:
        raise ValueError("trainer.fsdp=on shards full fine-tuning only, and model.lora=true: LoRA keeps a replica "
                         "on every rank (its gradients and Adam state are small, and sampling needs the whole "
                         "base anyway); set model.lora=false to shard, or trainer.fsdp=auto/off to replicate")
    return setting != "off" and not lora and world.distributed


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

    from .modelinfo import backbone_and_head

    body, _ = backbone_and_head(model)
    layers = getattr(body, "layers", None)
    if layers is None or is_peft(model):
        raise ValueError(f"trainer.fsdp: cannot shard {type(model).__name__}: FSDP2 sharding needs a plain causal LM "
                         f"(no peft wrapper) whose body lists its decoder layers in `.layers`; set trainer.fsdp=off")
    mesh = init_device_mesh(world.device.type, (world.size,))
    for layer in layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    model.fsdp_logprob_pass = functools.partial(_logprob_pass, model)
    register_fsdp_forward_method(model, "fsdp_logprob_pass")
    setattr(model, SHARDED_LOGPROBS, functools.partial(sharded_logprobs, model))  # what completion_logprobs calls


def _logprob_pass(model, *args, **kwargs) -> torch.Tensor:
    from .models import unsharded_completion_logprobs

    # a copy, not a view: FSDP hooks the output for the backward, and an in-place op on a view would lose the hook
    out = unsharded_completion_logprobs(model, *args, **kwargs)
    return tuple(t.clone() for t in out) if isinstance(out, tuple) else out.clone()  # (logp, entropy) or logp


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
