"""Tests for mathgrpo.evaluate: metric functions against reference implementations, `evaluate` with a
scripted rollout, base-vs-trained on a tiny random Llama + the real SmolLM2 tokenizer, `run_eval` bad input."""

from __future__ import annotations

import json
import logging
import math
from itertools import combinations

import numpy as np
import pytest
import torch

from mathgrpo.answers import is_equivalent
from mathgrpo.config import Config, save_config
from mathgrpo.data import Problem
from mathgrpo.eval_stats import bootstrap_ci, majority_vote, pass_at_k
from mathgrpo.evaluate import compare, eval_and_report, evaluate, format_comparison_table, run_eval
from mathgrpo.scoring import RewardSet
from mathgrpo.rollout import Completions

# --- pass@k ---------------------------------------------------------------------------------------------


def pass_at_k_closed_form(n, c, k):
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def pass_at_k_by_enumeration(n, c, k):
    """Fraction of k-subsets of n samples (c correct) holding at least one correct sample."""
    samples = [True] * c + [False] * (n - c)
    subsets = list(combinations(range(n), k))
    return sum(any(samples[i] for i in s) for s in subsets) / len(subsets)


@pytest.mark.parametrize("n", range(1, 9))
def test_pass_at_k_matches_closed_form(n):
    for c in range(n + 1):
        for k in range(1, n + 1):
            assert pass_at_k(n, c, k) == pytest.approx(pass_at_k_closed_form(n, c, k), abs=1e-12)
            assert pass_at_k(n, c, k) == pytest.approx(pass_at_k_by_enumeration(n, c, k), abs=1e-12)


def test_pass_at_k_edge_cases():
    assert pass_at_k(10, 0, 1) == 0.0
    assert pass_at_k(10, 0, 10) == 0.0
    assert pass_at_k(10, 8, 3) == 1.0  # n - c = 2 < k: every 3-subset has a correct one
    assert pass_at_k(5, 5, 1) == 1.0
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25)
    # Large n stays finite and exact where binomials overflow floats.
    assert pass_at_k(2000, 3, 100) == pytest.approx(pass_at_k_closed_form(2000, 3, 100), rel=1e-9)
    for bad in [(4, 5, 1), (4, -1, 1), (4, 2, 0), (4, 2, 5)]:
        with pytest.raises(ValueError, match="pass_at_k"):
            pass_at_k(*bad)


# --- majority vote --------------------------------------------------------------------------------------

def test_majority_vote_groups_equivalent_answers():
    answers = ["3", "1/2", "0.5", None, "\\frac{1}{2}", "3"]
    assert majority_vote(answers) == "1/2"  # class {1/2, 0.5, \frac{1}{2}} has 3 votes, {3} has 2
    assert is_equivalent(majority_vote(answers), "0.5")  # the winning class, whichever member represents it
    assert is_equivalent(majority_vote(answers), "\\frac12")
    assert not is_equivalent(majority_vote(answers), "3")


def test_majority_vote_none_never_wins_and_ties_go_first():
    assert majority_vote([None, None, None, "7"]) == "7"
    assert majority_vote([None, None]) is None
    assert majority_vote([]) is None
    assert majority_vote(["7", "0.5", "1/2", "7.0"]) == "7"  # 2 vs 2: the class seen first
    assert majority_vote(["1/2", "7", "7.0", "0.5"]) == "1/2"


# --- bootstrap -------------------------------------------------------------------------------------------

def bootstrap_reference(x, n_boot, seed, alpha=0.05):
    rng = np.random.default_rng(seed)
    means = [x[rng.integers(0, len(x), size=len(x))].mean() for _ in range(n_boot)]
    return tuple(np.quantile(means, [alpha / 2, 1 - alpha / 2]))


