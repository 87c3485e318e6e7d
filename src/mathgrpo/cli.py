"""The `mathgrpo` command line.

    mathgrpo train [cfg.yaml] [section.key=value ...] [--resume [RUN|CKPT|latest]] [--resume-changing KEY]
    mathgrpo eval  [cfg.yaml] [--model M] [--adapter RUN] [--baseline] [overrides]
    mathgrpo report RUN_DIR
    mathgrpo data inspect SOURCE [overrides]
    mathgrpo config show [cfg.yaml] [overrides]     |   mathgrpo config reference
    mathgrpo merge RUN_DIR OUT_DIR [--overwrite]
    mathgrpo plan  [cfg.yaml] [overrides] [--gpu-memory 16GiB | --device-name T4]   # the memory plan, no training

With no arguments at all, `train` and `eval` use preset `demo` (SmolLM2-135M, built-in arithmetic, CPU) and say so;
`--preset NAME` picks a preset; a config file or overrides alone start from the documented defaults (presets.py).
Exit status: 0 done, 2 an error (one line naming the key, file or function), 128 + N a run stopped by signal N
before trainer.max_steps (130 SIGINT, 143 SIGTERM).
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import sys

from .config import ConfigError, config_reference, load_config


def _split_args(items: list[str]) -> tuple[str | None, list[str]]:
    """The optional leading config file, then `key=value` overrides."""
    path = None
    rest = list(items)
    if rest and "=" not in rest[0]:
        path = rest.pop(0)
    bad = [r for r in rest if "=" not in r]
    if bad:
        raise ConfigError(f"expected section.key=value overrides, got: {' '.join(bad)}")
    return path, rest


def _resolved(args, file_label: str | None = None):
    """The preset / file / overrides of a command, resolved with the source of every value (presets.resolve)."""
    from .presets import resolve

    path, overrides = _split_args(args.items)
    return resolve(getattr(args, "preset", None), path, overrides, file_label)


def cmd_train(args) -> int:
    from .trackers import check_installed
    from .trainer import train

    res = _resolved(args)
    if os.environ.get("RANK", "0") == "0":  # under torchrun, once
        print(res.origin(), flush=True)  # the first line: which preset (or none), file and overrides
    cfg = res.config
    check_installed(cfg.trainer.report_to)
    if args.resume is not None:
        cfg.trainer.resume = args.resume
    if args.resume_changing:
        cfg.trainer.resume_changing = [k.strip() for item in args.resume_changing for k in item.split(",") if k.strip()]
    run = train(cfg, quiet=args.quiet)
    return stopped_status(run)


def stopped_status(run) -> int:
    """0 for a run that reached max_steps; 128 + the signal's number (130 SIGINT, 143 SIGTERM, the shell's
    convention) for one stopped by a signal before it, so that a job scheduler can tell the two apart."""
    import json
    import signal
    from pathlib import Path

    try:
        name = json.loads((Path(run) / "summary.json").read_text()).get("stopped_by")
    except (OSError, ValueError, TypeError):  # other ranks under torchrun: rank 0 writes the summary and says
        return 0
    return 128 + int(signal.Signals[name]) if name else 0


def cmd_eval(args) -> int:
    from .evaluate import find_run_config, run_eval

    path, overrides = _split_args(args.items)
    # Without a config file or preset, the adapter's run config is used, so the test split is the one held out.
    run_cfg = find_run_config(args.adapter) if args.adapter and path is None and args.preset is None else None
    if run_cfg is not None:
        args.items = [str(run_cfg), *overrides]
    res = _resolved(args, "the adapter's run config" if run_cfg is not None else None)
    print(res.origin(), flush=True)
    cfg = res.config
    run_eval(cfg, model_path=args.model, adapter=args.adapter, baseline=args.baseline, out_dir=args.out)
    return 0


def cmd_report(args) -> int:
    from .report import write_report

    md, html = write_report(args.run_dir)
    print(f"wrote {md} and {html}")
    return 0


def cmd_data(args) -> int:
    from .data import inspect_source

    cfg = load_config(None, args.overrides, base={})  # the documented data defaults, never a preset's
    print(inspect_source(args.source, cfg.data))
    return 0


def cmd_config(args) -> int:
    if args.action == "reference":
        print(config_reference())
        return 0
    if args.action == "presets":
        from .presets import preset_table

        print(preset_table())
        return 0
    print(_resolved(args).show(), end="")
    return 0


def cmd_plan(args) -> int:
    """The memory plan `train` would make (memory_plan.py), for this machine's GPU or a named card."""
    import torch

    from .loading import pick_device
    from .memory_plan import describe, named_card, parse_size, plan_run

    res = _resolved(args)
    print(res.origin())
    if args.gpu_memory or args.device_name:
        free, bf16 = named_card(args.device_name) if args.device_name else (None, True)
        free = parse_size(args.gpu_memory) if args.gpu_memory else free
        card = args.device_name or f"a card with {args.gpu_memory} free"
        cfg, plan = plan_run(res.config, torch.device("cuda"), args.ranks, free=free, card=card, bf16=bf16)
    else:
        cfg, plan = plan_run(res.config, pick_device(res.config.model), args.ranks)
    print(describe(cfg, plan, res.sources) + ("" if plan else " (--gpu-memory SIZE or --device-name CARD plans for a GPU)"))
    return 0


