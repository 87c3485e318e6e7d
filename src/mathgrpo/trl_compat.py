"""TRL-compatible front door: a TRL GRPO script runs on mathgrpo's engine with one import changed.

    from mathgrpo import GRPOConfig, GRPOTrainer        # was: from trl import GRPOConfig, GRPOTrainer
    args = GRPOConfig(output_dir="out", per_device_train_batch_size=1, num_generations=4, max_steps=50)
    trainer = GRPOTrainer(model="Qwen/Qwen2.5-0.5B-Instruct", reward_funcs=[my_reward], args=args,
                          train_dataset=ds, peft_config=LoraConfig(r=16, target_modules="all-linear"))
    trainer.train()                                      # output_dir/checkpoint-<step>/ hold peft adapters

`GRPOConfig` takes TRL's option names (and some that older TRL/transformers took); `to_mathgrpo_config()` maps them
onto mathgrpo's `Config`, with one `TRLCompatWarning` line per option whose meaning is adjusted, one naming every
option that is ignored, and an error for typos and for options that would change the objective. `GRPOTrainer` loads
or wraps the model, turns the dataset's `prompt` column into prompt ids, wraps the reward functions so that they get
exactly TRL's keyword arguments, drives transformers callbacks, and runs `mathgrpo.trainer.train`.
Mapping and differences: docs/trl.md. Tests: tests/test_trl_compat.py.
"""

from __future__ import annotations

import asyncio
import dataclasses
import difflib
import inspect
import json
import math
import shutil
import time
import typing
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import Config, ConfigError, _coerce, load_config


class TRLCompatWarning(UserWarning):
    """An option of a TRL script that mathgrpo reads differently from TRL 1.16, or ignores."""


def _warn(msg: str) -> None:
    """Warn at the user's line (the first caller outside this module), where the option was given."""
    import sys

    level, frame = 2, sys._getframe(1)
    while frame is not None and frame.f_code.co_filename == __file__:
        level, frame = level + 1, frame.f_back
    warnings.warn(msg, TRLCompatWarning, stacklevel=level)


@dataclass
class _Options:
    """The TRL options mathgrpo honours, with TRL 1.16's defaults (older-TRL names marked legacy)."""

    output_dir: str | None = None  # None -> "trainer_output", as transformers
    per_device_train_batch_size: int = 8  # completions, as in TRL (see to_mathgrpo_config)
    gradient_accumulation_steps: int = 1
    num_generations: int = 8
    max_steps: int = -1
    num_train_epochs: float = 3.0
    max_prompt_length: int | None = None  # legacy: prompts cut from the left to this many tokens
    max_completion_length: int = 512
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    chat_template_kwargs: dict | None = None
    beta: float = 0.0
    epsilon: float = 0.2
    epsilon_high: float | None = None
    loss_type: str = "dapo"
    scale_rewards: bool | str = "group"
    num_iterations: int = 1
    reward_weights: list[float] | None = None
    mask_truncated_completions: bool = False
    use_bias_correction_kl: bool = True
    importance_sampling_level: str = "token"
    sapo_temperature_neg: float = 1.05
    sapo_temperature_pos: float = 1.0
    disable_dropout: bool = False
    learning_rate: float = 1e-6
    lr_scheduler_type: str = "linear"
    warmup_steps: float = 0  # < 1: a fraction of the optimizer steps
    warmup_ratio: float | None = None  # legacy
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    max_grad_norm: float = 1.0
    bf16: bool | None = None  # None -> not fp16, as TRL
    fp16: bool = False
    gradient_checkpointing: bool = True
    model_init_kwargs: dict | None = None
    trust_remote_code: bool = False
    logging_steps: float = 10  # < 1: a fraction of the steps
    logging_first_step: bool = False
    logging_dir: str | None = None  # legacy
    log_completions: bool = False
    report_to: str | list[str] | None = "none"
    disable_tqdm: bool = False
    run_name: str | None = None
    save_strategy: str = "steps"
    save_steps: float = 500
    save_total_limit: int | None = None
    overwrite_output_dir: bool = False  # legacy
    seed: int = 42
    eval_strategy: str = "no"
    use_vllm: bool = False
    mathgrpo_overrides: dict | None = None  # mathgrpo-only: {"generation.backend": "hf", ...}
    top_entropy_quantile: float = 1.0


