"""mathgrpo's GRPO loss against TRL 1.16's own code: `GRPOTrainer._compute_loss` of a tiny TRL trainer, on the
same batch and the same weights, for every loss type and loss option the front door maps. The options go through
both `trl.GRPOConfig` and mathgrpo's `GRPOConfig.to_mathgrpo_config`, so a wrong mapping fails here too.

TRL runs its micro-batches as it does in training (per_device_train_batch_size rows each, gradient_accumulation_steps
of them, losses and gradients summed); mathgrpo runs the whole rollout in one call with the counts the trainer passes.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

trl = pytest.importorskip("trl")
from datasets import Dataset  # noqa: E402

from mathgrpo.distributed import SINGLE  # noqa: E402
from mathgrpo.loss import LOSS_TYPES, LossParams, effective_mask, grpo_loss  # noqa: E402
from mathgrpo.models import Reference, completion_logprobs  # noqa: E402
from mathgrpo.rollout import Completions  # noqa: E402
from mathgrpo.trainer import make_optimizer, policy_update  # noqa: E402
from mathgrpo.trl_compat import GRPOConfig  # noqa: E402

G, PROMPTS, P_LEN, WIDTH, PER_DEVICE, ACCUM = 4, 2, 3, 6, 4, 2
N = G * PROMPTS
# name -> TRL options (besides the common ones below); num_iterations=2 makes TRL use the old log-probs we pass
CASES = {
    **{lt: {"loss_type": lt} for lt in ("grpo", "bnpo", "dr_grpo", "dapo", "sapo", "luspo")},
    "cispo": {"loss_type": "cispo", "epsilon_high": 1.3},
    "grpo_no_bias_correction": {"loss_type": "grpo", "use_bias_correction_kl": False},
    "dapo_no_kl": {"loss_type": "dapo", "beta": 0.0},
    "grpo_sequence": {"loss_type": "grpo", "importance_sampling_level": "sequence"},
    "dapo_sequence": {"loss_type": "dapo", "importance_sampling_level": "sequence", "epsilon": 0.1},
    "sapo_temperatures": {"loss_type": "sapo", "sapo_temperature_pos": 0.5, "sapo_temperature_neg": 2.0},
    "bnpo_asymmetric": {"loss_type": "bnpo", "epsilon": 0.15, "epsilon_high": 0.4},
    "grpo_delta": {"loss_type": "grpo", "delta": 1.4},
    "dapo_off_policy_mask": {"loss_type": "dapo", "off_policy_mask_threshold": 0.05},
}
# options whose loss depends on the micro-batch TRL runs (its entropy quantile pool): through policy_update only,
# whose micro-batches (3 rows) are cut across TRL's (4 rows)
UPDATE_CASES = {
    **CASES,
    "grpo_entropy_quantile": {"loss_type": "grpo", "top_entropy_quantile": 0.5, "beta": 0.0},
    "dapo_entropy_quantile": {"loss_type": "dapo", "top_entropy_quantile": 0.3, "beta": 0.0},
}
COMMON = {"beta": 0.04, "temperature": 0.7, "max_completion_length": WIDTH, "num_generations": G,
          "per_device_train_batch_size": PER_DEVICE, "gradient_accumulation_steps": ACCUM, "num_iterations": 2,
          "epsilon_high": 0.28}

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, smol_tokenizer):
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                      intermediate_size=32, vocab_size=len(smol_tokenizer), max_position_embeddings=64,
                      tie_word_embeddings=True, pad_token_id=smol_tokenizer.pad_token_id)
    path = tmp_path_factory.mktemp("tiny-trl")
    AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
    smol_tokenizer.save_pretrained(path)
    return str(path)


def _trl_trainer(model_dir, tokenizer, opts, out):
    args = trl.GRPOConfig(output_dir=str(out), bf16=False, use_cpu=True, report_to="none", **opts)
    tr = trl.GRPOTrainer(model=model_dir, reward_funcs=[lambda completions, **kw: [0.0] * len(completions)],
                         args=args, train_dataset=Dataset.from_dict({"prompt": ["a", "b"]}), processing_class=tokenizer)
    tr.current_gradient_accumulation_steps = ACCUM  # set by transformers' training loop, which we do not run
    tr.model.train()
    return tr


def _batch(seed=0):
    """Equal-length prompts (TRL left-pads, mathgrpo does not: equal lengths make the two layouts the same),
    right-padded completions of uneven length, some truncated."""
    gen = torch.Generator().manual_seed(seed)
    prompts = torch.randint(10, 1000, (PROMPTS, P_LEN), generator=gen).repeat_interleave(G, 0)  # [N, P]
    lengths = torch.tensor([6, 2, 5, 1, 3, 6, 4, 2])  # [N]
    mask = (torch.arange(WIDTH)[None, :] < lengths[:, None]).long()  # [N, T]
    ids = torch.randint(10, 1000, (N, WIDTH), generator=gen) * mask  # [N, T]
    adv = torch.randn(N, generator=gen)
    return prompts, ids, mask, adv


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _trl_loss(tr, prompts, ids, mask, adv, old, ref):
    """TRL's loss and gradients over the rollout, micro-batch by micro-batch as its training loop runs them."""
    tr.model.zero_grad(set_to_none=True)
    total = 0.0
    for k in range(ACCUM):
        rows = slice(k * PER_DEVICE, (k + 1) * PER_DEVICE)
        inputs = {"prompt_ids": prompts[rows], "prompt_mask": torch.ones_like(prompts[rows]),
                  "completion_ids": ids[rows], "completion_mask": mask[rows], "advantages": adv[rows],
                  "old_per_token_logps": old[rows], "num_items_in_batch": mask.sum()}
        if ref is not None:
            inputs["ref_per_token_logps"] = ref[rows]
        loss = tr._compute_loss(tr.model, inputs)
        loss.backward()
        total += loss.item()
    return total, _grads(tr.model), tr._metrics["train"]


