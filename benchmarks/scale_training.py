"""SpaM training at LLM width against a plain Trainer, and sparsified adapters against plain peft LoRA.

The model is a random-weight LLaMA-layout decoder with the widths of a published one (``--shape``, default
Llama-3.2-1B: hidden 2048, MLP 8192, 32 query / 8 KV heads, vocabulary 128256) and ``--layers`` blocks (default 4),
trained for ``--steps`` optimiser steps (default 8) on random token ids (memory and time do not depend on the text)
in batches of ``--batch-size`` × ``--seq-len`` (default 2 × 256), in fp32, on the same data with the same seed:

* ``plain``: ``transformers.Trainer`` (AdamW, weight decay 0.01);
* ``kfac`` / ``diag``: ``SpamTrainer`` with unit priors, one prior update after ``--burn-in`` steps (default 2;
  ``marglik_frequency`` longer than the run, so there is no other), the other settings at their defaults
  (curvature on every 4th step, at most 1024 token rows per batch, wide factors of 4096 or more as diagonals);
* ``lora-plain``: ``Trainer`` on a peft LoRA model, ``r = --lora-r`` (16) on every Linear of the blocks;
* ``lora-spam``: ``SpamTrainer`` on the same LoRA model: rank priors, the same single prior update.

Each runs in its own subprocess, so its peak resident memory (``ru_maxrss``) is its own; the ratios are against
the plain run of the same kind in the same invocation (same machine, same load).

    python benchmarks/scale_training.py --out benchmarks/results/scale_training_llama1b_4l_cpu.json
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import resource
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from scale import SHAPES, llama_config  # noqa: E402  (benchmarks/ is the script's folder)
from workers import report, run_workers, write_and_show_ratios  # noqa: E402

CONFIGS = ("plain", "kfac", "diag", "lora-plain", "lora-spam")
BASELINE = {"kfac": "plain", "diag": "plain", "lora-spam": "lora-plain"}


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="llama-3.2-1b", choices=sorted(SHAPES))
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--burn-in", type=int, default=2, help="optimiser steps before the one prior update")
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated subset of " + ", ".join(CONFIGS))
    p.add_argument("--extra", default="", help="more SpamTrainingArguments as key=value, comma-separated "
                                               "(e.g. kfac_diagonal_from=0)")
    p.add_argument("--out", default=None, help="JSON results (printed either way)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return p.parse_args()


def _extra(a) -> dict:
    out = {}
    for item in filter(None, a.extra.split(",")):
        k, v = item.split("=", 1)
        out[k] = int(v) if v.lstrip("-").isdigit() else v
    return out


def worker(a) -> dict:
    import torch
    from torch.utils.data import Dataset
    from transformers import LlamaForCausalLM, Trainer, TrainingArguments

    from spam_hf import SpamTrainer, SpamTrainingArguments

    torch.manual_seed(0)
    config = llama_config(a.shape, a.layers, a.seq_len)
    vocab = config.vocab_size
    model = LlamaForCausalLM(config)
    lora = a.worker.startswith("lora")
    if lora:
        from peft import LoraConfig, get_peft_model

        targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
        model = get_peft_model(model, LoraConfig(r=a.lora_r, lora_alpha=2 * a.lora_r, lora_dropout=0.0,
                                                 target_modules=targets, task_type="CAUSAL_LM"))
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (a.steps * a.batch_size, a.seq_len), generator=g)

    class Tokens(Dataset):
        def __len__(self):
            return ids.shape[0]

        def __getitem__(self, i):
            return {"input_ids": ids[i], "attention_mask": torch.ones_like(ids[i]), "labels": ids[i].clone()}

    common = dict(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=a.batch_size, max_steps=a.steps,
                  learning_rate=1e-4, report_to=[], save_strategy="no", disable_tqdm=True, seed=0,
                  logging_steps=10**6, dataloader_pin_memory=False)
    if a.worker.endswith("plain"):
        trainer = Trainer(model=model, args=TrainingArguments(weight_decay=0.01, **common), train_dataset=Tokens())
    else:
        curvature = "diag" if a.worker == "diag" else "kfac"
        args = SpamTrainingArguments(curvature=curvature, marglik_burn_in=a.burn_in, marglik_frequency=10 * a.steps,
                                     **common, **_extra(a))
        trainer = SpamTrainer(model=model, args=args, train_dataset=Tokens())
    rss_model = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - t0
    out = {"config": a.worker, "wall_s": round(wall, 1),
           "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3),
           "rss_after_model_gib": round(rss_model / 1024, 3),
           "weights_gib": round(sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30, 3),
           "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad)}
    if not a.worker.endswith("plain"):
        out["timings_s"] = {k: round(v, 1) for k, v in trainer.timings.items()}
        out["prior_updates"] = len(trainer.marglik_history)
        out["curvature_every"] = trainer.args.curvature_every
        out["kfac_diagonal_from"] = trainer.args.kfac_diagonal_from
    return out


def main() -> None:
    a = parse()
    if a.worker:
        report(worker(a))
        return
    configs = [c for c in a.configs.split(",") if c]
    unknown = [c for c in configs if c not in CONFIGS]
    if unknown:
        raise SystemExit(f"unknown config(s) {unknown}; choose from {', '.join(CONFIGS)}")
    res = {"date": datetime.date.today().isoformat(), "command": "python " + " ".join(sys.argv),
           "machine": f"{platform.machine()} CPU, {os.cpu_count()} cores", "args": vars(a), "runs": {}}
    res["runs"] = run_workers(__file__, configs, sys.argv[1:])
    for cfg, base in BASELINE.items():
        if cfg in res["runs"] and base in res["runs"]:
            r, b = res["runs"][cfg], res["runs"][base]
            r["time_ratio"] = round(r["wall_s"] / b["wall_s"], 3)
            r["peak_ratio"] = round(r["peak_rss_gib"] / b["peak_rss_gib"], 3)
    write_and_show_ratios(res, a.out)


if __name__ == "__main__":
    main()
