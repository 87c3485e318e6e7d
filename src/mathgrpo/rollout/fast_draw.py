"""One-launch token draw for the `fast` engine on CUDA: greedy or plain temperature sampling over logits [B, V].

    tok, logp = draw(logits, temperature, generator)    # what fast_sampling.pick gives, in one kernel

Why hand-written: at decode time the draw reads a [B, V] logits block (B = 1-256 rows, V = 152k for Qwen) once
per step, and the torch path spends ~95 us a step at 8 rows on the H200 (5% of the step): an Exp(1) noise kernel
writing [B, V] fp32 (37 us), then the compiled argmax and logsumexp reductions, which run one program per row
over the whole vocabulary and so leave the GPU nearly idle at small B. Here the grid is (rows, vocabulary chunks):
each program loads one chunk of logits, scales it by 1 / temperature, draws its own Gumbel noise (Triton's
counter-based Philox `tl.rand`, keyed by a seed drawn from the caller's torch.Generator and the element's index:
no noise tensor), and keeps the chunk's max, sum of exponentials and best perturbed score; the last chunk of a row
to finish (an arrival counter, fast_kernels.counters) merges them into the token (argmax of logits/T + Gumbel:
an exact categorical draw, first index on ties, as torch.argmax) and its log-prob under softmax(logits / T)
(raw logits when greedy), the quantities fast_sampling.pick returns.

The random stream differs from the torch path's (same distribution, other draws), so a seed reproduces a run on
one path. top-k / top-p keep fast_sampling's torch path. CPU tests run it under TRITON_INTERPRET=1.
"""

from __future__ import annotations

import torch

from .fast_kernels import available, counters, triton

CHUNK = 4096  # vocabulary entries per program: 38 programs a row at V = 151,936

if triton is not None:
    import triton.language as tl

    @triton.jit
    def _draw_kernel(x_ptr, sx, V, inv_t, seed_ptr, part_ptr, cnt_ptr, tok_ptr, lp_ptr, NCH: tl.constexpr,
                     NCHP: tl.constexpr, CHUNK: tl.constexpr, NOISE: tl.constexpr):
        b = tl.program_id(0)
        c = tl.program_id(1)
        offs = c * CHUNK + tl.arange(0, CHUNK)
        ok = offs < V
        row = x_ptr + b.to(tl.int64) * sx
        x = tl.load(row + offs, mask=ok, other=float("-inf")).to(tl.float32) * inv_t  # [CHUNK]
        m = tl.max(x, 0)
        m_safe = tl.where(m == float("-inf"), 0.0, m)  # a chunk of -inf logits only: adds nothing
        s = tl.sum(tl.exp(x - m_safe), 0)
        if NOISE:  # Gumbel(0, 1) = -log(-log(u)), u uniform in [0, 1): u = 0 gives -inf, never drawn
            u = tl.rand(tl.load(seed_ptr), b.to(tl.int64) * V + offs)
            score = tl.where(ok, x - tl.log(-tl.log(u)), float("-inf"))
        else:
            score = x
        best = tl.max(score, 0)
        idx = tl.min(tl.where(score == best, offs, V), 0)  # first index of the best
        part = part_ptr + (b * NCH + c) * 4  # partials [B, NCH, 4]: max, sum of exp, best score, its index
        tl.store(part, m)
        tl.store(part + 1, s)
        tl.store(part + 2, best)
        tl.store(part + 3, idx.to(tl.float32))  # exact: V < 2**24
        tl.debug_barrier()  # every partial is stored before the counter moves
        if tl.atomic_add(cnt_ptr + b, 1, sem="acq_rel") != NCH - 1:
            return
        cs = tl.arange(0, NCHP)
        cm = cs < NCH
        p = part_ptr + (b * NCH + cs) * 4
        ms = tl.load(p, mask=cm, other=float("-inf"), cache_modifier=".cg")
        ss = tl.load(p + 1, mask=cm, other=0.0, cache_modifier=".cg")
        bs = tl.load(p + 2, mask=cm, other=float("-inf"), cache_modifier=".cg")
        ix = tl.load(p + 3, mask=cm, other=0.0, cache_modifier=".cg").to(tl.int32)
        top = tl.max(ms, 0)
        total = tl.sum(ss * tl.exp(ms - top), 0)
        win = tl.max(bs, 0)
        tok = tl.min(tl.where(cm & (bs == win), ix, V), 0)  # chunks in order: the first index overall
        tok = tl.minimum(tok, V - 1)  # every score NaN (NaN logits): a valid index, as argmax gives one
        xt = tl.load(row + tok).to(tl.float32) * inv_t
        tl.store(tok_ptr + b, tok.to(tl.int64))
        tl.store(lp_ptr + b, xt - top - tl.log(total))
        tl.store(cnt_ptr + b, 0)  # ready for the next launch


def usable(logits: torch.Tensor) -> bool:
    """Whether `draw` runs here: 2-D logits with unit column stride on a device with Triton (CUDA, or CPU under
    TRITON_INTERPRET=1), a vocabulary below 2**24 (the partial index is held in fp32)."""
    return logits.dim() == 2 and logits.stride(-1) == 1 and logits.shape[1] < 2**24 and available(logits.device)


def draw(logits: torch.Tensor, temperature: float, generator: torch.Generator | None,
         chunk: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [B, V] -> (tokens [B] int64, log-probs [B] float32): greedy when temperature == 0 (log-probs of the
    raw logits, as fast_sampling.pick), else one categorical draw from softmax(logits / temperature)."""
    B, V = logits.shape
    chunk = chunk or CHUNK
    nch = triton.cdiv(V, chunk)
    dev = logits.device
    noise = temperature > 0
    # greedy: the kernel reads no seed, any tensor stands in for the pointer (no fill kernel a step)
    seed = torch.randint(0, 2**31 - 1, (1,), device=dev, generator=generator) if noise else logits
    part = torch.empty(B, nch, 4, dtype=torch.float32, device=dev)
    tok = torch.empty(B, dtype=torch.long, device=dev)
    lp = torch.empty(B, dtype=torch.float32, device=dev)
    _draw_kernel[(B, nch)](logits, logits.stride(0), V, 1.0 / temperature if noise else 1.0, seed, part,
                           counters(dev, B), tok, lp, NCH=nch, NCHP=triton.next_power_of_2(nch), CHUNK=chunk,
                           NOISE=noise, num_warps=8 if chunk >= 4096 else 4)
    return tok, lp