# Measured on this project's 2-core CPU VM (fp32): loss within 3e-7 relative, every gradient tensor within
# 1.6e-6 of its own largest entry (fp32 summation order: chunked log-probs vs TRL's full logits).
LOSS_RTOL, GRAD_TOL = 1e-6, 5e-6


def _assert_grads_close(got: dict, want: dict) -> None:
    for k in want:
        scale = want[k].abs().max().item()
        assert scale > 0, k
        err = (got[k] - want[k]).abs().max().item() / scale
        assert err < GRAD_TOL, (k, err)
    assert max(w.abs().max().item() for w in want.values()) > 1e-4  # the gradient is not trivially zero


def _perturbed(logp, seed, scale):  # stand-ins for the old and reference policies: ratios ~0.5..1.9 (clips hit)
    gen = torch.Generator().manual_seed(seed)
    return (logp + (torch.rand(logp.shape, generator=gen) - 0.5) * scale).detach()


@pytest.mark.parametrize("name", sorted(CASES))
def test_loss_and_gradients_equal_trls(tiny_dir, smol_tokenizer, tmp_path, name):
    opts = {**COMMON, **CASES[name]}
    tr = _trl_trainer(tiny_dir, smol_tokenizer, opts, tmp_path)
    cfg = GRPOConfig(str(tmp_path), bf16=False, **opts).to_mathgrpo_config(train_size=PROMPTS, on_cuda=False)
    g = cfg.grpo
    prompts, ids, mask, adv = _batch()
    model = tr.model
    with torch.no_grad():
        logp0 = completion_logprobs(model, prompts.tolist(), ids, temperature=cfg.generation.temperature)  # [N, T]
    old, ref = _perturbed(logp0, 1, 1.3), _perturbed(logp0, 2, 1.0) if g.beta else None
    want, want_grads, trl_metrics = _trl_loss(tr, prompts, ids, mask, adv, old, ref)

    model.zero_grad(set_to_none=True)
    logp = completion_logprobs(model, prompts.tolist(), ids, temperature=cfg.generation.temperature)
    eff = effective_mask(mask, None)
    row_norms = LOSS_TYPES[g.loss_type].row_norms
    loss, metrics = grpo_loss(logp, old, ref, adv, mask, LossParams.from_config(cfg), token_count=float(eff.sum()),
                              seq_count=N, row_norm=row_norms(eff, g.bnpo_batch_rows) if row_norms else None)
    loss.backward()
    got_grads = _grads(model)
    assert loss.item() == pytest.approx(want, rel=LOSS_RTOL, abs=1e-9)
    assert set(got_grads) == set(want_grads)
    _assert_grads_close(got_grads, want_grads)
    if g.beta:  # TRL logs the KL per micro-batch as a token mean; ours is the token mean of the whole rollout
        tokens = [float(mask[k * PER_DEVICE:(k + 1) * PER_DEVICE].sum()) for k in range(ACCUM)]
        want_kl = sum(x * n for x, n in zip(trl_metrics["kl"], tokens)) / sum(tokens)
        assert metrics["kl_sum"] / metrics["num_tokens"] == pytest.approx(want_kl, rel=2e-6)


