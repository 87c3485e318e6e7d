"""Does a mathgrpo run learn as the same run under TRL's GRPOTrainer does? One task, model, prompts, settings, seeds.

    PYTHONPATH=src python -m benchmarks.learning                       # 3 seeds x {mathgrpo, trl}, CPU (CUDA if any)
    PYTHONPATH=src python -m benchmarks.learning --seeds 0 --steps 5   # a short check
    PYTHONPATH=src python -m benchmarks.learning --summarize           # table + plot from the results file
    PYTHONPATH=src python -m benchmarks.learning --mapping             # print the settings' mapping only

On a CPU shared with other work, OMP_NUM_THREADS=1 keeps torch's threads from spinning against each other.

The run is preset `demo` (SmolLM2-135M-Instruct on the built-in arithmetic, `mathgrpo train --preset demo`):
mathgrpo runs it as `python -m mathgrpo train --preset demo trainer.seed=S`, TRL 1.16's own `trl.GRPOTrainer` (not
mathgrpo's front door) gets the same converted model folder (mathgrpo's GGUF cache), the same LoRA, the same
problems in the same order and the same prompt messages, the `answer` reward function, and every hyper-parameter
mapped in `mapping()` (printed at the start). Each (engine, seed) runs in its own process, one at a time.

Per step: reward (mean `answer`), mean completion length (tokens), seconds. At the end both adapters are scored by
the same evaluation, mathgrpo's `run_eval` (pass@1, maj@4 over 4 samples of each held-out problem, eval.seed fixed,
`eval.answer=final`); the base model once per seed (its split). Rows are appended to --out as they finish:
{"engine", "seed", "step", "reward", "completion_length", "step_s"} per step and {"engine", "seed", "final": ...}
per run (`append_final`). --summarize prints the table (mean and spread over seeds) and draws both reward curves
(--plot).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENGINES = ("mathgrpo", "trl")


def demo_config(seed: int, steps: int, out_dir: str):
    from mathgrpo.presets import resolve

    return resolve("demo", None, [f"trainer.seed={seed}", f"trainer.max_steps={steps}",
                                  f"trainer.output_dir={out_dir}"]).config


def mapping(cfg) -> list[tuple[str, str, str]]:
    """(mathgrpo setting = value, TRL 1.16 expression, note) for every setting that shapes learning."""
    m, g, gen, t = cfg.model, cfg.grpo, cfg.generation, cfg.trainer
    return [
        ("model.name_or_path=smollm2", "model folder = mathgrpo's converted GGUF cache (float32)", "same weights"),
        (f"model.lora_r={m.lora_r}, lora_alpha={m.lora_alpha}, lora_dropout={m.lora_dropout}",
         f"LoraConfig(r={m.lora_r}, lora_alpha={m.lora_alpha}, lora_dropout={m.lora_dropout})", ""),
        (f"model.lora_layers={m.lora_layers}, lora_target_modules=all 7",
         "LoraConfig(layers_to_transform=last N, target_modules=same 7)", "init: each seeded by the seed"),
        (f"grpo.num_generations={g.num_generations}", f"num_generations={g.num_generations}", ""),
        (f"trainer.prompts_per_step={t.prompts_per_step}",
         f"per_device_train_batch_size={t.prompts_per_step * g.num_generations}, gradient_accumulation_steps=1",
         "one optimizer step per rollout"),
        ("problem order: sampling.Sampler(seed)", "dataset in that order, shuffle_dataset=False", "same prompts per step"),
        ("prompt: chat template, user message = problem + instruction",
         "conversational prompt [{'role': 'user', 'content': same text}]", "prompt text checked equal"),
        (f"generation.max_new_tokens={gen.max_new_tokens}", f"max_completion_length={gen.max_new_tokens}", ""),
        (f"generation.temperature={gen.temperature}, top_p={gen.top_p}, top_k={gen.top_k}",
         f"temperature={gen.temperature}, top_p={gen.top_p}, top_k={gen.top_k}", "logits / T in the loss too"),
        (f"grpo.loss_type={g.loss_type}, epsilon={g.epsilon}, beta={g.beta}, scale_rewards={g.scale_rewards}",
         f"loss_type={g.loss_type}, epsilon={g.epsilon}, beta={g.beta}, scale_rewards={g.scale_rewards}", ""),
        (f"grpo.num_iterations={g.num_iterations}", f"num_iterations={g.num_iterations}", ""),
        (f"rewards: answer (weight 1)", "reward_funcs=[mathgrpo.rewards.answer_reward on the completion text]",
         "boxed/accuracy have weight 0 in mathgrpo: not passed to TRL"),
        (f"trainer.learning_rate={t.learning_rate}, adam_beta1={t.adam_beta1}, adam_beta2={t.adam_beta2}, "
         f"weight_decay={t.weight_decay}",
         f"optimizers=(torch AdamW(lr={t.learning_rate}, betas=({t.adam_beta1}, {t.adam_beta2}), "
         f"weight_decay={t.weight_decay}), ...)", ""),
        (f"trainer.lr_scheduler={t.lr_scheduler}, warmup_steps={t.warmup_steps}",
         "optimizers=(..., the same LambdaLR as mathgrpo's make_optimizer)",
         "transformers' warm-up starts at lr 0 (i/w); mathgrpo's at lr/(w+1) ((i+1)/(w+1)): passed exactly"),
        (f"trainer.max_grad_norm={t.max_grad_norm}", f"max_grad_norm={t.max_grad_norm}", ""),
        (f"trainer.max_steps={t.max_steps}", f"max_steps={t.max_steps}", ""),
        (f"trainer.seed=S", "seed=S (torch seeded with S before the LoRA init)", "sampling draws differ by design"),
        ("model.dtype=auto (float32 on CPU)", "bf16=False on CPU (float32), bf16 on CUDA", ""),
        (f"model.gradient_checkpointing={m.gradient_checkpointing}",
         f"gradient_checkpointing={m.gradient_checkpointing}", "TRL 1.16's default is True: speed only"),
    ]


# ----------------------------------------------------------------------------- the two engines (workers)

def run_mathgrpo(seed: int, steps: int, work: Path, emit) -> dict:
    """`python -m mathgrpo train --preset demo trainer.seed=S` in this process's child; its metrics (emitted as they
    are logged) and evaluation."""
    cmd = [sys.executable, "-m", "mathgrpo", "train", "--preset", "demo", f"trainer.seed={seed}",
           f"trainer.max_steps={steps}", f"trainer.output_dir={work}", "trainer.run_name=mathgrpo"]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    run, seen = work / "mathgrpo", 0
    while True:
        done = proc.poll() is not None
        path = run / "metrics.jsonl"
        rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.is_file() else []
        for r in rows[seen:]:
            emit(dict(step=r["step"], reward=r["reward"], completion_length=r["completion_length_mean"],
                      step_s=r["step_time"]))
        seen = len(rows)
        if done:
            break
        time.sleep(5)
    if proc.returncode:
        raise SystemExit(f"mathgrpo train exited with {proc.returncode}")
    summary = json.loads((run / "eval_summary.json").read_text())["models"]
    return dict(trained=_eval_metrics(summary["trained"]["metrics"]), base=_eval_metrics(summary["base"]["metrics"]),
                wall_s=time.perf_counter() - t0)


def _eval_metrics(m: dict) -> dict:
    return {"pass@1": m["pass@1"], "maj@4": m["maj@k"], "completion_length": m.get("completion_length")}


def run_trl(seed: int, steps: int, work: Path, emit) -> dict:
    """TRL 1.16's GRPOTrainer on the same run (mapping()); the adapter then scored by mathgrpo's evaluation."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from mathgrpo.data import load_problems
    from mathgrpo.evaluate import run_eval
    from mathgrpo.loading import _gguf_cache_dir, load_base, load_tokenizer, pick_device, resolve_source
    from mathgrpo.models import _last_layers
    from mathgrpo.prompts import PromptBuilder
    from mathgrpo.rewards import answer_reward
    from mathgrpo.sampling import Sampler
    from mathgrpo.update import make_optimizer

    cfg = demo_config(seed, steps, str(work))
    m, g, gen, t = cfg.model, cfg.grpo, cfg.generation, cfg.trainer
    device = pick_device(m)
    on_gpu = device.type == "cuda"
    mg_tok = load_tokenizer(m)
    load_base(m, torch.device("cpu"), torch.float32)  # makes sure the converted copy exists
    cache = _gguf_cache_dir(*resolve_source(m))
    model = AutoModelForCausalLM.from_pretrained(cache / "model", dtype=torch.bfloat16 if on_gpu else torch.float32,
                                                 attn_implementation="sdpa").to(device)
    tok = AutoTokenizer.from_pretrained(cache / "tokenizer")
    builder = PromptBuilder(mg_tok, cfg.prompt)

    data = load_problems(cfg.data, seed=t.seed)
    sampler = Sampler(len(data.train), t.seed)
    order = [data.train[i] for _ in range(steps) for i in sampler.next(t.prompts_per_step)]
    messages = [builder.messages(p.problem) for p in order]
    for p, msg in zip(order[:8], messages[:8]):  # TRL renders the conversational prompt with the same template
        trl_text = tok.apply_chat_template(msg, tokenize=False, add_generation_prompt=True)
        assert trl_text == builder.text(p.problem), (trl_text, builder.text(p.problem))
    ds = Dataset.from_dict({"prompt": messages, "gold": [p.gold for p in order]})

    def answer(completions, gold, **_):  # conversational completions: [{"role": "assistant", "content": text}]
        texts = [c[0]["content"] if isinstance(c, list) else c for c in completions]
        return answer_reward(texts, gold=gold)

    torch.manual_seed(seed)
    model = get_peft_model(model, LoraConfig(
        r=m.lora_r, lora_alpha=m.lora_alpha, lora_dropout=m.lora_dropout, target_modules=list(m.lora_target_modules),
        layers_to_transform=_last_layers(model, m.lora_layers), task_type="CAUSAL_LM", bias="none"))
    optimizer, scheduler = make_optimizer(model, cfg)  # AdamW + the same LambdaLR (see mapping())
    conf = GRPOConfig(
        output_dir=str(work / "trl"), per_device_train_batch_size=t.prompts_per_step * g.num_generations,
        gradient_accumulation_steps=1, num_generations=g.num_generations, max_completion_length=gen.max_new_tokens,
        temperature=gen.temperature, top_p=gen.top_p, top_k=gen.top_k, loss_type=g.loss_type, beta=g.beta,
        epsilon=g.epsilon, scale_rewards=g.scale_rewards, num_iterations=g.num_iterations,
        max_grad_norm=t.max_grad_norm, max_steps=steps, learning_rate=t.learning_rate, seed=seed,
        shuffle_dataset=False, gradient_checkpointing=m.gradient_checkpointing, bf16=on_gpu, use_cpu=not on_gpu, logging_steps=1, report_to="none",
        save_strategy="no", use_vllm=False)
    clock: dict = {}

    class Record(TrainerCallback):
        def on_step_begin(self, *a, **k):
            clock["t0"] = time.perf_counter()

        def on_step_end(self, args, state, *a, **k):
            clock["last"] = time.perf_counter() - clock["t0"]

        def on_log(self, args, state, control, logs=None, **k):
            if logs and "reward" in logs:
                emit(dict(step=state.global_step, reward=logs["reward"],
                          completion_length=logs["completions/mean_length"], step_s=clock.get("last")))

    trainer = GRPOTrainer(model=model, reward_funcs=[answer], args=conf, train_dataset=ds, processing_class=tok,
                          optimizers=(optimizer, scheduler), callbacks=[Record()])
    t0 = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - t0
    adapter = work / "trl" / "adapter"
    trainer.model.save_pretrained(adapter)
    del trainer, model
    summary = run_eval(cfg, adapter=str(adapter), out_dir=work / "trl")["models"]
    return dict(trained=_eval_metrics(summary["model"]["metrics"]), train_wall_s=wall)