# TRL 1.16 GRPOConfig options mathgrpo does not honour, with their defaults (passing the default asks for nothing).
_TRL_ONLY = {
    "router_aux_loss_coef": None, "cast_lm_head_to_fp32": False,
    "remove_unused_columns": False, "num_generations_eval": None, "ds3_gather_for_generation": True,
    "shuffle_dataset": True, "pad_to_multiple_of": "auto", "min_p": None, "generation_kwargs": None,
    "repetition_penalty": 1.0, "cache_implementation": None, "vllm_mode": "colocate", "vllm_model_impl": "vllm",
    "vllm_enable_sleep_mode": False, "vllm_structured_outputs_regex": None, "vllm_server_base_url": None,
    "vllm_server_host": "0.0.0.0", "vllm_server_port": 8000, "vllm_server_timeout": 240.0, "vllm_group_port": 51216,
    "vllm_gpu_memory_utilization": 0.3, "vllm_max_model_length": None, "vllm_tensor_parallel_size": 1,
    "vespo_k_pos": 2.0, "vespo_lambda_pos": 3.0,
    "vespo_k_neg": 3.0, "vespo_lambda_neg": 2.0, "ref_model_mixup_alpha": 0.6, "ref_model_sync_steps": 512,
    "entropy_coef_min": 0.0, "entropy_coef_max": 1.0, "entropy_coef_delta": 0.005, "entropy_target": 0.2,
    "max_tool_calling_iterations": None, "vllm_importance_sampling_correction": True,
    "vllm_importance_sampling_mode": "sequence_mask", "vllm_importance_sampling_clip_max": 3.0,
    "vllm_importance_sampling_clip_min": None, "log_multimodal": True,
    "num_completions_to_print": None, "log_unique_prompts": False, "log_completions_hub_repo": None,
    "use_transformers_continuous_batching": False, "transformers_continuous_batching_config": None,
    "use_transformers_paged": False, "vllm_importance_sampling_cap": None,
    # options of older TRL / transformers releases
    "vllm_device": "auto", "vllm_dtype": "auto", "vllm_max_model_len": None, "vllm_guided_decoding_regex": None,
    "vllm_enable_prefix_caching": True, "use_liger_loss": False, "wandb_log_unique_prompts": False,
    "evaluation_strategy": "no", "per_gpu_train_batch_size": None, "per_gpu_eval_batch_size": None,
    "no_cuda": False, "use_mps_device": False, "fp16_backend": "auto", "half_precision_backend": "auto",
    "use_ipex": False, "push_to_hub_token": None, "push_to_hub_model_id": None, "push_to_hub_organization": None,
    "tpu_num_cores": None, "past_index": -1, "jit_mode_eval": False, "ray_scope": "last", "mp_parameters": "",
    "save_safetensors": True, "include_tokens_per_second": False, "dispatch_batches": None, "split_batches": None,
}
# Options that would change the objective or the batch in ways mathgrpo does not implement: only this value passes.
_REFUSED = {
    "delta": None, "multi_objective_aggregation": "sum_then_normalize",
    "sync_ref_model": False, "entropy_coef": 0.0, "use_adaptive_entropy": False,
    "off_policy_mask_threshold": None, "generation_batch_size": None, "steps_per_generation": None,
}
# Why an ignored option is ignored (by name prefix); the rest: "not supported by mathgrpo".
_IGNORED_WHY = {
    "vllm_": "mathgrpo generates with its own engine", "optim": "mathgrpo uses torch.optim.AdamW",
    "push_to_hub": "upload output_dir yourself", "hub_": "upload output_dir yourself",
    "ddp_": "run several GPUs with torchrun", "fsdp": "run several GPUs with torchrun",
    "deepspeed": "run several GPUs with torchrun", "eval_": "call trainer.evaluate()",
    "per_device_eval_batch_size": "trainer.evaluate() uses num_generations per prompt",
}
# Values of ignored options that ask for what mathgrpo does anyway.
_SAME_AS_OURS = {"optim": ("adamw_torch", "adamw_torch_fused", "adamw_hf"), "remove_unused_columns": (False, None),
                 "report_to": ("none",)}
_SCHEDULERS = {"linear": "linear", "cosine": "cosine", "constant": "constant", "constant_with_warmup": "constant"}
_SAVE_STRATEGIES = ("steps", "epoch", "no")
_MISSING = object()


def _default_of(name: str) -> Any:
    if name in _TRL_ONLY:
        return _TRL_ONLY[name]
    from transformers import TrainingArguments  # only for names outside the tables above

    for f in dataclasses.fields(TrainingArguments):
        if f.name == name:
            if f.default is not dataclasses.MISSING:
                return f.default
            return f.default_factory() if f.default_factory is not dataclasses.MISSING else None
    return _MISSING


