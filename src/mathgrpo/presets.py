"""Named presets: whole starting points for a run, picked by name, never implied by what else is given.

    mathgrpo train                              # no arguments: preset demo (its first line says so)
    mathgrpo train --preset notebook model.quantization=nf4
    mathgrpo train cfg.yaml trainer.max_steps=20    # no --preset: the documented defaults <- cfg.yaml <- overrides
    mathgrpo config show --preset deepscaler-8k     # every value that is not a default, and where it came from

A config is built in layers, each overriding the one below: the dataclass defaults (the documented defaults,
which reproduce the notebook), then the preset, then the YAML file, then the command-line `section.key=value`
overrides. `resolve` builds it and remembers which layer set each key, so that `config show` and the first line
of `train`/`eval` can say where every value came from.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .config import EMBEDDED, Config, ConfigError, dump_yaml, load_config, parse_overrides, to_dict


@dataclass(frozen=True)
class Preset:
    name: str
    summary: str  # one line: what it trains on what, and what it is for
    values: dict  # a partial config tree, applied over the documented defaults


# Stage 1 (8K context) of DeepScaleR-1.5B-Preview (Agentica, "DeepScaleR: Surpassing O1-Preview with a 1.5B Model
# by Scaling RL", Feb 2025), from its training script scripts/train/run_deepscaler_1.5b_8k.sh (verl) and the
# write-up. Each value says where it comes from; "ours" marks what the recipe does not fix.
DEEPSCALER_8K: dict[str, Any] = {
    # the script's actor: DeepSeek-R1-Distill-Qwen-1.5B, full fine-tuning (no LoRA) with gradient checkpointing
    "model": {"name_or_path": "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B", "lora": False,
              "gradient_checkpointing": True},
    # the write-up's ~40K problem-answer pairs (AIME 1984-2023, AMC before 2023, Omni-MATH, STILL), as published
    # on the Hub; all of them are trained on; 1% held out for the end-of-training evaluation (ours)
    "data": {"source": "agentica-org/DeepScaleR-Preview-Dataset", "problem_column": "problem",
             "answer_column": "answer", "solution_column": "solution", "max_problems": None,
             "test_fraction": 0.01},
    # their prompt: the problem, then this sentence; data.max_prompt_length=1024
    "prompt": {"instruction": "Let's think step by step and output the final answer within \\boxed{}.",
               "max_prompt_tokens": 1024},
    # data.max_response_length=8192, rollout.temperature=0.6
    "generation": {"max_new_tokens": 8192, "temperature": 0.6},
    # the write-up's outcome reward: 1 for a right answer, 0 otherwise, no partial or format credit
    # (theirs also gives 0 without the </think> delimiter; `accuracy` only checks the boxed answer)
    "rewards": {"functions": ["accuracy"], "weights": [1.0]},
    # rollout.n=8; kl_loss_coef=0.001 with the k3 estimator (low_var_kl, mathgrpo's KL); clip_ratio 0.2 (verl's
    # default); verl's token mean = the dapo normalisation; ppo_epochs=1 pass over each rollout; train_batch_size=128
    # prompts per rollout updated in ppo_mini_batch_size=64 halves: two optimizer steps per rollout, the second
    # off-policy; entropy_coeff=0.001 (verl's default then); no correction of the sampler's mismatch (verl had none)
    "grpo": {"num_generations": 8, "beta": 0.001, "epsilon": 0.2, "loss_type": "dapo", "scale_rewards": "group",
             "num_iterations": 1, "mini_batches": 2, "entropy_coef": 0.001, "sampler_correction": "none"},
    # lr 1e-6 constant without warm-up, AdamW betas (0.9, 0.999) and weight decay 0.01 (verl's defaults then), grad
    # clip 1.0; save_freq=20 (verl counts rollouts, as mathgrpo's steps). max_steps 500 rollouts (1000 optimizer
    # steps) is ours: the script trains 30 epochs and the authors moved to 16K context when the response length
    # started to grow (read the curves: stop there, then raise generation.max_new_tokens and resume).
    "trainer": {"max_steps": 500, "prompts_per_step": 128, "learning_rate": 1e-6, "lr_scheduler": "constant",
                "warmup_steps": 0, "adam_beta1": 0.9, "adam_beta2": 0.999, "weight_decay": 0.01,
                "max_grad_norm": 1.0, "save_steps": 20, "logging_steps": 10},
    # rollout.n_val=8 at val_temperature=0.6; the write-up reports pass@1 averaged over 16 samples
    "eval": {"num_samples": 16, "temperature": 0.6},
}

PRESETS: dict[str, Preset] = {p.name: p for p in [
    Preset("demo", "SmolLM2-135M-Instruct on the built-in arithmetic set, tuned to learn visibly on a laptop CPU: "
                   "8-10 minutes from start to report on 2 cores", EMBEDDED),
    Preset("notebook", "the documented defaults, which reproduce the notebook mathgrpo replaces "
                       "(DeepSeek-R1-Distill-Qwen-1.5B, LoRA, 2048-token completions, 80 steps)", {}),
    Preset("deepscaler-8k", "stage 1 of DeepScaleR-1.5B-Preview: full fine-tuning of DeepSeek-R1-Distill-Qwen-1.5B "
                            "on its 40K problems, 128 prompts x 8 completions of up to 8,192 tokens a step, updated in two "
                            "mini-batches (a multi-GPU recipe)", DEEPSCALER_8K),
]}

DEFAULT_PRESET = "demo"  # what `mathgrpo train` / `mathgrpo eval` run with no arguments at all


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ConfigError(f"--preset {name!r}: no such preset; the presets are: "
                          + "; ".join(f"{p.name} ({p.summary})" for p in PRESETS.values()))
    return PRESETS[name]


@dataclass
class Resolved:
    """A config and where it came from: the layers given and, per dotted key, the layer that set it last."""

    config: Config
    preset: str | None
    path: str | None
    n_overrides: int
    sources: dict[str, str] = field(default_factory=dict)  # "trainer.max_steps" -> "preset demo" / "file x.yaml" / ...
    file_label: str | None = None

    def origin(self) -> str:
        """One line: which preset (or the documented defaults), which file, how many command-line values."""
        head = f"preset {self.preset} ({get_preset(self.preset).summary})" if self.preset else \
            "the documented defaults (no preset; --preset NAME starts from one)"
        parts = [head]
        if self.path:
            parts.append(f"file {self.path}" + (f" ({self.file_label})" if self.file_label else ""))
        if self.n_overrides:
            parts.append(f"{self.n_overrides} command-line value{'s' if self.n_overrides > 1 else ''}")
        return "config: " + " <- ".join(parts)

    def non_defaults(self) -> list[tuple[str, Any, str]]:
        """(dotted key, value, the layer it came from) for every value that differs from its default."""
        default, mine = _flat(to_dict(Config())), _flat(to_dict(self.config))
        return [(k, v, self.sources.get(k, "derived")) for k, v in mine.items() if v != default.get(k)]

    def show(self) -> str:
        """`mathgrpo config show`: the provenance as YAML comments, then the resolved config (a valid YAML file)."""
        rows = self.non_defaults()
        width = max((len(f"{k}: {v!r}") for k, v, _ in rows), default=0)
        lines = [f"# {self.origin()}",
                 "# values that differ from the documented defaults (`mathgrpo config reference`), and their source:"]
        lines += [f"#   {f'{k}: {v!r}':<{width}}  <- {src}" for k, v, src in rows] or ["#   (none)"]
        return "\n".join(lines) + "\n" + dump_yaml(self.config)


def resolve(preset: str | None = None, path: str | Path | None = None, overrides: list[str] | None = None,
            file_label: str | None = None) -> Resolved:
    """The config of `mathgrpo train/eval/config show`: the documented defaults <- `preset` <- the YAML file at
    `path` <- `overrides`. With none of the three, the preset is `demo` (DEFAULT_PRESET): what runs with no
    arguments, named in `Resolved.origin()`."""
    overrides = list(overrides or [])
    if preset is None and path is None and not overrides:
        preset = DEFAULT_PRESET
    base = get_preset(preset).values if preset else {}
    cfg = load_config(path, overrides, base=base)  # validates every layer, with errors naming file and key
    layers: list[tuple[str, dict]] = [(f"preset {preset}", base)] if preset else []
    if path is not None:
        layers.append((f"file {path}", yaml.safe_load(Path(path).read_text()) or {}))
    if overrides:
        layers.append(("command line", parse_overrides(overrides)))
    sources: dict[str, str] = {}
    for label, tree in layers:
        for key in _flat(tree):
            sources[key] = label
    return Resolved(cfg, preset, str(path) if path is not None else None, len(overrides), sources, file_label)


def _flat(tree: dict) -> dict[str, Any]:
    """{"trainer": {"max_steps": 3}} -> {"trainer.max_steps": 3} (sections are one level deep)."""
    out = {}
    for section, values in tree.items():
        if isinstance(values, dict):
            out.update({f"{section}.{k}": v for k, v in values.items()})
        else:
            out[section] = values
    return out


def preset_table() -> str:
    """A markdown table of the presets (for `mathgrpo config presets` and the README)."""
    lines = ["| preset | what it is |", "|---|---|"]
    return "\n".join(lines + [f"| `{p.name}` | {p.summary} |" for p in PRESETS.values()])