def test_bootstrap_ci_reference_mean_and_determinism():
    x = np.random.default_rng(0).normal(0.3, 1.0, size=57)
    lo, hi = bootstrap_ci(x, 500, seed=7)
    assert (lo, hi) == pytest.approx(bootstrap_reference(x, 500, 7))
    assert lo < x.mean() < hi
    assert bootstrap_ci(x, 500, seed=7) == (lo, hi)
    assert bootstrap_ci(x, 500, seed=8) != (lo, hi)
    # Width close to the normal approximation 2 * 1.96 * s / sqrt(n).
    assert hi - lo == pytest.approx(2 * 1.96 * x.std() / math.sqrt(len(x)), rel=0.2)


def test_bootstrap_ci_chunks_and_nans():
    x = np.random.default_rng(1).random(3000)
    assert bootstrap_ci(x, 1000, seed=3) == pytest.approx(bootstrap_reference(x, 1000, 3))  # > 1 chunk
    y = np.array([1.0, np.nan, 3.0, 2.0])
    assert bootstrap_ci(y, 200, seed=0) == pytest.approx(bootstrap_reference(y[~np.isnan(y)], 200, 0))
    assert all(math.isnan(v) for v in bootstrap_ci(np.array([np.nan]), 10, 0))
    assert bootstrap_ci(np.zeros(5), 100, 0) == (0.0, 0.0)


# --- shared fixtures: the real tokenizer, a tiny random Llama ---------------------------------------------

@pytest.fixture(scope="module")
def tokenizer(smol_tokenizer):
    return smol_tokenizer


def tiny_llama(tokenizer, hidden=64, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=hidden, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=2 * hidden, vocab_size=len(tokenizer),
                      pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    return LlamaForCausalLM(cfg).eval()


def with_lora(model, scale=0.0, seed=1):
    """LoRA on q/v; scale > 0 fills lora_B with noise so the adapter changes the outputs."""
    from peft import LoraConfig, get_peft_model

    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                            lora_dropout=0.0, task_type="CAUSAL_LM"))
    if scale:
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in peft.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=g) * scale)
    return peft.eval()


def small_cfg(**eval_changes) -> Config:
    cfg = Config()
    cfg.model.device, cfg.model.dtype = "cpu", "float32"
    cfg.data.source, cfg.data.arithmetic_size, cfg.data.test_fraction = "arithmetic", 30, 0.2
    cfg.rewards.functions, cfg.rewards.weights = ["boxed", "accuracy"], [0.5, 1.0]
    cfg.generation.max_new_tokens, cfg.generation.max_batch, cfg.generation.backend = 6, 64, "hf"
    cfg.eval.num_samples, cfg.eval.temperature, cfg.eval.max_problems, cfg.eval.bootstrap = 2, 1.0, 3, 200
    for k, v in eval_changes.items():
        setattr(cfg.eval, k, v)
    return cfg


PROBLEMS = [Problem(id=str(i), problem=f"What is {i} + {i}?", gold=str(2 * i), solution=f"\\boxed{{{2 * i}}}")
            for i in range(1, 5)]


# --- evaluate() with a scripted rollout: every metric against a hand computation -------------------------

# Per problem: the k=4 sample texts and whether each is correct (gold = 2i).
SCRIPT = {
    1: (["\\boxed{2}", "\\boxed{7}", "I think \\boxed{7}", "no answer"], [1, 0, 0, 0]),  # maj 7: wrong
    2: (["\\boxed{4}", "so \\boxed{4.0}", "\\boxed{7}", "no answer"], [1, 1, 0, 0]),  # maj 4: right
    3: (["nothing", "still nothing", "no", "none"], [0, 0, 0, 0]),  # no answers at all
    4: (["\\boxed{7}", "\\boxed{8}", "\\boxed{7}", "\\boxed{\\frac{16}{2}}"], [0, 1, 0, 1]),  # tie: 7 first
}
MAJ_RIGHT = {1: 0.0, 2: 1.0, 3: 0.0, 4: 0.0}
TRUNCATED = {(2, 3), (3, 0)}  # (problem, sample) pairs flagged as truncated


