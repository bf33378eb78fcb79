"""Command line: ``entropy-ops train [--algo A] [--config FILE] [--key=value ...]``.

Also ``entropy-ops compare`` (several algorithms side by side, ``compare.py``)
and ``entropy-ops generate`` (sampling, with ``--em-inf``, ``generate.py``).

Precedence: the dataclass defaults, then the YAML file, then ``--key=value``
overrides (any ``TrainConfig`` field; ``--loss.eps_high=0.28`` sets one entry of
a mapping), then the named flags. With ``--resume`` the run folder's saved
``config.yaml`` takes the place of the defaults, so only what the command line
sets changes (``run_folder.RESUME_REFUSED`` lists what it may not change). With no arguments, ``entropy-ops train`` runs
GRPO on the embedded tiny model and arithmetic task.

Before any model loads, the run folder and the models are checked
(``preflight.check_before_loading``): a folder that already holds a run is
refused unless ``--resume`` continues it or ``--overwrite`` moves it aside, and
every such error is one line naming the argument. After Ctrl-C the command that
continues the run is printed.
"""
from __future__ import annotations

import argparse
import shlex
import sys

from .config import TrainConfig


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="entropy-ops", description="Entropy-aware RL fine-tuning of causal LMs.")
    sub = parser.add_subparsers(dest="command")
    train = sub.add_parser(
        "train", help="train a model with GRPO or another algorithm",
        description="Train with GRPO-family RL. Any config field can be set with --key=value "
                    "(see --print-config); values are parsed as YAML.",
    )
    train.add_argument("--config", help="YAML file of config fields")
    from .algorithms import ALGORITHMS

    train.add_argument("--algo", help=f"algorithm, one of: {', '.join(ALGORITHMS)} (default: grpo)")
    train.add_argument("--model", help="Hugging Face model name or local path (default: the embedded tiny-arith)")
    train.add_argument("--output-dir", help="run directory (default: runs/<algo>-<date>-<time>)")
    train.add_argument("--max-steps", type=int, help="training steps")
    train.add_argument("--seed", type=int, help="random seed")
    train.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --output-dir")
    train.add_argument("--overwrite", action="store_true",
                       help="start afresh in an --output-dir that holds a run: the old run is moved into "
                            "OUTPUT_DIR/previous-<time>/ (nothing is deleted)")
    train.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    # These two parse their own arguments (entropy-ops compare --help, entropy-ops generate --help).
    sub.add_parser("compare", add_help=False, help="train several algorithms side by side; plot and tabulate")
    sub.add_parser("generate", add_help=False, help="sample completions, optionally with EM-INF (--em-inf)")
    return parser


def split_overrides(extra: list[str]) -> list[str]:
    """``["--a=1", "--b", "2"]`` -> ``["a=1", "b=2"]``; anything else is an error."""
    out, i = [], 0
    while i < len(extra):
        item = extra[i]
        if not item.startswith("--") or len(item) == 2:
            raise ValueError(f"unexpected argument {item!r}: overrides look like --key=value")
        if "=" in item:
            out.append(item[2:])
            i += 1
        elif i + 1 < len(extra) and not extra[i + 1].startswith("--"):
            out.append(f"{item[2:]}={extra[i + 1]}")
            i += 2
        else:
            raise ValueError(f"override {item!r} has no value: use {item}=VALUE")
    return out


def _apply_command_line(config: TrainConfig, args: argparse.Namespace, overrides: list[str],
                        file_values: dict) -> TrainConfig:
    for key, value in file_values.items():
        config.set(key, value)
    config.apply_overrides(overrides)
    for key in ("algo", "model", "output_dir", "max_steps", "seed"):
        if getattr(args, key) is not None:
            config.set(key, getattr(args, key))
    return config


