"""LoRA on MiniLM / SST-2 at equal final adapter size: spam-hf rank pruning vs AdaLoRA vs plain LoRA.

Methods (``--methods``, comma-separated):

* ``spam-hf``: LoRA at rank ``--r-start`` trained with SpamTrainer (a unit prior per rank), then the ranks are
  pruned until the adapter has the size of rank ``--r-final`` and ``--recovery-steps`` of plain training follow.
  ``--score-methods opd,fisher,damage,damage-exact,...`` prunes copies of the same trained adapter with other
  scores (runs after the first are named ``spam-hf/<score>``); ``--rounds K`` and ``--compensate`` prune in K
  rounds on 8 calibration batches, refitting the remaining columns of ``lora_B`` (``spam_hf.prune_in_rounds``).
* ``spam-hf-schedule``: the rank budget *during* training: SpamTrainer with ``schedule_sparsity`` masks ranks on
  a cubic ramp (``--schedule start,end`` as fractions of the steps, scored with ``--schedule-method``), the
  survivors keep training, and the pruning at the end removes the masked ranks. No extra steps.
* ``adalora``: peft's AdaLoRA from ``init_r = --r-start`` to ``target_r = --r-final`` (the same average rank),
  with ``update_and_allocate`` after every optimiser step.
* ``lora``: plain LoRA at rank ``--r-final`` (the target size from the start); ``lora-start``: plain LoRA at
  ``--r-start`` (four times the size with the defaults: the accuracy to reach).

All adapt the same modules with the same scale α/r = 2, the same data and batch size, and train the
classifier head. ``--equal-steps``: every method gets the same number of optimiser steps in total
(``--epochs`` of the rows); spam-hf's recovery steps come out of its training steps. Learning rates:
``--lrs "lora=5e-4,1e-3;adalora=3e-3,1e-2"`` (a method not named gets ``--lr``; ``--adalora-lrs`` is the
older spelling for AdaLoRA). With several ``--seeds`` each method's learning rates are swept on the first
seed and the best (final dev accuracy) is run on the others. Adapter size counts the LoRA weights of the
ranks that are left (for AdaLoRA, ranks with a non-zero singular value): ``Σ_ranks (in + out)``. Accuracy on
the SST-2 dev set; the training rows are one fixed subset (``--data-seed``) for every seed. ``--resume``
skips the (method, lr, seed) runs already in ``--out``.

    python benchmarks/lora_sst2.py --train-file ../shared/data/sst2/train.tsv \\
        --dev-file ../shared/data/sst2/dev.tsv --max-train-samples 4000 --out benchmarks/results/lora_sst2_cpu.json
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import shlex
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))

import torch  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402
from transformers import AutoTokenizer, DataCollatorWithPadding, Trainer, TrainerCallback, TrainingArguments  # noqa: E402

from spam_hf import SpamLaplace, SpamTrainer, SpamTrainingArguments  # noqa: E402
from spam_hf import apply, plan  # noqa: E402
from spam_hf.pruning import geometric_targets, get_score, prune_in_rounds  # noqa: E402
from sst2_accuracy import accuracy, load_model, model_path, read_sst2  # noqa: E402

METHODS = ("spam-hf", "spam-hf-schedule", "adalora", "lora", "lora-start")
PRUNE_BATCHES = 8  # calibration batches per round of --rounds / --compensate


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
    p.add_argument("--lrs", default="", help='per-method learning rates, "method=lr,lr;method=lr"')
    p.add_argument("--adalora-lrs", default="", help="comma-separated learning rates for AdaLoRA (default: --lr)")
    p.add_argument("--recovery-steps", default="40",
                   help="comma-separated cumulative recovery step counts; accuracy is measured at each")
    p.add_argument("--equal-steps", action="store_true",
                   help="every method trains the same total steps; spam-hf's recovery comes out of its training")
    p.add_argument("--curvature", default="kfac", choices=["kfac", "diag"], help="spam-hf's curvature")
    p.add_argument("--score-methods", default="opd",
                   help="spam-hf: comma-separated group scores (opd, fisher, magnitude, random, damage, damage-exact), "
                        "each pruning a copy of the same trained adapter; runs after the first are named "
                        "spam-hf/<score>")
    p.add_argument("--rounds", type=int, default=1, help="spam-hf: prune in this many geometric rounds")
    p.add_argument("--compensate", action="store_true", help="spam-hf: refit the remaining columns of lora_B")
    p.add_argument("--schedule", default="0.2,0.7", help="spam-hf-schedule: start,end of the ramp (fractions)")
    p.add_argument("--schedule-method", default="fisher", choices=["fisher", "opd", "magnitude", "damage"])
    p.add_argument("--schedule-every", type=int, default=5)
    p.add_argument("--marglik-frequency", type=int, default=25)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--seeds", default="", help="comma-separated training seeds (default: --seed)")
    p.add_argument("--data-seed", type=int, default=0, help="seed of the training-row subset")
    p.add_argument("--methods", default="spam-hf,adalora,lora")
    p.add_argument("--resume", action="store_true", help="skip runs already in --out")
    p.add_argument("--out", required=True)
    p.add_argument("--work-dir", default=os.path.join("benchmarks", "_work", "lora"))
    a = p.parse_args()
    for m in a.methods.split(","):
        if m not in METHODS:
            raise SystemExit(f"unknown method {m!r}; choose from {', '.join(METHODS)}")
    return a


def learning_rates(a) -> dict:
    """``{method: [lr, ...]}`` from ``--lrs`` / ``--adalora-lrs``, ``[--lr]`` for the rest."""
    grid = {}
    for part in filter(None, a.lrs.split(";")):
        method, _, lrs = part.partition("=")
        if method.strip() not in METHODS or not lrs:
            raise SystemExit(f"--lrs: expected method=lr,lr;... with a method from {METHODS}, got {part!r}")
        grid[method.strip()] = [float(x) for x in lrs.split(",")]
    if a.adalora_lrs and "adalora" not in grid:
        grid["adalora"] = [float(x) for x in a.adalora_lrs.split(",")]
    return {m: grid.get(m, [a.lr]) for m in a.methods.split(",")}


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


class Bench:
    """Shared data and settings; :meth:`run` trains and measures one (method, lr, seed)."""

    def __init__(self, a):
        self.a = a
        self.path = model_path(a.model)
        self.tok = AutoTokenizer.from_pretrained(self.path)
        self.train = read_sst2(a.train_file, self.tok, a.max_seq_length, a.max_train_samples, a.data_seed)
        self.dev = read_sst2(a.dev_file, self.tok, a.max_seq_length)
        self.col = DataCollatorWithPadding(self.tok)
        self.targets = a.targets.split(",")
        self.steps = int(len(self.train) / a.batch_size * a.epochs + 0.999)  # every method's total with --equal-steps
        self.recovery = [int(x) for x in a.recovery_steps.split(",") if int(x) > 0]
        if a.equal_steps and max(self.recovery, default=0) >= self.steps:
            raise SystemExit(f"--equal-steps: {max(self.recovery)} recovery steps leave no training in {self.steps}")

    def targs(self, cls, out, lr, seed, **kw):
        a = self.a
        d = dict(output_dir=os.path.join(a.work_dir, out), per_device_train_batch_size=a.batch_size,
                 learning_rate=lr, seed=seed, report_to=[], save_strategy="no", logging_steps=50, disable_tqdm=True,
                 warmup_steps=10, use_cpu=not torch.cuda.is_available())
        d.update(max_steps=self.steps) if a.equal_steps else d.update(num_train_epochs=a.epochs)
        d.update(kw)
        return cls(**d)

    def lora(self, base, r):
        from peft import LoraConfig, get_peft_model

        return get_peft_model(base, LoraConfig(r=r, lora_alpha=2 * r, target_modules=self.targets, lora_dropout=0.05,
                                               task_type="SEQ_CLS"))

    def spam_args(self, out, lr, seed, **kw):
        a = self.a
        return self.targs(SpamTrainingArguments, out, lr, seed, marglik_frequency=a.marglik_frequency,
                          marglik_burn_in=a.marglik_frequency, curvature_every=2, curvature=a.curvature, **kw)

    def recover(self, model, run, lr, seed):
        """Cumulative ``--recovery-steps`` of plain training at ``lr / 2``; accuracy after each."""
        done, run["recovery"] = 0, {}
        for total in self.recovery:
            Trainer(model=model, data_collator=self.col, train_dataset=self.train,
                    args=self.targs(TrainingArguments, "rec", lr / 2, seed + done, max_steps=total - done)).train()
            done = total
            run["recovery"][str(total)] = run["accuracy_recovered"] = accuracy(model, self.dev, self.col)
        run["final_accuracy"] = run.get("accuracy_recovered", run["accuracy"])

    def prune_copy(self, model, trainer, score, sparsity, seed):
        """A pruned copy of the trained adapter: one-shot ``plan``/``apply``, or rounds with compensation."""
        a = self.a
        pruned = copy.deepcopy(model)
        if a.rounds == 1 and not a.compensate and not get_score(score).calibrated:
            return apply(pruned, plan(pruned, trainer.posterior, sparsity, method=score, prune_seed=seed))
        post = trainer.posterior

        def make(m):
            return SpamLaplace(m, reduction="expand", n_data=post.n_data, temperature=post.temperature, seed=seed,
                               mask_fisher=True)

        calib = DataLoader(self.train, batch_size=a.batch_size, shuffle=True, collate_fn=self.col,
                           generator=torch.Generator().manual_seed(seed))
        prune_in_rounds(pruned, make, calib, geometric_targets(sparsity, a.rounds), method=score,
                        compensate=a.compensate, max_batches=PRUNE_BATCHES, start_from=post)
        return pruned

    def run(self, method, lr, seed) -> list:
        """Train and measure one (method, lr, seed); a list of result rows (spam-hf: one per score)."""
        a = self.a
        torch.manual_seed(seed)
        base = load_model(self.path)
        t0 = time.time()
        row = {"method": method, "lr": lr, "seed": seed}
        rows = [row]
        if method == "spam-hf":
            model = self.lora(base, a.r_start)
            full = adapter_size(model)
            sparsity = 1.0 - a.r_final / a.r_start
            kw = dict(max_steps=self.steps - max(self.recovery, default=0)) if a.equal_steps else {}
            trainer = SpamTrainer(model=model, data_collator=self.col, train_dataset=self.train,
                                  args=self.spam_args(method, lr, seed, **kw))
            trainer.train()
            before = accuracy(model, self.dev, self.col)
            for k, score in enumerate(a.score_methods.split(",")):
                if k:  # one row per scoring method, each on a copy of the trained adapter
                    row = {"method": f"spam-hf/{score}", "lr": lr, "seed": seed}
                    rows.append(row)
                pruned = self.prune_copy(model, trainer, score, sparsity, seed)
                row["accuracy_before_pruning"] = before
                row["accuracy"] = accuracy(pruned, self.dev, self.col)
                self.recover(pruned, row, lr, seed)
                row["adapter_size"] = adapter_size(pruned)
                row["adapter_size_before_pruning"] = full
                row["train_steps"] = trainer.state.global_step + max(self.recovery, default=0)
        elif method == "spam-hf-schedule":
            model = self.lora(base, a.r_start)
            sparsity = 1.0 - a.r_final / a.r_start
            start, end = (float(x) for x in a.schedule.split(","))
            trainer = SpamTrainer(model=model, data_collator=self.col, train_dataset=self.train,
                                  args=self.spam_args(method, lr, seed, schedule_sparsity=sparsity,
                                                      schedule_start=start, schedule_end=end,
                                                      schedule_every=a.schedule_every,
                                                      schedule_method=a.schedule_method))
            trainer.train()
            trainer.prune(sparsity)  # removes every masked rank (at least `sparsity` of the adapter)
            row["accuracy"] = row["final_accuracy"] = accuracy(trainer.model, self.dev, self.col)
            row["adapter_size"] = adapter_size(trainer.model)
            row["train_steps"] = trainer.state.global_step
        elif method == "adalora":
            from peft import AdaLoraConfig, get_peft_model

            steps = self.steps
            # AdaLoRA scales by alpha / init_r: 2·r_start gives the same scale 2 as the LoRA runs
            model = get_peft_model(base, AdaLoraConfig(init_r=a.r_start, target_r=a.r_final, lora_alpha=2 * a.r_start,
                                                       target_modules=self.targets, lora_dropout=0.05,
                                                       tinit=steps // 10, tfinal=steps // 5, deltaT=5,
                                                       total_step=steps, task_type="SEQ_CLS"))
            trainer = Trainer(model=model, data_collator=self.col, train_dataset=self.train,
                              args=self.targs(TrainingArguments, f"{method}-{lr:g}", lr, seed),
                              callbacks=[AdaLoraAllocate(model)])
            trainer.train()
            row["accuracy"] = row["final_accuracy"] = accuracy(model, self.dev, self.col)
            row["adapter_size"] = adapter_size(model)
            row["train_steps"] = trainer.state.global_step
        else:  # lora / lora-start
            r = a.r_final if method == "lora" else a.r_start
            model = self.lora(base, r)
            trainer = Trainer(model=model, data_collator=self.col, train_dataset=self.train,
                              args=self.targs(TrainingArguments, method, lr, seed))
            trainer.train()
            row["r"] = r
            row["accuracy"] = row["final_accuracy"] = accuracy(model, self.dev, self.col)
            row["adapter_size"] = adapter_size(model)
            row["train_steps"] = trainer.state.global_step
        for r in rows:
            r["wall_s"] = time.time() - t0
        return rows


def main() -> None:
    a = parse()
    bench = Bench(a)
    seeds = [int(x) for x in a.seeds.split(",")] if a.seeds else [a.seed]
    grid = learning_rates(a)
    result = {"date": datetime.date.today().isoformat(), "device": f"CPU, {torch.get_num_threads()} threads"
              if not torch.cuda.is_available() else torch.cuda.get_device_name(0),
              "command": "python " + shlex.join(sys.argv), "args": vars(a), "train_rows": len(bench.train),
              "total_steps": bench.steps if a.equal_steps else None, "runs": []}
    if a.resume and os.path.exists(a.out):
        result["runs"] = json.load(open(a.out))["runs"]
    done = {(r["method"].split("/")[0], r["lr"], r.get("seed", a.seed)) for r in result["runs"]}

    def save():
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
        with open(a.out, "w") as f:
            json.dump(result, f, indent=2)

    def run(method, lr, seed):
        if (method, lr, seed) in done:
            return
        rows = bench.run(method, lr, seed)
        result["runs"] += rows
        done.add((method, lr, seed))
        save()
        for r in rows:
            print(json.dumps({k: v for k, v in r.items() if k != "recovery"}), flush=True)

    for method, lrs in grid.items():
        for lr in lrs:  # the sweep, on the first seed
            run(method, lr, seeds[0])
        if len(seeds) > 1:
            first = [r for r in result["runs"] if r["method"] == method and r.get("seed", a.seed) == seeds[0]]
            best = max(first, key=lambda r: r["final_accuracy"])["lr"]
            result.setdefault("best_lr", {})[method] = best
            for seed in seeds[1:]:
                run(method, best, seed)
    lora_rows = [r for r in result["runs"] if r["method"] == "lora"]
    result["lora_size_at_r_final"] = lora_rows[0]["adapter_size"] if lora_rows else None
    save()


if __name__ == "__main__":
    main()
