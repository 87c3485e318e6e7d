"""The `fast` rollout backend: a compact decode engine for Llama/Qwen2/Qwen3/Mistral models.

    rollout = FastRollout(model, tokenizer, max_batch=256)
    out = rollout.generate(prompt_ids, n=8, sampling=SamplingConfig(max_new_tokens=1024))
    ...optimizer.step(); rollout.sync_weights(model)   # LoRA deltas merged into the generation copy

Instead of transformers' generic forward it runs its own (fast_forward.py) over weights read out of
the HF module (fast_weights.py: the model's own tensors where possible, an owned bf16 copy for LoRA
(or, with lora_merge=in_place|none, the base tensors with the deltas added in place while sampling or
applied as low-rank matmuls), 4-bit or cast models), a static KV cache, and on CUDA captured CUDA graphs:
the per-step Python, mask building and kernel launches of `generate` disappear. Which kernels run is the
device's kernel plan (fast_plan.py; `describe()` reports it): decode attention "triton" (fast_kernels.py: RoPE
fused with the KV write, flash-decoding split over each row's filled columns, one graph per batch size for every
length) or "sdpa" (the reference: SDPA over the first bucket of columns, one graph per (batch, length bucket);
what runs on CPU, with torch alone, on cards Triton does not support, and after a kernel failed). Prefill runs eagerly once per distinct prompt (its K/V is
copied to the n samples). Sampling runs on the device after each replay (fast_sampling.py); finished
rows emit padding; stop strings are checked on the host every `check_every` steps, where finished rows also
leave the batch (`compact`: the live rows' K/V move to the front and the step runs at the smaller batch
size once they fit one), and the batch ends once every row has finished. On CPU the same code runs eagerly (what the CPU tests cover).

Memory: the KV cache (2 * layers * rows * kv_heads * capacity * head_dim elements) stays allocated
between calls so graphs stay valid; `release()` frees it for the training step, and the next call keeps the
graphs if the cache is re-allocated at the same addresses (checked), else re-captures them.
"""

from __future__ import annotations

import contextlib
import time
import warnings
from collections import Counter

import torch

from .base import Completions, SamplingConfig
from .common import finish_completions
from .fast_forward import decode_step, logits_into, prefill, rope_table
from .fast_sampling import check_sampling, compiled_pick, pick, sample
from . import fast_draw, fast_kernels
from .fast_plan import KernelFailure, KernelPlan, decode_ops, describe_matmuls, guarded, plan_for, reference
from .fast_buffers import merge_in_place, owned_pointers, param_pointers, reclaim_owned, release_owned, restore
from .fast_weights import causal_lm_parts, extract, refill
from .hf import _eos_ids


