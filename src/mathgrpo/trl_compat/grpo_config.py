"""The front door's `GRPOConfig`: TRL's option names and defaults, and their translation to mathgrpo's `Config`.

Not to be confused with `mathgrpo.config.GRPOConfig`, the native config's `grpo:` section (num_generations, beta,
loss_type, ...), which `to_mathgrpo_config()` fills as `Config.grpo`. TRL scripts import this one, by this name.
"""

from __future__ import annotations

import dataclasses
import json
import math
import typing
from pathlib import Path

from ..config import Config, ConfigError, load_config
from ..registry import lookup
from ..settings import coerce
from .options import OPTION_NAMES, SAVE_STRATEGIES, SCHEDULERS, Options, env, report_to_names, sort_others, warn
from .rewards import reward_specs


class GRPOConfig(Options):
    """TRL's GRPOConfig (`from mathgrpo import GRPOConfig` in a TRL script): TRL 1.16's option names and defaults;
    `to_mathgrpo_config()` gives the mathgrpo Config it means. (mathgrpo.config.GRPOConfig is something else: the
    native config's `grpo:` section, which the translation fills.)"""

    def __init__(self, output_dir: str | None = None, **options):
        super().__init__(output_dir=output_dir, **{k: v for k, v in options.items() if k in OPTION_NAMES})
        hints = typing.get_type_hints(Options)
        for f in dataclasses.fields(Options):  # scripts pass e.g. overwrite_output_dir='True'
            setattr(self, f.name, coerce(getattr(self, f.name), hints[f.name], f"GRPOConfig.{f.name}"))
        self.output_dir = self.output_dir or "trainer_output"
        self.scale_rewards = {True: "group", False: "none"}.get(self.scale_rewards, self.scale_rewards)
        if self.bf16 is None:
            self.bf16 = not self.fp16
        if self.save_strategy not in SAVE_STRATEGIES:
            raise ValueError(f"GRPOConfig.save_strategy={self.save_strategy!r}: mathgrpo supports "
                             f"{', '.join(SAVE_STRATEGIES)} ('best' needs periodic evaluation, which it does not run)")
        self.ignored_options = sort_others({k: v for k, v in options.items() if k not in OPTION_NAMES})
        if self.use_vllm:
            warn("use_vllm=True: mathgrpo generates with its own engine (CUDA graphs and a static KV cache on a GPU, "
                 "transformers generate on a CPU), not vLLM; the vllm_* options are ignored but for "
                 "vllm_importance_sampling_*, the correction of the sampler's mismatch, which mathgrpo applies too")

    # TrainingArguments attributes that transformers callbacks read (torchrun's environment, as accelerate's).
    world_size = property(lambda self: env("WORLD_SIZE", 1))
    process_index = property(lambda self: env("RANK", 0))
    local_process_index = property(lambda self: env("LOCAL_RANK", 0))
    should_log = should_save = property(lambda self: env("RANK", 0) == 0)

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), **self.ignored_options}

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, default=str)

    def mini_batches(self) -> int:
        """Optimizer steps per rollout: TRL generates per_device_train_batch_size x steps_per_generation (x ranks)
        completions at once (or generation_batch_size) and takes gradient_accumulation_steps of those per-device
        batches per optimizer step."""
        ga, ranks, per = self.gradient_accumulation_steps, self.world_size, self.per_device_train_batch_size
        if self.generation_batch_size is not None and self.steps_per_generation is not None:
            raise ValueError("GRPOConfig: generation_batch_size and steps_per_generation are mutually exclusive "
                             "(as in TRL)")
        steps = self.steps_per_generation
        if self.generation_batch_size is not None:
            if self.generation_batch_size % (per * ranks):
                raise ValueError(f"GRPOConfig.generation_batch_size={self.generation_batch_size} must be a multiple "
                                 f"of per_device_train_batch_size x ranks = {per * ranks} (as in TRL)")
            steps = self.generation_batch_size // (per * ranks)
        steps = ga if steps is None else steps
        if steps % ga:
            raise ValueError(f"GRPOConfig: steps_per_generation={steps} is not a multiple of "
                             f"gradient_accumulation_steps={ga}: mathgrpo runs whole optimizer steps on each rollout "
                             f"(steps_per_generation / gradient_accumulation_steps of them)")
        return steps // ga

    def prompts_per_step(self) -> tuple[int, str | None]:
        """(prompts per rollout, a note when the batch size is read as prompts rather than completions).

        TRL counts completions: per_device_train_batch_size x gradient_accumulation_steps (x ranks) of them make
        one optimizer step, i.e. that / num_generations prompts, and a rollout holds `mini_batches()` optimizer
        steps' worth. When that is not a whole number of prompts (TRL 1.16 refuses such a config), the product is
        read as a count of prompts, each with num_generations completions."""
        ranks = self.world_size
        completions = self.per_device_train_batch_size * self.gradient_accumulation_steps * ranks * self.mini_batches()
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
        pps, note = self.prompts_per_step()
        if note:
            warn(note)
        steps, per_epoch = _run_length(self, train_size, pps)
        save_every = _save_every(self, steps, per_epoch)
        scheduler, warmup = _schedule(self, steps)
        dtype = _dtype(self, on_cuda)
        report = _report(self)
        base = {
            "model": _model_section(self, dtype),
            "prompt": {"max_prompt_tokens": self.max_prompt_length or 10**9},  # TRL 1.16 never cuts prompts
            "rewards": {"weights": self.reward_weights, "functions": reward_specs(reward_funcs, self.reward_weights)},
            "generation": {"max_new_tokens": self.max_completion_length, "temperature": self.temperature,
                           "top_p": self.top_p, "top_k": self.top_k, "min_p": self.min_p or 0.0,
                           "repetition_penalty": self.repetition_penalty},
            "grpo": _grpo_section(self, batch_counts_prompts=note is not None),
            "trainer": {**_trainer_section(self, steps, pps, scheduler, warmup, report), "save_steps": save_every},
        }
        _apply_overrides(base, self.mathgrpo_overrides or {})
        try:
            return load_config(None, base=base)
        except ConfigError as e:
            raise ValueError(f"GRPOConfig: {e} (see docs/trl.md for which TRL option sets which mathgrpo key)") from None


