"""The TRL front door: a TRL-style script runs with only its import changed; options map or warn; adapters load."""

from __future__ import annotations

import difflib
import io
import json
import math
import warnings
from contextlib import redirect_stdout
from pathlib import Path

import pytest
import torch

from mathgrpo.trl_compat import GRPOConfig, GRPOTrainer, TRLCompatWarning

# A script as TRL users write it (for older TRL: logging_dir, overwrite_output_dir as a string, one prompt x 4
# completions, bf16 on by default, 4-bit on a GPU). The test swaps only the import line.
TRL_SCRIPT = '''
import os

import pandas as pd
import torch
from datasets import Dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, PrinterCallback
from trl import GRPOConfig, GRPOTrainer

MODEL, OUT = os.environ["TRL_TEST_MODEL"], os.environ["TRL_TEST_OUT"]
tokenizer = AutoTokenizer.from_pretrained(MODEL)
df = pd.DataFrame({"question": [f"What is {a} + {b}?" for a, b in [(1, 2), (3, 4), (5, 6), (7, 8), (9, 9)]]})
df["answer"] = [str(eval(q[8:-1])) for q in df["question"]]
df["prompt"] = [tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                              add_generation_prompt=True) for q in df["question"]]
dataset = Dataset.from_pandas(df)

seen = []  # what the reward functions were called with

def correctness_reward(prompts, completions, answer, **kwargs):
    seen.append({"prompts": prompts, "completions": completions, "answer": answer, **kwargs})
    return [2.0 if a in c else 0.0 for c, a in zip(completions, answer)]

def length_reward(completions, **kwargs):
    return [len(set(c)) / 10 for c in completions]

if torch.cuda.is_available():
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(MODEL, quantization_config=bnb, device_map={"": 0})
else:
    model = AutoModelForCausalLM.from_pretrained(MODEL)

peft_config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"],
                         task_type="CAUSAL_LM")
training_args = GRPOConfig(
    output_dir=OUT,
    logging_dir=os.path.join(OUT, "logs"),
    overwrite_output_dir='True',
    learning_rate=1e-3,
    bf16=True,
    per_device_train_batch_size=1,
    gradient_accumulation_steps=1,
    num_generations=4,
    max_prompt_length=128,
    max_completion_length=8,
    max_steps=3,
    logging_steps=1,
    save_steps=2,
    report_to="none",
)
trainer = GRPOTrainer(
    model=model,
    processing_class=tokenizer,
    reward_funcs=[correctness_reward, length_reward],
    args=training_args,
    train_dataset=dataset,
    peft_config=peft_config,
    callbacks=[PrinterCallback()],
)
trainer.train()
trainer.save_model(os.path.join(OUT, "final"))
'''


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest


def _only_import_changed(script: str) -> str:
    ours = script.replace("from trl import GRPOConfig, GRPOTrainer", "from mathgrpo import GRPOConfig, GRPOTrainer")
    changed = [d for d in difflib.ndiff(script.splitlines(), ours.splitlines()) if d[:1] in "+-"]
    assert changed == ["- from trl import GRPOConfig, GRPOTrainer", "+ from mathgrpo import GRPOConfig, GRPOTrainer"]
    return ours


def _run_script(script: str, model_dir: str, out: Path, monkeypatch) -> tuple[dict, str, list]:
    monkeypatch.setenv("TRL_TEST_MODEL", model_dir)
    monkeypatch.setenv("TRL_TEST_OUT", str(out))
    ns = {"__name__": "__main__"}
    buf = io.StringIO()
    with warnings.catch_warnings(record=True) as caught, redirect_stdout(buf):
        warnings.simplefilter("always")
        exec(compile(script, "trl_script.py", "exec"), ns)
    return ns, buf.getvalue(), [str(w.message) for w in caught if issubclass(w.category, TRLCompatWarning)]


def _lora_state(model) -> dict[str, torch.Tensor]:
    from peft import get_peft_model_state_dict

    return {k: v.detach().cpu().clone() for k, v in get_peft_model_state_dict(model).items()}