class GRPOConfig(_Options):
    """TRL's GRPOConfig names and defaults; `to_mathgrpo_config()` gives the mathgrpo Config it means."""

    def __init__(self, output_dir: str | None = None, **options):
        names = {f.name for f in dataclasses.fields(_Options)}
        super().__init__(output_dir=output_dir, **{k: v for k, v in options.items() if k in names})
        hints = typing.get_type_hints(_Options)
        for f in dataclasses.fields(_Options):  # scripts pass e.g. overwrite_output_dir='True'
            setattr(self, f.name, _coerce(getattr(self, f.name), hints[f.name], f"GRPOConfig.{f.name}"))
        self.output_dir = self.output_dir or "trainer_output"
        self.scale_rewards = {True: "group", False: "none"}.get(self.scale_rewards, self.scale_rewards)
        if self.bf16 is None:
            self.bf16 = not self.fp16
        if self.save_strategy not in _SAVE_STRATEGIES:
            raise ValueError(f"GRPOConfig.save_strategy={self.save_strategy!r}: mathgrpo supports "
                             f"{', '.join(_SAVE_STRATEGIES)} ('best' needs periodic evaluation, which it does not run)")
        self.ignored_options = self._sort_others({k: v for k, v in options.items() if k not in names}, names)
        if self.use_vllm:
            _warn("use_vllm=True: mathgrpo generates with its own engine (CUDA graphs and a static KV cache on a GPU, "
                  "transformers generate on a CPU), not vLLM; the vllm_* options are ignored")

    @staticmethod
    def _sort_others(others: dict, names: set) -> dict:
        refused = {k: v for k, v in others.items() if k in _REFUSED and v != _REFUSED[k]}
        if refused:
            raise ValueError("GRPOConfig: " + "; ".join(f"{k}={v!r}" for k, v in refused.items())
                             + " would change the objective or the batch in a way mathgrpo does not implement "
                             "(remove the option(s); see docs/trl.md)")
        others = {k: v for k, v in others.items() if k not in _REFUSED}
        defaults = {k: _default_of(k) for k in others}
        unknown = [k for k, d in defaults.items() if d is _MISSING]
        if unknown:
            known = sorted(names | set(_TRL_ONLY) | set(_REFUSED))
            hints = [f"{k!r}" + (f" (did you mean {m[0]!r}?)" if (m := difflib.get_close_matches(k, known, 1)) else "")
                     for k in unknown]
            raise TypeError(f"GRPOConfig got unexpected option(s) {', '.join(hints)}: neither TRL's GRPOConfig nor "
                            f"transformers' TrainingArguments has them")
        ignored = {k: v for k, v in others.items() if v != defaults[k] and v not in _SAME_AS_OURS.get(k, ())}
        if ignored:
            why = lambda k: next((w for p, w in _IGNORED_WHY.items() if k.startswith(p)), "not supported")  # noqa: E731
            _warn("GRPOConfig ignores option(s) mathgrpo does not support: "
                  + "; ".join(f"{k}={v!r} ({why(k)})" for k, v in ignored.items()))
        return ignored

    # TrainingArguments attributes that transformers callbacks read (torchrun's environment, as accelerate's).
    world_size = property(lambda self: _env("WORLD_SIZE", 1))
    process_index = property(lambda self: _env("RANK", 0))
    local_process_index = property(lambda self: _env("LOCAL_RANK", 0))
    should_log = should_save = property(lambda self: _env("RANK", 0) == 0)

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), **self.ignored_options}

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, default=str)

    def prompts_per_step(self) -> tuple[int, str | None]:
        """(prompts per step, a note when the batch size is read as prompts rather than completions).

        TRL counts completions: per_device_train_batch_size x gradient_accumulation_steps (x ranks) of them make
        one optimizer step, i.e. that / num_generations prompts. When that is not a whole number of prompts (TRL 1.16
        refuses such a config), the product is read as a count of prompts, each with num_generations completions."""
        ranks = self.world_size
        completions = self.per_device_train_batch_size * self.gradient_accumulation_steps * ranks
        G = self.num_generations
        if completions % G == 0:
            return completions // G, None
        return completions, (f"per_device_train_batch_size={self.per_device_train_batch_size} x "
                             f"gradient_accumulation_steps={self.gradient_accumulation_steps}"
                             f"{f' x {ranks} ranks' if ranks > 1 else ''} = {completions} is not a "
                             f"multiple of num_generations={G} (TRL 1.16 rejects this): read as {completions} prompt(s) "
                             f"x {G} completions = {completions * G} completions per step")

    def to_mathgrpo_config(self, train_size: int | None = None, on_cuda: bool | None = None,
                           reward_funcs: list | None = None) -> Config:
        """The mathgrpo Config these options mean. `train_size` (prompts) is needed when max_steps=-1 or
        save_strategy='epoch'; `on_cuda` (default: CUDA available) decides bf16/fp16; `reward_funcs` are recorded
        in rewards.functions as 'module:name' (placeholders `reward_funcs[i]` without them)."""
        if on_cuda is None:
            import torch

            on_cuda = torch.cuda.is_available()
        mu = self.num_iterations
        pps, note = self.prompts_per_step()
        if note:
            _warn(note)
        per_epoch = math.ceil(train_size / pps) if train_size else None
        if self.max_steps > 0:
            steps = math.ceil(self.max_steps / mu)
        elif per_epoch:
            steps = max(1, math.ceil(self.num_train_epochs * train_size / pps))
        else:
            raise ValueError("GRPOConfig.max_steps=-1 needs the dataset size to count num_train_epochs: set max_steps "
                             "or call to_mathgrpo_config(train_size=len(train_dataset))")
        if mu > 1:
            _warn(f"num_iterations={mu}: a mathgrpo step is one rollout followed by {mu} optimizer steps, so max_steps, "
                  f"logging_steps and save_steps (TRL counts optimizer steps) are divided by {mu}: {steps} steps")

        def every(value: float, what: str) -> int:  # TRL: < 1 is a fraction of the run
            n = math.ceil(value * steps) if 0 < value < 1 else math.ceil(value / mu)
            if n < 1:
                raise ValueError(f"GRPOConfig.{what} must be > 0, got {value}")
            return n

        save_every = {"steps": lambda: every(self.save_steps, "save_steps"), "no": lambda: steps + 1,
                      "epoch": lambda: per_epoch or _need_size("save_strategy='epoch'")}[self.save_strategy]()
        if self.lr_scheduler_type not in _SCHEDULERS:
            raise ValueError(f"GRPOConfig.lr_scheduler_type={self.lr_scheduler_type!r}: mathgrpo supports "
                             f"{', '.join(_SCHEDULERS)}")
        warm = self.warmup_ratio if self.warmup_ratio is not None else self.warmup_steps
        warmup = math.ceil(warm * steps * mu) if 0 < warm < 1 else int(warm)

        dtype = "float32"
        if (self.bf16 or self.fp16) and not on_cuda:
            _warn(f"{'bf16' if self.bf16 else 'fp16'}=True on a CPU (TRL 1.16 fails here): training in float32")
        elif self.fp16:
            dtype = "float16"
            _warn("fp16=True: weights are loaded in float16 (LoRA adapters stay float32) without loss scaling; "
                  "bf16 is safer where the GPU has it")
        elif self.bf16:
            dtype = "bfloat16"
        report = _report_to(self.report_to)
        tensorboard = "tensorboard" in report
        if self.logging_dir:
            _warn(f"logging_dir={self.logging_dir!r}: mathgrpo writes TensorBoard logs to output_dir/tensorboard "
                  f"(with report_to='tensorboard') and every step to output_dir/metrics.jsonl")
        out = Path(self.output_dir).resolve()
        mik = dict(self.model_init_kwargs or {})
        base = {
            "model": {"dtype": dtype, "gradient_checkpointing": self.gradient_checkpointing,
                      "trust_remote_code": self.trust_remote_code,
                      "attn_implementation": mik.get("attn_implementation", "sdpa")},
            "prompt": {"max_prompt_tokens": self.max_prompt_length or 10**9},  # TRL 1.16 never cuts prompts
            "rewards": {"weights": self.reward_weights, "functions": _reward_specs(reward_funcs, self.reward_weights)},
            "generation": {"max_new_tokens": self.max_completion_length, "temperature": self.temperature,
                           "top_p": self.top_p, "top_k": self.top_k},
            "grpo": {"num_generations": self.num_generations, "beta": self.beta, "epsilon": self.epsilon,
                     "epsilon_high": self.epsilon_high, "loss_type": self.loss_type,
                     "scale_rewards": self.scale_rewards, "num_iterations": mu,
                     "mask_truncated_completions": self.mask_truncated_completions,
                     "use_bias_correction_kl": self.use_bias_correction_kl,
                     "importance_sampling_level": self.importance_sampling_level,
                     "sapo_temperature_pos": self.sapo_temperature_pos, "sapo_temperature_neg": self.sapo_temperature_neg,
                     # TRL's bnpo averages token means over micro-batches of per_device_train_batch_size completions
                     "bnpo_batch_rows": self.per_device_train_batch_size * (1 if note is None else self.num_generations),
                     "top_entropy_quantile": self.top_entropy_quantile},
            "trainer": {"output_dir": str(out.parent), "run_name": out.name, "max_steps": steps,
                        "prompts_per_step": pps, "learning_rate": self.learning_rate,
                        "weight_decay": self.weight_decay, "adam_beta1": self.adam_beta1,
                        "adam_beta2": self.adam_beta2, "lr_scheduler": _SCHEDULERS[self.lr_scheduler_type],
                        "warmup_steps": warmup, "max_grad_norm": self.max_grad_norm, "seed": self.seed,
                        "logging_steps": every(self.logging_steps, "logging_steps"), "save_steps": save_every,
                        "save_total_limit": self.save_total_limit or 0,
                        "log_completions_steps": every(self.logging_steps, "logging_steps") if self.log_completions else 0,
                        "tensorboard": tensorboard, "eval_at_end": False,
                        "report_to": [r for r in report if r != "tensorboard"], "tracker_run_name": self.run_name},
        }
        for key, value in (self.mathgrpo_overrides or {}).items():
            *path, last = key.split(".")
            node = base
            for p in path:
                node = node.setdefault(p, {})
            node[last] = value
        try:
            return load_config(None, base=base)
        except ConfigError as e:
            raise ValueError(f"GRPOConfig: {e} (see docs/trl.md for which TRL option sets which mathgrpo key)") from None


