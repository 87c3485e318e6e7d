"""TRL-compatible front door: a TRL GRPO script runs on mathgrpo's engine with one import changed.

    from mathgrpo import GRPOConfig, GRPOTrainer        # was: from trl import GRPOConfig, GRPOTrainer
    args = GRPOConfig(output_dir="out", per_device_train_batch_size=1, num_generations=4, max_steps=50)
    trainer = GRPOTrainer(model="Qwen/Qwen2.5-0.5B-Instruct", reward_funcs=[my_reward], args=args,
                          train_dataset=ds, peft_config=LoraConfig(r=16, target_modules="all-linear"))
    trainer.train()                                      # output_dir/checkpoint-<step>/ hold peft adapters

`GRPOConfig` takes TRL's option names (and some that older TRL/transformers took); `to_mathgrpo_config()` maps them
onto mathgrpo's `Config`, with one `TRLCompatWarning` line per option whose meaning is adjusted, one naming every
option that is ignored, and an error for typos and for options that would change the objective. `GRPOTrainer` loads
or wraps the model, turns the dataset's `prompt` column into prompt ids, wraps the reward functions so that they get
exactly TRL's keyword arguments, drives transformers callbacks, and runs `mathgrpo.trainer.train`.

The package, by concern:
    options.py      the option tables (honoured / ignored / refused, TRL 1.16's defaults), TRLCompatWarning
    grpo_config.py  GRPOConfig (TRL's, not mathgrpo.config.GRPOConfig) and its translation to mathgrpo's Config
    dataset.py      a dataset's `prompt` column as mathgrpo Problems and prompt ids
    rewards.py      reward functions called with TRL's keyword arguments
    model.py        the model made ready to train, through mathgrpo.models (TRL parity noted where it differs)
    state.py        callbacks, TrainerState, TRL-named logs, trackers, TRL's checkpoint layout
    trainer.py      GRPOTrainer: construction, train(), evaluate()
Mapping and differences: docs/trl.md. Tests: tests/test_trl_compat.py.
"""

from .grpo_config import GRPOConfig
from .options import TRLCompatWarning
from .trainer import GRPOTrainer

__all__ = ["GRPOConfig", "GRPOTrainer", "TRLCompatWarning"]