@pytest.fixture(scope="module")
def trl_run(tiny_model_dir, tmp_path_factory):
    mp = pytest.MonkeyPatch()
    out = tmp_path_factory.mktemp("trl") / "outputs"
    try:
        yield (out, *_run_script(_only_import_changed(TRL_SCRIPT), tiny_model_dir, out, mp))
    finally:
        mp.undo()


@pytest.mark.integration
def test_trl_script_runs_with_only_the_import_changed(trl_run):
    out, ns, stdout, warned = trl_run
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(r["completion_length_max"] <= 8 for r in rows)  # max_completion_length
    # one prompt x 4 completions a step; bf16 -> float32 on a CPU (NF4 on CUDA); logging_dir redirected: one line each
    assert any("read as 1 prompt(s) x 4 completions" in w for w in warned)
    assert any(w.startswith("bf16=True on a CPU") for w in warned) == (not torch.cuda.is_available())
    assert any(w.startswith("logging_dir=") for w in warned)
    assert not any("overwrite_output_dir" in w for w in warned)  # accepted as the string 'True', no complaint
    trainer = ns["trainer"]
    assert trainer.args.overwrite_output_dir is True
    assert trainer.cfg.trainer.prompts_per_step == 1 and trainer.cfg.grpo.num_generations == 4
    assert trainer.cfg.model.lora_target_modules == ["q_proj", "v_proj"] and trainer.cfg.model.lora_r == 4


@pytest.mark.integration
def test_reward_functions_get_trl_keyword_arguments(trl_run):
    out, ns, _, _ = trl_run
    seen, df = ns["seen"], ns["df"]
    assert len(seen) == 3  # one call per step, 4 completions each
    answer_of = dict(zip(df["prompt"], df["answer"]))
    question_of = dict(zip(df["prompt"], df["question"]))
    for call in seen:
        # exactly TRL's keywords: prompts, completions, completion_ids, the other dataset columns, the hooks
        assert set(call) == {"prompts", "completions", "completion_ids", "question", "answer", "trainer_state",
                             "log_extra", "log_metric"}
        assert len(call["completions"]) == 4 and len(set(call["prompts"])) == 1  # one prompt, G=4
        assert call["answer"] == [answer_of[p] for p in call["prompts"]]
        assert call["question"] == [question_of[p] for p in call["prompts"]]
        assert all(isinstance(c, str) for c in call["completions"])
        tok = ns["tokenizer"]
        for text, ids in zip(call["completions"], call["completion_ids"]):
            assert tok.decode(ids, skip_special_tokens=True) == text
    steps = [call["trainer_state"] for call in seen]
    assert steps[0] is steps[-1]  # the live TrainerState, as in TRL


@pytest.mark.integration
def test_printer_callback_receives_the_logs(trl_run):
    out, ns, stdout, _ = trl_run
    printed = [line for line in stdout.splitlines() if line.startswith("{")]
    step_logs = [p for p in printed if "'loss'" in p]
    assert len(step_logs) == 3  # logging_steps=1
    for key in ("'reward'", "'rewards/correctness_reward/mean'", "'rewards/length_reward/mean'",
                "'completions/mean_length'", "'learning_rate'", "'grad_norm'", "'epoch'"):
        assert key in step_logs[0], key
    assert any("'train_runtime'" in p for p in printed)
    hist = ns["trainer"].state.log_history
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for h, m in zip([h for h in hist if "loss" in h], metrics):
        assert h["step"] == m["step"] and h["reward"] == pytest.approx(m["reward"])
        assert h["epoch"] == pytest.approx(m["step"] / 5, abs=1e-4)  # 1 prompt a step, 5 prompts


@pytest.mark.integration
def test_checkpoints_in_trl_layout_load_with_peft(trl_run, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out, ns, _, _ = trl_run
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-3"]
    ours = _lora_state(ns["trainer"].model)
    assert any(v.abs().sum() > 0 for k, v in ours.items() if "lora_B" in k)  # training moved the adapter
    for path in (out / "checkpoint-3", out / "final"):
        assert (path / "adapter_config.json").is_file() and (path / "adapter_model.safetensors").is_file()
        loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(path))
        theirs = _lora_state(loaded)
        assert theirs.keys() == ours.keys()
        for k in ours:
            torch.testing.assert_close(theirs[k], ours[k], rtol=0, atol=0)
    state = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["global_step"] == 2 and [h["step"] for h in state["log_history"]] == [1, 2]
    # the checkpoint-2 adapter differs from the final one: it was written at step 2, not copied at the end
    ck2 = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(out / "checkpoint-2"))
    assert any(not torch.equal(v, ours[k]) for k, v in _lora_state(ck2).items())


