"""LoRA on MiniLM / SST-2 at equal final adapter size: spam-hf rank pruning vs AdaLoRA vs plain LoRA.

* ``spam-hf``: LoRA at rank ``--r-start`` trained with SpamTrainer (a unit prior per rank), then OPD
  removes ranks until the adapter has the target size; measured without and with ``--recovery-steps``.
  ``--score-methods opd,fisher,...`` prunes copies of the same trained adapter with other scores.
* ``adalora``: peft's AdaLoRA from ``init_r = --r-start`` to ``target_r = --r-final`` (its budget is the
  same average rank), with ``update_and_allocate`` after every optimiser step; one run per learning
  rate in ``--adalora-lrs`` (its singular values start at zero, so it needs a larger rate or more
  steps than LoRA; every run is reported, the best is AdaLoRA's number).
* ``lora``: plain LoRA at rank ``--r-final`` (the target size from the start).

All adapt the same modules, train the same epochs with the same seed and learning rate, and train the
classifier head. Adapter size counts the LoRA weights of the ranks that are left (for AdaLoRA, ranks
with a non-zero singular value): ``Σ_ranks (in + out)``. Accuracy on the SST-2 dev set.

    python benchmarks/lora_sst2.py --train-file ../shared/data/sst2/train.tsv \\
        --dev-file ../shared/data/sst2/dev.tsv --max-train-samples 4000 --out benchmarks/results/lora_sst2_cpu.json
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))

import torch  # noqa: E402
from transformers import AutoTokenizer, DataCollatorWithPadding, Trainer, TrainerCallback, TrainingArguments  # noqa: E402

from spam_hf import SpamTrainer, SpamTrainingArguments  # noqa: E402
from spam_hf import apply, plan  # noqa: E402
from sst2_accuracy import accuracy, load_model, model_path, read_sst2  # noqa: E402


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="minilm")
    p.add_argument("--train-file", required=True)
    p.add_argument("--dev-file", required=True)
    p.add_argument("--max-train-samples", type=int, default=4000)
    p.add_argument("--max-seq-length", type=int, default=64)
    p.add_argument("--targets", default="query,key,value,attention.output.dense,intermediate.dense,output.dense")
    p.add_argument("--r-start", type=int, default=8)
    p.add_argument("--r-final", type=int, default=2)
    p.add_argument("--epochs", type=float, default=2.0)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--adalora-lrs", default="", help="comma-separated learning rates for AdaLoRA (default: --lr)")
    p.add_argument("--recovery-steps", default="40",
                   help="comma-separated cumulative recovery step counts; accuracy is measured at each")
    p.add_argument("--curvature", default="kfac", choices=["kfac", "diag"], help="spam-hf's curvature")
    p.add_argument("--score-methods", default="opd",
                   help="spam-hf: comma-separated group scores (opd, fisher, magnitude, random), each pruning a "
                        "copy of the same trained adapter; runs after the first are named spam-hf/<score>")
    p.add_argument("--marglik-frequency", type=int, default=25)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--methods", default="spam-hf,adalora,lora")
    p.add_argument("--out", required=True)
    p.add_argument("--work-dir", default=os.path.join("benchmarks", "_work", "lora"))
    return p.parse_args()


def adapter_size(model) -> int:
    """``Σ (in + out)`` over live ranks of every adapted module (AdaLoRA: non-zero ``lora_E`` entries)."""
    total = 0
    for name, mod in model.named_modules():
        a = getattr(mod, "lora_A", None)
        if a is None or not hasattr(a, "keys"):
            continue
        for key in a.keys():
            A = a[key].weight if hasattr(a[key], "weight") else a[key]
            B = mod.lora_B[key].weight if hasattr(mod.lora_B[key], "weight") else mod.lora_B[key]
            live = A.shape[0]
            if hasattr(mod, "lora_E"):
                live = int((mod.lora_E[key].detach().abs() > 0).sum())
            total += live * (A.shape[1] + B.shape[0])
    return total


class AdaLoraAllocate(TrainerCallback):
    """AdaLoRA's rank allocation after every optimiser step (gradients still present)."""

    def __init__(self, model):
        self.model = model

    def on_optimizer_step(self, args, state, control, **kw):
        self.model.base_model.update_and_allocate(state.global_step)