def resolve_config(args: argparse.Namespace, extra: list[str]) -> TrainConfig:
    """The config of ``args``; with ``--resume``, the run folder's saved config.yaml plus what the command line sets."""
    overrides = split_overrides(extra)
    file_values = {}
    if args.config:
        import yaml

        TrainConfig.from_yaml(args.config)  # errors name the file
        with open(args.config, encoding="utf-8") as f:
            file_values = yaml.safe_load(f) or {}
    config = _apply_command_line(TrainConfig(), args, overrides, file_values)
    if args.resume and config.output_dir is not None:
        from .run_folder import CONFIG_FILE, read_saved_config

        saved = read_saved_config(config.output_dir)
        if saved is not None:  # continue the run as it was set up; the run-folder checks judge the changes
            try:
                base = TrainConfig.from_dict(saved)
            except (ValueError, TypeError) as e:
                raise type(e)(f"{config.output_dir}/{CONFIG_FILE}: {e}") from None
            base.resume = base.overwrite = False  # this command's flags, not the first one's
            config = _apply_command_line(base, args, overrides, file_values)
    if args.resume:
        config.resume = True
    if args.overwrite:
        config.overwrite = True
    return config.validate()


def resume_command(argv: list[str], output_dir: str) -> str:
    """The ``entropy-ops train`` command line that continues the run: ``argv`` with ``--output-dir D --resume``."""
    out, i = [], 0
    drop_with_value = ("--output-dir", "--output_dir")
    while i < len(argv):
        item = argv[i]
        name = item.split("=", 1)[0]
        if name in drop_with_value:
            i += 1 if "=" in item else 2
            continue
        if name in ("--resume", "--overwrite"):
            i += 1
            continue
        out.append(item)
        i += 1
    return shlex.join(["entropy-ops", *out, "--output-dir", output_dir, "--resume"])


def config_yaml(config: TrainConfig) -> str:
    """The config as YAML, each field preceded by its documentation."""
    import yaml

    lines = []
    for key, help_text in TrainConfig.fields_help().items():
        lines.append(f"# {help_text}")
        lines.append(yaml.safe_dump({key: getattr(config, key)}, default_flow_style=True, sort_keys=False).strip()
                     .removeprefix("{").removesuffix("}"))
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in ("compare", "generate"):
        if argv[0] == "compare":
            from .compare import main as compare_main

            return compare_main(argv[1:])
        from .generate import main as generate_main

        return generate_main(argv[1:])
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        config = resolve_config(args, extra)
        if args.print_config:
            sys.stdout.write(config_yaml(config))
            return 0
        from .preflight import check_before_loading
        from .run_folder import default_output_dir

        if config.output_dir is None:  # fixed now, so that the resume command can name it
            config.output_dir = default_output_dir(config.algo)
        check_before_loading(config)
    except (ValueError, TypeError) as e:  # a message naming the argument, not a traceback
        parser.exit(2, f"entropy-ops train: error: {e}\n")
    from transformers.utils import logging as hf_logging

    from .distributed import shutdown
    from .logging_utils import format_eval
    from .grpo_trainer import Trainer

    hf_logging.disable_progress_bar()  # weight-loading bars would interleave with the training bar
    trainer = Trainer(config)
    finished = False
    try:
        summary = trainer.train()
        finished = True
    finally:
        shutdown(trainer.dist, wait=finished)
    if not trainer.dist.is_main:  # under torchrun, rank 0 reports
        return 130 if summary["interrupted"] else 0
    for name in ("first_eval", "last_eval"):
        ev = summary.get(name)
        label = "before" if name == "first_eval" else "after"
        if name == "last_eval" and ev is not None and ev["step"] != summary["steps"]:
            print(f"held-out {label}: not evaluated at step {summary['steps']} (the last evaluation ran at "
                  f"step {ev['step']})")
        elif ev:
            print(f"held-out {label} (step {ev['step']}): {format_eval(ev)}")
    if "world_size" in summary and trainer.fsdp is not None:
        print(f"fully sharded (FSDP2): {summary['world_size']} processes, each holding 1/{summary['world_size']} "
              "of the parameters, gradients and optimizer state")
    elif "world_size" in summary:
        print(f"data parallel: {summary['world_size']} processes, replicas identical: "
              f"{summary['replica_max_abs_diff'] == 0.0} (max |difference| {summary['replica_max_abs_diff']:.3g})")
    print(f"run directory: {summary['output_dir']}  ({summary['steps']} steps, {summary['wall_s']} s)")
    if summary["interrupted"]:
        print(f"stopped at step {summary['steps']}; continue with: {resume_command(argv, summary['output_dir'])}")
    return 130 if summary["interrupted"] else 0
