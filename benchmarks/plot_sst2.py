"""Plot accuracy vs sparsity from sst2_accuracy.py JSON results (one line per method; dashed: no recovery).

    python benchmarks/plot_sst2.py benchmarks/results/sst2_gpu_h200.json --out benchmarks/results/sst2_gpu_h200.png
"""

import argparse
import json
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("results", nargs="+")
    p.add_argument("--out", required=True)
    a = p.parse_args()
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
