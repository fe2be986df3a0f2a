"""Accuracy against measured speed-up: spam-hf's exports next to the peers' numbers (the README's plot).

Accuracy comes from a ``table_prune.py`` result (mean and spread over seeds, per label); speed from timing the
exports of one seed against their dense model in this run, interleaved (``spam_hf.costs.compare_latency``), at
the peers' setting (batch 32, sequence 128, 1 thread). The peers' rows come from a JSON file that says where
they were measured. Writes ``OUT.json`` and ``OUT.png``.

    python benchmarks/frontier.py --accuracy benchmarks/results/damage_obs_cli_cpu.json \\
        --label "0.5=50%, + 200 steps" --label "0.7=70%, + 200 steps" --label "0.9=90%, + 200 steps" \\
        --label-before "0.5=50%" --label-before "0.7=70%" --label-before "0.9=90%" \\
        --dense runs/post90-s0/dense --export 0.5=runs/post90-s0/p50/model --export 0.7=runs/post90-s0/p70/model \\
        --export 0.9=runs/post90-s0/p90/model --peers benchmarks/results/peers_cpu_protocol.json \\
        --out benchmarks/results/frontier_cpu
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
from typing import Dict, List, Tuple

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


def pairs(items: List[str], what: str) -> List[Tuple[float, str]]:
    """``["0.5=TEXT", ...]`` → ``[(0.5, "TEXT"), ...]``."""
    out = []
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"{what} must be SPARSITY=VALUE, got {item!r}")
        out.append((float(key), value))
    return out


def accuracy_by_label(path: str) -> Dict[str, List[float]]:
    """``{label: [accuracy per seed, in %]}`` of a ``table_prune.py`` JSON file."""
    rows = json.load(open(path))["rows"]
    out: Dict[str, List[float]] = {}
    for row in rows:
        out.setdefault(row["label"], []).append(100.0 * row["accuracy"])
    return out


def mean_std(values: List[float]) -> Tuple[float, float]:
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def measure(dense_dir: str, exports: List[Tuple[float, str]], batch_size: int, seq_len: int, threads: int,
            repeats: int) -> Dict[float, dict]:
    """Speed-up of every export against the dense model, timed interleaved in this process."""
    from spam_hf.costs import compare_latency, model_costs
    from spam_hf.export import from_pretrained

    dense = from_pretrained(dense_dir)
    out = {}
    for sparsity, path in exports:
        pruned = from_pretrained(path)
        res = compare_latency(dense, pruned, batch_size=batch_size, seq_len=seq_len, repeats=repeats,
                              threads=threads)
        res["params"] = model_costs(pruned, seq_len=seq_len)["params"]
        res["export"] = path
        out[sparsity] = res
        print(f"{sparsity:.0%} removed: {res['speedup']:.2f}x faster ({res['speedup_q25']:.2f}-"
              f"{res['speedup_q75']:.2f})")
    return out


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    rows = result["rows"]
    x = [r["speedup"] for r in rows]
    ax.errorbar(x, [r["accuracy"] for r in rows], yerr=[r["accuracy_std"] for r in rows], marker="o",
                capsize=3, label="spam-hf, + 200 steps")
    if all(r.get("accuracy_before") is not None for r in rows):
        ax.plot(x, [r["accuracy_before"] for r in rows], marker="o", linestyle="--", color="C0", alpha=0.6,
                label="spam-hf, no recovery")
    for i, peer in enumerate(result["peers"]["methods"]):
        ax.plot([p["speedup"] for p in peer["points"]], [p["accuracy"] for p in peer["points"]], marker="s",
                color=f"C{i + 1}", label=peer["name"])
    if result.get("dense_accuracy"):
        ax.axhline(result["dense_accuracy"], color="grey", linewidth=0.8, linestyle=":", label="dense")
    for r in rows:
        ax.annotate(f"{r['sparsity']:.0%}", (r["speedup"], r["accuracy"]), textcoords="offset points",
                    xytext=(4, 6), fontsize=8)
    ax.set_xlabel(f"measured speed-up (batch {result['batch_size']}, sequence {result['seq_len']}, "
                  f"{result['threads']} thread)")
    ax.set_ylabel("SST-2 dev accuracy (%)")
    ax.set_title(f"MiniLM-L6, CPU protocol; speed measured {result['date']}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--accuracy", required=True, help="a table_prune.py JSON result")
    p.add_argument("--label", action="append", required=True, help="SPARSITY=LABEL of the accuracy rows plotted")
    p.add_argument("--label-before", action="append", default=[], help="SPARSITY=LABEL without recovery")
    p.add_argument("--dense-accuracy", type=float, default=None, help="dense accuracy (%%) to draw as a line")
    p.add_argument("--dense", required=True, help="the dense model the exports are timed against")
    p.add_argument("--export", action="append", required=True, help="SPARSITY=EXPORT_DIR, one seed's export")
    p.add_argument("--peers", required=True, help="JSON: the peers' points and where they were measured")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--out", required=True, help="OUT.json and OUT.png")
    a = p.parse_args()

    accuracy = accuracy_by_label(a.accuracy)
    before = dict(pairs(a.label_before, "--label-before"))
    speed = measure(a.dense, pairs(a.export, "--export"), a.batch_size, a.seq_len, a.threads, a.repeats)
    rows = []
    for sparsity, label in pairs(a.label, "--label"):
        if label not in accuracy:
            raise ValueError(f"no rows labelled {label!r} in {a.accuracy}; labels: {sorted(accuracy)}")
        if sparsity not in speed:
            raise ValueError(f"no --export for sparsity {sparsity}")
        acc, std = mean_std(accuracy[label])
        acc_before = mean_std(accuracy[before[sparsity]])[0] if sparsity in before else None
        rows.append({"sparsity": sparsity, "label": label, "accuracy": acc, "accuracy_std": std,
                     "seeds": len(accuracy[label]), "accuracy_before": acc_before, **speed[sparsity]})
    import torch

    result = {"date": datetime.date.today().isoformat(), "command": "python " + " ".join(sys.argv),
              "machine": f"CPU, {a.threads} thread(s) for timing", "torch": torch.__version__,
              "batch_size": a.batch_size, "seq_len": a.seq_len, "threads": a.threads,
              "accuracy_source": a.accuracy, "dense_accuracy": a.dense_accuracy, "rows": rows,
              "peers": json.load(open(a.peers))}
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out + ".json", "w") as f:
        json.dump(result, f, indent=1)
    plot(result, a.out + ".png")
    print(f"wrote {a.out}.json and {a.out}.png")


if __name__ == "__main__":
    main()