@pytest.mark.parametrize("name", sorted(UPDATE_CASES))
def test_policy_update_gradient_equals_trls(tiny_dir, smol_tokenizer, tmp_path, name):
    """The whole update path at mu=1 (reference taken by policy_update from its frozen copy, its micro-batches,
    its counts, the options as the trainer passes them) against TRL with its reference model."""
    opts = {**COMMON, **UPDATE_CASES[name], "num_iterations": 1}
    tr = _trl_trainer(tiny_dir, smol_tokenizer, opts, tmp_path)
    cfg = GRPOConfig(str(tmp_path), bf16=False, **opts).to_mathgrpo_config(train_size=PROMPTS, on_cuda=False)
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, lora=False), trainer=dataclasses.replace(
        cfg.trainer, max_grad_norm=0.0, learning_rate=0.0, max_tokens_per_microbatch=3 * (P_LEN + WIDTH)))
    prompts, ids, mask, adv = _batch(3)
    model = tr.model
    with torch.no_grad():  # the policy moves away from TRL's reference model (loaded from the same folder)
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
        if cfg.grpo.top_entropy_quantile < 1:  # sharper distributions: entropies far apart beside float rounding
            model.get_output_embeddings().weight.mul_(30.0)
        ref = completion_logprobs(tr.ref_model, prompts.tolist(), ids, temperature=0.7) if cfg.grpo.beta else None
    with torch.no_grad():
        old = completion_logprobs(model, prompts.tolist(), ids, temperature=0.7)
    want, want_grads, _ = _trl_loss(tr, prompts, ids, mask, adv, old, ref)

    model.zero_grad(set_to_none=True)
    comp = Completions(prompts.tolist(), ids, mask.bool(), [""] * N, torch.zeros(N, dtype=torch.bool))
    reference = Reference(model, cfg.grpo.beta, lora=False)
    if cfg.grpo.beta:
        reference.copy.load_state_dict(tr.ref_model.state_dict())  # the reference is the starting policy
    optimizer, scheduler = make_optimizer(model, cfg)
    m = policy_update(model, optimizer, scheduler, reference, comp, adv, cfg, SINGLE)
    assert m["loss"] == pytest.approx(want, rel=LOSS_RTOL, abs=1e-9)
    _assert_grads_close(_grads(model), want_grads)


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_advantages_equal_trls(tiny_dir, smol_tokenizer, tmp_path, scale):
    """Advantages of TRL's own `_generate_and_score_completions` (generation stubbed out) against the trainer's path
    (RewardSet with the front door's weights, then rank_advantages): weighted sums, None rewards, an unscorable row."""
    from mathgrpo.scoring import RewardSet
    from mathgrpo.sampling import rank_advantages

    r1 = [1.0, 0.0, None, 1.0, 0.5, 2.0, 0.0, 0.3]
    r2 = [0.2, None, None, 0.1, None, 1.0, 0.4, 0.0]  # row 2: no reward applies
    def first(completions, **kw):
        return r1

    def second(completions, **kw):
        return r2

    funcs = [first, second]
    opts = {"per_device_train_batch_size": N, "num_generations": G, "scale_rewards": scale, "reward_weights": [1.0, 0.5]}
    args = trl.GRPOConfig(output_dir=str(tmp_path), bf16=False, use_cpu=True, report_to="none", **opts)
    tr = trl.GRPOTrainer(model=tiny_dir, reward_funcs=funcs, args=args, processing_class=smol_tokenizer,
                         train_dataset=Dataset.from_dict({"prompt": ["a", "b"]}))
    tr.model.train()
    ids = [[10 + i, 11, smol_tokenizer.eos_token_id] for i in range(N)]
    tr._generate = lambda prompts: ([[5, 6, 7]] * N, ids, None, ["x"] * N, None, {}, None, None)
    want = tr._generate_and_score_completions([{"prompt": "a"}] * G + [{"prompt": "b"}] * G)["advantages"]

    cfg = GRPOConfig(str(tmp_path), bf16=False, max_steps=1, **opts).to_mathgrpo_config(on_cuda=False)
    per, total = RewardSet(list(zip(funcs, cfg.rewards.weights))).score(["x"] * N)
    got = rank_advantages(SINGLE, per, total, cfg.grpo.num_generations, cfg.grpo.scale_rewards)
    torch.testing.assert_close(got, want, rtol=0, atol=5e-7)  # measured: 1.2e-7 (float32)
    assert got[2] == 0.0


