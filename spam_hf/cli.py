"""``spam-hf``: compress / prune / evaluate, parsed with ``HfArgumentParser`` from the library's dataclasses.

Bad input (sparsity outside (0, 1), unknown architecture, missing columns, ...) prints one line
``spam-hf: error: ...`` and exits with code 2, before anything is written.
"""

from __future__ import annotations

import os
import shlex
import sys
from typing import List, Optional

import yaml
from transformers import HfArgumentParser

SUBCOMMANDS = {
    "compress": "fine-tune with SpaM priors, prune with OPD, export (and push) a smaller model",
    "prune": "re-prune a finished compress run at another sparsity, without retraining",
    "evaluate": "metric, parameters, FLOPs and latency of a checkpoint",
}
USAGE = """usage: spam-hf {compress,prune,evaluate} [options]   (spam-hf SUBCOMMAND --help for options)

""" + "\n".join(f"  {k:<9} {v}" for k, v in SUBCOMMANDS.items()) + """

examples:
  spam-hf compress                                   # offline demo: packaged MiniLM, packaged SST-2 sample
  spam-hf compress bert-base-uncased --task sst2 --sparsity 0.9 --output-dir out/bert-sst2-90
  spam-hf compress ./my-model --train-file train.csv --text-column text --label-column label --sparsity 0.7
  spam-hf compress ./my-llama --train-file train.txt --validation-file valid.txt --sparsity 0.5   # perplexity
  spam-hf compress ./my-model --train-file train.tsv --lora-r 16 --sparsity 0.5      # prune LoRA ranks
  spam-hf compress --recipe recipes/minilm-sst2.yaml
  spam-hf prune out/run --sparsity 0.95
  spam-hf evaluate out/run/model --train-file train.tsv --validation-file dev.tsv
"""

DEMO_DEFAULTS = {  # the offline default job: small, real, < 10 minutes on 2 CPU cores
    "num_train_epochs": 3, "per_device_train_batch_size": 32, "per_device_eval_batch_size": 64,
    "learning_rate": 1e-4, "max_seq_length": 64, "sparsity": 0.5, "recovery_steps": 60,
    "marglik_frequency": 25, "marglik_burn_in": 25, "logging_steps": 20, "flops_seq_len": 64,
}


class CliError(Exception):
    pass


def _fail(msg: str) -> int:
    print(f"spam-hf: error: {msg}", file=sys.stderr)
    return 2


def _argv_with_recipe(argv: List[str]) -> List[str]:
    """Expand ``--recipe FILE`` into the YAML's ``--key value`` pairs (later CLI flags win)."""
    if "--recipe" not in argv:
        return argv
    i = argv.index("--recipe")
    if i + 1 >= len(argv):
        raise CliError("--recipe needs a YAML file")
    path = argv[i + 1]
    if not os.path.exists(path):
        raise CliError(f"recipe {path!r} does not exist")
    with open(path) as f:
        recipe = yaml.safe_load(f) or {}
    if not isinstance(recipe, dict):
        raise CliError(f"recipe {path!r} must be a mapping of option: value")
    expanded: List[str] = []
    model = recipe.pop("model_name_or_path", None) or recipe.pop("model", None)
    for k, v in recipe.items():
        if isinstance(v, bool):
            expanded += [f"--{k}", str(v)]
        elif isinstance(v, list):
            expanded += [f"--{k}", *map(str, v)]
        elif v is not None:
            expanded += [f"--{k}", str(v)]
    rest = argv[:i] + argv[i + 2:]
    if model and not (rest and not rest[0].startswith("-")):
        rest = [model] + rest
    pos = rest[:1] if rest and not rest[0].startswith("-") else []
    return pos + expanded + rest[len(pos):]


def _positional(argv: List[str], flag: str) -> List[str]:
    """``spam-hf compress MODEL ...`` → ``--flag MODEL ...``."""
    if argv and not argv[0].startswith("-"):
        return [flag, argv[0]] + argv[1:]
    return argv


def _rewrite_push(argv: List[str]) -> List[str]:
    """``--push-to-hub REPO`` (a repo name) means our push, not the Trainer's checkpoint pushing."""
    out, i = [], 0
    while i < len(argv):
        a = argv[i]
        if a in ("--push-to-hub", "--push_to_hub") and i + 1 < len(argv) and not argv[i + 1].startswith("-") \
                and argv[i + 1].lower() not in ("true", "false"):
            out += ["--push_to_hub_repo", argv[i + 1]]
            i += 2
            continue
        out.append(a)
        i += 1
    return out


def _has_flag(argv: List[str], name: str) -> bool:
    dashed = name.replace("_", "-")
    return any(a in (f"--{name}", f"--{dashed}") or a.startswith((f"--{name}=", f"--{dashed}=")) for a in argv)


