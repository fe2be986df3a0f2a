"""``spam-hf``: compress / prune / evaluate, parsed with ``HfArgumentParser`` from the library's dataclasses.

Bad input (sparsity outside (0, 1), unknown architecture, missing columns, ...) prints one line
``spam-hf: error: ...`` and exits with code 2, before anything is written. Any other failure is one line too,
with its exception type; ``--debug`` (or ``SPAM_HF_DEBUG=1``) prints the traceback above it.
"""

from __future__ import annotations

import dataclasses
import os
import shlex
import signal
import sys
import threading
import traceback
from typing import TYPE_CHECKING, Dict, List, Optional, Tuple

from . import arguments as A

if TYPE_CHECKING:
    from transformers import HfArgumentParser

SUBCOMMANDS = {
    "compress": "fine-tune with SpaM priors, remove the heads and neurons that do the least damage, export (and "
                "push) the smaller model",
    "prune": "re-prune a finished compress run at another sparsity, without retraining",
    "evaluate": "metric, parameters, FLOPs and latency of a checkpoint",
    "export": "convert a checkpoint (pruned or stock) to ONNX, checked against PyTorch in ONNX Runtime",
}
USAGE = """usage: spam-hf {compress,prune,evaluate,export} [options]   (spam-hf COMMAND --help for its options)

""" + "\n".join(f"  {k:<9} {v}" for k, v in SUBCOMMANDS.items()) + """

examples:
  spam-hf compress                                   # offline demo: packaged MiniLM, packaged SST-2 sample
  spam-hf compress bert-base-uncased --task sst2 --sparsity 0.9 --output-dir out/bert-sst2-90
  spam-hf compress ./my-model --train-file train.csv --text-column text --label-column label --sparsity 0.7
  spam-hf compress ./my-llama --train-file train.txt --validation-file valid.txt --sparsity 0.5   # perplexity
  spam-hf compress ./my-model --train-file train.tsv --lora-r 16 --sparsity 0.5      # prune LoRA ranks
  spam-hf compress --recipe recipes/minilm-sst2.yaml
  spam-hf compress ./my-llama --train-file wiki.txt --training none --sparsity 0.3 --dry-run True   # will it fit?
  spam-hf prune out/run --sparsity 0.95
  spam-hf evaluate out/run/model --train-file train.tsv --validation-file dev.tsv
  spam-hf export out/run/model --format onnx --output-dir out/run/onnx

--debug (any command) prints the traceback behind a one-line error.
"""

DEMO_DEFAULTS = {  # the offline default job: small, real, < 10 minutes on 2 CPU cores, no training checkpoint left
    "num_train_epochs": 3, "per_device_train_batch_size": 32, "per_device_eval_batch_size": 64, "save_strategy": "no",
    "learning_rate": 1e-4, "max_seq_length": 64, "sparsity": 0.5, "recovery_steps": 60,
    "marglik_frequency": 25, "marglik_burn_in": 25, "logging_steps": 20, "flops_seq_len": 64,
}


class CliError(Exception):
    pass


def _fail(msg: str) -> int:
    print(f"spam-hf: error: {msg}", file=sys.stderr)
    return 2