# The update's wiring at mu > 1 (the ratio moves off 1, so clipping acts): one case per option, each a setting a wrong
# argument between the config and the loss would change. TRL options besides COMMON.
ITERATION_CASES = {
    **{lt: {"loss_type": lt} for lt in ("grpo", "bnpo", "dr_grpo", "dapo", "sapo")},
    "cispo": {"loss_type": "cispo", "epsilon_high": 1.3},
    "clip_low_high": {"loss_type": "dapo", "epsilon": 0.05, "epsilon_high": 0.4},
    "truncation_mask": {"loss_type": "grpo", "mask_truncated_completions": True},
    "sequence_level": {"loss_type": "dapo", "importance_sampling_level": "sequence", "epsilon": 0.02,
                       "epsilon_high": 0.05},
    "no_bias_correction": {"loss_type": "bnpo", "use_bias_correction_kl": False},
    "sapo_temperatures": {"loss_type": "sapo", "sapo_temperature_pos": 0.3, "sapo_temperature_neg": 3.0},
}
ITERATIONS, UPDATE_LR = 3, 3e-3


@pytest.mark.parametrize("name", sorted(ITERATION_CASES))
def test_update_with_iterations_equals_trls(tiny_dir, smol_tokenizer, tmp_path, name):
    """policy_update with num_iterations=3, driven by a Config built through the front door, against TRL's
    `_compute_loss` iteration by iteration: before each optimizer step the policy's weights and gradients are
    recorded; TRL computes its loss and gradients at those weights, with the rollout's old log-probs (the policy
    before the first step) and the reference model's, and the truncated rows masked as TRL masks them."""
    opts = {**COMMON, **ITERATION_CASES[name], "num_iterations": ITERATIONS}
    tr = _trl_trainer(tiny_dir, smol_tokenizer, opts, tmp_path)
    cfg = GRPOConfig(str(tmp_path), bf16=False, **opts).to_mathgrpo_config(train_size=PROMPTS, on_cuda=False)
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, lora=False), trainer=dataclasses.replace(
        cfg.trainer, max_grad_norm=0.0, learning_rate=UPDATE_LR, max_tokens_per_microbatch=3 * (P_LEN + WIDTH)))
    prompts, ids, mask, adv = _batch(5)
    truncated = mask.sum(1) == WIDTH  # [N]: rows 0 and 5 reach the cap
    model = tr.model
    with torch.no_grad():  # the policy starts away from TRL's reference model (loaded from the same folder)
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
        ref = completion_logprobs(tr.ref_model, prompts.tolist(), ids, temperature=0.7)
        old = completion_logprobs(model, prompts.tolist(), ids, temperature=0.7)  # the rollout's policy

    reference = Reference(model, cfg.grpo.beta, lora=False)
    reference.copy.load_state_dict(tr.ref_model.state_dict())
    optimizer, scheduler = make_optimizer(model, cfg)
    seen = []  # (weights, gradients) of each iteration, before its optimizer step

    def record(opt, args, kwargs):
        seen.append(({n: p.detach().clone() for n, p in model.named_parameters()}, _grads(model)))

    optimizer.register_step_pre_hook(record)
    comp = Completions(prompts.tolist(), ids, mask.bool(), [""] * N, truncated)
    m = policy_update(model, optimizer, scheduler, reference, comp, adv, cfg, SINGLE)
    assert len(seen) == ITERATIONS

    trl_mask = mask * (~truncated).unsqueeze(1).long() if cfg.grpo.mask_truncated_completions else mask
    losses = []
    for weights, grads in seen:
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(weights[n])
        loss, want_grads, _ = _trl_loss(tr, prompts, ids, trl_mask, adv, old, ref)
        losses.append(loss)
        _assert_grads_close(grads, want_grads)
    assert m["loss"] == pytest.approx(sum(losses) / ITERATIONS, rel=1e-5, abs=1e-9)
    if cfg.grpo.loss_type != "sapo":  # the later iterations' ratios left 1 far enough to clip
        assert m["clip_ratio/region"] > 0.02