def _report_to(value, warn: bool = True) -> list[str]:
    """TRL's report_to ("none", "all", a name or a list) as trainer.report_to names: "all" means every tracker
    mathgrpo supports whose library is installed, as transformers reads it; other integrations are ignored with a
    warning (metrics.jsonl in output_dir always holds every step)."""
    import importlib.util

    from .trackers import LIBRARIES

    names = [value] if isinstance(value, str) else list(value or [])
    if "all" in names:
        names = [n for n, (module, _) in LIBRARIES.items() if importlib.util.find_spec(module) is not None]
    names = [n for n in dict.fromkeys(names) if n != "none"]
    others = [n for n in names if n not in LIBRARIES]
    if others and warn:
        _warn(f"report_to={others}: not supported by mathgrpo (it logs to {', '.join(LIBRARIES)}); every step is "
              f"logged to output_dir/metrics.jsonl")
    return [n for n in names if n in LIBRARIES]


def _env(name: str, default: int) -> int:
    import os

    return int(os.environ.get(name, default))


def _reward_specs(funcs: list | None, weights: list | None) -> list[str]:
    if funcs is None:
        return [f"reward_funcs[{i}]" for i in range(len(weights))] if weights else Config().rewards.functions
    return [f"{getattr(f, '__module__', '?')}:{getattr(f, '__qualname__', type(f).__name__)}" for f in funcs]


def _need_size(what: str):
    raise ValueError(f"GRPOConfig.{what} needs the dataset size: call to_mathgrpo_config(train_size=len(dataset))")


# --- the trainer -------------------------------------------------------------------------------------------------

# mathgrpo metric name -> the name TRL logs it under (the rest keep their names).
_TRL_METRIC_NAMES = {
    "frac_zero_std": "frac_reward_zero_std", "completion_length_mean": "completions/mean_length",
    "completion_length_max": "completions/max_length", "truncated_frac": "completions/clipped_ratio",
    "lr": "learning_rate", "clip_ratio/region": "clip_ratio/region_mean", "clip_ratio/low": "clip_ratio/low_mean",
    "clip_ratio/high": "clip_ratio/high_mean",
    "num_tokens": "completion_tokens",  # TRL's num_tokens is a running total of prompt + completion tokens
}
_LAST_NOT_MEAN = ("learning_rate", "grad_norm")  # as transformers logs them: the value at the logging step
_ROW = "_trl_row"  # the extra Problem column through which a reward wrapper finds its dataset rows


class _DatasetPrompts:
    """A dataset's rows and ready-made prompts, as mathgrpo Problems plus the prompt builder the trainer asks for
    (`.ids(text)`, `.text(text)`, `.prefill`). The Problem text is the prompt as rendered for the model."""

    prefill = ""  # TRL hands completions to the rewards as generated, with nothing prepended

    def __init__(self, dataset, what: str, tokenizer, max_prompt_tokens: int | None, template_kwargs: dict | None):
        from .data import Problem

        self.rows = _rows(dataset, what)
        self.tokenizer, self.limit, self.cut, self._ids = tokenizer, max_prompt_tokens, 0, {}
        self.conversational = not isinstance(self.rows[0]["prompt"], str)  # TRL decides on the first example
        want = "a list of chat messages ({'role': ..., 'content': ...})" if self.conversational else "a string"
        for i, row in enumerate(self.rows):
            p = row["prompt"]
            ok = isinstance(p, str) if not self.conversational else (
                isinstance(p, list) and all(isinstance(m, dict) and "role" in m and "content" in m for m in p))
            if not ok:
                raise ValueError(f"{what} row {i}: 'prompt' must be {want}, as in row 0; got {p!r:.200}")
        texts = [self._render(r["prompt"], template_kwargs or {}, what, i) for i, r in enumerate(self.rows)]
        self.problems = [Problem(id=str(i), problem=t, gold="", solution="", extra={_ROW: i})
                         for i, t in enumerate(texts)]
        self.columns = [k for k in self.rows[0] if k not in ("prompt", "completion", "completion_ids")]

    def _render(self, prompt, kwargs: dict, what: str, i: int) -> str:
        if not self.conversational:
            return prompt
        try:
            return self.tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True, **kwargs)
        except Exception as e:  # noqa: BLE001 - jinja raises many types; say which row and tokenizer failed
            name = getattr(self.tokenizer, "name_or_path", type(self.tokenizer).__name__)
            raise ValueError(f"{what} row {i}: the chat template of tokenizer '{name}' failed on this prompt: "
                             f"{type(e).__name__}: {e}") from e

    def text(self, text: str) -> str:
        return text

    def ids(self, text: str) -> list[int]:
        if text not in self._ids:
            # A rendered chat template holds its own special tokens; a plain prompt gets the tokenizer's usual ones
            # (TRL's rule), unless it already starts with the BOS text, which would double it.
            bos = self.tokenizer.bos_token
            special = not self.conversational and not (bos and text.startswith(bos))
            ids = list(self.tokenizer(text, add_special_tokens=special)["input_ids"])
            if self.limit and len(ids) > self.limit:  # older TRL's max_prompt_length: keep the end
                if not self.cut:
                    _warn(f"max_prompt_length={self.limit}: a prompt of {len(ids)} tokens is cut from the left "
                          f"(as older TRL did; TRL 1.16 no longer cuts prompts); further cuts are not reported")
                self.cut += 1
                ids = ids[-self.limit:]
            self._ids[text] = ids
        return self._ids[text]

    def problem_set(self, what: str):
        from .data import ProblemSet

        return ProblemSet(train=self.problems, test=[], report=(
            f"{what}: {len(self.rows)} rows, prompts given as {'chat messages' if self.conversational else 'text'}; "
            f"columns passed to the reward functions: {', '.join(self.columns) or '(none)'}"))


