"""Plot accuracy vs sparsity from sst2_accuracy.py JSON results (one line per method; dashed: no recovery).

    python benchmarks/plot_sst2.py benchmarks/results/sst2_gpu_h200.json --out benchmarks/results/sst2_gpu_h200.png

With ``--seeds`` the files are runs of the same protocol with different seeds: the plot shows the mean
with min–max bars, and a Markdown table (mean ± half the min–max spread) is written next to the PNG.

    python benchmarks/plot_sst2.py benchmarks/results/sst2_cpu_seed*.json --seeds --out benchmarks/results/sst2_cpu.png
"""

import argparse
import json
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def seeds_plot(paths, out: str) -> None:
    """Mean and min–max over seed files, per method and sparsity; PNG plus a Markdown table."""
    runs = [json.load(open(p)) for p in paths]
    acc = defaultdict(list)  # (method, sparsity, key) -> values
    achieved = defaultdict(list)  # target sparsity -> achieved (a per-layer floor can stop short)
    dense = defaultdict(list)
    for r in runs:
        for k, v in r["dense"].items():
            dense[k].append(v)
        for row in r["runs"]:
            acc[(row["method"], row["sparsity"], "accuracy")].append(row["accuracy"])
            achieved[row["sparsity"]].append(row["achieved"])
            if "accuracy_recovered" in row:
                acc[(row["method"], row["sparsity"], "accuracy_recovered")].append(row["accuracy_recovered"])
    methods = list(dict.fromkeys(k[0] for k in acc))
    sparsities = sorted({k[1] for k in acc})
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for method in methods:
        color = None  # the recovered curve takes the colour of the method's retraining-free curve
        for key, style in (("accuracy", "--"), ("accuracy_recovered", "o-")):
            pts = [(s, acc[(method, s, key)]) for s in sparsities if acc.get((method, s, key))]
            if not pts:
                continue
            xs = [s for s, _ in pts]
            mean = [100 * sum(v) / len(v) for _, v in pts]
            lo = [m - 100 * min(v) for m, (_, v) in zip(mean, pts)]
            hi = [100 * max(v) - m for m, (_, v) in zip(mean, pts)]
            label = f"{method} (+{runs[0]['args']['recovery_steps']} steps)" if key == "accuracy_recovered" else None
            cont = ax.errorbar(xs, mean, yerr=[lo, hi], fmt=style, capsize=2, alpha=0.5 if key == "accuracy" else 1,
                               color=color, label=label)
            color = cont.lines[0].get_color()
    for v in dense.values():
        ax.axhline(100 * sum(v) / len(v), color="grey", lw=0.6, ls=":")
    ax.set_xlabel("fraction of prunable block parameters removed")
    ax.set_ylabel("accuracy (%), mean and min–max over seeds")
    ax.set_title(f"SST-2 dev, MiniLM-L6, {runs[0]['device']}, {len(runs)} seeds, {runs[0]['date']}", fontsize=9)
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(out, dpi=110)

    def cell(values):
        if not values:
            return ""
        m = 100 * sum(values) / len(values)
        return f"{m:.1f}" if len(values) == 1 else f"{m:.1f} ± {50 * (max(values) - min(values)):.1f}"

    lines = ["| target removed | " + " | ".join(f"{s:.0%}" for s in sparsities) + " |",
             "|---|" + "---|" * len(sparsities),
             "| achieved (min) | " + " | ".join(f"{min(achieved[s]):.1%}" for s in sparsities) + " |"]
    for method in methods:
        lines.append(f"| {method} | " + " | ".join(cell(acc.get((method, s, "accuracy"), [])) for s in sparsities) + " |")
        if any(acc.get((method, s, "accuracy_recovered")) for s in sparsities):
            lines.append(f"| {method} + recovery | " + " | ".join(cell(acc.get((method, s, "accuracy_recovered"), []))
                                                             for s in sparsities) + " |")
    lines.append("")
    lines.append("dense: " + ", ".join(f"{k} {cell(v)}" for k, v in dense.items()))
    with open(out.rsplit(".", 1)[0] + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("results", nargs="+")
    p.add_argument("--out", required=True)
    p.add_argument("--seeds", action="store_true", help="aggregate the files as seeds of one protocol")
    a = p.parse_args()
    if a.seeds:
        seeds_plot(a.results, a.out)
        return
    fig, ax = plt.subplots(figsize=(7, 4.2))
    title = ""
    for path in a.results:
        r = json.load(open(path))
        title = f"SST-2 dev, MiniLM-L6, {r['device']}, {r['date']}"
        tag = "" if len(a.results) == 1 else f" [{r['args'].get('kfac_reduction', 'auto')}]"
        by = defaultdict(list)
        for row in r["runs"]:
            by[row["method"]].append(row)
        for method, rows in by.items():
            rows.sort(key=lambda x: x["sparsity"])
            line, = ax.plot([x["sparsity"] for x in rows], [100 * x["accuracy"] for x in rows], "--", alpha=0.5)
            rec = [x for x in rows if "accuracy_recovered" in x]
            ax.plot([x["sparsity"] for x in rec], [100 * x["accuracy_recovered"] for x in rec], "o-",
                    color=line.get_color(), label=f"{method}{tag} (+{r['args']['recovery_steps']} steps)")
        for k, v in r["dense"].items():
            ax.axhline(100 * v, color="grey", lw=0.6, ls=":")
    ax.set_xlabel("fraction of prunable block parameters removed")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(title, fontsize=9)
    ax.set_ylim(45, 92)
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(a.out, dpi=110)


if __name__ == "__main__":
    main()
