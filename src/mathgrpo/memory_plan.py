"""The memory plan: the settings that size a step's GPU memory, chosen from the card's free memory before step 1.

    mathgrpo plan --preset notebook                       # on this machine's GPU (CPU: today's defaults)
    mathgrpo plan --preset notebook --device-name T4      # "does it fit on a T4?" from any machine
    mathgrpo plan cfg.yaml --gpu-memory 16GiB generation.max_new_tokens=4096

Five keys default to `auto`: generation.max_batch (rows decoded at once: the KV cache), generation.release_memory
(the fast engine's KV cache and owned weight copy freed for the update), model.gradient_checkpointing,
trainer.max_tokens_per_microbatch and trainer.logprob_chunk_size. `plan` estimates each phase's peak (sampling,
update) from the model's shape, LoRA / NF4, the step's rows and prompt + completion caps (`estimate`: sizes in
bytes, no device), and picks the fastest settings whose peaks fit the usable share of the free memory (`choose`);
a value set explicitly (not `auto`) is kept as it is. Nothing fits: `PlanError` says what, by how much, and what
to change. On CPU every `auto` takes its CPU default (`CPU_DEFAULTS`) and nothing is estimated.
Only `device_free_bytes` and `read_shape` touch the device or the disk.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, replace

from .config import AUTO, Config, ConfigError, length_schedule

GiB = 2**30
# the planned keys and what `auto` means where nothing is planned (CPU; the benchmarks' plain Config())
CPU_DEFAULTS = {"generation.max_batch": 256, "generation.release_memory": None, "model.gradient_checkpointing": False,
                "trainer.max_tokens_per_microbatch": 16384, "trainer.logprob_chunk_size": 1024}
KEYS = dict(zip(("max_batch", "release", "checkpointing", "budget", "chunk"), CPU_DEFAULTS))  # Choice field -> key
USABLE = 0.9  # share of the free memory a plan fills: the allocator's blocks are never packed perfectly
# Fixed sampling overhead of the fast engine: CUDA graph pool, cuBLAS workspaces, compiled kernels' scratch
ENGINE_OVERHEAD = 256 * 2**20
# Values per token per decoder layer saved for the backward, in units of hidden size and intermediate size (layer
# input, norms, q/k/v/attention output; MLP gate, up, activation and product); with LoRA dropout, each adapted
# projection's dropped input too (ACT_DROPOUT_H / _I). Fitted, with UPDATE_OVERHEAD and the log-prob chunk's
# LOGIT_BYTES, to peaks measured on an H100 (1.5B: NF4 with and without checkpointing, bf16 at 16k tokens):
# README, "Which GPU".
ACT_H, ACT_I = 6, 4
ACT_DROPOUT_H, ACT_DROPOUT_I = 6, 1
NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)  # 4-bit codes, 8-bit absmax per 64 values, fp32 per 256 absmax
LOGIT_BYTES = 6  # per logit of a log-prob chunk, beside the chunk's own dtype (fp32 statistics and gradient)
UPDATE_OVERHEAD = 320 * 2**20  # the update's fixed extra: reference log-probs, AdamW's step, allocator rounding
PREFILL_TOKENS = 16384  # the fast engine's prefill chunk (FastRollout.prefill_tokens)
BUDGETS = (16384, 8192, 4096, 2048, 1024, 512)  # token budgets tried, largest first
CHUNKS = (1024, 512, 256)


class PlanError(ConfigError):
    """No setting of the planned keys fits the card (or the explicit ones do not)."""


@dataclass(frozen=True)
class ModelShape:
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool

    def linears(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each decoder-layer projection."""
        h, q, kv, i = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim, self.intermediate
        return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    @property
    def linear_params(self) -> int:
        return self.layers * sum(a * b for a, b in self.linears().values())

    @property
    def other_params(self) -> int:
        """Embeddings, an untied lm_head and the norms."""
        return self.vocab * self.hidden * (1 if self.tied else 2) + (2 * self.layers + 1) * self.hidden

    @property
    def params(self) -> int:
        return self.linear_params + self.other_params


# Shapes of the models the presets name, so `mathgrpo plan` answers without the weights or the network.
KNOWN_SHAPES = {
    "deepseek-ai/deepseek-r1-distill-qwen-1.5b": ModelShape(28, 1536, 8960, 12, 2, 128, 151936, False),
    "smollm2": ModelShape(30, 576, 1536, 9, 3, 64, 49152, True),
}