def test_unknown_and_unsupported_options_are_named():
    with pytest.raises(TypeError, match=r"'learnig_rate' \(did you mean 'learning_rate'\?\)"):
        GRPOConfig(learnig_rate=1e-5)
    with pytest.warns(TRLCompatWarning, match=r"optim='adamw_8bit' \(mathgrpo uses torch.optim.AdamW\).*"
                                              r"vllm_mode='server'"):
        cfg = GRPOConfig(optim="adamw_8bit", vllm_mode="server")
    assert cfg.ignored_options == {"optim": "adamw_8bit", "vllm_mode": "server"}
    with pytest.warns(TRLCompatWarning, match="use_vllm=True: mathgrpo generates with its own engine"):
        GRPOConfig(use_vllm=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # TRL defaults ask for nothing different: no warning
        GRPOConfig(use_vllm=False, optim="adamw_torch", importance_sampling_level="token", shuffle_dataset=True,
                   use_bias_correction_kl=True, disable_dropout=False)


def test_published_recipe_options_map_to_the_native_keys():
    """TRL's mini-batches, entropy bonus, two-sided clip, off-policy mask, vLLM correction and min_p /
    repetition_penalty sampling: mapped, not refused or ignored."""
    cfg = GRPOConfig(per_device_train_batch_size=8, gradient_accumulation_steps=2, steps_per_generation=4,
                     num_generations=8, max_steps=40, num_iterations=2, delta=1.5, entropy_coef=0.001,
                     off_policy_mask_threshold=0.5, vllm_importance_sampling_mode="token_truncate",
                     vllm_importance_sampling_clip_max=2.0, min_p=0.05,
                     repetition_penalty=1.1).to_mathgrpo_config(on_cuda=False)
    g = cfg.grpo
    assert (cfg.generation.min_p, cfg.generation.repetition_penalty) == (0.05, 1.1)
    # a rollout of 8 x 4 = 32 completions (4 prompts), 2 optimizer steps of 16 each, 2 passes: 4 optimizer steps
    assert (cfg.trainer.prompts_per_step, g.mini_batches, g.num_iterations, cfg.trainer.max_steps) == (4, 2, 2, 10)
    assert (g.delta, g.entropy_coef, g.off_policy_mask_threshold) == (1.5, 0.001, 0.5)
    assert (g.sampler_correction, g.sampler_correction_max, g.sampler_correction_min) == ("token_truncate", 2.0, None)
    same = GRPOConfig(per_device_train_batch_size=8, generation_batch_size=32, num_generations=8, max_steps=8,
                      gradient_accumulation_steps=2).to_mathgrpo_config(on_cuda=False)
    assert (same.trainer.prompts_per_step, same.grpo.mini_batches) == (4, 2)
    assert GRPOConfig(vllm_importance_sampling_correction=False, max_steps=1).to_mathgrpo_config(
        on_cuda=False).grpo.sampler_correction == "none"
    with pytest.warns(TRLCompatWarning, match="use_vllm=True"):  # TRL's vLLM defaults where the script uses vLLM
        vllm = GRPOConfig(use_vllm=True, max_steps=1).to_mathgrpo_config(on_cuda=False).grpo
    assert (vllm.sampler_correction, vllm.sampler_correction_max) == ("sequence_mask", 3.0)
    plain = GRPOConfig(max_steps=1).to_mathgrpo_config(on_cuda=False).grpo  # else mathgrpo's default
    assert plain.entropy_target is None  # no adaptive entropy control unless asked for
    # TRL's adaptive entropy control (Skywork-OR1): use_adaptive_entropy turns the target on; bounds and step ride along
    adaptive = GRPOConfig(use_adaptive_entropy=True, entropy_coef=0.01, entropy_target=0.3, entropy_coef_delta=0.002,
                          entropy_coef_min=0.001, entropy_coef_max=0.05, max_steps=1).to_mathgrpo_config(on_cuda=False)
    a = adaptive.grpo
    assert (a.entropy_coef, a.entropy_target, a.entropy_coef_delta, a.entropy_coef_min, a.entropy_coef_max) == (
        0.01, 0.3, 0.002, 0.001, 0.05)
    assert GRPOConfig(use_adaptive_entropy=True, max_steps=1).to_mathgrpo_config(
        on_cuda=False).grpo.entropy_target == 0.2  # TRL's default target
    with pytest.raises(ValueError, match=r"grpo.entropy_coef .* must lie in \[grpo.entropy_coef_min"):
        GRPOConfig(use_adaptive_entropy=True, entropy_coef=0.5, entropy_coef_max=0.1,
                   max_steps=1).to_mathgrpo_config(on_cuda=False)
    assert (plain.sampler_correction, plain.sampler_correction_max) == ("token_truncate", 3.0)
    assert plain.reward_aggregation == "sum_then_normalize" and plain.ref_sync_steps == 0
    synced = GRPOConfig(sync_ref_model=True, beta=0.04, ref_model_sync_steps=64, ref_model_mixup_alpha=0.9,
                        max_steps=1).to_mathgrpo_config(on_cuda=False).grpo  # TR-DPO's soft reference update
    assert (synced.ref_sync_steps, synced.ref_sync_alpha) == (64, 0.9)
    with pytest.raises(ValueError, match="grpo.beta=0 uses no reference"):  # as TRL refuses it
        GRPOConfig(sync_ref_model=True, max_steps=1).to_mathgrpo_config(on_cuda=False)
    assert GRPOConfig(multi_objective_aggregation="normalize_then_sum", max_steps=1).to_mathgrpo_config(
        on_cuda=False).grpo.reward_aggregation == "normalize_then_sum"  # GDPO
    with pytest.raises(ValueError, match="grpo.reward_aggregation"):
        GRPOConfig(multi_objective_aggregation="sum", max_steps=1).to_mathgrpo_config(on_cuda=False)
    with pytest.raises(ValueError, match="steps_per_generation=3 is not a multiple of gradient_accumulation_steps=2"):
        GRPOConfig(gradient_accumulation_steps=2, steps_per_generation=3, max_steps=1).to_mathgrpo_config()
    with pytest.raises(ValueError, match="grpo.loss_type: 'vespo'"):
        GRPOConfig(loss_type="vespo", max_steps=1).to_mathgrpo_config()
    with pytest.raises(ValueError, match="GRPOConfig.lr_scheduler_type: unknown 'polynomial'; choose from linear, "):
        GRPOConfig(lr_scheduler_type="polynomial", max_steps=1).to_mathgrpo_config()
    with pytest.raises(ValueError, match="save_strategy='best'"):
        GRPOConfig(save_strategy="best")


@pytest.mark.parametrize("pdb,gas,G,prompts,adjusted", [(8, 1, 8, 1, False), (4, 2, 4, 2, False),
                                                        (16, 1, 4, 4, False), (1, 1, 4, 1, True), (3, 2, 4, 6, True)])
def test_batch_size_rule(pdb, gas, G, prompts, adjusted):
    args = GRPOConfig(per_device_train_batch_size=pdb, gradient_accumulation_steps=gas, num_generations=G, max_steps=5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cfg = args.to_mathgrpo_config(on_cuda=True)
    assert cfg.trainer.prompts_per_step == prompts and cfg.grpo.num_generations == G
    assert any("is not a multiple of num_generations" in str(w.message) for w in caught) == adjusted


def test_step_counts_and_mapping():
    args = GRPOConfig(output_dir="o", per_device_train_batch_size=4, num_generations=4, num_train_epochs=2,
                      save_strategy="epoch", logging_steps=0.25, warmup_ratio=0.1, scale_rewards=False,
                      learning_rate=3e-6, beta=0.04, loss_type="dr_grpo", report_to=["tensorboard"], log_completions=True,
                      lr_scheduler_type="cosine", save_total_limit=2, mathgrpo_overrides={"generation.backend": "hf"})
    cfg = args.to_mathgrpo_config(train_size=10, on_cuda=True)
    t = cfg.trainer
    assert t.max_steps == 20 and t.save_steps == 10  # 2 epochs of 10 prompts, 1 prompt a step
    assert t.logging_steps == 5 and t.log_completions_steps == 5 and t.warmup_steps == 2
    assert (t.learning_rate, t.lr_scheduler, t.save_total_limit, t.tensorboard) == (3e-6, "cosine", 2, True)
    assert (cfg.grpo.scale_rewards, cfg.grpo.beta, cfg.grpo.loss_type) == ("none", 0.04, "dr_grpo")
    assert cfg.model.dtype == "bfloat16" and cfg.generation.backend == "hf"
    assert Path(t.output_dir) / t.run_name == Path("o").resolve()
    with pytest.warns(TRLCompatWarning, match="num_iterations=2"):
        cfg = GRPOConfig(max_steps=9, num_iterations=2, save_steps=4).to_mathgrpo_config(on_cuda=True)
    assert cfg.trainer.max_steps == 5 and cfg.trainer.save_steps == 2 and cfg.grpo.num_iterations == 2
    with pytest.raises(ValueError, match="max_steps=-1 needs the dataset size"):
        GRPOConfig().to_mathgrpo_config()


@pytest.mark.parametrize("loss_type", ["cispo", "sapo", "bnpo"])
def test_loss_options_map_without_warnings(loss_type):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every one of these is honoured as TRL 1.16 reads it
        g = GRPOConfig(loss_type=loss_type, use_bias_correction_kl=False, importance_sampling_level="sequence",
                       sapo_temperature_pos=0.5, sapo_temperature_neg=2.0, epsilon_high=5.0, per_device_train_batch_size=8,
                       num_generations=4, max_steps=1, bf16=False).to_mathgrpo_config(on_cuda=False).grpo
    assert (g.loss_type, g.use_bias_correction_kl, g.importance_sampling_level) == (loss_type, False, "sequence")
    assert (g.sapo_temperature_pos, g.sapo_temperature_neg, g.epsilon_high) == (0.5, 2.0, 5.0)
    assert g.bnpo_batch_rows == 8  # TRL's bnpo: a token mean per micro-batch of per_device_train_batch_size rows
    assert GRPOConfig(max_steps=1, bf16=False).to_mathgrpo_config(on_cuda=False).grpo.use_bias_correction_kl


@pytest.mark.integration
def test_disable_dropout_is_honoured(tiny_model_dir, tmp_path):
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM

    ds = Dataset.from_dict({"prompt": ["1 + 1 =", "2 + 2 ="]})
    for off in (False, True):
        tr = GRPOTrainer(model=AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                         reward_funcs=lambda completions, **kw: [0.0] * len(completions),
                         args=GRPOConfig(output_dir=str(tmp_path), max_steps=1, bf16=False, disable_dropout=off,
                                         per_device_train_batch_size=2, num_generations=2),
                         train_dataset=ds, peft_config=LoraConfig(r=2, lora_alpha=4, lora_dropout=0.3,
                                                                  target_modules=["q_proj"]))
        ps = {m.p for m in tr.model.modules() if isinstance(m, torch.nn.Dropout)}
        assert ps == ({0.0} if off else {0.3}) and tr.cfg.model.lora_dropout == (0.0 if off else 0.3)


def _tiny_trainer(model_dir, out, dataset, rewards, **args):
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer

    opts = dict(output_dir=str(out), per_device_train_batch_size=2, num_generations=2, max_completion_length=4,
                max_steps=2, logging_steps=1, save_steps=1, learning_rate=1e-3, bf16=False, gradient_checkpointing=False,
                disable_tqdm=True)
    opts.update(args)
    return GRPOTrainer(model=AutoModelForCausalLM.from_pretrained(model_dir), reward_funcs=rewards,
                       args=GRPOConfig(**opts), train_dataset=dataset,
                       processing_class=AutoTokenizer.from_pretrained(model_dir),
                       peft_config=LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"]))


@pytest.mark.integration
def test_chat_message_prompts(tiny_model_dir, tmp_path):
    from datasets import Dataset

    msgs = [[{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"{i} + {i}?"}] for i in range(3)]
    ds = Dataset.from_dict({"prompt": msgs, "solution": [str(2 * i) for i in range(3)]})
    calls = []

    def reward(prompts, completions, solution, **kwargs):
        calls.append((prompts, completions, solution))
        kwargs["log_metric"]("my_metric", 1.5)
        return [float(s in c[0]["content"]) for c, s in zip(completions, solution)]

    from transformers import TrainerCallback

    class Recorder(TrainerCallback):
        def __init__(self):
            self.events, self.logs = [], []

        def __getattribute__(self, name):
            if name.startswith("on_"):
                def hook(args, state, control, **kw):
                    self.events.append(name)
                    if name == "on_log":
                        self.logs.append(kw["logs"])
                return hook
            return super().__getattribute__(name)

    trainer = _tiny_trainer(tiny_model_dir, tmp_path / "o", ds, reward, max_steps=1)
    rec = Recorder()
    trainer.add_callback(rec)
    # prompts were rendered by the tokenizer's chat template with the generation prompt
    tok = trainer.processing_class
    assert trainer._train.problems[1].problem == tok.apply_chat_template(msgs[1], tokenize=False,
                                                                         add_generation_prompt=True)
    trainer.train()
    assert len(calls) == 1
    for prompts, completions, solution in calls:
        assert all(p in msgs for p in prompts)  # the messages themselves, as TRL passes them
        assert all(isinstance(c, list) and c[0]["role"] == "assistant" and isinstance(c[0]["content"], str)
                   for c in completions)
        assert solution == [str(2 * msgs.index(p)) for p in prompts]
    assert rec.events == ["on_train_begin", "on_epoch_begin", "on_step_begin", "on_step_end", "on_log", "on_save",
                          "on_log", "on_train_end"]
    assert rec.logs[0]["my_metric"] == 1.5 and "train_runtime" in rec.logs[1]


@pytest.mark.integration
def test_a_peft_model_is_trained_as_given(trl_run, tiny_model_dir, tmp_path):
    from datasets import Dataset
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out, _, _, _ = trl_run
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(out / "checkpoint-3"))
    before = _lora_state(model)
    base_before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}
    trainer = GRPOTrainer(model=model, reward_funcs=lambda completions, **kw: [float(len(set(c))) for c in completions],
                          args=GRPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=2, num_generations=2,
                                          max_completion_length=4, max_steps=1, learning_rate=1e-2, bf16=False,
                                          disable_tqdm=True, beta=0.04, logging_steps=1),
                          train_dataset=Dataset.from_dict({"prompt": ["1 + 1 =", "2 + 2 ="]}))
    trainer.train()
    assert any(not torch.equal(v, before[k]) for k, v in _lora_state(trainer.model).items())
    # The KL reference is the adapter as training started (TRL 1.16's frozen "ref" adapter), not the bare base: the
    # first step's policy is the reference itself
    assert trainer.state.log_history[0]["kl"] == 0.0
    for n, p in trainer.model.named_parameters():
        if "lora_" not in n:
            assert torch.equal(p, base_before[n]), n  # the base stays frozen


