"""Build prompts with the tokenizer's chat template, and detect a pre-filled `<think>`.

    builder = PromptBuilder(tokenizer, cfg.prompt, answer_mod=cfg.data.answer_mod)
    ids = builder.ids(problem.problem)          # token ids for the rollout
    text = builder.prefill + completion         # what format rewards should judge

The user message is `problem + "\\n\\n" + instruction` (plus a sentence about the modulus when `answer_mod` is
set); a system message is added only when `prompt.system_prompt` is set (the R1 distill authors advise against
one). DeepSeek-R1 distill templates end the generation prompt with `<think>\\n`: the model's completion then
starts inside the thinking block and never contains the opening tag, so `PromptBuilder.prefill` records that
text for the rewards. A tokenizer without a chat template gets the plain `problem\\n\\ninstruction\\n` format.
"""

from __future__ import annotations

import logging
import re

from .config import PromptConfig

log = logging.getLogger(__name__)

# An opening think tag (optionally already closed: Qwen3's "thinking off" form) at the very end of the
# generation prompt.
_PREFILL_TAIL = re.compile(r"<think>\s*(?:</think>\s*)?\Z")
_PROBE = [{"role": "user", "content": "2 + 2 = ?"}]


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def _render(tokenizer, messages: list[dict], add_generation_prompt: bool) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except Exception as e:  # noqa: BLE001 - jinja errors come in many types; say which tokenizer failed
        name = getattr(tokenizer, "name_or_path", type(tokenizer).__name__)
        raise ValueError(f"the chat template of tokenizer '{name}' failed on roles "
                         f"{[m['role'] for m in messages]}: {type(e).__name__}: {e}") from e


def detect_think_prefill(tokenizer) -> str:
    """The text the chat template puts after the assistant header, when it opens a `<think>` block
    (e.g. `"<think>\\n"` for DeepSeek-R1 distills); "" otherwise or without a chat template."""
    if not has_chat_template(tokenizer):
        return ""
    with_prompt = _render(tokenizer, _PROBE, True)
    without = _render(tokenizer, _PROBE, False)
    # Only the generation prompt may count, not a <think> that the template put anywhere else.
    gen = with_prompt[len(without):] if with_prompt.startswith(without) else with_prompt
    m = _PREFILL_TAIL.search(gen)
    return m.group(0) if m else ""


def mod_sentence(mod: int) -> str:
    return f"Give the final answer after taking modulo {mod} (an integer from 0 to {mod - 1})."


class PromptBuilder:
    """Problem text -> chat messages -> prompt text -> token ids, for one tokenizer and prompt config."""

    def __init__(self, tokenizer, cfg: PromptConfig, answer_mod: int | None = None):
        if answer_mod is not None and (isinstance(answer_mod, bool) or answer_mod < 1):
            raise ValueError(f"answer_mod must be a positive integer or None, got {answer_mod!r}")
        if cfg.max_prompt_tokens < 1:
            raise ValueError(f"prompt.max_prompt_tokens must be >= 1, got {cfg.max_prompt_tokens}")
        self.tokenizer = tokenizer
        self.cfg = cfg
        self.answer_mod = answer_mod
        self.instruction = cfg.instruction.strip()
        if answer_mod is not None:
            self.instruction = f"{self.instruction} {mod_sentence(answer_mod)}".strip()
        self.templated = has_chat_template(tokenizer)
        if not self.templated:
            log.warning("tokenizer '%s' has no chat template: prompts use the plain 'problem\\n\\ninstruction\\n' "
                        "format", getattr(tokenizer, "name_or_path", type(tokenizer).__name__))
        self.prefill = detect_think_prefill(tokenizer)

    def user_text(self, problem: str) -> str:
        return f"{problem.strip()}\n\n{self.instruction}" if self.instruction else problem.strip()

    def messages(self, problem: str) -> list[dict]:
        system = [{"role": "system", "content": self.cfg.system_prompt}] if self.cfg.system_prompt else []
        return system + [{"role": "user", "content": self.user_text(problem)}]

    def text(self, problem: str) -> str:
        """The full prompt text, ending with the generation prompt (and its prefill, if any)."""
        if self.templated:
            return _render(self.tokenizer, self.messages(problem), True)
        system = f"{self.cfg.system_prompt}\n\n" if self.cfg.system_prompt else ""
        return f"{system}{self.user_text(problem)}\n"

    def ids(self, problem: str) -> list[int]:
        """Token ids of `text(problem)`, cut from the left to `max_prompt_tokens` (with a warning)."""
        # A chat template writes its own BOS; adding special tokens again would double it. The plain format
        # has none, so there the tokenizer adds whatever it normally adds.
        ids = list(self.tokenizer(self.text(problem), add_special_tokens=not self.templated)["input_ids"])
        limit = self.cfg.max_prompt_tokens
        if len(ids) > limit:
            log.warning("prompt of %d tokens cut from the left to prompt.max_prompt_tokens=%d (problem starts %r)",
                        len(ids), limit, problem[:60])
            ids = ids[-limit:]
        return ids
