"""The memory plan (memory_plan.py): its sizes against hand-computed ones, the search, explicit settings kept, the
refusal, `auto` on CPU, the config reference and `mathgrpo plan`."""

import pytest

from mathgrpo import memory_plan as mp
from mathgrpo.cli import main
from mathgrpo.config import AUTO, config_reference, load_config

GiB = 2**30
SMALL = mp.ModelShape(layers=2, hidden=64, intermediate=128, heads=4, kv_heads=2, head_dim=16, vocab=1000, tied=False)
QWEN15 = mp.KNOWN_SHAPES["deepseek-ai/deepseek-r1-distill-qwen-1.5b"]


def cfg_of(*overrides):
    return load_config(None, ["model.dtype=bfloat16", *overrides], base={})


def test_parameter_counts_by_hand():
    # small: per layer q 64x64 + k 64x32 + v 64x32 + o 64x64 + gate/up/down 3 x 64x128 = 36,864; 2 layers;
    # embeddings + untied head 2 x 1000 x 64; norms (2 per layer + final) x 64
    assert SMALL.linear_params == 2 * 36_864
    assert SMALL.params == 73_728 + 128_000 + 5 * 64
    # DeepSeek-R1-Distill-Qwen-1.5B: 1,777,088,000 parameters published, of which 28 x (1536 + 2 x 256) = 57,344
    # are the q/k/v biases the plan leaves out
    assert QWEN15.params == 1_777_088_000 - 57_344
    assert QWEN15.linear_params == 28 * (2 * 1536 * 1536 + 2 * 1536 * 256 + 3 * 1536 * 8960)


def test_small_sizes_by_hand():
    cfg = cfg_of("model.lora_r=4", "model.lora_dropout=0")
    step = mp.Step(rows=4, prompts=1, prompt_tokens=8, completion_tokens=16)
    s, u = mp.estimate(SMALL, cfg, step, mp.Choice(max_batch=4, release=False, checkpointing=False, budget=16384,
                                                    chunk=1024))
    assert s["weights"] == SMALL.params * 2  # bf16
    # KV: 2 (k, v) x 2 layers x 4 rows x 2 kv heads x capacity 128 (24 tokens rounded up to 128) x 16 x 2 bytes
    assert s["kv cache"] == 2 * 2 * 4 * 2 * 128 * 16 * 2 == 131_072
    # LoRA r=4 on the 7 projections: 4 x ((64+64) + 2 (64+32) + (64+64) + 2 (64+128) + (128+64)) = 4,096 a layer
    lora = 2 * 4_096
    assert s["trained+adam"] == lora * 12 and u["trained+adam"] == lora * 16  # fp32 weight + 2 moments (+ grad)
    assert s["engine copy"] == SMALL.linear_params * 2  # the merged copy of every adapted projection
    # no checkpointing: 4 rows x 24 tokens, 2 layers x (6 x 64 + 4 x 128) x 2 bytes each
    assert u["activations"] == 96 * 2 * (6 * 64 + 4 * 128) * 2
    # the final hidden states and their gradient, a chunk of 1,024 x 1,000 logits at 2 + 6 bytes, the fixed extra
    assert u["log-probs"] == 96 * 64 * 2 * 2 + 1024 * 1000 * 8 + 320 * 2**20


def test_1p5b_long_shape_by_hand():
    cfg = cfg_of("model.lora_r=32", "model.lora_dropout=0")
    step = mp.Step(rows=8, prompts=1, prompt_tokens=128, completion_tokens=16384)
    s, u = mp.estimate(QWEN15, cfg, step, mp.Choice(8, False, True, 16512, 1024))
    assert s["kv cache"] == 2 * 28 * 8 * 2 * 16512 * 128 * 2 == 3_787_456_512  # 3.53 GiB
    assert s["engine copy"] == 1_310_195_712 * 2  # 2.44 GiB: the bf16 merged copy of all 7 projections
    # checkpointing: every layer's input kept (28 x 1536) plus one layer recomputed, for one 16,512-token row
    assert u["activations"] == 16512 * 2 * (28 * 1536 + 6 * 1536 + 4 * 8960)
    released = mp.estimate(QWEN15, cfg, step, mp.Choice(8, True, True, 16512, 1024))[1]
    assert released["kv cache"] == released["engine copy"] == 0
    assert sum(u.values()) - sum(released.values()) == s["kv cache"] + s["engine copy"]