def _rows(dataset, what: str) -> list[dict]:
    if dataset is None:
        raise ValueError(f"{what} is required")
    if hasattr(dataset, "to_list"):  # datasets.Dataset
        rows = dataset.to_list()
    elif hasattr(dataset, "to_dict") and hasattr(dataset, "columns"):  # a pandas DataFrame
        rows = dataset.to_dict("records")
    elif isinstance(dataset, (list, tuple)):
        rows = list(dataset)
    else:
        raise TypeError(f"{what}: expected a datasets.Dataset (a streaming IterableDataset has no length, so load "
                        f"a map-style one), a pandas DataFrame or a list of dicts; got {type(dataset).__name__}")
    if not rows:
        raise ValueError(f"{what} is empty")
    if not all(isinstance(r, dict) for r in rows) or "prompt" not in rows[0]:
        cols = list(rows[0]) if isinstance(rows[0], dict) else type(rows[0]).__name__
        raise ValueError(f"{what} needs a 'prompt' column (text, or a list of chat messages); its columns: {cols}")
    return rows


def _check_rewards(reward_funcs) -> list:
    import torch

    funcs = list(reward_funcs) if isinstance(reward_funcs, (list, tuple)) else [reward_funcs]
    if not funcs or funcs == [None]:
        raise ValueError("reward_funcs is required: give one or more functions f(prompts, completions, **kwargs)")
    for f in funcs:
        if isinstance(f, (str, torch.nn.Module)):
            raise NotImplementedError(f"reward_funcs: {f!r:.80} is a reward model; mathgrpo runs reward functions "
                                      f"only: pass f(prompts, completions, **kwargs) -> list[float | None]")
        if not callable(f):
            raise TypeError(f"reward_funcs: {f!r:.80} is not callable")
    return funcs


def _trl_reward(fn, prompts: _DatasetPrompts, extra_kwargs):
    """`fn` called as TRL calls it: prompts and completions as the dataset gives them (chat messages stay chat
    messages), completion_ids, every other dataset column by its name, trainer_state, log_extra, log_metric."""

    def reward(completions: list[str], **kw):
        rows = [prompts.rows[i] for i in kw[_ROW]]
        if prompts.conversational:
            completions = [[{"role": "assistant", "content": c}] for c in completions]
        out = fn(prompts=[r["prompt"] for r in rows], completions=completions, completion_ids=kw["completion_ids"],
                 **{k: [r.get(k) for r in rows] for k in prompts.columns}, **extra_kwargs())
        return asyncio.run(out) if inspect.isawaitable(out) else out  # async reward functions, as TRL allows

    reward.__name__ = getattr(fn, "__name__", type(fn).__name__)  # the name its metrics are logged under
    return reward


def _check_peft_targets(model, targets: list[str]) -> None:
    """peft's rule for a list of target_modules: names matching no layer are allowed while one matches (scripts
    written for several architectures list e.g. `dense` beside `q_proj`); a warning names both. None matching is
    an error listing the model's linear layers. (The native config, model.lora_target_modules, stays strict.)"""
    from .models import ModelError, match_lora_targets, validate_lora_targets

    found, missing = match_lora_targets(model, targets)
    if not found:
        try:
            validate_lora_targets(model, targets)
        except ModelError as e:
            raise ValueError(str(e).replace("model.lora_target_modules", "peft_config.target_modules")) from None
    if missing:
        _warn(f"peft_config.target_modules: {', '.join(missing)} match no layer of this model "
              f"({type(model).__name__}) and are skipped, as peft does; LoRA goes on {', '.join(found)}")


def _is_peft(model) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)


def _is_kbit(model) -> bool:
    return any(type(m).__name__ in ("Linear4bit", "Linear8bitLt") for m in model.modules())


def _unmark_gguf(model) -> None:
    """A model loaded from a GGUF file keeps transformers' GGUF quantizer attached even when its weights were
    dequantised into plain Linear layers (as on CPU): the marker alone makes transformers refuse to train or save
    it (TRL refuses it too). mathgrpo trains the dequantised weights, so the marker goes; weights still packed in
    GGUF blocks (transformers' `kernels` path) are refused with the way out."""
    q = getattr(model, "hf_quantizer", None)
    if type(q).__name__ != "GgufHfQuantizer":
        return
    if any(not p.is_floating_point() for p in model.parameters()):
        raise ValueError("the model holds GGUF-packed weights, which cannot be trained: load it with "
                         "quantization_config=GgufConfig(dequantize=True), or pass the .gguf path as model=")
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