def _parse(parser: HfArgumentParser, argv: List[str]):
    try:
        return parser.parse_args_into_dataclasses(args=argv)
    except SystemExit as e:
        if e.code not in (0, None):
            raise CliError("invalid arguments (see the message above)") from None
        raise


def cmd_compress(argv: List[str]) -> int:
    from .arguments import LoraArguments, SpamTrainingArguments
    from .data import DataArguments
    from .pipeline import CompressArguments, ModelArguments, compress

    command = "spam-hf compress " + " ".join(shlex.quote(a) for a in argv)
    argv = _rewrite_push(_positional(_argv_with_recipe(argv), "--model_name_or_path"))
    demo = not _has_flag(argv, "model_name_or_path") and not _has_flag(argv, "task") and not _has_flag(argv, "train_file")
    if demo:  # defaults of the offline demo, each overridable
        for k, v in DEMO_DEFAULTS.items():
            if not _has_flag(argv, k):
                argv += [f"--{k}", str(v)]
    for k, v in {"report_to": "none", "save_strategy": "epoch", "save_total_limit": "1", "logging_steps": "20"}.items():
        if not _has_flag(argv, k):
            argv += [f"--{k}", v]
    if not _has_flag(argv, "output_dir"):
        argv += ["--output_dir", os.path.join("runs", "spam-demo" if demo else "spam-run")]
    parser = HfArgumentParser((ModelArguments, DataArguments, CompressArguments, LoraArguments, SpamTrainingArguments),
                              prog="spam-hf compress", description=SUBCOMMANDS["compress"])
    model_args, data_args, args, lora_args, train_args = _parse(parser, argv)
    compress(model_args, data_args, args, train_args, command=command, lora_args=lora_args)
    return 0


def cmd_prune(argv: List[str]) -> int:
    from .arguments import PruneArguments
    from .pipeline import reprune

    command = "spam-hf prune " + " ".join(shlex.quote(a) for a in argv)
    argv = _positional(argv, "--run_dir")
    from dataclasses import dataclass, field

    @dataclass
    class RunArguments:
        run_dir: str = field(default=None, metadata={"help": "A finished `spam-hf compress` output directory."})
        output_dir: Optional[str] = field(default=None, metadata={"help": "Where to write (default RUN_DIR/pruned-S)."})
        overwrite_output_dir: bool = field(default=False, metadata={"help": "Allow a non-empty output directory."})

    parser = HfArgumentParser((RunArguments, PruneArguments), prog="spam-hf prune", description=SUBCOMMANDS["prune"])
    run, args = _parse(parser, argv)
    if not run.run_dir:
        raise CliError("spam-hf prune needs RUN_DIR")
    reprune(run.run_dir, args, output_dir=run.output_dir, command=command,
            overwrite_output_dir=run.overwrite_output_dir)
    return 0


def cmd_evaluate(argv: List[str]) -> int:
    from dataclasses import dataclass, field

    from .data import DataArguments
    from .pipeline import evaluate_checkpoint

    argv = _positional(argv, "--model_dir")

    @dataclass
    class EvalArguments:
        model_dir: str = field(default=None, metadata={"help": "Checkpoint directory."})
        seq_len: int = field(default=128, metadata={"help": "Sequence length for FLOPs and latency."})
        batch_size: int = field(default=32, metadata={"help": "Batch size for latency."})

    parser = HfArgumentParser((EvalArguments, DataArguments), prog="spam-hf evaluate", description=SUBCOMMANDS["evaluate"])
    ev, data_args = _parse(parser, argv)
    if not ev.model_dir:
        raise CliError("spam-hf evaluate needs MODEL_DIR")
    evaluate_checkpoint(ev.model_dir, data_args, seq_len=ev.seq_len, batch_size=ev.batch_size)
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0 if argv else 2
    sub, rest = argv[0], argv[1:]
    handlers = {"compress": cmd_compress, "prune": cmd_prune, "evaluate": cmd_evaluate}
    if sub not in handlers:
        return _fail(f"unknown command {sub!r}; choose from {', '.join(handlers)}")
    from .export.hub import PushError

    try:
        return handlers[sub](rest)
    except SystemExit as e:  # --help
        return int(e.code or 0)
    except (CliError, ValueError, FileNotFoundError, FloatingPointError, PushError, PermissionError) as e:
        return _fail(str(e).splitlines()[0] if str(e) else type(e).__name__)
    except KeyboardInterrupt:
        return _fail("interrupted; checkpoints written so far are kept in the output directory")


if __name__ == "__main__":
    sys.exit(main())
