"""Padding-free packing of an update micro-batch: its rows laid end to end as one sequence.

    logp = packed_completion_logprobs(model, prompts, completion_ids, lengths)   # [B, T], 0 after each row's end
    groups = packed_microbatches(total_lengths, budget)                          # rows per micro-batch

Each row is prompt + completion (its last token dropped: nothing is predicted from it); positions restart at 0
per row and attention stays inside each row, so every real token sees exactly what it sees in the padded
layout (`models.completion_hidden`) and the log-probs, loss and gradient are the padded ones (tests/
test_packing.py checks this for every loss type). What packing saves: the padding's share of every matmul,
of the attention and of the lm_head (log-probs are computed for real completion tokens only), and micro-
batches filled to the token budget instead of rows x longest row (fewer, larger kernels).

Attention inside rows: a registered transformers attention function ("mathgrpo_packed") that behaves as
sdpa for every ordinary call (generation, unpacked passes) and, when given the rows' cumulative offsets
(`cu_seq_lens_q`, transformers' own keyword for packed sequences), picks a layout per micro-batch
(`set_packed_attention`, `rows_layout`): rows of one length run as a dense [B, h, L, D] batch through sdpa (a
view, nothing copied: cuDNN's Hopper kernel, 1.56x the varlen kernel's speed on the 1.5B shape), mixed rows
are padded into such a batch only where that adds little attention work, and otherwise PyTorch's
FlashAttention-2 varlen kernel (`torch.nn.attention.varlen`, CUDA) runs, or, where that is missing or fails
its one-time check against SDPA, a causal SDPA call per row (CPU, and the fallback). Measured on the H200
(benchmarks/update.py --attention): on the uneven workload's mixed micro-batches FlexAttention with a
document block mask was ~15% faster than the varlen kernel (forward + backward) but needs torch.compile and
a block mask per micro-batch (7-12 ms to build); it is not wired in. cuDNN's own varlen forward took 40-70 ms.
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass

import torch

from .logprobs import check_token_ids, chunked_token_logprobs

log = logging.getLogger(__name__)

ATTN_NAME = "mathgrpo_packed"


# ----------------------------------------------------------------------------- micro-batches


def packed_microbatches(total_lengths: list[int], budget: int) -> list[list[int]]:
    """Row groups whose summed length stays within `budget` tokens (a longer row gets a group of its own):
    first-fit over rows sorted longest first, so groups are few and full. Within a group rows keep the
    order of their length (longest first)."""
    if budget < 1:
        raise ValueError(f"packed_microbatches: budget must be >= 1 token, got {budget}")
    order = sorted(range(len(total_lengths)), key=lambda i: -total_lengths[i])
    groups: list[list[int]] = []
    room: list[int] = []
    for i in order:
        n = total_lengths[i]
        k = next((j for j, r in enumerate(room) if r >= n), None)
        if k is None:
            groups.append([i])
            room.append(budget - n)
        else:
            groups[k].append(i)
            room[k] -= n
    return groups


# ----------------------------------------------------------------------------- layout


@dataclass
class PackedRows:
    """One micro-batch laid out as a single sequence of S tokens, M of them predicting a completion token."""

    input_ids: torch.Tensor  # [1, S]
    position_ids: torch.Tensor  # [1, S] 0.. per row
    cu_seqlens: torch.Tensor  # [B + 1] int32 row offsets into S
    max_len: int  # longest row
    predictors: torch.Tensor  # [M] positions in S whose hidden state predicts each real completion token
    targets: torch.Tensor  # [M] those completion tokens
    out_index: torch.Tensor  # [M] where each goes in the flattened [B, T] output
    shape: tuple[int, int]  # (B, T)
    row_lengths: tuple[int, ...] = ()  # [B] tokens per packed row (host)


def pack_rows(prompt_ids: list[list[int]], completion_ids: torch.Tensor, lengths: list[int],
              device: torch.device, vocab: int | None = None) -> PackedRows:
    """Layout of rows prompt_i + completion_i[:lengths_i - 1]; completion_ids [B, T] right-padded.
    vocab: check the completion tokens against it (ValueError naming the function)."""
    n_rows, width = completion_ids.shape
    if len(prompt_ids) != n_rows or len(lengths) != n_rows:
        raise ValueError(f"pack_rows: {len(prompt_ids)} prompts and {len(lengths)} lengths for {n_rows} rows")
    for i, (p, n) in enumerate(zip(prompt_ids, lengths)):
        if len(p) < 1:
            raise ValueError(f"pack_rows: prompt {i} is empty (need >= 1 token to predict from)")
        if not 0 <= n <= width:
            raise ValueError(f"pack_rows: row {i} has length {n}, outside [0, {width}]")
    comp = completion_ids.cpu()  # (the update passes its host copy: no sync)
    ids, pos, pred, tgt, out, cu = [], [], [], [], [], [0]
    for i, (p, n) in enumerate(zip(prompt_ids, lengths)):
        row = torch.cat([torch.as_tensor(p, dtype=torch.long), comp[i, :max(n - 1, 0)]])  # [P + n - 1]
        start = cu[-1]
        ids.append(row)
        pos.append(torch.arange(len(row)))
        pred.append(torch.arange(n) + start + len(p) - 1)  # state at p - 1 + t predicts token t
        tgt.append(comp[i, :n])
        out.append(torch.arange(n) + i * width)
        cu.append(start + len(row))
    targets = torch.cat(tgt)  # [M]
    if vocab is not None:
        check_token_ids(targets, vocab, "pack_rows (completion_ids)")  # on the host: no device sync
    cat = lambda xs: to_device(torch.cat(xs), device)  # noqa: E731
    return PackedRows(input_ids=cat(ids)[None], position_ids=cat(pos)[None],
                      cu_seqlens=to_device(torch.tensor(cu, dtype=torch.int32), device),
                      max_len=max(len(r) for r in ids), predictors=cat(pred), targets=to_device(targets, device),
                      out_index=cat(out), shape=(n_rows, width), row_lengths=tuple(len(r) for r in ids))


def to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on `device` without a host sync: on CUDA through pinned memory, asynchronously (PyTorch's
    pinned-memory cache keeps the buffer until the copy is done); a copy from pageable memory can block."""
    if torch.device(device).type == "cuda" and x.device.type == "cpu":
        return x.pin_memory().to(device, non_blocking=True)
    return x.to(device)


