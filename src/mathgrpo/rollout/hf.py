"""The `hf` rollout backend: transformers `generate` with its KV cache, all prompts batched at once.

Works on any device; the reference the `fast` CUDA backend is checked against.
"""

from __future__ import annotations

import time

import torch

from ..modelinfo import is_lora_layer, is_peft, is_quantized
from .base import Completions, SamplingConfig
from .common import finish_completions


class HFRollout:
    """`merge_lora`: with a peft policy, sample from a plain copy of the model whose weights are
    W + scale * B @ A, refreshed by `sync_weights` after each optimizer step. Unmerged LoRA runs two
    extra small matmuls per projection per token, which on CPU made sampling several times slower;
    the copy costs one more set of base weights in memory (generation.backend=hf_unmerged avoids it)."""

    def __init__(self, model, tokenizer, max_batch: int = 256, merge_lora: bool = True):
        self.tokenizer = tokenizer
        self.max_batch = max_batch
        self.merge_lora = merge_lora
        self._merged = None
        self.sync_weights(model)

    def sync_weights(self, model) -> None:
        self.policy = model
        if not (self.merge_lora and is_peft(model)) or is_quantized(model):
            self.model = model  # generate() runs on the live policy: nothing to copy
            return
        if self._merged is None:
            import copy

            self._merged = copy.deepcopy(model).merge_and_unload().eval().requires_grad_(False)
        _copy_merged_weights(model, self._merged)  # also right when made inside `disable_adapter()`
        self.model = self._merged

    @torch.no_grad()
    def generate(self, prompt_ids: list[list[int]], n: int, sampling: SamplingConfig) -> Completions:
        t0 = time.perf_counter()
        tok = self.tokenizer
        rows = [p for p in prompt_ids for _ in range(n)]  # prompt-major
        device = next(self.model.parameters()).device
        eos = _eos_ids(self.model, tok)
        was_training = self.model.training
        self.model.eval()  # no LoRA dropout while sampling
        if sampling.seed is not None:
            torch.manual_seed(sampling.seed)
        outs = []
        try:
            for start in range(0, len(rows), self.max_batch):
                chunk = rows[start:start + self.max_batch]
                width = max(len(r) for r in chunk)
                ids = torch.full((len(chunk), width), tok.pad_token_id, dtype=torch.long)
                att = torch.zeros((len(chunk), width), dtype=torch.long)
                for i, r in enumerate(chunk):
                    ids[i, width - len(r):] = torch.tensor(r)
                    att[i, width - len(r):] = 1
                # synced_gpus: transformers turns it on for FSDP models (every rank steps until all are done, an
                # all-reduce per token); ranks sample independently here, on gathered weights (fsdp.gathered)
                kw = dict(max_new_tokens=sampling.max_new_tokens, pad_token_id=tok.pad_token_id,
                          eos_token_id=eos, use_cache=True, synced_gpus=False)
                if sampling.temperature > 0:
                    kw.update(do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p,
                              top_k=sampling.top_k or None)
                else:
                    kw.update(do_sample=False, temperature=None, top_p=None, top_k=None)
                if sampling.temperature > 0 and sampling.min_p > 0:
                    kw["min_p"] = sampling.min_p
                if sampling.repetition_penalty != 1.0:
                    kw["repetition_penalty"] = sampling.repetition_penalty
                if sampling.ignore_eos:
                    kw["min_new_tokens"] = sampling.max_new_tokens
                if sampling.stop_strings:
                    kw.update(stop_strings=list(sampling.stop_strings), tokenizer=tok)
                seq = self.model.generate(input_ids=ids.to(device), attention_mask=att.to(device), **kw)
                outs.append(seq[:, width:].cpu())
        finally:
            self.model.train(was_training)
        width = max(o.shape[1] for o in outs)
        gen = torch.full((len(rows), width), tok.pad_token_id, dtype=torch.long)
        pos = 0
        for o in outs:
            gen[pos:pos + o.shape[0], :o.shape[1]] = o
            pos += o.shape[0]
        stop_ids = set() if sampling.ignore_eos else set(eos)
        return finish_completions(rows, gen, tok, sampling, stop_ids, time.perf_counter() - t0)


@torch.no_grad()
def _copy_merged_weights(peft_model, merged) -> None:
    """merged.<layer>.weight = base weight + LoRA delta, for every LoRA layer of the live policy."""
    targets = dict(merged.named_modules())
    prefix = "base_model.model."
    for name, mod in peft_model.named_modules():
        if not is_lora_layer(mod):
            continue
        dst = targets[name[len(prefix):] if name.startswith(prefix) else name]
        w = mod.get_base_layer().weight.detach().clone()
        # inside `with model.disable_adapter()` (the base-model evaluation) the copy must be the bare base
        for adapter in () if mod.disable_adapters else mod.active_adapters:
            if adapter in mod.lora_A:
                w += mod.get_delta_weight(adapter).to(w.dtype)
        dst.weight.copy_(w)


def _eos_ids(model, tok) -> list[int]:
    ids = set()
    gc = getattr(model, "generation_config", None)
    for src in (getattr(gc, "eos_token_id", None), tok.eos_token_id):
        if isinstance(src, int):
            ids.add(src)
        elif src:
            ids.update(src)
    return sorted(ids)
