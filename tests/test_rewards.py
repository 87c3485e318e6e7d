"""Tests for mathgrpo.rewards: built-ins against plain reference implementations, registry,
user rewards, and RewardSet scoring with its error paths."""

from __future__ import annotations

import math
import random
import textwrap

import numpy as np
import pytest

from mathgrpo import rewards
from mathgrpo.rewards import REWARDS, RewardError, make_cosine_reward, register_reward
from mathgrpo.scoring import RewardSet, load_user_reward

BUILTINS = {"format", "boxed", "accuracy", "similarity", "length", "cosine"}


def _levenshtein(a: str, b: str) -> int:
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def _similarity_ref(a: str, b: str) -> float:
    longest = max(len(a), len(b))
    return 1.0 if longest == 0 else 1.0 - _levenshtein(a, b) / longest


def test_registry_holds_the_builtins():
    assert BUILTINS <= set(REWARDS)
    for name in BUILTINS:
        assert callable(REWARDS[name])


def test_register_reward_adds_and_refuses_duplicates():
    @register_reward("_test_const")
    def const(completions, **kwargs):
        return [0.5] * len(completions)

    try:
        assert REWARDS["_test_const"] is const
        with pytest.raises(ValueError, match="_test_const"):
            register_reward("_test_const")(const)
    finally:
        del REWARDS["_test_const"]


# --------------------------------------------------------------------------------------- format


@pytest.mark.parametrize(
    "prefill, completion, expected",
    [
        ("<think>\n", "reasoning here\n</think>\nSo \\boxed{3}.", 1.0),
        ("", "<think>\nreasoning\n</think>\n\\boxed{3}", 1.0),
        ("", "  <think>r</think>\\boxed 7", 1.0),
        ("", "reasoning\n</think>\n\\boxed{3}", 0.0),  # no <think> and no prefill
        ("<think>\n", "   \n</think>\n\\boxed{3}", 0.0),  # blank reasoning
        ("<think>\n", "reasoning</think> the answer is 3", 0.0),  # no box
        ("<think>\n", "r \\boxed{3}</think> done", 0.0),  # box only inside the reasoning
        ("<think>\n", "r</think> x </think> \\boxed{3}", 0.0),  # two closes
        ("<think>\n", "<think> again</think> \\boxed{3}", 0.0),  # two opens
        ("<think>\n", "r</think> \\boxed{}", 0.0),  # empty box
        ("", "\\boxed{3} <think>r</think>", 0.0),  # not starting with <think>
    ],
)
def test_format_reward(prefill, completion, expected):
    assert REWARDS["format"]([completion], prefill=[prefill], gold=["3"], unused=[1]) == [expected]


def test_format_reward_defaults_to_no_prefill():
    assert REWARDS["format"](["<think>r</think> \\boxed{1}", "r</think> \\boxed{1}"]) == [1.0, 0.0]


# ---------------------------------------------------------------------------------- boxed/accuracy


def test_boxed_reward():
    comps = ["x \\boxed{3}", "no answer", "\\boxed{}", "\\fbox{2}", "\\boxed{unclosed"]
    assert REWARDS["boxed"](comps, gold=["3"] * 5, anything=None) == [1.0, 0.0, 0.0, 1.0, 0.0]


def test_accuracy_reward():
    comps = [
        "so \\boxed{\\frac12}",
        "so \\boxed{0.5}",
        "so \\boxed{3}",
        "first \\boxed{1} then \\boxed{1,000}",
        "no box 1000",
        "\\boxed{42.0}",
        "\\boxed{7}",
    ]
    golds = ["\\frac{1}{2}", "\\dfrac12", "4", "1000", "1000", "42", None]
    out = REWARDS["accuracy"](comps, gold=golds, solution=[""] * 7, prompts=["p"] * 7, truncated=[False] * 7)
    assert out == [1.0, 1.0, 0.0, 1.0, 0.0, 1.0, 0.0]


def test_answer_reward_falls_back_to_the_last_number():
    comps = ["6 + 9 = 15", "so 1,200 items", "\\boxed{14} though 15", "no number", "15 then 16", "x = -3.5"]
    got = REWARDS["answer"](comps, gold=["15", "1200", "15", "15", "15", "-7/2"])
    assert got == [1.0, 1.0, 0.0, 0.0, 0.0, 1.0]  # a box wins over later numbers; the last number counts
    assert rewards.final_answer("a \\boxed{\\frac{1}{2}} b 3") == "\\frac{1}{2}"


def test_accuracy_needs_gold_column_length_to_match():
    with pytest.raises(ValueError, match="gold"):
        REWARDS["accuracy"](["\\boxed{1}", "\\boxed{2}"], gold=["1"])


# ---------------------------------------------------------------------------------- similarity


