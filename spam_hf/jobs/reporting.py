"""Reporting: metric and cost snapshots, the printed table, the model card and the JSON report."""

from __future__ import annotations

import math
import os
from typing import Dict, List, Optional, Tuple

import torch
from transformers import Trainer

from ..architectures import is_peft_model
from ..arguments import DataArguments, FinishArguments
from ..costs import measure_latency, model_costs
from ..data import TASKS
from ..export.card import render_model_card
from ..pruning import PruningConfig, Selection, plot_selection
from .outputs import REPORT_FILE


def data_description(data_args: DataArguments) -> Tuple[str, str]:
    """``(training data, evaluation data)`` as a model card names them."""
    if data_args.uses_packaged_sample:
        return ("packaged SST-2 sample (2,000 GLUE train rows)", "GLUE SST-2 dev (872 rows)")
    if data_args.train_file:
        return (data_args.train_file, data_args.validation_file or "10% split of the training file")
    preset = TASKS[data_args.task]
    return ("/".join(preset.hub) + f" [{preset.train_split}]", "/".join(preset.hub) + f" [{preset.eval_split}]")


def fmt_int(x: float) -> str:
    return f"{x / 1e6:.2f}M" if x >= 1e6 else f"{int(x):,}"


def fmt_flops(x: float) -> str:
    return f"{x / 1e9:.2f} GFLOP"


def evaluate_metric(trainer: Trainer, dataset, metric: str) -> float:
    """``metric`` on ``dataset``; perplexity is ``exp`` of the mean token loss, evaluated with the loss alone (the
    Trainer would otherwise keep every block's logits, blocks × length × vocabulary floats)."""
    if metric != "perplexity":
        return float(trainer.evaluate(eval_dataset=dataset)[f"eval_{metric}"])
    loss_only = trainer.args.prediction_loss_only
    trainer.args.prediction_loss_only = True
    try:
        res = trainer.evaluate(eval_dataset=dataset)
    finally:
        trainer.args.prediction_loss_only = loss_only
    return float(math.exp(min(res["eval_loss"], 700.0)))


def snapshot(trainer: Trainer, dataset, metric: str, seq_len: int, latency_batch: int,
             measure: bool) -> Dict[str, float]:
    """Costs (params, FLOPs), the metric on ``dataset`` and, when ``measure``, the latency of ``trainer.model``."""
    model = trainer.model
    out = model_costs(model, seq_len)
    if measure:
        lat = measure_latency(model, batch_size=latency_batch, seq_len=seq_len, repeats=5, warmup=1)
        out["latency_s"] = lat["latency_s"]
        out["latency_threads"] = lat["threads"]
    out[metric] = evaluate_metric(trainer, dataset, metric)
    return out


def environment() -> str:
    """``spam-hf 0.1.0, transformers 5.25.0, torch 2.13.0+cpu, Python 3.11.7, CPU, 2 threads``: what a result was
    made with, for the model card."""
    import platform

    import transformers

    from .. import __version__

    return (f"spam-hf {__version__}, transformers {transformers.__version__}, torch {torch.__version__}, "
            f"Python {platform.python_version()}, {device_name()}")


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"CPU, {torch.get_num_threads()} threads"


def print_table(rows: List[Tuple[str, str, str]]) -> str:
    w0 = max(len(r[0]) for r in rows)
    w1 = max(len(r[1]) for r in rows)
    text = "\n".join(f"{r[0]:<{w0}}  {r[1]:>{w1}}  {r[2]}" for r in rows)
    print(text, flush=True)
    return text


def auto_class_name(model) -> str:
    name = type(model.get_base_model() if is_peft_model(model) else model).__name__
    return "AutoModelForCausalLM" if name.endswith(("ForCausalLM", "LMHeadModel")) else "AutoModelForSequenceClassification"