def no_mask_kwargs(body) -> dict:
    """Keyword for a decoder body's forward that skips transformers' mask construction where every layer is
    full causal attention: a mask dict given as `attention_mask` is used as it is, and None per layer type
    means plain causal attention (what `create_causal_mask` returns for unpadded rows anyway). Building it
    costs a device sync per forward (`find_packed_sequence_indices` tests its position ids on the host)."""
    types = getattr(body.config, "layer_types", None)
    return {"attention_mask": {"full_attention": None}} if types and set(types) == {"full_attention"} else {}


def packed_hidden(model, packed: PackedRows) -> torch.Tensor:
    """Final hidden states [M, H] of the packed rows at the positions that predict completion tokens."""
    from .modelinfo import backbone_and_head, compute_context

    body, _ = backbone_and_head(model)
    use_packed_attention(model)
    cu = packed.cu_seqlens
    layout = rows_layout(packed.row_lengths, packed.input_ids.device)
    _STATE["packed_pass"] = True  # no mask: transformers' packed-sequence mask would be a dense [S, S] one
    try:
        with compute_context(model):
            hidden = body(input_ids=packed.input_ids, position_ids=packed.position_ids, use_cache=False,
                          **no_mask_kwargs(body), **layout,
                          cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=packed.max_len,
                          max_length_k=packed.max_len).last_hidden_state  # [1, S, H]
    finally:
        _STATE["packed_pass"] = False
    return hidden[0].index_select(0, packed.predictors)  # [M, H]


def packed_completion_logprobs(model, prompt_ids: list[list[int]], completion_ids: torch.Tensor,
                               lengths: list[int], *, chunk_size: int = 1024, temperature: float = 1.0,
                               with_entropy: bool = False):
    """Log-probs [B, T] float32 as `models.completion_logprobs`, from one packed pass; 0 at t >= lengths[i].
    with_entropy: (log-probs, entropy [B, T]) as there, entropy 0 at t >= lengths[i] too."""
    from .modelinfo import backbone_and_head

    _, head = backbone_and_head(model)
    packed = pack_rows(prompt_ids, completion_ids, lengths, head.weight.device, vocab=head.weight.shape[0])
    sel = packed_hidden(model, packed)  # [M, H]
    out = chunked_token_logprobs(sel[None], head.weight, packed.targets[None], chunk_size=chunk_size,
                                 temperature=temperature, lm_head_bias=getattr(head, "bias", None),
                                 with_entropy=with_entropy, check_ids=False)
    n_rows, width = packed.shape

    def unpack(x: torch.Tensor) -> torch.Tensor:  # [1, M] -> [B, T]
        flat = torch.zeros(n_rows * width, dtype=x.dtype, device=x.device)
        return flat.scatter(0, packed.out_index, x[0]).reshape(n_rows, width)

    return (unpack(out[0]), unpack(out[1])) if with_entropy else unpack(out)


# ----------------------------------------------------------------------------- attention within rows