def test_similarity_matches_reference_levenshtein():
    rng = random.Random(0)
    alphabet = "ab c\\{}1"
    comps, sols, expected = [], [], []
    for _ in range(200):
        after = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))
        sol = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 30)))
        comps.append(f"thinking {rng.random()}</think>{after}")
        sols.append(sol)
        a, b = after.strip(), sol.strip()
        expected.append(_similarity_ref(a, b) if b else 0.0)
    out = REWARDS["similarity"](comps, solution=sols, prefill=[""] * len(comps))
    np.testing.assert_allclose(out, expected, atol=1e-9)


def test_similarity_zero_without_think_close_or_solution():
    out = REWARDS["similarity"](
        ["no close tag", "r</think> same text", "r</think> same text"],
        solution=["no close tag", "", None],
    )
    assert out == [0.0, 0.0, 0.0]
    assert REWARDS["similarity"](["r</think> x"]) == [0.0]  # no solution column at all


def test_similarity_uses_prefill_and_text_after_last_close():
    out = REWARDS["similarity"](["a</think>abc"], prefill=["<think>"], solution=["abc"])
    assert out == [1.0]


# -------------------------------------------------------------------------------------- length


def _length_reference(lengths, correct, groups):
    out = []
    for i, (n, ok) in enumerate(zip(lengths, correct)):
        members = [lengths[j] for j in range(len(lengths)) if groups[j] == groups[i]]
        lo, hi = min(members), max(members)
        if hi == lo:
            out.append(0.0)
            continue
        lam = 0.5 - (n - lo) / (hi - lo)
        out.append(lam if ok else min(0.0, lam))
    return out


def test_length_reward_matches_reference_per_prompt_group():
    rng = random.Random(1)
    comps, golds, prompts, correct, lengths = [], [], [], [], []
    for _ in range(120):
        ok = rng.random() < 0.5
        pad = "x" * rng.randint(0, 60)
        comps.append(f"{pad} \\boxed{{{5 if ok else 6}}}")
        golds.append("5")
        prompts.append(f"prompt {rng.randint(0, 9)}")
        correct.append(ok)
        lengths.append(len(comps[-1]))
    out = REWARDS["length"](comps, gold=golds, prompts=prompts)
    np.testing.assert_allclose(out, _length_reference(lengths, correct, prompts), atol=1e-12)


def test_length_reward_uses_token_ids_and_equal_lengths_give_zero():
    comps = ["\\boxed{1}", "\\boxed{1} long text here", "\\boxed{2}"]
    ids = [[0] * 10, [0] * 2, [0] * 6]  # token counts disagree with characters on purpose
    out = REWARDS["length"](comps, gold=["1"] * 3, completion_ids=ids, prompts=["p"] * 3)
    np.testing.assert_allclose(out, _length_reference([10, 2, 6], [True, True, False], ["p"] * 3))
    assert REWARDS["length"](["\\boxed{1}", "\\boxed{2}"], gold=["1", "1"]) == [0.0, 0.0]


# -------------------------------------------------------------------------------------- cosine


def _cosine_reference(length, cap, ok, lo_w=-1.0, hi_w=-0.5, lo_c=0.5, hi_c=1.0):
    progress = min(length / cap, 1.0)
    if ok:
        # from hi_c at length 0 down to lo_c at the cap
        return lo_c + (hi_c - lo_c) * (1 + math.cos(math.pi * progress)) / 2
    # from lo_w at length 0 up to hi_w at the cap
    return hi_w + (lo_w - hi_w) * (1 + math.cos(math.pi * progress)) / 2


def test_cosine_endpoints_and_reference():
    cap = 100
    comps = ["\\boxed{1}", "\\boxed{1}", "\\boxed{1}", "\\boxed{2}", "\\boxed{2}", "\\boxed{2}", "\\boxed{1}"]
    toks = [0, 50, 100, 0, 50, 100, 250]
    ids = [[0] * t for t in toks]
    out = REWARDS["cosine"](comps, gold=["1"] * 7, completion_ids=ids, max_completion_len=cap)
    np.testing.assert_allclose(out[:6], [1.0, 0.75, 0.5, -1.0, -0.75, -0.5], atol=1e-12)
    assert out[6] == pytest.approx(0.5)  # clipped beyond the cap, no climb back up
    rng = random.Random(2)
    for _ in range(50):
        t, ok = rng.randint(0, 300), rng.random() < 0.5
        text = f"\\boxed{{{1 if ok else 2}}}"
        got = REWARDS["cosine"]([text], gold=["1"], completion_ids=[[0] * t], max_completion_len=[200])
        assert got[0] == pytest.approx(_cosine_reference(t, 200, ok))


def test_cosine_estimates_tokens_from_characters_and_defaults_cap():
    text = "\\boxed{1}" + "y" * 1015  # 1024 chars -> 256 "tokens"
    got = REWARDS["cosine"]([text], gold=["1"])
    assert got[0] == pytest.approx(_cosine_reference(1024 / 4, 2048, True))


