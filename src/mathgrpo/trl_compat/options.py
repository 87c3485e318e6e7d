"""The TRL options the front door knows: those mathgrpo honours (with TRL 1.16's defaults), those it ignores, those
it refuses, and the warning they raise. `GRPOConfig` (grpo_config.py) sorts a script's options with these tables."""

from __future__ import annotations

import dataclasses
import difflib
import os
import sys
import warnings
from dataclasses import dataclass
from typing import Any


class TRLCompatWarning(UserWarning):
    """An option of a TRL script that mathgrpo reads differently from TRL 1.16, or ignores."""


_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


def warn(msg: str) -> None:
    """Warn at the user's line (the first caller outside this package), where the option was given."""
    level, frame = 2, sys._getframe(1)
    while frame is not None and os.path.dirname(os.path.abspath(frame.f_code.co_filename)) == _PACKAGE_DIR:
        level, frame = level + 1, frame.f_back
    warnings.warn(msg, TRLCompatWarning, stacklevel=level)


def env(name: str, default: int) -> int:
    """An integer from torchrun's environment (WORLD_SIZE, RANK, LOCAL_RANK)."""
    return int(os.environ.get(name, default))


@dataclass
class Options:
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
    min_p: float | None = None
    repetition_penalty: float = 1.0
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
    steps_per_generation: int | None = None  # None: gradient_accumulation_steps (one optimizer step per rollout)
    generation_batch_size: int | None = None  # completions per rollout (all ranks); exclusive with the above
    delta: float | None = None
    entropy_coef: float = 0.0
    multi_objective_aggregation: str = "sum_then_normalize"  # -> grpo.reward_aggregation
    sync_ref_model: bool = False  # -> grpo.ref_sync_steps (0 when off)
    ref_model_sync_steps: int = 512
    ref_model_mixup_alpha: float = 0.6
    use_adaptive_entropy: bool = False  # -> grpo.entropy_target (None when off)
    entropy_coef_min: float = 0.0
    entropy_coef_max: float = 1.0
    entropy_coef_delta: float = 0.005
    entropy_target: float = 0.2
    off_policy_mask_threshold: float | None = None
    # TRL's vLLM correction: mathgrpo always samples with an engine of its own, as TRL's vLLM path does
    vllm_importance_sampling_correction: bool = True
    vllm_importance_sampling_mode: str = "sequence_mask"
    vllm_importance_sampling_clip_max: float | None = 3.0
    vllm_importance_sampling_clip_min: float | None = None


OPTION_NAMES = frozenset(f.name for f in dataclasses.fields(Options))

# TRL 1.16 GRPOConfig options mathgrpo does not honour, with their defaults (passing the default asks for nothing).
TRL_ONLY = {
    "router_aux_loss_coef": None, "cast_lm_head_to_fp32": False,
    "remove_unused_columns": False, "num_generations_eval": None, "ds3_gather_for_generation": True,
    "shuffle_dataset": True, "pad_to_multiple_of": "auto", "generation_kwargs": None,
    "cache_implementation": None, "vllm_mode": "colocate", "vllm_model_impl": "vllm",
    "vllm_enable_sleep_mode": False, "vllm_structured_outputs_regex": None, "vllm_server_base_url": None,
    "vllm_server_host": "0.0.0.0", "vllm_server_port": 8000, "vllm_server_timeout": 240.0, "vllm_group_port": 51216,
    "vllm_gpu_memory_utilization": 0.3, "vllm_max_model_length": None, "vllm_tensor_parallel_size": 1,
    "vespo_k_pos": 2.0, "vespo_lambda_pos": 3.0,
    "vespo_k_neg": 3.0, "vespo_lambda_neg": 2.0,
    "max_tool_calling_iterations": None, "log_multimodal": True,
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
REFUSED: dict = {}
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
SCHEDULERS = {"linear": "linear", "cosine": "cosine", "constant": "constant",
              "constant_with_warmup": "constant_with_warmup"}
SAVE_STRATEGIES = ("steps", "epoch", "no")
_MISSING = object()


def _default_of(name: str) -> Any:
    if name in TRL_ONLY:
        return TRL_ONLY[name]
    from transformers import TrainingArguments  # only for names outside the tables above

    for f in dataclasses.fields(TrainingArguments):
        if f.name == name:
            if f.default is not dataclasses.MISSING:
                return f.default
            return f.default_factory() if f.default_factory is not dataclasses.MISSING else None
    return _MISSING


def sort_others(others: dict) -> dict:
    """The options outside `Options` that ask for something (not their default): refused ones and typos raise,
    the ignored ones are named in one warning and returned."""
    refused = {k: v for k, v in others.items() if k in REFUSED and v != REFUSED[k]}
    if refused:
        raise ValueError("GRPOConfig: " + "; ".join(f"{k}={v!r}" for k, v in refused.items())
                         + " would change the objective or the batch in a way mathgrpo does not implement "
                         "(remove the option(s); see docs/trl.md)")
    others = {k: v for k, v in others.items() if k not in REFUSED}
    defaults = {k: _default_of(k) for k in others}
    unknown = [k for k, d in defaults.items() if d is _MISSING]
    if unknown:
        known = sorted(OPTION_NAMES | set(TRL_ONLY) | set(REFUSED))
        hints = [f"{k!r}" + (f" (did you mean {m[0]!r}?)" if (m := difflib.get_close_matches(k, known, 1)) else "")
                 for k in unknown]
        raise TypeError(f"GRPOConfig got unexpected option(s) {', '.join(hints)}: neither TRL's GRPOConfig nor "
                        f"transformers' TrainingArguments has them")
    ignored = {k: v for k, v in others.items() if v != defaults[k] and v not in _SAME_AS_OURS.get(k, ())}
    if ignored:
        warn("GRPOConfig ignores option(s) mathgrpo does not support: "
             + "; ".join(f"{k}={v!r} ({_why_ignored(k)})" for k, v in ignored.items()))
    return ignored


def _why_ignored(name: str) -> str:
    return next((why for prefix, why in _IGNORED_WHY.items() if name.startswith(prefix)), "not supported")


def report_to_names(value, warn_others: bool = True) -> list[str]:
    """TRL's report_to ("none", "all", a name or a list) as trainer.report_to names: "all" means every tracker
    mathgrpo supports whose library is installed, as transformers reads it; other integrations are ignored with a
    warning (metrics.jsonl in output_dir always holds every step)."""
    import importlib.util

    from ..trackers import LIBRARIES

    names = [value] if isinstance(value, str) else list(value or [])
    if "all" in names:
        names = [n for n, (module, _) in LIBRARIES.items() if importlib.util.find_spec(module) is not None]
    names = [n for n in dict.fromkeys(names) if n != "none"]
    others = [n for n in names if n not in LIBRARIES]
    if others and warn_others:
        warn(f"report_to={others}: not supported by mathgrpo (it logs to {', '.join(LIBRARIES)}); every step is "
             f"logged to output_dir/metrics.jsonl")
    return [n for n in names if n in LIBRARIES]