def test_nf4_weights_and_dequantised_copy():
    cfg = cfg_of("model.quantization=nf4")
    s, _ = mp.estimate(QWEN15, cfg, mp.Step(4, 1, 128, 2048), mp.Choice(4, True, False, 4096, 1024))
    assert s["weights"] == int(QWEN15.linear_params * (0.5 + 1 / 64 + 4 / 16384)) + QWEN15.other_params * 2
    assert 1.45 * GiB < s["weights"] < 1.55 * GiB  # vs 3.31 GiB in bf16
    assert s["engine copy"] == QWEN15.linear_params * 2  # the engine holds the base dequantised


def test_plenty_of_memory_takes_the_fastest_settings():
    cfg = cfg_of("generation.max_new_tokens=256")
    plan = mp.choose(SMALL, cfg, mp.step_of(cfg), 80 * GiB)
    assert plan.values() == {"generation.max_batch": 4, "generation.release_memory": False,
                             "model.gradient_checkpointing": False, "trainer.max_tokens_per_microbatch": 16384,
                             "trainer.logprob_chunk_size": 1024}
    assert plan.planned == set(mp.CPU_DEFAULTS)


def test_tighter_memory_trades_speed_for_memory_and_fits():
    cfg = cfg_of("model.lora_r=32", "model.lora_dropout=0", "prompt.max_prompt_tokens=128",
                 "generation.max_new_tokens=16384", "grpo.num_generations=8")
    step = mp.step_of(cfg)
    roomy, tight = mp.choose(QWEN15, cfg, step, 80 * GiB), mp.choose(QWEN15, cfg, step, 12 * GiB)
    assert roomy.choice.max_batch == 8 and not roomy.choice.release
    assert tight.choice.checkpointing and tight.choice.release
    for plan, free in ((roomy, 80 * GiB), (tight, 12 * GiB)):
        assert max(plan.peaks.values()) <= free * mp.USABLE


def test_explicit_settings_are_kept():
    cfg = cfg_of("model.lora_r=32", "prompt.max_prompt_tokens=128", "generation.max_new_tokens=16384",
                 "grpo.num_generations=8", "generation.max_batch=2", "model.gradient_checkpointing=true")
    plan = mp.choose(QWEN15, cfg, mp.step_of(cfg), 12 * GiB)
    assert plan.choice.max_batch == 2 and plan.choice.checkpointing
    assert "generation.max_batch" not in plan.planned and "model.gradient_checkpointing" not in plan.planned
    resolved = mp.apply(cfg, plan.values())
    assert resolved.generation.max_batch == 2 and resolved.trainer.max_tokens_per_microbatch != AUTO
    lines = "\n".join(plan.lines({"generation.max_batch": "command line"}))
    assert "generation.max_batch = 2  (set by command line)" in lines
    # explicit values that cannot fit are refused, not changed, and the message names them
    small = cfg_of("model.lora_r=32", "generation.max_new_tokens=16384", "grpo.num_generations=8",
                   "model.gradient_checkpointing=false")
    with pytest.raises(mp.PlanError, match="model.gradient_checkpointing back to auto"):
        mp.choose(QWEN15, small, mp.step_of(small), 16 * GiB)


def test_refusal_says_what_how_much_and_what_to_change():
    cfg = cfg_of("generation.max_new_tokens=32768", "grpo.num_generations=16")
    with pytest.raises(mp.PlanError) as e:
        mp.choose(QWEN15, cfg, mp.step_of(cfg), 6 * GiB, card="T4")
    msg = str(e.value)
    assert "does not fit T4" in msg and "short by" in msg and "5.40 GiB usable" in msg
    assert "model.quantization=nf4" in msg and "generation.max_new_tokens (now 32768)" in msg
    needed = float(msg.split("need an estimated ")[1].split(" GiB")[0])
    short = float(msg.split("short by ")[1].split(" GiB")[0])
    assert abs(needed - 5.40 - short) < 0.011


def test_cpu_auto_resolves_to_the_defaults_before_planning():
    cfg = load_config()  # the demo
    assert {k: getattr(getattr(cfg, k.split(".")[0]), k.split(".")[1]) for k in mp.CPU_DEFAULTS} == \
        dict.fromkeys(mp.CPU_DEFAULTS, AUTO)
    resolved, plan = mp.plan_run(cfg, "cpu")
    assert plan is None
    assert mp.plan_values(resolved) == {"generation.max_batch": 256, "generation.release_memory": None,
                                        "model.gradient_checkpointing": False,
                                        "trainer.max_tokens_per_microbatch": 16384, "trainer.logprob_chunk_size": 1024}
    assert mp.value(AUTO, "trainer.logprob_chunk_size") == 1024 and mp.value(512, "trainer.logprob_chunk_size") == 512


