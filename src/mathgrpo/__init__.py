"""mathgrpo: GRPO fine-tuning of math-reasoning language models.

Run `mathgrpo train` (embedded default) or `mathgrpo train config.yaml`; see README.md.
"""

__version__ = "0.1.0"