def _segment_attention(q, k, v, cu: list[int], scale: float | None) -> torch.Tensor:
    """Causal SDPA per row: q [H, S, D], k/v [Hkv, S, D] -> [H, S, D]."""
    outs = []
    for a, b in zip(cu[:-1], cu[1:]):
        outs.append(torch.nn.functional.scaled_dot_product_attention(
            q[None, :, a:b], k[None, :, a:b], v[None, :, a:b], is_causal=True, scale=scale,
            enable_gqa=q.shape[0] != k.shape[0])[0])
    return torch.cat(outs, dim=1)


_VARLEN: dict = {}  # "fn": callable or None once decided, "kw": its causal/GQA keywords
_STATE = {"packed_pass": False}  # inside `packed_hidden`'s forward (masks are built there, once per forward)


def _varlen_kwargs(fn) -> dict | None:
    params = inspect.signature(fn).parameters
    kw = {}
    if "is_causal" in params:
        kw["is_causal"] = True
    elif "window_size" in params:
        kw["window_size"] = (-1, 0)  # (left unbounded, right 0): causal
    else:
        return None
    if "enable_gqa" in params:
        kw["enable_gqa"] = True
    return kw


def call_varlen(fn, kw, q, k, v, cu, max_len, scale):  # q [S, H, D], k/v [S, Hkv, D] -> [S, H, D]
    """Causal varlen attention over the documents of cu (cumulative lengths, int32 [docs + 1]) with the kernel
    and keywords varlen_kernel() returned; K/V heads repeated where the kernel has no GQA. Public for
    benchmarks.update --attention, which times the kernel alone."""
    if not kw.get("enable_gqa") and k.shape[1] != q.shape[1]:
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    return fn(q, k, v, cu, cu, max_len, max_len, scale=scale, **kw)


def varlen_kernel():
    """PyTorch's varlen FlashAttention, checked once against per-row SDPA: (kernel, its causal/GQA keywords), or
    (None, kw) where absent or wrong (packing then uses per-row SDPA)."""
    if "fn" in _VARLEN:
        return _VARLEN["fn"], _VARLEN["kw"]
    fn, kw = None, None
    try:
        from torch.nn.attention.varlen import varlen_attn

        kw = _varlen_kwargs(varlen_attn)
        if kw is not None:
            g = torch.Generator(device="cuda").manual_seed(0)
            q = torch.randn(200, 4, 64, device="cuda", dtype=torch.bfloat16, generator=g)
            k, v = (torch.randn(200, 2, 64, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(2))
            cu = [0, 37, 150, 200]
            got = call_varlen(varlen_attn, kw, q, k, v, torch.tensor(cu, device="cuda", dtype=torch.int32), 113, None)
            want = _segment_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), cu, None).transpose(0, 1)
            err = (got.float() - want.float()).abs().max().item()
            if err < 2e-2:
                fn = varlen_attn
            else:
                log.warning("varlen attention differs from SDPA by %.3g: packing uses per-row SDPA", err)
    except Exception as e:  # noqa: BLE001  (absent in this torch, or no kernel for this GPU)
        log.warning("varlen attention unavailable (%s): packing uses per-row SDPA", str(e)[:200])
    _VARLEN.update(fn=fn, kw=kw)
    return fn, kw


ATTENTION_MODES = ("auto", "varlen", "padded", "rows")
# "auto" pads a micro-batch when B * L_max^2 <= this x sum(L_i^2): on the H200 cuDNN's causal kernel on a dense
# batch did a 1.5B layer's attention (forward + backward) 1.56x faster than the varlen FlashAttention-2 kernel on
# the same rows (0.93 vs 1.45 ms, 14 x 1,151 tokens); below that margin, for the gather copies, padding pays.
PAD_RATIO = 1.3
_MODE = {"mode": "auto", "pad_ratio": PAD_RATIO}


def set_packed_attention(mode: str, pad_ratio: float | None = None) -> None:
    """How packed rows attend. "auto": rows of one length run as a dense batch through sdpa (cuDNN's kernel on
    Hopper: no padding, no copy), mixed rows padded to the longest when that costs at most `pad_ratio` x the
    attention FLOPs of the rows themselves, else the varlen kernel; "varlen": the varlen kernel always (per-row
    SDPA where it is missing or fails its check); "padded": always the padded batch; "rows": per-row SDPA."""
    if mode not in ATTENTION_MODES:
        raise ValueError(f"set_packed_attention: {mode!r} is not one of {', '.join(ATTENTION_MODES)}")
    _VARLEN.clear()
    if mode == "rows":
        _VARLEN.update(fn=None, kw=None)
    _MODE.update(mode=mode, pad_ratio=PAD_RATIO if pad_ratio is None else float(pad_ratio))


