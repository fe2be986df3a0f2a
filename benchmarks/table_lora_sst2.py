"""Markdown table of a ``lora_sst2.py`` run with several seeds: per method its best learning rate (swept on the
first seed), the adapter size, and the final dev accuracy as mean ± std over the seeds at that rate.

    python benchmarks/table_lora_sst2.py benchmarks/results/lora_sst2_cpu_fair.json --out benchmarks/results/lora_sst2_cpu_fair.md
"""

from __future__ import annotations

import argparse
import json
import statistics


def rows_at_best(result: dict) -> dict:
    """``{method: (lr, [run rows at that lr, one per seed])}``; spam-hf's score variants are methods of their own
    at spam-hf's best rate."""
    best = dict(result.get("best_lr", {}))
    out = {}
    for r in result["runs"]:
        method = r["method"]
        family = method.split("/")[0]
        if family not in best:  # one seed: the best rate of that seed
            first = [x for x in result["runs"] if x["method"] == family]
            best[family] = max(first, key=lambda x: x.get("final_accuracy", x.get("accuracy_recovered", x["accuracy"])))["lr"]
        if r["lr"] == best[family]:
            out.setdefault(method, (r["lr"], []))[1].append(r)
    return out


def fmt(values) -> str:
    values = [100 * v for v in values]
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"


def table(result: dict) -> str:
    grid = result["args"].get("lrs", "")
    lines = [f"`{result['command']}` ({result['device']}, {result['date']}; {result['train_rows']} training rows, "
             f"{result.get('total_steps') or 'per-method'} optimiser steps per method; lr grid `{grid}`)", "",
             "| method | lr (best of sweep) | adapter size | seeds | dev accuracy | before pruning / right after | wall s |",
             "|---|---|---|---|---|---|---|"]
    first_score = result["args"].get("score_methods", "opd").split(",")[0]
    for method, (lr, rows) in rows_at_best(result).items():
        if method == "spam-hf":  # its first score's row
            method = f"spam-hf/{first_score}"
        acc = [r.get("final_accuracy", r.get("accuracy_recovered", r["accuracy"])) for r in rows]
        extra = []
        if "accuracy_before_pruning" in rows[0]:
            extra.append(f"{fmt([r['accuracy_before_pruning'] for r in rows])} / {fmt([r['accuracy'] for r in rows])}")
        lines.append(f"| {method} | {lr:g} | {max(r['adapter_size'] for r in rows):,} | {len(rows)} | {fmt(acc)} | "
                     f"{' '.join(extra) or '–'} | {statistics.mean(r['wall_s'] for r in rows):.0f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("result")
    p.add_argument("--out", required=True)
    a = p.parse_args()
    text = table(json.load(open(a.result)))
    with open(a.out, "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
