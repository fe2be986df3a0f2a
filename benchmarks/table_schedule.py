"""Pruning during training, collected: dev accuracy of finished ``spam-hf compress --schedule_sparsity s`` runs,
as they came out of training (no recovery: the masked groups are removed, nothing else is trained), and, where
a ``spam-hf prune RUN --recovery_steps K --output_dir RUN/<recovery-dir>`` exists, after its recovery.

Reads each run's ``run_config.json`` (seed, sparsity, schedule) and ``pruning_report.json`` (accuracy, achieved
sparsity), writes ``OUT.json`` (one row per run) and ``OUT.md`` (mean ± std over seeds per sparsity and
pruning time). ``--after-training-dirs`` adds runs pruned after training (``--schedule_sparsity 0``) as the
comparison in the same table.

    for p in 50 70 90; do for s in 0 1 2; do
      spam-hf compress --recipe recipes/minilm-sst2-cpu.yaml --seed $s --output-dir runs/sched$p-s$s \\
        --schedule_sparsity 0.$p --sparsity 0.$p --method auto
      spam-hf prune runs/sched$p-s$s --sparsity 0.$p --recovery_steps 200 --output_dir runs/sched$p-s$s/rec200
    done; done
    python benchmarks/table_schedule.py --run-dirs runs/sched{50,70,90}-s{0,1,2} --out benchmarks/results/schedule_cpu
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
from typing import Dict, List, Optional


def read_json(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def selection_of(report: dict) -> dict:
    """The report's ``selection`` (a dict, or its ``repr`` in older reports)."""
    sel = report.get("selection", {})
    if isinstance(sel, str):
        import ast
        sel = ast.literal_eval(sel)
    return sel


def run_row(run_dir: str, recovery_dir: str, scheduled: bool = True) -> dict:
    """One finished run: ``{run_dir, seed, sparsity, pruned, schedule, achieved, accuracy, recovered?,
    recovery_steps?}``; ``scheduled`` says whether it must have been trained with a schedule or without one."""
    config = read_json(os.path.join(run_dir, "run_config.json"))
    training = config.get("training", {})
    if scheduled and not training.get("schedule_sparsity"):
        raise ValueError(f"{run_dir} was not trained with --schedule_sparsity")
    if not scheduled and training.get("schedule_sparsity"):
        raise ValueError(f"{run_dir} was trained with --schedule_sparsity; it is not a run pruned after training")
    report = read_json(os.path.join(run_dir, "pruning_report.json"))
    metric = report.get("metric", "accuracy")
    row = {"run_dir": run_dir, "seed": training.get("seed"), "sparsity": config["compress"]["sparsity"],
           "pruned": "during training" if scheduled else "after training",
           "schedule": {k: training[k] for k in ("schedule_sparsity", "schedule_start", "schedule_end",
                                                 "schedule_every", "schedule_method")},
           "achieved": selection_of(report).get("sparsity_achieved"), "accuracy": report["pruned"][metric],
           "command": report.get("command"), "device": report.get("device"), "date": report.get("date")}
    rec_path = os.path.join(run_dir, recovery_dir, "pruning_report.json")
    if os.path.exists(rec_path):
        rec = read_json(rec_path)
        row.update(recovered=rec["pruned"][metric], recovery_steps=rec.get("recovery", {}).get("steps"),
                   recovery_command=rec.get("command"))
    return row


def fmt(values: List[float]) -> str:
    values = [100 * v for v in values]
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"


def table(rows: List[dict]) -> str:
    by: Dict[tuple, List[dict]] = {}
    for r in rows:
        by.setdefault((r["sparsity"], r.get("pruned", "during training")), []).append(r)
    lines = ["| sparsity | pruned | seeds | achieved (min) | no recovery | after recovery (steps) |",
             "|---|---|---|---|---|---|"]
    for s, when in sorted(by, key=lambda k: (k[0], k[1] != "after training")):
        rs = sorted(by[s, when], key=lambda r: r["seed"])
        rec = [r["recovered"] for r in rs if "recovered" in r]
        steps = sorted({r.get("recovery_steps") for r in rs if "recovered" in r})
        achieved = min(r["achieved"] for r in rs if r["achieved"] is not None) if any(r["achieved"] for r in rs) else None
        lines.append(f"| {s:.0%} | {when} | {','.join(str(r['seed']) for r in rs)} | "
                     f"{'–' if achieved is None else f'{achieved:.1%}'} | {fmt([r['accuracy'] for r in rs])} | "
                     f"{fmt(rec)}{f' ({steps[0]})' if len(steps) == 1 and steps[0] else ''}"
                     f"{'' if len(rec) in (0, len(rs)) else f' [{len(rec)} of {len(rs)} seeds]'} |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[List[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run-dirs", nargs="+", required=True, help="finished compress runs with --schedule_sparsity")
    p.add_argument("--after-training-dirs", nargs="*", default=[],
                   help="finished compress runs pruned after training (--schedule_sparsity 0), for comparison")
    p.add_argument("--recovery-dir", default="rec200", help="sub-folder of each run holding its recovered prune")
    p.add_argument("--out", required=True, help="output path without extension (.json and .md are written)")
    a = p.parse_args(argv)
    rows = [run_row(d, a.recovery_dir) for d in a.run_dirs] + \
        [run_row(d, a.recovery_dir, scheduled=False) for d in a.after_training_dirs]
    write_results(a.out, "benchmarks/table_schedule.py", argv, rows, table(rows))


def write_results(out: str, script: str, argv: Optional[List[str]], rows: List[dict], md: str) -> None:
    """``OUT.json`` (date, the command, the devices of the rows, the rows) and ``OUT.md`` (``md``, also printed)."""
    result = {"date": datetime.date.today().isoformat(),
              "command": " ".join(["python", script] + (argv if argv is not None else sys.argv[1:])),
              "devices": sorted({str(r["device"]) for r in rows}), "rows": rows}
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out + ".json", "w") as f:
        json.dump(result, f, indent=1)
    with open(out + ".md", "w") as f:
        f.write(md)
    print(md)


if __name__ == "__main__":
    main()
