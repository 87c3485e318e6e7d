"""Tests for mathgrpo.prompts: chat-template prompts, think-prefill detection, truncation, fallback format."""

from __future__ import annotations

import dataclasses
import logging

import pytest

from mathgrpo.config import PromptConfig
from mathgrpo.prompts import PromptBuilder, detect_think_prefill

BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
R1_TEMPLATE = (  # the shape of the DeepSeek-R1 distill template: no system role header, <think>\n pre-filled
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}{{ m['content'] }}"
    "{% elif m['role'] == 'user' %}{{ '<｜User｜>' + m['content'] }}"
    "{% else %}{{ '<｜Assistant｜>' + m['content'] + eos_token }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<｜Assistant｜><think>\\n' }}{% endif %}")
CHATML_TEMPLATE = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
QWEN3_NO_THINK = CHATML_TEMPLATE.replace("'<|im_start|>assistant\\n'", "'<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n'")
THINK_IN_HISTORY = (  # a <think> that is NOT in the generation prompt must not count
    "{% for m in messages %}{{ '<think>\\n' + m['content'] }}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'A:' }}{% endif %}")
SPECIALS = [BOS, EOS, "<｜User｜>", "<｜Assistant｜>", "<think>", "</think>", "<|im_start|>", "<|im_end|>"]


def tiny_tokenizer(template: str | None, add_bos: bool = False):
    """A byte-level tokenizer (one token per byte, special tokens whole), with `template` as chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: i for i, ch in enumerate(sorted(ByteLevel.alphabet()))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIALS)
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, tok.token_to_id(BOS))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS)
    fast.chat_template = template
    return fast


def ref_ids(tok, text: str) -> list[int]:
    """Reference tokenisation: specials split out by hand, every other byte its own token."""
    from tokenizers.pre_tokenizers import ByteLevel

    alphabet = {ch: i for i, ch in enumerate(sorted(ByteLevel.alphabet()))}
    byte_char = dict(enumerate(_bytes_to_unicode()))
    out, i = [], 0
    while i < len(text):
        special = next((s for s in SPECIALS if text.startswith(s, i)), None)
        if special:
            out.append(tok.convert_tokens_to_ids(special))
            i += len(special)
        else:
            j = min([k for k in (text.find(s, i) for s in SPECIALS) if k >= 0] + [len(text)])
            out += [alphabet[byte_char[b]] for b in text[i:j].encode()]
            i = j
    return out


def _bytes_to_unicode() -> list[str]:
    """GPT-2's byte -> printable character table, in byte order (written out as the reference)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, n = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + n)
            n += 1
    return [chars[b] for b in range(256)]


def pcfg(**kw) -> PromptConfig:
    return dataclasses.replace(PromptConfig(), **kw)


PROBLEM = "What is 37 + 48?"


# --- prefill detection --------------------------------------------------------------------------------

@pytest.mark.parametrize("template,expected", [(R1_TEMPLATE, "<think>\n"), (QWEN3_NO_THINK, "<think>\n\n</think>\n\n"),
                                               (CHATML_TEMPLATE, ""), (THINK_IN_HISTORY, ""), (None, "")])
def test_detect_think_prefill(template, expected):
    assert detect_think_prefill(tiny_tokenizer(template)) == expected


def test_r1_prompt_text_messages_and_ids():
    tok = tiny_tokenizer(R1_TEMPLATE)
    b = PromptBuilder(tok, pcfg())
    assert b.prefill == "<think>\n"
    user = f"{PROBLEM}\n\n{PromptConfig().instruction}"
    assert b.messages(PROBLEM) == [{"role": "user", "content": user}]  # no system prompt by default
    assert b.text(PROBLEM) == f"{BOS}<｜User｜>{user}<｜Assistant｜><think>\n"
    ids = b.ids(PROBLEM)
    assert ids == ref_ids(tok, b.text(PROBLEM))
    assert ids.count(tok.convert_tokens_to_ids(BOS)) == 1 and ids[-2:] == ref_ids(tok, "<think>\n")


