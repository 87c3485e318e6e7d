"""benchmarks.step's TRL method: the same workload through TRL's GRPOTrainer (no vLLM), timed per step with
generation split off (a wrapper around its generate call), rows of the drawn lengths forced as ours are
(`force_trl_lengths`), or canned rows (gen=canned) to time the update alone. See benchmarks.step's docstring."""

from __future__ import annotations

import json
import tempfile
import time

from benchmarks.common import (BETA, LORA, PROJECTIONS, Workload, canned_completions, drawn_lengths, load_tokenizer,
                               peak_gib, prompt_ids, random_rewards, reset_peak, sync)


def run_trl(args, w: Workload, opts: dict) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    on_gpu = args.device != "cpu"
    kw = dict(dtype=torch.bfloat16 if on_gpu else torch.float32, attn_implementation="sdpa")
    if w.quant == "nf4":
        kw.update(quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                         bnb_4bit_use_double_quant=True,
                                                         bnb_4bit_compute_dtype=torch.bfloat16),
                  device_map={"": args.device})
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, **kw)
    if w.quant is None:
        model.to(args.device)
    tok = load_tokenizer(args.model_dir)
    n = w.prompts * w.group
    texts = [" ".join(f"w{i}" for i in p) for p in prompt_ids(args, w)]
    ds = Dataset.from_dict({"prompt": texts * (args.trl_steps + 1)})

    def reward(completions, **_):
        return random_rewards(len(completions), 0).tolist()

    lengths = drawn_lengths(w)
    cap = int(opts.get("gen_steps", w.new_tokens))  # gen_steps: a prefix of the generation (see the docstring)
    lengths = [min(k, cap) for k in lengths]
    conf = GRPOConfig(
        output_dir=tempfile.mkdtemp(), per_device_train_batch_size=w.trl_micro,
        gradient_accumulation_steps=n // w.trl_micro, num_generations=w.group, max_completion_length=cap,
        generation_kwargs={} if w.median else {"min_new_tokens": w.new_tokens}, temperature=1.0, beta=BETA, loss_type="grpo",
        learning_rate=1e-6, max_steps=args.trl_steps + (opts.get("prof") == "1" and on_gpu), bf16=on_gpu, use_cpu=not on_gpu, gradient_checkpointing=True,
        logging_steps=1, report_to="none", save_strategy="no", use_vllm=False, shuffle_dataset=False, seed=0)
    peft_cfg = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                          target_modules=PROJECTIONS, task_type="CAUSAL_LM")
    steps: list[dict] = []
    cur: dict = {}
    extra: dict = {}
    # prof=1: one more step, after the timed ones, under the profiler (profiling.py), not counted in the times
    profiled_step = args.trl_steps if opts.get("prof") == "1" and on_gpu else None

    class Timer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            if len(steps) == profiled_step:
                from benchmarks.profiling import Recording

                cur["rec"] = Recording(trainer.model, lora_rank=LORA["r"])
                cur["rec"].start()
                return
            sync()
            reset_peak()
            cur.clear()
            cur.update(t0=time.perf_counter(), gen_s=0.0, peak_gen_gib=peak_gib())

        def on_step_end(self, *a, **k):
            if len(steps) == profiled_step:
                extra["profile"] = cur.pop("rec").stop()
                steps.append(None)  # the profiled step: dropped below
                return
            sync()
            total = time.perf_counter() - cur["t0"]
            steps.append(dict(gen_s=cur["gen_s"], update_s=total - cur["gen_s"], step_s=total,
                              peak_gen_gib=cur["peak_gen_gib"], peak_update_gib=peak_gib(), completion_tokens=sum(lengths)))
            print(f"[trl] step {len(steps) - 1}: {json.dumps(steps[-1])}", flush=True)

    trainer = GRPOTrainer(model=model, reward_funcs=[reward], args=conf, train_dataset=ds, processing_class=tok,
                          peft_config=peft_cfg, callbacks=[Timer()])
    generate = trainer._generate_single_turn

    def timed_generate(*a, **k):  # generation only (HF generate); its peak, then a fresh peak for the rest
        sync()
        t = time.perf_counter()
        out = generate(*a, **k)
        sync()
        cur["gen_s"] += time.perf_counter() - t
        cur["peak_gen_gib"] = max(cur["peak_gen_gib"], peak_gib())
        reset_peak()
        return out

    if opts.get("gen") == "canned":  # the update alone: TRL's generation replaced by the same canned rows as ours
        canned = canned_completions(args, w)
        rows_out = [r[m].tolist() for r, m in zip(canned.completion_ids, canned.completion_mask)]
        taken = [0]

        def generate(prompt_ids, *a, **k):  # TRL's rows in turn (prompt-major, as ours)
            idx = [(taken[0] + i) % len(rows_out) for i in range(len(prompt_ids))]
            taken[0] += len(prompt_ids)
            return [rows_out[i] for i in idx], None
    elif w.median is not None:
        force_trl_lengths(trainer, lengths, eos=tok.eos_token_id, cap=cap)
    trainer._generate_single_turn = timed_generate
    trainer.train()
    rows = [(args.prompt_len + k, k) for k in lengths]
    return dict(steps=[s for s in steps if s is not None], rows=rows, **extra, backend="canned" if opts.get("gen") == "canned" else "transformers generate",
                micro_batch=w.trl_micro)


def force_trl_lengths(trainer, lengths: list[int], eos: int, cap: int) -> None:
    """Every `generate` of TRL's policy gets a logits processor ending row r (in TRL's prompt-major order, the
    rows taken in turn) at lengths[r]: EOS forbidden before, forced at that step."""
    import torch
    from transformers import LogitsProcessor, LogitsProcessorList

    class ForceLengths(LogitsProcessor):
        def __init__(self, want: torch.Tensor, prompt_len: int):
            self.want, self.prompt_len = want, prompt_len  # [B]
            self.stops = want < cap  # a row drawn at the cap runs out of tokens instead: truncated, as ours

        def __call__(self, input_ids, scores):  # scores [B, V]
            end = (self.want - 1 == input_ids.shape[1] - self.prompt_len) & self.stops  # [B]: EOS is next
            scores[:, eos] = float("-inf")
            scores[end] = float("-inf")
            scores[end, eos] = 0.0
            return scores

    model, orig, offset = trainer.model, trainer.model.generate, [0]

    def generate(*a, **k):
        ids = k["input_ids"]
        idx = [(offset[0] + i) % len(lengths) for i in range(ids.shape[0])]
        offset[0] += ids.shape[0]
        want = torch.tensor([lengths[i] for i in idx], device=ids.device)
        k["logits_processor"] = LogitsProcessorList([ForceLengths(want, ids.shape[1])])
        return orig(*a, **k)

    model.generate = generate