def main() -> None:
    a = parse()
    from peft import AdaLoraConfig, LoraConfig, get_peft_model

    path = model_path(a.model)
    tok = AutoTokenizer.from_pretrained(path)
    train = read_sst2(a.train_file, tok, a.max_seq_length, a.max_train_samples, a.seed)
    dev = read_sst2(a.dev_file, tok, a.max_seq_length)
    col = DataCollatorWithPadding(tok)
    targets = a.targets.split(",")
    steps = int(len(train) / a.batch_size * a.epochs + 0.999)
    result = {"date": datetime.date.today().isoformat(), "device": f"CPU, {torch.get_num_threads()} threads"
              if not torch.cuda.is_available() else torch.cuda.get_device_name(0),
              "command": "python " + " ".join(sys.argv), "args": vars(a), "train_rows": len(train), "runs": []}

    def save():
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
        with open(a.out, "w") as f:
            json.dump(result, f, indent=2)

    def targs(cls, out, **kw):
        d = dict(output_dir=os.path.join(a.work_dir, out), per_device_train_batch_size=a.batch_size,
                 num_train_epochs=a.epochs, learning_rate=a.lr, seed=a.seed, report_to=[], save_strategy="no",
                 logging_steps=50, disable_tqdm=True, warmup_steps=10, use_cpu=not torch.cuda.is_available())
        d.update(kw)
        return cls(**d)

    lora_size = None
    methods = []
    for method in a.methods.split(","):
        lrs = [float(x) for x in a.adalora_lrs.split(",") if x] if method == "adalora" else []
        methods += [(method, lr) for lr in lrs] or [(method, a.lr)]
    for method, lr in methods:
        torch.manual_seed(a.seed)
        base = load_model(path)
        t0 = time.time()
        run = {"method": method, "lr": lr}
        if method == "spam-hf":
            model = get_peft_model(base, LoraConfig(r=a.r_start, lora_alpha=2 * a.r_start, target_modules=targets,
                                                    lora_dropout=0.05, task_type="SEQ_CLS"))
            full = adapter_size(model)
            target = full * a.r_final / a.r_start
            trainer = SpamTrainer(model=model, data_collator=col, train_dataset=train,
                                  args=targs(SpamTrainingArguments, method, marglik_frequency=a.marglik_frequency,
                                             marglik_burn_in=a.marglik_frequency, curvature_every=2,
                                             curvature=a.curvature))
            trainer.train()
            before = accuracy(model, dev, col)
            for k, score in enumerate(a.score_methods.split(",")):
                if k:  # one run per scoring method, each on a copy of the trained adapter
                    result["runs"].append(run)
                    run = {"method": f"spam-hf/{score}", "lr": lr}
                p = plan(model, trainer.posterior, 1.0 - target / full, method=score, seed=a.seed)
                sel = p.selection
                pruned = apply(copy.deepcopy(model), p)
                run["accuracy_before_pruning"] = before
                run["accuracy"] = accuracy(pruned, dev, col)
                run["ranks_kept"] = [r.kept.get("ranks", 0) for r in sel.layers]
                done, run["recovery"] = 0, {}
                for total in [int(x) for x in a.recovery_steps.split(",") if int(x) > 0]:
                    rec = Trainer(model=pruned, data_collator=col, train_dataset=train,
                                  args=targs(TrainingArguments, method + "-rec", max_steps=total - done,
                                             learning_rate=a.lr / 2, seed=a.seed + done))
                    rec.train()
                    done = total
                    run["recovery"][str(total)] = run["accuracy_recovered"] = accuracy(pruned, dev, col)
                run["adapter_size"] = adapter_size(pruned)
            model = pruned
        elif method == "adalora":
            # AdaLoRA scales by alpha / init_r: 2·r_start gives the same scale 2 as the LoRA runs
            model = get_peft_model(base, AdaLoraConfig(init_r=a.r_start, target_r=a.r_final, lora_alpha=2 * a.r_start,
                                                       target_modules=targets, lora_dropout=0.05, tinit=steps // 10,
                                                       tfinal=steps // 5, deltaT=5, total_step=steps,
                                                       task_type="SEQ_CLS"))
            trainer = Trainer(model=model, data_collator=col, train_dataset=train,
                              args=targs(TrainingArguments, f"{method}-{lr:g}", learning_rate=lr),
                              callbacks=[AdaLoraAllocate(model)])
            trainer.train()
            run["accuracy"] = accuracy(model, dev, col)
        elif method == "lora":
            model = get_peft_model(base, LoraConfig(r=a.r_final, lora_alpha=2 * a.r_final, target_modules=targets,
                                                    lora_dropout=0.05, task_type="SEQ_CLS"))
            lora_size = adapter_size(model)
            Trainer(model=model, data_collator=col, train_dataset=train, args=targs(TrainingArguments, method)).train()
            run["accuracy"] = accuracy(model, dev, col)
        else:
            raise SystemExit(f"unknown method {method!r}")
        run["adapter_size"] = adapter_size(model)
        run["wall_s"] = time.time() - t0
        result["runs"].append(run)
        save()
        print(json.dumps(run), flush=True)
    result["lora_size_at_r_final"] = lora_size
    save()


if __name__ == "__main__":
    main()
