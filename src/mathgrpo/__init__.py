"""mathgrpo: GRPO fine-tuning of math-reasoning language models.

Run `mathgrpo train` (embedded default) or `mathgrpo train config.yaml`; see README.md.
"""

__version__ = "0.1.0"


def __getattr__(name):  # `from mathgrpo import GRPOTrainer` loads the TRL front door only when asked for
    if name in ("GRPOConfig", "GRPOTrainer"):
        from . import trl_compat

        return getattr(trl_compat, name)
    raise AttributeError(f"module 'mathgrpo' has no attribute {name!r}")