# --- the translation, piece by piece (in the order its warnings and errors come) ---------------------------------

def _run_length(args: GRPOConfig, train_size: int | None, pps: int) -> tuple[int, int | None]:
    """(mathgrpo steps, steps per epoch or None): TRL's max_steps or num_train_epochs, in rollouts."""
    mu = args.num_iterations * args.mini_batches()  # optimizer steps per rollout
    per_epoch = math.ceil(train_size / pps) if train_size else None
    if args.max_steps > 0:
        steps = math.ceil(args.max_steps / mu)
    elif per_epoch:
        steps = max(1, math.ceil(args.num_train_epochs * train_size / pps))
    else:
        raise ValueError("GRPOConfig.max_steps=-1 needs the dataset size to count num_train_epochs: set max_steps "
                         "or call to_mathgrpo_config(train_size=len(train_dataset))")
    if mu > 1:
        warn(f"num_iterations={args.num_iterations} x {args.mini_batches()} mini-batch(es): a mathgrpo step is one "
             f"rollout followed by {mu} optimizer steps, so max_steps, logging_steps and save_steps (TRL counts "
             f"optimizer steps) are divided by {mu}: {steps} steps")
    return steps, per_epoch


def _every(args: GRPOConfig, what: str, steps: int) -> int:
    """An interval option (logging_steps, save_steps) in mathgrpo steps; TRL: < 1 is a fraction of the run."""
    value = getattr(args, what)
    n = math.ceil(value * steps) if 0 < value < 1 else math.ceil(value / (args.num_iterations * args.mini_batches()))
    if n < 1:
        raise ValueError(f"GRPOConfig.{what} must be > 0, got {value}")
    return n


def _save_every(args: GRPOConfig, steps: int, per_epoch: int | None) -> int:
    if args.save_strategy == "no":
        return steps + 1
    if args.save_strategy == "epoch":
        if not per_epoch:
            raise ValueError("GRPOConfig.save_strategy='epoch' needs the dataset size: call "
                             "to_mathgrpo_config(train_size=len(dataset))")
        return per_epoch
    return _every(args, "save_steps", steps)


def _schedule(args: GRPOConfig, steps: int) -> tuple[str, int]:
    """(trainer.lr_scheduler, trainer.warmup_steps in optimizer steps)."""
    scheduler = lookup(SCHEDULERS, args.lr_scheduler_type, "GRPOConfig.lr_scheduler_type",
                       hint=" (the TRL schedulers mathgrpo supports)")
    warm = args.warmup_ratio if args.warmup_ratio is not None else args.warmup_steps
    warmup = math.ceil(warm * steps * args.num_iterations * args.mini_batches()) if 0 < warm < 1 else int(warm)
    if scheduler == "constant" and warmup:  # transformers' `constant` ignores the warm-up; so does mathgrpo's
        warn(f"lr_scheduler_type='constant' has no warm-up (in transformers too): warmup_steps={warm} is ignored; "
             f"use 'constant_with_warmup' to warm up")
        warmup = 0
    return scheduler, warmup


def _dtype(args: GRPOConfig, on_cuda: bool) -> str:
    if (args.bf16 or args.fp16) and not on_cuda:
        warn(f"{'bf16' if args.bf16 else 'fp16'}=True on a CPU (TRL 1.16 fails here): training in float32")
        return "float32"
    if args.fp16:
        warn("fp16=True: weights are loaded in float16 (LoRA adapters stay float32) without loss scaling; "
             "bf16 is safer where the GPU has it")
        return "float16"
    return "bfloat16" if args.bf16 else "float32"