class ScriptedRollout:
    def __init__(self, tokenizer, prompt_of):
        self.tok, self.prompt_of, self.calls = tokenizer, prompt_of, []

    def sync_weights(self, model):
        pass

    def generate(self, prompt_ids, n, sampling):
        self.calls.append((len(prompt_ids), n, sampling.seed, sampling.temperature, sampling.max_new_tokens))
        texts, trunc = [], []
        for ids in prompt_ids:
            i = self.prompt_of[tuple(ids)]
            texts += SCRIPT[i][0][:n]
            trunc += [(i, s) in TRUNCATED for s in range(n)]
        ids = [self.tok(t, add_special_tokens=False)["input_ids"] for t in texts]
        width = max(map(len, ids))
        comp = torch.full((len(ids), width), self.tok.pad_token_id)
        mask = torch.zeros((len(ids), width), dtype=torch.bool)
        for r, row in enumerate(ids):
            comp[r, :len(row)] = torch.tensor(row)
            mask[r, :len(row)] = True
        return Completions(prompt_ids=[p for p in prompt_ids for _ in range(n)], completion_ids=comp,
                           completion_mask=mask, texts=texts, truncated=torch.tensor(trunc))


def test_evaluate_metrics_match_hand_computation(tokenizer):
    from mathgrpo.prompts import PromptBuilder

    cfg = small_cfg(num_samples=4, max_problems=None, seed=100)
    cfg.generation.max_batch = 8  # 2 problems x 4 samples per generate call
    builder = PromptBuilder(tokenizer, cfg.prompt, None)
    rollout = ScriptedRollout(tokenizer, {tuple(builder.ids(p.problem)): int(p.id) for p in PROBLEMS})
    rng_before = torch.random.get_rng_state()
    res = evaluate(None, tokenizer, PROBLEMS, cfg, rollout=rollout, label="x")
    assert torch.equal(torch.random.get_rng_state(), rng_before)  # the caller's RNG is left alone

    assert rollout.calls == [(2, 4, 100, 1.0, 6), (2, 4, 101, 1.0, 6)]  # batched, seeded per batch
    correct = {i: SCRIPT[i][1] for i in SCRIPT}
    assert res.metrics["pass@1"] == pytest.approx(np.mean([np.mean(c) for c in correct.values()]))
    assert res.metrics["pass@k"] == pytest.approx(np.mean([float(any(c)) for c in correct.values()]))
    assert res.metrics["maj@k"] == pytest.approx(np.mean(list(MAJ_RIGHT.values())))
    assert res.metrics["n_problems"] == 4 and res.metrics["k"] == 4
    lengths = [len(tokenizer(t, add_special_tokens=False)["input_ids"]) for i in SCRIPT for t in SCRIPT[i][0]]
    assert res.metrics["completion_length"] == pytest.approx(np.mean(lengths))
    assert res.metrics["truncated_frac"] == pytest.approx(len(TRUNCATED) / 16)

    # Rewards: the RewardSet run directly on the same texts and golds.
    texts = [t for i in SCRIPT for t in SCRIPT[i][0]]
    golds = [str(2 * i) for i in SCRIPT for _ in range(4)]
    per, total = RewardSet([("boxed", 0.5), ("accuracy", 1.0)]).score(texts, gold=golds)
    assert res.metrics["rewards/boxed"] == pytest.approx(per[:, 0].mean())
    assert res.metrics["rewards/accuracy"] == pytest.approx(per[:, 1].mean())
    assert res.metrics["reward"] == pytest.approx(total.mean())

    rec = {r["id"]: r for r in res.records}
    assert [s["correct"] for s in rec["4"]["samples"]] == [False, True, False, True]
    assert rec["4"]["maj_answer"] == "7" and rec["4"]["maj@4"] is False
    assert rec["3"]["maj_answer"] is None and rec["3"]["samples"][0]["answer"] is None
    assert rec["2"]["samples"][1]["answer"] == "4.0" and rec["2"]["n_correct"] == 2
    assert set(rec["1"]["samples"][0]["rewards"]) == {"boxed", "accuracy", "total"}