# ----------------------------------------------------------------------------- driver, table, plot

def worker(engine: str, seed: int, steps: int, result: Path, out: Path) -> None:
    """One (engine, seed) run: its step rows appended to `out` as they come, its evaluation to `result`."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"

    def emit(row: dict) -> None:
        row = dict(engine=engine, seed=seed, device=device, **row)
        print(f"[{engine}] {json.dumps(row)}", flush=True)
        with out.open("a") as f:
            f.write(json.dumps(row) + "\n")

    work = Path(tempfile.mkdtemp(prefix=f"learning-{engine}-{seed}-"))
    res = (run_mathgrpo if engine == "mathgrpo" else run_trl)(seed, steps, work, emit)
    res.update(engine=engine, seed=seed, device=device, work=str(work))
    result.write_text(json.dumps(res))


def run_all(args) -> None:
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for seed in args.seeds:
        for engine in args.engines:
            result = Path(tempfile.mkstemp(suffix=".json")[1])
            t0 = time.perf_counter()
            cmd = [sys.executable, __file__, "--worker", engine, "--seeds", str(seed), "--steps", str(args.steps),
                   "--result", str(result), "--out", str(out)]
            print(f"== {engine} seed {seed}: {' '.join(cmd)}", flush=True)
            proc = subprocess.run(cmd, env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
            if proc.returncode != 0:
                print(f"!! {engine} seed {seed} failed (exit {proc.returncode})", flush=True)
                continue
            row = append_final(out, json.loads(result.read_text()), args.steps, time.perf_counter() - t0)
            print(f"== {engine} seed {seed}: {json.dumps(row['final'])}", flush=True)


def append_final(out: Path, res: dict, steps: int, process_s: float | None) -> dict:
    """The run's last row in the results file: its evaluation (trained; base for mathgrpo's run)."""
    row = dict(engine=res["engine"], seed=res["seed"], device=res["device"], steps=steps,
               process_s=None if process_s is None else round(process_s, 1),
               final={k: res[k] for k in ("trained", "base") if k in res})
    with out.open("a") as f:
        f.write(json.dumps(row) + "\n")
    return row


def _mean_sd(xs: list[float]) -> tuple[float, float]:
    mu = sum(xs) / len(xs)
    sd = math.sqrt(sum((x - mu) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
    return mu, sd


def summarize(path: Path, plot: Path | None, window: int = 5) -> str:
    """Markdown table: per engine, over seeds, mean ± sd (sample sd; a single seed: ± 0) of the reward over the first
    and the last `window` of the steps every run reached, the completion length and seconds a step over those last
    steps, and the evaluation's pass@1 / maj@4; only finished runs once there are any (base: mathgrpo's evaluation
    of the base model, on each seed's split)."""
    rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    finals = {(r["engine"], r["seed"]): r["final"] for r in rows if "final" in r}
    runs: dict[tuple[str, int], list[dict]] = {}
    for r in rows:
        if "step" in r:
            runs.setdefault((r["engine"], r["seed"]), []).append(r)
    if finals:  # the runs that finished; a run still going (or killed) is left out
        runs = {k: v for k, v in runs.items() if k in finals}
    if not runs:
        return "no steps logged yet"
    n = min(len(v) for v in runs.values())  # steps every run reached
    w = min(window, max(1, n // 2))
    for k in runs:
        runs[k] = sorted(runs[k], key=lambda r: r["step"])[:n]

    def fmt(xs, d=3):
        if not xs:
            return "–"
        mu, sd = _mean_sd(xs)
        return f"{mu:.{d}f} ± {sd:.{d}f}"

    lines = [f"| engine | seeds | steps | reward, steps 1-{w} | reward, steps {n - w + 1}-{n} | completion tokens, "
             f"steps {n - w + 1}-{n} | s / step | pass@1 | maj@4 |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for engine in ENGINES:
        seeds = sorted(s for e, s in runs if e == engine)
        if not seeds:
            continue
        per = {s: runs[(engine, s)] for s in seeds}
        first = [_mean_sd([r["reward"] for r in per[s][:w]])[0] for s in seeds]
        last = [_mean_sd([r["reward"] for r in per[s][-w:]])[0] for s in seeds]
        length = [_mean_sd([r["completion_length"] for r in per[s][-w:]])[0] for s in seeds]
        secs = [_mean_sd([r["step_s"] for r in per[s] if r["step_s"] is not None])[0] for s in seeds]
        done = [finals[(engine, s)]["trained"] for s in seeds if (engine, s) in finals]
        lines.append(f"| {engine} | {len(seeds)} | {n} | {fmt(first)} | {fmt(last)} | {fmt(length, 1)} | "
                     f"{fmt(secs, 1)} | {fmt([d['pass@1'] for d in done])} | {fmt([d['maj@4'] for d in done])} |")
    base = [f["base"] for f in finals.values() if "base" in f]
    if base:
        lines.append(f"| base model (no training) | {len(base)} | | | | | | {fmt([b['pass@1'] for b in base])} | "
                     f"{fmt([b['maj@4'] for b in base])} |")
    if plot is not None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4))
        for engine, color in zip(ENGINES, ("tab:blue", "tab:orange")):
            per = {s: v for (e, s), v in runs.items() if e == engine}
            for s, v in per.items():
                ax.plot([r["step"] for r in v], [r["reward"] for r in v], color=color, alpha=0.3, lw=0.8, marker=".")
            if per:
                steps = [r["step"] for r in next(iter(per.values()))]
                mean = [sum(v[i]["reward"] for v in per.values()) / len(per) for i in range(n)]
                ax.plot(steps, mean, color=color, lw=2, label=f"{engine} (mean of {len(per)} seed{'s' * (len(per) > 1)})")
        ax.set_xlabel("step")
        ax.set_ylabel("training reward (answer)")
        ax.set_title("preset demo (SmolLM2-135M-Instruct, arithmetic): mathgrpo vs TRL GRPOTrainer", fontsize=9)
        ax.legend()
        fig.tight_layout()
        plot.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(plot, dpi=110)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--engines", nargs="+", choices=ENGINES, default=list(ENGINES))
    ap.add_argument("--steps", type=int, default=None, help="default: the demo's trainer.max_steps")
    ap.add_argument("--out", default=str(ROOT / "docs" / "results" / "learning-cpu.jsonl"))
    ap.add_argument("--plot", default=str(ROOT / "docs" / "learning-cpu.png"))
    ap.add_argument("--summarize", action="store_true", help="table and plot from --out; nothing is run")
    ap.add_argument("--mapping", action="store_true", help="print the settings' mapping and stop")
    ap.add_argument("--worker", choices=ENGINES, help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    from mathgrpo.presets import resolve

    args.steps = args.steps or resolve("demo").config.trainer.max_steps
    cfg = demo_config(args.seeds[0], args.steps, tempfile.gettempdir())
    if args.summarize:
        print(summarize(Path(args.out), Path(args.plot)))
        return
    if args.worker:
        worker(args.worker, args.seeds[0], args.steps, Path(args.result), Path(args.out))
        return
    print("settings: mathgrpo  ->  TRL 1.16 GRPOTrainer  (note)")
    for ours, theirs, note in mapping(cfg):
        print(f"  {ours:<70} -> {theirs}{f'  ({note})' if note else ''}")
    if not args.mapping:
        run_all(args)
        print(summarize(Path(args.out), Path(args.plot)))


if __name__ == "__main__":
    main()
