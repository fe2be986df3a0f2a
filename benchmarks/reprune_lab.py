"""Retraining-free pruning of a finished `spam-hf compress` run: scores × per-layer floors × sparsities.

Uses the run's dense model, priors and curvature (or, with --posthoc-reduction, curvature and priors
refitted post hoc with that KFAC reduction from --train-file), prunes without recovery and reports
dev accuracy. Cheap enough for the CPU: it is where the layer-collapse analysis of docs/results.md
was done.

    python benchmarks/reprune_lab.py --run-dir runs/spam-demo --out benchmarks/results/reprune_lab_demo.json
    python benchmarks/reprune_lab.py --run-dir runs/spam-demo --posthoc-reduction reduce-gw \
        --train-file spam_hf/sample_data/sst2_sample_train.tsv --out benchmarks/results/reprune_lab_demo_gw.json
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))

import torch  # noqa: E402
from transformers import AutoTokenizer, DataCollatorWithPadding  # noqa: E402

from sst2_accuracy import accuracy, read_sst2  # noqa: E402
from spam_hf import SpamTrainer, SpamTrainingArguments, from_pretrained  # noqa: E402
from spam_hf.scoring import group_scores  # noqa: E402
from spam_hf.selection import select_groups  # noqa: E402
from spam_hf.surgery import prune_groups  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-dir", required=True)
    p.add_argument("--dev-file", default=os.path.join("spam_hf", "sample_data", "sst2_sample_dev.tsv"))
    p.add_argument("--train-file", default=None)
    p.add_argument("--posthoc-reduction", default=None, help="refit curvature + priors post hoc with this reduction")
    p.add_argument("--posthoc-batches", type=int, default=25)
    p.add_argument("--methods", default="opd,fisher,magnitude")
    p.add_argument("--min-keep", default="0,0.25")
    p.add_argument("--sparsities", default="0.3,0.5,0.6,0.7")
    p.add_argument("--max-seq-length", type=int, default=64)
    p.add_argument("--out", required=True)
    a = p.parse_args()
    dense_dir = os.path.join(a.run_dir, "dense")
    state = json.load(open(os.path.join(dense_dir, "spam_state.json")))
    tok = AutoTokenizer.from_pretrained(dense_dir)
    col = DataCollatorWithPadding(tok)
    dev = read_sst2(a.dev_file, tok, a.max_seq_length)
    model = from_pretrained(dense_dir)
    if a.posthoc_reduction:
        if not a.train_file:
            p.error("--posthoc-reduction needs --train-file")
        train = read_sst2(a.train_file, tok, a.max_seq_length)
        args = SpamTrainingArguments(output_dir=tempfile.mkdtemp(), report_to=[], marglik_frequency=0,
                                     kfac_reduction=a.posthoc_reduction, per_device_train_batch_size=32,
                                     curvature_max_rows=4096)
        tr = SpamTrainer(model=model, args=args, train_dataset=train, data_collator=col)
        tr.fit_priors_posthoc(max_batches=a.posthoc_batches, n_steps=100)
    else:
        args = SpamTrainingArguments(output_dir=tempfile.mkdtemp(), report_to=[], n_data=int(state["n_data"]),
                                     marglik_frequency=0)
        tr = SpamTrainer(model=model, args=args)
        tr.load_spam_state(dense_dir)
    curv = tr.retained_curvature()
    res = {"date": datetime.date.today().isoformat(), "command": " ".join(sys.argv), "machine":
           f"CPU, {torch.get_num_threads()} threads", "dense_accuracy": accuracy(model, dev, col), "rows": []}
    print(f"dense {res['dense_accuracy']:.4f}", flush=True)
    for method in a.methods.split(","):
        scores = group_scores(model, tr.specs, method, prior=tr.prior, curvature=curv)
        for mk in [float(x) for x in a.min_keep.split(",")]:
            for s in [float(x) for x in a.sparsities.split(",")]:
                m = copy.deepcopy(model)
                sel = select_groups(m, tr.specs, scores, s, min_keep=mk)
                prune_groups(m, sel.keep)
                row = {"method": method, "min_keep": mk, "sparsity": s, "achieved": sel.achieved,
                       "accuracy": accuracy(m, dev, col), "layers": [vars(x) for x in sel.layers]}
                res["rows"].append(row)
                print(f"{method:10s} min_keep={mk:.2f} s={s:.2f} acc={row['accuracy']:.4f}", flush=True)
                with open(a.out, "w") as f:
                    json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
