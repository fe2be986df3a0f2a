"""Speed of spam-hf's exports in PyTorch and in ONNX Runtime: against the dense model, and against the ceiling.

For each export (``--export LABEL=DIR``, a spam-hf export, uneven or ``--uniform``) this builds its *uniform
ceiling*: the dense model with the same total number of heads and neurons kept, spread evenly over the layers
(the first ones of each layer; weights do not matter for speed), which is the fastest shape that size can take.
Then, in this process, with ``--threads`` threads, at each batch size and ``--seq-len`` tokens:

- PyTorch: dense vs export (speed-up) and ceiling vs export (``t_ceiling / t_export``: the share of the ceiling
  the export reaches), each pair timed interleaved (``spam_hf.costs.compare_latency``);
- ONNX Runtime: the same pairs on graphs written by ``spam-hf export`` (``spam_hf.export.onnx``), interleaved
  (``spam_hf.export.onnx.compare_onnx_latency``).

Accuracy is read from the export's run report when it has one. Writes ``OUT.json`` and ``OUT.md``.

    python benchmarks/deploy_speed.py --dense runs/post90-s0/dense --export 50%=runs/post90-s0/p50/model \\
        --export "50% uniform=runs/post90-s0/p50u/model" --export 70%=runs/post90-s0/p70/model \\
        --export 90%=runs/post90-s0/p90/model --out benchmarks/results/deploy_speed_cpu
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import shlex
import shutil
import sys
import tempfile
from typing import Dict, List, Optional, Tuple

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import torch  # noqa: E402

from spam_hf.architectures import group_specs  # noqa: E402
from spam_hf.costs import compare_latency, model_costs  # noqa: E402
from spam_hf.export import from_pretrained, save_pruned  # noqa: E402
from spam_hf.export.onnx import compare_onnx_latency, export_onnx  # noqa: E402
from spam_hf.pruning import prune_groups  # noqa: E402
from spam_hf.pruning.selection import group_costs, prunable_cost  # noqa: E402


def kept_counts(model) -> Dict[str, int]:
    """``{spec name: groups left}`` of a (pruned) model."""
    return {s.name: s.count for s in group_specs(model)}


def uniform_ceiling(dense: torch.nn.Module, export) -> torch.nn.Module:
    """A copy of the dense model cut to the export's size with the same groups in every layer (the first ones):
    ``round(total / layers)`` of each group kind per layer, then the neurons per layer that bring its prunable
    parameters closest to the export's (the removed fraction the same, as far as whole neurons allow: rounding
    heads alone left the 90% MiniLM ceiling 5% smaller than the export). KV heads are left to the surgery, which
    keeps those the kept query heads read."""
    model = copy.deepcopy(dense)
    specs = group_specs(model)
    left = kept_counts(export)
    per_layer: Dict[str, int] = {}
    parents = {s.parent for s in specs if s.parent}
    for kind in {s.kind for s in specs if s.name not in parents}:
        of_kind = [s for s in specs if s.kind == kind]
        per_layer[kind] = round(sum(left.get(s.name, 0) for s in of_kind) / len(of_kind))
    neurons = [s for s in specs if s.kind == "neuron"]
    if neurons and "neuron" in per_layer:
        target = prunable_cost(export, group_specs(export), "params", 128)
        costs = {s.name: group_costs(model, s, "params", 128) for s in specs}
        fixed = prunable_cost(model, specs, "params", 128) - sum(float(c.sum()) for c in costs.values())

        def total(n_neurons: int) -> float:
            counts = {**per_layer, "neuron": n_neurons}
            return fixed + sum(float(costs[s.name][: counts.get(s.kind, s.count)].sum()) for s in specs)

        per_layer["neuron"] = min(range(max(s.count for s in neurons) + 1), key=lambda n: abs(total(n) - target))
    keep = {s.name: torch.arange(min(per_layer.get(s.kind, s.count), s.count))
            for s in specs if s.name not in parents or s.kind in per_layer}
    return prune_groups(model, keep)


def accuracy_of(export_dir: str) -> Optional[float]:
    """The metric the export's run report gives for it (``pruning_report.json`` beside the folder), if any."""
    report = os.path.join(os.path.dirname(os.path.abspath(export_dir)), "pruning_report.json")
    if not os.path.isfile(report):
        return None
    report = json.load(open(report))
    return (report.get("pruned") or {}).get(report.get("metric"))