@pytest.mark.parametrize("answer,expected", [("boxed", [None, None, "5", None]), ("final", ["6", "6", "5", None])])
def test_eval_answer_final_reads_the_last_number_without_a_box(tokenizer, monkeypatch, answer, expected):
    from mathgrpo.prompts import PromptBuilder

    monkeypatch.setitem(SCRIPT, 3, (["it is 6", "6", "\\boxed{5} then 6", "none"], None))
    cfg = small_cfg(num_samples=4, max_problems=None, answer=answer)
    builder = PromptBuilder(tokenizer, cfg.prompt, None)
    rollout = ScriptedRollout(tokenizer, {tuple(builder.ids(p.problem)): int(p.id) for p in PROBLEMS})
    rec = {r["id"]: r for r in evaluate(None, tokenizer, PROBLEMS, cfg, rollout=rollout).records}
    assert [s["answer"] for s in rec["3"]["samples"]] == expected  # a box wins over a later number
    assert rec["3"]["n_correct"] == expected.count("6")


def test_evaluate_rejects_empty_problem_list(tokenizer):
    with pytest.raises(ValueError, match="no problems"):
        evaluate(None, tokenizer, [], small_cfg(), rollout=object())


# --- compare / table ----------------------------------------------------------------------------------------

def test_compare_rows_diff_and_ci(tokenizer):
    from mathgrpo.prompts import PromptBuilder

    cfg = small_cfg(num_samples=4, max_problems=None)
    builder = PromptBuilder(tokenizer, cfg.prompt, None)
    prompt_of = {tuple(builder.ids(p.problem)): int(p.id) for p in PROBLEMS}
    a = evaluate(None, tokenizer, PROBLEMS, cfg, rollout=ScriptedRollout(tokenizer, prompt_of), label="base")
    b = evaluate(None, tokenizer, PROBLEMS, cfg, rollout=ScriptedRollout(tokenizer, prompt_of), label="trained")
    b.per_problem["pass@1"] = a.per_problem["pass@1"] + np.array([0.25, 0.0, 0.5, 0.25])
    b.metrics["pass@1"] = float(b.per_problem["pass@1"].mean())
    rows = {r["key"]: r for r in compare(a, b, n_boot=300, seed=5)}
    assert rows["pass@1"]["diff"] == pytest.approx(0.25)
    lo, hi = bootstrap_ci(np.array([0.25, 0.0, 0.5, 0.25]), 300, 5)
    assert (rows["pass@1"]["ci_low"], rows["pass@1"]["ci_high"]) == pytest.approx((lo, hi))
    assert rows["maj@k"]["diff"] == 0.0 and rows["maj@k"]["ci_low"] == 0.0
    assert rows["n_problems"]["base"] == 4
    table = format_comparison_table(list(rows.values()))
    assert "| pass@4 |" in table and "| rewards/accuracy |" in table and "95% CI" in table

    b.problem_ids = b.problem_ids[::-1]
    with pytest.raises(ValueError, match="different problems"):
        compare(a, b, 10, 0)


# --- the real thing: tiny random Llama, real tokenizer, HF rollout ------------------------------------------

def sample_texts(path):
    return [[s["text"] for s in json.loads(line)["samples"]] for line in path.read_text().splitlines()]


@pytest.mark.integration
def test_base_vs_trained_uses_adapter_off_and_same_seeds(tokenizer, tmp_path):
    cfg = small_cfg()
    plain = tiny_llama(tokenizer)
    base_alone = evaluate(plain, tokenizer, PROBLEMS, cfg, label="base")
    model = with_lora(tiny_llama(tokenizer), scale=0.5)  # same base weights (same seed), a real adapter
    summary = eval_and_report(model, tokenizer, PROBLEMS, cfg, tmp_path)

    base_texts = sample_texts(tmp_path / "eval_base.jsonl")
    trained_texts = sample_texts(tmp_path / "eval_trained.jsonl")
    assert base_texts == [[s["text"] for s in r["samples"]] for r in base_alone.records]
    assert base_texts != trained_texts
    assert len(base_texts) == 3 and all(len(t) == 2 for t in base_texts)  # eval.max_problems, num_samples
    saved = json.loads((tmp_path / "eval_summary.json").read_text())
    assert saved["comparison"] == summary["comparison"]
    assert {r["key"] for r in saved["comparison"]} >= {"pass@1", "pass@k", "maj@k", "reward", "rewards/boxed"}
    assert (tmp_path / "report.md").is_file() and (tmp_path / "report.html").is_file()
    assert model.active_adapter == "default"  # the adapter is back on after the base evaluation


