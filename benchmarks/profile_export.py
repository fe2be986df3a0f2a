"""Where an export's forward time goes, operator by operator, next to its uniform ceiling (``deploy_speed``).

Both models are profiled with ``torch.profiler`` in this process, in turn (export, ceiling, export, ceiling), for
``--forwards`` forwards each after a warm-up, at ``--batch-size`` × ``--seq-len`` with ``--threads`` threads; the
self CPU time per forward of every operator is averaged over the two turns. Uneven layers would show up as extra
operators (gathers, copies) or as a different count of calls; the layer shapes of both are printed too.

    python benchmarks/profile_export.py --dense runs/post90-s0/dense --export runs/post90-s0/p90/model \\
        --out benchmarks/results/profile_p90_b1_cpu.json
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))

import torch  # noqa: E402

from deploy_speed import kept_counts, uniform_ceiling  # noqa: E402
from spam_hf.costs import latency_ids  # noqa: E402
from spam_hf.export import from_pretrained  # noqa: E402


def profile(model, ids, mask, forwards: int, warmup: int = 20):
    """``({operator: self CPU µs per forward}, {operator: calls per forward})``."""
    with torch.no_grad():
        for _ in range(warmup):
            model(input_ids=ids, attention_mask=mask)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            for _ in range(forwards):
                model(input_ids=ids, attention_mask=mask)
    time, calls = collections.Counter(), collections.Counter()
    for event in prof.key_averages():
        time[event.key] += event.self_cpu_time_total / forwards
        calls[event.key] += event.count / forwards
    return time, calls


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dense", required=True)
    p.add_argument("--export", required=True)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--forwards", type=int, default=200)
    p.add_argument("--top", type=int, default=15)
    p.add_argument("--out", required=True)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    dense = from_pretrained(a.dense).eval()
    export = from_pretrained(a.export).eval()
    ceiling = uniform_ceiling(dense, export).eval()
    ids = latency_ids(dense.config, a.batch_size, a.seq_len)
    mask = torch.ones_like(ids)
    totals = {"export": collections.Counter(), "ceiling": collections.Counter()}
    calls = {}
    for _ in range(2):
        for name, model in (("export", export), ("ceiling", ceiling)):
            t, c = profile(model, ids, mask, a.forwards)
            totals[name].update({k: v / 2 for k, v in t.items()})
            calls[name] = c
    ops = sorted(set(totals["export"]) | set(totals["ceiling"]),
                 key=lambda k: -(totals["export"][k] + totals["ceiling"][k]))
    rows = [{"op": k, "export_us": round(totals["export"][k], 1), "ceiling_us": round(totals["ceiling"][k], 1),
             "export_calls": calls["export"][k], "ceiling_calls": calls["ceiling"][k]} for k in ops]
    res = {"date": datetime.date.today().isoformat(), "command": "python " + " ".join(sys.argv),
           "machine": f"CPU, {a.threads} threads", "torch": torch.__version__, "batch_size": a.batch_size,
           "seq_len": a.seq_len, "forwards": a.forwards,
           "export_us_per_forward": round(sum(totals["export"].values()), 1),
           "ceiling_us_per_forward": round(sum(totals["ceiling"].values()), 1),
           "export_groups": kept_counts(export), "ceiling_groups": kept_counts(ceiling), "ops": rows}
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(res, f, indent=2)
    print(f"per forward: export {res['export_us_per_forward']:.0f} µs, ceiling {res['ceiling_us_per_forward']:.0f} µs")
    print(f"{'operator':40s} {'export µs':>10s} {'ceiling µs':>10s} {'calls':>9s}")
    for r in rows[: a.top]:
        print(f"{r['op'][:40]:40s} {r['export_us']:10.1f} {r['ceiling_us']:10.1f} "
              f"{r['export_calls']:4.0f}/{r['ceiling_calls']:.0f}")


if __name__ == "__main__":
    main()