@pytest.mark.parametrize("mu", [1, 2])
@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "bnpo"])
def test_mini_batches_equal_trls_optimizer_steps(tiny_dir, smol_tokenizer, tmp_path, loss_type, mu):
    """steps_per_generation = 2 x gradient_accumulation_steps: one rollout, two optimizer steps per pass, mu passes.
    TRL's own loss over the same shuffled mini-batches (its micro-batches of 2 rows, the old log-probs taken once
    before the first step), each step taken by the same SGD (Adam would turn float-rounding gradients of untouched
    embedding rows into whole steps), against policy_update with grpo.mini_batches=2: the weights after the last
    optimizer step agree, and clipping acts (the later steps are off-policy)."""
    import copy

    from mathgrpo.update import minibatch_rows

    per, ga = 2, 2
    opts = {**COMMON, "loss_type": loss_type, "num_iterations": mu, "per_device_train_batch_size": per,
            "gradient_accumulation_steps": ga, "steps_per_generation": 2 * ga, "beta": 0.0,
            "lr_scheduler_type": "constant", "max_grad_norm": 0.0}
    tr = _trl_trainer(tiny_dir, smol_tokenizer, opts, tmp_path)
    tr.current_gradient_accumulation_steps = ga
    cfg = GRPOConfig(str(tmp_path), bf16=False, **opts).to_mathgrpo_config(train_size=PROMPTS, on_cuda=False)
    assert cfg.grpo.mini_batches == 2 and cfg.trainer.prompts_per_step == PROMPTS and cfg.grpo.num_iterations == mu
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, lora=False))
    prompts, ids, mask, adv = _batch(4)
    adv = adv * 3  # large advantages: the steps move the policy far enough for the clip to act
    model = tr.model
    ours = copy.deepcopy(model)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}

    torch.manual_seed(7)
    steps = minibatch_rows(N, 2)
    assert sorted(steps[0] + steps[1]) == list(range(N)) and steps[0] != list(range(N // 2))  # shuffled
    with torch.no_grad():
        old = completion_logprobs(model, prompts.tolist(), ids, temperature=cfg.generation.temperature)
    lr = 20.0  # plain SGD on a tiny model: large enough to move the ratios past the clip
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    for _ in range(mu):
        for rows in steps:
            opt.zero_grad(set_to_none=True)
            for k in range(ga):
                r = rows[k * per:(k + 1) * per]
                inputs = {"prompt_ids": prompts[r], "prompt_mask": torch.ones_like(prompts[r]),
                          "completion_ids": ids[r], "completion_mask": mask[r], "advantages": adv[r],
                          "old_per_token_logps": old[r], "num_items_in_batch": mask.sum()}
                tr._compute_loss(model, inputs).backward()
            opt.step()

    comp = Completions(prompts.tolist(), ids, mask.bool(), [""] * N, torch.zeros(N, dtype=torch.bool))
    optimizer = torch.optim.SGD(ours.parameters(), lr=lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: 1.0)
    torch.manual_seed(7)  # the trainer seeds before the update: the same shuffle
    m = policy_update(ours, optimizer, scheduler, Reference(ours, 0.0, lora=False), comp, adv, cfg, SINGLE)
    assert m["clip_ratio/region"] > 0.05  # the off-policy steps clip
    for (name, a), b in zip(model.named_parameters(), ours.parameters()):
        step = (a - start[name]).abs().max().item()
        assert step > 1e-3, name  # every tensor moved
        assert (a - b).abs().max().item() < GRAD_TOL * step, name  # fp32 summation order only