@pytest.mark.integration
def test_identity_adapter_gives_zero_difference(tokenizer, tmp_path):
    from mathgrpo.evaluate import evaluate_trained_run

    model = with_lora(tiny_llama(tokenizer), scale=0.0)  # fresh LoRA: B = 0, so trained == base
    summary = evaluate_trained_run(small_cfg(), tmp_path, model, tokenizer, PROBLEMS)
    assert sample_texts(tmp_path / "eval_base.jsonl") == sample_texts(tmp_path / "eval_trained.jsonl")
    for row in summary["comparison"]:
        if row["key"] != "n_problems":
            assert row["diff"] in (0.0, None) and row["ci_low"] in (0.0, None) and row["ci_high"] in (0.0, None)


@pytest.mark.integration
def test_full_finetune_base_model_and_single_model(tokenizer, tmp_path, caplog):
    cfg = small_cfg()
    base, trained = tiny_llama(tokenizer, seed=0), tiny_llama(tokenizer, seed=1)
    base_alone = evaluate(base, tokenizer, PROBLEMS, cfg)
    summary = eval_and_report(trained, tokenizer, PROBLEMS, cfg, tmp_path / "pair", base_model=base)
    assert sample_texts(tmp_path / "pair" / "eval_base.jsonl") == [[s["text"] for s in r["samples"]]
                                                                    for r in base_alone.records]
    assert summary["comparison"] is not None

    with caplog.at_level(logging.WARNING, logger="mathgrpo.evaluate"):
        single = eval_and_report(trained, tokenizer, PROBLEMS, cfg, tmp_path / "one")  # nothing to compare to
    assert "evaluating it alone" in caplog.text
    assert single["comparison"] is None and set(single["models"]) == {"model"}
    assert (tmp_path / "one" / "eval.jsonl").is_file()
    assert "| pass@1 |" in (tmp_path / "one" / "report.md").read_text()


@pytest.mark.integration
def test_greedy_with_k_above_1_warns_and_repeats(tokenizer, caplog):
    cfg = small_cfg(temperature=0.0, num_samples=2)
    with caplog.at_level(logging.WARNING, logger="mathgrpo.evaluate"):
        res = evaluate(tiny_llama(tokenizer), tokenizer, PROBLEMS, cfg)
    assert "greedy" in caplog.text
    for rec in res.records:
        assert rec["samples"][0]["text"] == rec["samples"][1]["text"]


# --- run_eval: a fabricated run dir, bad input -------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_dir(tokenizer, tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama(tokenizer).save_pretrained(d)
    tokenizer.save_pretrained(d)
    return d


def make_run(root, tiny_dir, adapter_model, metrics=True, config=True):
    run = root / "run"
    (run / "checkpoints").mkdir(parents=True)
    cfg = small_cfg()
    cfg.model.name_or_path = str(tiny_dir)
    if config:
        save_config(cfg, run / "config.yaml")
    if metrics:
        steps = [{"step": s, "reward": 0.1 * s} for s in range(1, 5)]
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in steps))
    adapter_model.save_pretrained(run / "adapter")
    return run