def rows_layout(row_lengths: tuple[int, ...], device: torch.device) -> dict:
    """Attention keywords for one packed micro-batch (host arithmetic, no sync): `mathgrpo_rows` (B, L_max) and
    `mathgrpo_pad` ([B * L_max] positions in S of the padded batch; a padding slot repeats its row's first
    token: under causal attention no real token sees it and nothing flows back through it, and [S] where each
    real token sits in the padded batch) when the rows are to run as a padded batch; {} for the varlen kernel."""
    mode, n, longest = _MODE["mode"], len(row_lengths), max(row_lengths, default=0)
    if mode in ("varlen", "rows") or not n:
        return {}
    if n * longest == sum(row_lengths):
        return {"mathgrpo_rows": (n, longest)}  # one length: a view of the packed tensors, nothing padded
    if mode == "auto" and n * longest ** 2 > _MODE["pad_ratio"] * sum(k * k for k in row_lengths):
        return {}
    gather, place, start = [], [], 0
    for i, k in enumerate(row_lengths):
        gather += list(range(start, start + k)) + [start] * (longest - k)
        place += range(i * longest, i * longest + k)
        start += k
    return {"mathgrpo_rows": (n, longest), "mathgrpo_pad": (to_device(torch.tensor(gather), device),
                                                           to_device(torch.tensor(place), device))}


def batched_attention(module, query, key, value, rows: tuple[int, int], pad, scaling):
    """The packed rows as a [B, h, L_max, D] batch through transformers' sdpa (causal, no mask), back to [S, H, D]."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    n, longest = rows

    def batch(x):  # [1, h, S, D] -> [B, h, L, D], the layout of an ordinary (padded) forward
        x = x[0].transpose(0, 1)  # [S, h, D]
        if pad is not None:
            x = x.index_select(0, pad[0])  # [B * L, h, D]
        return x.view(n, longest, *x.shape[1:]).transpose(1, 2)

    out, _ = sdpa_attention_forward(module, batch(query), batch(key), batch(value), None, dropout=0.0,
                                    scaling=scaling)  # [B, L, H, D]
    out = out.reshape(n * longest, *out.shape[2:])  # [B * L, H, D]
    return out if pad is None else out.index_select(0, pad[1])  # [S, H, D]


def packed_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                             scaling: float | None = None, **kwargs):
    """transformers attention function: sdpa, unless called with `cu_seq_lens_q` (packed rows).
    query [1, H, S, D], key/value [1, Hkv, S, D] -> ([1, S, H, D], None)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    cu = kwargs.get("cu_seq_lens_q")
    if cu is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    if query.shape[0] != 1 or dropout:
        raise ValueError(f"packed attention: needs one packed sequence and no attention dropout "
                         f"(got batch {query.shape[0]}, dropout {dropout})")
    if "mathgrpo_rows" in kwargs:
        return batched_attention(module, query, key, value, kwargs["mathgrpo_rows"], kwargs.get("mathgrpo_pad"),
                                  scaling)[None], None
    fn, kw = varlen_kernel() if query.is_cuda else (None, None)
    if fn is not None:
        q, k, v = (x[0].transpose(0, 1) for x in (query, key, value))  # [S, H, D]
        out = call_varlen(fn, kw, q, k, v, cu, int(kwargs["max_length_q"]), scaling)  # [S, H, D]
    else:
        out = _segment_attention(query[0], key[0], value[0], cu.tolist(), scaling).transpose(0, 1)  # [S, H, D]
    return out[None], None


def _packed_or_sdpa_mask(*args, **kwargs):
    """transformers mask function: none for a packed pass (rows are kept apart by their offsets), else sdpa's."""
    from transformers.masking_utils import sdpa_mask

    return None if _STATE["packed_pass"] else sdpa_mask(*args, **kwargs)


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTN_NAME, packed_attention_forward)
    AttentionMaskInterface.register(ATTN_NAME, _packed_or_sdpa_mask)


def use_packed_attention(model) -> None:
    """Switch an sdpa model to the packed-aware attention function (idempotent; sdpa for ordinary calls)."""
    from .modelinfo import ModelError, backbone_and_head

    body, _ = backbone_and_head(model)
    cfg = body.config
    impl = getattr(cfg, "_attn_implementation", None)
    if impl == ATTN_NAME:
        return
    if impl != "sdpa":
        raise ModelError(f"trainer.pack_sequences needs model.attn_implementation=sdpa (this model uses {impl!r}); "
                         f"set trainer.pack_sequences=false or use sdpa")
    if "sliding_attention" in (getattr(cfg, "layer_types", None) or []):
        raise ModelError("trainer.pack_sequences: this model has sliding-window layers, which packing does not "
                         "implement; set trainer.pack_sequences=false")
    _register()
    cfg._attn_implementation = ATTN_NAME  # read at every call by the attention modules and the mask builder
