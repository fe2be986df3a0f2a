"""Plot measured speed-up of exported models against their block-FLOP reduction (export_speed.py JSON files).

    python benchmarks/plot_speed.py benchmarks/results/export_speed_minilm_cpu.json \\
        benchmarks/results/export_speed_bertbase_cpu.json --out benchmarks/results/export_speed_cpu.png
"""

from __future__ import annotations

import argparse
import json
import os


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", nargs="+")
    p.add_argument("--out", required=True)
    a = p.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    top = 1.0
    for path in a.results:
        r = json.load(open(path))
        name = os.path.basename(path).replace("export_speed_", "").replace("_cpu.json", "")
        rows = sorted(r["rows"], key=lambda x: x["block_flops_ratio"])
        x = [row["block_flops_ratio"] for row in rows]
        top = max(top, *x)
        for bs, style in (("bs32", "-o"), ("bs1", "--s")):
            if all(bs in row for row in rows):
                ax.plot(x, [row[bs]["speedup"] for row in rows], style, label=f"{name}, batch {bs[2:]}")
    line = [1.0, top]
    ax.plot(line, line, color="grey", lw=0.8, label="speed-up = FLOP reduction")
    ax.plot(line, [0.8 * v for v in line], color="grey", lw=0.8, ls=":", label="0.8 × FLOP reduction (target)")
    ax.set_xlabel("block FLOP reduction (dense / pruned)")
    ax.set_ylabel("measured speed-up (latency dense / pruned)")
    ax.set_title("Exported models, CPU 2 threads, T=128")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(a.out, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