def test_find_run_config(tmp_path):
    from mathgrpo.evaluate import find_run_config

    run = tmp_path / "run"
    ckpt = run / "checkpoints" / "checkpoint-20" / "adapter"
    ckpt.mkdir(parents=True)
    (run / "config.yaml").write_text("{}\n")
    for path in (run, run / "checkpoints" / "checkpoint-20", ckpt):
        assert find_run_config(path) == run / "config.yaml"
    loose = tmp_path / "project" / "my_adapter"  # a project folder's own config.yaml is not a run's
    loose.mkdir(parents=True)
    (tmp_path / "project" / "config.yaml").write_text("{}\n")
    assert find_run_config(loose) is None
    (run / "config.yaml").unlink()
    with pytest.raises(FileNotFoundError, match="no config.yaml"):
        find_run_config(run)


def test_eval_config_sources(tmp_path):
    from mathgrpo.evaluate import eval_config

    run = tmp_path / "run"
    (run / "adapter").mkdir(parents=True)
    cfg = small_cfg()
    cfg.eval.seed = 77
    save_config(cfg, run / "config.yaml")
    other = tmp_path / "other.yaml"
    other.write_text("eval:\n  seed: 5\n")
    assert eval_config(str(run)).eval.seed == 77  # the run's own settings
    assert eval_config(str(run / "adapter"), overrides=["eval.seed=3"]).eval.seed == 3
    assert eval_config(str(run), path=str(other)).eval.seed == 5  # an explicit file wins


@pytest.mark.integration
def test_run_eval_on_a_run_dir(tokenizer, tiny_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    run = make_run(tmp_path, tiny_dir, with_lora(AutoModelForCausalLM.from_pretrained(tiny_dir), scale=0.3))
    summary = run_eval(None, adapter=str(run), baseline=True, overrides=["eval.max_problems=2"])
    assert set(summary["models"]) == {"base", "trained"}
    assert summary["models"]["trained"]["metrics"]["n_problems"] == 2
    md = (run / "report.md").read_text()
    assert "| pass@2 |" in md and "plots/rewards.png" in md
    assert len((run / "eval_trained.jsonl").read_text().splitlines()) == 2


def test_run_eval_bad_input(tokenizer, tiny_dir, tmp_path):
    from mathgrpo.models import ModelError

    other = with_lora(tiny_llama(tokenizer, hidden=32))
    no_cfg = make_run(tmp_path / "a", tiny_dir, other, config=False)
    with pytest.raises(FileNotFoundError, match="no config.yaml"):
        run_eval(None, adapter=str(no_cfg), baseline=True)
    misfit = make_run(tmp_path / "b", tiny_dir, other)
    with pytest.raises(ModelError, match="does not fit"):
        run_eval(None, adapter=str(misfit), baseline=True)
    with pytest.raises(FileNotFoundError, match="not found"):
        run_eval(Config(), adapter=str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="--baseline"):
        run_eval(Config(), model_path=str(tiny_dir), baseline=True)


def test_evaluation_judges_values_leniently_while_the_reward_stays_strict(tokenizer, monkeypatch):
    from mathgrpo.prompts import PromptBuilder

    texts = ["\\boxed{8\\text{ cm}^2}", "so \\boxed{2\\times4=8}", "\\boxed{4+4}", "\\boxed{0.8\\times10^1}"]  # gold 8
    monkeypatch.setitem(SCRIPT, 4, (texts, None))
    cfg = small_cfg(num_samples=4, max_problems=None)
    builder = PromptBuilder(tokenizer, cfg.prompt, None)
    rollout = ScriptedRollout(tokenizer, {tuple(builder.ids(p.problem)): int(p.id) for p in PROBLEMS})
    rec = {r["id"]: r for r in evaluate(None, tokenizer, PROBLEMS, cfg, rollout=rollout).records}["4"]
    assert [s["correct"] for s in rec["samples"]] == [True, True, False, True]  # `4+4` is the question, not a value
    assert rec["maj_answer"] == "8" and rec["maj@4"] is True and rec["n_correct"] == 3
    assert [s["rewards"]["accuracy"] for s in rec["samples"]] == [0.0, 0.0, 0.0, 0.0]  # training's guard
