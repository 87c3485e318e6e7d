"""The front door's `GRPOTrainer`: TRL's constructor, `train()` and `evaluate()` on mathgrpo's engine
(`mathgrpo.trainer.train`). Model preparation: model.py; dataset and rewards: dataset.py, rewards.py; callbacks,
logs and TRL's checkpoint layout: state.py."""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path

from .dataset import ROW, DatasetPrompts
from .grpo_config import GRPOConfig
from .model import prepare_model, record_lora
from .options import report_to_names, warn
from .rewards import check_rewards, trl_reward
from .state import CallbackHost, clear_previous_run, log_history_until, resume_dir, save_weights_and_tokenizer


class GRPOTrainer(CallbackHost):
    """TRL's GRPOTrainer signature on mathgrpo's engine (see the package docstring and docs/trl.md)."""

    def __init__(self, model, reward_funcs=None, args: GRPOConfig | None = None, train_dataset=None,
                 eval_dataset=None, processing_class=None, reward_processing_classes=None, callbacks=None,
                 optimizers=(None, None), quantization_config=None, peft_config=None, **unsupported):
        import torch

        _refuse_unsupported(unsupported, optimizers, reward_processing_classes)
        self.args = args = args if args is not None else GRPOConfig(f"{Path(_model_name(model, 'model')).name}-GRPO")
        self.reward_funcs = check_rewards(reward_funcs)
        _check_before_loading(args, len(self.reward_funcs))
        torch.manual_seed(args.seed)  # LoRA weights are initialised randomly: seed first, as TRL does
        self.model, self.processing_class = prepare_model(model, processing_class, args, peft_config,
                                                          quantization_config)
        self.tokenizer = self.processing_class
        self.train_dataset, self.eval_dataset = train_dataset, eval_dataset
        self._train = DatasetPrompts(train_dataset, "train_dataset", self.processing_class, args.max_prompt_length,
                                     args.chat_template_kwargs)
        self.cfg = self._translate(_model_name(model, ""))
        if eval_dataset is not None and args.eval_strategy != "no":
            warn(f"eval_strategy={args.eval_strategy!r}: mathgrpo does not evaluate during training; it evaluates "
                 f"eval_dataset once, after training (or call trainer.evaluate())")
        self._init_state(callbacks)

    def _translate(self, name_or_path: str):
        """The mathgrpo Config of args, completed from the prepared model."""
        on_cuda = next(self.model.parameters()).device.type == "cuda"
        cfg = self.args.to_mathgrpo_config(train_size=len(self._train.rows), on_cuda=on_cuda,
                                           reward_funcs=self.reward_funcs)
        cfg.model.name_or_path = name_or_path
        record_lora(cfg.model, self.model, self.args.disable_dropout)
        # Replicated weights under torchrun: this front door saves checkpoints and models, and evaluates, on
        # rank 0 alone, which an FSDP2-sharded model cannot do (its weights are gathered by every rank).
        cfg.trainer.fsdp = "off"
        # Trackers other than TensorBoard get what TRL hands them (its metric names, every logging_steps, eval_x as
        # eval/x), as transformers' integrations log on_log; so the engine itself does not report to them.
        self._report_to, cfg.trainer.report_to, self._trackers = cfg.trainer.report_to, [], None
        return cfg

    def _init_state(self, callbacks) -> None:
        from transformers.trainer_callback import TrainerControl, TrainerState

        self.state, self.control = TrainerState(), TrainerControl()
        self.state.is_local_process_zero = self.args.local_process_index == 0
        self.state.is_world_process_zero = self.is_main = self.args.process_index == 0
        self.callbacks = []
        for cb in callbacks or []:
            self.add_callback(cb)
        self._pending: list[dict] = []
        self._extra_metrics: dict[str, list[float]] = {}
        self.extra_log_columns: dict[str, list] = {}
        self._event("on_init_end")

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """The trained adapter (or full model) and the tokenizer into output_dir (default: args.output_dir)."""
        if not self.is_main:
            return
        path = Path(output_dir or self.args.output_dir)
        path.mkdir(parents=True, exist_ok=True)
        save_weights_and_tokenizer(self.model, self.processing_class, path)

    # --- training -----------------------------------------------------------------------------------------------
    def train(self, resume_from_checkpoint=None, **kwargs):
        from transformers.trainer_utils import TrainOutput

        from ..trainer import train

        if kwargs:
            raise TypeError(f"GRPOTrainer.train() got unexpected argument(s) {sorted(kwargs)}")
        cfg = dataclasses.replace(self.cfg, trainer=dataclasses.replace(self.cfg.trainer))
        start = resume_dir(Path(self.args.output_dir), resume_from_checkpoint)
        self._start_state(cfg.trainer, start)
        self._event("on_train_begin")
        self._event("on_epoch_begin")
        self._event("on_step_begin")
        t0 = time.perf_counter()
        rewards = [trl_reward(f, self._train, self._reward_kwargs) for f in self.reward_funcs]
        first = self.state.global_step
        self._trackers = self._open_trackers(resume=start is not None)
        try:
            train(cfg, quiet=self.args.disable_tqdm, model=self.model, tokenizer=self.processing_class,
                  data=self._train.problem_set("train_dataset"), prompts=self._train, reward_funcs=rewards,
                  callbacks=[self._after_step])
        except BaseException:
            self._close_trackers()
            raise
        summary = self._train_summary(time.perf_counter() - t0, first)
        self.log(summary)
        self._event("on_train_end")
        if self.eval_dataset is not None and self.args.eval_strategy != "no":
            self.evaluate()
        self._close_trackers()
        return TrainOutput(self.state.global_step, summary["train_loss"], summary)

    def _start_state(self, t, start: Path | None) -> None:
        """TrainerState at the start of train(): fresh (an earlier run in output_dir cleared) or at the resumed
        step, with the TRL checkpoint's log history; `t` (the run's trainer section) gets the resume folder."""
        self.state.max_steps, self.state.logging_steps, self.state.save_steps = t.max_steps, t.logging_steps, t.save_steps
        self.state.num_train_epochs = math.ceil(t.max_steps * t.prompts_per_step / len(self._train.rows))
        self.state.train_batch_size = self.args.per_device_train_batch_size
        self.state.global_step, self.state.epoch, self.state.log_history = 0, 0.0, []
        if start is not None:
            t.resume = str(start)
            step = int(start.name.split("-")[-1])
            self.state.log_history = log_history_until(Path(self.args.output_dir), start.name, step)
            self.state.global_step, self.state.epoch = step, step * t.prompts_per_step / len(self._train.rows)
        elif self.is_main:
            clear_previous_run(Path(self.args.output_dir), self.args.overwrite_output_dir)
        self._pending = []

    def _train_summary(self, runtime: float, first: int) -> dict:
        """TRL's end-of-training log: runtime, throughput, and the mean logged loss of this train() call."""
        done = self.state.global_step - first
        losses = [h["loss"] for h in self.state.log_history if "loss" in h and h["step"] > first and h["loss"] is not None]
        return {"train_runtime": round(runtime, 4),
                "train_samples_per_second": round(done * self.cfg.trainer.prompts_per_step / runtime, 3),
                "train_steps_per_second": round(done / runtime, 3),
                "train_loss": sum(losses) / len(losses) if losses else float("nan")}

    # --- evaluation ---------------------------------------------------------------------------------------------
    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict:
        """Sample num_generations completions for every eval prompt and average the rewards (TRL's eval metrics)."""
        ds = DatasetPrompts(eval_dataset if eval_dataset is not None else self.eval_dataset, "eval_dataset",
                            self.processing_class, self.args.max_prompt_length, self.args.chat_template_kwargs)
        metrics = {f"{metric_key_prefix}_{k}": v for k, v in self._eval_metrics(ds).items()}
        opened = self._trackers is None  # called on its own: continue the training run's tracker runs
        if opened:
            self._trackers = self._open_trackers(resume=True)
        try:
            self.log(metrics)
        finally:
            if opened:
                self._close_trackers()
        self._event("on_evaluate", metrics=metrics)
        return metrics

    def _eval_metrics(self, ds: DatasetPrompts) -> dict:
        import numpy as np

        from ..scoring import RewardSet
        from ..rollout import make_rollout, sampling_from

        G, cfg = self.cfg.grpo.num_generations, self.cfg
        weights = cfg.rewards.weights or [1.0] * len(self.reward_funcs)
        rs = RewardSet([(trl_reward(f, ds, self._reward_kwargs), w) for f, w in zip(self.reward_funcs, weights)])
        comp = make_rollout(cfg.generation, self.model, self.processing_class).generate(
            [ds.ids(p.problem) for p in ds.problems], G, sampling_from(cfg.generation, seed=cfg.trainer.seed))
        per, total = rs.score(comp.texts, completion_ids=[r[m.bool()].tolist() for r, m in
                                                          zip(comp.completion_ids, comp.completion_mask)],
                              **{ROW: [i for i in range(len(ds.rows)) for _ in range(G)]})
        m = {"reward": float(total.mean()), "reward_std": float(total.std()),
             "completions/mean_length": float(comp.lengths.float().mean()),
             "completions/clipped_ratio": float(comp.truncated.float().mean())}
        for j, name in enumerate(rs.names):
            m[f"rewards/{name}/mean"] = float(np.nanmean(per[:, j])) if np.isfinite(per[:, j]).any() else None
        return m


def _model_name(model, default: str) -> str:
    return str(model if isinstance(model, str) else getattr(model.config, "_name_or_path", default))


def _refuse_unsupported(unsupported: dict, optimizers, reward_processing_classes) -> None:
    bad = {k: v for k, v in unsupported.items() if v is not None}
    if optimizers not in ((None, None), [None, None], None):
        bad["optimizers"] = optimizers
    if reward_processing_classes is not None:
        bad["reward_processing_classes"] = reward_processing_classes
    if bad:
        raise NotImplementedError(f"GRPOTrainer: {', '.join(bad)} not supported by mathgrpo (it builds "
                                  f"torch AdamW from the config and runs reward functions only)")


def _check_before_loading(args: GRPOConfig, n_rewards: int) -> None:
    """What can fail before the (slow) model load: a missing tracker library, reward_weights of the wrong length."""
    from ..trackers import check_installed

    check_installed(report_to_names(args.report_to, warn_others=False))  # as transformers, before the model loads
    if args.reward_weights is not None and len(args.reward_weights) != n_rewards:
        raise ValueError(f"GRPOConfig.reward_weights has {len(args.reward_weights)} values but "
                         f"{n_rewards} reward functions were given")
