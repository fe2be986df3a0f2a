"""Finished ``spam-hf prune`` (or ``compress``) outputs, collected by label: dev accuracy over seeds.

Each ``--group LABEL=DIR[,DIR...]`` names one setting measured on several seeds (one output folder per seed,
each holding the ``pruning_report.json`` that ``prune`` / ``compress`` wrote). The seed is read from the
``run_config.json`` of the folder or of its parent (``spam-hf prune RUN --output_dir RUN/sub``). Writes
``OUT.json`` (one row per folder: label, seed, sparsity, achieved, accuracy, the floor ``min_keep`` used, the
heads and neurons kept per layer, the command, device and date; with a recovery fine-tune also the accuracy
before it and its learning rate) and ``OUT.md`` (mean ± std per label; with recovery, columns for both).

    for s in 0 1 2; do for mk in 0 0.05; do
      spam-hf prune runs/post90-s$s --sparsity 0.9 --min_keep $mk --output_dir runs/post90-s$s/p90mk$mk
    done; done
    python benchmarks/table_prune.py --group "no floor=runs/post90-s0/p90mk0,runs/post90-s1/p90mk0,..." \\
        --group "floor 0.05=runs/post90-s0/p90mk0.05,..." --out benchmarks/results/min_keep_cpu
"""

from __future__ import annotations

import argparse
import os
from typing import Dict, List, Optional, Tuple

from table_schedule import fmt, read_json, write_results  # the benchmarks folder is the script's own


def parse_group(text: str) -> Tuple[str, List[str]]:
    """``"LABEL=DIR,DIR"`` → ``(LABEL, [DIR, DIR])``."""
    label, sep, dirs = text.partition("=")
    if not sep or not label.strip() or not dirs.strip():
        raise ValueError(f"--group must be LABEL=DIR[,DIR...], got {text!r}")
    return label.strip(), [d.strip() for d in dirs.split(",") if d.strip()]


def seed_of(folder: str) -> Optional[int]:
    """The training seed from ``run_config.json`` in ``folder`` or its parent (None if neither has one)."""
    for d in (folder, os.path.dirname(os.path.normpath(folder))):
        path = os.path.join(d, "run_config.json")
        if os.path.exists(path):
            return read_json(path).get("training", {}).get("seed")
    return None


def row_of(label: str, folder: str) -> dict:
    """One output folder as a table row (``ValueError`` naming the folder if it has no report)."""
    path = os.path.join(folder, "pruning_report.json")
    if not os.path.exists(path):
        raise ValueError(f"{folder} has no pruning_report.json (not a finished prune / compress output)")
    report = read_json(path)
    metric = report.get("metric", "accuracy")
    selection = report.get("selection", {})
    layers = [{k: layer.get(k) for k in ("layer", "heads_kept", "neurons_kept")} for layer in selection.get("layers", [])]
    recovery = report.get("recovery") or {}
    return {"label": label, "folder": folder, "seed": seed_of(folder), "sparsity": selection.get("sparsity_target"),
            "achieved": selection.get("sparsity_achieved"), "accuracy": report["pruned"][metric],
            "before_recovery": report["pruned"].get(f"{metric}_before_recovery"),
            "recovery_steps": recovery.get("steps"), "recovery_lr": recovery.get("lr"),
            "min_keep": report.get("min_keep"), "layers": layers, "command": report.get("command"),
            "device": report.get("device"), "date": report.get("date")}


def lr_text(lr: float) -> str:
    """A learning rate as it is typed: ``2e-4``, ``5e-5``, ``1.5e-4``."""
    mantissa, exponent = f"{lr:e}".split("e")
    return f"{float(mantissa):g}e{int(exponent)}"


def table(rows: List[dict]) -> str:
    by: Dict[str, List[dict]] = {}
    for r in rows:
        by.setdefault(r["label"], []).append(r)
    recovered = any(r.get("before_recovery") is not None for r in rows)
    extra = " before recovery | recovery lr |" if recovered else ""
    lines = ["| setting | sparsity | seeds | achieved (min) |" + extra + " accuracy | per seed | fewest heads in a layer |",
             "|---|---|---|---|---|---|---|" + "---|---|" * recovered]
    for label, rs in by.items():
        rs = sorted(rs, key=lambda r: (r["seed"] is None, r["seed"]))
        sparsities = sorted({f"{r['sparsity']:.0%}" for r in rs if r["sparsity"] is not None}, key=lambda t: int(t[:-1]))
        heads = [min((layer["heads_kept"] for layer in r["layers"] if layer["heads_kept"] is not None), default=None)
                 for r in rs]
        per_seed = " / ".join(f"{100 * r['accuracy']:.1f}" for r in rs)
        cells = ""
        if recovered:
            before = [r["before_recovery"] for r in rs if r.get("before_recovery") is not None]
            lrs = sorted({r["recovery_lr"] for r in rs if r.get("recovery_lr") is not None})
            cells = f" {fmt(before)} | {', '.join(lr_text(lr) for lr in lrs) or '–'} |"
        lines.append(f"| {label} | {', '.join(sparsities)} | "
                     f"{','.join(str(r['seed']) for r in rs)} | {min(r['achieved'] for r in rs):.1%} |{cells} "
                     f"{fmt([r['accuracy'] for r in rs])} | {per_seed} | "
                     f"{' / '.join('–' if h is None else str(h) for h in heads)} |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[List[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--group", action="append", required=True, help="LABEL=DIR[,DIR...]: one setting, one dir per seed")
    p.add_argument("--out", required=True, help="output path without extension (.json and .md are written)")
    a = p.parse_args(argv)
    rows = [row_of(label, d) for label, dirs in map(parse_group, a.group) for d in dirs]
    write_results(a.out, "benchmarks/table_prune.py", argv, rows, table(rows))


if __name__ == "__main__":
    main()
