"""Table (markdown) and plots (PNG) of benchmarks/group_damage.py results: mean and spread over the seeds
(one result file per seed, or one file with several runs, or several files per seed holding different
methods: rows are pooled by method and sparsity), and the per-layer pattern kept by a method. Rows of
``+comp`` methods from files written with ``--compensation posterior`` (or before that option existed)
are labelled ``+comp[posterior]``; ``+comp`` is the least-squares default. Rows from files written with
``--calib-batches`` other than 8 name their count.

    python benchmarks/table_group_damage.py benchmarks/results/group_damage_cpu_s*.json \\
        --out benchmarks/results/group_damage_cpu
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", nargs="+")
    p.add_argument("--pattern-method", default="damage-exact+auto-rounds")
    p.add_argument("--methods", default="", help="comma-separated: only these rows, in this order (default: all)")
    p.add_argument("--out", required=True, help="prefix: writes PREFIX.md and PREFIX.png")
    p.add_argument("--no-recovery", action="store_true", help="leave out the rows after recovery / distillation")
    a = p.parse_args()
    runs = []
    for f in a.results:
        data = json.load(open(f))
        # files written before --compensation existed compensated with the KFAC posterior's conditional mean
        kind = data.get("args", {}).get("compensation", "posterior")
        calib = data.get("args", {}).get("calib_batches", 8)
        for r in data["runs"]:
            for row in r["rows"]:
                if kind != "least-squares" and "+comp" in row["method"]:
                    row["method"] = row["method"].replace("+comp", f"+comp[{kind}]")
                if calib != 8:  # the benchmark's default (spam-hf prune's is 32)
                    row["method"] += f" ({calib} calib. batches)"
            runs.append(r)
    wanted = [m for m in a.methods.split(",") if m]
    if wanted:
        for r in runs:
            r["rows"] = [row for row in r["rows"] if row["method"] in wanted]
    acc, rec, dis, ach = defaultdict(list), defaultdict(list), defaultdict(list), defaultdict(list)
    dense = list({r["seed"]: r["dense"] for r in runs}.values())  # one per seed: a seed may span several files
    fidelity = [r["fidelity"] for r in runs if "fidelity" in r]
    methods, sparsities = [], []
    for r in runs:
        for row in r["rows"]:
            key = (row["method"], row["sparsity"])
            methods += [row["method"]] if row["method"] not in methods else []
            sparsities += [row["sparsity"]] if row["sparsity"] not in sparsities else []
            acc[key].append(100 * row["accuracy"])
            ach[key].append(row["achieved"])
            if a.no_recovery:
                continue
            if "accuracy_recovered" in row:
                rec[key].append(100 * row["accuracy_recovered"])
            if "accuracy_distilled" in row:
                dis[key].append(100 * row["accuracy_distilled"])

    def cell(xs):
        if not xs:
            return "–"
        if len(xs) == 1:
            return f"{xs[0]:.1f}"
        return f"{statistics.mean(xs):.1f} ± {statistics.stdev(xs):.1f}"

    sparsities.sort()
    if wanted:
        methods = [m for m in wanted if m in methods]
    lines = [f"Dense: {cell([100 * d for d in dense])} ({len(dense)} seed(s); mean ± standard deviation).", "",
             "| method | " + " | ".join(f"{s:.0%} removed" for s in sparsities) + " |",
             "|---|" + "---|" * len(sparsities)]
    for m in methods:
        lines.append(f"| {m} | " + " | ".join(cell(acc[(m, s)]) for s in sparsities) + " |")
        if any(rec[(m, s)] for s in sparsities):
            lines.append(f"| {m} + recovery | " + " | ".join(cell(rec[(m, s)]) for s in sparsities) + " |")
        if any(dis[(m, s)] for s in sparsities):
            lines.append(f"| {m} + distillation | " + " | ".join(cell(dis[(m, s)]) for s in sparsities) + " |")
    if sparsities:
        top = sparsities[-1]
        lines += ["", f"Achieved at the {top:.0%} target (minimum over seeds): " + ", ".join(
            f"{m} {min(ach[(m, top)]):.1%}" for m in methods if ach[(m, top)])]
    else:  # a fidelity-only file set
        lines = lines[:1]
    if fidelity:
        keys = [k for k in fidelity[0] if k not in ("groups", "heads", "actual_negative", "actual_median_abs",
                                                     "base_loss")]
        lines += ["", f"Damage fidelity (Spearman of score vs actual held-back loss increase, {fidelity[0]['groups']} "
                  f"groups: every head and a sample of neurons; {len(fidelity)} seed(s)):", "",
                  "| score | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys),
                  "| ρ | " + " | ".join(f"{statistics.mean(f[k] for f in fidelity):.2f}" for k in keys) + " |"]
    text = "\n".join(lines) + "\n"
    with open(a.out + ".md", "w") as f:
        f.write(text)
    print(text)
    if not sparsities:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    for m in methods:
        ys = [statistics.mean(acc[(m, s)]) for s in sparsities]
        axes[0].plot([100 * s for s in sparsities], ys, marker="o", label=m)
    axes[0].set_xlabel("% of prunable block parameters removed")
    axes[0].set_ylabel("SST-2 dev accuracy (no recovery)")
    axes[0].legend(fontsize=7)
    first = max(runs, key=lambda r: sum(row["method"] == a.pattern_method for row in r["rows"]))  # most sparsities
    first = first if any(row["method"] == a.pattern_method for row in first["rows"]) else None
    pattern = [row for row in (first["rows"] if first else []) if row["method"] == a.pattern_method and "layers" in row]
    for row in pattern:
        layers = row["layers"]
        x = [layer["layer"] for layer in layers]
        axes[1].plot(x, [layer["heads_kept"] / max(layer["heads_total"], 1) for layer in layers], marker="o",
                     label=f"heads, {row['sparsity']:.0%}")
        axes[1].plot(x, [layer["neurons_kept"] / max(layer["neurons_total"], 1) for layer in layers], marker="s", linestyle="--",
                     label=f"neurons, {row['sparsity']:.0%}")
    axes[1].set_xlabel("layer")
    axes[1].set_ylabel("fraction kept")
    axes[1].set_title(f"{a.pattern_method}, seed of {(first or runs[0])['run_dir']}", fontsize=8)
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(a.out + ".png", dpi=100)


if __name__ == "__main__":
    main()