@pytest.mark.integration
def test_reward_models_and_bad_datasets_are_refused(tiny_model_dir, tmp_path):
    from datasets import Dataset

    ds = Dataset.from_dict({"prompt": ["1 + 1 =", "2 + 2 ="]})
    with pytest.raises(NotImplementedError, match="reward model"):
        _tiny_trainer(tiny_model_dir, tmp_path, ds, ["some-org/reward-model"])
    with pytest.raises(ValueError, match="needs a 'prompt' column.*'question'"):
        _tiny_trainer(tiny_model_dir, tmp_path, Dataset.from_dict({"question": ["a"]}), lambda completions, **k: [0.0])
    with pytest.raises(ValueError, match=r"peft_config.target_modules: nope match no layer"):
        from peft import LoraConfig
        from transformers import AutoModelForCausalLM

        GRPOTrainer(model=AutoModelForCausalLM.from_pretrained(tiny_model_dir), reward_funcs=lambda completions, **k: [0.0],
                    args=GRPOConfig(output_dir=str(tmp_path), max_steps=1, num_generations=2), train_dataset=ds,
                    peft_config=LoraConfig(target_modules=["nope"]))


@pytest.mark.integration
def test_resume_and_fresh_rerun(tiny_model_dir, tmp_path):
    from datasets import Dataset

    ds = Dataset.from_dict({"prompt": ["1 + 1 =", "2 + 2 =", "3 + 3 ="]})

    def distinct(completions, **kwargs):
        return [len(set(c)) / 5 for c in completions]

    out = tmp_path / "o"
    a = _tiny_trainer(tiny_model_dir, out, ds, distinct)
    a.train()
    first = [json.loads(line)["reward"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    # resume from the TRL-layout checkpoint-1: step 2 is redone exactly
    b = _tiny_trainer(tiny_model_dir, out, ds, distinct)
    b.train(resume_from_checkpoint=str(out / "checkpoint-1"))
    again = [json.loads(line)["reward"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert again == first and len(first) == 2
    assert [h["step"] for h in b.state.log_history if "loss" in h] == [1, 2]
    for k, v in _lora_state(b.model).items():
        torch.testing.assert_close(v, _lora_state(a.model)[k])
    # a fresh run into the same output_dir replaces the earlier one (with a warning), as TRL overwrites
    c = _tiny_trainer(tiny_model_dir, out, ds, distinct, max_steps=1)
    with pytest.warns(TRLCompatWarning, match="holds an earlier run"):
        c.train()
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1"]
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1


@pytest.mark.integration
def test_evaluate_averages_rewards(tiny_model_dir, tmp_path):
    from datasets import Dataset

    ds = Dataset.from_dict({"prompt": ["1 + 1 =", "2 + 2 ="], "target": [1.0, 3.0]})

    def target(completions, target, **kwargs):
        return list(target)

    trainer = _tiny_trainer(tiny_model_dir, tmp_path, ds, target, reward_weights=[0.5])
    metrics = trainer.evaluate(ds)
    assert metrics["eval_rewards/target/mean"] == pytest.approx(2.0)
    assert metrics["eval_reward"] == pytest.approx(1.0)  # weighted by reward_weights
    assert math.isfinite(metrics["eval_completions/mean_length"])


@pytest.mark.slow
@pytest.mark.integration
def test_model_loaded_from_gguf_trains(tmp_path):
    """TRL refuses a model loaded from a GGUF file for training; its weights are dequantised, so mathgrpo trains it."""
    from datasets import Dataset
    from peft import LoraConfig, PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mathgrpo.loading import smollm2_gguf_path

    gguf = smollm2_gguf_path()
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    ds = Dataset.from_dict({"prompt": [[{"role": "user", "content": f"What is {i} + 1?"}] for i in range(4)]})
    out = tmp_path / "o"
    trainer = GRPOTrainer(model=model, processing_class=tok, train_dataset=ds,
                          reward_funcs=lambda completions, **kw: [float(len(c[0]["content"])) for c in completions],
                          args=GRPOConfig(output_dir=str(out), per_device_train_batch_size=4, num_generations=4,
                                          max_completion_length=8, max_steps=1, learning_rate=1e-3, bf16=False,
                                          disable_tqdm=True),
                          peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    trainer.train()
    base = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = PeftModel.from_pretrained(base, str(out / "checkpoint-1"))
    ours = _lora_state(trainer.model)
    for k, v in _lora_state(loaded).items():
        torch.testing.assert_close(v, ours[k], rtol=0, atol=0)
    # full fine-tuning (no peft_config) of the same GGUF model: checkpoints hold plain, reloadable weights
    full = GRPOTrainer(model=loaded.unload(), processing_class=tok, train_dataset=ds, reward_funcs=trainer.reward_funcs,
                       args=GRPOConfig(output_dir=str(tmp_path / "full"), per_device_train_batch_size=4,
                                       num_generations=4, max_completion_length=8, max_steps=1, learning_rate=1e-5,
                                       bf16=False, disable_tqdm=True, gradient_checkpointing=False))
    full.train()
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "full" / "checkpoint-1")
    for (name, a), b in zip(full.model.named_parameters(), reloaded.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


def test_report_to_and_run_name_map_onto_trackers():
    import importlib.util

    cfg = GRPOConfig(output_dir="o", max_steps=2, report_to="wandb", run_name="exp-1").to_mathgrpo_config(on_cuda=True)
    t = cfg.trainer
    assert (t.report_to, t.tensorboard, t.tracker_run_name, t.run_name) == (["wandb"], False, "exp-1", "o")
    cfg = GRPOConfig(max_steps=2, report_to=["tensorboard", "mlflow", "none"]).to_mathgrpo_config(on_cuda=True)
    assert (cfg.trainer.report_to, cfg.trainer.tensorboard, cfg.trainer.tracker_run_name) == (["mlflow"], True, None)
    installed = [n for n in ("wandb", "mlflow", "trackio") if importlib.util.find_spec(n) is not None]
    cfg = GRPOConfig(max_steps=2, report_to="all").to_mathgrpo_config(on_cuda=True)  # every installed one
    assert cfg.trainer.tensorboard and cfg.trainer.report_to == installed
    with pytest.warns(TRLCompatWarning, match=r"report_to=\['comet_ml'\]: not supported by mathgrpo"):
        cfg = GRPOConfig(max_steps=2, report_to=["comet_ml", "wandb"]).to_mathgrpo_config(on_cuda=True)
    assert cfg.trainer.report_to == ["wandb"]


def test_report_to_a_missing_library_fails_before_the_model_loads(tmp_path, monkeypatch):
    import mathgrpo.trackers as trackers

    monkeypatch.setitem(trackers.LIBRARIES, "wandb", ("no_such_wandb_module", "wandb"))
    with pytest.raises(ValueError, match=r"pip install 'mathgrpo\[wandb\]'"):
        GRPOTrainer(model=str(tmp_path / "never-loaded"), reward_funcs=lambda completions, **k: [0.0],
                    args=GRPOConfig(output_dir=str(tmp_path), max_steps=1, report_to="wandb"))


@pytest.mark.integration
def test_peft_rule_for_target_modules(tiny_model_dir, tmp_path):
    """Names matching no layer pass while one matches (a warning names both, as scripts for several
    architectures list `dense` beside `q_proj`); none matching is an error; the native config stays strict."""
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM

    ds = Dataset.from_dict({"prompt": ["1 + 1 =", "2 + 2 ="]})
    with pytest.warns(TRLCompatWarning, match=r"peft_config.target_modules: dense, query_key_value match no layer "
                                              r"of this model \(LlamaForCausalLM\) and are skipped, as peft does; "
                                              r"LoRA goes on q_proj, v_proj"):
        trainer = GRPOTrainer(model=AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                              reward_funcs=lambda completions, **k: [0.0] * len(completions),
                              args=GRPOConfig(output_dir=str(tmp_path), max_steps=1, num_generations=2,
                                              per_device_train_batch_size=2),
                              train_dataset=ds, peft_config=LoraConfig(r=2, target_modules=["q_proj", "dense",
                                                                                             "v_proj", "query_key_value"]))
    adapted = {n.split(".lora_A")[0].rsplit(".", 1)[-1] for n, _ in trainer.model.named_parameters() if "lora_A" in n}
    assert adapted == {"q_proj", "v_proj"} and trainer.cfg.model.lora_target_modules == ["q_proj", "v_proj"]
    with pytest.raises(ValueError, match=r"peft_config.target_modules: dense, query_key_value match no layer.*"
                                         r"its linear layers are: .*q_proj"):
        GRPOTrainer(model=AutoModelForCausalLM.from_pretrained(tiny_model_dir), reward_funcs=lambda completions, **k: [0.0],
                    args=GRPOConfig(output_dir=str(tmp_path), max_steps=1, num_generations=2), train_dataset=ds,
                    peft_config=LoraConfig(target_modules=["dense", "query_key_value"]))
    from mathgrpo.config import ModelConfig
    from mathgrpo.models import ModelError, add_lora

    with pytest.raises(ModelError, match="model.lora_target_modules: dense match no layer"):
        add_lora(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                 ModelConfig(lora_target_modules=["q_proj", "dense"]))