def cmd_merge(args) -> int:
    from pathlib import Path

    from .models import merge_adapter

    run_cfg = Path(args.run_dir) / "config.yaml"
    cfg = load_config(str(run_cfg) if run_cfg.is_file() else None)
    if not run_cfg.is_file():
        print(f"no {run_cfg}: the base model is preset demo's ({cfg.model.name_or_path})")
    print(f"merged model written to {merge_adapter(args.run_dir, cfg.model, args.out_dir, args.overwrite)}")
    return 0


_PRESET_HELP = ("start from a named preset (demo, notebook, deepscaler-8k: `mathgrpo config presets`); without it "
                "a config file or overrides start from the documented defaults, and no arguments at all mean demo")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mathgrpo", description="GRPO fine-tuning for math reasoning models.")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train with GRPO (no config: the embedded default)")
    t.add_argument("items", nargs="*", help="[config.yaml] [section.key=value ...]")
    t.add_argument("--resume", nargs="?", const="latest", default=None,
                   help="continue from a checkpoint, a run dir, or 'latest' (default)")
    t.add_argument("--resume-changing", action="append", default=[], metavar="KEY[,KEY]",
                   help="allow this config key to differ from the checkpoint's on resume (e.g. trainer.max_steps)")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.add_argument("--preset", default=None, help=_PRESET_HELP)
    t.set_defaults(fn=cmd_train)

    e = sub.add_parser("eval", help="pass@1 / pass@k / maj@k and rewards of a model and/or trained adapter")
    e.add_argument("items", nargs="*", help="[config.yaml] [section.key=value ...]")
    e.add_argument("--model", default=None, help="base model (hub id, folder, .gguf); default from the config")
    e.add_argument("--adapter", default=None, help="a run dir or checkpoint holding a LoRA adapter")
    e.add_argument("--baseline", action="store_true", help="also evaluate the base model and compare")
    e.add_argument("--out", default=None, help="output folder (default: the run dir, or runs/eval-<time>)")
    e.add_argument("--preset", default=None, help=_PRESET_HELP)
    e.set_defaults(fn=cmd_eval)

    r = sub.add_parser("report", help="write report.md/report.html with plots for a run dir")
    r.add_argument("run_dir")
    r.set_defaults(fn=cmd_report)

    d = sub.add_parser("data", help="data tools")
    d.add_argument("action", choices=["inspect"])
    d.add_argument("source", help="file, folder, 'arithmetic' or HF dataset id")
    d.add_argument("overrides", nargs="*", help="data.key=value (column mapping, filters)")
    d.set_defaults(fn=cmd_data)

    c = sub.add_parser("config", help="show the resolved config and where each value came from, the reference "
                                      "of every key, or the presets")
    c.add_argument("action", choices=["show", "reference", "presets"])
    c.add_argument("items", nargs="*", help="[config.yaml] [section.key=value ...]")
    c.add_argument("--preset", default=None, help=_PRESET_HELP)
    c.set_defaults(fn=cmd_config)

    pl = sub.add_parser("plan", help="the memory plan of a run (KV cache rows, micro-batch budget, checkpointing, "
                                     "...) and its estimated peak per phase, for this GPU or a named card")
    pl.add_argument("items", nargs="*", help="[config.yaml] [section.key=value ...]")
    pl.add_argument("--preset", default=None, help=_PRESET_HELP)
    pl.add_argument("--gpu-memory", default=None, metavar="SIZE", help="plan for a card with this much free memory "
                    "(e.g. 16GiB)")
    pl.add_argument("--device-name", default=None, metavar="CARD",
                    help="plan for a named card: T4, P100, V100, L4, A10G, RTX3090, RTX4090, A100-40, A100, H100, H200")
    pl.add_argument("--ranks", type=int, default=1, help="GPUs the step is spread over (torchrun)")
    pl.set_defaults(fn=cmd_plan)

    m = sub.add_parser("merge", help="merge a run's LoRA adapter into the base model for deployment")
    m.add_argument("run_dir")
    m.add_argument("out_dir")
    m.add_argument("--overwrite", action="store_true", help="write into OUT_DIR even if it holds files")
    m.set_defaults(fn=cmd_merge)
    return p


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=os.environ.get("MATHGRPO_LOG", "WARNING"), format="%(levelname)s %(name)s: %(message)s")
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # `train --preset demo a=1`: argparse has filled `items` before the option; what follows it belongs there too
    if extra and hasattr(args, "items") and not any(e.startswith("-") for e in extra):
        args.items += extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return args.fn(args)
    except (ConfigError, ValueError, FileNotFoundError) as e:
        # Our errors are ValueError subclasses with messages that name the key/file/function at fault.
        print(f"mathgrpo {args.command}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        if e.errno not in _FS_ERRORS:
            raise
        # a full disk, a read-only or forbidden folder: the path and the reason, not a traceback
        where = f"{e.filename}: " if e.filename else ""
        print(f"mathgrpo {args.command}: error: {where}{e.strerror}", file=sys.stderr)
        return 2


_FS_ERRORS = {errno.ENOSPC, errno.EACCES, errno.EPERM, errno.EROFS, errno.EDQUOT, errno.ENOTDIR, errno.EISDIR,
              errno.EEXIST}


if __name__ == "__main__":
    sys.exit(main())
