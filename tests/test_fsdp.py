"""Full fine-tuning sharded with FSDP2 over 2 gloo ranks on CPU: the sharded update equals the 1-rank update over the
same global batch, checkpoints have the replicated layout and resume on 2 and on 1 rank, sampling sees the updated
weights, and torchrun runs it end to end (training, checkpoints, sharded evaluation, resume)."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as tdist
import torch.multiprocessing as mp
from safetensors.torch import load_file

from mathgrpo import checkpoint as ckpt
from mathgrpo import distributed as D
from mathgrpo import fsdp as F
from mathgrpo.config import load_config
from mathgrpo.loading import load_tokenizer
from mathgrpo.models import Reference, load_model
from mathgrpo.rollout import SamplingConfig, make_rollout
from mathgrpo.trainer import make_optimizer, policy_update, prepare_policy, train
from test_distributed import N, _broken_copy, _cfg, _free_port, _jsonl, _rollout, _rows, _torchrun, _train_overrides

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest

# Full fine-tuning with a (sharded) frozen reference, a second iteration (old log-probs from a no-grad pass of the
# sharded policy) and activation checkpointing (layers recomputed inside FSDP's backward).
FULL = {"model.lora": False, "grpo.loss_type": "grpo", "grpo.beta": 0.04, "grpo.num_iterations": 2,
        "model.gradient_checkpointing": True}
PROMPTS = [[5, 9, 14, 3, 22], [7, 7, 8]]
GREEDY = SamplingConfig(max_new_tokens=6, temperature=0.0)
# Weights after sharded and 1-rank updates: the reduce-scatter adds the ranks' gradients in another order than one
# process accumulates them (gradients agree to ~1e-4 relative), and Adam divides by sqrt(v): where v is ~1e-11 those
# last-bit differences move a weight by up to ~2e-5, 2% of one step of lr=1e-3 (measured)
WEIGHTS = {"rtol": 1e-4, "atol": 5e-5}


def _fresh(cfg):
    model, _ = load_model(cfg.model, trainable=True)
    return model


def _second(comp, adv):
    """The rollout of the second update: the same completions, opposite advantages."""
    return comp, -adv


def _full_grads(model) -> dict:
    return {n: (p.grad.full_tensor() if D._is_dtensor(p.grad) else p.grad).clone()
            for n, p in model.named_parameters()}


def _fsdp_worker(rank: int, port: int, model_dir: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    tdist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        world, out = D.current(), Path(out)
        cfg = _cfg(model_dir, out, **FULL)
        tok = load_tokenizer(cfg.model)
        comp, adv = _rollout()
        mine = list(range(rank * N // 2, (rank + 1) * N // 2))
        # the straight run: two updates, a checkpoint after the first
        model = _fresh(cfg)
        ref = prepare_policy(model, cfg, world)
        assert F.is_sharded(model) and F.is_sharded(ref.copy)
        optimizer, scheduler = make_optimizer(model, cfg)
        rollouts = {}
        for name in ("hf", "fast"):
            gen = load_config(None, [f"generation.backend={name}"], base={}).generation
            rollouts[name] = F.rollout_for(model, lambda: make_rollout(gen, model, tok))  # noqa: B023
        for r in rollouts.values():  # sampled once before the update: the fast engine then holds the old weights
            r.generate(PROMPTS, 1, GREEDY)
        first = policy_update(model, optimizer, scheduler, ref, *_rows(comp, adv, mine), cfg, world)
        grads = _full_grads(model)
        weights, optim = copy.deepcopy(F.full_state_dicts(model, optimizer))  # (its step counts are live tensors)
        norms = world.gather_objects([first["grad_norm"]])
        samples = {name: r.generate(PROMPTS, 1, GREEDY).completion_ids for name, r in rollouts.items()}
        path = ckpt.save_checkpoint(out / "run", 1, model, optimizer, scheduler, {"step": 1}, "{}\n", 0, world)
        world.barrier()
        second = policy_update(model, optimizer, scheduler, ref, *_rows(*_second(comp, adv), mine), cfg, world)
        straight, _ = F.full_state_dicts(model)
        # 2 -> 2: a fresh sharded policy resumes from the checkpoint and repeats the second update
        model = _fresh(cfg)
        ref = prepare_policy(model, cfg, world)
        optimizer, scheduler = make_optimizer(model, cfg)
        ckpt.load_checkpoint(out / "run" / "checkpoints" / "checkpoint-1", model, optimizer, scheduler, world)
        policy_update(model, optimizer, scheduler, ref, *_rows(*_second(comp, adv), mine), cfg, world)
        resumed, _ = F.full_state_dicts(model)
        if rank == 0:
            torch.save({"first": world.reduce_metrics(first), "second": second, "grads": grads, "weights": weights,
                        "optim": optim, "norms": norms, "samples": samples, "path": path, "straight": straight,
                        "resumed": resumed}, out / "fsdp.pt")
        else:
            world.reduce_metrics(first)
    finally:
        tdist.destroy_process_group()


@pytest.fixture(scope="module")
def fsdp_updates(tiny_model_dir, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("fsdp")
    mp.spawn(_fsdp_worker, args=(_free_port(), tiny_model_dir, str(out)), nprocs=2, join=True)
    return torch.load(out / "fsdp.pt", weights_only=False)


def _one_rank(cfg, comp, adv, model=None, optimizer=None, scheduler=None):
    model = model or _fresh(cfg)
    if optimizer is None:
        optimizer, scheduler = make_optimizer(model, cfg)
    metrics = policy_update(model, optimizer, scheduler, Reference(model, cfg.grpo.beta, cfg.model.lora), comp, adv,
                            cfg, D.SINGLE)
    return model, optimizer, scheduler, metrics


@pytest.mark.distributed
def test_sharded_update_equals_the_one_rank_update(fsdp_updates, tiny_model_dir, tmp_path):
    cfg = _cfg(tiny_model_dir, tmp_path, **FULL)
    model, optimizer, _, metrics = _one_rank(cfg, *_rollout())
    two = fsdp_updates
    assert two["first"]["loss"] == pytest.approx(metrics["loss"], rel=1e-4, abs=1e-7)
    assert metrics["grad_norm"] > 0 and two["norms"][0] == two["norms"][1]  # clipping saw the global norm on each rank
    assert two["first"]["grad_norm"] == pytest.approx(metrics["grad_norm"], rel=1e-4)
    for k, p in model.named_parameters():
        torch.testing.assert_close(two["grads"][k], p.grad, rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(two["weights"][k], p.detach(), **WEIGHTS)
    # the gathered optimizer state is the replicated one, index for index
    one = optimizer.state_dict()
    assert two["optim"]["param_groups"] == one["param_groups"] and sorted(two["optim"]["state"]) == sorted(one["state"])
    for i, s in one["state"].items():
        for key, v in s.items():
            torch.testing.assert_close(two["optim"]["state"][i][key], v, rtol=1e-4, atol=1e-7)
    # sampling runs on the gathered, updated weights: greedy completions equal those of the 1-rank model (hf and fast)
    tok = load_tokenizer(cfg.model)
    expected = make_rollout(load_config(None, ["generation.backend=hf"], base={}).generation, model, tok)
    want = expected.generate(PROMPTS, 1, GREEDY).completion_ids
    for name, got in two["samples"].items():
        assert torch.equal(got, want), name


@pytest.mark.distributed
def test_sharded_checkpoint_is_the_replicated_one_and_resumes_on_two_and_one_ranks(fsdp_updates, tiny_model_dir,
                                                                                  tmp_path):
    two = fsdp_updates
    path = two["path"]
    saved = load_file(str(path / "model" / "model.safetensors"))
    assert sorted(saved) == sorted(load_file(str(Path(tiny_model_dir) / "model.safetensors")))  # tied head not saved
    for k, v in saved.items():
        torch.testing.assert_close(v, two["weights"][k])
    state = torch.load(path / "training_state.pt", weights_only=False)
    assert sorted(state["optimizer"]["state"]) == list(range(len(saved)))  # keyed by parameter index
    # 2 -> 2 repeats the straight run's second update
    for k, v in two["straight"].items():
        torch.testing.assert_close(two["resumed"][k], v, rtol=1e-5, atol=1e-6)
    # 2 -> 1: one process loads exactly the sharded state, and its next update lands where a 1-rank run's lands
    # (against the 2-rank run's second update, Adam's amplification of last-bit differences compounds: 4e-4 measured)
    cfg = _cfg(tiny_model_dir, tmp_path, **FULL)
    model = _fresh(cfg)
    optimizer, scheduler = make_optimizer(model, cfg)
    ckpt.load_checkpoint(path, model, optimizer, scheduler)
    loaded, weights = optimizer.state_dict()["state"], model.state_dict()
    assert all(torch.equal(weights[k], v) for k, v in two["weights"].items())
    assert all(torch.equal(loaded[i][key], v) for i, s in two["optim"]["state"].items() for key, v in s.items())
    _one_rank(cfg, *_second(*_rollout()), model, optimizer, scheduler)
    one, one_opt, one_sched, _ = _one_rank(cfg, *_rollout())
    _one_rank(cfg, *_second(*_rollout()), one, one_opt, one_sched)
    for k, p in one.state_dict().items():
        torch.testing.assert_close(model.state_dict()[k], p, **WEIGHTS)


def test_fsdp_is_chosen_for_full_fine_tuning_over_several_ranks():
    two, one = D.World(rank=0, size=2), D.SINGLE
    assert F.use_fsdp("auto", lora=False, world=two) and F.use_fsdp("on", lora=False, world=two)
    assert not F.use_fsdp("auto", lora=True, world=two)  # LoRA stays replicated
    assert not F.use_fsdp("auto", lora=False, world=one) and not F.use_fsdp("on", lora=False, world=one)
    assert not F.use_fsdp("off", lora=False, world=two)
    with pytest.raises(ValueError, match="trainer.fsdp=on shards full fine-tuning only, and model.lora=true"):
        F.use_fsdp("on", lora=True, world=two)
    assert load_config(None, ["trainer.fsdp=off"], base={}).trainer.fsdp == "off"  # not YAML's boolean false
    assert "sharded over ranks with FSDP2" in D.batch_line(8, 4, two, 100, 1, sharded=True)
    assert "replicated weights, gradients averaged over ranks" in D.batch_line(8, 4, two, 100, 1)


# ----------------------------------------------------------------------------- torchrun end to end

def _full_overrides(model_dir, out, **extra) -> list[str]:
    # the evaluation at the end samples 5 test problems over 2 ranks (3 + 2) in batches of 2 problems, so the ranks
    # sample different numbers of batches inside one gathering of the weights
    return _train_overrides(model_dir, out, **{
        "model.lora": False, "grpo.beta": 0.04, "data.test_fraction": 0.25, "eval.max_problems": 5,
        "eval.num_samples": 2, "eval.bootstrap": 50, "generation.max_batch": 4, **extra})


@pytest.fixture(scope="module")
def fsdp_run(tiny_model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("torchrun-fsdp")
    log = _torchrun(tmp, _full_overrides(tiny_model_dir, tmp / "out", **{"trainer.eval_at_end": True}))
    return tmp / "out" / "run", log


@pytest.mark.distributed
def test_torchrun_fsdp_trains_evaluates_and_writes_a_plain_model(fsdp_run, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    run, log = fsdp_run
    assert log.count("per rank; weights, gradients and optimizer state sharded over ranks with FSDP2") == 1
    metrics = _jsonl(run / "metrics.jsonl")
    assert [r["step"] for r in metrics] == [1, 2, 3] and any(r["grad_norm"] > 0 for r in metrics)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["checkpoint-2", "checkpoint-3"]
    start = load_file(str(Path(tiny_model_dir) / "model.safetensors"))
    final = load_file(str(run / "model" / "model.safetensors"))
    assert sorted(final) == sorted(start) and any(not torch.equal(final[k], start[k]) for k in start)
    assert AutoModelForCausalLM.from_pretrained(run / "model").config.tie_word_embeddings
    assert len(_jsonl(run / "eval.jsonl")) == 5 and log.count("| pass@1 |") == 1


@pytest.mark.distributed
def test_torchrun_fsdp_resume_repeats_the_run_on_two_ranks_and_continues_on_one(fsdp_run, tiny_model_dir, tmp_path):
    run, _ = fsdp_run
    broken = _broken_copy(run, tmp_path / "out" / "run", final="model")
    # the run evaluated at the end; its resumes do not (a change the resume must be allowed to make)
    same = {"trainer.resume_changing": "[trainer.eval_at_end]"}
    _torchrun(tmp_path, _full_overrides(tiny_model_dir, tmp_path / "out", **{"trainer.resume": str(broken)}, **same))
    a, b = _jsonl(run / "metrics.jsonl"), _jsonl(broken / "metrics.jsonl")
    assert [r["step"] for r in b] == [1, 2, 3] and b[2]["reward"] == a[2]["reward"]
    assert b[2]["loss"] == pytest.approx(a[2]["loss"], abs=1e-6)
    assert b[2]["grad_norm"] == pytest.approx(a[2]["grad_norm"], rel=1e-5)
    wa, wb = load_file(str(run / "model" / "model.safetensors")), load_file(str(broken / "model" / "model.safetensors"))
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-5, atol=1e-6)
    # one process (replicated weights) continues the sharded run from its checkpoint; the sampler position is global
    single = _broken_copy(run, tmp_path / "one" / "run", final="model")
    cfg = load_config(None, _full_overrides(tiny_model_dir, tmp_path / "one", **{"trainer.resume": str(single)}, **same),
                      base={})
    assert train(cfg, quiet=True) == single
    problems = lambda r: [c["problem"] for c in _jsonl(r / "completions.jsonl") if c["step"] == 3]  # noqa: E731
    assert problems(single) == problems(run)
    assert sorted(load_file(str(single / "model" / "model.safetensors"))) == sorted(wa)