def test_config_reference_lists_auto():
    ref = config_reference()
    for key, typ in (("generation.max_batch", "int or auto"), ("trainer.max_tokens_per_microbatch", "int or auto"),
                     ("trainer.logprob_chunk_size", "int or auto"), ("model.gradient_checkpointing", "bool or auto"),
                     ("generation.release_memory", "bool or auto or None")):
        assert f"| `{key}` | {typ} | `'auto'` |" in ref
    with pytest.raises(Exception, match="generation.max_batch: expected int . auto, got 'many'"):
        load_config(None, ["generation.max_batch=many"])


def test_sizes_and_cards():
    assert mp.parse_size("16GiB") == 16 * GiB and mp.parse_size("24000MiB") == 24000 * 2**20
    assert mp.named_card("t4") == (int((14.6 - 0.5) * GiB), False) and mp.named_card("L4")[1]
    with pytest.raises(Exception, match="unknown card"):
        mp.named_card("Voodoo2")
    # model.dtype=auto on a card without bf16 loads float16 (devices.choose_dtype): 2 bytes a weight either way;
    # float32 set explicitly takes twice that
    cfg, step, c = cfg_of(), mp.Step(4, 1, 128, 2048), mp.Choice(4, True, True, 4096, 1024)
    cfg.model.dtype = "auto"
    assert mp.estimate(QWEN15, cfg, step, c, bf16=False)[0]["weights"] == QWEN15.params * 2
    assert mp.estimate(QWEN15, cfg, step, c, bf16=True)[0]["weights"] == QWEN15.params * 2
    cfg.model.dtype = "float32"
    assert mp.estimate(QWEN15, cfg, step, c, bf16=False)[0]["weights"] == QWEN15.params * 4


def test_plan_command(capsys):
    assert main(["plan", "--preset", "notebook", "--device-name", "T4"]) == 0
    out = capsys.readouterr().out
    assert "memory plan for T4: 14.10 GiB free" in out and "weights in 16 bits" in out
    assert "estimated peak, update:" in out
    assert main(["plan", "--preset", "notebook", "generation.max_new_tokens=65536", "grpo.num_generations=16",
                 "--device-name", "T4"]) == 2
    assert "does not fit T4" in capsys.readouterr().err
    assert main(["plan", "--preset", "demo", "model.device=cpu"]) == 0
    assert "CPU, nothing to plan: generation.max_batch=256" in capsys.readouterr().out


def test_plans_leave_headroom():
    cfg = cfg_of("model.lora_r=32", "prompt.max_prompt_tokens=128", "generation.max_new_tokens=4096",
                 "grpo.num_generations=8")
    step = mp.step_of(cfg)
    fastest = mp.choose(QWEN15, cfg, step, 200 * GiB)
    free = int(max(fastest.peaks.values()) / 0.95)  # the fastest settings fit the free memory, not its 90%
    plan = mp.choose(QWEN15, cfg, step, free)
    assert plan.choice != fastest.choice and max(plan.peaks.values()) <= free * mp.USABLE


def test_train_refuses_before_any_run_folder_and_saves_the_planned_values(tiny_model_dir, tmp_path, monkeypatch,
                                                                          capsys):
    from helpers import tiny_overrides
    from mathgrpo import trainer as T

    cfg = load_config(None, tiny_overrides(tiny_model_dir, tmp_path / "runs", **{"trainer.max_steps": 1}), base={})
    # the trainer planned as on a GPU: a 1 MiB card, then a roomy one
    monkeypatch.setattr(T, "plan_run", lambda c, device, ranks, shape: mp.plan_run(c, "cuda", ranks, free=2**20,
                                                                                     card="a 1 MiB card"))
    with pytest.raises(mp.PlanError, match="does not fit a 1 MiB card"):
        T.train(cfg, quiet=True)
    assert not (tmp_path / "runs").exists()
    monkeypatch.setattr(T, "plan_run", lambda c, device, ranks, shape: mp.plan_run(c, "cuda", ranks, free=8 * GiB,
                                                                                     card="an 8 GiB card"))
    T.train(cfg, quiet=False)
    assert "memory plan for an 8 GiB card" in capsys.readouterr().err
    saved = load_config(tmp_path / "runs" / "run" / "config.yaml", base={})
    assert saved.generation.max_batch == 8 and saved.trainer.max_tokens_per_microbatch == 16384
    assert saved.model.gradient_checkpointing is False and saved.generation.release_memory is False