def _report(args: GRPOConfig) -> list[str]:
    report = report_to_names(args.report_to)
    if args.logging_dir:
        warn(f"logging_dir={args.logging_dir!r}: mathgrpo writes TensorBoard logs to output_dir/tensorboard "
             f"(with report_to='tensorboard') and every step to output_dir/metrics.jsonl")
    return report


def _model_section(args: GRPOConfig, dtype: str) -> dict:
    attn = dict(args.model_init_kwargs or {}).get("attn_implementation", "sdpa")
    return {"dtype": dtype, "gradient_checkpointing": args.gradient_checkpointing,
            "trust_remote_code": args.trust_remote_code, "attn_implementation": attn}


def _grpo_section(args: GRPOConfig, batch_counts_prompts: bool) -> dict:
    return {"num_generations": args.num_generations, "beta": args.beta, "epsilon": args.epsilon,
            "epsilon_high": args.epsilon_high, "loss_type": args.loss_type,
            "scale_rewards": args.scale_rewards, "reward_aggregation": args.multi_objective_aggregation,
            "ref_sync_steps": args.ref_model_sync_steps if args.sync_ref_model else 0,
            "ref_sync_alpha": args.ref_model_mixup_alpha,
            "num_iterations": args.num_iterations,
            "mask_truncated_completions": args.mask_truncated_completions,
            "use_bias_correction_kl": args.use_bias_correction_kl,
            "importance_sampling_level": args.importance_sampling_level,
            "sapo_temperature_pos": args.sapo_temperature_pos, "sapo_temperature_neg": args.sapo_temperature_neg,
            # TRL's bnpo token means and entropy quantiles: per micro-batch of per_device_train_batch_size completions
            "bnpo_batch_rows": args.per_device_train_batch_size * (args.num_generations if batch_counts_prompts
                                                                   else 1),
            "top_entropy_quantile": args.top_entropy_quantile, "mini_batches": args.mini_batches(),
            "delta": args.delta, "entropy_coef": args.entropy_coef,
            # TRL's use_adaptive_entropy: a target turns adaptive control on (its bounds and step ride along)
            "entropy_target": args.entropy_target if args.use_adaptive_entropy else None,
            "entropy_coef_min": args.entropy_coef_min, "entropy_coef_max": args.entropy_coef_max,
            "entropy_coef_delta": args.entropy_coef_delta,
            "off_policy_mask_threshold": args.off_policy_mask_threshold, **_sampler_correction(args)}


_VLLM_IS = {"vllm_importance_sampling_correction": True, "vllm_importance_sampling_mode": "sequence_mask",
            "vllm_importance_sampling_clip_max": 3.0, "vllm_importance_sampling_clip_min": None}


def _sampler_correction(args: GRPOConfig) -> dict:
    """TRL's vLLM importance sampling as grpo.sampler_correction: where the script uses vLLM or sets one of its
    options (mathgrpo's engine, like vLLM, samples with kernels of its own); otherwise mathgrpo's default."""
    if not args.use_vllm and all(getattr(args, k) == v for k, v in _VLLM_IS.items()):
        return {}
    mode = args.vllm_importance_sampling_mode if args.vllm_importance_sampling_correction else "none"
    return {"sampler_correction": mode, "sampler_correction_max": args.vllm_importance_sampling_clip_max,
            "sampler_correction_min": args.vllm_importance_sampling_clip_min}


def _trainer_section(args: GRPOConfig, steps: int, pps: int, scheduler: str, warmup: int, report: list[str]) -> dict:
    out = Path(args.output_dir).resolve()
    log_every = _every(args, "logging_steps", steps)
    return {"output_dir": str(out.parent), "run_name": out.name, "max_steps": steps,
            "prompts_per_step": pps, "learning_rate": args.learning_rate,
            "weight_decay": args.weight_decay, "adam_beta1": args.adam_beta1,
            "adam_beta2": args.adam_beta2, "lr_scheduler": scheduler,
            "warmup_steps": warmup, "max_grad_norm": args.max_grad_norm, "seed": args.seed,
            "logging_steps": log_every, "save_total_limit": args.save_total_limit or 0,
            "log_completions_steps": log_every if args.log_completions else 0,
            "tensorboard": "tensorboard" in report, "eval_at_end": False,
            "report_to": [r for r in report if r != "tensorboard"], "tracker_run_name": args.run_name}


def _apply_overrides(base: dict, overrides: dict) -> None:
    """mathgrpo_overrides={"generation.backend": "hf", ...}: dotted mathgrpo keys set over the translation."""
    for key, value in overrides.items():
        *path, last = key.split(".")
        node = base
        for p in path:
            node = node.setdefault(p, {})
        node[last] = value