class FastRollout:
    def __init__(self, model, tokenizer, *, max_batch: int = 256, max_seq_len: int | None = None, device=None,
                 dtype: torch.dtype | None = None, fuse_weights: bool = False, lora_merge: str = "copy",
                 prefill_tokens: int = 16384, check_every: int = 16, compact: bool = True,
                 plan: KernelPlan | None = None):
        """max_batch: rows decoded together; max_seq_len: cap on prompt + completion tokens (None: as needed);
        device/dtype: where and in what precision to generate (default: the model's); fuse_weights: copy q/k/v
        and gate/up into fused buffers even for a plain model (faster decode, costs a copy of those weights);
        lora_merge: how LoRA deltas reach generation: "copy" (a merged copy of the adapted weights: fastest
        decode, +memory), "in_place" (added into the base weights for the duration of `generate`, restored from a
        host snapshot: no GPU copy) or "none" (low-rank matmuls next to the base weights: no copy anywhere,
        slower decode); prefill_tokens: prompt tokens per prefill chunk; check_every: steps between stop-string
        checks; compact: drop finished rows from the decode batch at each stop check (the live rows move to the
        front, and the step runs at the smaller batch size once they fit one: real completions are uneven, and a
        batch would otherwise run every row to the longest one's length); plan: which kernels run (fast_plan:
        attention path, matmuls, sampler, PDL, CUDA graphs, compiled pointwise ops; default `plan_for(device)`,
        the card's own). A kernel failing to compile or launch switches the engine to the torch plan (a warning
        names the kernel and the reason) and the batch is decoded again."""
        if max_batch < 1:
            raise ValueError(f"FastRollout: max_batch must be >= 1, got {max_batch}")
        if tokenizer.pad_token_id is None:
            raise ValueError("FastRollout: the tokenizer has no pad_token_id; set one (e.g. the EOS token)")
        self.tokenizer = tokenizer
        self.max_batch, self.max_seq_len = max_batch, max_seq_len
        first = next(model.parameters())
        self.device = torch.device(device) if device is not None else first.device
        self.dtype = dtype
        self.lora_merge = lora_merge
        self.want_compact = compact
        self.compactions = 0  # times a batch shrank (finished rows dropped)
        # Public hook for benchmarks and experiments: hook(logits [n, V], rows, step), called before each draw of a
        # batch with the logits of its n decode slots (edit them in place), the batch row each slot holds (a slice
        # of all rows until finished rows leave, then an index tensor [n]) and the token index. None: no call.
        self.logits_hook = None
        self._side = None  # one side stream for every graph capture (each new stream gets its own cuBLAS workspace)
        self.fuse, self.prefill_tokens, self.check_every = fuse_weights, prefill_tokens, check_every
        self._cache_rows = self._cache_len = 0
        self.k_cache = self.v_cache = None
        self._graph_kv = (0, 0)  # KV cache addresses the captured graphs were recorded with
        self.captures = 0  # CUDA graphs captured so far (re-captures show up here)
        self._rope_len = 0
        self._graph_map: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        self._pool = None
        if plan is None:
            plan = plan_for(self.device)
        elif plan.device.type != self.device.type:
            raise ValueError(f"FastRollout: the kernel plan is for {plan.device.type}, the engine runs on {self.device}")
        self.fallbacks: list[str] = []  # kernels that failed, in order (the engine took the reference plan)
        self._use(plan)
        self._load(model)

    def _use(self, plan: KernelPlan) -> None:
        """Take `plan`: the decode ops, the sampler, graph and bucket settings (captured graphs dropped)."""
        self.plan = plan
        self.graphs, self.attention, self.pdl, self.sampler = plan.cuda_graphs, plan.attention, plan.pdl, plan.sampler
        self.bucket = plan.kv_bucket
        self.ops = decode_ops(plan)
        self._pick = guarded("compiled sampler pick (torch.compile)", compiled_pick()) if plan.compile_pointwise \
            else pick
        self._draw = guarded("draw (fast_draw)", fast_draw.draw) if plan.sampler == "triton" else None
        # The sdpa path captures one graph per (batch, length bucket): shrinking batches would multiply them.
        self.compact = self.want_compact and (not self.graphs or self.attention == "triton")
        self.drop_graphs()

    # ----- weights -------------------------------------------------------------------------------------
    def _load(self, model) -> None:
        self.model = model
        _, self._decoder = causal_lm_parts(model)
        with torch.inference_mode():
            self.w = extract(model, self.dtype, self.device, self.fuse, self.lora_merge)
        self._ptrs = param_pointers(model)
        self.drop_graphs()  # owned buffers moved: captured graphs point at the old ones
        self._rope_len = 0

    def sync_weights(self, model) -> None:
        """Make generation use the model's current weights: refill owned (LoRA-merged / dequantised / cast)
        buffers in place; re-read everything if the model object or any parameter's storage changed."""
        if model is not self.model or param_pointers(model) != self._ptrs:
            self._load(model)
        else:
            reclaim_owned(self.w)  # released for the update: back (maybe elsewhere: `_ensure` checks the graphs)
            with torch.inference_mode():
                refill(self.w)

    def describe(self) -> dict:
        """Which path this engine takes: the kernel plan (one line), attention kernels, CUDA graphs, the matmul of
        each projection group, how each weight group is read, and kernels that failed (the engine fell back)."""
        p = self.plan
        return {"plan": p.line(), "kernels": p.kernels, "attention": p.attention, "cuda_graphs": p.cuda_graphs,
                "pdl": p.pdl, "sampler": p.sampler, "lora_merge": self.lora_merge,
                "compiled_pointwise": p.compile_pointwise, "weights": dict(self.w.plan),
                "matmuls": describe_matmuls(p, self.w), "fallbacks": list(self.fallbacks)}

    @property
    def owned_weight_bytes(self) -> int:
        """Bytes the owned weight copies hold now (0 while released for an update)."""
        return sum(dst.untyped_storage().nbytes() for dst, _ in self.w.recipes)

    # ----- buffers ---------------------------------------------------------------------------------------
    def _ensure(self, rows: int, length: int) -> None:
        unit = min(self.bucket, 128)  # capacity granularity: less slack than whole attention buckets
        length = -(-length // unit) * unit
        if rows > self._cache_rows or length > self._cache_len:
            rows, length = max(rows, self._cache_rows), max(length, self._cache_len)
            self.release(graphs=True)
            w, dev = self.w, self.device
            self._kv_shape = (len(w.layers), rows, w.n_kv, length, w.head_dim)
            self._logits = torch.zeros(rows, w.lm_head.shape[0], dtype=w.dtype, device=dev)
            self._tok = torch.zeros(rows, dtype=torch.long, device=dev)
            self._pos = torch.zeros(rows, dtype=torch.long, device=dev)
            self._pad = torch.zeros(rows, dtype=torch.long, device=dev)
            self._col = torch.zeros(1, dtype=torch.long, device=dev)
            self._cache_rows, self._cache_len = rows, length
        if self.k_cache is None:  # first use, or freed by `release()` for an update
            self.k_cache = torch.zeros(self._kv_shape, dtype=self.w.dtype, device=self.device)
            self.v_cache = torch.zeros(self._kv_shape, dtype=self.w.dtype, device=self.device)
        # Captured graphs hold the cache's addresses: they stay valid only if it came back at the same place
        # (it usually does from the second update on: the update allocates the same shapes every step).
        if reclaim_owned(self.w):  # released and not synced since: the model's current weights
            with torch.inference_mode():
                refill(self.w)
        ptrs = (self.k_cache.data_ptr(), self.v_cache.data_ptr(), *owned_pointers(self.w))
        if ptrs != self._graph_kv:
            self.drop_graphs()
            self._graph_kv = ptrs
        if self._rope_len < self._cache_len:
            self.cos, self.sin = rope_table(self._decoder, self._cache_len, self.w.dtype, self.device)
            self._rope_len = self._cache_len
            self.drop_graphs()

    def drop_graphs(self) -> None:
        """Forget the captured CUDA graphs (the next generate captures new ones); the KV cache stays."""
        # A pool whose graphs are all gone is freed by PyTorch: later captures need a new one.
        self._graph_map.clear()
        self._pool = None

    def release(self, graphs: bool = False, weights: bool = False) -> None:
        """Free the KV cache (the next generate allocates it again, and re-captures its CUDA graphs only if it
        lands at another address); weights=True also frees the owned weight copies (LoRA-merged / dequantised;
        `sync_weights` or the next generate re-allocates and refills them, with the same graph check);
        graphs=True also frees the graphs and the small static buffers."""
        self.k_cache = self.v_cache = None
        if weights:
            release_owned(self.w)
        if graphs:
            self.drop_graphs()
            for name in ("_logits", "_tok", "_pos", "_pad", "_col"):
                self.__dict__.pop(name, None)
            self._cache_rows = self._cache_len = 0
        if graphs and self.device.type == "cuda":
            torch._C._cuda_clearCublasWorkspaces()  # 32 MiB per (cuBLAS handle, stream) used by captures
            torch.cuda.empty_cache()
        # Without graphs=True the freed cache stays in PyTorch's allocator: the update's tensors take its
        # blocks, and once they are freed it coalesces again, so the next cache usually lands at the same
        # address and the captured graphs are replayed instead of re-captured.

    @property
    def kv_cache_bytes(self) -> int:
        return 2 * self.k_cache.numel() * self.k_cache.element_size() if self.k_cache is not None else 0

    # ----- decoding ----------------------------------------------------------------------------------------
    def _step(self, rows: int, n_cols: int) -> None:
        splits = fast_kernels.splits_for(rows, self.w.n_kv, self.device) if self.attention == "triton" else 0
        with fast_kernels.dependent_launch(self.pdl):
            h = decode_step(self.w, self.k_cache, self.v_cache, self._tok[:rows], self._pos[:rows], self._col,
                            self._pad[:rows], n_cols, self.cos, self.sin, self.ops, splits)
        logits_into(self.w, h, self._logits)

    def _decode(self, rows: int, n_cols: int) -> None:
        if self.attention == "triton":
            n_cols = 0  # the kernels read the filled length from device memory: one graph for every length
        if not self.graphs:
            return self._step(rows, n_cols)
        g = self._graph_map.get((rows, n_cols))
        if g is None:
            # Warm-up on a side stream (as torch.cuda.graph requires) with the real inputs: it writes the
            # same K/V column and logits the replay will.
            side = self._side = self._side or torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                self._step(rows, n_cols)
            torch.cuda.current_stream(self.device).wait_stream(side)
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=self._pool):
                self._step(rows, n_cols)
            self._graph_map[(rows, n_cols)] = g
            self.captures += 1
        g.replay()

    def _cols(self, filled: int) -> int:
        return min(self._cache_len, -(-filled // self.bucket) * self.bucket)

    def _prefill(self, prompts: list[list[int]], counts: list[int]) -> None:
        """Prompts left-padded to a common width; K/V and first logits into rows 0 .. sum(counts)."""
        width = max(len(p) for p in prompts)
        per_chunk = max(1, self.prefill_tokens // width)
        row = 0
        for a in range(0, len(prompts), per_chunk):
            chunk, cnt = prompts[a:a + per_chunk], counts[a:a + per_chunk]
            ids = torch.full((len(chunk), width), self.tokenizer.pad_token_id, dtype=torch.long)
            for j, p in enumerate(chunk):
                ids[j, width - len(p):] = torch.tensor(p, dtype=torch.long)
            lens = torch.tensor([len(p) for p in chunk], device=self.device)
            cnt_t = torch.tensor(cnt, device=self.device)
            h = prefill(self.w, self.k_cache, self.v_cache, ids.to(self.device), lens, cnt_t, row, self.cos, self.sin)
            rows = sum(cnt)
            logits = logits_into(self.w, h, torch.empty(len(chunk), self._logits.shape[1], dtype=self.w.dtype,
                                                        device=self.device))
            self._logits[row:row + rows] = logits.repeat_interleave(cnt_t, 0)
            row += rows

    def _slots(self, rows: int) -> int:
        return -(-rows // 8) * 8 if self.graphs else rows  # graph batch sizes in steps of 8

    def _run_batch(self, prompts: list[list[int]], counts: list[int], s: SamplingConfig, eos: torch.Tensor,
                   gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode sum(counts) rows (prompt j repeated counts[j] times) -> tokens, logprobs [rows, steps].
        Slot j of the decode batch holds row live[j]; with `compact`, finished rows leave at the stop checks."""
        rows = sum(counts)
        slots = self._slots(rows)
        width = max(len(p) for p in prompts)
        self._ensure(slots, width + s.max_new_tokens - 1)
        self._prefill(prompts, counts)
        lens = torch.tensor([len(p) for p in prompts], device=self.device).repeat_interleave(
            torch.tensor(counts, device=self.device))  # [slots in use]: prompt length of each slot's row
        # Unused graph slots (rows .. slots): the Triton path gives them no columns at all, so they read no cache.
        self._pad.fill_(self._unused_pad())
        self._pad[:rows] = width - lens
        pad_id = self.tokenizer.pad_token_id
        out_tok = torch.full((rows, s.max_new_tokens), pad_id, dtype=torch.long, device=self.device)
        out_lp = torch.zeros((rows, s.max_new_tokens), dtype=torch.float32, device=self.device)
        done = torch.zeros(rows, dtype=torch.bool, device=self.device)  # [rows], by row
        live, n, checked = slice(None), rows, 0  # live: the row of each slot (all rows, in order, until compacted)
        seen = self._seen(prompts, counts) if s.repetition_penalty != 1.0 else None  # [n, V] by slot
        for i in range(s.max_new_tokens):
            if self.logits_hook is not None:
                self.logits_hook(self._logits[:n], live, i)
            tok, lp = sample(self._logits[:n], s, gen, self._pick, self._draw, seen)
            if seen is not None:
                seen.scatter_(1, tok[:, None], True)
            if eos.numel():
                fin = done[live]  # [n]: finished rows still in a slot emit padding
                tok = tok.masked_fill(fin, pad_id)
                done[live] = fin | torch.isin(tok, eos)
            out_tok[live, i] = tok
            out_lp[live, i] = lp
            if i + 1 == s.max_new_tokens:
                break
            if (i + 1) % self.check_every == 0:
                if s.stop_strings:
                    self._check_stops(out_tok, done, checked, i + 1, s.stop_strings)
                    checked = i + 1
                keep = (~done[live]).nonzero()[:, 0]  # [k] slots still decoding (one host sync, as all() was)
                if keep.numel() == 0:
                    break
                if self.compact and self._slots(keep.numel()) < slots:
                    n, slots = keep.numel(), self._compact(keep, width + i)
                    live = (torch.arange(rows, device=self.device) if isinstance(live, slice) else live)[keep]
                    tok, lens = tok[keep], lens[keep]
                    seen = None if seen is None else seen[keep]
            self._tok[:n] = tok
            torch.add(lens, i, out=self._pos[:n])  # token i sits at position len + i
            self._col.fill_(width + i)
            self._decode(slots, self._cols(width + i + 1))
        return out_tok[:, :i + 1], out_lp[:, :i + 1]

    def _seen(self, prompts: list[list[int]], counts: list[int]) -> torch.Tensor:
        """[rows, V] bool: the tokens of each row's prompt (the repetition penalty's starting set, as transformers'),
        one row per decode slot: compaction keeps the live slots' rows."""
        seen = torch.zeros(sum(counts), self._logits.shape[-1], dtype=torch.bool, device=self.device)
        row = 0
        for p, c in zip(prompts, counts):
            seen[row:row + c, torch.tensor(p, device=self.device)] = True
            row += c
        return seen

    def decode_loop_step(self, rows: int, context: int):
        """For benchmarks (benchmarks.decode): one step of the decode loop (draw from the logits, then one decode
        step) for `rows` rows at `context` filled cache columns, the cache filled with random K/V (as costly to
        read as real K/V). Returns the step as a function of no arguments, to call repeatedly and time."""
        slots = self._slots(rows)
        self._ensure(slots, context + 1)
        for c in (self.k_cache, self.v_cache):
            for layer in c:
                layer.normal_()
        self._pad.fill_(self._unused_pad())
        self._pad[:rows] = 0
        self._tok.random_(0, self.w.embed.shape[0])
        self._pos.fill_(context - 1)
        self._col.fill_(context - 1)
        s, gen = SamplingConfig(temperature=1.0), torch.Generator(self.device).manual_seed(0)
        n_cols = self._cols(context)

        def step() -> None:
            self._tok[:rows] = sample(self._logits[:rows], s, gen, self._pick, self._draw)[0]
            self._decode(slots, n_cols)

        return step

    def _unused_pad(self) -> int:
        return self._cache_len if self.attention == "triton" else 0

    def _compact(self, keep: torch.Tensor, filled: int) -> int:
        """Move the slots `keep` [k] to the front of the batch (their K/V over the `filled` columns written so
        far, and their padding) and return the new graph batch size; the slots after them go unused. (The logits
        need no move: the step that follows writes them.)"""
        k, slots = keep.numel(), self._slots(keep.numel())
        # Row by row, in place: a gathered copy of the live rows' cache would need up to the whole cache again.
        moves = [(j, src) for j, src in enumerate(keep.tolist()) if j != src]
        for cache in (self.k_cache, self.v_cache):  # [layers, rows, kv_heads, length, head_dim]
            for j, src in moves:  # ascending, src > j: every source is read before a later move writes over it
                cache[:, j, :, :filled].copy_(cache[:, src, :, :filled])
        self._pad[:k] = self._pad[keep]
        self._pad[k:slots] = self._unused_pad()
        self.compactions += 1
        return slots

    def _check_stops(self, out_tok, done, lo: int, hi: int, stops: list[str]) -> None:
        """Mark rows whose new tokens [lo, hi) complete a stop string (decoding a short tail window)."""
        a = max(0, lo - max(len(x) for x in stops) - 2)  # a stop string spans at most len(stop) tokens
        texts = self.tokenizer.batch_decode(out_tok[:, a:hi].tolist(), skip_special_tokens=True)
        hit = [r for r, t in enumerate(texts) if any(x in t for x in stops)]
        if hit:
            done[torch.tensor(hit, device=done.device)] = True

    @contextlib.contextmanager
    def _lora_in_place(self):
        """lora_merge=in_place: the deltas live in the base weights only while this rollout samples."""
        if not self.w.in_place:
            yield
            return
        merge_in_place(self.w)
        try:
            yield
        finally:
            restore(self.w)

    def generate(self, prompt_ids: list[list[int]], n: int, sampling: SamplingConfig) -> Completions:
        t0 = time.perf_counter()
        check_sampling(sampling)
        if n < 1:
            raise ValueError(f"FastRollout.generate: n must be >= 1, got {n}")
        if not prompt_ids:
            raise ValueError("FastRollout.generate: no prompts given")
        vocab = self.w.embed.shape[0]
        for i, p in enumerate(prompt_ids):
            if len(p) == 0:
                raise ValueError(f"FastRollout.generate: prompt {i} is empty")
            if min(p) < 0 or max(p) >= vocab:
                raise ValueError(f"FastRollout.generate: prompt {i} has a token id outside [0, {vocab})")
        longest = max(len(p) for p in prompt_ids) + sampling.max_new_tokens
        if self.max_seq_len is not None and longest > self.max_seq_len:
            raise ValueError(f"FastRollout.generate: longest prompt + max_new_tokens = {longest} exceeds "
                             f"max_seq_len={self.max_seq_len}")
        if self.w.window is not None and longest > self.w.window:
            raise ValueError(f"FastRollout.generate: longest prompt + max_new_tokens = {longest} exceeds the "
                             f"model's sliding window ({self.w.window}), which this engine does not implement")
        rows = [p for p in prompt_ids for _ in range(n)]  # prompt-major
        eos_ids = [] if sampling.ignore_eos else _eos_ids(self.model, self.tokenizer)
        eos = torch.tensor(eos_ids, dtype=torch.long, device=self.device)
        seed = sampling.seed if sampling.seed is not None else int(torch.randint(0, 2**62, (1,)))
        with torch.inference_mode(), self._lora_in_place():
            try:
                toks, lps = self._generate_rows(prompt_ids, n, rows, sampling, eos, seed)
            except KernelFailure as e:
                if not self.plan.uses_kernels:
                    raise
                self.fallbacks.append(e.kernel)
                warnings.warn(f"fast engine: {e.kernel} failed on {self.plan.device.name} ({e.reason}); decoding "
                              f"on the reference path (SDPA attention, cuBLAS, torch sampler) from now on",
                              RuntimeWarning, stacklevel=2)
                self._use(reference(self.plan, f"after {e.kernel} failed"))
                toks, lps = self._generate_rows(prompt_ids, n, rows, sampling, eos, seed)
        pad_id = self.tokenizer.pad_token_id
        width = max(t.shape[1] for t in toks)
        ids = torch.cat([torch.nn.functional.pad(t, (0, width - t.shape[1]), value=pad_id) for t in toks])
        logp = torch.cat([torch.nn.functional.pad(x, (0, width - x.shape[1])) for x in lps])
        return finish_completions(rows, ids, self.tokenizer, sampling, set(eos_ids), time.perf_counter() - t0,
                                  logprobs=logp)

    def _generate_rows(self, prompt_ids, n: int, rows, sampling: SamplingConfig, eos: torch.Tensor, seed: int):
        """Every row, max_batch at a time, from a generator seeded with `seed` -> ([tokens], [log-probs]) per batch."""
        gen = torch.Generator(self.device).manual_seed(seed)
        toks, lps = [], []
        for a in range(0, len(rows), self.max_batch):
            per_prompt = Counter(r // n for r in range(a, min(a + self.max_batch, len(rows))))
            uniq = sorted(per_prompt)
            t, lp = self._run_batch([prompt_ids[j] for j in uniq], [per_prompt[j] for j in uniq], sampling, eos, gen)
            toks.append(t.cpu())
            lps.append(lp.cpu())
        return toks, lps