def _load_recipe(path: str, parser: "HfArgumentParser") -> Dict[str, object]:
    """The YAML recipe at ``path`` as parser defaults ``{dest: value}`` (typed by YAML; flags still win).

    Keys are the options' names (``learning_rate`` or ``learning-rate``; ``model`` for the model);
    unknown keys are an error that lists the valid ones.
    """
    import yaml

    if not os.path.isfile(path):
        raise CliError(f"recipe {path!r} is not a file")
    try:
        with open(path) as f:
            recipe = yaml.safe_load(f) or {}
    except yaml.YAMLError as e:
        raise CliError(f"recipe {path!r} is not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(recipe, dict):
        raise CliError(f"recipe {path!r} must be a mapping of option: value")
    dests = {a.dest for a in parser._actions if a.dest != "help"}
    out: Dict[str, object] = {}
    for key, value in recipe.items():
        dest = "model_name_or_path" if key == "model" else str(key).replace("-", "_")
        if dest not in dests:
            raise CliError(f"recipe {path!r}: unknown option {key!r}; valid options: {', '.join(sorted(dests))}")
        out[dest] = value
    return out


def _pop_recipe(argv: List[str]) -> Tuple[List[str], Optional[str]]:
    """``argv`` without ``--recipe FILE``, and ``FILE``."""
    if "--recipe" not in argv:
        return argv, None
    i = argv.index("--recipe")
    if i + 1 >= len(argv):
        raise CliError("--recipe needs a YAML file")
    return argv[:i] + argv[i + 2:], argv[i + 1]


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


def _parse(parser: "HfArgumentParser", argv: List[str]):
    """The parser's dataclasses; an argparse error (unknown flag, a value outside its choices) is one line."""
    def error(message: str):
        raise CliError(f"{message} (spam-hf {parser.prog.split()[-1]} --help lists the options)")

    parser.error = error  # argparse would print the whole usage, then exit
    return parser.parse_args_into_dataclasses(args=argv)


Sections = List[Tuple[str, type]]


def compress_sections(full: bool = False) -> Sections:
    """``(title, dataclass)`` of every option group of ``compress``, in the order ``--help`` shows them. ``full``: the
    SpaM training group is ``SpamTrainingArguments`` (with every ``TrainingArguments`` option; imports
    transformers), else only the SpaM knobs (:class:`~spam_hf.arguments.SpamArguments`)."""
    from .pruning.config import PruningConfig  # torch-free, like the argument dataclasses

    if full:
        from .training_arguments import SpamTrainingArguments as training
    else:
        training = A.SpamArguments
    return [("model", A.ModelArguments), ("data", A.DataArguments), ("pruning", PruningConfig),
            ("recovery", A.RecoveryArguments), ("latency", A.LatencyArguments), ("the job", A.CompressJobArguments),
            ("LoRA", A.LoraArguments), ("SpaM training", training)]


def prune_sections() -> Sections:
    from .pruning.config import PruningConfig

    return [("run", A.RunArguments), ("pruning", PruningConfig), ("recovery", A.RecoveryArguments),
            ("latency", A.LatencyArguments)]


def evaluate_sections() -> Sections:
    return [("checkpoint", A.EvalArguments), ("data", A.DataArguments)]


def export_sections() -> Sections:
    return [("export", A.ExportArguments)]


def command_sections(full: bool = False) -> List[Tuple[str, Sections]]:
    """``(command, its option sections)`` of every command, in the order the usage lists them (``full``: as
    :func:`compress_sections`)."""
    return [("compress", compress_sections(full)), ("prune", prune_sections()), ("evaluate", evaluate_sections()),
            ("export", export_sections())]


COMMON = ("model_name_or_path", "task", "train_file", "validation_file", "text_column", "label_column", "sparsity",
          "recovery_steps", "lora_r", "training", "dry_run", "push_to_hub_repo", "overwrite_output_dir")
"""``compress --help`` shows these first."""
TRAINER_COMMON = (("--output-dir DIR", "Where the run is written (default runs/spam-run; the demo: runs/spam-demo)."),
                  ("--num-train-epochs N", "Training epochs (transformers' TrainingArguments)."),
                  ("--per-device-train-batch-size N", "Training batch size per device."),
                  ("--learning-rate LR", "Peak learning rate of the fine-tune."),
                  ("--seed N", "Random seed of the run."),
                  ("--resume-from-checkpoint DIR|last", "Continue an interrupted run."))
"""The ``TrainingArguments`` options ``compress --help`` names without importing transformers."""


def _metavar(f: dataclasses.Field) -> str:
    if f.metadata.get("choices"):
        return "{" + ",".join(str(c) for c in f.metadata["choices"]) + "}"
    kind = str(f.type).replace("Optional[", "").rstrip("]")
    return {"float": "FLOAT", "int": "INT", "bool": "{True,False}"}.get(kind, "TEXT")


def help_text(f: dataclasses.Field) -> str:
    """A field's help as one line of plain text (argparse's ``%%`` undone); ``--help`` and the docs' CLI reference
    show it."""
    return " ".join(str(f.metadata.get("help", "")).split()).replace("%%", "%")


def _option_line(f: dataclasses.Field) -> Tuple[str, str]:
    name = "--push-to-hub REPO" if f.name == "push_to_hub_repo" else \
        ("[MODEL] / --model" if f.name == "model_name_or_path" else f"--{f.name.replace('_', '-')} {_metavar(f)}")
    text = help_text(f)
    if f.default not in (dataclasses.MISSING, None):
        text += f" (default: {f.default})"
    return name, text


def _wrap(rows: List[Tuple[str, str]], width: int = 100) -> str:
    import textwrap

    out = []
    for name, text in rows:
        lines = textwrap.wrap(text, width - 8) or [""]
        out.append(f"  {name}")
        out += [f"        {line}" for line in lines]
    return "\n".join(out)


def sectioned_help(prog: str, usage: str, description: str, sections: Sections, first: Tuple[str, ...] = (),
                   trainer: bool = False) -> str:
    """The ``--help`` text of a command from its argument dataclasses: ``first`` options on top, then each section;
    built without transformers, so it prints at once."""
    fields = {f.name: f for _, dtype in sections for f in dataclasses.fields(dtype)}
    parts = [f"usage: {usage}", "", description, ""]
    if first:
        rows = [_option_line(fields[n]) for n in first]
        parts += ["common options:", _wrap(rows + (list(TRAINER_COMMON) if trainer else [])), ""]
    for title, dtype in sections:
        own = [f for f in dataclasses.fields(dtype) if f.name not in first]
        if own:
            parts += [f"{title} options:", _wrap([_option_line(f) for f in own]), ""]
    if trainer:
        parts += ["Every transformers TrainingArguments option works too (--bf16, --gradient-accumulation-steps, "
                  "--eval-strategy, ...);", f"{prog} --help-all lists them. Options may be written with - or _.", ""]
    parts.append("--debug prints the traceback behind a one-line error.")
    return "\n".join(parts)


def _wants_help(argv: List[str]) -> bool:
    return any(a in ("-h", "--help") for a in argv)


def compress_parser() -> "HfArgumentParser":
    from transformers import HfArgumentParser

    from .pruning.config import PruningConfig
    from .training_arguments import SpamTrainingArguments

    return HfArgumentParser((A.ModelArguments, A.DataArguments, PruningConfig, A.CompressArguments, A.LoraArguments,
                             SpamTrainingArguments), prog="spam-hf compress", description=SUBCOMMANDS["compress"])


def parse_compress(argv: List[str]):
    """``(model, data, pruning, compress, lora, training)`` arguments of ``spam-hf compress ARGV``: the pruning
    options are a :class:`~spam_hf.pruning.PruningConfig`, the job's other own options :class:`CompressArguments
    <spam_hf.arguments.CompressArguments>`.

    Precedence, lowest first: the library defaults, the offline demo's defaults (when neither a model,
    a task nor a train file is given anywhere), the recipe (``--recipe FILE``), the command line.
    """
    from .jobs.loading import pin_memory

    argv, recipe_path = _pop_recipe(argv)
    argv = _rewrite_push(_positional(argv, "--model_name_or_path"))
    parser = compress_parser()
    recipe = _load_recipe(recipe_path, parser) if recipe_path else {}
    demo = not any(_has_flag(argv, k) or recipe.get(k) for k in ("model_name_or_path", "task", "train_file"))
    defaults: Dict[str, object] = {"report_to": "none", "save_strategy": "epoch", "save_total_limit": 1,
                                   "logging_steps": 20, "dataloader_pin_memory": pin_memory(),
                                   "output_dir": os.path.join("runs", "spam-demo" if demo else "spam-run")}
    if demo:  # the offline demo's defaults, each overridable
        defaults.update(DEMO_DEFAULTS)
    parser.set_defaults(**{**defaults, **recipe})
    return _parse(parser, argv)


def cmd_compress(argv: List[str]) -> int:
    if "--help-all" in argv:
        compress_parser().print_help()
        return 0
    if _wants_help(argv):
        print(sectioned_help("spam-hf compress", "spam-hf compress [MODEL] [options]", SUBCOMMANDS["compress"],
                             compress_sections(), first=COMMON, trainer=True))
        return 0
    from .jobs import compress

    command = "spam-hf compress " + " ".join(shlex.quote(a) for a in argv)
    model_args, data_args, config, args, lora_args, train_args = parse_compress(argv)
    if args.dry_run:
        from .jobs.dry_run import dry_run

        dry_run(model_args, data_args, config, args, train_args, lora_args)
        return 0
    compress(model_args, data_args, config, args, train_args, command=command, lora_args=lora_args)
    return 0


def cmd_prune(argv: List[str]) -> int:
    if _wants_help(argv):
        print(sectioned_help("spam-hf prune", "spam-hf prune RUN_DIR --sparsity S [options]", SUBCOMMANDS["prune"],
                             prune_sections()))
        return 0
    from transformers import HfArgumentParser

    from .jobs import reprune
    from .pruning.config import PruningConfig

    command = "spam-hf prune " + " ".join(shlex.quote(a) for a in argv)
    parser = HfArgumentParser((A.RunArguments, PruningConfig, A.FinishArguments), prog="spam-hf prune",
                              description=SUBCOMMANDS["prune"])
    run, config, args = _parse(parser, _positional(argv, "--run_dir"))
    if not run.run_dir:
        raise CliError("spam-hf prune needs RUN_DIR")
    reprune(run.run_dir, config, args, output_dir=run.output_dir, command=command,
            overwrite_output_dir=run.overwrite_output_dir)
    return 0


def cmd_evaluate(argv: List[str]) -> int:
    if _wants_help(argv):
        print(sectioned_help("spam-hf evaluate", "spam-hf evaluate MODEL_DIR [options]", SUBCOMMANDS["evaluate"],
                             evaluate_sections()))
        return 0
    from transformers import HfArgumentParser

    from .jobs import evaluate_checkpoint

    parser = HfArgumentParser((A.EvalArguments, A.DataArguments), prog="spam-hf evaluate",
                              description=SUBCOMMANDS["evaluate"])
    ev, data_args = _parse(parser, _positional(argv, "--model_dir"))
    if not ev.model_dir:
        raise CliError("spam-hf evaluate needs MODEL_DIR")
    evaluate_checkpoint(ev.model_dir, data_args, seq_len=ev.seq_len, batch_size=ev.batch_size)
    return 0


def cmd_export(argv: List[str]) -> int:
    if _wants_help(argv):
        print(sectioned_help("spam-hf export", "spam-hf export MODEL_DIR --format onnx [--output-dir DIR] [options]",
                             SUBCOMMANDS["export"], export_sections()))
        return 0
    from transformers import HfArgumentParser

    from .export.onnx import export_onnx

    parser = HfArgumentParser((A.ExportArguments,), prog="spam-hf export", description=SUBCOMMANDS["export"])
    (ex,) = _parse(parser, _positional(argv, "--model_dir"))
    if not ex.model_dir:
        raise CliError("spam-hf export needs MODEL_DIR")
    out = ex.output_dir or ex.model_dir.rstrip("/\\") + "-onnx"
    result = export_onnx(ex.model_dir, out, opset=ex.opset, atol=ex.atol, overwrite=ex.overwrite_output_dir)
    print(f"wrote {result.path} ({', '.join(result.inputs)} -> {result.output}; ONNX Runtime matches PyTorch to "
          f"{result.max_abs_diff:.1e})")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # --debug (or SPAM_HF_DEBUG=1): the full traceback above the one-line error
    debug = "--debug" in argv or os.environ.get("SPAM_HF_DEBUG", "").strip() not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0 if argv else 2
    sub, rest = argv[0], argv[1:]
    handlers = {"compress": cmd_compress, "prune": cmd_prune, "evaluate": cmd_evaluate, "export": cmd_export}
    if sub not in handlers:
        return _fail(f"unknown command {sub!r}; choose from {', '.join(handlers)}")
    if _wants_help(rest) or "--help-all" in rest:  # before anything imports torch: help prints at once
        return handlers[sub](rest)
    _show_progress_lines()
    from safetensors import SafetensorError

    from .distributed import shutdown
    from .export.hub import PushError

    finished = False
    previous = _interrupt_on_sigterm()
    try:
        code = handlers[sub](rest)
        finished = True
        return code
    except SystemExit as e:  # --help
        return int(e.code or 0)
    except (CliError, ValueError, OSError, FloatingPointError, PushError, SafetensorError) as e:
        # OSError: unreadable / corrupt files (transformers reports a bad config.json as one);
        # SafetensorError: a truncated weights, prior or curvature file
        if debug:
            traceback.print_exc()
        return _fail(str(e).splitlines()[0] if str(e) else type(e).__name__)
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM
        return _fail("interrupted; finished checkpoints are kept in the output directory, an unfinished export or "
                     "checkpoint is removed")
    except Exception as e:  # anything else (a truncated optimizer.pt makes torch raise RuntimeError): one line too
        if debug:
            traceback.print_exc()
        first = (str(e).splitlines() or [""])[0]
        return _fail(f"{type(e).__name__}: {first} (run with --debug for the traceback)")
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        # torchrun / accelerate launch: every process waits for the main one to finish writing, then leaves the
        # process group (exiting with it alive can abort a process under Gloo)
        shutdown(wait=finished)


def _show_progress_lines() -> None:
    """The jobs' stage lines (``logger.info`` of ``spam_hf``: rounds, recovery, export) on stderr, one plain line
    each; the ``kernels`` package's offline trust-check notices (about attention kernels no job uses) off."""
    import logging

    class Stderr(logging.StreamHandler):  # whatever sys.stderr is when a line is written (tests swap it)
        stream = property(lambda self: sys.stderr, lambda self, value: None)

    log = logging.getLogger("spam_hf")
    if not any(getattr(h, "_spam_hf", False) for h in log.handlers):
        handler = Stderr()
        handler.setFormatter(logging.Formatter("%(message)s"))
        handler._spam_hf = True  # type: ignore[attr-defined]
        log.addHandler(handler)
    log.setLevel(logging.INFO)
    logging.getLogger("kernels").setLevel(logging.ERROR)


def _interrupt_on_sigterm():
    """SIGTERM (a scheduler's stop, `kill`) ends the job as Ctrl-C does, through the same clean-ups (a staged export
    or checkpoint is removed, a half-created Hub repo deleted); returns the handler it replaced (``None`` off the
    main thread, where signals cannot be handled)."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    return signal.signal(signal.SIGTERM, interrupt)


if __name__ == "__main__":
    sys.exit(main())