def pairs(items: List[str]) -> List[Tuple[str, str]]:
    out = []
    for item in items:
        label, sep, path = item.partition("=")
        if not sep:
            raise SystemExit(f"--export must be LABEL=DIR, got {item!r}")
        out.append((label, path))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dense", required=True, help="the dense model (a run's dense/ folder or any checkpoint)")
    p.add_argument("--export", action="append", required=True, help="LABEL=DIR of a spam-hf export; repeatable")
    p.add_argument("--batch-sizes", default="32,1")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--out", required=True, help="OUT.json and OUT.md are written")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    batch_sizes = [int(b) for b in a.batch_sizes.split(",")]
    res = {"date": datetime.date.today().isoformat(), "command": "python " + shlex.join(sys.argv),
           "machine": f"CPU, {a.threads} threads", "torch": torch.__version__, "seq_len": a.seq_len, "rows": []}
    scratch = tempfile.mkdtemp(prefix="deploy-speed-")
    try:
        dense = from_pretrained(a.dense).eval()
        dense_flops = model_costs(dense, a.seq_len)["block_flops"]
        dense_onnx = export_onnx(a.dense, os.path.join(scratch, "dense")).path
        for label, path in pairs(a.export):
            export = from_pretrained(path).eval()
            ceiling = uniform_ceiling(dense, export)
            ceiling_dir = os.path.join(scratch, f"ceiling-{len(res['rows'])}")
            save_pruned(ceiling, ceiling_dir)
            onnx = {"export": export_onnx(path, os.path.join(scratch, f"export-{len(res['rows'])}")).path,
                    "ceiling": export_onnx(ceiling_dir, ceiling_dir + "-onnx").path}
            row = {"label": label, "path": path, "accuracy": accuracy_of(path),
                   "flops_left": model_costs(export, a.seq_len)["block_flops"] / dense_flops,
                   "ceiling_flops_left": model_costs(ceiling, a.seq_len)["block_flops"] / dense_flops}
            for bs in batch_sizes:
                timing = dict(repeats=a.repeats, batch_size=bs, seq_len=a.seq_len)
                row[f"bs{bs}"] = {
                    "torch_vs_dense": compare_latency(dense, export, threads=a.threads, **timing),
                    "torch_vs_ceiling": compare_latency(ceiling, export, threads=a.threads, **timing),
                    "ort_vs_dense": compare_onnx_latency(dense_onnx, onnx["export"], threads=a.threads, **timing),
                    "ort_vs_ceiling": compare_onnx_latency(onnx["ceiling"], onnx["export"], threads=a.threads,
                                                           **timing)}
                r = row[f"bs{bs}"]
                print(f"{label} batch {bs}: PyTorch x{r['torch_vs_dense']['speedup']:.2f} "
                      f"({100 * r['torch_vs_ceiling']['speedup']:.0f}% of ceiling), ONNX Runtime "
                      f"x{r['ort_vs_dense']['speedup']:.2f} ({100 * r['ort_vs_ceiling']['speedup']:.0f}% of ceiling)",
                      flush=True)
            res["rows"].append(row)
            with open(a.out + ".json", "w") as f:
                json.dump(res, f, indent=2)
        with open(a.out + ".md", "w") as f:
            f.write(table(res, batch_sizes))
        print(table(res, batch_sizes))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def table(res: dict, batch_sizes: List[int]) -> str:
    """Markdown: per export, accuracy, FLOPs left, and per batch size the speed-up over dense and the share of the
    ceiling, in PyTorch and ONNX Runtime (medians of interleaved pairs; quartiles in the JSON)."""
    head = "| export | accuracy | block FLOPs left |" + "".join(
        f" PyTorch b{b} | ONNX RT b{b} |" for b in batch_sizes)
    lines = [f"{res['machine']}, sequence {res['seq_len']}, {res['date']}: speed-up over dense "
             f"(share of the uniform ceiling)", "", head, "|" + "---|" * (3 + 2 * len(batch_sizes))]
    for row in res["rows"]:
        acc = f"{100 * row['accuracy']:.1f}" if row["accuracy"] is not None else "-"
        cells = [row["label"], acc, f"{100 * row['flops_left']:.1f}%"]
        for b in batch_sizes:
            r = row[f"bs{b}"]
            for engine in ("torch", "ort"):
                cells.append(f"{r[f'{engine}_vs_dense']['speedup']:.2f}x "
                             f"({100 * r[f'{engine}_vs_ceiling']['speedup']:.0f}%)")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
