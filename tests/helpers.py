"""Helper functions shared by the tests (`from helpers import ...`; fixtures stay in conftest.py)."""

from __future__ import annotations


def tiny_overrides(model_dir: str, out_dir, **extra) -> list[str]:
    """Overrides for a seconds-long CPU training run of the tiny model."""
    base = {
        "model.name_or_path": model_dir, "model.lora_r": 4, "model.lora_alpha": 8, "model.lora_dropout": 0.0,
        "data.source": "arithmetic", "data.max_problems": 20, "data.arithmetic_size": 40,
        "generation.max_new_tokens": 8, "generation.temperature": 1.0,
        "rewards.functions": "[boxed, accuracy, similarity]", "rewards.weights": "null",
        "grpo.num_generations": 4, "trainer.prompts_per_step": 2, "trainer.max_steps": 3,
        "trainer.learning_rate": 1e-3, "trainer.output_dir": str(out_dir), "trainer.run_name": "run",
        "trainer.save_steps": 2, "trainer.logging_steps": 1, "trainer.log_completions_steps": 1,
        "trainer.eval_at_end": False, "trainer.tensorboard": True,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def random_lora_b(model, std: float = 0.3):
    """Non-zero LoRA B matrices (peft starts them at zero): the policy then differs from the reference
    (adapters off), so a test comparing the two paths means something."""
    import torch

    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, std)
    return model