class GRPOTrainer:
    """TRL's GRPOTrainer signature on mathgrpo's engine (see the module docstring and docs/trl.md)."""

    def __init__(self, model, reward_funcs=None, args: GRPOConfig | None = None, train_dataset=None,
                 eval_dataset=None, processing_class=None, reward_processing_classes=None, callbacks=None,
                 optimizers=(None, None), quantization_config=None, peft_config=None, **unsupported):
        import torch

        bad = {k: v for k, v in unsupported.items() if v is not None}
        if optimizers not in ((None, None), [None, None], None):
            bad["optimizers"] = optimizers
        if reward_processing_classes is not None:
            bad["reward_processing_classes"] = reward_processing_classes
        if bad:
            raise NotImplementedError(f"GRPOTrainer: {', '.join(bad)} not supported by mathgrpo (it builds "
                                      f"torch AdamW from the config and runs reward functions only)")
        if args is None:
            name = model if isinstance(model, str) else getattr(model.config, "_name_or_path", "model")
            args = GRPOConfig(f"{Path(str(name)).name}-GRPO")
        self.args = args
        self.reward_funcs = _check_rewards(reward_funcs)
        from .trackers import check_installed

        check_installed(_report_to(args.report_to, warn=False))  # as transformers, before the model is loaded
        if args.reward_weights is not None and len(args.reward_weights) != len(self.reward_funcs):
            raise ValueError(f"GRPOConfig.reward_weights has {len(args.reward_weights)} values but "
                             f"{len(self.reward_funcs)} reward functions were given")  # before loading the model
        torch.manual_seed(args.seed)  # LoRA weights are initialised randomly: seed first, as TRL does
        self.model, self.processing_class = self._prepare_model(model, processing_class, peft_config,
                                                                quantization_config)
        self.tokenizer = self.processing_class
        self.train_dataset, self.eval_dataset = train_dataset, eval_dataset
        self._train = _DatasetPrompts(train_dataset, "train_dataset", self.processing_class, args.max_prompt_length,
                                      args.chat_template_kwargs)
        on_cuda = next(self.model.parameters()).device.type == "cuda"
        cfg = args.to_mathgrpo_config(train_size=len(self._train.rows), on_cuda=on_cuda, reward_funcs=self.reward_funcs)
        cfg.model.name_or_path = str(model if isinstance(model, str) else getattr(model.config, "_name_or_path", ""))
        cfg.model.lora = _is_peft(self.model)
        # Replicated weights under torchrun: this front door saves checkpoints and models, and evaluates, on
        # rank 0 alone, which an FSDP2-sharded model cannot do (its weights are gathered by every rank).
        cfg.trainer.fsdp = "off"
        if cfg.model.lora:
            from .models import match_lora_targets

            lc = self.model.peft_config[self.model.active_adapter]
            targets = lc.target_modules
            cfg.model.lora_r, cfg.model.lora_alpha = lc.r, lc.lora_alpha
            cfg.model.lora_dropout = 0.0 if args.disable_dropout else lc.lora_dropout
            # peft resolves "all-linear" into module paths; the short names select the same layers
            cfg.model.lora_target_modules = [targets] if isinstance(targets, str) else \
                match_lora_targets(self.model, sorted({name.rsplit(".", 1)[-1] for name in targets}))[0]
        if eval_dataset is not None and args.eval_strategy != "no":
            _warn(f"eval_strategy={args.eval_strategy!r}: mathgrpo does not evaluate during training; it evaluates "
                  f"eval_dataset once, after training (or call trainer.evaluate())")
        # Trackers other than TensorBoard get what TRL hands them (its metric names, every logging_steps, eval_x as
        # eval/x), as transformers' integrations log on_log; so the engine itself does not report to them.
        self._report_to, cfg.trainer.report_to, self._trackers = cfg.trainer.report_to, [], None
        self.cfg = cfg
        from transformers.trainer_callback import TrainerControl, TrainerState

        self.state, self.control = TrainerState(), TrainerControl()
        self.state.is_local_process_zero = args.local_process_index == 0
        self.state.is_world_process_zero = self.is_main = args.process_index == 0
        self.callbacks = []
        for cb in callbacks or []:
            self.add_callback(cb)
        self._pending: list[dict] = []
        self._extra_metrics: dict[str, list[float]] = {}
        self.extra_log_columns: dict[str, list] = {}
        self._event("on_init_end")

    # --- model --------------------------------------------------------------------------------------------------
    def _prepare_model(self, model, tok, peft_config, quantization_config):
        import torch

        from .config import ModelConfig
        from .models import load_model, prepare_tokenizer

        a = self.args
        if isinstance(model, str):
            mik = dict(a.model_init_kwargs or {})
            if quantization_config is not None:
                mik["quantization_config"] = quantization_config
            q = mik.pop("quantization_config", None)
            dtype = str(mik.pop("dtype", mik.pop("torch_dtype", "auto"))).replace("torch.", "")
            attn = mik.pop("attn_implementation", "sdpa")
            mik.pop("trust_remote_code", None)
            if mik:
                _warn(f"model_init_kwargs {sorted(mik)}: not supported by mathgrpo's model loader (ignored)")
            device = f"cuda:{_env('LOCAL_RANK', 0)}" if a.world_size > 1 and torch.cuda.is_available() else "auto"
            mcfg = ModelConfig(name_or_path=model, dtype=dtype, attn_implementation=attn, lora=False, device=device,
                               trust_remote_code=a.trust_remote_code,
                               quantization="nf4" if q is not None and getattr(q, "load_in_4bit", False) else None)
            model, loaded_tok = load_model(mcfg)  # frozen base; adapters are added below
            tok = tok if tok is not None else loaded_tok
        elif tok is None:
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(model.config._name_or_path, trust_remote_code=a.trust_remote_code)
        tok = prepare_tokenizer(tok)
        _unmark_gguf(model)
        model.config.pad_token_id = tok.pad_token_id
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.pad_token_id = tok.pad_token_id
        lora = peft_config is not None or _is_peft(model)
        if peft_config is not None:
            from peft import get_peft_model, prepare_model_for_kbit_training

            if _is_peft(model):
                raise ValueError("GRPOTrainer: the model already carries peft adapters; pass peft_config=None to train "
                                 "them, or pass the base model")
            targets = getattr(peft_config, "target_modules", None)
            if isinstance(targets, (list, set, tuple)):
                _check_peft_targets(model, sorted(targets))
            if _is_kbit(model):
                model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=a.gradient_checkpointing)
            model = get_peft_model(model, peft_config)
        elif not lora:
            model.requires_grad_(True)  # no peft_config: full fine-tuning, as TRL
        elif not any(p.requires_grad for p in model.parameters()):  # PeftModel.from_pretrained loads frozen
            for name, p in model.named_parameters():
                p.requires_grad_("lora_" in name)
        if a.disable_dropout:  # as TRL: every dropout module of the policy (LoRA's included) at p = 0
            for m in model.modules():
                if isinstance(m, torch.nn.Dropout):
                    m.p = 0.0
        if a.gradient_checkpointing:
            from .models import enable_checkpointing

            enable_checkpointing(model)
            if lora:
                model.enable_input_require_grads()
        model.train()
        return model, tok

    # --- callbacks ----------------------------------------------------------------------------------------------
    def add_callback(self, callback) -> None:
        self.callbacks.append(callback() if isinstance(callback, type) else callback)

    def pop_callback(self, callback):
        for cb in self.callbacks:
            if cb is callback or (isinstance(callback, type) and isinstance(cb, callback)):
                self.callbacks.remove(cb)
                return cb
        return None

    def remove_callback(self, callback) -> None:
        self.pop_callback(callback)

    def _event(self, name: str, **kwargs):
        for cb in self.callbacks:
            hook = getattr(cb, name, None)
            if hook is None:
                continue
            out = hook(self.args, self.state, self.control, model=self.model, processing_class=self.processing_class,
                       tokenizer=self.processing_class, optimizer=None, lr_scheduler=None, train_dataloader=None,
                       eval_dataloader=None, **kwargs)
            if out is not None:
                self.control = out
        return self.control

    def log(self, logs: dict) -> None:
        """Record `logs` in state.log_history and hand them to the callbacks' on_log, as transformers does."""
        if self.state.epoch is not None:
            logs = {**logs, "epoch": round(self.state.epoch, 4)}
        self.state.log_history.append({**logs, "step": self.state.global_step})
        self.control.should_log = False
        if self._trackers is not None:
            self._trackers.log(self.state.global_step, {(f"eval/{k[5:]}" if k.startswith("eval_") else f"train/{k}"): v
                                                        for k, v in logs.items()}, prefix="")
        self._event("on_log", logs=logs)

    def _open_trackers(self, resume: bool):
        """The trackers of report_to (TensorBoard aside: the engine writes it), on rank 0, named run_name (default:
        output_dir's name), with TRL's options and the mathgrpo config they mean."""
        from .trackers import Trackers

        if not self._report_to or not self.is_main:
            return None
        out = Path(self.args.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        config = json.loads(json.dumps({"trl": self.args.to_dict(), **dataclasses.asdict(self.cfg)}, default=str))
        return Trackers(self._report_to, out, self.args.run_name or out.resolve().name, config, resume=resume)

    def _reward_kwargs(self) -> dict:
        def log_metric(name: str, value: float) -> None:
            self._extra_metrics.setdefault(name, []).append(float(value))

        def log_extra(column: str, values: list) -> None:
            self.extra_log_columns[column] = list(values)

        return {"trainer_state": self.state, "log_extra": log_extra, "log_metric": log_metric}

    def _after_step(self, step: int, metrics: dict):
        """mathgrpo's per-step callback: TRL-named logs every logging_steps, checkpoints in TRL's layout, hooks."""
        t = self.cfg.trainer
        prev_epoch = self.state.epoch or 0.0
        self.state.global_step = step
        self.state.epoch = step * t.prompts_per_step / len(self._train.rows)
        row = {_TRL_METRIC_NAMES.get(k, k): v for k, v in metrics.items()}
        row.update({k: sum(v) / len(v) for k, v in self._extra_metrics.items()})
        self._extra_metrics.clear()
        self._pending.append(row)
        self._event("on_step_end")
        last = step == t.max_steps
        if step % t.logging_steps == 0 or last or (step == 1 and self.args.logging_first_step) or self.control.should_log:
            self.log(_window_mean(self._pending))
            self._pending = []
        if self.args.save_strategy != "no" and (step % t.save_steps == 0 or last or self.control.should_save):
            if self.is_main:  # under torchrun every rank runs this callback; rank 0 writes
                self._save_checkpoint(step)
            self.control.should_save = False
            self._event("on_save")
        if math.floor(self.state.epoch) > math.floor(prev_epoch):
            self._event("on_epoch_end")
            if not last:
                self._event("on_epoch_begin")
        if not last:
            self._event("on_step_begin")
        return self.control.should_training_stop

    # --- checkpoints --------------------------------------------------------------------------------------------
    def _save_checkpoint(self, step: int) -> Path:
        """output_dir/checkpoint-<step>/: the adapter (or model), tokenizer and trainer_state.json, as TRL writes
        them; written to a temp folder and renamed, and only the last save_total_limit are kept. mathgrpo's own
        resume state (optimizer, RNG, data position) lives in output_dir/checkpoints/checkpoint-<step>/."""
        from .checkpoint import save_weights

        out = Path(self.args.output_dir)
        final, tmp = out / f"checkpoint-{step}", out / f".tmp-checkpoint-{step}"
        shutil.rmtree(tmp, ignore_errors=True)
        save_weights(self.model, tmp)
        self.processing_class.save_pretrained(tmp)
        self.state.save_to_json(str(tmp / "trainer_state.json"))
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        keep = self.args.save_total_limit
        if keep:
            for old in _trl_checkpoints(out)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
        return final

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """The trained adapter (or full model) and the tokenizer into output_dir (default: args.output_dir)."""
        from .checkpoint import save_weights

        if not self.is_main:
            return
        path = Path(output_dir or self.args.output_dir)
        path.mkdir(parents=True, exist_ok=True)
        save_weights(self.model, path)
        self.processing_class.save_pretrained(path)

    def _resume_from(self, spec) -> Path | None:
        from .checkpoint import list_checkpoints

        out = Path(self.args.output_dir)
        if spec in (None, False):
            return None
        if spec is True:
            if not list_checkpoints(out):
                raise ValueError(f"resume_from_checkpoint=True: no checkpoint in {out}/checkpoints (written by a "
                                 f"previous GRPOTrainer.train() of mathgrpo)")
            return list_checkpoints(out)[-1]
        p = Path(spec)
        if p.name.startswith("checkpoint-") and (p.parent / "checkpoints" / p.name / "training_state.pt").is_file():
            return p.parent / "checkpoints" / p.name  # a TRL-layout folder: its resume state sits beside
        if (p / "training_state.pt").is_file():
            return p
        raise ValueError(f"resume_from_checkpoint={spec!r}: not a checkpoint written by mathgrpo's GRPOTrainer "
                         f"(it needs the optimizer/RNG state in <output_dir>/checkpoints/checkpoint-<step>)")

    def _clear_previous_run(self) -> None:
        """A fresh run replaces an earlier one in output_dir (as TRL overwrites), so that its logs, checkpoints and
        pruning do not mix with the new run's."""
        out = Path(self.args.output_dir)
        old = [out / n for n in ("metrics.jsonl", "completions.jsonl", "summary.json", "checkpoints", "config.yaml",
                                 "resumes.jsonl", "trackers.json") if (out / n).exists()]
        old += _trl_checkpoints(out)
        if old and not self.args.overwrite_output_dir:
            _warn(f"output_dir {out} holds an earlier run: its logs and checkpoints are replaced (resume it instead "
                  f"with trainer.train(resume_from_checkpoint=True))")
        for p in old:
            shutil.rmtree(p) if p.is_dir() else p.unlink()

    # --- training and evaluation --------------------------------------------------------------------------------
    def train(self, resume_from_checkpoint=None, **kwargs):
        from transformers.trainer_utils import TrainOutput

        from .trainer import train

        if kwargs:
            raise TypeError(f"GRPOTrainer.train() got unexpected argument(s) {sorted(kwargs)}")
        cfg = dataclasses.replace(self.cfg, trainer=dataclasses.replace(self.cfg.trainer))
        start = self._resume_from(resume_from_checkpoint)
        t = cfg.trainer
        self.state.max_steps, self.state.logging_steps, self.state.save_steps = t.max_steps, t.logging_steps, t.save_steps
        self.state.num_train_epochs = math.ceil(t.max_steps * t.prompts_per_step / len(self._train.rows))
        self.state.train_batch_size = self.args.per_device_train_batch_size
        self.state.global_step, self.state.epoch, self.state.log_history = 0, 0.0, []
        if start is not None:
            t.resume = str(start)
            step = int(start.name.split("-")[-1])
            trl_state = Path(self.args.output_dir) / start.name / "trainer_state.json"
            if trl_state.is_file():
                self.state.log_history = [h for h in json.loads(trl_state.read_text())["log_history"] if h["step"] <= step]
            self.state.global_step, self.state.epoch = step, step * t.prompts_per_step / len(self._train.rows)
        elif self.is_main:
            self._clear_previous_run()
        self._pending = []
        self._event("on_train_begin")
        self._event("on_epoch_begin")
        self._event("on_step_begin")
        t0 = time.perf_counter()
        rewards = [_trl_reward(f, self._train, self._reward_kwargs) for f in self.reward_funcs]
        first = self.state.global_step
        self._trackers = self._open_trackers(resume=start is not None)
        try:
            train(cfg, quiet=self.args.disable_tqdm, model=self.model, tokenizer=self.processing_class,
                  data=self._train.problem_set("train_dataset"), prompts=self._train, reward_funcs=rewards,
                  callbacks=[self._after_step])
        except BaseException:
            self._close_trackers()
            raise
        runtime = time.perf_counter() - t0
        done = self.state.global_step - first
        losses = [h["loss"] for h in self.state.log_history if "loss" in h and h["step"] > first and h["loss"] is not None]
        summary = {"train_runtime": round(runtime, 4),
                   "train_samples_per_second": round(done * t.prompts_per_step / runtime, 3),
                   "train_steps_per_second": round(done / runtime, 3),
                   "train_loss": sum(losses) / len(losses) if losses else float("nan")}
        self.log(summary)
        self._event("on_train_end")
        if self.eval_dataset is not None and self.args.eval_strategy != "no":
            self.evaluate()
        self._close_trackers()
        return TrainOutput(self.state.global_step, summary["train_loss"], summary)

    def _close_trackers(self) -> None:
        if self._trackers is not None:
            self._trackers.close()
            self._trackers = None

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict:
        """Sample num_generations completions for every eval prompt and average the rewards (TRL's eval metrics)."""
        import numpy as np

        from .rewards import RewardSet
        from .rollout import make_rollout, sampling_from

        ds = _DatasetPrompts(eval_dataset if eval_dataset is not None else self.eval_dataset, "eval_dataset",
                             self.processing_class, self.args.max_prompt_length, self.args.chat_template_kwargs)
        G, cfg = self.cfg.grpo.num_generations, self.cfg
        weights = cfg.rewards.weights or [1.0] * len(self.reward_funcs)
        rs = RewardSet([(_trl_reward(f, ds, self._reward_kwargs), w) for f, w in zip(self.reward_funcs, weights)])
        comp = make_rollout(cfg.generation, self.model, self.processing_class).generate(
            [ds.ids(p.problem) for p in ds.problems], G, sampling_from(cfg.generation, seed=cfg.trainer.seed))
        per, total = rs.score(comp.texts, completion_ids=[r[m.bool()].tolist() for r, m in
                                                          zip(comp.completion_ids, comp.completion_mask)],
                              **{_ROW: [i for i in range(len(ds.rows)) for _ in range(G)]})
        m = {"reward": float(total.mean()), "reward_std": float(total.std()),
             "completions/mean_length": float(comp.lengths.float().mean()),
             "completions/clipped_ratio": float(comp.truncated.float().mean())}
        for j, name in enumerate(rs.names):
            m[f"rewards/{name}/mean"] = float(np.nanmean(per[:, j])) if np.isfinite(per[:, j]).any() else None
        metrics = {f"{metric_key_prefix}_{k}": v for k, v in m.items()}
        opened = self._trackers is None  # called on its own: continue the training run's tracker runs
        if opened:
            self._trackers = self._open_trackers(resume=True)
        try:
            self.log(metrics)
        finally:
            if opened:
                self._close_trackers()
        self._event("on_evaluate", metrics=metrics)
        return metrics


def _window_mean(rows: list[dict]) -> dict:
    """Metrics averaged over the steps since the last log (NaN/None skipped), as TRL does; lr and grad norm are
    the last step's, as transformers logs them."""
    out = {}
    for key in dict.fromkeys(k for r in rows for k in r):
        vals = [r[key] for r in rows if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
        if key in _LAST_NOT_MEAN:
            out[key] = vals[-1] if vals else None
        else:
            out[key] = sum(vals) / len(vals) if vals else None
    return out


def _trl_checkpoints(out: Path) -> list[Path]:
    found = [p for p in Path(out).glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()]
    return sorted(found, key=lambda p: int(p.name.split("-")[-1]))