def test_cosine_factory_parameters_and_bad_cap():
    fn = make_cosine_reward(
        min_value_wrong=-2.0, max_value_wrong=0.0, min_value_correct=0.0, max_value_correct=2.0, max_len=10
    )
    assert fn(["\\boxed{1}", "\\boxed{2}"], gold=["1", "1"], completion_ids=[[], []]) == [2.0, -2.0]
    with pytest.raises(ValueError, match="max_completion_len"):
        REWARDS["cosine"](["\\boxed{1}"], gold=["1"], max_completion_len=0)


# --------------------------------------------------------------------------------- user rewards


@pytest.fixture
def user_package(tmp_path, monkeypatch):
    pkg = tmp_path / "userrw"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "mod.py").write_text(
        textwrap.dedent(
            """
            NOT_CALLABLE = 3
            def brevity(completions, **kwargs):
                return [1.0 / (1 + len(c)) for c in completions]
            class Holder:
                @staticmethod
                def nested(completions, **kwargs):
                    return [2.0] * len(completions)
            """
        )
    )
    (pkg / "broken.py").write_text("raise RuntimeError('boom at import')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def test_load_user_reward_by_module(user_package):
    fn = load_user_reward("userrw.mod:brevity")
    assert fn(["ab", ""]) == [1 / 3, 1.0]
    assert load_user_reward("userrw.mod:Holder.nested")(["a"]) == [2.0]


def test_load_user_reward_by_file(user_package):
    fn = load_user_reward(f"{user_package}/userrw/mod.py:brevity")
    assert fn(["abc"]) == [0.25]


@pytest.mark.parametrize(
    "spec, message",
    [
        ("no_colon_here", "must look like"),
        ("userrw.mod:", "must look like"),
        (":brevity", "must look like"),
        ("userrw.nope:brevity", "cannot import module 'userrw.nope'"),
        ("userrw.broken:f", "boom at import"),
        ("userrw.mod:missing", "has no attribute 'missing'"),
        ("userrw.mod:NOT_CALLABLE", "not a callable"),
        ("/no/such/file.py:f", "not found"),
    ],
)
def test_load_user_reward_errors_name_the_spec(user_package, spec, message):
    with pytest.raises(RewardError) as err:
        load_user_reward(spec)
    assert repr(spec) in str(err.value)
    assert message in str(err.value)


def test_load_user_reward_file_raising_on_import(user_package):
    with pytest.raises(RewardError, match="boom at import"):
        load_user_reward(f"{user_package}/userrw/broken.py:f")


# ------------------------------------------------------------------------------------ RewardSet


def test_rewardset_scores_and_weights_like_trl(user_package):
    def maybe(completions, **kwargs):
        return [None if "skip" in c else 1.0 for c in completions]

    rs = RewardSet([("accuracy", 2.0), ("boxed", 0.5), ("userrw.mod:brevity", 1.0), (maybe, -1.0)])
    assert rs.names == ["accuracy", "boxed", "brevity", "maybe"]
    comps = ["\\boxed{1}", "\\boxed{2} skip", "nothing"]
    per, total = rs.score(comps, gold=["1", "1", "1"], prompts=["p"] * 3, solution=[""] * 3)
    assert per.shape == (3, 4) and per.dtype == np.float32
    assert total.shape == (3,) and total.dtype == np.float32
    brev = [1 / (1 + len(c)) for c in comps]
    ref = [
        [1.0, 1.0, brev[0], 1.0],
        [0.0, 1.0, brev[1], math.nan],
        [0.0, 0.0, brev[2], 1.0],
    ]
    np.testing.assert_allclose(per, np.array(ref, dtype=np.float32), rtol=1e-6)
    weights = [2.0, 0.5, 1.0, -1.0]
    ref_total = [sum(w * v for w, v in zip(weights, row) if not math.isnan(v)) for row in ref]
    np.testing.assert_allclose(total, ref_total, rtol=1e-6)


def test_rewardset_all_none_row_totals_zero():
    rs = RewardSet([(lambda c, **k: [None] * len(c), 1.0)])
    per, total = rs.score(["a", "b"])
    assert np.isnan(per).all() and (total == 0).all()


@pytest.mark.parametrize(
    "entries, message",
    [
        ([], "at least one"),
        ([("no_such_reward", 1.0)], "rewards.functions: unknown 'no_such_reward'; choose from format, "),
        ([("accuracy", 1.0), ("accuracy", 2.0)], "listed twice"),
        ([("accuracy", "heavy")], "weight 'heavy'"),
        ([("accuracy", float("nan"))], "not finite"),
        ([("accuracy",)], "pair"),
        ([(3, 1.0)], "name, a 'module:function' spec or a callable"),
        ([("nosuchpkg.mod:f", 1.0)], "cannot import module"),
    ],
)
def test_rewardset_construction_errors(entries, message):
    with pytest.raises(RewardError, match=message):
        RewardSet(entries)


def test_rewardset_reports_index_of_raising_example():
    def picky(completions, gold, **kwargs):
        return [1.0 / (int(g) - 3) for g in gold]  # ZeroDivisionError at gold == "3"

    rs = RewardSet([(picky, 1.0)])
    with pytest.raises(RewardError, match=r"'picky' raised ZeroDivisionError on example 2") as err:
        rs.score(["a", "b", "c", "d"], gold=["1", "2", "3", "4"], mode="scalar kwargs pass through")
    assert isinstance(err.value.__cause__, ZeroDivisionError)


def test_rewardset_reports_batch_only_failure():
    def needs_two(completions, **kwargs):
        if len(completions) > 1:
            raise RuntimeError("batch-level failure")
        return [0.0]

    with pytest.raises(RewardError, match="'needs_two' raised RuntimeError on the batch"):
        RewardSet([(needs_two, 1.0)]).score(["a", "b"])


@pytest.mark.parametrize(
    "returned, message",
    [
        ([1.0], "returned 1 values, expected 3"),
        ([1.0, 2.0, 3.0, 4.0], "returned 4 values, expected 3"),
        (7.0, "returned float, expected a list of 3"),
        ([1.0, float("nan"), 0.0], "'bad' returned nan at example 1"),
        ([1.0, 0.0, float("inf")], "'bad' returned inf at example 2"),
        ([1.0, "yes", 0.0], "'bad' returned 'yes' \\(str\\) at example 1: rewards are real numbers"),
    ],
)
def test_rewardset_rejects_bad_outputs(returned, message):
    def bad(completions, **kwargs):
        return returned

    with pytest.raises(RewardError, match=message):
        RewardSet([(bad, 1.0)]).score(["a", "b", "c"])


def test_rewardset_accepts_bools_ints_and_numpy():
    rs = RewardSet([(lambda c, **k: [True, 0, np.float64(0.25)], 1.0)])
    per, total = rs.score(["a", "b", "c"])
    np.testing.assert_allclose(per[:, 0], [1.0, 0.0, 0.25])


def test_all_builtins_run_on_a_realistic_batch():
    comps = [
        "step one</think> so \\boxed{\\frac{1}{2}}",
        "step</think> maybe \\boxed{0.4}",
        "I ran out of tok",
        "",
    ]
    kwargs = dict(
        prompts=["p"] * 4, problem=["q"] * 4, gold=["0.5"] * 4, solution=["So \\boxed{\\frac12}"] * 4,
        prefill=["<think>\n"] * 4, truncated=[False, False, True, False],
        completion_ids=[[1] * 9, [1] * 8, [1] * 5, []],
    )
    rs = RewardSet([(name, 1.0) for name in sorted(BUILTINS)])
    per, total = rs.score(comps, **kwargs)
    col = dict(zip(rs.names, per.T))
    assert list(col["accuracy"]) == [1.0, 0.0, 0.0, 0.0]
    assert list(col["format"]) == [1.0, 1.0, 0.0, 0.0]
    assert np.isfinite(per).all() and np.isfinite(total).all()
    assert rewards.RewardError is RewardError


def test_reward_inputs_one_entry_per_completion_prompt_major():
    from mathgrpo.data import Problem
    from mathgrpo.scoring import reward_inputs

    probs = [Problem(id="a", problem="1+1", gold="2", solution="s1", extra={"level": 1, "gold": "shadow"}),
             Problem(id="b", problem="2+2", gold="4", solution="s2", extra={"topic": "x"})]
    kw = reward_inputs(probs, 2, prompts=["P1", "P2"], completion_ids=[[1], [2], [3], [4]],
                       truncated=[False, True, False, False], prefill="<think>\n", max_completion_len=8,
                       overlong_buffer=2)
    assert kw["prompts"] == ["P1", "P1", "P2", "P2"] and kw["completion_ids"] == [[1], [2], [3], [4]]
    assert kw["prefill"] == ["<think>\n"] * 4 and kw["truncated"] == [False, True, False, False]
    assert kw["max_completion_len"] == 8 and kw["overlong_buffer"] == 2
    assert kw["gold"] == ["2", "2", "4", "4"]  # a dataset column never shadows the problem's own fields
    assert kw["level"] == [1, 1, None, None] and kw["topic"] == [None, None, "x", "x"]  # the union of extra columns
    with pytest.raises(ValueError, match="2 problems x 2 = 4 rows, but 3 completion_ids"):
        reward_inputs(probs, 2, prompts=["P1", "P2"], completion_ids=[[1]] * 3, truncated=[False] * 4,
                      prefill=None, max_completion_len=8)