# Memory of common cards as torch reports it (GiB), and the CUDA context's share taken off for the free memory.
CARDS = {"T4": 14.6, "P100": 15.9, "V100": 15.8, "L4": 22.0, "A10G": 22.0, "RTX3090": 23.6, "RTX4090": 23.6,
         "A100-40": 39.4, "A100": 79.1, "H100": 79.1, "H200": 139.8}
CONTEXT_GIB = 0.5
NO_BF16 = {"T4", "P100", "V100"}  # compute capability < 8: model.dtype=auto loads them in float16 (devices.choose_dtype)


@dataclass(frozen=True)
class Step:
    """One rank's step: rows (prompts x G), prompts, and the prompt / completion token caps."""
    rows: int
    prompts: int
    prompt_tokens: int
    completion_tokens: int

    @property
    def row_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True)
class Choice:
    max_batch: int
    release: bool
    checkpointing: bool
    budget: int
    chunk: int


@dataclass
class Plan:
    card: str
    free: int  # bytes
    choice: Choice
    sampling: dict[str, int]  # component -> bytes
    update: dict[str, int]
    planned: set[str]  # keys the plan chose (the others were set explicitly)
    value_bytes: int = 2  # of the model's dtype

    @property
    def peaks(self) -> dict[str, int]:
        return {"sampling": sum(self.sampling.values()), "update": sum(self.update.values())}

    def values(self) -> dict[str, object]:
        c = self.choice
        return {KEYS[f]: getattr(c, f) for f in KEYS}

    def lines(self, sources: dict[str, str] | None = None) -> list[str]:
        """The plan as printed by `mathgrpo train` and `mathgrpo plan`."""
        out = [f"memory plan for {self.card}: {gib(self.free)} GiB free, plans fill {USABLE:.0%} "
               f"({gib(self.free * USABLE)} GiB); weights in {'float32' if self.value_bytes == 4 else '16 bits'}"]
        for key, v in self.values().items():
            how = "planned" if key in self.planned else f"set by {(sources or {}).get(key, 'the config')}"
            out.append(f"  {key} = {str(v).lower() if isinstance(v, bool) else v}  ({how})")
        for phase, parts in (("sampling", self.sampling), ("update", self.update)):
            detail = ", ".join(f"{k} {gib(v)}" for k, v in parts.items() if v)
            out.append(f"  estimated peak, {phase}: {gib(sum(parts.values()))} GiB ({detail})")
        return out


def gib(n: float) -> str:
    return f"{n / GiB:.2f}"


def parse_size(text: str) -> int:
    """'16GiB', '16 GB', '15.5G', '24000MiB' -> bytes (GB and G read as GiB: what cards are sold as)."""
    m = re.fullmatch(r"\s*([0-9.]+)\s*([GMT]i?B?|)\s*", text, flags=re.I)
    if not m:
        raise ConfigError(f"--gpu-memory {text!r}: expected a size such as 16GiB or 24000MiB")
    unit = m.group(2)[:1].upper() or "G"
    return int(float(m.group(1)) * {"M": 2**20, "G": GiB, "T": 2**40}[unit])


def named_card(name: str) -> tuple[int, bool]:
    """(free bytes less the CUDA context, bf16 support) of a named card (CARDS)."""
    key = name.upper().replace(" ", "").replace("_", "-")
    if key not in CARDS:
        raise ConfigError(f"--device-name {name!r}: unknown card; known: {', '.join(CARDS)} (or give --gpu-memory)")
    return int((CARDS[key] - CONTEXT_GIB) * GiB), key not in NO_BF16


# --- the arithmetic ------------------------------------------------------------------------------------------

def dtype_bytes(cfg: Config, bf16: bool = True) -> int:
    """Bytes per value of the model's dtype; auto is bf16 where the card has it, else float16 (devices.choose_dtype):
    2 bytes either way (bf16: whether the card has it, kept for callers that ask)."""
    if cfg.model.dtype == "auto":
        return 2
    return 4 if cfg.model.dtype in ("float32", "fp32") else 2


