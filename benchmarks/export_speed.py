"""Measured speed of exported (physically pruned, reloaded) models against the dense model, beside FLOPs.

For each sparsity: select groups (OPD from a finished `spam-hf compress` run when --run-dir is given,
else magnitude on the dense weights), remove them, save with `save_pruned`, reload with
`spam_hf.from_pretrained`, and time a warm forward (median of repeats) at batch 1 and 32,
sequence 128, with the given number of CPU threads. The dense model is timed in the same run,
interleaved, and speed-ups are ratios within the run. Each export is also timed interleaved against its uniform
ceiling (``deploy_speed.uniform_ceiling``: the dense model cut to the same total of heads and neurons, spread
evenly), and the share of that ceiling it reaches (``t_ceiling / t_export``) is printed beside the speed-up.

    python benchmarks/export_speed.py --run-dir runs/spam-demo --out benchmarks/results/export_speed_minilm_cpu.json
    python benchmarks/export_speed.py --bert-base --out benchmarks/results/export_speed_bertbase_cpu.json
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import shutil
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import torch  # noqa: E402
from transformers import BertConfig, BertForSequenceClassification  # noqa: E402

from deploy_speed import uniform_ceiling  # noqa: E402
from spam_hf.costs import compare_latency, measure_latency, model_costs  # noqa: E402
from spam_hf.export import from_pretrained, save_pruned  # noqa: E402
from spam_hf import SpamLaplace, apply, plan  # noqa: E402


def load_source(a):
    """(dense model, its posterior or None, score method, description)."""
    if a.run_dir:
        dense_dir = os.path.join(a.run_dir, "dense")
        state = json.load(open(os.path.join(dense_dir, "spam_state.json")))
        model = from_pretrained(dense_dir)
        posterior = SpamLaplace(model, n_data=int(state["n_data"]))
        posterior.load(dense_dir)
        return model, posterior, "opd", f"OPD from {a.run_dir}"
    if a.model_dir:
        model = from_pretrained(a.model_dir).eval()
        return model, None, "magnitude", f"{a.model_dir}, magnitude selection"
    cfg = BertConfig(num_labels=2)  # bert-base-uncased shape: 12 layers, hidden 768, 12 heads, FFN 3072
    torch.manual_seed(0)
    model = BertForSequenceClassification(cfg).eval()
    return model, None, "magnitude", "BERT-base-shaped, random weights, magnitude selection"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-dir", default=None)
    p.add_argument("--bert-base", action="store_true")
    p.add_argument("--model-dir", default=None, help="any supported checkpoint; magnitude selection")
    p.add_argument("--sparsities", default="0.3,0.5,0.7,0.8,0.9,0.95")
    p.add_argument("--batch-sizes", default="1,32")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--out", required=True)
    a = p.parse_args()
    if not (a.run_dir or a.bert_base or a.model_dir):
        p.error("give --run-dir, --model-dir or --bert-base")
    model, posterior, method, source = load_source(a)
    res = {"date": datetime.date.today().isoformat(), "command": " ".join(sys.argv), "machine":
           f"CPU, {a.threads} threads", "torch": torch.__version__, "source": source, "seq_len": a.seq_len, "rows": []}
    bss = [int(b) for b in a.batch_sizes.split(",")]
    dense_costs = model_costs(model, a.seq_len)
    tmp = tempfile.mkdtemp()
    try:
        for s in [float(x) for x in a.sparsities.split(",")]:
            p = plan(model, posterior, s, method=method)
            sel = p.selection
            pruned = apply(copy.deepcopy(model), p)
            out = os.path.join(tmp, f"s{s}")
            save_pruned(pruned, out)
            reloaded = from_pretrained(out).eval()
            costs = model_costs(reloaded, a.seq_len)
            row = {"sparsity": s, "achieved": sel.achieved, "params": costs["params"],
                   "block_flops_ratio": dense_costs["block_flops"] / costs["block_flops"],
                   "layers": [x.to_dict() for x in sel.layers]}
            ceiling = uniform_ceiling(model, reloaded).eval()
            for bs in bss:  # dense timed right before each pruned model: ratios within the same minute
                d = measure_latency(model, bs, a.seq_len, a.repeats, threads=a.threads)["latency_s"]
                q = measure_latency(reloaded, bs, a.seq_len, a.repeats, threads=a.threads)["latency_s"]
                # the same-size uniform model, interleaved with the export: the share of the ceiling it reaches
                c = compare_latency(ceiling, reloaded, bs, a.seq_len, a.repeats, threads=a.threads)
                row[f"bs{bs}"] = {"dense_s": d, "pruned_s": q, "speedup": d / q,
                                  "throughput_seq_per_s": bs / q, "ceiling_s": c["dense_s"],
                                  "share_of_ceiling": c["speedup"], "share_q25": c["speedup_q25"],
                                  "share_q75": c["speedup_q75"]}
            res["rows"].append(row)
            print(f"s={s:.2f} FLOPs x{row['block_flops_ratio']:.2f} " +
                  " ".join(f"bs{bs}: x{row[f'bs{bs}']['speedup']:.2f} "
                           f"({row[f'bs{bs}']['share_of_ceiling']:.0%} of the uniform ceiling)" for bs in bss),
                  flush=True)
            del pruned, reloaded, ceiling
            with open(a.out, "w") as f:
                json.dump(res, f, indent=2)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
