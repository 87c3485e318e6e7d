"""Data-parallel GRPO on CPU with gloo: 2 ranks update like 1 rank, torchrun end to end, resume across world sizes."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as tdist
import torch.multiprocessing as mp
from safetensors.torch import load_file

from helpers import tiny_overrides
from mathgrpo import distributed as D
from mathgrpo.config import load_config
from mathgrpo.data import load_problems
from mathgrpo.advantages import group_advantages
from mathgrpo.models import Reference, load_model
from mathgrpo.rollout import Completions
from mathgrpo.trainer import Sampler, make_optimizer, policy_update, train
from mathgrpo.update import EntropyControl

G, PROMPTS, WIDTH = 4, 4, 12
N = G * PROMPTS

# name -> overrides; every case runs one 2-rank update and is compared with the 1-rank update.
CASES = {
    "grpo": {"grpo.loss_type": "grpo", "grpo.beta": 0.04},
    "dapo": {"grpo.loss_type": "dapo", "grpo.beta": 0.0, "grpo.num_iterations": 2,
             "grpo.mask_truncated_completions": True},
    "dr_grpo": {"grpo.loss_type": "dr_grpo", "grpo.beta": 0.0},
    "bnpo": {"grpo.loss_type": "bnpo", "grpo.beta": 0.0},
    "full": {"model.lora": False, "grpo.loss_type": "grpo", "grpo.beta": 0.04},  # full fine-tuning, frozen reference
    # two optimizer steps per rollout, twice over it: the second mini-batch and the second pass are off-policy
    "minibatches": {"grpo.loss_type": "dapo", "grpo.beta": 0.04, "grpo.mini_batches": 2, "grpo.num_iterations": 2,
                    "trainer.learning_rate": 3e-2},
    # the same with adaptive entropy control: each step's entropy is the global token mean (sum and count reduced)
    "adaptive": {"grpo.loss_type": "dapo", "grpo.beta": 0.04, "grpo.mini_batches": 2, "grpo.num_iterations": 2,
                 "trainer.learning_rate": 3e-2, "grpo.entropy_coef": 0.05, "grpo.entropy_target": 100.0,
                 "generation.temperature": 0.5},  # (entropies that differ between the ranks' tokens)
}
MINIBATCH_SEED = 11  # the seed each rank's shuffle of its rows draws from (the trainer seeds it per step)


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cfg(model_dir, out, **extra):
    # No gradient clipping, so gradients can be compared as computed; small micro-batches, so ranks run
    # different numbers of them (rank 0 holds the long completions).
    extra = {"trainer.max_grad_norm": 1e9, "trainer.max_tokens_per_microbatch": 40, "model.lora_dropout": 0.0,
             "generation.temperature": 0.7, **extra}
    return load_config(None, tiny_overrides(model_dir, out, **extra), base={})


_LOADED: dict = {}


def _model(cfg):
    """The tiny model at a fixed start (loaded once per process, reset at every call); with LoRA, every
    adapter weight is set from a fixed seed (B = 0 gives A no gradient)."""
    key = (cfg.model.name_or_path, cfg.model.lora)
    if key not in _LOADED:
        model, _ = load_model(cfg.model, trainable=True)
        _LOADED[key] = model, {k: v.clone() for k, v in model.state_dict().items()}
    model, start = _LOADED[key]
    model.load_state_dict(start)
    model.zero_grad(set_to_none=True)
    if cfg.model.lora:
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for _, p in sorted(model.named_parameters()):
                if p.requires_grad:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    return model


def _rollout() -> tuple[Completions, torch.Tensor]:
    """A fixed rollout of 4 prompts x G=4: the first 8 rows long (some truncated), the last 8 short."""
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 1000, (int(torch.randint(3, 9, (1,), generator=gen)),), generator=gen).tolist()
               for _ in range(PROMPTS)]
    lengths = torch.cat([torch.randint(6, WIDTH + 1, (N // 2,), generator=gen),
                         torch.randint(1, 5, (N // 2,), generator=gen)])  # [N]
    mask = torch.arange(WIDTH)[None, :] < lengths[:, None]  # [N, T]
    ids = torch.randint(0, 1000, (N, WIDTH), generator=gen) * mask  # [N, T], padding id 0
    comp = Completions([p for p in prompts for _ in range(G)], ids, mask, [""] * N, lengths == WIDTH)
    return comp, group_advantages(torch.randn(N, generator=gen), G)


def _rows(comp: Completions, adv: torch.Tensor, rows: list[int]) -> tuple[Completions, torch.Tensor]:
    return Completions([comp.prompt_ids[i] for i in rows], comp.completion_ids[rows], comp.completion_mask[rows],
                       [comp.texts[i] for i in rows], comp.truncated[rows]), adv[rows]


def _update(cfg, comp, adv, world) -> dict:
    """One policy_update from the fixed start: its metrics, the updated weights and the last gradients."""
    model = _model(cfg)
    optimizer, scheduler = make_optimizer(model, cfg)
    ref = Reference(model, cfg.grpo.beta, cfg.model.lora)
    ref.adapter = None  # the KL to the base model, as in a run from a fresh adapter (these adapters are random)
    control = EntropyControl.from_config(cfg)
    metrics = policy_update(model, optimizer, scheduler, ref, comp, adv, cfg, world, control)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return {"metrics": metrics, "weights": {n: p.detach().clone() for n, p in named},
            "grads": {n: p.grad.clone() for n, p in named}, "entropy": control and control.state_dict()}


def _worker(rank: int, port: int, model_dir: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    tdist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        world = D.current()
        assert (world.rank, world.size, world.distributed) == (rank, 2, True)
        # The helpers evaluation uses: a contiguous shard per rank, gathered back in order on every rank.
        assert D.gather_objects(D.shard(list(range(7)), rank, 2)) == list(range(7))
        assert world.reduce_metrics({"a": float(rank), "b": 2.0}) == {"a": 0.5, "b": 2.0}
        assert world.reduce_metrics({"t": float(rank)}, op="max") == {"t": 1.0}
        assert world.any(rank == 1) and not world.any(False)
        comp, adv = _rollout()
        for name, extra in CASES.items():
            cfg = _cfg(model_dir, out, **extra)
            torch.manual_seed(MINIBATCH_SEED)
            result = _update(cfg, *_rows(comp, adv, list(range(rank * N // 2, (rank + 1) * N // 2))), world)
            result["metrics"] = world.reduce_metrics(result["metrics"])  # as the trainer logs them
            if rank == 0:
                torch.save(result, Path(out) / f"{name}.pt")
    finally:
        tdist.destroy_process_group()


@pytest.fixture(scope="module")
def two_rank_updates(tiny_model_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(_free_port(), tiny_model_dir, str(out)), nprocs=2, join=True)
    return out


@pytest.mark.distributed
@pytest.mark.parametrize("name", ["grpo", "dapo", "dr_grpo", "full"])
def test_two_ranks_update_like_one_rank_over_the_same_global_batch(two_rank_updates, tiny_model_dir, tmp_path, name):
    cfg = _cfg(tiny_model_dir, tmp_path, **CASES[name])
    one = _update(cfg, *_rollout(), D.SINGLE)
    two = torch.load(two_rank_updates / f"{name}.pt")
    assert two["metrics"]["loss"] == pytest.approx(one["metrics"]["loss"], rel=1e-4, abs=1e-7)
    assert two["metrics"]["grad_norm"] == pytest.approx(one["metrics"]["grad_norm"], rel=1e-4)
    assert one["metrics"]["grad_norm"] > 0
    for k in one["grads"]:
        torch.testing.assert_close(two["grads"][k], one["grads"][k], rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(two["weights"][k], one["weights"][k], rtol=1e-5, atol=1e-6)
    start = _model(cfg)
    moved = [k for k, p in start.named_parameters() if p.requires_grad and not torch.equal(p, one["weights"][k])]
    assert moved  # the update did something, so equal weights mean equal updates


@pytest.mark.distributed
@pytest.mark.parametrize("name", ["grpo", "dr_grpo", "full"])
def test_two_ranks_update_like_an_independent_naive_reference(two_rank_updates, tiny_model_dir, tmp_path, name):
    """The 2-rank gradient against tests/naive_grpo.py over the global batch: full logits from the model's own forward,
    the plain objective, the KL to the base model loaded on its own (full fine-tuning: to the starting weights)."""
    from transformers import AutoModelForCausalLM

    from naive_grpo import naive_logps, naive_loss

    cfg = _cfg(tiny_model_dir, tmp_path, **CASES[name])
    comp, adv = _rollout()
    model = _model(cfg)
    logp = naive_logps(model, comp.prompt_ids, comp.completion_ids, cfg.generation.temperature)
    with torch.no_grad():
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir) if cfg.model.lora else model
        ref = naive_logps(base, comp.prompt_ids, comp.completion_ids, cfg.generation.temperature)
    naive_loss(logp, None, ref, adv, comp.completion_mask, beta=cfg.grpo.beta, loss_type=cfg.grpo.loss_type,
               max_len=cfg.generation.max_new_tokens).backward()
    two = torch.load(two_rank_updates / f"{name}.pt")
    for k, p in model.named_parameters():
        if p.requires_grad:
            scale = p.grad.abs().max().item()
            assert scale > 0 and (two["grads"][k] - p.grad).abs().max().item() < 3e-6 * scale, k  # measured: 7e-7


@pytest.mark.distributed
def test_bnpo_averages_the_ranks_own_token_means(two_rank_updates, tiny_model_dir, tmp_path):
    """bnpo normalises by each rank's own token count (TRL): the 2-rank gradient is the mean of the two
    halves' 1-rank bnpo gradients, and not the 1-rank gradient of the whole batch (halves differ in tokens)."""
    cfg = _cfg(tiny_model_dir, tmp_path, **CASES["bnpo"])
    comp, adv = _rollout()
    halves = [_update(cfg, *_rows(comp, adv, list(range(r * N // 2, (r + 1) * N // 2))), D.SINGLE) for r in (0, 1)]
    whole = _update(cfg, comp, adv, D.SINGLE)
    two = torch.load(two_rank_updates / "bnpo.pt")
    assert two["metrics"]["loss"] == pytest.approx((halves[0]["metrics"]["loss"] + halves[1]["metrics"]["loss"]) / 2,
                                                   rel=1e-4, abs=1e-7)
    differs = False
    for k in whole["grads"]:
        mean = (halves[0]["grads"][k] + halves[1]["grads"][k]) / 2
        torch.testing.assert_close(two["grads"][k], mean, rtol=1e-4, atol=1e-7)
        differs |= not torch.allclose(two["grads"][k], whole["grads"][k], rtol=1e-3, atol=1e-6)
    assert differs



@pytest.mark.distributed
@pytest.mark.parametrize("name", ["minibatches", "adaptive"])
def test_two_ranks_take_their_minibatch_steps_like_one_rank(two_rank_updates, tiny_model_dir, tmp_path, monkeypatch,
                                                           name):
    """grpo.mini_batches on two ranks: optimizer step j of a pass is every rank's j-th mini-batch (each rank shuffles
    its own rows), so the 2-rank update equals the 1-rank update whose mini-batch j is the union of the ranks' j-th
    mini-batches; the token counts (dapo) are the global ones over the step's rows."""
    from mathgrpo import update as U

    cfg = _cfg(tiny_model_dir, tmp_path, **CASES[name])
    half = N // 2
    torch.manual_seed(MINIBATCH_SEED)  # what each rank drew: the same permutation of its own half
    local = U.minibatch_rows(half, 2)
    union = [rows + [half + i for i in rows] for rows in local]
    assert sorted(union[0]) != list(range(half))  # the draw shuffled: not simply rank 0's half first
    monkeypatch.setattr(U, "minibatch_rows", lambda n, m: [list(r) for r in union] if (n, m) == (N, 2) else 1 / 0)
    one = _update(cfg, *_rollout(), D.SINGLE)
    two = torch.load(two_rank_updates / f"{name}.pt")
    assert one["metrics"]["clip_ratio/region"] > 0  # the later steps are off-policy: clipping acts
    if name == "adaptive":  # the last step's entropy over both ranks' tokens, and the coefficients, as on one rank
        # (measured: 8e-8 apart; each rank's own token mean instead: 7e-6)
        assert two["entropy"]["last_entropy"] == pytest.approx(one["entropy"]["last_entropy"], rel=1e-6)
        assert two["metrics"]["entropy_coef"] == pytest.approx(one["metrics"]["entropy_coef"])
    assert two["metrics"]["loss"] == pytest.approx(one["metrics"]["loss"], rel=1e-4, abs=1e-7)
    for k in one["grads"]:
        torch.testing.assert_close(two["grads"][k], one["grads"][k], rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(two["weights"][k], one["weights"][k], rtol=1e-5, atol=1e-6)

# ----------------------------------------------------------------------------- torchrun end to end

REWARD = str(Path(__file__).parent / "fixtures" / "user_rewards.py") + ":distinct_chars"


def _train_overrides(model_dir, out, **extra) -> list[str]:
    return tiny_overrides(model_dir, out, **{"rewards.functions": f"[accuracy, '{REWARD}']", **extra})


def _torchrun(tmp_path, overrides: list[str], nproc: int = 2) -> str:
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("{}\n")  # dataclass defaults + overrides
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                           "-m", "mathgrpo", "train", str(cfg_file), *overrides, "--quiet"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc.stdout + proc.stderr


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line]


@pytest.fixture(scope="module")
def two_rank_run(tiny_model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("torchrun")
    log = _torchrun(tmp, _train_overrides(tiny_model_dir, tmp / "out"))
    return tmp / "out" / "run", log


@pytest.mark.distributed
def test_torchrun_two_ranks_train_and_only_rank_0_writes(two_rank_run, tiny_model_dir, tmp_path):
    run, log = two_rank_run
    assert log.count("global step = 2 prompts x G=4 = 8 completions over 2 ranks (1 prompts / 4 completions "
                     "per rank") == 1
    assert os.listdir(run.parent) == ["run"]
    assert [r["step"] for r in _jsonl(run / "metrics.jsonl")] == [1, 2, 3]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["checkpoint-2", "checkpoint-3"]
    assert (run / "checkpoints" / "checkpoint-3" / "adapter" / "adapter_model.safetensors").is_file()
    assert (run / "adapter" / "adapter_model.safetensors").is_file() and (run / "summary.json").is_file()
    assert len(list((run / "tensorboard").iterdir())) == 1  # one event file: one writer
    # completions.jsonl holds both ranks' groups in the order of the global batch the sampler drew.
    cfg = load_config(None, _train_overrides(tiny_model_dir, tmp_path), base={})
    train_set = load_problems(cfg.data, seed=cfg.trainer.seed).train
    sampler = Sampler(len(train_set), cfg.trainer.seed)
    comp, metrics = _jsonl(run / "completions.jsonl"), _jsonl(run / "metrics.jsonl")
    for step in (1, 2, 3):
        recs = [c for c in comp if c["step"] == step]
        assert [c["problem"] for c in recs] == [train_set[i].problem for i in sampler.next(2) for _ in range(G)]
        reward = [m["reward"] for m in metrics if m["step"] == step][0]
        assert reward == pytest.approx(sum(c["reward"] for c in recs) / len(recs))  # reduced over both ranks


@pytest.mark.distributed
def test_end_of_training_eval_is_sharded_over_two_ranks(tiny_model_dir, tmp_path):
    over = _train_overrides(tiny_model_dir, tmp_path / "out", **{
        "trainer.max_steps": 1, "trainer.eval_at_end": True, "data.test_fraction": 0.25, "eval.max_problems": 5,
        "eval.num_samples": 2,
        "eval.bootstrap": 50})
    log = _torchrun(tmp_path, over)
    run = tmp_path / "out" / "run"
    assert os.listdir(run.parent) == ["run"] and log.count("| pass@1 |") == 1  # one table, from rank 0
    cfg = load_config(None, over, base={})
    test = load_problems(cfg.data, seed=cfg.trainer.seed).test[:5]
    assert len(test) == 5
    for label in ("base", "trained"):
        recs = _jsonl(run / f"eval_{label}.jsonl")
        # 5 problems over 2 ranks (3 + 2), gathered back in the test set's order, 2 samples each
        assert [r["id"] for r in recs] == [p.id for p in test] and all(len(r["samples"]) == 2 for r in recs)
    summary = json.loads((run / "eval_summary.json").read_text())
    assert summary["models"]["trained"]["metrics"]["n_problems"] == 5 and summary["comparison"]


def _broken_copy(run: Path, dest: Path, final: str = "adapter") -> Path:
    """The run as if it had died after logging step 3 with checkpoint-2 as its last checkpoint (`final`: the folder
    of the final weights, adapter or model)."""
    shutil.copytree(run, dest)
    shutil.rmtree(dest / "checkpoints" / "checkpoint-3")
    for name in (final, "summary.json"):
        shutil.rmtree(dest / name) if (dest / name).is_dir() else (dest / name).unlink()
    return dest


@pytest.mark.distributed
def test_two_rank_resume_repeats_the_two_rank_run(two_rank_run, tiny_model_dir, tmp_path):
    run, _ = two_rank_run
    broken = _broken_copy(run, tmp_path / "out" / "run")
    _torchrun(tmp_path, _train_overrides(tiny_model_dir, tmp_path / "out", **{"trainer.resume": str(broken)}))
    a, b = _jsonl(run / "metrics.jsonl"), _jsonl(broken / "metrics.jsonl")
    assert [r["step"] for r in b] == [1, 2, 3]
    assert b[2]["reward"] == a[2]["reward"]
    assert b[2]["loss"] == pytest.approx(a[2]["loss"], abs=1e-6)
    wa = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    wb = load_file(str(broken / "adapter" / "adapter_model.safetensors"))
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-5, atol=1e-6)


@pytest.mark.distributed
def test_one_rank_resumes_a_two_rank_checkpoint(two_rank_run, tiny_model_dir, tmp_path):
    run, _ = two_rank_run
    broken = _broken_copy(run, tmp_path / "out" / "run")
    cfg = load_config(None, _train_overrides(tiny_model_dir, tmp_path / "out", **{"trainer.resume": str(broken)}),
                      base={})
    assert train(cfg, quiet=True) == broken
    assert [r["step"] for r in _jsonl(broken / "metrics.jsonl")] == [1, 2, 3]
    # The sampler position is global, so the single rank draws the problems the two ranks drew at step 3.
    problems = lambda r: [c["problem"] for c in _jsonl(r / "completions.jsonl") if c["step"] == 3]  # noqa: E731
    assert problems(broken) == problems(run)
    assert (broken / "checkpoints" / "checkpoint-3" / "adapter" / "adapter_model.safetensors").is_file()


# ----------------------------------------------------------------------------- pure helpers


def test_shard_is_contiguous_balanced_and_complete():
    xs = list(range(11))
    parts = [D.shard(xs, r, 4) for r in range(4)]
    assert [len(p) for p in parts] == [3, 3, 3, 2]
    assert sum(parts, []) == xs
    assert D.shard(xs, 0, 1) == xs and D.gather_objects(xs) == xs  # no process group: identity
    with pytest.raises(ValueError, match="rank 4"):
        D.shard(xs, 4, 4)


def test_share_of_the_global_batch_and_its_errors():
    world = D.World(rank=1, size=2)
    assert world.mine(["a", "b", "c", "d"]) == ["c", "d"]
    with pytest.raises(ValueError, match="trainer.prompts_per_step=3 does not split over 2 ranks"):
        world.share(3)
    assert D.SINGLE.share(3) == 3


def test_batch_line_and_rank_seeds():
    line = D.batch_line(8, 4, D.World(rank=0, size=2), 16384, 1)
    assert line.startswith("global step = 8 prompts x G=4 = 32 completions over 2 ranks (4 prompts / 16 "
                           "completions per rank")
    assert "micro-batches of <= 16384 tokens accumulated into 1 optimizer step per rollout" in line
    single = D.batch_line(2, 4, D.SINGLE, 100, 2)
    assert "8 completions on 1 rank" in single and "2 optimizer steps per rollout" in single
    seeds = [D.rank_seed(12345, r) for r in range(64)]  # the trainer also uses seed + 1 (LoRA dropout)
    assert seeds[0] == 12345 and len(set(seeds) | {s + 1 for s in seeds}) == 2 * len(seeds)


def test_loss_counts_on_one_rank_are_the_local_counts():
    assert D.SINGLE.loss_counts("dapo", 8, 37.0) == (8.0, 37.0)
    with pytest.raises(ValueError, match="loss_counts: loss_type: unknown 'x'; choose from grpo, "):
        D.SINGLE.loss_counts("x", 8, 37.0)


def test_gradient_buckets_keep_dtype_and_size_limits():
    grads = [torch.zeros(10), torch.zeros(10), torch.zeros(3, dtype=torch.float64), torch.zeros(100)]
    buckets = list(D._buckets(grads, limit=80))
    assert [[g.numel() for g in b] for b in buckets] == [[10, 10], [3], [100]]