def adapted(shape: ModelShape, cfg: Config) -> tuple[int, int]:
    """(layers adapted, weights of the adapted projections in one layer)."""
    m = cfg.model
    lin = shape.linears()
    n = sum(a * b for name, (a, b) in lin.items() if name in m.lora_target_modules)
    return (min(m.lora_layers or shape.layers, shape.layers), n)


def lora_params(shape: ModelShape, cfg: Config) -> int:
    layers, _ = adapted(shape, cfg)
    lin = shape.linears()
    return layers * sum(cfg.model.lora_r * (a + b) for name, (a, b) in lin.items()
                        if name in cfg.model.lora_target_modules)


def estimate(shape: ModelShape, cfg: Config, step: Step, c: Choice,
             bf16: bool = True) -> tuple[dict[str, int], dict[str, int]]:
    """(sampling, update) peak components in bytes for one rank (a LoRA or full fine-tuning run, fast engine);
    bf16: whether the card has it (model.dtype=auto)."""
    m, d = cfg.model, dtype_bytes(cfg, bf16)
    nf4 = m.quantization == "nf4"
    weights = int(shape.linear_params * NF4_BYTES) + shape.other_params * d if nf4 else shape.params * d
    if m.lora:
        trained = lora_params(shape, cfg)
        state, grads = trained * 4 * 3, trained * 4  # fp32 adapter + AdamW's two moments; fp32 gradients
        reference = 0  # the adapter switched off
        layers, per_layer = adapted(shape, cfg)
        owned = 0
        if cfg.generation.lora_merge == "copy":  # a merged copy of the adapted projections (all, dequantised: NF4)
            owned = (shape.linear_params if nf4 else layers * per_layer) * d
    else:
        state, grads = shape.params * d * 2, shape.params * d
        reference = weights if cfg.grpo.beta > 0 else 0
        owned, layers = 0, shape.layers
    # the hf backend samples from a whole LoRA-merged copy of the model, kept through the update
    hf_copy = shape.params * d if cfg.generation.backend == "hf" and m.lora and cfg.generation.lora_merge == "copy" \
        else 0
    hf = cfg.generation.backend in ("hf", "hf_unmerged")  # transformers' cache is gone once generate returns
    owned = 0 if hf else owned
    rows = min(c.max_batch, step.rows)
    capacity = -(-step.row_tokens // 128) * 128
    kv = 2 * shape.layers * rows * shape.kv_heads * capacity * shape.head_dim * d
    prefill = min(PREFILL_TOKENS, step.prompts * step.prompt_tokens) * (3 * shape.intermediate + 6 * shape.hidden) * d
    sampling_work = rows * shape.vocab * (d + 8) + prefill + ENGINE_OVERHEAD
    sampling = {"weights": weights, "trained+adam": state, "reference": reference, "engine copy": owned + hf_copy,
                "kv cache": kv, "work": sampling_work}
    per_mb = max(1, min(step.rows, c.budget // step.row_tokens))
    tokens = per_mb * step.row_tokens
    act = ACT_H * shape.hidden + ACT_I * shape.intermediate
    if m.lora and m.lora_dropout > 0:
        act += ACT_DROPOUT_H * shape.hidden + ACT_DROPOUT_I * shape.intermediate
    if c.checkpointing:
        keep = min(m.gradient_checkpointing_keep_layers, layers)
        activations = tokens * d * (layers * shape.hidden + (keep + 1) * act)
    else:
        activations = tokens * d * layers * act
    logprobs = tokens * shape.hidden * d * 2 + c.chunk * shape.vocab * (d + LOGIT_BYTES) + UPDATE_OVERHEAD
    update = {"weights": weights, "trained+adam": state + grads, "reference": reference,
              "engine copy": hf_copy + (0 if c.release else owned), "kv cache": 0 if c.release or hf else kv,
              "activations": activations, "log-probs": logprobs}
    return sampling, update


def step_of(cfg: Config, world_size: int = 1) -> Step:
    """One rank's step shape from the config: the prompt cap and the longest completion cap of the schedule."""
    prompts = max(1, cfg.trainer.prompts_per_step // world_size)
    longest = max(v for _, v in length_schedule(cfg.generation.max_new_tokens))
    return Step(prompts * cfg.grpo.num_generations, prompts, cfg.prompt.max_prompt_tokens, longest)


def _options(cfg: Config, step: Step) -> tuple[dict[str, list], set[str]]:
    """Candidate values per planned key, fastest first; an explicit value is the only candidate."""
    g, t, m = cfg.generation, cfg.trainer, cfg.model
    halvings = sorted({max(1, -(-step.rows // 2**k)) for k in range(0, 12)}, reverse=True)
    quant = m.quantization is not None
    auto = {"max_batch": (g.max_batch, halvings),
            # a quantized base's engine copy is a dequantised one, larger than the base: freed by default
            "release": (g.release_memory, [True] if quant else [False, True]),
            "checkpointing": (m.gradient_checkpointing, [False, True]),
            # below one row every budget means one row a micro-batch: the row's length is the smallest tried
            "budget": (t.max_tokens_per_microbatch, [b for b in BUDGETS if b > step.row_tokens] + [step.row_tokens]),
            "chunk": (t.logprob_chunk_size, list(CHUNKS))}
    options, planned = {}, set()
    for name, (value, cands) in auto.items():
        if value == AUTO or (name == "release" and value is None):
            options[name] = cands
            planned.add(KEYS[name])
        else:
            options[name] = [value]
    return options, planned


# The order in which settings give way, most important first: all rows decoded at once; the engine's memory kept over
# the update (freeing it costs ~0.1 s a step); the largest micro-batches (measured on an H100, 1.5B NF4, 4 x 2,176
# tokens: 4 rows a micro-batch with checkpointing 0.57 s an update, 1 row without 1.30 s); no checkpointing (~25%
# faster at the same micro-batch); the largest log-prob chunk.
PREFERENCE = ("max_batch", "release", "budget", "checkpointing", "chunk")


def choose(shape: ModelShape, cfg: Config, step: Step, free: int, card: str = "GPU", bf16: bool = True) -> Plan:
    """The first settings in PREFERENCE order whose estimated peaks both fit USABLE x free. Raises PlanError when
    none fits."""
    options, planned = _options(cfg, step)
    limit = free * USABLE
    best = None  # the leanest candidate, for the refusal
    for values in itertools.product(*(options[f] for f in PREFERENCE)):
        c = Choice(**dict(zip(PREFERENCE, values)))
        s, u = estimate(shape, cfg, step, c, bf16)
        peak = max(sum(s.values()), sum(u.values()))
        if peak <= limit:
            return Plan(card, free, c, s, u, planned, dtype_bytes(cfg, bf16))
        if best is None or peak < best[0]:
            best = (peak, c, s, u)
    raise PlanError(_refusal(shape, cfg, step, free, card, best, planned))


def _refusal(shape, cfg, step, free, card, best, planned) -> str:
    peak, c, s, u = best
    limit = free * USABLE
    phase, parts = max((("sampling", s), ("update", u)), key=lambda p: sum(p[1].values()))
    big = ", ".join(f"{k} {gib(v)}" for k, v in sorted(parts.items(), key=lambda kv: -kv[1]) if v)
    fixed = [k for k in CPU_DEFAULTS if k not in planned]
    advice = []
    if fixed:
        advice.append(f"set {', '.join(fixed)} back to auto (they were set explicitly)")
    if cfg.model.quantization is None and cfg.model.lora:
        advice.append("model.quantization=nf4")
    advice.append(f"a lower generation.max_new_tokens (now {step.completion_tokens}) or prompt.max_prompt_tokens "
                  f"(now {step.prompt_tokens})")
    if step.rows > 1:
        advice.append(f"fewer rows a step (trainer.prompts_per_step x grpo.num_generations = {step.rows})")
    advice.append("a card with more memory")
    return (f"memory plan: this run does not fit {card}: even its leanest settings (max_batch {c.max_batch}, "
            f"release_memory {str(c.release).lower()}, gradient_checkpointing {str(c.checkpointing).lower()}, "
            f"max_tokens_per_microbatch {c.budget}, logprob_chunk_size {c.chunk}) need an estimated {gib(peak)} GiB "
            f"in the {phase} phase ({big}) against {gib(limit)} GiB usable ({USABLE:.0%} of {gib(free)} GiB free): "
            f"short by {gib(peak - limit)} GiB. Change: " + "; ".join(advice) + ".")


def apply(cfg: Config, values: dict[str, object]) -> Config:
    """A copy of cfg with `values` ({"section.key": value}) set where cfg says auto (explicit values stay)."""
    sections = {}
    for key, v in values.items():
        sec, name = key.split(".")
        current = getattr(getattr(cfg, sec), name)
        if current == AUTO or (key == "generation.release_memory" and current is None):
            sections.setdefault(sec, {})[name] = v
    return replace(cfg, **{sec: replace(getattr(cfg, sec), **kv) for sec, kv in sections.items()})


def value(current, key: str):
    """A planned key's value where no plan resolved it (a Config built in code, a benchmark): auto -> its CPU
    default."""
    return CPU_DEFAULTS[key] if current == AUTO else current


def plan_values(cfg: Config) -> dict[str, object]:
    """The planned keys' values in cfg."""
    return {key: getattr(getattr(cfg, key.split(".")[0]), key.split(".")[1]) for key in CPU_DEFAULTS}


def describe(cfg: Config, plan: Plan | None, sources: dict[str, str] | None = None) -> str:
    """What `train` and `plan` print: the plan, or the CPU defaults the planned keys took."""
    if plan is not None:
        return "\n".join(plan.lines(sources))
    return "memory plan: CPU, nothing to plan: " + ", ".join(f"{k}={v}" for k, v in plan_values(cfg).items())


# --- reading the model and the device ------------------------------------------------------------------------

def shape_from_config(hf) -> ModelShape:
    """A transformers config (Llama / Qwen2 / Mistral family fields) as a ModelShape."""
    heads = hf.num_attention_heads
    return ModelShape(hf.num_hidden_layers, hf.hidden_size, hf.intermediate_size, heads,
                      getattr(hf, "num_key_value_heads", None) or heads,
                      getattr(hf, "head_dim", None) or hf.hidden_size // heads, hf.vocab_size,
                      bool(getattr(hf, "tie_word_embeddings", False)))


def read_shape(model_cfg) -> ModelShape:
    """The model's shape: a preset's model from KNOWN_SHAPES, else its config.json (a folder or the hub cache)."""
    name = model_cfg.name_or_path
    if name.lower() in KNOWN_SHAPES:
        return KNOWN_SHAPES[name.lower()]
    if name.lower() in ("default", "embedded"):
        return KNOWN_SHAPES["smollm2"]
    from transformers import AutoConfig

    try:
        hf = AutoConfig.from_pretrained(name, gguf_file=model_cfg.gguf_file,
                                        trust_remote_code=model_cfg.trust_remote_code)
        return shape_from_config(getattr(hf, "text_config", hf))
    except (OSError, ValueError, AttributeError) as e:
        raise ConfigError(f"memory plan: cannot read the shape of model.name_or_path={name!r} ({str(e)[:200]}); "
                          f"set generation.max_batch, generation.release_memory, model.gradient_checkpointing, "
                          f"trainer.max_tokens_per_microbatch and trainer.logprob_chunk_size explicitly") from None


def device_free_bytes(device) -> tuple[int, str]:
    """(free bytes, card name) of a CUDA device as the driver reports them now, plus what this process holds
    already (a model loaded by the caller: the estimate counts it)."""
    import torch

    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_allocated(device), torch.cuda.get_device_name(device)


def plan_run(cfg: Config, device, world_size: int = 1, free: int | None = None, card: str | None = None,
             bf16: bool | None = None, shape: ModelShape | None = None) -> tuple[Config, Plan | None]:
    """(cfg with every auto resolved, the plan or None). CPU devices (and free=None off CUDA) take CPU_DEFAULTS;
    a CUDA device is planned from its free memory and bf16 support unless `free` (and `card`, `bf16`) are given;
    the model's shape is read from model.name_or_path unless given (a model the caller loaded)."""
    import torch

    device = torch.device(device)
    if free is None and device.type != "cuda":
        return apply(cfg, CPU_DEFAULTS), None
    if free is None:
        free, card = device_free_bytes(device)
        bf16 = torch.cuda.get_device_capability(device)[0] >= 8  # as torch.cuda.is_bf16_supported, per device
    plan = choose(shape or read_shape(cfg.model), cfg, step_of(cfg, world_size), free, card or "GPU",
                  True if bf16 is None else bf16)
    return apply(cfg, plan.values()), plan

