"""The life of the `fast` engine's generation weights across training steps: what the trainer's update does to
them and how the engine notices.

- `param_pointers`: the model's parameter addresses; if one moved (reassigned, cast, re-sharded), the engine
  re-extracts its weights instead of refilling them.
- `release_owned` / `reclaim_owned` / `owned_pointers` (`generation.release_memory`): the owned copies' memory
  given to the update and taken back before the next rollout; a copy that came back at another address makes the
  engine re-capture its CUDA graphs (they hold addresses).
- `merge_in_place` / `restore` (`lora_merge=in_place`): the LoRA deltas added into the base weights for sampling
  and the base copied back from its host snapshot afterwards.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .fast_weights import GenWeights, active_adapters


def param_pointers(model: nn.Module) -> list[int]:
    """Storage addresses of all parameters: if one moves (reassigned, cast, moved), the engine must re-extract."""
    return [p.data_ptr() for p in model.parameters()]


def release_owned(w: GenWeights) -> None:
    """Free the memory of every owned buffer (the tensors stay, with empty storage) for a training update: the
    merged / dequantised copy is recomputed from the model after the optimizer step anyway (`reclaim_owned`)."""
    for dst, _ in w.recipes:
        dst.untyped_storage().resize_(0)


def reclaim_owned(w: GenWeights) -> bool:
    """Give released owned buffers their memory back (contents undefined: refill next); True if any was released.
    Views of a buffer stay valid; its address may change, so captured graphs must be checked (`owned_pointers`)."""
    released = [dst for dst, _ in w.recipes if dst.untyped_storage().nbytes() == 0 and dst.numel()]
    for dst in released:  # every owned buffer is a whole torch.empty allocation: numel * element size bytes
        dst.untyped_storage().resize_(dst.numel() * dst.element_size())
    return bool(released)


def owned_pointers(w: GenWeights) -> tuple[int, ...]:
    return tuple(dst.data_ptr() for dst, _ in w.recipes)


@torch.no_grad()
def merge_in_place(w: GenWeights) -> None:
    """lora_merge=in_place: add every active LoRA delta into the base weight the engine reads."""
    for weight, lora, _ in w.in_place:
        for a in active_adapters(lora):
            weight.addmm_(lora.lora_B[a].weight.to(weight.dtype), lora.lora_A[a].weight.to(weight.dtype),
                          alpha=lora.scaling[a])


@torch.no_grad()
def restore(w: GenWeights) -> None:
    """Undo `merge_in_place` exactly: copy the base weights back from their host snapshots."""
    for weight, _, host in w.in_place:
        weight.copy_(host, non_blocking=True)  # stream-ordered: kernels queued after it see the base