def test_bos_is_not_added_twice_by_a_bos_adding_tokenizer():
    tok = tiny_tokenizer(R1_TEMPLATE, add_bos=True)
    assert tok(PROBLEM)["input_ids"][0] == tok.convert_tokens_to_ids(BOS)  # the tokenizer does add one
    ids = PromptBuilder(tok, pcfg()).ids(PROBLEM)
    assert ids.count(tok.convert_tokens_to_ids(BOS)) == 1


def test_system_prompt_and_answer_mod_wording():
    tok = tiny_tokenizer(CHATML_TEMPLATE)
    b = PromptBuilder(tok, pcfg(system_prompt="Be brief.", instruction="Answer in \\boxed{}."), answer_mod=1000)
    msgs = b.messages(PROBLEM)
    assert msgs[0] == {"role": "system", "content": "Be brief."}
    assert msgs[1]["role"] == "user" and msgs[1]["content"].startswith(f"{PROBLEM}\n\nAnswer in \\boxed{{}}. ")
    assert "after taking modulo 1000" in msgs[1]["content"] and "0 to 999" in msgs[1]["content"]
    expected = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in msgs) + "<|im_start|>assistant\n"
    assert b.text(PROBLEM) == expected and b.prefill == ""
    assert "modulo" not in PromptBuilder(tok, pcfg()).messages(PROBLEM)[0]["content"]
    with pytest.raises(ValueError, match="answer_mod"):
        PromptBuilder(tok, pcfg(), answer_mod=0)


def test_left_truncation_with_warning(caplog):
    tok = tiny_tokenizer(R1_TEMPLATE)
    full = PromptBuilder(tok, pcfg()).ids(PROBLEM)
    short = PromptBuilder(tok, pcfg(max_prompt_tokens=20))
    with caplog.at_level(logging.WARNING, logger="mathgrpo.prompts"):
        ids = short.ids(PROBLEM)
    assert ids == full[-20:]
    assert any(f"prompt of {len(full)} tokens cut from the left" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="mathgrpo.prompts"):
        assert PromptBuilder(tok, pcfg(max_prompt_tokens=len(full))).ids(PROBLEM) == full
    assert not caplog.records


def test_no_chat_template_falls_back_to_plain_format(caplog):
    tok = tiny_tokenizer(None)
    with caplog.at_level(logging.WARNING, logger="mathgrpo.prompts"):
        b = PromptBuilder(tok, pcfg(instruction="Box it."))
    assert any("no chat template" in r.getMessage() for r in caplog.records)
    assert b.text(PROBLEM) == f"{PROBLEM}\n\nBox it.\n" and b.prefill == ""
    assert b.ids(PROBLEM) == ref_ids(tok, f"{PROBLEM}\n\nBox it.\n")
    sys_b = PromptBuilder(tok, pcfg(system_prompt="S.", instruction="Box it."))
    assert sys_b.text(PROBLEM) == f"S.\n\n{PROBLEM}\n\nBox it.\n"


def test_template_failure_names_the_tokenizer():
    tok = tiny_tokenizer("{{ raise_exception('no system role') if messages[0]['role'] == 'system' }}x")
    b = PromptBuilder(tok, pcfg(system_prompt="S"))
    with pytest.raises(ValueError, match=r"chat template of tokenizer .* failed on roles \['system', 'user'\]"):
        b.text(PROBLEM)


# --- the real SmolLM2 tokenizer -----------------------------------------------------------------------------

@pytest.fixture(scope="session")
def smollm2_tokenizer(smol_tokenizer):
    return smol_tokenizer  # conftest: the tokenizer of the embedded GGUF model


def test_smollm2_prompt(smollm2_tokenizer):
    tok = smollm2_tokenizer
    b = PromptBuilder(tok, pcfg())
    assert b.prefill == ""
    text = b.text(PROBLEM)
    assert text.endswith(f"<|im_start|>user\n{PROBLEM}\n\n{PromptConfig().instruction}<|im_end|>\n<|im_start|>assistant\n")
    reference = tok.apply_chat_template(b.messages(PROBLEM), tokenize=True, add_generation_prompt=True)
    reference = reference["input_ids"] if hasattr(reference, "keys") else reference
    assert b.ids(PROBLEM) == list(reference)
    assert tok.decode(b.ids(PROBLEM)) == text