def write_report(report: dict, selection: Selection, model, config: PruningConfig, args: FinishArguments,
                 export_dir: str, kind: str, data_args: DataArguments, train_args, card_dir: Optional[str] = None,
                 repo: Optional[str] = None) -> dict:
    """Model card (``README.md`` in ``card_dir``, default ``export_dir``: the folder the export is being
    written to), selection plot and printed table (``config``: the resolved one the job pruned with); returns ``report`` with the table added. The caller
    writes ``pruning_report.json`` (:func:`report_path`) once the export is in place. ``repo``: the Hub
    repository the export is pushed to (the card's title and loading snippet name it), else the card names the
    export's absolute path, so its snippet works from any folder."""
    metric, dense, pruned = report["metric"], report["dense"], report["pruned"]
    run_dir = os.path.dirname(export_dir)
    plot_selection(selection, os.path.join(run_dir, "pruning.png"))
    train_desc, eval_desc = data_description(data_args)
    latency = report.get("latency")
    speed = latency["speedup"] if latency else None
    spread = (f"{speed:.2f}x faster; {latency['speedup_q25']:.2f}-{latency['speedup_q75']:.2f} over "
              f"{latency['repeats']} interleaved runs" + ("" if latency["trusted"] else ", spread too large to trust")
              if latency else "")
    card = render_model_card({
        "model_name": repo or f"{os.path.basename(report['base_model'].rstrip('/'))}, "
                              f"{selection.achieved:.0%} of its {'adapter' if kind == 'peft_adapter' else 'block'} "
                              "parameters removed",
        "base_model": report["base_model"], "params_before": fmt_int(dense["params"]),
        "params_after": fmt_int(pruned["params"]),
        "block_params_before": fmt_int(dense["block_params"]), "block_params_after": fmt_int(pruned["block_params"]),
        "flops_before": fmt_flops(dense["block_flops"]), "flops_after": fmt_flops(pruned["block_flops"]),
        "metric_name": metric, "metric_before": f"{dense[metric]:.4f}", "metric_after": f"{pruned[metric]:.4f}",
        "latency_before": f"{dense['latency_s'] * 1e3:.1f} ms" if "latency_s" in dense else None,
        "latency_after": (f"{pruned['latency_s'] * 1e3:.1f} ms ({spread})" if speed else None),
        "latency_batch": args.latency_batch_size, "latency_device": device_name(), "seq_len": config.flops_seq_len,
        "sparsity_achieved": f"{selection.achieved:.1%}", "sparsity_target": f"{config.sparsity:.0%}",
        "budget": config.budget, "dataset": train_desc, "eval_dataset": eval_desc,
        "prior": getattr(train_args, "prior", "n/a"), "curvature": getattr(train_args, "curvature", "n/a"),
        "method": config.method, "recovery": (f"{args.recovery_steps} steps" if args.recovery_steps else
                                             f"{args.recovery_epochs} epochs" if args.recovery_epochs else "none"),
        "date": report["date"], "command": report["command"] or "(Python API)", "environment": environment(),
        "repo_or_path": repo or os.path.abspath(export_dir),
        "trust_remote_code": kind == "remote_code", "peft_adapter": kind == "peft_adapter",
        "auto_class": auto_class_name(model),
        "pipeline_tag": "text-generation" if metric == "perplexity" else "text-classification",
        "layers": selection.to_dict()["layers"],
    })
    card.save(os.path.join(card_dir or export_dir, "README.md"))
    block = "adapter parameters" if kind == "peft_adapter" else "block parameters"
    before = pruned.get(f"{metric}_before_recovery")
    rows = [("", "dense", "pruned"),
            ("parameters", fmt_int(dense["params"]), fmt_int(pruned["params"])),
            (block, fmt_int(dense["block_params"]), fmt_int(pruned["block_params"])),
            (f"block FLOPs (T={config.flops_seq_len})", fmt_flops(dense["block_flops"]), fmt_flops(pruned["block_flops"])),
            (metric, f"{dense[metric]:.4f}", f"{pruned[metric]:.4f}"
             + (f" ({before:.4f} before recovery)" if before is not None else ""))]
    if speed:
        rows.append((f"latency (batch {args.latency_batch_size})", f"{dense['latency_s'] * 1e3:.1f} ms",
                     f"{pruned['latency_s'] * 1e3:.1f} ms  ({spread})"))
    print()
    report["table"] = print_table(rows)
    what = "LoRA adapter" if kind == "peft_adapter" else "prunable block"
    print(f"\nremoved {selection.achieved:.1%} of the {what} {config.budget}; exported to {export_dir} ({kind})")
    return report


def report_path(export_dir: str) -> str:
    return os.path.join(os.path.dirname(export_dir), REPORT_FILE)

