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

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))

import torch  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402
from transformers import AutoTokenizer, DataCollatorWithPadding  # noqa: E402

from sst2_accuracy import accuracy, read_sst2  # noqa: E402
from spam_hf import SpamLaplace, apply, from_pretrained, plan  # noqa: E402


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
        loader = DataLoader(train, batch_size=32, shuffle=True, collate_fn=col,
                            generator=torch.Generator().manual_seed(0))
        posterior = SpamLaplace(model, reduction=a.posthoc_reduction, max_rows_per_batch=4096)
        posterior.fit(loader, max_batches=a.posthoc_batches, n_steps=100)
    else:
        posterior = SpamLaplace(model, n_data=int(state["n_data"]))
        posterior.load(dense_dir)
    res = {"date": datetime.date.today().isoformat(), "command": " ".join(sys.argv), "machine":
           f"CPU, {torch.get_num_threads()} threads", "dense_accuracy": accuracy(model, dev, col), "rows": []}
    print(f"dense {res['dense_accuracy']:.4f}", flush=True)
    for method in a.methods.split(","):
        for mk in [float(x) for x in a.min_keep.split(",")]:
            for s in [float(x) for x in a.sparsities.split(",")]:
                p = plan(model, posterior, s, method=method, min_keep=mk)
                sel = p.selection
                m = apply(copy.deepcopy(model), p)
                row = {"method": method, "min_keep": mk, "sparsity": s, "achieved": sel.achieved,
                       "accuracy": accuracy(m, dev, col), "layers": [x.to_dict() for x in sel.layers]}
                res["rows"].append(row)
                print(f"{method:10s} min_keep={mk:.2f} s={s:.2f} acc={row['accuracy']:.4f}", flush=True)
                with open(a.out, "w") as f:
                    json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
